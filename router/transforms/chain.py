"""Applying a chain of transforms to one data set in memory, and what each application records.

The caller reads the stored object once, hands the data set here, and writes (or shows) the
result; the stored object is never touched. A transform that raises stops the chain with a
:class:`TransformFailed` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from router.transforms.charset import repair_charset
from router.transforms.deid import ENGINE, Identity, deidentify
from router.transforms.spec import ENGINE_VERSIONS, TransformSpec


class TransformFailed(Exception):
    """A transform could not be applied to an instance; the message names it (no PHI)."""


@dataclass(frozen=True)
class VersionedTransform:
    """A transform as configured now: its admin-log version and its spec."""

    version: int
    spec: TransformSpec

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class ChainResult:
    """What a chain did: one record per transform (for the delivery's events) and, for each
    de-identification, the project and the identities before and after (for the
    re-identification map)."""

    applied: list[dict[str, object]] = field(default_factory=list)
    identities: list[tuple[str, Identity]] = field(default_factory=list)


def apply_chain(dataset: Dataset, chain: Sequence[VersionedTransform], *, calling_aet: str,
                seed_for: Callable[[str], str]) -> ChainResult:
    """Apply ``chain`` in order to ``dataset`` in place, character-set repairs first (they
    re-declare how the received bytes are read, which must happen before any transform reads
    a text element). ``seed_for(project)`` gives a de-identification project's secret seed."""
    result = ChainResult()
    for transform in run_order(chain):
        spec = transform.spec
        try:
            note = _apply_one(dataset, spec, calling_aet, seed_for, result)
        except TransformFailed:
            raise
        except Exception as exc:  # pydicom and dicognito raise many types on odd data
            # Only the exception's type: pydicom's messages can quote values (PHI).
            raise TransformFailed(f"transform {spec.name!r} ({spec.kind}) failed on this "
                                  f"instance: {type(exc).__name__}") from None
        result.applied.append({"name": spec.name, "kind": spec.kind,
                               "version": transform.version, "engine": engine_of(spec),
                               "changed": note})
    return result


def run_order(chain: Sequence[VersionedTransform]) -> list[VersionedTransform]:
    """Character-set repairs first, the others in their order (a stable sort)."""
    return sorted(chain, key=lambda t: t.spec.kind != "charset")


def engine_of(spec: TransformSpec) -> str:
    """The code that does the work and its version, as recorded in the events."""
    return ENGINE if spec.kind == "deidentify" else ENGINE_VERSIONS[spec.kind]


def _apply_one(dataset: Dataset, spec: TransformSpec, calling_aet: str,
               seed_for: Callable[[str], str], result: ChainResult) -> str:
    if spec.kind == "charset":
        return repair_charset(dataset)
    if spec.kind == "morph":
        count = 0
        for i, op in enumerate(spec.ops):
            try:
                count += op.apply(dataset, calling_aet)
            except Exception as exc:
                raise TransformFailed(
                    f"transform {spec.name!r} (morph) failed on this instance at ops[{i}] "
                    f"({op.op} {op.path.text}): {type(exc).__name__}") from None
        return f"{count} element(s) changed"
    assert spec.deid is not None
    identity = deidentify(dataset, seed_for(spec.deid.project), spec.deid)
    result.identities.append((spec.deid.project, identity))
    return f"de-identified for project {spec.deid.project}"
