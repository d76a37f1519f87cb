"""Model adapters, one file per family, registered by ``config.model_type``."""

if (
    "." not in __name__
):  # imported as a top-level package from the repo root: this folder is vlprune.model_adapters only
    raise ModuleNotFoundError(
        f"No module named {__name__!r} (this folder installs as vlprune.model_adapters)", name=__name__
    )


from . import internvl, llava, llava_next, llava_next_video, llava_onevision, qwen_vl  # noqa: F401  (registration)
from .base import Adapter

__all__ = ["Adapter"]
