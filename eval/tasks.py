"""lmms-eval tasks on the synthetic shapes task (:mod:`vlprune.app.shapes`), generated on first use, no network.

    lmms-eval --model vlprune --tasks vlprune_shapes,vlprune_shapes_mc --include_path "$(vlprune tasks)" ...

:func:`include_path` writes, once per size, a folder with the scenes of the held-out test split as PNGs, a JSONL of
their questions and two task YAMLs pointing at it by absolute path:

* ``vlprune_shapes``: ``generate_until``, exact match of the one-word answer; ``acc`` and ``acc_<type>`` per question
  type.
* ``vlprune_shapes_mc``: ``multiple_choice`` over every answer of the question's kind (colours, shapes, numbers,
  quadrants or letters), scored by loglikelihood.

The task functions below are what the YAMLs name (``!function vlprune.eval.tasks.doc_to_visual``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..app import shapes

VERSION = 1
TASKS = ("vlprune_shapes", "vlprune_shapes_mc")

_GENERATE = """task: vlprune_shapes
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_visual: !function vlprune.eval.tasks.doc_to_visual
doc_to_text: !function vlprune.eval.tasks.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false}}
process_results: !function vlprune.eval.tasks.process_results
metric_list:
{metrics}
metadata: {{version: {version}}}
"""

_CHOICE = """task: vlprune_shapes_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function vlprune.eval.tasks.doc_to_visual
doc_to_text: !function vlprune.eval.tasks.doc_to_text
doc_to_choice: choices
doc_to_target: target
target_delimiter: " "
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: {version}}}
"""


def default_root() -> Path:
    """``$VLPRUNE_CACHE/lmms_tasks``, else ``~/.cache/vlprune/lmms_tasks``."""
    base = os.environ.get("VLPRUNE_CACHE") or Path.home() / ".cache" / "vlprune"
    return Path(base) / "lmms_tasks"


def choices_of(sample: shapes.Sample) -> list[str]:
    """Every answer a question of this kind can have (the multiple-choice options), in a fixed order."""
    if sample.kind == "color":
        return list(shapes.COLORS)
    if sample.kind == "count":
        return list(shapes.NUMBERS)
    if sample.kind == "letter":
        return [c.lower() for c in shapes.LETTERS]
    if sample.answer in shapes.QUADRANTS:
        return list(shapes.QUADRANTS)
    return list(shapes.SHAPES)


def include_path(n: int = 600, root: str | Path | None = None) -> Path:
    """The folder to pass to lmms-eval's ``--include_path`` (or a ``TaskManager``), holding the shapes tasks on the
    first ``n`` questions of the test split; written on first use and reused after."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= shapes.SPLIT_SIZE:
        raise ValueError(f"n must be an int in [1, {shapes.SPLIT_SIZE}], got {n!r}")
    folder = (Path(root) if root is not None else default_root()) / f"shapes-v{VERSION}-n{n}"
    data = folder / "test.jsonl"
    if (folder / "vlprune_shapes_mc.yaml").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(shapes.split("test", n)):
        image = folder / "images" / f"{i:06d}.png"
        shapes.render(s.scene).save(image)
        options = choices_of(s)
        rows.append(
            {
                "id": i,
                "seed": s.seed,
                "image": str(image),
                "question": s.question,
                "answer": s.answer,
                "kind": s.kind,
                "choices": options,
                "target": options.index(s.answer),
            }
        )
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [f"  - {{metric: acc{suffix}, aggregation: mean, higher_is_better: true}}" for suffix in _suffixes()]
    generate = _GENERATE.format(data=json.dumps(str(data)), metrics="\n".join(metrics), version=VERSION)
    (folder / "vlprune_shapes.yaml").write_text(generate)
    (folder / "vlprune_shapes_mc.yaml").write_text(_CHOICE.format(data=json.dumps(str(data)), version=VERSION))
    return folder


def _suffixes() -> list[str]:
    return [""] + [f"_{kind}" for kind in shapes.QUESTION_TYPES]


# --- the functions the YAMLs name --------------------------------------------------------------------------------
def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + doc["question"] + kwargs.get("post_prompt", "")


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``acc`` and ``acc_<kind>`` (the other kinds' metrics get no entry from this document)."""
    answer = results[0].strip().lower().rstrip(".").split()
    right = float(bool(answer) and answer[0] == doc["answer"])
    return {"acc": right, f"acc_{doc['kind']}": right}
