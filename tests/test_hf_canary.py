"""Canary: how ``generate()`` of the installed transformers calls a model, for every family.

vlprune tells a prefill from a decoding step by the KV cache the call carries (:mod:`vlprune.hf`). transformers has
renamed that keyword before (``past_key_values`` -> ``cache`` in 5.24) and may again: then this test fails, naming
what changed, instead of every generate test failing with a confusing error. CI runs it on the oldest and the
newest transformers the project declares."""

from __future__ import annotations

import copy
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
from reference import embed, layer_loop, original_positions

VISUAL_INPUTS = {"pixel_values", "mm_encoder_outputs", "image_grid_thw", "image_sizes"}


def recorded_calls(name: str) -> list[dict]:
    """Per model forward of a 3-token greedy ``generate``: the keywords given, which hold a ``Cache``, its length."""
    family = FAMILIES[name]
    model = family.build(2)
    shapes = shapes_of(name)[:1]
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
    shapes = shapes_of(name)[:1]
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


def test_right_padding_is_refused_for_in_llm_pruning_and_exact_before_the_llm(llava):
    """A right-padded batch: in-LLM stages raise a clear error naming padding_side='left' (the model untouched);
    pre-LLM pruning gives what each sample gives alone."""
    from tiny import pixels, prompt

    prompts = [prompt(llava, 3, 4, 1), prompt(llava, 1, 2, 1, seed=1)]
    length = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (length - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (length - len(p)) for p in prompts])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(2)}
    with torch.no_grad(), vlprune.wrap(llava, "fastv", keep=3, layer=1) as pruned:
        with pytest.raises(ValueError, match=r"sample\(s\) \[1\].*right-padded.*padding_side='left'"):
            llava(**inputs)
        assert pruned.plans == []
    with torch.no_grad(), vlprune.wrap(llava, "uniform", keep=3):
        batch_logits = llava(**inputs).logits
        for b, p in enumerate(prompts):
            one = llava(input_ids=torch.tensor([p]), pixel_values=inputs["pixel_values"][b : b + 1]).logits
            kept = one.shape[1]  # the sample's own kept tokens; right padding sits after them in the batch
            torch.testing.assert_close(batch_logits[b, :kept][-1], one[0, -1], rtol=1e-4, atol=1e-5)


def test_a_second_thread_during_a_call_is_a_clear_error(llava):
    """One wrapped model, two threads: the call that enters while another runs fails clearly; the running one and
    later calls are unaffected, also after a call that failed."""
    import threading

    from tiny import pixels, prompt

    inputs = {"input_ids": torch.tensor([prompt(llava, 3, 4, 1)]), "pixel_values": pixels(1)}
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        release.wait(30)

    with torch.no_grad(), vlprune.wrap(llava, "fastv", keep=3, layer=1) as pruned:
        want = llava(**inputs).logits
        handle = llava.model.language_model.layers[2].register_forward_pre_hook(hold)
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", llava(**inputs).logits))
        first.start()
        assert entered.wait(30)
        handle.remove()
        with pytest.raises(RuntimeError, match="running a call in another thread"):
            threading.Thread(target=lambda: llava(**inputs)).run()  # in this thread, while the first is held
        release.set()
        first.join(30)
        torch.testing.assert_close(results["first"], want, rtol=0, atol=0)
        with pytest.raises(ValueError):
            llava(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]]), pixel_values=None)
        torch.testing.assert_close(llava(**inputs).logits, want, rtol=0, atol=0)
        assert pruned.active


def test_a_second_turn_on_a_pruned_cache(llava):
    """generate() handed the cache of a first turn pruned before the LLM cannot tell the new tokens (that cache is
    shorter than the conversation it stands for): a clear error before anything runs. After in-LLM pruning layer 0's
    cache is whole, and a text turn continues it: its next token equals the hand reference that applies the first
    turn's plan to the whole conversation. A turn with new images is refused either way."""
    from tiny import IMAGE, pixels, prompt

    ids, pv = torch.tensor([prompt(llava, 3, 4, 1)]), pixels(1)
    for method, params in (("uniform", {}), ("fastv", {"layer": 1})):
        with torch.no_grad(), vlprune.wrap(llava, method, keep=3, **params) as pruned:
            out = llava.generate(input_ids=ids, pixel_values=pv, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True)  # fmt: skip
            plans = list(pruned.plans)
            text = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], 1)
            image = torch.cat([out.sequences, torch.tensor([[5] + [IMAGE] * 16 + [6]])], 1)
            turns = [(image, {"pixel_values": pixels(1, seed=1)})] + ([(text, {})] if method == "uniform" else [])
            for turn, extra in turns:
                with pytest.raises(ValueError, match="without past_key_values"):
                    cache = copy.deepcopy(hf.output_cache(out))
                    llava.generate(input_ids=turn, attention_mask=torch.ones_like(turn), max_new_tokens=2,
                                   past_key_values=cache, do_sample=False, **extra)  # fmt: skip
                assert [p.keep_tokens[0].tolist() for p in pruned.plans] == [p.keep_tokens[0].tolist() for p in plans]
            if method == "fastv":
                got = llava.generate(input_ids=text, attention_mask=torch.ones_like(text), max_new_tokens=1,
                                     past_key_values=copy.deepcopy(hf.output_cache(out)), do_sample=False)  # fmt: skip
                tail = torch.arange(ids.shape[1], text.shape[1])
                stages = [(p.layer, [torch.cat([p.keep_tokens[0], tail])]) for p in plans]
                mask = torch.ones_like(text)
                logits = layer_loop(llava, embed(llava, text, pv), mask, original_positions(mask), stages)
                assert int(got[0, -1]) == int(logits[0, -1].argmax())
