import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import register_tiny_clip, tiny_llava  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def llava():
    return tiny_llava("sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava("eager")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """open_clip knows the tiny CLIP of ``tiny.TINY_CLIP`` (its random weights come from the test's seed)."""
    register_tiny_clip(tmp_path_factory.mktemp("clip"))
