"""The documents in the repository agree with the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

from verity_django.conf import declared

ROOT = Path(__file__).resolve().parent.parent
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench/README.md"]


def test_every_check_id_in_the_code_is_documented() -> None:
    used: set[str] = set()
    for path in (ROOT / "verity_django").rglob("*.py"):
        used |= set(re.findall(r"verity_django\.[EW]\d{3}", path.read_text()))
    documented = set(re.findall(r"verity_django\.[EW]\d{3}", (ROOT / "docs/checks.md").read_text()))
    assert used, "no check id found in the code"
    assert sorted(used - documented) == [], "add these to docs/checks.md"


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in declared() if f"`{name}`" not in readme]
    assert missing == [], "add these to the README's settings table"


def test_documents_link_only_to_files_in_the_repository() -> None:
    broken: list[str] = []
    for document in _documents():
        for target in _LINK.findall(document.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (document.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert broken == []


# A test the documents cite by name: `test_x`, `::test_x`, `file.py::test_x`,
# or a family of them (`test_x_*`); not a module (`test_x.py`).
_CITED_TEST = re.compile(r"(?<![\w/.])(test_[a-z0-9_]+)(?![\w.])(\*)?")
_DEFINED_TEST = re.compile(r"^\s*(?:async )?def (test_\w+)", re.M)


def test_every_test_the_documents_cite_exists() -> None:
    defined: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(_DEFINED_TEST.findall(path.read_text()))
    missing: list[str] = []
    for document in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = document.read_text()
        # Examples the document defines itself (a user's own test).
        examples = set(_DEFINED_TEST.findall(text))
        for name, family in _CITED_TEST.findall(text):
            if name in examples:
                continue
            found = any(x.startswith(name) for x in defined) if family else name in defined
            if not found:
                missing.append(f"{document.relative_to(ROOT)}: {name}{family}")
    assert missing == [], "these tests were renamed or removed"
