"""Model adapters, one file per family, registered by ``config.model_type``."""

from . import internvl, llava, llava_next, llava_next_video, llava_onevision, qwen_vl  # noqa: F401  (registration)
from .base import Adapter

__all__ = ["Adapter"]
