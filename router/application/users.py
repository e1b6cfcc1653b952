"""User accounts: add, change role or password, disable, API tokens, and password logins with
lockout. The account state is read from AdminState (it follows the admin log); logins,
failures and sessions go to the access log (see sessions.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import bcrypt
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from router.application.admin_state import AdminState, UserState
from router.application.commands import Actor, CommandError, NotFoundError
from router.application.stores import EventStores
from router.domain.access import LoginFailure
from router.domain.users import ROLES, User, user_id
from router.settings import WebSettings

BCRYPT_ROUNDS = 12  # about 0.3 s per hash on our 2-core machines
BCRYPT_MAX_BYTES = 72
MAX_REASON = 500  # characters of an admin's reason (as the bulk actions' reason field)
TOKEN_PREFIX = "drt_"  # noqa: S105 - a public prefix, not a secret
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_dummy_lock = threading.Lock()
_dummy_hash: str | None = None
_DUMMY_ROUNDS = 12
_DUMMY_HASH = "$2b$12$JXLVuGS0cD8zhy5uKRJxquL774LVUdRC3O4T30xCz1EvQLecI3oiK"


class PasswordError(CommandError):
    """The password does not meet the policy; the message says what to change."""


class LoginRefused(Exception):
    """A login was refused. ``reason`` is recorded; users see one generic message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_password(password: str, min_length: int) -> None:
    """Raise PasswordError unless the password can be hashed with bcrypt as it is."""
    if len(password) < min_length:
        raise PasswordError(f"password must be at least {min_length} characters long")
    if len(password.encode("utf-8")) > BCRYPT_MAX_BYTES:
        raise PasswordError(
            f"password is longer than {BCRYPT_MAX_BYTES} bytes in UTF-8 (bcrypt's limit); "
            "choose a shorter one")
    if password.strip() != password or not password.isprintable():
        raise PasswordError("password must not start or end with spaces or hold control "
                            "characters")


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise CommandError("user name: 1 to 64 characters, letters, digits and . _ @ - "
                           "(starting with a letter or digit)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise CommandError(f"role must be one of: {', '.join(ROLES)}")
    return role


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def password_matches(password: str, password_hash: str) -> bool:
    data = password.encode("utf-8")
    if len(data) > BCRYPT_MAX_BYTES:
        return False  # bcrypt would truncate (or refuse); such a password was never accepted
    return bcrypt.checkpw(data, password_hash.encode())


def dummy_hash() -> str:
    """A hash as costly to check as a real one (BCRYPT_ROUNDS), for logins that have no real
    one to check (unknown user, locked name): a wrong password and an unknown user then take
    the same time. A constant at the default cost: making one costs as much as a login (0.3 s
    of CPU here), which the web server used to spend in the background as it started, in the
    middle of the first associations it served. Its password is a random value nobody kept,
    and the paths that check it refuse whatever the check says. Other costs (tests lower
    BCRYPT_ROUNDS) make one once per process."""
    global _dummy_hash
    if BCRYPT_ROUNDS == _DUMMY_ROUNDS:
        return _DUMMY_HASH
    with _dummy_lock:
        if _dummy_hash is None or not _dummy_hash.startswith(f"$2b${BCRYPT_ROUNDS:02d}$"):
            _dummy_hash = bcrypt.hashpw(b"not a password",
                                        bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
        return _dummy_hash


def token_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class NewToken:
    token_id: str
    value: str  # shown once, never stored


class Lockout:
    """Failed logins per user name within the lockout window (in memory, per process)."""

    def __init__(self, max_failures: int, window: float) -> None:
        self._max = max_failures
        self._window = window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures[key]
        while times and now - times[0] > self._window:
            times.popleft()
        return times

    def locked(self, name: str, now: float | None = None) -> bool:
        return self.locked_until(name, now) is not None

    def locked_until(self, name: str, now: float | None = None) -> float | None:
        """When the lockout of ``name`` ends (Unix seconds) if it is locked now, else None."""
        with self._lock:
            times = self._recent(name.lower(), now or time.time())
            if len(times) < self._max:
                return None
            return times[-self._max] + self._window

    def forget_before(self, name: str, moment: float) -> None:
        """Failures before ``moment`` no longer count (an admin unlocked the account)."""
        with self._lock:
            times = self._failures.get(name.lower())
            while times and times[0] < moment:
                times.popleft()

    def failed(self, name: str, now: float | None = None) -> None:
        with self._lock:
            now = now or time.time()
            self._recent(name.lower(), now).append(now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name.lower(), None)


class Users:
    """Commands on user accounts and the checks behind logins and API tokens."""

    def __init__(self, stores: EventStores, admin_state: AdminState, web: WebSettings) -> None:
        self._stores = stores
        self._admin = admin_state
        self._web = web
        self.lockout = Lockout(web.max_login_failures, web.lockout_time)

    # --- reads ------------------------------------------------------------------------
    def get(self, name: str) -> UserState | None:
        return self._admin.snapshot().users.get(name.lower())

    def fresh(self, name: str) -> UserState | None:
        """Like get, after reading admin events recorded since the last refresh."""
        return self._admin.refresh().users.get(name.lower())

    def all(self) -> list[UserState]:
        return sorted(self._admin.refresh().users.values(), key=lambda u: u.name.lower())

    # --- commands ---------------------------------------------------------------------
    def add(self, name: str, role: str, password: str, actor: Actor) -> None:
        check_name(name)
        check_role(role)
        check_password(password, self._web.min_password_length)
        if self._load(name) is not None:
            raise CommandError(f"user {name!r} already exists")
        self._save(User(name, **actor.ctx(), role=role, password_hash=hash_password(password)))

    def set_password(self, name: str, password: str, actor: Actor) -> None:
        check_password(password, self._web.min_password_length)
        user = self._require(name)
        user.change_password(**actor.ctx(), password_hash=hash_password(password))
        self._save(user)

    def set_role(self, name: str, role: str, actor: Actor) -> None:
        check_role(role)
        user = self._require(name)
        if user.role != role:
            self._guard_last_admin(user, f"change the role of {name!r}")
            user.change_role(**actor.ctx(), role=role)
            self._save(user)

    def set_disabled(self, name: str, disabled: bool, actor: Actor) -> None:
        user = self._require(name)
        if user.disabled != disabled:
            if disabled:
                self._guard_last_admin(user, f"disable {name!r}")
                user.disable(**actor.ctx())
            else:
                user.enable(**actor.ctx())
            self._save(user)

    def create_token(self, name: str, label: str, actor: Actor) -> NewToken:
        user = self._require(name)
        token_id = secrets.token_hex(8)
        value = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        user.add_token(**actor.ctx(), token_id=token_id, label=label[:100],
                       token_hash=token_hash(value))
        self._save(user)
        return NewToken(token_id, value)

    def revoke_token(self, name: str, token_id: str, actor: Actor) -> None:
        user = self._require(name)
        if token_id not in user.tokens:
            raise NotFoundError(f"token {token_id!r} of user {name!r} does not exist")
        if not user.tokens[token_id]["revoked"]:
            user.revoke_token(**actor.ctx(), token_id=token_id)
            self._save(user)

    def ensure_first_admin(self, password: str | None) -> str | None:
        """Create the user ``admin`` when there is no user at all.

        Returns the generated password (to be printed once) when none was configured.
        """
        if self._admin.refresh().users:
            return None
        generated = None
        if not password:
            generated = password = secrets.token_urlsafe(18)
        try:
            self.add("admin", "admin", password, Actor("system"))
        except (IntegrityError, CommandError):
            # Another node starting on the same database made it a moment ago (the user's id
            # is its name's): that one's password stands, and that node printed it if made.
            self._admin.refresh()
            return None
        return generated

    def unlock(self, name: str, actor: Actor, reason: str = "") -> None:
        """Lift a login lockout, with the admin's reason (recorded even when this process saw
        none: the process that checks logins applies it when it reads the event)."""
        reason = reason.strip()
        if len(reason) > MAX_REASON:
            raise CommandError(f"reason: at most {MAX_REASON} characters")
        user = self._require(name)
        user.unlock(**actor.ctx(), at=time.time(), reason=reason)
        self._save(user)
        self.lockout.forget_before(name, user.unlocked_at)

    def locked_until(self, name: str) -> float | None:
        """When the login lockout of ``name`` ends, if it is locked out now (this process)."""
        user = self.get(name)
        if user is not None and user.unlocked_at:
            self.lockout.forget_before(name, user.unlocked_at)
        return self.lockout.locked_until(name)

    # --- authentication ---------------------------------------------------------------
    def authenticate(self, name: str, password: str, source_ip: str) -> UserState:
        """The user whose password this is; raises LoginRefused (recorded) otherwise."""
        user = self.fresh(name) if name else None
        if user is not None and user.unlocked_at:
            self.lockout.forget_before(name, user.unlocked_at)
        # Exactly one bcrypt check of the same cost on every path (unknown, locked, disabled,
        # wrong password, right password): the answer's timing says nothing about the name.
        if self.lockout.locked(name):
            password_matches(password, dummy_hash())
            self._refuse(name, source_ip, "locked out after repeated failures")
        if user is None:
            password_matches(password, dummy_hash())
            self._refuse(name, source_ip, "unknown user")
        assert user is not None
        if not password_matches(password, user.password_hash):
            self._refuse(name, source_ip, "wrong password")
        if user.disabled:
            self._refuse(name, source_ip, "user disabled")
        self.lockout.succeeded(name)
        return user

    def _refuse(self, name: str, source_ip: str, reason: str) -> None:
        self.lockout.failed(name)
        self.record_login_failure(name, source_ip, reason)
        raise LoginRefused(reason)

    def record_login_failure(self, name: str, source_ip: str, reason: str) -> None:
        # The attempted name is what was typed; cap it so a hostile value stays small.
        attempted = (name or "")[:64]
        self._stores.access.save(LoginFailure(**Actor(attempted or "-", source_ip).ctx(),
                                              reason=reason))

    def user_for_api_token(self, value: str) -> UserState | None:
        """The enabled user owning this unrevoked API token, else None."""
        if not value.startswith(TOKEN_PREFIX):
            return None
        token_id = value[len(TOKEN_PREFIX):].split("_", 1)[0]
        digest = token_hash(value)
        for user in self._admin.snapshot().users.values():
            token = user.tokens.get(token_id)
            if token is not None:
                ok = hmac.compare_digest(token["token_hash"], digest) and not token["revoked"]
                return user if ok and not user.disabled else None
        return None

    # --- helpers ----------------------------------------------------------------------
    def _guard_last_admin(self, user: User, what: str) -> None:
        if user.role != "admin":
            return
        admins = [u for u in self._admin.refresh().users.values()
                  if u.role == "admin" and not u.disabled]
        if len(admins) <= 1:
            raise CommandError(f"cannot {what}: it is the last enabled admin")

    def _load(self, name: str) -> User | None:
        try:
            aggregate: object = self._stores.admin.repository.get(user_id(name))
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, User) else None

    def _require(self, name: str) -> User:
        user = self._load(name)
        if user is None:
            raise NotFoundError(f"user {name!r} does not exist")
        return user

    def _save(self, user: User) -> None:
        self._stores.admin.save(user)
        self._admin.refresh()
