"""``dicom-router user add|passwd|unlock|list``: user accounts from the command line.

The password is asked twice at an interactive prompt, or read as one line from stdin when
stdin is not a terminal (``echo "$PW" | dicom-router user add ...``). Changes are recorded with
the actor ``cli:<login name>``; a running router sees them within a second.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import IO, Any

from router.application.commands import Actor, CommandError
from router.domain.users import ROLES
from router.settings import Settings


def add_parsers(sub: Any) -> None:
    user = sub.add_parser("user", help="user accounts (add, passwd, unlock, list)")
    usub = user.add_subparsers(dest="action", required=True)
    add = usub.add_parser("add", help="create a user; the password is prompted for or read "
                                      "from stdin")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    passwd = usub.add_parser("passwd", help="set a user's password (prompted for or read "
                                            "from stdin); ends the user's sessions")
    passwd.add_argument("name")
    unlock = usub.add_parser("unlock", help="lift a user's login lockout after repeated "
                                            "failed logins (a running router applies it "
                                            "at the user's next login)")
    unlock.add_argument("name")
    unlock.add_argument("--reason", default="", help="why (recorded with the unlock)")
    usub.add_parser("list", help="user names, roles and status (never passwords)")


def read_password(stdin: IO[str], prompt: Callable[[str], str] = getpass.getpass) -> str:
    """The new password: asked twice on a terminal, else the first line of stdin."""
    if stdin.isatty():
        try:
            first = prompt("New password: ")
            second = prompt("Repeat the password: ")
        except (EOFError, KeyboardInterrupt):
            raise CommandError("no password given") from None
        if first != second:
            raise CommandError("the two passwords differ; nothing was changed")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no password given (type it at the prompt or pipe one line "
                           "to stdin)")
    return password


def _actor() -> Actor:
    return Actor(f"cli:{getpass.getuser()}")


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    from router.application.admin_state import AdminState
    from router.application.stores import open_stores
    from router.application.users import Users
    from router.secrets import SecretBox, load_master_key

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stores = open_stores(settings, SecretBox(load_master_key(settings.secret_key,
                                                             settings.data_dir)), role="tool")
    try:
        users = Users(stores, AdminState(stores.admin), settings.web)
        if args.action == "list":
            return _list(users)
        if args.action == "unlock":
            users.unlock(args.name, _actor(), args.reason)
            print(f"unlocked {args.name!r}: failed logins before now no longer count")
            return 0
        if args.action == "add":
            _require_absent(users, args.name)
            users.add(args.name, args.role, read_password(sys.stdin), _actor())
            print(f"created user {args.name!r} with role {args.role}")
            _warn_without_admin(users)
        else:
            if users.fresh(args.name) is None:
                raise CommandError(f"user {args.name!r} does not exist")
            users.set_password(args.name, read_password(sys.stdin), _actor())
            print(f"password of {args.name!r} changed; its sessions have ended")
        return 0
    finally:
        stores.close()


def _require_absent(users: Any, name: str) -> None:
    # Checked before asking for a password, so nobody types one for nothing.
    from router.application.users import check_name

    check_name(name)
    if users.fresh(name) is not None:
        raise CommandError(f"user {name!r} already exists (use 'user passwd' to change its "
                           "password)")


def _list(users: Any) -> int:
    accounts = users.all()
    if not accounts:
        print("no users yet (the first start of 'serve' creates 'admin')")
    for user in accounts:
        active = sum(1 for t in user.tokens.values() if not t["revoked"])
        status = "disabled" if user.disabled else "enabled"
        print(f"{user.name:24} {user.role:12} {status:9} api tokens: {active}")
    return 0


def _warn_without_admin(users: Any) -> None:
    if not any(u.role == "admin" and not u.disabled for u in users.all()):
        print("note: there is no enabled admin yet; 'serve' creates 'admin' only when no user "
              "exists, so add one with 'user add NAME --role admin'", file=sys.stderr)
