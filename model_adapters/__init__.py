"""Model adapters, one file per family, registered by ``config.model_type``."""

if "." not in __name__:  # imported as a top-level package from the repo root: this is vlprune.model_adapters
    raise ModuleNotFoundError(f"No module named {__name__!r} (it installs as vlprune.model_adapters)", name=__name__)

from . import internvl, llava, llava_next, llava_next_video, llava_onevision, qwen_vl  # noqa: F401  (registration)
from .base import Adapter

__all__ = ["Adapter"]
