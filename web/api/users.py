"""User accounts under ``/api/v1/users`` (admins: create, role, disable, reset password, API
tokens) and the caller's own account under ``/api/v1/account`` (password, API tokens).

Password hashes and token hashes never leave the write side; a new token's value is in the
answer that created it and nowhere else. Password policy errors are 422 with the field named.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.application.admin_state import UserState
from router.application.commands import CommandError, NotFoundError
from router.application.users import LoginRefused, PasswordError, check_name
from router.domain.users import LEAST_PRIVILEGED_ROLE
from web.api.common import ApiError, json_response, read_json, run_command
from web.auth import actor_of, current_user
from web.filters import iso
from web.keys import ROUTER_KEY
from web.routes import Route
from web.security import AUTHENTICATED

T = TypeVar("T")
Role = Literal["admin", "operator", "radiologist", "auditor"]
MANAGE = "users.manage"


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    role: Role = cast(Role, LEAST_PRIVILEGED_ROLE)  # least privilege unless one is chosen
    password: str = Field(min_length=1, max_length=1024)


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role | None = None
    disabled: bool | None = None


class Unlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500, description="why (recorded with User.Unlocked)")


class PasswordReset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=1, max_length=1024)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=100)


def user_json(user: UserState, locked_until: float | None = None) -> dict[str, Any]:
    """What may be shown of an account: never a hash. ``locked_until``: when its login
    lockout ends (ISO 8601 UTC), null when it is not locked out."""
    return {"username": user.name, "role": user.role, "disabled": user.disabled,
            "locked_until": iso(locked_until), "tokens": tokens_json(user)}


async def shown_user(request: web.Request, user: UserState) -> dict[str, Any]:
    users = request.app[ROUTER_KEY].users
    return user_json(user, await asyncio.to_thread(users.locked_until, user.name))


def tokens_json(user: UserState) -> list[dict[str, Any]]:
    return [{"id": token_id, "label": token["label"], "revoked": token["revoked"]}
            for token_id, token in user.tokens.items()]


async def with_password(field: str, func: Callable[..., T], *args: Any) -> T:
    """Run a command that sets a password; a policy error names ``field`` (422)."""
    try:
        return await asyncio.to_thread(func, *args)
    except PasswordError as exc:
        raise ApiError(422, str(exc), fields={field: str(exc)}) from None
    except NotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    except CommandError as exc:
        raise ApiError(422, str(exc)) from None


async def existing(request: web.Request, name: str) -> UserState:
    user = await asyncio.to_thread(request.app[ROUTER_KEY].users.fresh, name)
    if user is None:
        raise ApiError(404, f"user {name!r} does not exist")
    return user


# --- admins: /api/v1/users ------------------------------------------------------------------
async def list_users(request: web.Request) -> web.Response:
    users = await asyncio.to_thread(request.app[ROUTER_KEY].users.all)
    return json_response({"items": [await shown_user(request, u) for u in users]})


async def create_user(request: web.Request) -> web.Response:
    body = await read_json(request, NewUser)
    try:
        check_name(body.username)
    except CommandError as exc:
        raise ApiError(422, str(exc), fields={"username": str(exc)}) from None
    users = request.app[ROUTER_KEY].users
    if await asyncio.to_thread(users.fresh, body.username) is not None:
        raise ApiError(409, f"user {body.username!r} already exists",
                       fields={"username": "already exists"})
    await with_password("password", users.add, body.username, body.role, body.password,
                        actor_of(request))
    return json_response(user_json(await existing(request, body.username)), status=201)


async def get_user(request: web.Request) -> web.Response:
    return json_response(await shown_user(request, await existing(
        request, request.match_info["name"])))


async def unlock_user(request: web.Request) -> web.Response:
    # The body is optional: no body (or {}) unlocks without a reason.
    body = await read_json(request, Unlock) if await request.read() else Unlock(reason="")
    name = (await existing(request, request.match_info["name"])).name
    await run_command(request.app[ROUTER_KEY].users.unlock, name, actor_of(request),
                      body.reason)
    return json_response(await shown_user(request, await existing(request, name)))


async def change_user(request: web.Request) -> web.Response:
    body = await read_json(request, UserChange)
    name = (await existing(request, request.match_info["name"])).name
    await apply_change(request, name, body.role, body.disabled)
    return json_response(await shown_user(request, await existing(request, name)))


async def apply_change(request: web.Request, name: str, role: str | None,
                       disabled: bool | None) -> None:
    """Role and/or enabled state of a user, as the caller; shared with the users page."""
    users = request.app[ROUTER_KEY].users
    actor = actor_of(request)
    if disabled and name.lower() == current_user(request).name.lower():
        raise ApiError(422, "you cannot disable your own account; ask another admin",
                       fields={"disabled": "not your own account"})
    if role is not None:
        await run_command(users.set_role, name, role, actor)
    if disabled is not None:
        await run_command(users.set_disabled, name, disabled, actor)


async def reset_password(request: web.Request) -> web.Response:
    body = await read_json(request, PasswordReset)
    name = (await existing(request, request.match_info["name"])).name
    await with_password("password", request.app[ROUTER_KEY].users.set_password, name,
                        body.password, actor_of(request))
    return json_response({"username": name, "password_changed": True,
                          "sessions_ended": True})


async def user_tokens(request: web.Request) -> web.Response:
    user = await existing(request, request.match_info["name"])
    return json_response({"items": tokens_json(user)})


async def create_user_token(request: web.Request) -> web.Response:
    name = (await existing(request, request.match_info["name"])).name
    return await new_token(request, name)


async def revoke_user_token(request: web.Request) -> web.Response:
    name = (await existing(request, request.match_info["name"])).name
    return await revoke(request, name)


async def new_token(request: web.Request, name: str) -> web.Response:
    body = await read_json(request, NewToken)
    token = await run_command(request.app[ROUTER_KEY].users.create_token, name, body.label,
                              actor_of(request))
    return json_response({"id": token.token_id, "label": body.label, "token": token.value,
                          "note": "shown once: store it now, it cannot be read again"},
                         status=201)


async def revoke(request: web.Request, name: str) -> web.Response:
    await run_command(request.app[ROUTER_KEY].users.revoke_token, name,
                      request.match_info["token_id"], actor_of(request))
    return json_response({"id": request.match_info["token_id"], "revoked": True})


# --- anyone: /api/v1/account ----------------------------------------------------------------
async def my_account(request: web.Request) -> web.Response:
    principal = current_user(request)
    data = user_json(await existing(request, principal.name))
    data["authenticated_by"] = principal.via
    return json_response(data)


async def verify_current(request: web.Request, name: str, password: str) -> None:
    """The caller's current password (a wrong one counts as a failed login)."""
    router = request.app[ROUTER_KEY]
    try:
        await asyncio.to_thread(router.users.authenticate, name, password,
                                request.remote or "")
    except LoginRefused as exc:
        if exc.reason.startswith("locked"):
            raise ApiError(429, "too many failed attempts; try again later") from None
        raise ApiError(422, "the current password is wrong",
                       fields={"current_password": "wrong password"}) from None


async def change_my_password(request: web.Request) -> web.Response:
    body = await read_json(request, PasswordChange)
    name = current_user(request).name
    await verify_current(request, name, body.current_password)
    await with_password("new_password", request.app[ROUTER_KEY].users.set_password, name,
                        body.new_password, actor_of(request))
    return json_response({"password_changed": True, "sessions_ended": True,
                          "note": "every session of yours has ended; log in again"})


async def my_tokens(request: web.Request) -> web.Response:
    user = await existing(request, current_user(request).name)
    return json_response({"items": tokens_json(user)})


async def create_my_token(request: web.Request) -> web.Response:
    return await new_token(request, current_user(request).name)


async def revoke_my_token(request: web.Request) -> web.Response:
    return await revoke(request, current_user(request).name)


TAGS = ("users",)
USER = "/api/v1/users/{name}"
ROUTES = [
    Route("GET", "/api/v1/users", list_users, MANAGE, "All user accounts", tags=TAGS),
    Route("POST", "/api/v1/users", create_user, MANAGE, "Create a user", body=NewUser,
          tags=TAGS),
    Route("GET", USER, get_user, MANAGE, "One user account", tags=TAGS),
    Route("PATCH", USER, change_user, MANAGE,
          "Change a user's role and/or disable or enable it (never the last enabled admin)",
          body=UserChange, tags=TAGS),
    Route("POST", USER + "/unlock", unlock_user, MANAGE,
          "Lift a user's login lockout after repeated failed logins (recorded as"
          " User.Unlocked, with the optional reason)", body=Unlock, body_optional=True,
          tags=TAGS),
    Route("POST", USER + "/password", reset_password, MANAGE,
          "Set a user's password (ends the user's sessions)", body=PasswordReset, tags=TAGS),
    Route("GET", USER + "/tokens", user_tokens, MANAGE, "A user's API tokens (never values)",
          tags=TAGS),
    Route("POST", USER + "/tokens", create_user_token, MANAGE,
          "Create an API token for a user; its value is in this answer only", body=NewToken,
          tags=TAGS),
    Route("DELETE", USER + "/tokens/{token_id}", revoke_user_token, MANAGE,
          "Revoke a user's API token", tags=TAGS),
    Route("GET", "/api/v1/account", my_account, AUTHENTICATED,
          "Your account: name, role and API tokens", tags=("account",)),
    Route("POST", "/api/v1/account/password", change_my_password, AUTHENTICATED,
          "Change your password (needs the current one; ends your sessions)",
          body=PasswordChange, tags=("account",)),
    Route("GET", "/api/v1/account/tokens", my_tokens, AUTHENTICATED, "Your API tokens",
          tags=("account",)),
    Route("POST", "/api/v1/account/tokens", create_my_token, AUTHENTICATED,
          "Create an API token; its value is in this answer only", body=NewToken,
          tags=("account",)),
    Route("DELETE", "/api/v1/account/tokens/{token_id}", revoke_my_token, AUTHENTICATED,
          "Revoke one of your API tokens", tags=("account",)),
]
