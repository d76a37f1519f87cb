"""The synthetic shapes task, the embedded model trained on it, and the ``vlprune`` command."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlprune
from vlprune import cli
from vlprune.app import bench, embedded, overlays, shapes, train


def test_scenes_are_deterministic_and_splits_never_share_one():
    a, b = shapes.sample(123), shapes.sample(123)
    assert (a.question, a.answer) == (b.question, b.answer)
    assert np.array_equal(np.asarray(shapes.render(a.scene)), np.asarray(shapes.render(b.scene)))
    seeds = {name: {s.seed for s in shapes.split(name, 300)} for name in ("validation", "test")}
    train_seeds = set(range(shapes.SPLITS["train"], shapes.SPLITS["train"] + 300))
    assert not (seeds["validation"] & seeds["test"]) and not (train_seeds & (seeds["validation"] | seeds["test"]))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        shapes.split("dev", 3)
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        shapes.ask(a.scene, "size", __import__("random").Random(0))


def test_every_answer_follows_from_the_scene():
    """Answers recomputed from the scene's objects by hand, one rule per question form."""
    for s in shapes.split("test", 300):
        things, words = s.scene.things, s.question.split()
        if s.kind == "count":
            if words[2] == "objects":
                expected = len(things)
            elif words[2] in shapes.COLORS:
                expected = sum(t.color == words[2] for t in things)
            else:
                expected = sum(t.shape + "s" == words[2] for t in things)
            assert s.answer == shapes.NUMBERS[expected]
        elif s.kind == "color":
            (match,) = [t for t in things if t.shape == words[4]]
            assert s.answer == match.color
        elif s.kind == "shape":
            (match,) = [t for t in things if t.color == words[4]]
            assert s.answer == match.shape
        elif s.kind == "position" and words[0] == "where":
            (match,) = [t for t in things if (t.color, t.shape) == (words[3], words[4])]
            column = "left" if match.x < shapes.SIZE / 2 else "right"
            row = "top" if match.y < shapes.SIZE / 2 else "bottom"
            assert s.answer == f"{row}-{column}"
        elif s.kind == "letter":
            assert s.answer == s.scene.letter.color.lower()
        # every object lies in one quadrant: clear of the middle lines
        for t in things:
            x0, y0, x1, y1 = t.box()
            assert (x1 < shapes.SIZE // 2 or x0 >= shapes.SIZE // 2) and (
                y1 < shapes.SIZE // 2 or y0 >= shapes.SIZE // 2
            )
    vocabulary = set(shapes.vocabulary())
    for s in shapes.split("validation", 300):
        words = set(embedded.prompt(s.question).split()) - {embedded.IMAGE_TOKEN}
        assert words <= vocabulary and s.answer in vocabulary


def test_patch_labels_mark_the_patches_under_an_object():
    s = shapes.sample(7).scene
    objects, _ = shapes.patch_labels(s)
    side = shapes.SIZE // shapes.PATCH
    for t in s.things:
        centre = (t.y // shapes.PATCH) * side + t.x // shapes.PATCH
        colour = list(shapes.COLORS).index(t.color)
        assert objects[centre] == 1 + colour * len(shapes.SHAPES) + shapes.SHAPES.index(t.shape)
    assert objects.count(0) > len(objects) // 2  # small objects on a large background


def test_training_inputs_match_the_processor():
    """The training script's pixels and token ids equal what the shipped processor gives at inference."""
    processor = embedded.build_processor()
    s = shapes.split("validation", 1)[0]
    image = shapes.render(s.scene)
    inputs = processor(images=image, text=embedded.prompt(s.question), return_tensors="pt")
    b = train.batch([s], processor.tokenizer.get_vocab())
    assert torch.equal(inputs["pixel_values"], b["pixels"])
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"][0], b["ids"][0, :prompt_length])
    assert (inputs["input_ids"] == embedded.IMAGE).sum() == 144


def test_training_script_stops_resumes_and_runs_vision_and_decoder_phases(tmp_path):
    """``--stop`` checkpoints and saves mid-schedule; ``--resume --vision`` trains only the vision tower, projector,
    embeddings and auxiliary heads (the decoder layers end as they were); ``--resume --decoder`` re-initialises the
    decoder layers and trains only them (the rest ends as the vision phase left it)."""
    common = ["--out", str(tmp_path), "--steps", "4", "--batch", "4", "--every", "2", "--threads", "1"]
    common += ["--validation", "12"]
    train.main([*common, "--stop", "1"])
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert first["step"] == 1 and first["phase"] == {"kind": "joint", "from": 0}
    assert first["phases"][0]["stopped_at"] == 1
    assert {"rows.weight", "cols.weight"} <= set(first["heads"])  # where each patch lies, on the projected features
    assert (tmp_path / "config.json").is_file() and (tmp_path / "training.json").is_file()
    train.main([*common, "--resume", "--vision", "--stop", "2"])
    second = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert second["step"] == 2 and second["phase"] == {"kind": "vision", "from": 1}
    changed = {name: not torch.equal(value, first["model"][name]) for name, value in second["model"].items()}
    assert not any(changed[name] for name in changed if train.is_decoder(name))
    assert changed["model.vision_tower.embeddings.patch_embedding.weight"]
    assert changed["model.multi_modal_projector.linear_1.weight"]
    train.main([*common, "--resume", "--decoder"])
    third = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert third["step"] == 4 and third["phase"] == {"kind": "decoder", "from": 2}
    assert [p["from_step"] for p in third["phases"]] == [0, 1, 2]
    assert third["phases"][1]["vision"] == "True" and third["phases"][2]["decoder"] == "True"
    for name, value in third["model"].items():
        assert torch.equal(value, second["model"][name]) != train.is_decoder(name), name
    card = json.loads((tmp_path / "training.json").read_text())
    assert [entry["step"] for entry in card["log"]] == [1, 2, 4] and len(card["phases"]) == 3
    assert card["log"][1]["loss"] is None and card["log"][2]["loss"] > 0  # no answer loss in the vision phase


@pytest.fixture(scope="module")
def shipped():
    return embedded.load_default_model()


def test_shipped_model_reproduces_its_reported_accuracy(shipped):
    """The shipped weights answer the first 120 questions of the held-out test split (20 per type) by greedy
    generation through the processor, as accurately as their ``training.json`` reports (within two answers, for
    floating-point differences between CPUs), and far above chance. The full 600-question numbers are in the
    README's table."""
    model, processor = shipped
    card = json.loads((embedded.default_path() / "training.json").read_text())
    samples = shapes.split("test", 120)
    row = bench.score(samples, bench.answers(model, processor, samples, batch=60))
    assert row["accuracy"] == pytest.approx(card["test_sample"]["accuracy"], abs=2 / 120), (row, card["test_sample"])
    assert row["accuracy"] >= 0.75 and all(row[f"accuracy_{kind}"] >= 0.5 for kind in shapes.QUESTION_TYPES), row


def test_cli_run_answers_the_readme_example(shipped, tmp_path, capsys):
    example = json.loads((embedded.default_path().parent / "examples" / "examples.json").read_text())[0]
    image = embedded.default_path().parent / "examples" / example["image"]
    code = cli.main(
        [
            "run",
            "--image",
            str(image),
            "--question",
            example["question"],
            "--methods",
            "fastv,divprune",
            "--keep",
            "36",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    unpruned = next(line for line in lines if line.startswith("unpruned"))
    assert unpruned.split()[1] == example["answer"] and "144/144" in unpruned
    for method in ("fastv", "divprune"):
        row = next(line for line in lines if line.startswith(method))
        assert "36/144" in row and (tmp_path / f"{method}.png").is_file()


def test_cli_run_reports_no_speed_up_when_nothing_is_pruned(shipped, tmp_path, capsys):
    """``--keep`` above the image's 144 tokens: said in the output, and no method shows a speed-up or a FLOP saving,
    whatever the timings measured."""
    example = json.loads((embedded.default_path().parent / "examples" / "examples.json").read_text())[0]
    image = embedded.default_path().parent / "examples" / example["image"]
    argv = ["run", "--image", str(image), "--question", example["question"], "--methods", "fastv,divprune,visionzip"]
    assert cli.main([*argv, "--keep", "10000", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--keep 10000 is not below the 144 visual tokens of this input: every method keeps them all" in lines
    for method in ("fastv", "divprune", "visionzip"):
        row = next(line for line in lines if line.startswith(method))
        assert "144/144" in row and "none (all kept)" in row and row.split()[-3:-1] == ["1.00x", "1.00x"], row


def test_speed_ups_are_medians_of_paired_ratios_marked_within_noise():
    from vlprune.app.models import Outcome, speedup

    plan = vlprune.KeepPlan(
        0, "x", [torch.tensor([0])], [torch.tensor([0])], [torch.tensor([0])], [2], [torch.tensor([0, -1])],
        [torch.tensor([1.0, 0.0])],
    )  # fmt: skip
    base = Outcome("unpruned", "a", 2, 2, [1.0, 1.1, 1.2, 1.3, 1.4], 10.0, None, None)
    paired = [1.0, 1.2, 1.1, 1.4, 1.3]  # the unpruned runs measured alternately with the pruned ones
    fast = Outcome("m", "a", 1, 2, [0.5, 0.6, 0.55, 0.7, 0.65], 5.0, (4.0, 1.0), plan, [plan], paired)
    close = Outcome("m", "a", 1, 2, [0.9, 1.3, 1.0, 1.5, 1.1], 5.0, (4.0, 1.0), plan, [plan], paired)
    assert speedup(base, base) == "1.00x"
    assert speedup(base, fast) == "2.00x"  # every pair 2x
    assert speedup(base, close) == "1.10x (noise)"  # ratios 1.11, 0.92, 1.10, 0.93, 1.18: quartiles 0.93..1.11


def test_flops_at_llava_1_5_7b_scale_by_hand():
    """FastV's plan (layer 2, 64 of 576 kept) and a pre-LLM one on LLaVA-1.5-7B's shapes, with 40 text tokens."""
    from vlprune.app.flops import scaled_flops

    def decoder(n):  # q, k, v, o (4096 x 4096 each), gate, up, down (4096 x 11008); scores and values over n keys
        return 2 * n * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 2 * n * n * 4096

    tower = 24 * (2 * 577 * (4 * 1024**2 + 2 * 1024 * 4096) + 2 * 2 * 577**2 * 1024)
    fixed = tower + 2 * 576 * (1024 * 4096 + 4096**2) + 2 * 4096 * 32000
    for layer, expected in ((2, fixed + 2 * decoder(616) + 30 * decoder(104)), (0, fixed + 32 * decoder(104))):
        into = torch.cat([torch.arange(16), torch.full((128,), -1)])
        plan = vlprune.KeepPlan(
            layer, "x", [torch.arange(16)], [torch.arange(20)], [torch.zeros(16)], [144], [into], [into.ge(0).float()]
        )
        full, pruned = scaled_flops([plan], text=40, images=1)  # 16 of 144 is 64 of 576
        assert full == fixed + 32 * decoder(616) and pruned == expected


def test_cli_errors_and_listings(capsys, tmp_path):
    assert cli.main(["run", "--image", "x.png", "--question", "q", "--methods", "fastest"]) == 2
    assert "unknown method(s) ['fastest']" in capsys.readouterr().err
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    bad = {"empty.png": "not a readable image", "text.png": "not a readable image", ".": "is not a file",
           "none.png": "does not exist"}  # fmt: skip
    for name, message in bad.items():
        assert cli.main(["run", "--image", str(tmp_path / name), "--question", "q", "--methods", "uniform"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line, no traceback
    image = str(tmp_path / "x.png")
    Image.new("RGB", (56, 56)).save(image)
    for model in (str(tmp_path / "no-model"),):  # a hub id would need the network (offline: the same error)
        assert cli.main(["run", "--image", image, "--question", "q", "--model", model]) == 2
        err = capsys.readouterr().err
        assert f"cannot load model {model!r}" in err and err.count("\n") == 1, err
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in vlprune.list_methods())
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in vlprune.list_models())
    assert cli.main(["run", "--image", str(tmp_path / "none.png"), "--question", "q"]) == 2
    capsys.readouterr()
    for flag, value, message in (
        ("--device", "tpu", "--device 'tpu'"),
        ("--dtype", "float8", "--dtype 'float8' is not"),
    ):
        assert cli.main(["run", "--image", image, "--question", "q", flag, value]) == 2  # before any model loads
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_overlay_dims_dropped_tokens_and_tints_merge_groups():
    image = shapes.render(shapes.sample(3).scene)
    n = 144
    into = torch.full((n,), -1)
    into[[0, 5]] = torch.tensor([0, 5])
    into[1] = 0  # merged into token 0
    plan = vlprune.KeepPlan(
        0, "x", [torch.tensor([0, 5])], [torch.tensor([0])], [torch.tensor([0, 0])], [n], [into], [torch.ones(n)]
    )
    picture = np.asarray(overlays.overlay(image, plan)).astype(int)
    original = np.asarray(image.resize((384, 384))).astype(int)
    cell = 384 // 12
    dropped = picture[5 * cell + 10, 5 * cell + 10] - original[5 * cell + 10, 5 * cell + 10]
    assert (dropped < 0).all()  # dimmed
    merged = picture[10, cell + 10] - original[10, cell + 10]
    assert merged.any() and not (picture[10, 2 * cell + 10] == original[10, 2 * cell + 10]).all()
    assert overlays.overlay(image, vlprune.KeepPlan(0, "x", [torch.tensor([0])], [], [], [10], [into[:10]], [])) is None


def test_visionzip_overlay_outlines_its_dominant_patches_and_tints_each_contextual_region(shipped):
    """VisionZip feeds [CLS], its dominant tokens and its contextual tokens in the first placeholders: the overlay
    draws the patches they came from, not those placeholders (64 kept: [CLS], 53 dominant, 10 contextual, each
    contextual one the region of the patches merged into it)."""
    model, processor = shipped
    example = json.loads((embedded.default_path().parent / "examples" / "examples.json").read_text())[0]
    image = Image.open(embedded.default_path().parent / "examples" / example["image"])
    inputs = processor(images=image, text=embedded.prompt(example["question"]), return_tensors="pt")
    with vlprune.wrap(model, "visionzip", keep=64) as pruned, torch.no_grad():
        model(**inputs)
    plan = pruned.plans[0]
    kinds = overlays.patch_kinds(plan)
    into = plan.merged_into[0]
    alone = [p for p in range(144) if torch.sum(into == into[p]) == 1]  # the 53 dominant, and any lone contextual
    assert [p for p in range(144) if kinds[p] == "kept"] == alone and len(alone) >= 53
    merged = {int(into[p]) for p in range(144) if kinds[p] == "merged"}
    assert kinds.count("dropped") == 0 and len(merged) + len(alone) == 63  # every slot but [CLS]'s, one region each
    assert sorted(plan.keep_visual[0].tolist()) == list(range(64))  # the placeholders they fill


def test_bench_writes_csv_and_table(shipped, tmp_path):
    rows = bench.shapes_table(tmp_path, ["fastv", "divprune"], (0.25,), samples=12)
    assert [r["method"] for r in rows] == ["unpruned", "fastv", "divprune"]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    table = (tmp_path / "table.md").read_text()
    assert "| `fastv` |" in table and "25% (36 tok)" in table


def test_run_checks_its_arguments_before_loading_a_model(capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load", no_model)
    image = "x.png"  # the arguments fail before the image is read
    bad = {
        ("--keep", "0"): "keep must be >= 1",
        ("--ratio", "1.5"): "ratio must be",
        ("--question", "  "): "--question is empty",
        ("--max-new-tokens", "0"): "--max-new-tokens must be >= 1",
    }
    for extra, message in bad.items():
        argv = ["run", "--image", image, "--question", "q", *extra]
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as version:
        cli.main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.strip() == f"vlprune {vlprune.__version__}"
