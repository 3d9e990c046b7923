"""Every ```python block in README.md and docs/*.md runs as written.

Each block is executed in a fresh module (registered in ``sys.modules`` while it runs, so
dataclasses, pydantic and msgspec can resolve its annotations), with a temporary directory as
the working directory. A block that defines ``async def main()`` without calling
``asyncio.run`` itself has ``main()`` run. Snippets that are not meant to run are fenced as
```py instead, and are not collected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(path.name for path in (Path(__file__).resolve().parents[2] / "docs").glob("*.md"))
EXAMPLE_PAGES = ["concepts.md", "compensation.md", "recovery.md", "storage.md", "fallback.md"]

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_RUNS_ITSELF = re.compile(r"\basyncio\.run\(")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first code line, code) of every fenced block in a markdown file."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start(2)) + 1
        found.append((match.group(1), first_line, match.group(2)))
    return found


def python_blocks() -> list[Block]:
    paths = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    return [
        Block(path, line, code)
        for path in paths
        for language, line, code in fenced_blocks(path)
        if language == "python"
    ]


BLOCKS = python_blocks()


def run_block(block: Block) -> None:
    name = "docs_example_" + re.sub(r"\W", "_", block.id)
    module = types.ModuleType(name)
    module.__file__ = str(block.path)
    # Pad with newlines so tracebacks point at the block's lines in the markdown file.
    source = "\n" * (block.line - 1) + block.code
    sys.modules[name] = module
    try:
        exec(compile(source, str(block.path), "exec"), module.__dict__)
        main = module.__dict__.get("main")
        if inspect.iscoroutinefunction(main) and not _RUNS_ITSELF.search(block.code):
            asyncio.run(main())
    finally:
        del sys.modules[name]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_block(block)


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_page_exists_and_has_runnable_examples(page: str) -> None:
    path = DOCS / page
    assert path.is_file(), f"docs/{page} is missing"
    assert any(b.path == path for b in BLOCKS), f"docs/{page} has no ```python example"


def test_readme_links_to_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES:
        assert f"(docs/{page})" in readme


def test_concepts_has_the_how_it_works_flowchart() -> None:
    blocks = fenced_blocks(DOCS / "concepts.md")
    charts = [code for language, _, code in blocks if language == "mermaid"]
    assert charts, "docs/concepts.md has no ```mermaid block"
    assert charts[0].lstrip().startswith("flowchart")
    assert "compensate" in charts[0]


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a page (fenced blocks excluded)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+ (.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_between_pages_resolve() -> None:
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", text):
            path = DOCS / (target or page)
            assert path.is_file(), f"docs/{page} links to missing {target}"
            if anchor:
                assert anchor in _anchors(path), f"docs/{page} links to missing {target}#{anchor}"


def test_the_block_runner_runs_main_only_when_the_block_does_not() -> None:
    import builtins

    ran: list[str] = []
    builtins._sagakit_docs_probe = ran  # type: ignore[attr-defined]
    code = "import builtins\n\nasync def main():\n    builtins._sagakit_docs_probe.append('main')\n"
    try:
        run_block(Block(ROOT / "README.md", 1, code))
        assert ran == ["main"]
        run_block(Block(ROOT / "README.md", 1, code + "import asyncio\nasyncio.run(main())\n"))
        assert ran == ["main", "main"]  # run once by the block itself, not a second time
    finally:
        del builtins._sagakit_docs_probe  # type: ignore[attr-defined]


FRAGMENTS = [
    (path, line, code)
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for language, line, code in fenced_blocks(path)
    if language == "py"
]


@pytest.mark.parametrize(
    ("path", "line", "code"), FRAGMENTS, ids=[f"{p.name}:{n}" for p, n, _ in FRAGMENTS]
)
def test_fragments_are_valid_python(path: Path, line: int, code: str) -> None:
    """Blocks tagged ``py`` are fragments (they need a server or the reader's own modules), so
    they are not run — but each must at least be valid Python."""
    import ast

    try:
        ast.parse(code)
    except SyntaxError as error:
        pytest.fail(f"{path.name}:{line + (error.lineno or 1) - 1}: {error.msg}")


def test_the_otel_extra_installs_what_the_observability_page_imports() -> None:
    """``pip install 'sagakit[otel]'`` is enough to run the page's OpenTelemetry snippets."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["otel"]
    installed = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0] for req in extra}
    page = (DOCS / "observability.md").read_text(encoding="utf-8")
    imported = set(re.findall(r"^\s*(?:from|import) (opentelemetry\.\w+)", page, re.M))
    assert imported  # the page does import from OpenTelemetry
    needed = {"opentelemetry-sdk" if name == "opentelemetry.sdk" else "opentelemetry-api"
              for name in imported}
    assert needed <= installed, (imported, extra)
