"""``dicom-router user add|passwd ...``: TODO(issue 3), filled in by its owner this session."""

from __future__ import annotations

import argparse
from typing import Any

from router.settings import Settings


def add_parsers(sub: Any) -> None:
    sub.add_parser("user", help="user accounts (add, passwd)")


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    raise ValueError("not implemented yet")
