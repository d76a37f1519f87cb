"""YAML presets shipped with vlprune (``vlprune.load_config(name)``)."""

if "." not in __name__:  # imported as a top-level package from the repo root: this folder is vlprune.configs only
    raise ModuleNotFoundError(f"No module named {__name__!r} (this folder installs as vlprune.configs)", name=__name__)
