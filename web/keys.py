"""Typed keys of the aiohttp application and of requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from web.ports import RouterPort
    from web.security import Principal, TokenIssuer

ROUTER_KEY: web.AppKey[RouterPort] = web.AppKey("router")
ISSUER_KEY: web.AppKey[TokenIssuer] = web.AppKey("token_issuer")
PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("principal")
