"""docs/performance.md holds the measured timings; the code points into it.

Every pointer ``docs/performance.md#anchor`` written in the package must name a heading of that
document (GitHub's anchors: the heading in lower case, punctuation dropped, spaces as hyphens), so
a renamed section cannot leave a comment pointing nowhere.
"""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
POINTER = re.compile(r"docs/performance\.md#([a-z0-9-]+)")


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    found = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def pointers() -> list[tuple[str, str]]:
    """(file:line, anchor) for every pointer into docs/performance.md under minisd/."""
    found = []
    for path in sorted((ROOT / "minisd").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [(f"{path.relative_to(ROOT)}:{number}", a) for a in POINTER.findall(line)]
    return found


def test_anchors_follow_githubs_rule():
    assert anchors("## The weight gradient's product orientation\n### Width-only unfolding: a taller product") == {
        "the-weight-gradients-product-orientation", "width-only-unfolding-a-taller-product"}


def test_every_pointer_in_the_code_names_a_section_of_the_document():
    known = anchors(DOC.read_text())
    found = pointers()
    assert len(found) >= 5, "the kernels point to their measurements"
    dangling = [f"{where} -> #{anchor}" for where, anchor in found if anchor not in known]
    assert not dangling, "pointers to no heading of docs/performance.md: " + ", ".join(dangling)
