"""What every API handler shares: JSON in and out, field-level validation errors, paging, and
the mapping of command errors to HTTP statuses (400/404/422, never a stack trace).
"""

from __future__ import annotations

import asyncio
import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from eventsourcing.persistence import IntegrityError
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, create_model

from router.application.commands import CommandError, NotFoundError
from router.config_types import problems_of
from router.dispatch.registry import DestinationConfigError
from router.transforms.spec import TransformError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

MAX_LIMIT = 1000


class ApiError(Exception):
    """An API error; the error middleware answers ``{"error": {status, message, fields?}}``."""

    def __init__(self, status: int, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields or {}


class RawObject(RootModel[dict[str, Any]]):
    """Any JSON object: validated by the domain's parser (the one the TOML file goes through),
    so that a bad field gets the same message from the file, the API and the UI."""


def config_body_model(name: str, config_class: type, fields: dict[str, Any] | None = None,
                      secret_fields: frozenset[str] = frozenset(),
                      optional: frozenset[str] = frozenset()) -> type[BaseModel]:
    """The OpenAPI document's model of a body that ``config_class`` (a configuration
    dataclass) validates: its own annotations, so ranges, patterns, defaults and descriptions
    cannot drift from what is checked. ``fields``: more (or replaced) fields; ``optional``:
    fields a body may leave out although the class requires them (the name in the URL)."""
    hints = typing.get_type_hints(config_class, include_extras=True)
    made: dict[str, Any] = {}
    for spec in dataclasses.fields(config_class):
        if not spec.init:  # worked out from the others (a rule's compiled patterns)
            continue
        default = ... if spec.default is dataclasses.MISSING else spec.default
        if spec.name in optional:
            default = None
        extra: dict[str, Any] | None = {"writeOnly": True} if spec.name in secret_fields else None
        made[spec.name] = (hints[spec.name] | None if spec.name in optional else hints[spec.name],
                           Field(default, json_schema_extra=extra))
    made.update(fields or {})
    return create_model(name, __config__=ConfigDict(extra="forbid"), **made)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
                        status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request, model: type[M]) -> M:
    """The request body validated against ``model``; 400 for bad JSON, 422 with fields."""
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return validate(model, data)


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid request", fields=field_errors(exc, model)) from None


def field_errors(exc: ValidationError, model: type[BaseModel]) -> dict[str, str]:
    """Path -> problem for a body ``model`` refused, in the words and paths the configuration
    file's problems use (``names[1]: ...``, ``unknown key (did you mean ...)``); the whole
    body's problem under ``body``."""
    out: dict[str, str] = {}
    for problem in problems_of(exc, model):
        out.setdefault(problem.path or "body", problem.message)
    return out


def paging(request: web.Request, default: int = 50) -> tuple[int, int]:
    """``limit`` (1..1000) and ``offset`` (>= 0) from the query string."""
    try:
        limit = int(request.query.get("limit", default))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise ApiError(400, "limit and offset must be whole numbers") from None
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise ApiError(400, f"limit must be 1..{MAX_LIMIT} and offset >= 0")
    return limit, offset


async def run_command(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a write-side command in a thread; its errors become 404 / 422 API errors."""
    try:
        return await asyncio.to_thread(func, *args, **kwargs)
    except NotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    except (DestinationConfigError, TransformError) as exc:
        raise ApiError(422, str(exc), fields=exc.errors) from None
    except (CommandError, ValueError) as exc:
        raise ApiError(422, str(exc)) from None
    except IntegrityError:
        raise ApiError(409, "changed by someone else meanwhile; nothing was saved. Reload "
                            "and try again") from None
