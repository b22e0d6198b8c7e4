"""The wrapper tests' fixtures and helper path: the BisQue test server per test, and the helper modules that
sit beside the tests (``bisque_engine``, ``bisque_content``, ``wrapper_runs``) made importable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bisque_server import bisque_server

__all__ = ["bisque_server"]
