"""Destination kind ``file``: write each instance into a folder, atomically, at a templated path.

The folder must already exist (a missing mount must not fill the root file system) and be one
the :class:`~router.dispatch.folders.FolderPolicy` allows, checked before every write; paths
come from :mod:`router.dispatch.templates` and are checked to stay inside the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated, BinaryIO

from router.config_types import (
    STRICT,
    Concurrency,
    Description,
    DestinationName,
    Doc,
    StrictBool,
    TransformNames,
)
from router.dispatch.base import Outgoing, PermanentDeliveryError, TransientDeliveryError
from router.dispatch.folders import FolderPolicy
from router.dispatch.templates import PathTemplate, TemplateError

logger = logging.getLogger(__name__)

DEFAULT_FILE_TEMPLATE = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
FILE_MODE = 0o640  # readable by the archive's group, never by everyone (PHI)
_CHUNK = 1024 * 1024
# Errors that retrying cannot fix: the template produced a path the file system refuses.
_PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.ENOTDIR, errno.EISDIR})


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileDestinationConfig:
    """A folder on a local or mounted file system."""

    __pydantic_config__ = STRICT

    name: DestinationName
    path: Annotated[str, Doc("absolute folder path on this machine (or a mounted share)")]
    template: Annotated[str, Doc(
        "file names below it, e.g. {StudyInstanceUID}/{SOPInstanceUID}.dcm")] = (
        DEFAULT_FILE_TEMPLATE)
    concurrency: Concurrency = 2
    enabled: StrictBool = True
    description: Description = ""
    transforms: TransformNames = ()  # router.transforms, applied to each copy sent

    def problems(self) -> dict[str, str]:
        """Field -> message for values that are well-typed but unusable."""
        problems: dict[str, str] = {}
        if not os.path.isabs(self.path):
            problems["path"] = "must be an absolute folder path"
        elif ".." in PurePosixPath(self.path).parts or "\x00" in self.path:
            problems["path"] = "must not contain '..' components"
        elif os.path.normpath(self.path) == os.sep:
            problems["path"] = "must not be the root folder"
        try:
            PathTemplate.parse(self.template)
        except TemplateError as exc:
            problems["template"] = str(exc)
        return problems


class FileAdapter:
    """Writes instances below ``config.path``; used by one worker thread at a time."""

    def __init__(self, config: FileDestinationConfig, *, policy: FolderPolicy) -> None:
        self._config = config
        self._policy = policy
        self._root = Path(config.path)
        self._template = PathTemplate.parse(config.template)

    def send(self, item: Outgoing) -> str:
        """Write ``item`` atomically; identical content already in place counts as success."""
        try:
            relative = self._template.render(item.header)
        except TemplateError as exc:
            raise PermanentDeliveryError(f"file destination template: {exc}") from None
        try:
            src = item.path.open("rb")
        except OSError as exc:
            raise TransientDeliveryError(
                f"cannot read the stored blob: {_errno_text(exc)}"
            ) from None
        with src:
            try:
                target = self._target(relative)
                if _same_content(target, item):
                    return f"already present with identical content ({item.size} bytes)"
                _write_atomically(src, item.sha256, target)
            except OSError as exc:
                raise self._error(exc) from None
        return f"written ({item.size} bytes)"

    def check(self) -> str:
        """The folder is allowed, exists, and a probe file can be created and removed in it."""
        try:
            root = self._existing_root()
            fd, probe = tempfile.mkstemp(dir=root, prefix=".router-probe-")
            os.close(fd)
            os.unlink(probe)
            free = shutil.disk_usage(root).free
        except OSError as exc:
            raise self._error(exc) from None
        return f"folder writable, {free / 2**30:.1f} GiB free"

    def close(self) -> None:
        """Nothing to release."""

    def _existing_root(self) -> Path:
        """The folder's real path, once the policy allows it (first: a refused folder tells
        nothing of whether it exists) and it exists."""
        problem = self._policy.problem(self._root)
        if problem is not None:
            raise PermanentDeliveryError(f"refusing to write: {problem}")
        if not self._root.is_dir():
            raise TransientDeliveryError(
                f"folder {self._root} does not exist or is not a folder (not mounted?)"
            )
        return Path(os.path.realpath(self._root))

    def _target(self, relative: str) -> Path:
        """Absolute target inside the folder, parents created; refuses symlinked escapes."""
        root = self._existing_root()
        target = root / relative
        self._check_inside(root, target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._check_inside(root, target.parent)  # again: mkdir may have followed a symlink
        return target

    def _check_inside(self, root: Path, folder: Path) -> None:
        real = Path(os.path.realpath(folder))
        if real != root and root not in real.parents:
            raise PermanentDeliveryError(
                f"refusing to write outside folder {self._root} (a symlink points out of it)"
            )

    def _error(self, exc: OSError) -> PermanentDeliveryError | TransientDeliveryError:
        """An error naming the folder and errno only: the full path may hold header values."""
        message = f"writing below folder {self._root} failed: {_errno_text(exc)}"
        logger.warning("file destination %s: %s", self._config.name, message)
        if exc.errno in _PERMANENT_ERRNOS:
            return PermanentDeliveryError(message)
        return TransientDeliveryError(message)


def _errno_text(exc: OSError) -> str:
    """``ENOSPC (No space left on device)``: never ``str(exc)``, which includes the path."""
    if not exc.errno:
        return type(exc).__name__
    return f"{errno.errorcode.get(exc.errno, exc.errno)} ({os.strerror(exc.errno)})"


def _same_content(target: Path, item: Outgoing) -> bool:
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != item.size:
        return False
    digest = hashlib.sha256()
    with open(os.open(target, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == item.sha256


def _write_atomically(src: BinaryIO, sha256: str, target: Path) -> None:
    """Copy to a temp file beside ``target``, fsync, rename over it, fsync the folder."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fchmod(out.fileno(), FILE_MODE)
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise PermanentDeliveryError("stored blob does not match its recorded SHA-256")
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
