"""The import direction between vlprune's layers, read from the source: the pruning core never imports the
application built on it (``vlprune.app``: the shapes task and its embedded model, loading and comparing models,
overlays, the bench, the demo), the application never imports what sits on top of it (the command line, the
lmms-eval model), no method's module imports another method's, and no module imports itself through others (no
cycle). The core's files and functions stay small enough to read at once."""

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


KNOWN = set(modules())


def imports(name: str, path: Path) -> set[str]:
    """Every vlprune module ``name`` imports, at module level, inside a function or for type checking only
    (``from . import x`` counts as importing the module ``x``; ``from .x import name``, the module ``x``)."""
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
            for alias in node.names:  # ``from package import module`` imports the module, else the package
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in KNOWN else base)
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


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []


def test_no_modules_import_each_other():
    """No cycle among vlprune's modules, through any chain of imports (the parent package a submodule's import
    loads is not counted: ``vlprune/__init__`` imports the API it exports)."""
    found = modules()
    graph = {name: {m for m in imports(name, path) if m in found and m != name} for name, path in found.items()}
    assert "vlprune.schedule" in graph["vlprune.api"]
    assert cycles(graph) == []


def core_sources() -> dict[str, Path]:
    return {name: path for name, path in modules().items() if not inside(name, APPLICATION)}


def body_lines(node: ast.AST) -> int:
    """A function's lines, its docstring left out."""
    body = node.body
    first = (
        body[1]
        if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        else body[0]
    )
    return node.end_lineno - first.lineno + 1


def test_the_core_reads_at_once():
    """No core file over ~400 lines, no core function over 60 (docstrings aside)."""
    long_files, long_functions = {}, {}
    for name, path in core_sources().items():
        source = path.read_text()
        if len(source.splitlines()) > 410:
            long_files[name] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > 60:
                long_functions[f"{name}.{node.name}"] = body_lines(node)
    assert long_files == {} and long_functions == {}


def test_every_decoder_side_signal_has_one_producer():
    """A signal captured in the language model is produced by the core (vlprune.llm_signals), scored in a decoder
    layer's attention exactly when its description says so; the adapters offer exactly those."""
    from vlprune import llm_signals, signals

    decoder = {s.name for s in signals.DESCRIPTIONS if s.captured == "llm"}
    assert set(llm_signals.DECODER_SIGNALS) == decoder
    assert set(llm_signals.SCORED_BY) == set(signals.SCORED)
    assert set(llm_signals.AT_STAGE).isdisjoint(llm_signals.SCORED_BY)
    assert set(llm_signals.FILL) <= decoder and set(llm_signals.ALIGN) <= decoder


def test_a_selectors_name_is_its_files_stem():
    import vlprune
    from vlprune.registry import selector_class

    for method in vlprune.list_methods():
        assert selector_class(method).__module__ == f"vlprune.selectors.{method}", method
