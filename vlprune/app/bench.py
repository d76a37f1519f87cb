"""``vlprune bench --suite shapes``: every method at several budgets on the shapes test split, against the unpruned
model. Writes ``results.csv``, ``table.md`` and, when matplotlib is installed, ``accuracy.png`` (accuracy against
the kept fraction, one line per method).

Columns: accuracy (exact answer), accuracy retained (relative to the unpruned model's) and agreement (same answer as
the unpruned model), overall and per question type in the CSV.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from ..api import wrap
from ..registry import list_methods
from . import embedded, shapes

logger = logging.getLogger(__name__)


def answers(model, processor, samples, batch: int = 100, max_new_tokens: int = 3, progress=None) -> list[str]:
    """Greedy answers of ``model`` to ``samples`` (batched, left padding)."""
    out = []
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        images = [shapes.render(s.scene) for s in part]
        text = [embedded.prompt(s.question) for s in part]
        inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += [
            a.strip() for a in processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
        if progress is not None:
            progress.update(len(part))
    return out


def score(samples, got: list[str], reference: list[str] | None = None) -> dict[str, float]:
    """Accuracy overall and per question type; with ``reference``, agreement with it."""
    row = {"accuracy": sum(a == s.answer for a, s in zip(got, samples, strict=True)) / len(samples)}
    for kind in shapes.QUESTION_TYPES:
        pairs = [(a, s) for a, s in zip(got, samples, strict=True) if s.kind == kind]
        if pairs:
            row[f"accuracy_{kind}"] = sum(a == s.answer for a, s in pairs) / len(pairs)
    if reference is not None:
        row["agreement"] = sum(a == b for a, b in zip(got, reference, strict=True)) / len(samples)
    return row


def shapes_table(
    out: str | Path,
    methods: list[str] | None = None,
    fractions: tuple[float, ...] = (0.5, 0.25, 0.11),
    samples: int = 600,
    model: str | None = None,
) -> list[dict]:
    """The shapes quality table (``vlprune bench``): ``samples`` test questions answered unpruned and by each of
    ``methods`` (default: every image method) at each kept fraction, on the embedded model (or ``model``, trained on
    its prompt format). Writes ``results.csv``, ``table.md`` and the plots under ``out``; returns the rows."""
    from tqdm.auto import tqdm

    from .models import fitted, load

    loaded = load(model, device="cpu")  # the shapes suite: a CPU benchmark
    model, processor = loaded.model, loaded.processor
    if not loaded.is_embedded:
        raise ValueError("the shapes suite needs the embedded model (or a model trained on its prompt format)")
    methods = list(methods) if methods else list_methods("image")
    samples = shapes.split("test", samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(samples) * (1 + len(methods) * len(fractions)), desc="bench", unit="q")
    unpruned = answers(model, processor, samples, progress=progress)
    base = score(samples, unpruned)
    rows = [{"method": "unpruned", "fraction": 1.0, **base, "retained": 1.0, "agreement": 1.0}]
    for method in methods:
        for fraction in fractions:
            with wrap(model, method, ratio=fraction, **fitted(method, model)):
                got = answers(model, processor, samples, progress=progress)
            row = score(samples, got, unpruned)
            row["retained"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else 0.0
            rows.append({"method": method, "fraction": fraction, **row})
    progress.close()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "table.md").write_text(markdown(rows, fractions, len(samples)) + "\n")
    plot(rows, fractions, out / "accuracy.png")
    return rows


def markdown(rows: list[dict], fractions: list[float], n: int) -> str:
    """Methods as rows; per kept fraction: accuracy, retained, agreement."""
    tokens = (shapes.SIZE // shapes.PATCH) ** 2
    base = rows[0]
    head = "| method | " + " | ".join(
        f"{f:.0%} ({max(1, int(f * tokens + 0.5))} tok): acc / retained / agree" for f in fractions
    )
    lines = [
        f"Shapes test split, {n} questions; unpruned accuracy **{base['accuracy']:.1%}** ({tokens} visual tokens).",
        "",
        head + " |",
        "|---|" + "---|" * len(fractions),
    ]
    by = {(r["method"], r["fraction"]): r for r in rows}
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        cells = []
        for f in fractions:
            r = by[(method, f)]
            cells.append(f"{r['accuracy']:.1%} / {r['retained']:.1%} / {r['agreement']:.1%}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'vlprune[demo]')")
        return None
    return plt


MARKERS = "osD^vP*Xph<>8H"
LINES = ("-", "--", "-.", ":")


def styles(methods) -> dict[str, dict]:
    """One colour, marker and line style per method (up to 20 colours before one repeats, never with the same
    marker), so that no two methods' lines look alike and overlapping ones stay visible."""
    plt = pyplot()
    colours = plt.get_cmap("tab20").colors if plt is not None else [None] * 20
    return {
        method: {
            "color": colours[(2 * i) % 20 + (2 * i) // 20 % 2],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINES[i % len(LINES)],
            "alpha": 0.85,
            "markersize": 5,
        }
        for i, method in enumerate(dict.fromkeys(methods))
    }


def plot(rows: list[dict], fractions: list[float], path: Path) -> bool:
    """Accuracy against kept fraction per method; ``False`` (and nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(7.5, 5))
    base = rows[0]["accuracy"]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    for method, style in styles(methods).items():
        points = sorted((r["fraction"], r["accuracy"]) for r in rows if r["method"] == method)
        axes.plot([p[0] for p in points], [p[1] for p in points], label=method, **style)
    axes.axhline(base, color="black", linestyle="--", linewidth=1, label="unpruned")
    axes.set_title(f"Shapes test split: accuracy by visual tokens kept ({len(methods)} methods)")
    axes.set_xlabel("visual tokens kept (fraction of 144)")
    axes.set_ylabel("accuracy")
    axes.set_xscale("log")
    axes.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    axes.minorticks_off()
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=3, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
