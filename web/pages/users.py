"""User pages: ``/users`` for admins (list, create, role, disable/enable, unlock, reset password,
API tokens) and ``/account`` for everyone (own password, own API tokens).

Plain forms (CSRF field) that post, then redirect to the page with a fixed message; errors
re-render the form with field messages (422). A new token's value is rendered once, uncached.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

from aiohttp import web

from router.application.commands import CommandError
from router.application.users import check_name
from router.domain.users import LEAST_PRIVILEGED_ROLE, ROLES, user_id
from web.api.common import ApiError, run_command
from web.api.users import apply_change, existing, verify_current, with_password
from web.auth import actor_of, current_user, set_session_cookie
from web.keys import ISSUER_KEY, ROUTER_KEY
from web.render import render
from web.routes import Route
from web.security import AUTHENTICATED

MANAGE = "users.manage"
DONE = {
    "created": "User created.",
    "role": "Role changed.",
    "disabled": "User disabled: it cannot log in, and its sessions and API tokens stop working.",
    "enabled": "User enabled.",
    "password": "Password changed; the sessions that used the old one have ended.",
    "revoked": "API token revoked.",
    "unlocked": "Login lockout lifted: the user can log in again.",
}
Form = dict[str, str]


async def read_form(request: web.Request) -> Form:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str) and k != "csrf_token"}


def done_message(request: web.Request) -> str:
    return DONE.get(request.query.get("done", ""), "")


def see_other(path: str, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{path}?done={done}")


def user_path(name: str) -> str:
    return "/users/" + quote(name, safe="")


def new_passwords(form: Form, field: str = "password") -> str:
    """The new password of a form, once both copies agree (else ApiError 422)."""
    password = form.get(field, "")
    if password != form.get("confirm", ""):
        raise ApiError(422, "the two passwords differ", fields={"confirm": "does not match"})
    return password


def failed(exc: ApiError) -> dict[str, Any]:
    return {"errors": exc.fields or {"_": exc.message}, "flash": exc.message,
            "flash_kind": "error", "status": exc.status if exc.status != 404 else 422}


# --- admins: /users -----------------------------------------------------------------------
async def users_page(request: web.Request, form: Form | None = None, status: int = 200,
                     **values: Any) -> web.Response:
    accounts = request.app[ROUTER_KEY].users
    users = await asyncio.to_thread(accounts.all)
    locked = await asyncio.to_thread(locked_times, accounts, [u.name for u in users])
    values.setdefault("flash", done_message(request))
    values.setdefault("flash_kind", "ok")
    return render(request, "users.html", status=status, users=users, roles=ROLES,
                  form=form or {"role": LEAST_PRIVILEGED_ROLE}, locked=locked,
                  errors=values.pop("errors", {}), **values)


def locked_times(users: Any, names: list[str]) -> dict[str, str]:
    """``HH:MM`` (UTC) at which each locked-out user's lockout ends, by name."""
    out = {}
    for name in names:
        until = users.locked_until(name)
        if until is not None:
            out[name] = time.strftime("%H:%M", time.gmtime(until))
    return out


async def list_users(request: web.Request) -> web.Response:
    return await users_page(request)


async def create_user(request: web.Request) -> web.Response:
    form = await read_form(request)
    name, role = form.get("username", "").strip(), form.get("role", "")
    users = request.app[ROUTER_KEY].users
    try:
        try:
            check_name(name)
        except CommandError as exc:
            raise ApiError(422, str(exc), fields={"username": str(exc)}) from None
        if role not in ROLES:
            raise ApiError(422, "choose a role", fields={"role": "choose a role"})
        if await asyncio.to_thread(users.fresh, name) is not None:
            raise ApiError(409, f"user {name!r} already exists",
                           fields={"username": "already exists"})
        await with_password("password", users.add, name, role, new_passwords(form),
                            actor_of(request))
    except ApiError as exc:
        form.pop("password", None)
        form.pop("confirm", None)
        return await users_page(request, form, **failed(exc))
    raise see_other(user_path(name), "created")


async def user_page(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    try:
        user = await existing(request, request.match_info["name"])
    except ApiError:
        raise web.HTTPNotFound(text="no such user") from None
    values.setdefault("flash", done_message(request))
    values.setdefault("flash_kind", "ok")
    values.setdefault("new_token", None)
    locked = await asyncio.to_thread(locked_times, request.app[ROUTER_KEY].users, [user.name])
    response = render(request, "user_edit.html", status=status, account=user, roles=ROLES,
                      locked_until=locked.get(user.name, ""),
                      versions_url=f"/audit/versions?object={user_id(user.name)}",
                      errors=values.pop("errors", {}), tokens_url=user_path(user.name)
                      + "/tokens", is_self=user.name == current_user(request).name, **values)
    if values.get("new_token"):
        response.headers["Cache-Control"] = "no-store"
    return response


async def show_user(request: web.Request) -> web.Response:
    return await user_page(request)


async def on_user(request: web.Request, action: str) -> web.Response:
    """Role, state, password or a new token of one user, from its page's forms."""
    form = await read_form(request)
    try:
        name = (await existing(request, request.match_info["name"])).name
    except ApiError:
        raise web.HTTPNotFound(text="no such user") from None
    try:
        if action == "token":
            return await user_page(request, new_token=await make_token(request, name, form))
        done = await change_user(request, name, action, form)
    except ApiError as exc:
        return await user_page(request, **failed(exc))
    me = current_user(request).name.lower() == name.lower()
    if me and action == "role" and form.get("role") != "admin":
        raise see_other("/account", "role")  # no longer allowed on /users
    raise see_other(user_path(name), done)


async def change_user(request: web.Request, name: str, action: str, form: Form) -> str:
    if action == "role":
        if form.get("role") not in ROLES:
            raise ApiError(422, "choose a role", fields={"role": "choose a role"})
        await apply_change(request, name, form["role"], None)
        return "role"
    if action == "unlock":
        await run_command(request.app[ROUTER_KEY].users.unlock, name, actor_of(request),
                          form.get("reason", ""))
        return "unlocked"
    if action == "disabled":
        disabled = form.get("disabled") == "1"
        await apply_change(request, name, None, disabled)
        return "disabled" if disabled else "enabled"
    await with_password("password", request.app[ROUTER_KEY].users.set_password, name,
                        new_passwords(form), actor_of(request))
    return "password"


async def set_role(request: web.Request) -> web.Response:
    return await on_user(request, "role")


async def set_disabled(request: web.Request) -> web.Response:
    return await on_user(request, "disabled")


async def unlock(request: web.Request) -> web.Response:
    return await on_user(request, "unlock")


async def set_password(request: web.Request) -> web.Response:
    return await on_user(request, "password")


async def add_token(request: web.Request) -> web.Response:
    return await on_user(request, "token")


async def revoke_user_token(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await run_command(request.app[ROUTER_KEY].users.revoke_token, name,
                          request.match_info["token_id"], actor_of(request))
    except ApiError as exc:
        return await user_page(request, **failed(exc))
    raise see_other(user_path(name), "revoked")


async def make_token(request: web.Request, name: str, form: Form) -> dict[str, str]:
    label = form.get("label", "").strip()
    if not label or len(label) > 100:
        raise ApiError(422, "give the token a label (up to 100 characters)",
                       fields={"label": "1 to 100 characters"})
    token = await run_command(request.app[ROUTER_KEY].users.create_token, name, label,
                              actor_of(request))
    return {"id": token.token_id, "label": label, "value": token.value}


# --- anyone: /account ---------------------------------------------------------------------
async def account_page(request: web.Request, status: int = 200, **values: Any
                       ) -> web.Response:
    user = await existing(request, current_user(request).name)
    values.setdefault("flash", done_message(request))
    values.setdefault("flash_kind", "ok")
    values.setdefault("new_token", None)
    response = render(request, "account.html", status=status, account=user,
                      errors=values.pop("errors", {}), tokens_url="/account/tokens", **values)
    if values.get("new_token"):
        response.headers["Cache-Control"] = "no-store"
    return response


async def show_account(request: web.Request) -> web.Response:
    return await account_page(request)


async def change_my_password(request: web.Request) -> web.Response:
    form = await read_form(request)
    name = current_user(request).name
    try:
        password = new_passwords(form, "new_password")
        await verify_current(request, name, form.get("current_password", ""))
        await with_password("new_password", request.app[ROUTER_KEY].users.set_password, name,
                            password, actor_of(request))
    except ApiError as exc:
        return await account_page(request, **failed(exc))
    response = see_other("/account", "password")
    await renew_session(request, response)
    raise response


async def renew_session(request: web.Request, response: web.StreamResponse) -> None:
    """After the user's own password change: end this session and start one that carries
    the new credentials, so the person who changed it stays logged in."""
    router = request.app[ROUTER_KEY]
    issuer = request.app[ISSUER_KEY]
    principal = current_user(request)
    actor = actor_of(request)
    if principal.jti:
        await asyncio.to_thread(router.sessions.end, principal.jti, actor, "password changed")
    user = await existing(request, principal.name)
    jti = await asyncio.to_thread(router.sessions.start, actor, "cookie",
                                  time.time() + issuer.max_age)
    set_session_cookie(request, response,
                       issuer.issue(user.name, jti, "cookie", user.credentials_tag))


async def add_my_token(request: web.Request) -> web.Response:
    form = await read_form(request)
    try:
        token = await make_token(request, current_user(request).name, form)
    except ApiError as exc:
        return await account_page(request, **failed(exc))
    return await account_page(request, new_token=token)


async def revoke_my_token(request: web.Request) -> web.Response:
    try:
        await run_command(request.app[ROUTER_KEY].users.revoke_token,
                          current_user(request).name, request.match_info["token_id"],
                          actor_of(request))
    except ApiError as exc:
        return await account_page(request, **failed(exc))
    raise see_other("/account", "revoked")


USER = "/users/{name}"
ROUTES = [
    Route("GET", "/users", list_users, MANAGE, "Users"),
    Route("POST", "/users", create_user, MANAGE, "Create a user"),
    Route("GET", USER, show_user, MANAGE, "One user"),
    Route("POST", USER + "/role", set_role, MANAGE, "Change a user's role"),
    Route("POST", USER + "/disabled", set_disabled, MANAGE, "Disable or enable a user"),
    Route("POST", USER + "/unlock", unlock, MANAGE, "Lift a user's login lockout"),
    Route("POST", USER + "/password", set_password, MANAGE, "Set a user's password"),
    Route("POST", USER + "/tokens", add_token, MANAGE, "Create an API token for a user"),
    Route("POST", USER + "/tokens/{token_id}/revoke", revoke_user_token, MANAGE,
          "Revoke a user's API token"),
    Route("GET", "/account", show_account, AUTHENTICATED, "Your account"),
    Route("POST", "/account/password", change_my_password, AUTHENTICATED,
          "Change your password"),
    Route("POST", "/account/tokens", add_my_token, AUTHENTICATED, "Create an API token"),
    Route("POST", "/account/tokens/{token_id}/revoke", revoke_my_token, AUTHENTICATED,
          "Revoke one of your API tokens"),
]
