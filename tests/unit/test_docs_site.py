"""The docs site builds with ``mkdocs build --strict``, renders Mermaid, and has the API reference.

The build runs once per session, as a subprocess, into a temporary directory. Without mkdocs
(the ``docs`` or ``dev`` extra) the tests skip, except under CI (``CI`` set), where a missing
mkdocs is a failure: CI installs the ``dev`` extra, which includes it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_modules() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing_modules()
    if missing:
        message = (f"the docs toolchain is not installed ({', '.join(missing)}): "
                   "pip install -e '.[docs]'")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG),
         "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return out


def _page(site: Path, name: str) -> str:
    """The built HTML of docs/<name>.md (``index`` is the home page)."""
    path = site / "index.html" if name == "index" else site / name / "index.html"
    assert path.is_file(), f"{name}.md was not built"
    return path.read_text(encoding="utf-8")


def test_the_site_builds_strict_with_every_page(site: Path) -> None:
    pages = [p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")
             if "hooks" not in p.relative_to(DOCS).parts]
    assert {"index", "getting-started", "checkpoints", "api", "concepts"} <= set(pages)
    for name in pages:
        _page(site, name)


def test_every_page_is_in_the_nav() -> None:
    """A page missing from the nav builds but can only be reached by a link: list it."""
    listed = set(re.findall(r"^\s*-\s*[^:\n]*:\s*(\S+\.md)\s*$", CONFIG.read_text(), re.M))
    for path in DOCS.rglob("*.md"):
        page = path.relative_to(DOCS).as_posix()
        if not page.startswith("hooks/"):
            assert page in listed, f"docs/{page} is not in the nav of mkdocs.yml"


def test_mermaid_blocks_render_as_diagrams_offline(site: Path) -> None:
    html = _page(site, "concepts")
    # Material turns <pre class="mermaid"> into an SVG in the browser, with a global `mermaid`.
    assert re.search(r'<pre class="mermaid"><code>\s*flowchart TD', html)
    assert "```mermaid" not in html
    script = site / "javascripts" / "mermaid.min.js"
    assert script.is_file()
    assert script.stat().st_size > 1_000_000
    assert 'src="../javascripts/mermaid.min.js"' in html  # vendored: no CDN needed
    assert re.search(r'<pre class="mermaid">', _page(site, "checkpoints"))


def test_the_api_reference_lists_the_public_api(site: Path) -> None:
    api = _page(site, "api")
    for anchor in ("sagakit.SagaTransaction", "sagakit.Saga", "sagakit.SagaStepHandler",
                   "sagakit.SagaContext", "sagakit.mediator.SagaMediator"):
        assert f'id="{anchor}"' in api, anchor
    assert "recover_saga" in api
    recovery = _page(site, "api/recovery")
    assert 'id="sagakit.recovery.recover_saga"' in recovery
    assert 'id="sagakit.worker.RecoveryWorker"' in _page(site, "api/worker")
    sql = _page(site, "api/sqlalchemy")
    assert 'id="sagakit.storage.sqlalchemy.SqlAlchemySagaStorage"' in sql
    assert "group_commit" in sql  # signatures are shown
    # Sphinx roles in the docstrings are turned into code, not shown raw.
    for name in ("api", "api/diagram", "api/middleware", "api/breaker"):
        assert not re.search(r":(class|func|meth|mod|attr|data):", _page(site, name)), name
