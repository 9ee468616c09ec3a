"""The results folder of one ``deftsim run``: checked before any work, locked, filled atomically.

Life of a run folder ``DIR``:

1. **Checked first.** ``DIR`` must be a usable folder name (not empty, not an existing file
   such as ``/dev/null``), creatable and writable: this is tried for real (a lock file is
   created) before the scenario runs, so a read-only place fails in seconds, not after the
   whole experiment.
2. **Locked.** ``DIR/.deftsim.lock`` holds an exclusive ``flock`` while the run lasts; a second
   run into the same folder is refused at once. The lock dies with the process (``kill -9``
   included).
3. **No silent overwrite.** A folder that already holds a run (``summary.json``,
   ``events.parquet`` or the manifest ``.deftsim-files``) is refused unless ``overwrite``;
   overwriting replaces only the files of the old run (listed in its manifest) and keeps
   anything else the user put there.
4. **Staged, then moved in.** The run's files are written to ``DIR/.deftsim-tmp-*`` and moved
   in when everything is written: first the old ``summary.json`` is removed (so the folder reads
   as incomplete from then on), then the new files are moved in, the manifest, and
   ``summary.json`` last. A folder with ``summary.json`` is therefore always one complete run,
   never the summary of one run beside the events of another.
5. **Cleaned after a kill.** The next run into ``DIR`` deletes staging folders that a killed
   run left behind (it holds the lock, so none of them is in use).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

from .config import ScenarioError

LOCK_FILE = ".deftsim.lock"
MANIFEST_FILE = ".deftsim-files"
STAGING_PREFIX = ".deftsim-tmp-"
SUMMARY_FILE = "summary.json"
RUN_MARKERS = (SUMMARY_FILE, "events.parquet", MANIFEST_FILE)


class OutputFolderError(ScenarioError):
    """``--out`` cannot be used; ``str(err)`` names the folder and the reason (exit code 2)."""


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` says who (as it wrote into the lock file)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_lock(path: Path) -> int:
    """Create ``path`` if needed, take an exclusive non-blocking ``flock`` on it and write
    ``pid N on HOST`` into it; return the descriptor (closing it releases the lock). Raises
    :class:`LockBusy` if another process holds it, OSError if the file cannot be written."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 100).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise LockBusy(holder) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except OSError:
        os.close(fd)
        raise
    return fd


class RunFolder:
    """Context manager around one run's results folder (see the module docstring).

    ``with RunFolder(out_dir, overwrite) as folder:`` checks and locks; write the files into
    ``folder.staging``; ``folder.commit()`` moves them into place. Leaving the block without
    ``commit()`` (an error) removes the staging folder and leaves ``DIR`` as it was."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        text = os.fspath(out_dir)
        if not text.strip():
            raise OutputFolderError("--out is empty: give a folder for the results (e.g. --out runs/quickstart)")
        self.root = Path(text)
        self.overwrite = overwrite
        self.staging: Optional[Path] = None
        self._lock_fd: Optional[int] = None

    # ------------------------------------------------------------------ open / close
    def __enter__(self) -> "RunFolder":
        self._create()
        self._lock()
        try:
            self._refuse_existing_run()
            self._clean_stale_staging()
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def _create(self) -> None:
        where = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise OutputFolderError(f"--out {where!r} exists and is not a folder: give a folder for the results")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputFolderError(f"--out {where!r}: cannot create the folder ({err.strerror or err})") from None

    def _lock(self) -> None:
        where = str(self.root)
        try:
            self._lock_fd = take_lock(self.root / LOCK_FILE)
        except LockBusy as busy:
            raise OutputFolderError(f"--out {where!r}: another deftsim run is writing to this folder "
                                    f"({busy.holder}); wait for it or use another folder") from None
        except OSError as err:
            raise OutputFolderError(f"--out {where!r} is not writable ({err.strerror or err})") from None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _refuse_existing_run(self) -> None:
        found = [name for name in RUN_MARKERS if (self.root / name).exists()]
        if found and not self.overwrite:
            raise OutputFolderError(f"--out {str(self.root)!r} already holds a run ({', '.join(found)}); "
                                    "give another folder, or --overwrite to replace that run (other files are kept)")

    def _clean_stale_staging(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith(STAGING_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------ commit
    def old_run_files(self) -> list[str]:
        """Files of the run already in the folder: its manifest's list, else the known names."""
        manifest = self.root / MANIFEST_FILE
        try:
            names = [n for n in manifest.read_text().splitlines() if n and "/" not in n and n not in ("..", ".")]
        except (OSError, UnicodeDecodeError):
            names = [n for n in RUN_MARKERS if n != MANIFEST_FILE]
            names += ["scenario.json", "topology.json", "timing.json", "accuracy_vs_time.png"]
        return names

    def commit(self) -> list[str]:
        """Move the staged files into the folder (old run out first, ``summary.json`` last)."""
        assert self.staging is not None, "commit() outside the with block"
        new = sorted(p.name for p in self.staging.iterdir() if p.is_file())
        (self.root / SUMMARY_FILE).unlink(missing_ok=True)  # from here on the folder reads as incomplete
        (self.root / MANIFEST_FILE).unlink(missing_ok=True)
        for name in self.old_run_files():
            if name not in new:
                target = self.root / name
                if target.is_file():
                    target.unlink()
        for name in new:
            if name != SUMMARY_FILE:
                os.replace(self.staging / name, self.root / name)
        manifest = self.staging / MANIFEST_FILE
        manifest.write_text("".join(f"{n}\n" for n in new))
        os.replace(manifest, self.root / MANIFEST_FILE)
        if SUMMARY_FILE in new:
            os.replace(self.staging / SUMMARY_FILE, self.root / SUMMARY_FILE)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        return new
