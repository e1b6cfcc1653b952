"""``dicom-router reidentify``: the originals behind a pseudonym of a de-identification project,
read from the re-identification map in the delivery log. Every lookup, found or not, is
recorded as an access by the actor ``cli`` with the operating-system user and the reason.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from router.settings import Settings


def add_parsers(sub: Any) -> None:
    reid = sub.add_parser("reidentify", help="look up the originals behind a pseudonym "
                                             "(recorded in the audit trail)")
    reid.add_argument("project", help="the de-identification project (a transform's project)")
    reid.add_argument("pseudonym", help="a pseudonymous PatientID, or Study Instance UID "
                                        "with --kind study")
    reid.add_argument("--kind", choices=["patient", "study"], default="patient")
    reid.add_argument("--reason", required=True,
                      help="why (recorded with the lookup in the audit trail)")


def cmd_reidentify(settings: Settings, args: argparse.Namespace) -> int:
    from router.application.commands import Actor, NotFoundError
    from router.application.reidentification import lookup_record
    from router.service import Router

    reason = args.reason.strip()
    if not reason:
        raise ValueError("reidentify: --reason must not be empty")
    router = Router.build(settings)
    found: dict[str, str] | None = None
    try:
        try:
            found = router.reidentification.lookup(args.project, args.kind, args.pseudonym)
        except NotFoundError as exc:
            print(f"dicom-router: {exc}", file=sys.stderr)
        finally:
            record = lookup_record(args.project, args.kind, args.pseudonym, found,
                                   reason=f"{reason} (os_user={_os_user()})")
            router.sessions.record(Actor("cli"), record)
    finally:
        router.stores.close()
    if found is None:
        return 1
    print(json.dumps(found, indent=2, sort_keys=True))
    return 0


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
