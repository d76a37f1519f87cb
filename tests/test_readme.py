"""The README as a newcomer reads it: its quick-start snippet runs as written (from the repository root, offline, on
the shipped model) and prints what its comments say; every page it links to exists; it stays short."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_start() -> str:
    """The first Python block of the README's "Quick start" section, verbatim."""
    section = README.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_quick_start_runs_as_written():
    code = quick_start()
    assert "load_default_model()" in code and "vlprune.wrap(" in code
    printed = io.StringIO()
    here = Path.cwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md quick start", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(here)
    # each print's expected output is the comment at the end of its line
    expected = [line.rsplit("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]
    assert printed.getvalue().split("\n")[:-1] == expected == ["green", "[36]"]


def test_the_readme_links_pages_that_exist_and_stays_short():
    links = re.findall(r"\]\(((?!https?://)[^)#]+)\)", README)
    assert "docs/methods.md" in links and all((ROOT / link).is_file() for link in links), links
    assert len(README.splitlines()) < 250
