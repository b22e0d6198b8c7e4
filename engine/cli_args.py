"""argparse types for the command line: each rejects a bad value with one line naming what was expected,
before anything heavy is imported (plug-in CLIs use them too)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["parse_shape", "parse_voxel_size", "positive_int", "count", "positive_float", "fraction", "probability"]


def parse_shape(text: str) -> tuple[int, int, int]:
    """``Z,Y,X`` (or ``ZxYxX``) positive integers."""
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X integers, got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected 3 positive integers Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


def parse_voxel_size(text: str) -> tuple[float, float, float]:
    """``"2,0.5,0.5"`` -> ``(2.0, 0.5, 0.5)`` (Z,Y,X in µm, each > 0)."""
    try:
        values = tuple(float(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X in µm, got {text!r}") from None
    if len(values) != 3 or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected 3 positive numbers Z,Y,X in µm, got {text!r}")
    return values  # type: ignore[return-value]


def _number(kind: type, accept: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = expected  # argparse names the type in its messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
count = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a number > 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number >= 0 and < 1")
probability = _number(float, lambda v: 0 < v < 1, "a number between 0 and 1")
