"""``vlprune run --video`` and the demo's video path, on a tiny random LLaVA-OneVision checkpoint saved with a real
``LlavaOnevisionProcessor`` (word-level tokenizer; frames resized to 56 px: 4 x 4 patches pooled to 2 x 2 = 4 tokens
per frame, then one newline per video)."""

import re

import numpy as np
import pytest
import torch
from test_video import moving_square, write_video

import vlprune
from vlprune import cli
from vlprune.app import models, overlays

from families import VIDEO
from tiny import save_tiny_internvl, save_tiny_onevision

FRAMES, PER_FRAME = 8, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", moving_square(20))


def test_the_processor_gives_the_tokens_the_adapter_expects(checkpoint, video):
    from vlprune.video import load_video

    loaded = models.load(checkpoint)
    frames = load_video(video, num_frames=FRAMES).frames
    inputs = loaded.inputs(None, "what moves ?", video=frames)
    assert inputs["pixel_values_videos"].shape == (1, FRAMES, 3, 56, 56)
    assert int((inputs["input_ids"] == VIDEO).sum()) == FRAMES * PER_FRAME + 1
    assert loaded.takes_videos


def test_run_video_answers_keeps_and_draws_each_method(checkpoint, video, tmp_path, capsys):
    from PIL import Image
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    out = tmp_path / "overlays"
    argv = ["run", "--video", video, "--frames", str(FRAMES), "--model", checkpoint, "--question", "what moves ?"]
    argv += ["--methods", "uniform,dycoke,holitom", "--keep", "12", "--out", str(out), "--max-new-tokens", "3"]
    assert cli.main(argv) == 0
    rows = ("unpruned", "uniform", "dycoke", "holitom")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] and line.split()[0] in rows]
    kept = {line.split()[0]: next(w for w in line.split() if re.fullmatch(r"\d+/\d+", w)) for line in printed}
    answers = {line.split()[0]: line[13:34].strip() for line in printed}
    assert list(kept) == ["unpruned", "uniform", "dycoke", "holitom"]
    total = FRAMES * PER_FRAME
    assert kept["unpruned"] == f"{total + 1}/{total + 1}"  # every placeholder, the newline included
    assert kept["uniform"] == kept["dycoke"] == f"12/{total}"
    # HoliTom merges each static position over its window whatever the budget, so it may keep fewer
    assert kept["holitom"].endswith(f"/{total}") and int(kept["holitom"].split("/")[0]) <= 12
    width, height = 2 * 64, 2 * 48  # the 64 x 48 px frames as read, scaled by a whole factor to at most 160 px
    for method in ("uniform", "dycoke", "holitom"):
        assert Image.open(out / f"{method}.png").size == (FRAMES * (width + 4) - 4, height)

    # the unpruned answer is the model's own greedy answer on the processor's inputs
    from vlprune.video import load_video

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=text, videos=[load_video(video, num_frames=FRAMES).frames], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.decode(ids, skip_special_tokens=True).strip()
    assert answers["unpruned"] == expected


def test_video_overlay_marks_each_frame_token():
    from vlprune.plan import KeepPlan

    t, h, w = 2, 2, 2
    frames = np.full((t, 8, 8, 3), 200, np.uint8)
    keep = torch.tensor([0, 5])
    into = torch.tensor([0, 0, -1, -1, -1, 5, -1, 5])  # token 1 merged into 0, 7 into 5, the rest dropped
    plan = KeepPlan(
        layer=0,
        method="test",
        keep_visual=[keep],
        keep_tokens=[keep],
        image_of=[torch.zeros(2, dtype=torch.long)],
        num_visual=[t * h * w],
        merged_into=[into],
        merge_weight=[torch.ones(8)],
        grids=[[(t, h, w)]],
    )
    sheet = np.asarray(overlays.video_overlay(frames, plan))

    def cell(f, r, c):  # the centre pixel of token (r, c) of frame f: 8 px frames drawn at 160 px, 80 px cells
        return sheet[r * 80 + 40, f * (160 + 4) + c * 80 + 40]

    assert (cell(0, 0, 0) == 200).all()  # kept: outlined only, centre untouched
    assert (cell(1, 0, 1) == 200).all()
    assert cell(0, 1, 0).max() < 100  # dropped: dimmed
    assert cell(0, 0, 1).tolist() != [200, 200, 200] and cell(0, 0, 1).max() > 100  # merged into token 0: tinted
    assert cell(0, 0, 1).tolist() != cell(1, 1, 1).tolist()  # ... in another colour than token 5's group
    plan.grids = [[None]]
    assert overlays.video_overlay(frames, plan) is None


def test_video_errors(checkpoint, video, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (56, 56)).save(image)
    assert cli.main(["run", "--video", video, "--question", "what ?", "--methods", "uniform"]) == 2
    assert "takes images only; for a video, pass --model" in capsys.readouterr().err
    assert cli.main(["run", "--video", str(tmp_path / "none.mp4"), "--model", checkpoint, "--question", "q"]) == 2
    assert "no video file" in capsys.readouterr().err
    assert (
        cli.main(["run", "--image", str(image), "--question", "q", "--methods", "dycoke", "--model", checkpoint]) == 2
    )
    assert "prune videos" in capsys.readouterr().err
    assert cli.main(["run", "--image", str(image), "--question", "q", "--frames", "4"]) == 2
    assert "--frames applies to --video" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --image and --video are exclusive
        cli.main(["run", "--image", str(image), "--video", video, "--question", "q"])
    capsys.readouterr()


def test_demo_runs_methods_on_a_video(checkpoint, video):
    pytest.importorskip("gradio")
    from vlprune.app import demo
    from vlprune.video import load_video

    loaded = models.load(checkpoint)
    gallery, rows = demo.results(loaded, None, video, "what moves ?", ["uniform", "dycoke"], 12, FRAMES)
    assert [row[0] for row in rows] == ["unpruned", "uniform", "dycoke"]
    assert [row[2] for row in rows] == [f"{FRAMES * PER_FRAME + 1}/{FRAMES * PER_FRAME + 1}"] + [
        f"12/{FRAMES * PER_FRAME}"
    ] * 2
    assert [caption.split(":")[0] for _, caption in gallery] == ["unpruned", "uniform", "dycoke"]
    frames = load_video(video, num_frames=FRAMES).frames
    assert gallery[0][0].size == (FRAMES * (64 + 4) - 4, 48)  # the frames as read, side by side
    with vlprune.wrap(loaded.model, "uniform", keep=12) as pruned:  # the overlay is the CLI's, of the same plan
        loaded.model.generate(**loaded.inputs(None, "what moves ?", video=frames), max_new_tokens=1)
        expected = overlays.video_overlay(frames, pruned.plans[-1])
    assert np.array_equal(np.asarray(gallery[1][0]), np.asarray(expected))
    with pytest.raises(ValueError, match="give an image or a video"):
        demo.results(loaded, None, None, "what moves ?", ["uniform"], 12)
    app = demo.build(checkpoint)  # a model that takes videos: the video input and the temporal methods are offered
    components = {c.get("props", {}).get("elem_id"): c["props"] for c in app.config["components"]}
    assert components["video"]["visible"] and components["frames"]["visible"]
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in components["methods"]["choices"]]
    assert {"dycoke", "holitom", "uniform"} <= set(choices)


def test_lmms_eval_model_answers_video_docs_as_the_cli_does(checkpoint, video, capsys):
    """A video task's visual is a file path: the lmms-eval model reads ``max_frames_num`` frames and answers as
    ``vlprune run --video`` does with the same method and budget."""
    from lmms_eval.api.instance import Instance

    from vlprune.eval.lmms_model import VLPrune
    from vlprune.video import load_video

    lm = VLPrune(pretrained=checkpoint, method="dycoke", keep=12, max_frames_num=FRAMES, max_new_tokens=3)
    lm.task_dict = {"clips": {"test": [{"video": video}, {"video": video}]}}
    requests = [
        Instance(
            "generate_until",
            ("what moves ?", {"until": []}, lambda doc: [doc["video"]], doc_id, "clips", "test"),
            idx=0,
            metadata={"task": "clips", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id in (0, 1)
    ]
    answers = lm.generate_until(requests)
    plan = lm.pruned.plans[-1]
    assert plan.kept_per_sample == [12] and plan.grids == [[(FRAMES, 2, 2)]]
    loaded = models.load(checkpoint)
    frames = load_video(video, num_frames=FRAMES).frames
    expected = models.compare(loaded, None, "what moves ?", ["dycoke"], {"keep": 12}, max_new_tokens=3, video=frames)
    assert answers == [expected[1].answer] * 2
    lm.clean()
    embedded_lm = VLPrune(method="uniform", keep=8, max_frames_num=4)
    embedded_lm.task_dict = lm.task_dict
    with pytest.raises(ValueError, match="takes images only"):
        embedded_lm.generate_until(requests[:1])
    with pytest.raises(ValueError, match="max_frames_num=0 must be a positive integer"):
        VLPrune(max_frames_num=0)


def test_internvl_videos_through_the_cli_and_the_lmms_eval_model(tmp_path, video, capsys):
    """InternVL's processor writes each frame as an image of its own; the CLI and the lmms-eval model say which
    (``set_videos``), so temporal methods see one video of ``frames x 4 x 4`` tokens, and both answer alike."""
    from lmms_eval.api.instance import Instance

    from vlprune.eval.lmms_model import VLPrune
    from vlprune.video import load_video

    checkpoint = save_tiny_internvl(tmp_path / "tiny-internvl")
    argv = ["run", "--video", video, "--frames", str(FRAMES), "--model", checkpoint, "--question", "what moves ?"]
    assert cli.main([*argv, "--methods", "uniform,dycoke,prunevid", "--keep", "40", "--max-new-tokens", "3"]) == 0
    rows = ("unpruned", "uniform", "dycoke", "prunevid")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] and line.split()[0] in rows]
    kept = {line.split()[0]: next(w for w in line.split() if re.fullmatch(r"\d+/\d+", w)) for line in printed}
    total = FRAMES * 16
    assert kept == {"unpruned": f"{total}/{total}", "uniform": f"40/{total}", "dycoke": f"40/{total}"} | {
        "prunevid": kept["prunevid"]
    }
    assert int(kept["prunevid"].split("/")[0]) <= 40
    lm = VLPrune(pretrained=checkpoint, method="dycoke", keep=40, max_frames_num=FRAMES, max_new_tokens=3)
    lm.task_dict = {"clips": {"test": [{"video": video}]}}
    request = Instance(
        "generate_until",
        ("what moves ?", {"until": []}, lambda doc: [doc["video"]], 0, "clips", "test"),
        idx=0,
        metadata={"task": "clips", "doc_id": 0, "repeats": 1},
    )
    answers = lm.generate_until([request])
    assert lm.pruned.plans[-1].grids == [[(FRAMES, 4, 4)]]
    lm.clean()
    frames = load_video(video, num_frames=FRAMES).frames
    expected = models.compare(models.load(checkpoint), None, "what moves ?", ["dycoke"], {"keep": 40}, 3, video=frames)
    assert answers == [expected[1].answer]
