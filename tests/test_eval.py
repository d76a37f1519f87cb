"""The lmms-eval model, the offline shapes tasks, the efficiency measurements and ``vlprune bench --tasks``."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

import vlprune
from vlprune import cli, hf
from vlprune.app import bench, embedded, models, shapes
from vlprune.eval import tasks
from vlprune.eval.lmms_model import VLPrune, continuation_logprob
from vlprune.eval.measure import FlopCount, kv_cache_bytes
from vlprune.registry import create_selector

from reference import embed, layer_loop, merges_of, original_positions
from tiny import batch, pixels, prompt, tiny_llava

LIMIT = 6  # one question of each type


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Environment of an offline lmms-eval run: no hub, a private HF cache."""
    home = tmp_path_factory.mktemp("hf")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return tasks.include_path(LIMIT, root=tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def llava_next_checkpoint(tmp_path_factory):
    """A tiny random LLaVA-NeXT (anyres tiles of 56 px) with a real processor, saved with ``save_pretrained``."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    path = tmp_path_factory.mktemp("llava_next")
    tokenizer = embedded.build_tokenizer()
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=pinpoints,
        image_mean=list(embedded.MEAN),
        image_std=list(embedded.STD),
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=embedded.IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=embedded.CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=embedded.PAD,
        bos_token_id=embedded.BOS,
        eos_token_id=embedded.EOS,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=embedded.IMAGE,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def lmms_eval(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmms_eval", *args], env=env, capture_output=True, text=True, timeout=600
    )


def results_of(out):
    """The results JSON and, per task, the logged samples of one lmms-eval CLI run under ``out``."""
    (found,) = list(out.rglob("*_results.json"))
    samples = {}
    for path in out.rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_")[1]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(found.read_text()), samples


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_lmms_eval_cli_runs_generation_and_multiple_choice_offline(request, family, offline, task_dir, tmp_path):
    """``lmms-eval --model vlprune`` on the local shapes tasks, pruned, for two families: both tasks score every
    document, and (on the embedded LLaVA) the answers are exactly what vlprune gives when used directly."""
    if family == "llava":
        model_args, method, keep = "method=fastv,keep=36", "fastv", 36
    else:
        path = request.getfixturevalue("llava_next_checkpoint")
        model_args, method, keep = f"pretrained={path},method=divprune,keep=8", "divprune", 8
    done = lmms_eval(
        offline,
        "--model",
        "vlprune",
        "--model_args",
        model_args,
        "--tasks",
        ",".join(tasks.TASKS),
        "--include_path",
        str(task_dir),
        "--output_path",
        str(tmp_path),
        "--log_samples",
        "--batch_size",
        "2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results, samples = results_of(tmp_path)
    assert 0 <= results["results"]["vlprune_shapes"]["acc,none"] <= 1
    assert 0 <= results["results"]["vlprune_shapes_mc"]["acc,none"] <= 1
    assert sorted(samples) == sorted(tasks.TASKS)
    assert [s["doc_id"] for s in samples["vlprune_shapes"]] == list(range(LIMIT))
    for s in samples["vlprune_shapes_mc"]:  # one (loss, is_greedy) pair per option (written as text)
        options = tasks.choices_of(shapes.split("test", LIMIT)[s["doc_id"]])
        assert len(s["filtered_resps"]) == len(options)
        losses = [float(r[0]) for r in s["filtered_resps"]]
        assert all(loss > 0 for loss in losses)
        assert s["acc"] == float(min(range(len(losses)), key=losses.__getitem__) == int(s["target"]))
    if family == "llava":
        model, processor = embedded.load_default_model()
        with vlprune.wrap(model, method, keep=keep, **models.fitted(method, model)):
            direct = bench.answers(model, processor, shapes.split("test", LIMIT), max_new_tokens=4)
        got = [s["filtered_resps"] for s in sorted(samples["vlprune_shapes"], key=lambda s: s["doc_id"])]
        assert got == direct


def test_vlprune_is_registered_with_lmms_eval_through_its_entry_point(offline):
    """lmms-eval's model registry (what ``--model`` resolves through) lists ``vlprune`` and resolves it to our class.
    (``lmms-eval models`` in 0.7.3 prints only its built-in tables, not the registry, so it cannot show a plugin.)"""
    code = (
        "from lmms_eval.models import get_model, list_available_models; "
        "print('vlprune' in list_available_models()); cls = get_model('vlprune'); print(cls.__module__, cls.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=offline, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["True", "vlprune.eval.lmms_model", "VLPrune"]


@pytest.mark.parametrize(
    "args,message",
    [
        ("method=nope", "unknown method 'nope'"),
        ("method=divprune,keep=8,bogus=1", "bogus"),
        ("keep=8", "need a method"),
        ("method=divprune,keep=8,dtype=float8", "dtype='float8'"),
        ("method=divprune,keep=8,attn_implementation=magic", "attn_implementation='magic'"),
        ("method=divprune,keep=0", "keep"),
    ],
)
def test_bad_model_args_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        VLPrune.create_from_arg_string(args, {"batch_size": "1", "device": "cpu"})


def test_bad_model_args_fail_the_cli_run(offline, task_dir, tmp_path):
    done = lmms_eval(
        offline,
        "--model",
        "vlprune",
        "--model_args",
        "method=divprune,keep=8,bogus=1",
        "--tasks",
        "vlprune_shapes",
        "--include_path",
        str(task_dir),
        "--output_path",
        str(tmp_path),
    )
    # lmms-eval 0.7.3's CLI reports the exception and exits 0; what matters is that it names the key and no
    # results are written
    assert "bad model_args ['bogus']" in done.stdout + done.stderr
    assert not list(tmp_path.rglob("*_results.json"))


def test_presets_work_as_methods():
    lm = VLPrune.create_from_arg_string("method=divprune-64", {"batch_size": "1", "device": "cpu"})
    try:
        assert lm.pruned is not None and lm.pruned.config.stages[0].keep == 64
    finally:
        lm.pruned.unwrap()


IN_LLM = [m for m in vlprune.list_methods("image") if create_selector(m).default_layer > 0]
CANDIDATES = (torch.tensor([[7]]), torch.tensor([[7, 9, 11]]), torch.tensor([[12, 5, 9, 30, 2]]))


@pytest.fixture(scope="module")
def deep_llava():
    return tiny_llava("sdpa", layers=10)  # deep enough for every in-LLM default layer (pdrop: 8)


@pytest.mark.parametrize("method", [*IN_LLM, "divprune"])
def test_loglikelihood_prunes_on_the_context_then_scores_every_candidate(deep_llava, method):
    """Multiple choice: the plan is the one the context alone gives (each candidate may not choose the visual tokens),
    and each candidate's log-probability equals the unhooked model's layers driven by hand over the context's kept
    tokens followed by the candidate."""
    llava = deep_llava
    ids, mask = batch([prompt(llava, 3, 4, 1)])
    pv = pixels(1)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}
    with vlprune.wrap(llava, method, keep=5) as pruned:
        with torch.no_grad():
            llava(**inputs)
        context = list(pruned.plans)
        for target in CANDIDATES:
            logprob, greedy = continuation_logprob(llava, inputs, target)
            assert [p.keep_tokens[0].tolist() for p in pruned.plans] == [p.keep_tokens[0].tolist() for p in context]
            full, full_mask = torch.cat([ids, target], 1), torch.cat([mask, torch.ones_like(target)], 1)
            tail = torch.arange(ids.shape[1], full.shape[1])
            stages = [(p.layer, [torch.cat([p.keep_tokens[0], tail])], merges_of(p, ids)) for p in context]
            with torch.no_grad():
                logits = layer_loop(llava, embed(llava, full, pv), full_mask, original_positions(full_mask), stages)
            expected = torch.log_softmax(logits[0, -target.shape[1] - 1 : -1], -1)  # the candidate ends the sequence
            picked = expected.gather(-1, target[0, :, None])[:, 0]
            assert logprob == pytest.approx(float(picked.sum()), abs=1e-4)
            assert greedy == bool((expected.argmax(-1) == target[0]).all())


def test_loglikelihood_of_the_unwrapped_model_is_one_forward(llava):
    ids, mask = batch([prompt(llava, 3, 4, 1)])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(1)}
    target = CANDIDATES[2]
    with torch.no_grad():
        logits = llava(
            input_ids=torch.cat([ids, target], 1), attention_mask=torch.cat([mask, torch.ones_like(target)], 1),
            pixel_values=inputs["pixel_values"],
        ).logits  # fmt: skip
    expected = torch.log_softmax(logits[0, -target.shape[1] - 1 : -1], -1).gather(-1, target[0, :, None]).sum()
    assert continuation_logprob(llava, inputs, target)[0] == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize(
    "method,params", [(None, {}), ("uniform", {}), ("random", {"layer": 1}), ("random", {"layer": 3})]
)
@pytest.mark.parametrize("logits_to_keep", [0, 1])
def test_analytic_flops_equal_torch_flop_counter(llava_eager, method, params, logits_to_keep):
    """Analytic FLOPs (weights x tokens each layer saw) equal torch's FLOP counter on the same forward, unpruned,
    pruned before the LLM and inside it (selectors that do no matrix products, so the counter sees the model only)."""
    model = llava_eager
    ids, mask = batch([prompt(model, 3, 4, 1), prompt(model, 2, 5, 2)])
    pv = torch.cat([pixels(1), pixels(2, seed=1)])
    handle = vlprune.wrap(model, method, keep=5, **params) if method else None
    try:
        with torch.no_grad(), FlopCount(model) as count, FlopCounterMode(display=False) as direct:
            model(input_ids=ids, attention_mask=mask, pixel_values=pv, logits_to_keep=logits_to_keep)
    finally:
        if handle is not None:
            handle.unwrap()
    assert count.total == direct.get_total_flops()
    layers = model.config.text_config.num_hidden_layers
    expected_tokens = [ids.shape[1]] * layers
    if method:
        layer = params.get("layer", 0)
        kept = max(len(k) for k in handle.plans[0].keep_tokens)
        assert kept < ids.shape[1]
        expected_tokens = [ids.shape[1]] * layer + [kept] * (layers - layer)
    assert count.llm_tokens == expected_tokens


@pytest.mark.parametrize("method,params", [("fastv", {"layer": 2}), ("divprune", {})])
def test_kv_cache_bytes_count_the_kept_tokens_of_each_layer(llava, method, params):
    ids, mask = batch([prompt(llava, 3, 4, 1), prompt(llava, 1, 2, 2)])
    pv = torch.cat([pixels(1), pixels(2, seed=1)])
    config = llava.config.text_config
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # K + V fp32
    with torch.no_grad():
        full = llava(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
        full = hf.output_cache(full)
        with vlprune.wrap(llava, method, keep=3, **params) as pruned:
            out = llava(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
            (plan,) = pruned.plans
    length = max(len(k) for k in plan.keep_tokens)  # the batch is left-padded to its longest kept sample
    layers = config.num_hidden_layers
    expected = 2 * per_token * (ids.shape[1] * plan.layer + length * (layers - plan.layer))
    assert kv_cache_bytes(full) == 2 * per_token * ids.shape[1] * layers
    assert kv_cache_bytes(hf.output_cache(out)) == expected
    assert expected == sum(t.numel() * 4 for layer in hf.output_cache(out).layers for t in (layer.keys, layer.values))


def test_bench_grid_writes_csv_table_and_plots_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "grid"
    argv = ["bench", "--tasks", ",".join(tasks.TASKS), "--methods", "fastv,divprune", "--budgets", "36"]
    argv += ["--limit", str(LIMIT), "--timing-docs", "1", "--repeats", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["task"]) for r in rows] == [
        (cell, task) for cell in ("unpruned", "fastv@36", "divprune@36") for task in tasks.TASKS
    ]
    by = {(r["cell"], r["task"]): r for r in rows}
    base = by[("unpruned", "vlprune_shapes")]
    assert float(base["agreement"]) == 1.0 and float(base["first_token_kl"]) == pytest.approx(0, abs=1e-6)
    for cell in ("fastv@36", "divprune@36"):
        row = by[(cell, "vlprune_shapes")]
        assert 0 <= float(row["agreement"]) <= 1 and float(row["first_token_kl"]) >= 0
        assert float(row["flops_ratio"]) < 1 and float(row["kv_ratio"]) < 1
        assert float(row["prefill_s"]) > 0 and float(row["decode_tok_s"]) > 0 and float(row["peak_bytes"]) > 0
    assert float(by[("divprune@36", "vlprune_shapes")]["selector_s"]) > 0
    table = (out / "table.md").read_text()
    assert "fastv@36" in table and "divprune@36" in table
    for name in ("accuracy_vs_budget.png", "speedup_vs_budget.png", "accuracy_vs_flops.png"):
        assert (out / name).stat().st_size > 1000
    # resuming: finished cells are read back, not run again (their timings would differ); the baseline is run
    # again and every ratio is taken against it
    assert cli.main(argv) == 0
    with open(out / "results.csv") as f:
        again = {(r["cell"], r["task"]): r for r in csv.DictReader(f)}
    old, new = by[("fastv@36", "vlprune_shapes")], again[("fastv@36", "vlprune_shapes")]
    for key in ("acc", "agreement", "first_token_kl", "prefill_s", "decode_tok_s", "flops", "kv_bytes"):
        assert new[key] == old[key]
    base = again[("unpruned", "vlprune_shapes")]
    assert float(new["prefill_speedup"]) == pytest.approx(float(base["prefill_s"]) / float(new["prefill_s"]))
    assert float(new["flops_ratio"]) == pytest.approx(float(new["flops"]) / float(base["flops"]))
