"""The import direction between vlprune's layers, read from the source: the pruning core never imports the
application built on it (``vlprune.app``: the shapes task and its embedded model, loading and comparing models,
overlays, the bench, the demo), the application never imports what sits on top of it (the command line, the
lmms-eval model), and no method's module imports another method's."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # source folder -> the package it installs as (pyproject's package-dir)
    "vlprune": "vlprune",
    "vlprune/selectors": "vlprune.selectors",
    "vlprune/app": "vlprune.app",
    "kernels": "vlprune.kernels",
    "model_adapters": "vlprune.model_adapters",
    "eval": "vlprune.eval",
    "configs": "vlprune.configs",
}
APPLICATION = ("vlprune.app", "vlprune.cli", "vlprune.eval")  # core <- app <- cli, eval
SHARED_BY_METHODS = ("vlprune.selectors.base", "vlprune.selectors.shared")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every vlprune module ``name`` imports, at module level or inside a function (``from . import x`` counts as
    importing ``x``)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in out if m == "vlprune" or m.startswith("vlprune.")}


def inside(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_source_folders_are_found():
    found = modules()
    assert {"vlprune.api", "vlprune.cli", "vlprune.app.demo", "vlprune.selectors.fastv", "vlprune.kernels.ops"} <= set(
        found
    )
    bench = imports("vlprune.app.bench", found["vlprune.app.bench"])
    assert bench >= {"vlprune.app.embedded", "vlprune.app.shapes", "vlprune.api", "vlprune.app.models"}
    assert "vlprune.app.bench" in imports("vlprune.cli", found["vlprune.cli"])  # a function-level import is seen too


def test_the_core_never_imports_the_application():
    found = modules()
    core = {name: path for name, path in found.items() if not inside(name, APPLICATION)}
    assert "vlprune.schedule" in core and "vlprune.selectors.holitom" in core and "vlprune.cli" not in core
    wrong = {name: sorted(m for m in imports(name, path) if inside(m, APPLICATION)) for name, path in core.items()}
    assert {name: bad for name, bad in wrong.items() if bad} == {}


def test_the_application_never_imports_the_command_line_or_the_lmms_eval_model():
    found = modules()
    app = {name: path for name, path in found.items() if inside(name, ("vlprune.app",))}
    assert {"vlprune.app.models", "vlprune.app.demo", "vlprune.app.embedded"} <= set(app)
    top = ("vlprune.cli", "vlprune.eval")
    wrong = {name: sorted(m for m in imports(name, path) if inside(m, top)) for name, path in app.items()}
    assert {name: bad for name, bad in wrong.items() if bad} == {}


def test_no_method_imports_another_methods_module():
    found = modules()
    methods = {n: p for n, p in found.items() if n.startswith("vlprune.selectors.") and n not in SHARED_BY_METHODS}
    wrong = {}
    for name, path in methods.items():
        others = {m for m in imports(name, path) if m.startswith("vlprune.selectors.") and m != name}
        others = {m for m in others if not inside(m, SHARED_BY_METHODS)}
        if others:
            wrong[name] = sorted(others)
    assert wrong == {}


def test_one_description_per_signal():
    """Every signal is described once (vlprune.signals.DESCRIPTIONS), documented in the module's table, and every
    adapter declares only described signals, by name."""
    import vlprune
    from vlprune import signals
    from vlprune.registry import adapter_class

    names = [s.name for s in signals.DESCRIPTIONS]
    assert len(set(names)) == len(names) and signals.SIGNALS == tuple(names)
    for name in names:
        assert f"``{name}``" in signals.__doc__
    assert set(signals.TOKENWISE) <= set(signals.PER_TOKEN) | set(signals.LAYERED)
    assert set(signals.SCORED) <= set(signals.LAYERED) and set(signals.VISION).isdisjoint(signals.SCORED)
    assert set(signals.ATTENTION.values()) == {"text_config", "vision_config"}
    assert all(signals.ATTENTION[name] == "text_config" for name in signals.SCORED)  # scored in the decoder
    for model in vlprune.list_models():
        assert set(adapter_class(model).signals) <= set(names), model
