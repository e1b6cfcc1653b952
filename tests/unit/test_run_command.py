"""How a write command's errors reach an API caller (web/api/common.py run_command)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from eventsourcing.persistence import IntegrityError

from router.application.commands import CommandError, NotFoundError
from web.api.common import ApiError, run_command


def _raising(error: Exception) -> Callable[[], None]:
    def command() -> None:
        raise error
    return command


@pytest.mark.parametrize(("error", "status", "text"), [
    (NotFoundError("rule 'x' does not exist"), 404, "rule 'x' does not exist"),
    (CommandError("already delivered; nothing to requeue"), 422, "already delivered"),
    # Two people saving one rule at once: a version conflict, not an internal error.
    (IntegrityError("UNIQUE constraint failed"), 409, "changed by someone else meanwhile"),
])
def test_command_errors_become_specific_api_errors(error: Exception, status: int,
                                                   text: str) -> None:
    with pytest.raises(ApiError) as raised:
        asyncio.run(run_command(_raising(error)))
    assert raised.value.status == status and text in raised.value.message
    assert "UNIQUE" not in raised.value.message


def test_a_command_result_is_returned() -> None:
    assert asyncio.run(run_command(lambda a, b: a + b, 2, b=3)) == 5
