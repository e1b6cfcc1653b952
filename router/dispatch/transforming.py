"""Transforms at send time: the chain for one delivery (the transforms of the rules that routed
the object to this destination, then the destination's own), applied to a copy.

The stored object is read once, transformed in memory and written to a scratch file that the
adapter sends and the lane removes; the blob is never written. A destination without
transforms gets the stored object as before, at the cost of two dictionary look-ups.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from router.application.admin_state import AdminSnapshot, AdminState
from router.application.reidentification import ReidentificationMap
from router.dicom.header import HeaderError, read_header
from router.dispatch.base import Outgoing, TransformFailedError, TransientDeliveryError
from router.dispatch.lanes import DueDelivery
from router.transforms.chain import (
    TransformFailed,
    VersionedTransform,
    apply_chain,
    run_order,
)

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = "transformed-"


def chain_for(snapshot: AdminSnapshot, destination: str,
              matched_rules: str) -> tuple[list[VersionedTransform], list[str]]:
    """The transforms for a delivery in order, and the names that do not exist (any: fail)."""
    names: list[str] = []
    if matched_rules and any(rule.spec.transforms for rule in snapshot.rules):
        ids = {str(m.get("rule_id")) for m in _matched(matched_rules)}
        for rule in snapshot.rules:
            if rule.rule_id in ids and destination in rule.spec.destinations:
                names += rule.spec.transforms
    state = snapshot.destinations.get(destination)
    names += list(state.config.get("transforms") or ()) if state is not None else []
    names = list(dict.fromkeys(names))  # a transform named twice runs once
    chain = [snapshot.transforms[n] for n in names if n in snapshot.transforms]
    return chain, [n for n in names if n not in snapshot.transforms]


def _matched(text: str) -> list[dict[str, object]]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [m for m in value if isinstance(m, dict)] if isinstance(value, list) else []


class SendTransforms:
    """Turns an :class:`Outgoing` into a transformed copy when its delivery has transforms."""

    def __init__(self, admin: AdminState, reid: ReidentificationMap, scratch_dir: Path) -> None:
        self._admin = admin
        self._reid = reid
        self._scratch = Path(scratch_dir)
        self._scratch.mkdir(parents=True, exist_ok=True)
        for leftover in self._scratch.glob(SCRATCH_PREFIX + "*"):  # a crash mid-send
            with contextlib.suppress(OSError):
                leftover.unlink()

    def prepare(self, due: DueDelivery, item: Outgoing) -> Outgoing:
        chain, missing = chain_for(self._admin.snapshot(), due.destination, due.matched_rules)
        if missing:
            raise TransformFailedError(
                f"transform(s) {', '.join(repr(n) for n in missing)} named for destination "
                f"{due.destination!r} do not exist: declare them or remove them")
        if not chain:
            return item
        try:
            dataset = dcmread(item.path)
        except OSError as exc:
            raise TransientDeliveryError(f"cannot read the stored blob: errno {exc.errno}"
                                         ) from None
        except Exception as exc:  # pydicom raises several types on a damaged file
            raise TransformFailedError(f"stored object unreadable for transforms: "
                                       f"{type(exc).__name__}") from None
        try:
            result = apply_chain(dataset, chain, calling_aet=due.calling_aet,
                                 seed_for=self._reid.seed)
        except TransformFailed as exc:
            raise TransformFailedError(str(exc), _records(chain)) from None
        for project, identity in result.identities:
            self._reid.record(project, identity, due.correlation_id)
        return self._written(item, dataset, tuple(result.applied))

    def _written(self, item: Outgoing, dataset: Dataset,
                 applied: tuple[dict[str, object], ...]) -> Outgoing:
        fd, name = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".dcm", dir=self._scratch)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                dataset.save_as(out, enforce_file_format=True)
            with path.open("rb") as written:
                digest = hashlib.file_digest(written, "sha256").hexdigest()
        except Exception as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise TransformFailedError(f"the transformed copy cannot be written: "
                                       f"{type(exc).__name__}", applied) from None
        meta = dataset.file_meta
        return Outgoing(
            delivery_id=item.delivery_id, path=path, sha256=digest, size=path.stat().st_size,
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
            load_header=lambda: _header(path), transforms=applied, scratch=True)


def _records(chain: list[VersionedTransform]) -> tuple[dict[str, object], ...]:
    return tuple({"name": t.name, "kind": t.spec.kind, "version": t.version}
                 for t in run_order(chain))


def _header(path: Path) -> Dataset:
    try:
        return read_header(path, check=False)
    except HeaderError as exc:
        raise TransformFailedError(f"transformed copy unreadable: {exc}") from None
