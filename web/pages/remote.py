"""TODO(issue 6): filled in by its owner this session."""

from __future__ import annotations

from web.routes import Route

ROUTES: list[Route] = []
