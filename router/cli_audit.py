"""``dicom-router audit export ...``: TODO(issue 3), filled in by its owner this session."""

from __future__ import annotations

import argparse
from typing import Any

from router.settings import Settings


def add_parsers(sub: Any) -> None:
    sub.add_parser("audit", help="audit trail (export)")


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    raise ValueError("not implemented yet")
