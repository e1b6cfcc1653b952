"""The login lockout's window: when a lockout ends, and an admin's unlock (failures before a
moment no longer count)."""

from __future__ import annotations

from router.application.users import Lockout


def test_locked_until_is_the_oldest_counted_failure_plus_the_window() -> None:
    lockout = Lockout(max_failures=3, window=900.0)
    for at in (100.0, 200.0, 300.0):
        assert lockout.locked_until("Bob", now=at) is None
        lockout.failed("bob", now=at)
    assert lockout.locked_until("BOB", now=301.0) == 1000.0
    assert lockout.locked("bob", now=999.0) and not lockout.locked("bob", now=1000.5)


def test_an_unlock_forgets_the_failures_before_it_only() -> None:
    lockout = Lockout(max_failures=2, window=900.0)
    lockout.failed("bob", now=100.0)
    lockout.failed("bob", now=110.0)
    assert lockout.locked("bob", now=120.0)
    lockout.forget_before("Bob", 115.0)
    assert not lockout.locked("bob", now=120.0)
    lockout.failed("bob", now=130.0)
    lockout.failed("bob", now=140.0)
    assert lockout.locked_until("bob", now=150.0) == 1030.0
    lockout.forget_before("nobody", 1.0)  # unknown names: nothing to forget
