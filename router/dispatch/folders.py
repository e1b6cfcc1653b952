"""Where file destinations may write: below an allowed root, never into the router's own state.

An operator types a file destination's folder; without a limit that is a way to write DICOM
files (whose paths come partly from tag values) into ``/etc``, ``/root/.ssh`` or the router's
own blobs and databases. A folder is allowed when its real path (symlinks resolved) is inside
one of the roots (``<data_dir>/exports`` and ``[storage] destination_roots``), and neither
inside nor above the router's state (the data folder outside ``exports``, the SQLite folder).
Checked when the destination is saved and again before every write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.settings import Settings

EXPORTS = "exports"  # the data folder's sub-folder file destinations may always use


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class FolderPolicy:
    """Roots file destinations may write below, and the state folders they may not touch."""

    roots: tuple[Path, ...]
    state: tuple[Path, ...] = ()
    # Inside a state folder but allowed all the same (the data folder's exports/).
    carved_out: tuple[Path, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> FolderPolicy:
        exports = settings.data_dir / EXPORTS
        return cls(roots=(exports, *settings.storage.destination_roots),
                   state=(settings.data_dir, settings.sqlite_dir), carved_out=(exports,))

    def problem(self, folder: Path | str) -> str | None:
        """Why file destinations may not write below ``folder``, or None when they may.

        Real paths are compared (resolved now: a symlink created later is caught by the
        check before each write).
        """
        real = _real(folder)
        for state in map(_real, self.state):
            if _within(state, real):
                return (f"{folder} holds the router's own data folder or database; choose a "
                        "folder of its own")
            if _within(real, state) and not any(_within(real, _real(c))
                                                for c in self.carved_out):
                return (f"{folder} is inside the router's own data folder; use its "
                        f"{EXPORTS}/ sub-folder or a folder outside it")
        if not any(_within(real, _real(root)) for root in self.roots):
            shown = ", ".join(str(root) for root in self.roots)
            return (f"{folder} is outside the folders file destinations may use ({shown}); an "
                    "administrator lists more in [storage] destination_roots")
        return None
