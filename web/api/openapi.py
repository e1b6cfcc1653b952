"""The OpenAPI 3.1 document of /api/v1, built from the URL table (routes.py): every API route
with its summary, permission, path parameters, documented query parameters and the JSON Schema
of its request body (from the route's pydantic model) and, where a route gives one, of its
answer. Nothing is listed by hand.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from web.api.common import json_response
from web.routes import TABLE_KEY, Route
from web.security import AUTHENTICATED, PUBLIC

PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")
ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "status": {"type": "integer"}, "message": {"type": "string"},
        "fields": {"type": "object", "additionalProperties": {"type": "string"}}}}},
}


def build_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for route in routes:
        if not route.path.startswith("/api/v1/"):
            continue
        path = PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", route.path)
        paths.setdefault(path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "DICOM Router API", "version": "1",
                 "description": "Authenticate with a session cookie, a bearer token from "
                                "POST /api/v1/auth/token, or a personal API token."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "dr_session"}}},
        "security": [{"bearer": []}, {"cookie": []}],
    }


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary or route.handler.__name__.replace("_", " "),
        "operationId": f"{route.method.lower()}_{route.handler.__module__.split('.')[-1]}_"
                       f"{route.handler.__name__}",
        "tags": list(route.tags) or [route.path.split("/")[3]],
        "responses": {
            "200": {"description": "OK"},
            "400": _error_ref("Bad request"), "401": _error_ref("Not authenticated"),
            "403": _error_ref("Not allowed for this role"), "404": _error_ref("Not found"),
            "422": _error_ref("Invalid fields"),
        },
    }
    if route.permission == PUBLIC:
        op["security"] = []
    elif route.permission != AUTHENTICATED:
        op["description"] = f"Needs the permission `{route.permission}`."
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in PATH_PARAM.findall(route.path)]
    params += [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
               for name in route.query]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": not route.body_optional, "content": {
            "application/json": {"schema": _schema_ref(route.body, schemas)}}}
    if route.response is not None:
        op["responses"]["200"] = {"description": "OK", "content": {"application/json": {
            "schema": _schema_ref(route.response, schemas)}}}
    return op


def _schema_ref(model: Any, schemas: dict[str, Any]) -> dict[str, str]:
    """``model``'s JSON Schema put in the components (its own definitions beside it)."""
    name = model.__name__
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for sub_name, sub in schema.pop("$defs", {}).items():
        schemas[sub_name] = sub
    schemas[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _error_ref(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


async def openapi(request: web.Request) -> web.Response:
    return json_response(build_document(request.app[TABLE_KEY]))


ROUTES = [Route("GET", "/api/v1/openapi.json", openapi, PUBLIC, "This OpenAPI document",
                tags=("meta",))]
