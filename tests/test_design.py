"""docs/DESIGN.md's module map names every module of roadseg_utils/ and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "roadseg_utils"
DESIGN = ROOT / "docs" / "DESIGN.md"


def _modules_in_code() -> set[str]:
    return {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts
    }


def _module_map_rows() -> list[str]:
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+\.py)` \|", section, flags=re.MULTILINE)


def test_module_map_matches_the_package():
    named = _module_map_rows()
    assert len(named) == len(set(named)), "a module is named twice in docs/DESIGN.md"
    in_code = _modules_in_code()
    assert sorted(set(named) - in_code) == [], "docs/DESIGN.md names modules that do not exist"
    assert sorted(in_code - set(named)) == [], "modules missing from docs/DESIGN.md's module map"


def test_docstrings_cite_the_design_in_the_repository():
    stale = [
        str(path.relative_to(ROOT))
        for path in [*ROOT.glob("*.py"), *PACKAGE.rglob("*.py")]
        if re.search(r"(?<!docs/)DESIGN\.md", path.read_text(encoding="utf-8"))
    ]
    assert stale == [], "these cite DESIGN.md without its docs/ folder"
