"""docs/architecture.md names every module of the package (and of the SDK), so the map a
newcomer reads first is never behind the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _rows() -> dict[str, str]:
    """The table of "Folders and modules": first cell (a path, or several) → the row."""
    rows = {}
    for line in DOC.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            for path in re.findall(r"`([^`]+)`", cells[0]):
                rows[path] = cells[1]
    return rows


def _listed(relative: Path, rows: dict[str, str]) -> bool:
    text = relative.as_posix()
    if text in rows or f"`{text}`" in DOC:
        return True
    folder = relative.parts[0] + "/"
    row = rows.get(folder, "")
    if len(relative.parts) > 2:  # a module of a sub-folder: the sub-folder is named
        return f"`{relative.parts[1]}/`" in row
    return f"`{relative.name}`" in row


def _modules(package: Path) -> list[Path]:
    return sorted(
        path.relative_to(package)
        for path in package.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    )


def test_every_module_of_the_server_is_named():
    rows = _rows()
    missing = [str(m) for m in _modules(ROOT / "src" / "tokenward") if not _listed(m, rows)]
    assert missing == [], f"not in docs/architecture.md: {missing}"


def test_every_module_of_the_sdk_is_named():
    sdk = DOC.split("**The SDK is a distribution of its own**", 1)[1]
    modules = _modules(ROOT / "client" / "src" / "tokenward_client")
    missing = [str(m) for m in modules if f"`{m.name}`" not in sdk]
    assert modules and missing == [], f"not in docs/architecture.md: {missing}"


def test_every_folder_has_a_row():
    rows = _rows()
    folders = [p.name + "/" for p in (ROOT / "src" / "tokenward").iterdir() if p.is_dir()]
    missing = [f for f in folders if f != "__pycache__/" and f not in rows]
    assert missing == []
