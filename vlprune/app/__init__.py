"""The application built on the pruning core: the shapes task and the embedded model trained on it
(:mod:`~vlprune.app.shapes`, :mod:`~vlprune.app.embedded`, :mod:`~vlprune.app.train`), loading and comparing models
(:mod:`~vlprune.app.models`), overlays of kept tokens (:mod:`~vlprune.app.overlays`), the shapes bench
(:mod:`~vlprune.app.bench`) and the Gradio demo (:mod:`~vlprune.app.demo`).

The dependency rule: the core (everything in ``vlprune`` outside ``app``, ``cli`` and ``eval``) never imports this
package; this package never imports ``vlprune.cli`` or ``vlprune.eval``, which sit on top of it.
"""
