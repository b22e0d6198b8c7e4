"""Progress of a run, for callers' progress bars: patches or voxels done out of a total.

A run reports to one ``progress(done, total)`` callable, always from the thread that called
:func:`engine.segment` / :func:`engine.segment_file`, in one of two units:

- ``patch`` (the default, as before streaming existed): network patches run so far, out of the plan's
  patches. It measures inference only.
- ``voxel``: voxels whose labels are final, out of ``Z * Y * X``. It measures the whole run (reading,
  inference, post-processing), so ``done / elapsed`` is the end-to-end voxels/s and the rest gives an ETA;
  the CLI's bar uses it. The last call, ``(total, total)``, comes after the label file is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

from .errors import InputError

__all__ = ["Progress", "ProgressUnit", "PROGRESS_UNITS", "ProgressTracker"]

Progress = Callable[[int, int], None]
ProgressUnit = Literal["patch", "voxel"]
PROGRESS_UNITS: tuple[str, ...] = ("patch", "voxel")


class ProgressTracker:
    """Collects progress from every stage (any thread) and reports it on the caller's thread.

    Args:
        callback: the caller's ``progress(done, total)``, or None.
        unit: ``patch`` or ``voxel`` (see the module docstring).
        total_voxels: ``Z * Y * X``.
    """

    def __init__(self, callback: Progress | None, /, *, unit: str, total_voxels: int) -> None:
        if unit not in PROGRESS_UNITS:
            raise InputError(f"progress unit must be one of {list(PROGRESS_UNITS)}, got {unit!r}")
        self._callback, self._unit = callback, unit
        self._lock = threading.Lock()
        self.patches_done = self.patches_total = 0
        self.voxels_done, self.voxels_total = 0, int(total_voxels)
        self._last: tuple[int, int] | None = None

    def patches(self, done: int, total: int) -> None:
        """Inference progress (called on the caller's thread, after each batch); also reports."""
        self.patches_done, self.patches_total = done, total
        self.report()

    def voxels(self, count: int) -> None:
        """``count`` more voxels have final labels (any thread; reported at the next :meth:`report`)."""
        with self._lock:
            self.voxels_done += count

    def report(self, *, final: bool = False) -> None:
        """Call the callback if the value changed (caller's thread only)."""
        if self._callback is None:
            return
        if self._unit == "patch":
            value = (self.patches_done, self.patches_total)
        else:
            with self._lock:
                done = self.voxels_done if final else min(self.voxels_done, self.voxels_total - 1)
            value = (max(0, done), self.voxels_total)
        if value != self._last:
            self._last = value
            self._callback(*value)
