"""Build-time helpers for the docs site (mkdocs.yml loads this file twice).

- As a MkDocs hook (``hooks:``): drops nav entries whose page does not exist yet, so a page
  listed in the nav ahead of its author (``workers.md``) never fails ``mkdocs build --strict``.
- As a Griffe extension (``plugins: mkdocstrings: ... extensions:``): sagakit's docstrings are
  written in reStructuredText habits (``:class:`X```, ``Example::``); ``SphinxRoles`` turns those
  into Markdown before mkdocstrings renders them, so the API reference shows ``X`` as code and
  ``Example::`` blocks as code blocks, without touching the docstrings themselves.

This directory is excluded from the built site (``exclude_docs`` in mkdocs.yml).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.sagakit")

# -- MkDocs hook -----------------------------------------------------------------------------


def on_config(config: Any) -> Any:
    """Remove nav entries (at any depth) whose Markdown file is not in docs_dir."""
    docs_dir = Path(config["docs_dir"])
    if config.get("nav"):
        config["nav"] = _prune(config["nav"], docs_dir)
    return config


def _prune(items: list[Any], docs_dir: Path) -> list[Any]:
    kept: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            ((title, target),) = item.items()
            if isinstance(target, list):
                children = _prune(target, docs_dir)
                if children:
                    kept.append({title: children})
                continue
            if _missing(target, docs_dir):
                log.info("nav: leaving out %r: docs/%s does not exist", title, target)
                continue
        elif isinstance(item, str) and _missing(item, docs_dir):
            log.info("nav: leaving out docs/%s: it does not exist", item)
            continue
        kept.append(item)
    return kept


def _missing(target: str, docs_dir: Path) -> bool:
    if "://" in target or not target.endswith(".md"):
        return False  # an external link, or something MkDocs itself will judge
    return not (docs_dir / target).is_file()


# -- Griffe extension ------------------------------------------------------------------------

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj|const):`~?([^`]+)`")
_LITERAL = re.compile(r"::$", re.M)
_ESCAPED_SUFFIX = re.compile(r"(``)\\(?=\w)")


def rst_to_markdown(text: str) -> str:
    """``:class:`a.B``` -> ```a.B```; ``Example::`` -> ``Example:`` (the indented block below
    stays a code block in Markdown); ````X``\\s`` -> ````X``s``."""
    text = _ROLE.sub(lambda m: f"``{m.group(1)}``", text)
    text = _LITERAL.sub(":", text)
    return _ESCAPED_SUFFIX.sub(r"\1", text)


class SphinxRoles(griffe.Extension):
    """Rewrite each docstring with :func:`rst_to_markdown` as Griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
