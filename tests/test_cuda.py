"""On a CUDA GPU (``-m cuda``; skipped without one): the Triton kernels compiled for the device against their
references at real sizes, and tiny wrapped models of every family in bf16 with SDPA and eager attention against the
same model's fp32 CPU forward (the reference the CPU suite checks by hand), with the plans the GPU run made.

bf16 rounds differently from fp32, so logits are compared within a tolerance relative to their scale, and greedy
tokens are compared where the reference's choice is not a near-tie that bf16 can flip (teacher-forced on the GPU's
tokens: the reference's logit for the GPU's token must be within that tolerance of its best)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_families import shapes_of

import vlprune

from families import FAMILIES
from reference import deepstack_of, embed, layer_loop, merges_of

# VLPRUNE_CUDA_TESTS_ON=cpu runs the model tests in bf16 on the CPU: a smoke test of this file without a GPU.
DEVICE = os.environ.get("VLPRUNE_CUDA_TESTS_ON", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

METHODS = {
    "uniform": {"keep": 5},
    "divprune": {"keep": 5},
    "fastv": {"keep": 5, "layer": 1},
    "dart": {"keep": 5, "layer": 1},
}
ATTENTION = ("sdpa", "eager")
TOLERANCE = 0.05  # of the logits' scale: bf16 keeps 8 bits of mantissa, through 2 layers and a tiny random model
KERNEL_SIZES = {  # (batch, tokens, width, kept per sample)
    "llava-1.5-7b": (8, 636, 4096, (124, 188, 92, 252, 124, 60, 316, 124)),
    "video-25k": (1, 25_152, 3584, (6_336,)),
}


def shapes(name: str):
    return shapes_of(name)[:2]


def to_device(inputs: dict, dtype) -> dict:
    return {k: (v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)) for k, v in inputs.items()}


def scale(logits: torch.Tensor) -> float:
    return float(logits.float().abs().max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def cpu_model(request):
    family = FAMILIES[request.param]
    return family, family.build(layers=2)


@pytest.fixture(scope="module", params=ATTENTION)
def gpu_model(request, cpu_model):
    family, model = cpu_model
    gpu = copy.deepcopy(model).to(DEVICE, torch.bfloat16)
    gpu.set_attn_implementation(request.param)
    return family, model, gpu


def gpu_run(family, gpu, inputs, steps=4):
    """(last-position logits (B, V) fp32 on the CPU, greedy tokens (B, steps) on the CPU) of ``generate``."""
    with torch.no_grad():
        out = gpu.generate(
            **to_device(inputs, torch.bfloat16),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.logits[0].float().cpu(), out.sequences[:, inputs["input_ids"].shape[1] :].cpu()


def reference_logits(family, model, inputs, plans, tokens) -> torch.Tensor:
    """The fp32 CPU reference's logits (B, steps, V) for each generated step, teacher-forced on ``tokens``: the hand
    loop of :func:`reference.layer_loop` with ``plans`` (each stage's kept tokens plus every generated position)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    steps = tokens.shape[1]
    fed = tokens[:, : steps - 1]
    full_ids = torch.cat([ids, fed], 1)
    full_mask = torch.cat([mask.bool(), torch.ones_like(fed, dtype=torch.bool)], 1)
    length = ids.shape[1]
    prompt = embed(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))
    embeds = torch.cat([prompt, model.model.get_input_embeddings()(fed)], 1)
    tail = torch.arange(length, length + fed.shape[1])
    stages = [(p.layer, [torch.cat([k.cpu(), tail]) for k in p.keep_tokens], merges_of(p, ids)) for p in plans]
    positions = family.positions(model, {**inputs, "input_ids": full_ids, "attention_mask": full_mask})
    with torch.no_grad():
        stack = deepstack_of(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))  # Qwen3-VL
        if stack is not None:
            stack = (torch.cat([stack[0], torch.zeros_like(fed, dtype=torch.bool)], 1), stack[1])
        logits = layer_loop(model, embeds, full_mask, positions, stages, deepstack=stack)
    return logits[:, -steps:]  # the prompt's last position, then each fed token's (the sequence is compacted)


def check_tokens(tokens: torch.Tensor, reference: torch.Tensor, tolerance: float, eos: int = 2) -> None:
    """Each GPU token is the reference's greedy choice, or within ``tolerance`` of it (a near-tie bf16 can flip)."""
    for b in range(tokens.shape[0]):
        for step, token in enumerate(tokens[b].tolist()):
            row = reference[b, step]
            best = int(row.argmax())
            assert token == best or row[best] - row[token] <= tolerance, (b, step, token, best)
            if token == eos:
                break


@pytest.mark.parametrize("method", sorted(METHODS))
def test_wrapped_bf16_equals_the_fp32_reference(gpu_model, method):
    family, model, gpu = gpu_model
    inputs = family.inputs(model, shapes(family.name), seed=2)
    with vlprune.wrap(gpu, method, **METHODS[method]) as pruned:
        logits, tokens = gpu_run(family, gpu, inputs)
        plans = list(pruned.plans)
        reference = reference_logits(family, model, inputs, plans, tokens)
        tolerance = TOLERANCE * scale(reference)
        torch.testing.assert_close(logits, reference[:, 0], rtol=0, atol=tolerance)
        check_tokens(tokens, reference, tolerance)
        # a batch equals each prompt alone: the same plan, logits within bf16 rounding
        for b in range(inputs["input_ids"].shape[0]):
            one = family.split(inputs, shapes(family.name), b)
            logits1, _ = gpu_run(family, gpu, one, steps=1)
            assert torch.equal(pruned.plans[0].keep_visual[0].cpu(), plans[0].keep_visual[b].cpu())
            torch.testing.assert_close(logits1[0], logits[b], rtol=0, atol=tolerance)


def test_keep_all_is_the_identity_in_bf16(gpu_model):
    family, model, gpu = gpu_model
    inputs = family.inputs(model, shapes(family.name), seed=4)
    want_logits, want_tokens = gpu_run(family, gpu, inputs)
    for method in METHODS:
        with vlprune.wrap(gpu, method, **{**METHODS[method], "keep": 10_000}) as pruned:
            logits, tokens = gpu_run(family, gpu, inputs)
            assert pruned.plans[0].kept_per_sample == pruned.plans[0].num_visual
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-2 * scale(want_logits))
        assert torch.equal(tokens, want_tokens), method


# --- kernels at real sizes ------------------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need the compiled kernels")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("size", sorted(KERNEL_SIZES))
def test_kernels_at_real_sizes(size, dtype):
    from test_kernels import assert_same, ragged_keep, random_merges, tokens

    from vlprune import kernels
    from vlprune.kernels import reference, triton_ops

    batch, length, width, counts = KERNEL_SIZES[size]
    hidden, extra = tokens(batch, length=length, dim=width, width=128, rows_of_positions=3, dtype=dtype)
    keep = ragged_keep(counts, length, seed=1)
    ragged = kernels.pack(keep, length, hidden.device)
    assert_same(triton_ops.compact(ragged, hidden, **extra), reference.compact(ragged, hidden, **extra))  # bit-equal
    merges = random_merges(keep, length, seed=2)
    want = reference.compact(ragged, hidden, **extra, merges=merges)
    got = triton_ops.compact(ragged, hidden, **extra, table=kernels.merge_table(ragged, merges, length))
    assert_same(got._replace(hidden=want.hidden), want)
    # merged rows: within the reference's own rounding of an fp32-accumulated weighted sum
    error = (got.hidden.double() - want.hidden.double()).abs().max()
    assert error <= 4 * torch.finfo(dtype).eps * want.hidden.double().abs().max(), float(error)
    layers = [torch.randn(batch, 8, length, 128, device="cuda", dtype=dtype) for _ in range(4)]
    for a, b in zip(triton_ops.gather_cache(ragged, layers), reference.gather_cache(ragged, layers), strict=True):
        assert torch.equal(a, b)
