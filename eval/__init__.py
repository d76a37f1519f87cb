"""Evaluation (installed as ``vlprune.eval``): the lmms-eval model (:mod:`~vlprune.eval.lmms_model`, registered
through the ``lmms_eval.models`` entry point in :mod:`~vlprune.eval.plugin`), the offline shapes tasks
(:mod:`~vlprune.eval.tasks`), efficiency measurements (:mod:`~vlprune.eval.measure`) and the grid runner behind
``vlprune bench`` (:mod:`~vlprune.eval.grid`). Importing this package imports neither lmms-eval nor torch."""

if "." not in __name__:  # imported as a top-level package from the repo root: this folder is vlprune.eval only
    raise ModuleNotFoundError(f"No module named {__name__!r} (this folder installs as vlprune.eval)", name=__name__)
