"""Which method runs on which model family: derived from the selectors' signal requests and the adapters' declared
signals (``Adapter.signals``), never written by hand. ``python -m vlprune.support`` prints the table in
``docs/methods.md``."""

from __future__ import annotations

from .registry import adapter_class, create_selector, list_methods, list_models
from .signals import CORE

DEPTH = 24  # a vision depth every default request fits (LLaVA-1.5's CLIP)


def missing_signals(selector, signals: dict[str, str], layer: int | None = None, feature_layer_only=()) -> list[str]:
    """The signals ``selector`` requests (at ``layer``, by default its default layer) that are not among a family's
    ``signals``, or that it requests at a vision layer other than the feature layer where the family gives them
    there only (``Adapter.feature_layer_only``)."""
    layer = selector.default_layer if layer is None else layer
    requests = selector.requests(layer, DEPTH)
    beyond = {r.name for r in requests if r.name in feature_layer_only and r.layer is not None}
    return sorted(({r.name for r in requests} - set(signals) - set(CORE)) | beyond)


def support(method: str, model_type: str) -> str:
    """``"yes"``, ``"substitute"`` (some signal stands in for the paper's) or ``"no"`` for a method on a family."""
    selector, adapter = create_selector(method), adapter_class(model_type)
    signals = adapter.signals
    if missing_signals(selector, signals, feature_layer_only=adapter.feature_layer_only):
        return "no"
    states = [signals.get(r.name, "yes") for r in selector.requests(selector.default_layer, DEPTH)]
    return "substitute" if any(state != "yes" for state in states) else "yes"


def support_table() -> dict[str, dict[str, str]]:
    """``{method: {model_type: "yes" | "substitute" | "no"}}`` over every registered method and family."""
    return {method: {model: support(method, model) for model in list_models()} for method in list_methods()}


def markdown() -> str:
    """The support table as a markdown table (methods as rows, families as columns)."""
    models = list_models()
    lines = ["| method | " + " | ".join(f"`{m}`" for m in models) + " |", "|---|" + "---|" * len(models)]
    for method, row in support_table().items():
        lines.append(f"| `{method}` | " + " | ".join(row[m] for m in models) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
