"""The dummy hash that unknown-user logins are checked against costs what a real one does."""

from __future__ import annotations

import bcrypt
import pytest

from router.application import users


@pytest.mark.real_password_cost
def test_the_default_cost_uses_the_constant_made_at_that_cost() -> None:
    assert users.BCRYPT_ROUNDS == users._DUMMY_ROUNDS
    assert users.dummy_hash() == users._DUMMY_HASH
    # A well-formed bcrypt hash of the default cost: checking it does the full work.
    assert users._DUMMY_HASH.startswith(f"$2b${users.BCRYPT_ROUNDS:02d}$")
    assert bcrypt.checkpw(b"not a password", users._DUMMY_HASH.encode()) is False


def test_another_cost_makes_a_hash_of_that_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(users, "BCRYPT_ROUNDS", 4)
    made = users.dummy_hash()
    assert made.startswith("$2b$04$")
    assert users.dummy_hash() == made  # once per process
    assert users.password_matches("not a password", made)
