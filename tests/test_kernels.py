"""Kernels against their PyTorch references: on CUDA when there is one, else through Triton's interpreter on the CPU;
odd shapes, ragged and empty keeps, fp32/fp16/bf16; the dispatcher; and the core compacting through the kernels."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import vlprune  # noqa: E402
from vlprune import kernels  # noqa: E402
from vlprune.kernels import reference  # noqa: E402

if os.environ.get("VLPRUNE_REQUIRE_TRITON") != "1":
    pytest.importorskip("triton")
from vlprune.kernels import triton_ops  # noqa: E402

from tiny import IMAGE, batch, pixels, prompt, tiny_llava  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNTS = ((5, 0, 23), (0, 0, 0), (37, 1, 12), (1,))  # ragged, all empty, a full keep, one sample


def ragged_keep(counts, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(length, generator=g)[:n].sort().values.to(DEVICE) for n in counts]


def tokens(batch, length=37, dim=67, width=10, rows_of_positions=0, dtype=torch.float32, seed=0, broadcast=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=g).to(DEVICE, dtype)
    mask = torch.rand(batch, length, generator=g) > 0.2
    rows = torch.arange(length).expand(batch, length).clone()
    shape = (rows_of_positions, batch, length) if rows_of_positions else (batch, length)
    position_ids = torch.randint(0, 500, shape, generator=g)
    rope_batch = 1 if broadcast else batch
    cos, sin = torch.randn(2, rope_batch, length, width, generator=g).to(dtype)
    move = {"mask": mask, "rows": rows, "position_ids": position_ids, "cos": cos, "sin": sin}
    return hidden, {k: v.to(DEVICE) for k, v in move.items()}


def assert_same(got: kernels.Compacted, want: kernels.Compacted):
    for name, a, b in zip(got._fields, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("rows_of_positions", (0, 3))
def test_compact_kernel_equals_reference(dtype, counts, rows_of_positions):
    hidden, extra = tokens(len(counts), dtype=dtype, rows_of_positions=rows_of_positions, broadcast=counts[0] == 5)
    keep = ragged_keep(counts, hidden.shape[1], seed=len(counts))
    ragged = kernels.pack(keep, hidden.shape[1], hidden.device)
    want = reference.compact(ragged, hidden, **extra)
    assert_same(triton_ops.compact(ragged, hidden, **extra), want)  # a pure gather: bit-equal
    assert want.hidden.shape == (len(counts), max(counts), hidden.shape[-1])
    for b, k in enumerate(keep):  # the spec itself, against plain indexing
        n = k.numel()
        assert torch.equal(want.hidden[b, want.hidden.shape[1] - n :], hidden[b, k])
        assert torch.equal(want.mask[b, : want.mask.shape[1] - n], torch.zeros_like(want.mask[b, : -n or None]))
        assert torch.equal(want.rows[b, : want.rows.shape[1] - n], torch.full_like(want.rows[b, : -n or None], -1))


def test_compact_without_optional_tensors_and_on_strided_inputs():
    hidden, extra = tokens(3, dim=130)
    hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, D) with D not the fastest dimension
    keep = ragged_keep((5, 9, 2), hidden.shape[1], seed=1)
    ragged = kernels.pack(keep, hidden.shape[1], hidden.device)
    want = reference.compact(ragged, hidden, extra["mask"])
    assert_same(triton_ops.compact(ragged, hidden, extra["mask"]), want)
    assert want.rows is None and want.cos is None


def random_merges(keep, length, seed):
    """Each sample: every dropped slot goes to a random kept target with a random weight; targets include
    themselves (weight 0.5), as merging selectors plan it."""
    g = torch.Generator().manual_seed(seed)
    merges = []
    for k in keep:
        k = k.cpu()
        if k.numel() == 0:
            merges.append(None)
            continue
        dropped = torch.tensor(sorted(set(range(length)) - set(k.tolist())), dtype=torch.long)
        targets = k[torch.randint(0, k.numel(), (dropped.numel(),), generator=g)]
        sources = torch.cat([k, dropped])
        targets = torch.cat([k, targets])
        weights = torch.cat([torch.full((k.numel(),), 0.5), torch.rand(dropped.numel(), generator=g)])
        merges.append((sources.to(DEVICE), targets.to(DEVICE), weights.to(DEVICE)))
    return merges


def merged_in_fp64(hidden, keep, merges):
    """Ground truth for the merged rows, by hand in float64: {(b, output slot): row}."""
    out = {}
    new_len = max(k.numel() for k in keep)
    for b, (k, merge) in enumerate(zip(keep, merges, strict=True)):
        if merge is None:
            continue
        for j, slot in enumerate(k.tolist()):
            chosen = merge[1] == slot
            rows = hidden[b, merge[0][chosen]].double() * merge[2][chosen].double()[:, None]
            out[b, new_len - k.numel() + j] = rows.sum(0)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", ((5, 0, 23), (37, 1, 12)))
def test_merge_compact_kernel_equals_reference_within_its_own_rounding(dtype, counts):
    hidden, extra = tokens(len(counts), dtype=dtype, rows_of_positions=3)
    keep = ragged_keep(counts, hidden.shape[1], seed=7)
    merges = random_merges(keep, hidden.shape[1], seed=3)
    ragged = kernels.pack(keep, hidden.shape[1], hidden.device)
    want = reference.compact(ragged, hidden, **extra, merges=merges)
    got = triton_ops.compact(ragged, hidden, **extra, table=kernels.merge_table(ragged, merges, hidden.shape[1]))
    assert_same(got._replace(hidden=want.hidden), want)  # everything but the merged hidden states: bit-equal
    truth = merged_in_fp64(hidden, keep, merges)
    assert truth, "the plan merges something"
    unmerged = torch.ones(want.hidden.shape[:2], dtype=torch.bool)
    for (b, j), row in truth.items():
        unmerged[b, j] = False
        ref_error = (want.hidden[b, j].double() - row).abs().max()
        kernel_error = (got.hidden[b, j].double() - row).abs().max()
        # no looser than the reference's own rounding (plus fp32 accumulation-order slack)
        assert kernel_error <= ref_error + 1e-5 * row.abs().max(), (b, j, kernel_error, ref_error)
    assert torch.equal(got.hidden[unmerged], want.hidden[unmerged])


def test_merge_compact_is_deterministic():
    hidden, extra = tokens(3, dtype=torch.bfloat16)
    keep = ragged_keep((4, 9, 2), hidden.shape[1], seed=2)
    merges = random_merges(keep, hidden.shape[1], seed=4)
    ragged = kernels.pack(keep, hidden.shape[1], hidden.device)
    table = kernels.merge_table(ragged, merges, hidden.shape[1])
    first = triton_ops.compact(ragged, hidden, **extra, table=table)
    assert_same(triton_ops.compact(ragged, hidden, **extra, table=table), first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", ((5, 0, 29), (0, 0, 0), (29, 3, 17)))
def test_gather_cache_kernel_equals_reference(dtype, counts):
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(len(counts), 3, 29, 24, generator=g).to(DEVICE, dtype) for _ in range(5)]
    layers = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in layers]  # heads not outermost: strided input
    keep = ragged_keep(counts, 29, seed=5)
    ragged = kernels.pack(keep, 29, layers[0].device)
    want = reference.gather_cache(ragged, layers)
    got = triton_ops.gather_cache(ragged, layers)
    assert len(got) == len(layers)
    for a, b, x in zip(got, want, layers, strict=True):
        assert a.shape == b.shape == (len(counts), 3, max(counts), 24)
        assert torch.equal(a, b)
        for s, k in enumerate(keep):
            n = k.numel()
            assert torch.equal(b[s, :, b.shape[2] - n :], x[s, :, k])
            assert not b[s, :, : b.shape[2] - n].any()  # padding is zeros


def test_public_functions_dispatch(monkeypatch):
    hidden, extra = tokens(2)
    keep = ragged_keep((3, 8), hidden.shape[1], seed=0)
    monkeypatch.setenv("VLPRUNE_KERNELS", "reference")
    assert kernels.backend(DEVICE) == "reference"
    want = kernels.compact(keep, hidden, **extra)
    monkeypatch.setenv("VLPRUNE_KERNELS", "triton")
    assert kernels.backend("cpu") == "triton"
    assert_same(kernels.compact(keep, hidden, **extra), want)
    monkeypatch.setenv("VLPRUNE_KERNELS", "auto")
    assert kernels.backend("cpu") == "reference"
    assert kernels.backend("cuda") == "triton"
    layers = [hidden.view(2, 1, 37, 67)] * 2
    got, valid = kernels.gather_cache(keep, layers)
    assert torch.equal(valid, want.rows >= 0)
    assert torch.equal(got[1][:, 0], torch.where(valid[..., None], want.hidden, 0))
    monkeypatch.setenv("VLPRUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="VLPRUNE_KERNELS='fast'; allowed: auto, reference, triton"):
        kernels.compact(keep, hidden, **extra)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda h, e: kernels.compact(torch.tensor([1, 2]), h, **e), TypeError, "keep must be a non-empty list"),
        (lambda h, e: kernels.compact([torch.tensor([0.5])] * 2, h, **e), TypeError, r"keep\[0\] must be a 1-D int"),
        (lambda h, e: kernels.compact([torch.tensor([0, 37])] * 2, h, **e), ValueError, r"lie in \[0, 37\)"),
        (lambda h, e: kernels.compact([torch.tensor([0])], h, **e), ValueError, "keep has 1 samples but hidden has 2"),
        (lambda h, e: kernels.compact([torch.tensor([0])] * 2, h.long(), **e), TypeError, "hidden must be a"),
        (lambda h, e: kernels.compact([torch.tensor([0])] * 2, h, e["mask"].int()), TypeError, "mask must be a"),
        (
            lambda h, e: kernels.compact([torch.tensor([0])] * 2, h, e["mask"], cos=e["cos"]),
            ValueError,
            "both cos and sin",
        ),
        (
            lambda h, e: kernels.merge_compact(
                [torch.tensor([0])] * 2, [(torch.tensor([3]), torch.tensor([4]), torch.ones(1)), None], h, e["mask"]
            ),
            ValueError,
            r"merges\[0\]: every target must be a kept index",
        ),
        (lambda h, e: kernels.gather_cache([torch.tensor([0])] * 2, h), TypeError, "non-empty list of"),
        (
            lambda h, e: kernels.gather_cache([torch.tensor([0])] * 2, [h[:, None], h[:, None, :5]]),
            ValueError,
            r"tensors\[1\] differs",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(monkeypatch, call, error, message):
    hidden, extra = tokens(2)
    extra = {"mask": extra["mask"], "cos": extra["cos"]} if "cos" in message else extra
    for mode in ("reference", "triton"):
        monkeypatch.setenv("VLPRUNE_KERNELS", mode)
        with pytest.raises(error, match=message):
            call(hidden, extra)


@pytest.mark.parametrize("method, params", [("fastv", {"keep": 5}), ("sparsevlm", {"keep": 6})])
def test_the_core_compacts_through_the_kernels(monkeypatch, method, params):
    """A wrapped forward on a tiny LLaVA gives the same logits with the Triton kernels as with the reference
    (SparseVLM merges the tokens it drops into the kept ones)."""
    model = tiny_llava("sdpa", layers=3)
    prompts = [prompt(model, 3, 4, 1, seed=0), prompt(model, 1, 2, 2, seed=1)]
    ids, mask = batch(prompts)
    pv = torch.cat([pixels(1, seed=0), pixels(2, seed=1)])
    model, ids, mask, pv = (x.to(DEVICE) for x in (model, ids, mask, pv))
    handle = vlprune.wrap(model, method, layer=1, **params)
    logits = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("VLPRUNE_KERNELS", mode)
        with torch.no_grad():
            logits[mode] = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    handle.unwrap()
    assert (ids == IMAGE).sum() > 2 * 5
    assert torch.allclose(logits["triton"], logits["reference"], atol=1e-5, rtol=1e-5)
    if method == "fastv":  # no merging: a pure gather, bit-equal
        assert torch.equal(logits["triton"], logits["reference"])


def test_kernel_benchmark_runs_with_one_command():
    """``python benchmarks/kernel_speed.py --smoke`` (the GPU run minus CUDA): every op, both sizes, real timings."""
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "kernel_speed.py"))
    rows = bench["main"](["--smoke", "--batches", "1", "--repeats", "1"])
    assert [(r["op"], r["case"]) for r in rows] == [
        (op, case) for case in ("llava-1.5", "video") for op in ("compact", "merge_compact", "gather_cache")
    ]
    assert all(r["fused_ms"] > 0 and r["reference_ms"] > 0 and r["of_copy"] > 0 for r in rows)
