"""Tier caps for a whole server whose decoder runs several engines (one per GPU, each in its own
Python-backend process): each engine's running requests per tier, in one small shared file.

Every engine owns one row (claimed at start: a row whose process is gone is free) and writes only
that row; admitting takes an exclusive lock on the file, sums the other rows and admits within
what the cap leaves. Finishing lowers the engine's own row without the lock: another engine that
reads it just before sees one request too many, which only delays an admission by a step.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MAX_ENGINES = 64


def default_path(model_name: str, tier_names: list[str]) -> Path:
    """One file per server, model and tier table: the Python-backend stubs of one tritonserver
    share its pid as their parent's; a model reloaded with other tiers gets a file of its own
    (rows are as wide as the tier list)."""
    tiers = hashlib.sha256(",".join(tier_names).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"qwen3vl-tier-counts-{os.getppid()}-{model_name}-{tiers}"


class ServerTierCounts:
    def __init__(self, path: Path, tier_names: list[str]):
        self.path = Path(path)
        self.tiers = list(tier_names)
        size = MAX_ENGINES * (1 + len(self.tiers)) * 8
        self._fd = self._open_locked()
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
            # Row: [pid, running requests of each tier].
            self._rows = np.ndarray((MAX_ENGINES, 1 + len(self.tiers)), dtype=np.int64, buffer=self._map)
            self.row = self._claim_row()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _open_locked(self) -> int:
        """Open and lock the file; retry if the last engine of a stopping server removed it before
        the lock was ours (this engine would count alone in an orphan file)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # closing drops the lock

    def _claim_row(self) -> int:
        for row, pid in enumerate(self._rows[:, 0]):
            if pid == 0 or not _alive(int(pid)):
                self._rows[row] = 0
                self._rows[row, 0] = os.getpid()
                return row
        raise RuntimeError(f"more than {MAX_ENGINES} decoder engines share one server")

    @contextmanager
    def _locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextmanager
    def admitting(self):
        """Hold the lock while deciding admissions: yields {tier: requests the OTHER engines run}."""
        with self._locked():
            live = [row for row, pid in enumerate(self._rows[:, 0].tolist()) if pid and row != self.row and _alive(pid)]
            others = self._rows[live, 1:].sum(axis=0)  # an engine that died holds nothing
            yield dict(zip(self.tiers, others.tolist()))

    def publish(self, running_by_tier: dict[str, int]) -> None:
        """Write this engine's running requests per tier."""
        self._rows[self.row, 1:] = [running_by_tier[name] for name in self.tiers]

    def close(self) -> None:
        """Give up this engine's row; the last engine of the server removes the file."""
        with self._locked():
            self._rows[self.row] = 0
            if not any(pid and _alive(pid) for pid in self._rows[:, 0].tolist()):
                self.path.unlink(missing_ok=True)
            self._rows = None
            self._map.close()
        os.close(self._fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
