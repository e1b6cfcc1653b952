"""The one small interface every destination kind implements, and its two error kinds.

Adapters never read configuration or the environment and never decide about retries: they
raise :class:`TransientDeliveryError` (try again later) or :class:`PermanentDeliveryError`
(retrying cannot help; dead-letter now with the reason) and the dispatcher decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset


class DeliveryError(Exception):
    """A delivery failed; the message is shown to administrators (no PHI in it)."""


class TransientDeliveryError(DeliveryError):
    """The destination may accept the instance later (down, busy, timeout, 0xA7xx)."""


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot succeed (refused transfer syntax with no decoder, bad credentials...)."""


# What "test connection" answers for every address it did not reach, refused or not: the same
# words (and no detail) whether the policy refused the address, the name did not resolve, the
# port was closed, or something there answered in another protocol. No port scanner.
NOT_REACHED = ("not reached: the address is not allowed, the name is unknown, nothing listens "
               "there, or it did not answer (the router's log has the detail)")
# ... and not sooner than this: a refused address (answered at once) then looks like a closed
# port or an unknown name.
NOT_REACHED_MIN_SECONDS = 1.0


class UnreachableError(TransientDeliveryError):
    """Nothing answered: the name did not resolve, the connection was refused or timed out, or
    it closed before any answer. "Test connection" words these, and refused addresses, alike."""


class TransformFailedError(PermanentDeliveryError):
    """A transform could not be applied to the instance: retrying the same transform on the
    same object cannot help (fix the transform, then requeue). ``transforms``: the records of
    the chain up to and including the one that failed."""

    def __init__(self, message: str, transforms: tuple[dict[str, object], ...] = ()) -> None:
        super().__init__(message)
        self.transforms = transforms


class RefusedAddressError(PermanentDeliveryError):
    """The destination's address is one the address policy refuses (router.dispatch.ssrf)."""


class SeatUnavailable(Exception):
    """Not an attempt: the destination is taking our other connections and no more at the
    moment, so this instance goes back to the lane for one of those (nothing is recorded)."""


@dataclass(frozen=True)
class Outgoing:
    """One stored instance to deliver.

    ``path`` is the blob file holding the complete Part 10 file. ``header`` is the dataset
    read without pixel data (for templates), read on first use: a DICOM peer never needs it.
    """

    delivery_id: str
    path: Path
    sha256: str
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    load_header: Callable[[], Dataset] = field(repr=False, compare=False)
    # What router.transforms did to make this copy (one record each, for the events), and
    # whether ``path`` is a scratch file of that copy, removed once the attempt ends.
    transforms: tuple[dict[str, object], ...] = field(default=(), compare=False)
    scratch: bool = False

    @cached_property
    def header(self) -> Dataset:
        return self.load_header()


class Adapter(Protocol):
    """A destination: deliver one instance, or check that the destination is reachable."""

    def send(self, item: Outgoing) -> str:
        """Deliver ``item``; return a short detail for the success event (no PHI)."""
        ...

    def check(self) -> str:
        """Raise a DeliveryError if the destination is unusable; else a short detail."""
        ...

    def close(self) -> None:
        """Release connections (associations, HTTP pools)."""
        ...
