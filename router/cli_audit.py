"""``dicom-router audit export``: the audit trail (or part of it) as CSV or JSON, read from the
audit view after catching it up with the log. The export is itself recorded as an access by
the actor ``cli``. An output file is created readable by its owner only (it holds PHI).

``dicom-router audit verify``: recompute the audit trail's hash chain (projections/
audit_chain.py); exit 1 naming the first broken link, 0 when it is intact.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from router.settings import Settings


def add_parsers(sub: Any) -> None:
    audit = sub.add_parser("audit", help="audit trail (export)")
    asub = audit.add_subparsers(dest="action", required=True)
    export = asub.add_parser("export", help="write matching audit rows, oldest first")
    export.add_argument("--from", dest="since", metavar="ISO",
                        help="from this time (ISO 8601, UTC unless a zone is given)")
    export.add_argument("--to", dest="until", metavar="ISO",
                        help="up to this time (a bare date covers the whole day)")
    export.add_argument("--study", help="StudyInstanceUID")
    export.add_argument("--patient", help="patient ID")
    export.add_argument("--user", help="who acted (user name, AE title, config, system...)")
    export.add_argument("--action", help="event or access action; a trailing * is a prefix;"
                        " several, comma-separated, match any")
    export.add_argument("--outcome", choices=["success", "failure", "denied", "not_found"])
    export.add_argument("--format", choices=["csv", "json"], default="csv")
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")
    verify = asub.add_parser("verify", help="check the audit trail's hash chain; exit 1 "
                             "naming the first broken link")
    verify.add_argument("--from", dest="since", metavar="ISO",
                        help="check the records from this time (ISO 8601, UTC unless a zone "
                        "is given)")
    verify.add_argument("--to", dest="until", metavar="ISO",
                        help="up to this time (a bare date covers the whole day)")


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "verify":
        return cmd_verify(settings, args)
    return cmd_export(settings, args)


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Read the audit view as it is (nothing is written) and check its chain."""
    from projections.audit_chain import verify
    from projections.audit_queries import iso, parse_time
    from projections.db import open_views

    try:
        since = parse_time(args.since) if args.since else float("-inf")
    except ValueError:
        raise ValueError(f"audit verify: --from {args.since!r} is not an ISO 8601 time") from None
    try:
        until = parse_time(args.until, end_of_day=True) if args.until else float("inf")
    except ValueError:
        raise ValueError(f"audit verify: --to {args.until!r} is not an ISO 8601 time") from None
    db = open_views(settings.database_url, "audit")
    try:
        verdict = verify(db, since, until)
    except Exception as exc:  # no audit view yet, or the database is unreachable
        raise ValueError(f"audit verify: cannot read the audit view ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); is the database right, and was it migrated?"
                         ) from None
    finally:
        db.close()
    broken = verdict.broken
    where = "" if broken is None else f" broken={broken.application}/{broken.position}"
    _record_verify(settings, "success" if broken is None else "failure",
                   f"checked={verdict.checked}{where} from={args.since or ''} "
                   f"to={args.until or ''} os_user={_os_user()}")
    if broken is None:
        print(f"audit trail intact: {verdict.checked} records checked; head hash {verdict.head}")
        return 0
    print(f"audit trail BROKEN at record {broken.application}/{broken.position} "
          f"(time {iso(broken.occurred_at) or 'unknown'}, link {broken.seq}): {broken.problem}; "
          f"{verdict.checked} records before it are intact", file=sys.stderr)
    return 1


def _record_verify(settings: Settings, outcome: str, detail: str) -> None:
    """Checking the audit trail is a use of it: recorded as ``audit.verify`` by ``cli``."""
    from router.application.commands import Actor
    from router.application.sessions import AccessRecord, Sessions
    from router.application.stores import open_stores
    from router.secrets import SecretBox, load_master_key

    stores = open_stores(settings, SecretBox(load_master_key(settings.secret_key,
                                                             settings.data_dir)), role="tool")
    try:
        Sessions(stores).record(Actor("cli"), AccessRecord(
            action="audit.verify", object_type="audit", outcome=outcome, detail=detail))
    finally:
        stores.close()


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from projections.audit_queries import AuditFilter, FilterError
    from router.application.commands import Actor
    from router.application.sessions import AccessRecord
    from router.service import Router

    query = {"from": args.since, "to": args.until, "study": args.study,
             "patient": args.patient, "user": args.user, "action": args.action,
             "outcome": args.outcome}
    try:
        flt = AuditFilter.from_query({k: v for k, v in query.items() if v})
    except FilterError as exc:
        raise ValueError(f"audit export: {exc}") from None
    router = Router.build(settings)
    try:
        router.runner.catch_up()
        flt = flt.up_to(time.time())
        with _output(args.output) as out:
            count = write_export(router.view_db("audit"), flt, args.format, out)
        router.sessions.record(Actor("cli"), AccessRecord(
            action="audit.export", object_type="audit", study_instance_uid=flt.study_uid,
            patient_id=flt.patient_id,
            detail=f"format={args.format} rows={count} os_user={_os_user()} "
                   f"{flt.describe()}".strip()))
    finally:
        for handle in router.views.values():
            handle.db.close()
        router.stores.close()
    if args.output is not None:
        print(f"wrote {count} audit rows to {args.output}", file=sys.stderr)
    return 0


def write_export(db: Any, flt: Any, fmt: str, out: IO[str]) -> int:
    """Write the rows matching ``flt`` to ``out`` as CSV or a JSON array; returns the count."""
    from projections.audit_queries import csv_text, export_pages, json_items

    count = 0
    out.write(csv_text([], header=True) if fmt == "csv" else "[\n")
    for rows in export_pages(db, flt):
        out.write(csv_text(rows) if fmt == "csv" else json_items(rows, first=count == 0))
        count += len(rows)
    if fmt == "json":
        out.write("\n]\n")
    return count


@contextmanager
def _output(path: Path | None) -> Any:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8", newline="") as handle:
        yield handle


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
