"""Operator commands on a running (or stopped) router's store: list, requeue and cancel
deliveries, pause and resume destinations. Each is recorded with the operator as actor.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from router.domain.delivery_states import ALIASES, DELIVERY_STATES, shown, stored
from router.settings import Settings


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
        p = dsub.add_parser(action, help=f"{action} the deliveries of a job")
        p.add_argument("job_id")
        p.add_argument("--destination", help="only this destination (default: all of the job's)")
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
        db = router.views["jobs"][1]
        if args.action == "list":
            return _list(db, args)
        rows = db.query("SELECT destination, status FROM deliveries WHERE job_id = ?",
                        (args.job_id,))
        targets = [r for r in rows if args.destination in (None, r["destination"])]
        if not targets:
            raise ValueError(f"no delivery of job {args.job_id}"
                             + (f" to {args.destination!r}" if args.destination else ""))
        for row in targets:
            if args.action == "requeue" and row["status"] in ("retrying", "dead", "cancelled"):
                router.commands.requeue(args.job_id, row["destination"], _actor())
                print(f"requeued {args.job_id} -> {row['destination']}")
            elif args.action == "cancel" and row["status"] in ("pending", "retrying", "dead"):
                router.commands.cancel(args.job_id, row["destination"], _actor())
                print(f"cancelled {args.job_id} -> {row['destination']}")
            else:
                print(f"left {args.job_id} -> {row['destination']} ({shown(row['status'])})")
        return 0
    finally:
        router.stores.close()


def _list(db: Any, args: argparse.Namespace) -> int:
    sql = ("SELECT d.job_id, d.destination, d.status, d.attempts, d.next_attempt_at,"
           " d.last_error FROM deliveries d WHERE 1 = 1")
    params: list[Any] = []
    if args.status:
        sql += " AND d.status = ?"
        params.append(stored(args.status))
    if args.destination:
        sql += " AND d.destination = ?"
        params.append(args.destination)
    sql += " ORDER BY d.created_at DESC LIMIT ?"
    params.append(args.limit)
    for row in db.query(sql, params):
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
