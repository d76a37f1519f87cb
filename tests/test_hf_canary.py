"""Canary: how ``generate()`` of the installed transformers calls a model, for every family.

vlprune tells a prefill from a decoding step by the KV cache the call carries (:mod:`vlprune.hf`). transformers has
renamed that keyword before (``past_key_values`` -> ``cache`` in 5.24) and may again: then this test fails, naming
what changed, instead of every generate test failing with a confusing error. CI runs it on the oldest and the
newest transformers the project declares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_families import shapes_of
from transformers.cache_utils import Cache

import vlprune
from vlprune import hf

from families import FAMILIES

VISUAL_INPUTS = {"pixel_values", "mm_encoder_outputs", "image_grid_thw", "image_sizes"}


def recorded_calls(name: str) -> list[dict]:
    """Per model forward of a 3-token greedy ``generate``: the keywords given, which hold a ``Cache``, its length."""
    family = FAMILIES[name]
    model = family.build(2)
    shapes = ((3, 2, family.sizes),) if name == "llava" else shapes_of(name)[:1]  # LLaVA's sizes are token counts
    inputs = family.inputs(model, shapes)
    calls = []

    def record(module, args, kwargs):
        caches = {name: value.get_seq_length() for name, value in kwargs.items() if isinstance(value, Cache)}
        given = {name for name, value in kwargs.items() if value is not None}
        calls.append({"given": given, "caches": caches, "args": len(args), "prefill": hf.is_prefill(kwargs)})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_passes_the_cache_under_a_known_name(name):
    calls = recorded_calls(name)
    version = transformers.__version__
    assert len(calls) == 3, f"transformers {version}: generate made {len(calls)} forward calls for 3 tokens"
    for step, call in enumerate(calls):
        assert call["args"] == 0, f"transformers {version}: step {step} passed positional arguments"
        unknown = set(call["caches"]) - set(hf.CACHE_NAMES)
        assert not unknown, (
            f"transformers {version} passes the KV cache as {sorted(unknown)}; vlprune.hf.CACHE_NAMES knows "
            f"{hf.CACHE_NAMES}: add the new name there"
        )
    prefill, *steps = calls
    # The prefill carries no cache or an empty one, and the images (raw, or encoded by generate beforehand).
    assert all(length == 0 for length in prefill["caches"].values())
    assert [call["prefill"] for call in calls] == [True, False, False], f"transformers {version}: vlprune.hf.is_prefill"
    assert prefill["given"] & VISUAL_INPUTS, f"transformers {version}: the prefill carried no image input"
    # Each decoding step carries the cache, non-empty, and no images.
    for step, call in enumerate(steps, 1):
        assert call["caches"], f"transformers {version}: decoding step {step} carried no Cache object"
        assert all(length > 0 for length in call["caches"].values())
        assert not call["given"] & {"pixel_values", "mm_encoder_outputs"}, (
            f"transformers {version}: decoding step {step} carried images ({sorted(call['given'] & VISUAL_INPUTS)})"
        )


def test_the_accessors_read_the_installed_names(llava):
    """``is_prefill`` / ``call_cache`` / ``output_cache`` on a real forward of the installed version."""
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = llava(input_ids=ids, use_cache=True)
    cache = hf.output_cache(out)
    assert isinstance(cache, Cache) and hf.cache_length(cache) == 3
    for name in hf.CACHE_NAMES:
        assert hf.call_cache({name: cache}) is cache
        assert not hf.is_prefill({name: cache})
    assert hf.is_prefill({}) and hf.is_prefill({hf.CACHE_NAMES[0]: None})


@pytest.mark.parametrize("name", ["kernels", "eval", "configs", "model_adapters"])
def test_top_level_folders_hide_no_installed_package(name):
    """From the repo root (where ``python -m pytest`` puts the working directory first on ``sys.path``) the top-level
    folders, installed as ``vlprune.<name>``, are not importable as ``<name>``: ``import kernels`` gives Hugging
    Face's package that transformers imports (an empty module when it is not installed), the others fail."""
    root = Path(__file__).parents[1]
    code = f"import {name}; print(getattr({name}, '__file__', None))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        assert name == "kernels", f"'import {name}' from the repo root found {done.stdout.strip()}"
        found = done.stdout.strip()
        assert found == "None" or not Path(found).is_relative_to(root), f"'import kernels' found {found}"
    else:
        assert f"ModuleNotFoundError: No module named '{name}'" in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_a_sampled_image_placeholder_decodes_as_a_plain_token(name):
    """A decoding step whose token is the image placeholder id continues the cached prompt (HF embeds it as a plain
    token): wrapped at keep-all it generates what the unwrapped model does, and pruned the plans still describe the
    prefill alone."""
    family = FAMILIES[name]
    model = family.build(2)
    shapes = ((3, 2, family.sizes),) if name == "llava" else shapes_of(name)[:1]
    inputs = family.inputs(model, shapes)
    image, length = model.config.image_token_id, inputs["input_ids"].shape[1]
    vocabulary = list(range(model.config.get_text_config().vocab_size))

    def force(batch_id, ids):  # the second generated token is the placeholder
        return [image] if ids.shape[-1] == length + 1 else vocabulary

    def generate():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 prefix_allowed_tokens_fn=force)  # fmt: skip
        return out[:, length:]

    unwrapped = generate()
    assert unwrapped[0, 1] == image
    with vlprune.wrap(model, "uniform", keep=10_000):
        assert torch.equal(generate(), unwrapped)
    with vlprune.wrap(model, "uniform", keep=3) as pruned:
        tokens = generate()
        assert tokens[0, 1] == image
        (plan,) = pruned.plans
        assert plan.kept_per_sample == [3 * len(shapes[0][2])]
