"""vlprune: training-free visual-token pruning and merging for Hugging Face vision-language models.

>>> with vlprune.wrap(model, "fastv", keep=64) as pruned:   # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=32)
...     pruned.plans
"""

from . import model_adapters, selectors  # noqa: F401  (registration of built-in names)
from .api import Pruned, unwrap, wrap
from .config import PruneConfig, Stage, load_config, preset_names
from .plan import KeepPlan
from .registry import create_selector, list_methods, list_models, register_adapter, register_selector
from .support import support_table

__version__ = "0.1.0"

__all__ = [
    "KeepPlan",
    "PruneConfig",
    "Pruned",
    "Stage",
    "create_selector",
    "list_methods",
    "list_models",
    "load_config",
    "preset_names",
    "register_adapter",
    "register_selector",
    "support_table",
    "unwrap",
    "wrap",
]
