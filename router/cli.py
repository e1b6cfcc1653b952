"""The ``dicom-router`` command: serve, migrate, apply, check-config, projections.

The only place that reads the environment (through load_settings) and configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.cli_audit import add_parsers as add_audit_parsers
from router.cli_audit import cmd_audit
from router.cli_ops import add_parsers as add_ops_parsers
from router.cli_ops import cmd_deliveries, cmd_destinations
from router.cli_reid import add_parsers as add_reid_parsers
from router.cli_reid import cmd_reidentify
from router.cli_users import add_parsers as add_user_parsers
from router.cli_users import cmd_user
from router.settings import Settings, SettingsError, load_settings, read_toml

if TYPE_CHECKING:  # imported by the commands that build one (a receiver never does)
    from router.service import Router

logger = logging.getLogger("router.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-router", description=__doc__)
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument("--data-dir", type=Path, help="data folder (default ./data)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the router (DICOM, dispatcher, views, HTTP)")
    serve.add_argument("--config", type=Path, dest="serve_config", help=argparse.SUPPRESS)
    serve.add_argument("--data-dir", type=Path, dest="serve_data_dir", help=argparse.SUPPRESS)
    sub.add_parser("migrate", help="create event and view tables")
    apply = sub.add_parser("apply", help="apply the destinations and rules of a TOML file")
    apply.add_argument("file", type=Path)
    check = sub.add_parser("check-config", help="validate a TOML file without applying it")
    check.add_argument("file", type=Path)
    seal = sub.add_parser("seal-secret", help="seal a secret read from stdin for the settings "
                          "file (AES-256-GCM under the master key)")
    seal.add_argument("setting", choices=["storage.secret_access_key"])
    proj = sub.add_parser("projections", help="view maintenance")
    psub = proj.add_subparsers(dest="action", required=True)
    rebuild = psub.add_parser("rebuild", help="drop a view and replay it from the log")
    rebuild.add_argument("name", nargs="?")
    rebuild.add_argument("--all", action="store_true")
    rebuild.add_argument("--force", action="store_true",
                         help="rebuild even while a router serves this database (experts: "
                              "its views are dropped under it)")
    psub.add_parser("status", help="each view's position and lag")
    add_ops_parsers(sub)
    add_user_parsers(sub)
    add_audit_parsers(sub)
    add_reid_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = getattr(args, "serve_config", None) or args.config
    data_dir = getattr(args, "serve_data_dir", None) or args.data_dir
    try:
        settings = load_settings(os.environ, config, data_dir)
    except SettingsError as exc:
        print(f"dicom-router: configuration error: {exc}", file=sys.stderr)
        return 2
    from router.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    handlers = {"serve": cmd_serve, "migrate": cmd_migrate, "apply": cmd_apply,
                "check-config": cmd_check_config, "seal-secret": cmd_seal_secret,
                "projections": cmd_projections,
                "deliveries": cmd_deliveries, "destinations": cmd_destinations,
                "user": cmd_user, "audit": cmd_audit, "reidentify": cmd_reidentify}
    try:
        return handlers[args.command](settings, args)
    except SettingsError as exc:
        print(f"dicom-router: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # command and validation errors carry a user-facing message
        print(f"dicom-router: {exc}", file=sys.stderr)
        return 2


def cmd_serve(settings: Settings, args: Any) -> int:
    from router.service import Router

    router = Router.build(settings)
    return asyncio.run(_serve(router))


async def _serve(router: Router) -> int:
    from aiohttp import web

    from router.gc_tuning import freeze_startup_heap
    from web.app import create_app

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await asyncio.to_thread(router.start)
    runner = web.AppRunner(create_app(router), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, router.settings.http_host, router.settings.http_port)
    await site.start()
    freeze_startup_heap()
    logger.info("HTTP on %s:%d", router.settings.http_host, router.settings.http_port)
    await stopping.wait()
    logger.info("shutting down")
    await asyncio.to_thread(router.stop)
    await runner.cleanup()
    return 0


def cmd_migrate(settings: Settings, args: Any) -> int:
    from projections.runner import ensure_schema
    from router.application.stores import open_stores
    from router.cluster.nodes import NodeRegistry
    from router.cluster.schema import schema_lock
    from router.secrets import SecretBox, load_master_key
    from router.service import open_all_views

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with schema_lock(settings.database_url):  # nodes may be starting meanwhile
        stores = open_stores(settings, SecretBox(load_master_key(settings.secret_key,
                                                                 settings.data_dir)),
                             role="tool", create_tables=True)
        views = open_all_views(settings)
        for handle in views.values():
            ensure_schema(handle.view, handle.db)
        NodeRegistry(views["jobs"].db, settings.node_id, dicom_port=settings.dicom_port,
                     http_port=settings.http_port).ensure_table()
        for handle in views.values():
            handle.db.close()
    stores.close()
    print("event and view tables are in place")
    return 0


def cmd_apply(settings: Settings, args: Any) -> int:
    from router.service import Router

    doc = read_toml(args.file)
    router = Router.build(settings)
    try:
        changed = router.commands.apply(doc.get("destinations", []), doc.get("rules", []),
                                        transforms=doc.get("transforms", []))
        nodes = router.remote_nodes.apply(doc.get("remote_nodes", []))
        router.runner.catch_up()
    finally:
        router.stores.close()
    print(f"applied {args.file}: {changed['transforms']} transform(s), "
          f"{changed['destinations']} destination(s) and "
          f"{changed['rules']} rule(s) changed, {changed['deleted']} deleted")
    if changed["detached"]:
        print(f"left alone: {changed['detached']} item(s) detached from the file in the UI "
              "or API (the file no longer changes them)")
    if doc.get("remote_nodes") or nodes["deleted"]:
        print(f"remote nodes: {nodes['remote_nodes']} changed, {nodes['deleted']} deleted"
              + (f", {nodes['detached']} detached left alone" if nodes["detached"] else ""))
    return 0


def cmd_check_config(settings: Settings, args: Any) -> int:
    from router.config_check import check_config

    problems = check_config(args.file)
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return 2  # as for a configuration error at start
    print(f"{args.file}: OK")
    return 0


def cmd_seal_secret(settings: Settings, args: Any) -> int:
    """Print ``enc:v1:...`` for a secret given on stdin: the value for the settings file or
    ``DICOM_ROUTER_STORAGE_SECRET_ACCESS_KEY``, which only this master key opens."""
    from router.secrets import SecretBox, load_master_key
    from router.storage.blobs import STORAGE_SECRET_CONTEXT

    value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        print("dicom-router: give the secret on standard input", file=sys.stderr)
        return 2
    box = SecretBox(load_master_key(settings.secret_key, settings.data_dir))
    print(box.seal(value, context=STORAGE_SECRET_CONTEXT))
    return 0


EXIT_ROUTER_RUNNING = 3


def cmd_projections(settings: Settings, args: Any) -> int:
    if args.action != "rebuild":
        return _projections(settings, args)
    from router.cluster.serving import ServingLock

    lock = ServingLock(settings)
    try:
        if not lock.try_exclusive():
            if not args.force:
                print(f"dicom-router: a router is running on {lock.where}; stop it before "
                      "rebuilding views (or pass --force: the running router's views are "
                      "then dropped and replayed under it)", file=sys.stderr)
                return EXIT_ROUTER_RUNNING
            print(f"dicom-router: warning: a router is running on {lock.where}; rebuilding "
                  "anyway (--force)", file=sys.stderr)
        return _projections(settings, args)
    finally:
        lock.release()


def _projections(settings: Settings, args: Any) -> int:
    from projections.positions import view_positions
    from projections.runner import drop_view, ensure_schema, process_batch
    from router.application.stores import open_stores
    from router.secrets import SecretBox, load_master_key
    from router.service import VIEW_CLASSES, open_all_views

    stores = open_stores(settings, SecretBox(load_master_key(settings.secret_key,
                                                             settings.data_dir)), role="tool")
    apps = stores.all()
    views = open_all_views(settings)
    try:
        if args.action == "status":
            for name, handle in views.items():
                ensure_schema(handle.view, handle.db)
                done = view_positions(handle.db, name)
                for app in handle.view.follows:
                    head = apps[app].recorder.max_notification_id() or 0
                    print(f"{name:8} {app:9} position {done.get(app, 0):>9}  "
                          f"lag {head - done.get(app, 0)}")
            return 0
        names = list(VIEW_CLASSES) if args.all else [args.name]
        if not args.all and args.name not in VIEW_CLASSES:
            raise ValueError(f"unknown view {args.name!r}; views: {', '.join(VIEW_CLASSES)}")
        for name in names:
            handle = views[name]
            view, db = handle.view, handle.db
            drop_view(view, db)
            ensure_schema(view, db)
            count = 0
            while applied := process_batch(view, db, apps):
                count += applied
            print(f"rebuilt {name}: {count} events applied")
        return 0
    finally:
        for handle in views.values():
            handle.db.close()
        stores.close()


if __name__ == "__main__":
    sys.exit(main())
