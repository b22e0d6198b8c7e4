"""Atomic file writes: a temporary file beside the target, renamed into place only on success.

Every file the engine and the exporter write (labels, probabilities, tables, bundles, models, plans) goes
through here, so a failure never leaves a half-written file, and finished files get the ordinary
permissions (``mkstemp`` alone would leave them readable by their owner only).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

__all__ = ["temp_beside", "atomic_target", "atomic_write", "atomic_write_bytes"]


def _file_mode() -> int:
    """0o666 less this process's umask (read without changing it, which ``os.umask`` would)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def temp_beside(path: Path, /) -> Path:
    """Create an empty temporary file in ``path``'s folder (same file system, so the rename is atomic)."""
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    mode = _file_mode()  # read before the file exists: a signal landing in between leaves nothing behind
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        os.chmod(tmp, mode)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


@contextmanager
def atomic_target(path: str | os.PathLike[str], /) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit rename it to ``path``, else delete it."""
    target = Path(path)
    tmp = temp_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object], /) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    with atomic_target(path) as tmp:
        write(str(tmp))
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, /) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
