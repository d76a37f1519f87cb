"""``vlprune bench --tasks ...``: a grid of methods x budgets x lmms-eval tasks on one model, in one process.

Per cell (a method at a budget, or the unpruned model) it records:

* the tasks' own metrics (lmms-eval's ``simple_evaluate`` on the :class:`~vlprune.eval.lmms_model.VLPrune` model);
* loyalty to the unpruned run: ``agreement`` (same answer, or same chosen option, per document) and, for
  generation tasks, ``first_token_kl`` (KL(unpruned || pruned) of the first generated token, mean over documents);
* efficiency on the first ``timing_docs`` documents of the first generation task (:func:`vlprune.eval.measure
  .measure`: warm-up discarded, medians of ``repeats`` runs): prefill time (time to first token), decode tokens/s,
  peak memory, KV-cache bytes after prefill, analytic prefill FLOPs and the selectors' own time, with speed-ups and
  ratios against the unpruned row.

Output in ``out``: ``results.csv`` (one row per cell and task; an interrupted grid resumes from it), ``table.md``
and, with matplotlib, ``accuracy_vs_budget.png``, ``speedup_vs_budget.png`` and ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

EFFICIENCY = ("prefill_s", "decode_tok_s", "selector_s", "kv_bytes", "flops", "vision_flops", "llm_flops", "peak_bytes")


@dataclass
class Cell:
    """One column of the grid: ``method`` (``"unpruned"`` for the baseline) at ``budget`` (an int: tokens kept per
    image; a float in (0, 1): kept fraction)."""

    method: str
    budget: int | float | None

    @property
    def key(self) -> str:
        return "unpruned" if self.budget is None else f"{self.method}@{self.budget}"

    def wrap_kwargs(self) -> dict:
        if self.budget is None:
            return {}
        return {"ratio": self.budget} if isinstance(self.budget, float) else {"keep": self.budget}


def parse_budgets(text: str) -> list[int | float]:
    """``"64,128"`` -> tokens per image; ``"0.5,0.25"`` -> kept fractions."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"budget {part!r} is not a number; give tokens (64) or fractions (0.25)") from None
        if value >= 1 and value == int(value):
            out.append(int(value))
        elif 0 < value < 1:
            out.append(value)
        else:
            raise ValueError(f"budget {part!r} must be a whole number of tokens >= 1 or a fraction in (0, 1)")
    return out


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _answers(samples: list[dict], multiple_choice: bool) -> dict[int, str]:
    """Per document, the answer (generation) or the index of the chosen option (multiple choice)."""
    out = {}
    for s in samples:
        if multiple_choice:
            losses = [float(r[0]) for r in s["filtered_resps"]]  # lmms-eval picks the lowest loss
            out[s["doc_id"]] = str(min(range(len(losses)), key=losses.__getitem__))
        else:
            answer = s["filtered_resps"]  # the filtered answer (a one-element list in some lmms-eval versions)
            out[s["doc_id"]] = str(answer if isinstance(answer, str) else answer[0]).strip()
    return out


def run_grid(
    lm,
    methods: list[str],
    budgets: list[int | float],
    tasks: list[str],
    task_manager,
    out: str | Path,
    limit: int | None = None,
    timing_docs: int = 2,
    repeats: int = 3,
    fit: bool = True,
) -> list[dict]:
    """Run the grid on ``lm`` (a :class:`~vlprune.eval.lmms_model.VLPrune` built without a method) and write its
    files; returns the rows. Cells already in ``out/results.csv`` are not run again."""
    from lmms_eval.evaluator import simple_evaluate
    from tqdm.auto import tqdm

    from ..api import wrap
    from ..app.models import fitted
    from ..registry import list_methods
    from .lmms_model import Recorder
    from .measure import measure

    if lm.pruned is not None:
        raise ValueError("run_grid needs the model unwrapped (build VLPrune without method=)")
    lm.keep_loaded = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    rows = _read(path)
    done = {(r["cell"], r["task"]) for r in rows}
    cells = [Cell("unpruned", None)] + [Cell(m, b) for m in methods for b in budgets]
    baseline: dict[str, dict] = {}  # task -> {"answers", "first", "efficiency"}
    bar = tqdm(total=len(cells) * len(tasks), desc="bench grid", unit="cell")
    for cell in cells:
        if all((cell.key, t) in done for t in tasks) and cell.budget is not None:
            bar.update(len(tasks))
            continue
        extra = fitted(cell.method, lm.model) if fit and cell.method in list_methods() else {}
        handle = wrap(lm.model, cell.method, **cell.wrap_kwargs(), **extra) if cell.budget is not None else None
        lm.pruned = handle
        try:
            lm.recorder = Recorder()
            result = simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, bootstrap_iters=0, log_samples=True
            )
            efficiency = _efficiency(lm, result, tasks, timing_docs, repeats, handle, measure)
        finally:
            lm.pruned = None
            if handle is not None:
                handle.unwrap()
        for task in tasks:
            samples = result["samples"][task]
            choice = result["configs"][task].get("output_type") == "multiple_choice"
            answers = _answers(samples, choice)
            first = {d: lp for (t, d), lp in lm.recorder.first.items() if t == task}
            if cell.budget is None:
                baseline[task] = {"answers": answers, "first": first, "efficiency": efficiency}
            row = {"cell": cell.key, "method": cell.method, "budget": "" if cell.budget is None else cell.budget}
            row["task"] = task
            row.update({k.split(",")[0]: v for k, v in result["results"][task].items() if _is_number(v)})
            base = baseline.get(task)
            if base is not None:
                same = [answers[d] == a for d, a in base["answers"].items() if d in answers]
                row["agreement"] = sum(same) / len(same) if same else math.nan
                kls = [_kl(base["first"][d], first[d]) for d in base["first"] if d in first]
                row["first_token_kl"] = statistics.mean(kls) if kls else ""
            row.update(efficiency)
            at = [i for i, r in enumerate(rows) if (r["cell"], r["task"]) == (cell.key, task)]
            if at:
                rows[at[0]] = row
            else:
                rows.append(row)
            bar.update(1)
        _write(path, _with_ratios(rows))
    bar.close()
    (out / "table.md").write_text(markdown(rows) + "\n")
    plots(rows, out)
    return rows


def lmms_grid(
    tasks: list[str],
    budgets: str,
    out: str | Path,
    methods: list[str] | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    include: str | None = None,
    limit: int | None = None,
    timing_docs: int = 2,
    repeats: int = 3,
) -> list[dict]:
    """``vlprune bench --tasks ...``: the lmms-eval ``tasks`` for ``methods`` (default: every image method) at each
    of ``budgets`` (:func:`parse_budgets`) on ``model`` (default: the embedded one), with the offline tasks and
    ``include`` (a folder of task YAMLs) registered; see :func:`run_grid` for the rest. Writes ``table.md`` (with
    the CSV and plots) under ``out`` and returns the rows."""
    from lmms_eval.tasks import TaskManager

    from ..registry import list_methods
    from .lmms_model import VLPrune
    from .tasks import TASKS, include_path

    methods = list(methods) if methods else list_methods("image")
    paths = [str(include_path())] + ([include] if include else [])
    manager = TaskManager(include_path=paths, include_defaults=any(t not in TASKS for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval tasks {unknown}; see `lmms-eval tasks` or pass --include-path")
    lm = VLPrune(pretrained=model, device=device, dtype=dtype)
    grid = parse_budgets(budgets)
    return run_grid(lm, methods, grid, tasks, manager, out, limit, timing_docs, repeats, fit=lm.is_embedded)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Speed-ups and ratios of every row against the unpruned row of its task (recomputed whenever the grid is
    written, so that resumed rows compare with the baseline measured in the same run as the rest)."""
    base = {r["task"]: r for r in rows if r["cell"] == "unpruned"}
    ratios = [
        ("prefill_speedup", "prefill_s", True),
        ("decode_speedup", "decode_tok_s", False),
        ("flops_ratio", "flops", False),
        ("kv_ratio", "kv_bytes", False),
    ]
    for r in rows:
        b = base.get(r["task"])
        for name, key, inverse in ratios:
            try:
                mine, theirs = float(r[key]), float(b[key])
                r[name] = theirs / mine if inverse else mine / theirs
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                r[name] = ""
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum())


def _efficiency(lm, result, tasks, timing_docs, repeats, handle, measure) -> dict:
    """Medians over the first ``timing_docs`` documents of the first generation task (empty without one)."""
    task = next((t for t in tasks if result["configs"][t].get("output_type") == "generate_until"), None)
    if task is None or timing_docs < 1 or not lm.recorder.prompts.get(task):
        return {}
    per_doc = []
    for context, visuals in lm.recorder.prompts.get(task, [])[:timing_docs]:
        per_doc.append(measure(lm.model, lm.inputs([context], [visuals]), handle=handle, repeats=repeats))
    return {k: statistics.median(d[k] for d in per_doc) for k in EFFICIENCY}


def markdown(rows: list[dict]) -> str:
    """One line per cell and task: the task's main metric, loyalty, and the efficiency figures and ratios."""
    columns = [
        ("acc", "acc", 1, "{:.3f}"),
        ("agreement", "agreement", 1, "{:.3f}"),
        ("first-token KL", "first_token_kl", 1, "{:.4f}"),
        ("prefill ms", "prefill_s", 1e-3, "{:.1f}"),
        ("speed-up", "prefill_speedup", 1, "{:.2f}"),
        ("decode tok/s", "decode_tok_s", 1, "{:.1f}"),
        ("KV MiB", "kv_bytes", 2**20, "{:.3f}"),
        ("GFLOPs", "flops", 1e9, "{:.3f}"),
        ("FLOP ratio", "flops_ratio", 1, "{:.3f}"),
        ("selector ms", "selector_s", 1e-3, "{:.2f}"),
    ]
    lines = ["| cell | task | " + " | ".join(c[0] for c in columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for r in rows:
        cells = [_scaled(r, key, unit, fmt) for _, key, unit, fmt in columns]
        lines.append(f"| {r['cell']} | {r['task']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scaled(row: dict, key: str, unit: float, fmt: str = "{:.3f}") -> str:
    try:
        return fmt.format(float(row[key]) / unit)
    except (KeyError, TypeError, ValueError):
        return ""


def plots(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy vs budget, prefill speed-up vs budget and accuracy vs FLOPs, one line per method and task; nothing
    (and an empty list) without matplotlib."""
    from ..app.bench import pyplot, styles

    plt = pyplot()
    if plt is None:
        return []
    written = []
    specs = [
        ("accuracy_vs_budget.png", "budget", "acc", "visual-token budget", "accuracy"),
        ("speedup_vs_budget.png", "budget", "prefill_speedup", "visual-token budget", "prefill speed-up"),
        ("accuracy_vs_flops.png", "flops", "acc", "prefill FLOPs", "accuracy"),
    ]
    style = styles(r["method"] for r in rows if r["method"] != "unpruned")
    for name, x_key, y_key, x_label, y_label in specs:
        figure, axes = plt.subplots(figsize=(7.5, 5))
        for task in dict.fromkeys(r["task"] for r in rows):
            for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
                points = []
                for r in rows:
                    if r["task"] == task and r["method"] == method:
                        try:
                            points.append((float(r[x_key]), float(r[y_key])))
                        except (KeyError, TypeError, ValueError):
                            continue
                if points:
                    points.sort()
                    look = (
                        {"color": "black", "marker": "*", "linestyle": "none"}
                        if method == "unpruned"
                        else style[method]
                    )
                    axes.plot(*zip(*points, strict=True), label=f"{method} · {task}", **look)
        axes.set_title(f"{y_label} by {x_label}")
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, ncol=2)
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        written.append(out / name)
    return written
