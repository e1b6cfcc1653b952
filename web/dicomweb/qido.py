"""QIDO-RS under ``/dicom-web``: search for studies, series and instances, answered from the
studies view (never by reading stored files; the SQL is projections/dicomweb_queries.py) as
``application/dicom+json``.

Query parameters are attribute keywords or hex tags (matching: the studies view's engine,
projections/matching.py, through matching.py), ``includefield`` (repeated or
comma-separated, ``all``), ``limit``/``offset`` (a ``Warning`` says when more results exist)
and ``fuzzymatching`` (not supported: a Warning says literal matching was used).
Each search is one access record: level, attribute names used, number returned; the study and
patient when the search names them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from projections import dicomweb_queries as queries
from projections.db import ViewDatabase
from web.api.common import ApiError
from web.dicomweb import matching
from web.dicomweb.access import AccessNote, audited
from web.dicomweb.dicom_json import dicom_json_response, element
from web.dicomweb.lookup import base_path, path_uid, studies_db, url_path
from web.dicomweb.qido_keys import (
    ALWAYS,
    AVAILABILITY,
    BY_KEYWORD,
    COMPUTED,
    INSTANCE,
    KEYS,
    RETRIEVE_URL,
    SERIES,
    STUDY,
    Key,
    UnknownAttribute,
    canonical_name,
    find_key,
    levels_for,
    searchable,
)
from web.freshness import fresh
from web.routes import Route

MAX_RESULTS = 1000
MORE = "There are additional results that can be requested"
RESERVED = ("includefield", "limit", "offset", "fuzzymatching")

@dataclass
class Search:
    """A parsed QIDO request."""

    level: str
    scope: dict[str, str]
    conditions: list[matching.Condition] = field(default_factory=list)
    matched: dict[str, str] = field(default_factory=dict)  # keyword -> value
    returned: dict[str, Key] = field(default_factory=dict)
    limit: int = MAX_RESULTS
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _paging(query: Mapping[str, str], search: Search) -> None:
    try:
        limit = int(query.get("limit", MAX_RESULTS))
        search.offset = int(query.get("offset", 0))
    except ValueError:
        raise _bad("limit and offset must be whole numbers") from None
    if limit < 1 or search.offset < 0:
        raise _bad("limit must be at least 1 and offset at least 0")
    if limit > MAX_RESULTS:
        search.warnings.append(f"limit was lowered to this server's maximum of {MAX_RESULTS}")
    search.limit = min(limit, MAX_RESULTS)


def _fuzzy(query: Mapping[str, str], search: Search) -> None:
    value = query.get("fuzzymatching", "false").lower()
    if value not in ("true", "false"):
        raise _bad("fuzzymatching must be true or false")
    if value == "true":
        search.warnings.append("The fuzzymatching parameter is not supported."
                               " Only literal matching has been performed.")


def _includes(query: MultiMapping[str], search: Search, shown: tuple[str, ...]) -> None:
    names = [n.strip() for v in query.getall("includefield", []) for n in v.split(",")]
    unsupported = []
    for name in filter(None, names):
        if name == "all":
            search.returned.update({k.keyword: k for k in KEYS if k.level in shown})
            continue
        try:
            key = find_key(name)
        except UnknownAttribute:
            raise _bad(f"includefield: {name[:64]!r} is not a DICOM attribute") from None
        if key is not None and key.level in searchable(search.level):
            search.returned[key.keyword] = key
        elif name not in COMPUTED:
            unsupported.append(canonical_name(name))
    if unsupported:
        search.warnings.append("The following includefield values are not supported at this"
                               f" level: {', '.join(sorted(set(unsupported)))}")


def _matches(query: MultiMapping[str], search: Search) -> None:
    for name in sorted(set(query) - set(RESERVED)):
        values = query.getall(name)
        if len(values) > 1:
            raise _bad(f"{name[:64]} is given more than once")
        try:
            key = find_key(name)
        except UnknownAttribute:
            raise _bad(f"unknown query parameter {name[:64]!r}") from None
        if key is None:
            raise _bad(f"{canonical_name(name)} is not supported as a matching key")
        if key.level not in searchable(search.level):
            raise _bad(f"{key.keyword} cannot be matched in a {search.level} search")
        try:
            found = matching.condition(key, values[0])
        except matching.MatchError as exc:
            raise _bad(f"{key.keyword}: {exc}") from None
        if found is not None:
            search.conditions.append(found)
        search.matched[key.keyword] = values[0]
        search.returned[key.keyword] = key


def parse_search(query: MultiMapping[str], level: str, scope: dict[str, str]) -> Search:
    """A QIDO request from its query string; ApiError 400 names the bad parameter."""
    search = Search(level, scope)
    shown = levels_for(level, tuple(scope))
    search.returned = {k.keyword: k for k in KEYS if k.level in shown and k.default}
    for keyword in (*ALWAYS, "StudyInstanceUID", "SeriesInstanceUID"):
        key = BY_KEYWORD[keyword]
        if key.level in searchable(level):
            search.returned[keyword] = key
    _paging(query, search)
    _fuzzy(query, search)
    _includes(query, search, shown)
    _matches(query, search)
    return search


def run_search(db: ViewDatabase, search: Search) -> list[dict[str, Any]]:
    """Up to limit + 1 rows (one more than asked tells whether results were cut)."""
    returned = {k.keyword.lower(): k.column for k in search.returned.values()}
    return queries.search(db, search.level, returned, searchable(search.level),
                          search.conditions, search.scope, search.limit + 1, search.offset)


def to_dataset(row: dict[str, Any], search: Search, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in search.returned.values():
        found = element(key.vr, row[f"k_{key.keyword.lower()}"])
        if found is not None:
            out[key.tag] = found
    url = url_path(base, row["id_study"], row.get("id_series"), row.get("id_instance"))
    out[AVAILABILITY[1]] = {"vr": AVAILABILITY[2], "Value": [row["availability"]]}
    out[RETRIEVE_URL[1]] = {"vr": RETRIEVE_URL[2], "Value": [url]}
    return dict(sorted(out.items()))


def _scope_patient(db: ViewDatabase, scope: dict[str, str]) -> str | None:
    """The scoped study's patient; 404 when the study or series of the URL is unknown."""
    study = queries.find_study(db, scope[STUDY])
    if study is None:
        raise ApiError(404, "no study with this Study Instance UID")
    if SERIES in scope and not queries.has_series(db, scope[STUDY], scope[SERIES]):
        raise ApiError(404, "no series with this Series Instance UID in this study")
    patient: str | None = study["patient_id"]
    return patient


def _named(value: str | None) -> str | None:
    """A matching value that names exactly one thing (no list, no wildcard)."""
    if not value or any(c in value for c in "*?,\\"):
        return None
    return value


async def _search(request: web.Request, note: AccessNote, level: str) -> web.Response:
    scope = {name: path_uid(request, name) for name in (STUDY, SERIES)
             if name in request.match_info}
    db = studies_db(request)
    note.object_type = level
    note.add(f"{level} search")
    search = parse_search(request.query, level, scope)
    await fresh(request, "studies")  # every receipt acknowledged before this search
    patient = await asyncio.to_thread(_scope_patient, db, scope) if scope else None
    study = scope.get(STUDY) or _named(search.matched.get("StudyInstanceUID"))
    note.about(study, patient or _named(search.matched.get("PatientID")),
               scope.get(SERIES) or study or "")
    rows = await asyncio.to_thread(run_search, db, search)
    warnings = list(search.warnings)
    if len(rows) > search.limit:
        rows = rows[:search.limit]
        warnings.append(MORE)
    base = base_path(request)
    body = [to_dataset(row, search, base) for row in rows]
    note.add(f"matching: {', '.join(sorted(search.matched)) or 'none'}; returned {len(body)}")
    return dicom_json_response(body, warnings=warnings)


def _searcher(level: str, name: str) -> Any:
    async def search(request: web.Request, note: AccessNote) -> web.Response:
        return await _search(request, note, level)

    search.__name__ = search.__qualname__ = name  # one OpenAPI operation id per route
    return audited("dicomweb.search", level)(search)


TAGS = ("dicomweb",)
_QUERY = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "ModalitiesInStudy",
          "AccessionNumber", "includefield", "limit", "offset", "fuzzymatching")
_ANY = " (match on any supported attribute by keyword or tag)"
_S = "/dicom-web/studies/{study}"
ROUTES = [
    Route("GET", "/dicom-web/studies", _searcher(STUDY, "search_studies"), "studies.read",
          "QIDO-RS: search for studies" + _ANY, query=_QUERY, tags=TAGS),
    Route("GET", "/dicom-web/series", _searcher(SERIES, "search_series"), "studies.read",
          "QIDO-RS: search for series of any study" + _ANY, query=_QUERY, tags=TAGS),
    Route("GET", "/dicom-web/instances", _searcher(INSTANCE, "search_instances"),
          "studies.read", "QIDO-RS: search for instances of any study" + _ANY, query=_QUERY,
          tags=TAGS),
    Route("GET", f"{_S}/series", _searcher(SERIES, "search_study_series"), "studies.read",
          "QIDO-RS: search for the series of a study" + _ANY, query=_QUERY, tags=TAGS),
    Route("GET", f"{_S}/instances", _searcher(INSTANCE, "search_study_instances"),
          "studies.read", "QIDO-RS: search for the instances of a study" + _ANY,
          query=_QUERY, tags=TAGS),
    Route("GET", f"{_S}/series/{{series}}/instances",
          _searcher(INSTANCE, "search_series_instances"), "studies.read",
          "QIDO-RS: search for the instances of a series" + _ANY, query=_QUERY, tags=TAGS),
]
