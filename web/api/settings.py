"""The effective configuration under ``/api/v1/settings`` (read: settings.read) and the settings
that can change at run time (write: settings.write; recorded in the admin log as the caller).

Secrets (the master key, the first admin's password, a database password) are never shown:
only whether they are set. Each value says where it comes from: the default, the TOML file or
the environment (the router keeps no record of which of the two), or a change at run time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from router.application.runtime_settings import RUNTIME_SETTINGS, RuntimeValue
from router.config_types import adapter, secrets_of
from router.secrets import KEY_FILE_NAME
from router.settings import Settings
from web.api.common import ApiError, json_response, read_json, run_command
from web.auth import actor_of
from web.keys import ROUTER_KEY
from web.routes import Route

SECTIONS = ("server", "dicom", "dispatch", "ingest", "web", "storage", "audit", "atna")
DEFAULT = "default"
CONFIGURED = "configuration file or environment"
READ_ONLY_NOTE = ("Only the settings marked changeable can change here; every other value "
                  "comes from the TOML file or DICOM_ROUTER_* environment variables and "
                  "changes with a restart.")


def _runtime_value() -> Any:
    """The type of a runtime setting's new value: the settings field's own annotations (its
    range and Doc), strict; several settings: any of them (the named one is checked again)."""
    kinds = tuple(spec.annotation for spec in RUNTIME_SETTINGS.values())
    return (kinds[0] if len(kinds) == 1 else Union[kinds]) | None  # noqa: UP007


class RuntimeChange(BaseModel):
    """A runtime setting's new value; null: back to the value of the file (or the default)."""

    model_config = ConfigDict(extra="forbid")
    value: _runtime_value()  # type: ignore[valid-type]


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def shown(value: Any) -> Any:
    """A JSON-friendly value: tuples as lists, paths as text."""
    if isinstance(value, tuple):
        return [shown(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def mask_url(url: str) -> str:
    """A database URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _item(value: Any, default: Any, secret: bool = False) -> dict[str, Any]:
    if secret:
        return {"value": "set" if value else "not set",
                "source": CONFIGURED if value else DEFAULT, "changeable": False}
    item = {"value": shown(value), "source": DEFAULT if value == default else CONFIGURED,
            "changeable": False}
    if isinstance(value, float) or (value and isinstance(value, tuple)
                                    and all(isinstance(v, float) for v in value)):
        item["unit"] = "seconds"  # every float setting is a duration
    return item


def _declared(value: Any) -> bool:
    """A list of tables from the file ([[destinations]], [[rules]], ...): may hold secrets."""
    return isinstance(value, tuple) and all(isinstance(v, Mapping) for v in value)


def _server(settings: Settings) -> dict[str, dict[str, Any]]:
    base = Settings()
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            continue
        if _declared(value):  # only how many: their pages show them, secrets sealed
            out[f"{f.name}_in_file"] = _item(len(value), 0)
            continue
        default = getattr(base, f.name)
        if f.name == "database_url":
            default = f"sqlite:///{settings.data_dir / 'db'}"
            out[f.name] = _item(value, default)
            out[f.name]["value"] = mask_url(value)
            continue
        out[f.name] = _item(value, default, secret=f.name in secrets_of(Settings))
    out["secret_key"] = _master_key(settings)
    return out


def _master_key(settings: Settings) -> dict[str, Any]:
    """Without ``secret_key`` the router uses (and at its first start made) the key file in
    the data folder: that is a key that is set, not a missing one."""
    if settings.secret_key:
        return _item(settings.secret_key, None, secret=True)
    key_file = settings.data_dir / KEY_FILE_NAME
    if key_file.is_file():
        return {"value": "set", "source": f"key file {key_file}", "changeable": False}
    return {"value": "not set", "source": f"{DEFAULT} (made as {key_file} at start)",
            "changeable": False}


def runtime_json(value: RuntimeValue) -> dict[str, Any]:
    source = (f"changed at run time by {value.changed_by}" if value.overridden
              else "configuration file, environment or default")
    return {"value": value.value, "source": source, "changeable": True,
            "file_value": value.file_value, "overridden": value.overridden,
            "changed_by": value.changed_by, "changed_at": iso(value.changed_at),
            "help": value.help}


def describe(settings: Settings, runtime: dict[str, RuntimeValue]) -> dict[str, Any]:
    """The effective settings by section, each with its value, source and changeability."""
    sections: dict[str, dict[str, Any]] = {"server": _server(settings)}
    for name in SECTIONS[1:]:
        current = getattr(settings, name)
        base = type(current)()
        # A secret (WriteOnly in its class, such as storage.secret_access_key): set or not.
        secret = secrets_of(type(current))
        sections[name] = {f.name: _item(getattr(current, f.name), getattr(base, f.name),
                                        secret=f.name in secret)
                          for f in dataclasses.fields(current)}
    for full_name, value in runtime.items():
        section, key = full_name.split(".", 1)
        sections[section][key] = runtime_json(value)
    return {"sections": sections, "note": READ_ONLY_NOTE}


# -- the OpenAPI schema of what GET answers, made from the settings classes ----------------

_TEXT = {"type": "string"}
_ITEM = {"source": _TEXT, "changeable": {"type": "boolean"},
         "unit": {"const": "seconds", "description": "the value is a duration"}}
_RUNTIME_ITEM = {**_ITEM, "file_value": {}, "overridden": {"type": "boolean"},
                 "changed_by": {"type": ["string", "null"]},
                 "changed_at": {"type": ["string", "null"], "format": "date-time"},
                 "help": _TEXT}
_SECRET = {"enum": ["set", "not set"], "description": "a secret: only whether it is set"}


def _item_schema(value: dict[str, Any], changeable: bool = False) -> dict[str, Any]:
    props = {**(_RUNTIME_ITEM if changeable else _ITEM), "value": value}
    if changeable:
        props["file_value"] = value
    return {"type": "object", "properties": props, "required": ["value", "source",
                                                               "changeable"]}


def _section_schema(fields: dict[str, Any], secrets: frozenset[str], section: str
                    ) -> dict[str, Any]:
    """Each key of a section: its value has the field's own JSON Schema (range, enum,
    description from its Doc); secrets only set / not set."""
    props: dict[str, Any] = {}
    for key, schema in fields.items():
        value = _SECRET if key in secrets else {k: v for k, v in schema.items()
                                                if k not in ("default", "title")}
        props[key] = _item_schema(value, changeable=f"{section}.{key}" in RUNTIME_SETTINGS)
    return {"type": "object", "properties": props, "additionalProperties": False}


class SettingsShown:
    """GET /api/v1/settings in the OpenAPI document: made from the settings classes (the ones
    the file and the environment are validated with), so it cannot drift from them."""

    @classmethod
    def model_json_schema(cls, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
        full = adapter(Settings).json_schema(mode="serialization", ref_template=ref_template)
        defs = full.get("$defs", {})
        base = Settings()
        server: dict[str, Any] = {}
        for f in dataclasses.fields(Settings):
            default = getattr(base, f.name)
            if dataclasses.is_dataclass(default):
                continue
            if _declared(default):
                server[f"{f.name}_in_file"] = {"type": "integer", "minimum": 0,
                                               "description": f"how many [[{f.name}]]"}
                continue
            server[f.name] = full["properties"][f.name]
        sections = {"server": _section_schema(server, secrets_of(Settings), "server")}
        for name in SECTIONS[1:]:
            model = type(getattr(base, name))
            section = defs[model.__name__]["properties"]
            sections[name] = _section_schema(section, secrets_of(model), name)
        schema = {"type": "object", "title": cls.__name__, "required": ["sections", "note"],
                  "properties": {"note": _TEXT, "sections": {
                      "type": "object", "properties": sections, "additionalProperties": False}}}
        if "$ref" in repr(sections):  # a field typed by another class: its schema beside
            schema["$defs"] = defs
        return schema


async def get_settings(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    runtime = await asyncio.to_thread(router.runtime.all)
    return json_response(describe(router.settings, runtime))


async def change_setting(request: web.Request, name: str, value: int | None) -> RuntimeValue:
    """Change one runtime setting as the caller; 404 for unknown, 422 for read-only/invalid."""
    router = request.app[ROUTER_KEY]
    if name not in RUNTIME_SETTINGS:
        section, _, key = name.partition(".")
        known = describe(router.settings, {}).get("sections", {}).get(section, {})
        if key in known:
            raise ApiError(422, f"{name} cannot change at run time: it comes from the "
                                "TOML file or the environment (restart to change it)")
        raise ApiError(404, f"no setting named {name!r}")
    try:
        await run_command(router.runtime.set, name, value, actor_of(request))
    except ApiError as exc:
        raise ApiError(exc.status, exc.message, fields={"value": exc.message}) from None
    return await asyncio.to_thread(router.runtime.get, name)


async def put_setting(request: web.Request) -> web.Response:
    body = await read_json(request, RuntimeChange)
    name = request.match_info["name"]
    return json_response({"name": name, **runtime_json(await change_setting(request, name,
                                                                            body.value))})


ROUTES = [
    Route("GET", "/api/v1/settings", get_settings, "settings.read",
          "The effective configuration by section (secrets only as set / not set), with "
          "where each value comes from", tags=("settings",), response=SettingsShown),
    Route("PUT", "/api/v1/settings/{name}", put_setting, "settings.write",
          "Change a runtime setting such as storage.retention_days (value null: back to the "
          "file's value)", body=RuntimeChange, tags=("settings",)),
]
