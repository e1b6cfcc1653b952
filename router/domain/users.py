"""The User aggregate of the admin log: accounts, roles, password hashes and API tokens.

Ids derive from the user name, so ``user add`` of an existing name is detected, not doubled.
Password and token values never enter an event; only their bcrypt / SHA-256 hashes do.
Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from router.domain.admin import ADMIN_NAMESPACE

ROLES = ("admin", "operator", "radiologist", "auditor")
# The role with the fewest permissions (web/security.py ROLE_PERMISSIONS; a test checks):
# what a new account starts with unless a role is chosen.
LEAST_PRIVILEGED_ROLE = "auditor"


def user_id(name: str) -> UUID:
    return uuid5(ADMIN_NAMESPACE, f"user/{name.lower()}")


class User(Aggregate):
    """A person (or script) who logs in to the web UI and API."""

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return user_id(name)

    @event("Created")
    def __init__(
        self, name: str, *, actor: str, source_ip: str, correlation_id: str, role: str,
        password_hash: str,
    ) -> None:
        self.name = name
        self.role = role
        self.password_hash = password_hash
        self.disabled = False
        self.times_disabled = 0  # part of the session tag: re-enabling revives no old session
        self.tokens: dict[str, dict[str, Any]] = {}
        self.unlocked_at = 0.0

    @event("RoleChanged")
    def change_role(self, *, actor: str, source_ip: str, correlation_id: str, role: str) -> None:
        """The user's role from now on."""
        self.role = role

    @event("PasswordChanged")
    def change_password(
        self, *, actor: str, source_ip: str, correlation_id: str, password_hash: str
    ) -> None:
        """A new bcrypt hash; sessions issued before this are no longer accepted."""
        self.password_hash = password_hash

    @event("Disabled")
    def disable(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """The user can no longer log in; sessions and API tokens stop working."""
        self.disabled = True
        self.times_disabled += 1

    @event("Enabled")
    def enable(self, *, actor: str, source_ip: str, correlation_id: str) -> None:
        """The user can log in again."""
        self.disabled = False

    @event("ApiTokenCreated")
    def add_token(
        self, *, actor: str, source_ip: str, correlation_id: str, token_id: str, label: str,
        token_hash: str,
    ) -> None:
        """A personal API token (only its SHA-256 is kept; the value was shown once)."""
        self.tokens[token_id] = {"label": label, "token_hash": token_hash, "revoked": False}

    @event("ApiTokenRevoked")
    def revoke_token(self, *, actor: str, source_ip: str, correlation_id: str,
                     token_id: str) -> None:
        """The token no longer authenticates."""
        self.tokens[token_id]["revoked"] = True

    @event("Unlocked")
    def unlock(self, *, actor: str, source_ip: str, correlation_id: str, at: float,
               reason: str = "") -> None:
        """An admin lifted a login lockout: failures before ``at`` (Unix seconds) no longer
        count, in every process that checks logins. ``reason``: why, as the admin gave it
        (events recorded before it was asked for have none)."""
        self.unlocked_at = at
