"""The README and docs/ as a newcomer reads them: short, current, and every link resolves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "jobs" / "README.md",
               ROOT / "cluster" / "README.md"])
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    missing = [target for target in LINK.findall(doc.read_text())
               if "://" not in target and not (doc.parent / target).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_is_one_screen_of_current_facts():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    assert "pip install -e '.[test]'" in text and "python -m pytest" in text
    # history belongs to git log: no commit ids, no dated measurement runs, no "this round"
    assert not re.search(r"\b[0-9a-f]{7,40}\b", text), "a commit id in the README"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a dated measurement in the README"
    assert "this round" not in text.lower()


def test_public_names_of_the_readme_import():
    import selfment_dist
    block = (ROOT / "README.md").read_text()
    for names in re.findall(r"^from selfment_dist import (.+)$", block, flags=re.M):
        for name in (n.strip() for n in names.split(",")):
            assert getattr(selfment_dist, name) is not None
