"""Every relative link in the README and docs/ resolves inside the repository (a clone has no ../shared/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve_inside_the_repository() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for document in documents:
        for target in LINK.findall(document.read_text()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (document.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert not broken, broken
