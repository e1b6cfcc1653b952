"""How many associations a DICOM peer takes from us at once, learned as we go.

Many PACS, and DCMTK's storescp without ``--fork``, serve one association at a time: a second
one waits unanswered (or is rejected) until the first is released. A lane with two workers then
had one worker stuck for up to the destination's timeout with an instance in hand, recorded a
failed attempt and retried it 30 s later, though the destination was up and busy with our
other association. Now associations to one peer are opened one at a time, and an extra one
(while others of ours to the same peer are open) gets a short timeout; when the peer does not
take it, the instance goes back to the lane unrecorded and the peer's limit is remembered for
a while, so the extra workers wait instead of asking again.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)

EXTRA_OPEN_TIMEOUT = 3.0  # seconds an extra association may take to be accepted
LEARN_FOR = 600.0  # seconds a learned limit holds before more associations are tried again


class Seats:
    """Our open associations to one peer (host, port, called AE, calling AE), and the peer's
    limit once learned. One association is being opened at a time: the peer accepts them in
    the order they reach it, so a second one opened at once could be accepted first, and the
    one left waiting would be the one counted as first (with the full timeout)."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.Lock()
        self.opening = threading.Lock()  # held while an association is being opened
        self._open = 0
        self._limit = 0  # 0: none known
        self._until = 0.0

    def taken(self) -> int:
        """Associations of ours the peer has accepted and that are still open."""
        with self._lock:
            return self._open

    def available(self) -> bool:
        """Whether one more association may be tried now."""
        with self._lock:
            return not self._limited() or self._open < self._limit

    def opened(self) -> None:
        with self._lock:
            self._open += 1

    def closed(self) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)

    def learn(self, limit: int) -> None:
        """The peer took ``limit`` associations of ours and not one more."""
        with self._lock:
            known = self._limited()
            self._limit = max(1, limit)
            self._until = time.monotonic() + LEARN_FOR
        if not known:
            logger.info("%s takes %d association(s) from us at a time; using no more for "
                        "%.0f min", self._where, limit, LEARN_FOR / 60)

    def _limited(self) -> bool:
        return self._limit > 0 and time.monotonic() < self._until


_SEATS: dict[tuple[str, int, str, str], Seats] = {}
_SEATS_LOCK = threading.Lock()


def seats_for(host: str, port: int, called_ae: str, calling_ae: str) -> Seats:
    """The one Seats of a peer, shared by every adapter (and lane) that talks to it."""
    key = (host.lower(), port, called_ae, calling_ae)
    with _SEATS_LOCK:
        seats = _SEATS.get(key)
        if seats is None:
            seats = _SEATS[key] = Seats(f"{called_ae}@{host}:{port}")
        return seats
