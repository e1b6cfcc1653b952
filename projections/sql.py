"""SQL pieces the view queries share: LIKE patterns (DICOM-style wildcards, escaped literals),
a WHERE clause from optional conditions, and one page of rows with the number that match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from projections.db import Row, ViewDatabase


def search_name(term: str) -> str:
    """A person name typed as the pages show it ("DOE, JOHN") as DICOM writes it
    ("DOE^JOHN"), for searching: the first comma is the family name's ``^``. A term with a
    ``^`` already, or without a comma, is kept as typed."""
    if "^" in term or "," not in term:
        return term
    family, given = term.split(",", 1)
    return f"{family.strip()}^{given.strip()}"


def like_pattern(value: str, anchor: str = "exact") -> str:
    """A LIKE pattern (escape ``\\``) from a DICOM-style wildcard value: ``*`` any run of
    characters, ``?`` one character. Without wildcards ``anchor`` decides: ``exact``,
    ``prefix`` or ``contains``."""
    wild = "*" in value or "?" in value
    out = []
    for ch in value:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    pattern = "".join(out)
    if wild or anchor == "exact":
        return pattern
    return pattern + "%" if anchor == "prefix" else "%" + pattern + "%"


def like_literal(text: str) -> str:
    """``text`` matched literally by a LIKE with ``ESCAPE '!'`` (add ``%`` around it)."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def where_clause(clauses: Sequence[str]) -> str:
    """`` WHERE a AND b`` from the conditions in use; empty when there are none."""
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def page(db: ViewDatabase, select: str, source: str, condition: tuple[str, Sequence[Any]],
         order: str, limit: int, offset: int) -> tuple[list[Row], int]:
    """One page of ``SELECT select FROM source WHERE ... ORDER BY order`` and the number of
    rows that match in all. ``condition`` is a WHERE clause (or "") and its parameters."""
    clause, params = condition
    total = int(db.query(f"SELECT count(*) AS n FROM {source}{clause}", params)[0]["n"])
    rows = db.query(f"SELECT {select} FROM {source}{clause} ORDER BY {order} LIMIT ? OFFSET ?",
                    [*params, limit, offset])
    return rows, total
