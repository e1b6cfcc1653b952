"""Operator commands on a running (or stopped) router's store: list, requeue and cancel
deliveries (one job's, or every one matching a filter), pause and resume destinations. Each
is recorded with the operator as actor.
"""

from __future__ import annotations

import argparse
import getpass
import re
from typing import TYPE_CHECKING, Any

from projections import jobs_queries
from router.domain.delivery_states import ALIASES, DELIVERY_STATES, shown, stored
from router.settings import Settings

if TYPE_CHECKING:  # the parser imports no write side (see OPERATIONS)
    from projections.db import ViewDatabase
    from router.service import Router

UID = re.compile(r"^[0-9.]{1,64}$")
# router.application.bulk.OPERATIONS, spelt out so that the parser imports no write side
# (tests/integration/test_bulk_actions.py::test_cli_statuses_are_the_application_s checks
# they agree).
OPERATIONS = {"requeue": ("retrying", "dead", "cancelled"),
              "cancel": ("pending", "retrying", "dead")}


def add_parsers(sub: Any) -> None:
    deliveries = sub.add_parser("deliveries", help="list, requeue or cancel deliveries")
    dsub = deliveries.add_subparsers(dest="action", required=True)
    listing = dsub.add_parser("list", help="deliveries from the jobs view")
    listing.add_argument("--status", choices=[*DELIVERY_STATES, *ALIASES],
                         help="failed (dead-lettered), retrying, queued, held, delivered or"
                              " cancelled; dead and pending are accepted for failed and queued")
    listing.add_argument("--destination")
    listing.add_argument("--limit", type=int, default=50)
    for action in ("requeue", "cancel"):
        p = dsub.add_parser(action, help=f"{action} the deliveries of a job, or every "
                            "delivery matching --destination/--status/--since/--until/--study")
        p.add_argument("job_id", nargs="?", help="one job's deliveries (else: the filter)")
        p.add_argument("--destination", help="only this destination")
        p.add_argument("--status", choices=[*(shown(s) for s in OPERATIONS[action]),
                                            *(a for a, s in ALIASES.items()
                                              if stored(s) in OPERATIONS[action])],
                       help="only deliveries in this status (default: any of these)")
        p.add_argument("--since", help="received at or after (YYYY-MM-DD or ISO 8601, UTC)")
        p.add_argument("--until", help="received before (a date: up to the end of that day)")
        p.add_argument("--study", help="only this Study Instance UID")
        p.add_argument("--all", action="store_true",
                       help="every delivery (required when no other filter is given)")
        p.add_argument("--reason", default="", help="why (recorded with the action)")
        p.add_argument("--dry-run", action="store_true",
                       help="print how many deliveries match; change nothing")
    destinations = sub.add_parser("destinations", help="pause or resume a destination")
    tsub = destinations.add_subparsers(dest="action", required=True)
    for action in ("pause", "resume"):
        tsub.add_parser(action).add_argument("name")


def _actor() -> Any:
    from router.application.commands import Actor

    return Actor(f"cli:{getpass.getuser()}")


def cmd_deliveries(settings: Settings, args: argparse.Namespace) -> int:
    from router.service import Router

    router = Router.build(settings)
    try:
        router.runner.catch_up()
        db = router.view_db("jobs")
        if args.action == "list":
            return _list(db, args)
        if args.job_id is None:
            return _bulk(router, db, args)
        rows = jobs_queries.deliveries_of_job(db, args.job_id)
        targets = [r for r in rows if args.destination in (None, r["destination"])]
        if not targets:
            raise ValueError(f"no delivery of job {args.job_id}"
                             + (f" to {args.destination!r}" if args.destination else ""))
        for row in targets:
            if args.action == "requeue" and row["status"] in ("retrying", "dead", "cancelled"):
                router.commands.requeue(args.job_id, row["destination"], _actor(),
                                        args.reason)
                print(f"requeued {args.job_id} -> {row['destination']}")
            elif args.action == "cancel" and row["status"] in ("pending", "retrying", "dead"):
                router.commands.cancel(args.job_id, row["destination"], _actor(), args.reason)
                print(f"cancelled {args.job_id} -> {row['destination']}")
            else:
                print(f"left {args.job_id} -> {row['destination']} ({shown(row['status'])})")
        return 0
    finally:
        router.stores.close()


def _bulk(router: Router, db: ViewDatabase, args: argparse.Namespace) -> int:
    """Every delivery matching the filter: one recorded action, then one event each."""
    from router.application.bulk import BulkDeliveries, DeliveryFilter, parse_instant

    if args.study is not None and not UID.match(args.study):
        raise ValueError("--study: a DICOM UID is digits and dots, at most 64 characters")
    if args.destination is not None and args.destination not in (
            router.admin.refresh().destinations):
        raise ValueError(f"--destination: no destination named {args.destination!r}")
    flt = DeliveryFilter(
        destination=args.destination, status=args.status,
        since=parse_instant(args.since, "--since") if args.since else None,
        until=parse_instant(args.until, "--until", end_of_day=True) if args.until else None,
        study_uid=args.study, everything=args.all,
        given={"destination": args.destination, "status": args.status, "since": args.since,
               "until": args.until, "study_uid": args.study})
    bulk = BulkDeliveries(router.commands, router.stores, db)
    if args.dry_run:
        print(f"{bulk.count(flt, args.action)} deliveries match; nothing was changed "
              "(dry run)")
        return 0
    run = bulk.run(flt, args.action, args.reason, _actor())
    done = "requeued" if args.action == "requeue" else "cancelled"
    print(f"{done} {run.affected} of {run.matched} matching deliveries"
          + (f"; {run.skipped} changed meanwhile and were left alone" if run.skipped else "")
          + f" (correlation id {run.actor.correlation_id})")
    return 0


def _list(db: Any, args: argparse.Namespace) -> int:
    status = stored(args.status) if args.status else None
    for row in jobs_queries.recent_deliveries(db, status, args.destination, args.limit):
        print(f"{row['job_id']}  {row['destination']:16} {shown(row['status']):9} "
              f"attempts={row['attempts']} {row['last_error'] or ''}")
    return 0


def cmd_destinations(settings: Settings, args: argparse.Namespace) -> int:
    from router.service import Router

    router = Router.build(settings)
    try:
        router.commands.pause_destination(args.name, _actor(), paused=args.action == "pause")
        print(f"{args.action}d {args.name}")
        return 0
    finally:
        router.stores.close()
