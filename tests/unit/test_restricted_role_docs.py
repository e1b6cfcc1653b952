"""The grants docs/security.md and docs/audit-trail.md show are those
deploy/postgres/restricted-role.sql makes (the role name as the docs spell it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _grants(text: str) -> list[str]:
    """Every top-level GRANT statement, on one line, whitespace collapsed."""
    statements = re.findall(r"^GRANT\b[^;]*;", text, flags=re.M)
    return [" ".join(s.split()) for s in statements]


@pytest.mark.parametrize("page", ["docs/security.md", "docs/audit-trail.md"])
def test_the_documented_grants_are_the_sql_files(page: str) -> None:
    sql = (ROOT / "deploy" / "postgres" / "restricted-role.sql").read_text()
    made = [g.replace(':"role"', "dicom_router_app") for g in _grants(sql)]
    shown = [g for g in _grants((ROOT / page).read_text()) if "<every other table" not in g]
    assert len(made) == 3 and shown == made
