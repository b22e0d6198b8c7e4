"""The module's inputs: read from the MEX document, checked, with the model bundle's defaults for empty ones.

Why not ``bq.parameters()``: bisque-api 0.5.12.2 converts a ``type="number"`` input with ``float(value)``, so
an empty or missing value raises ``ValueError``/``TypeError`` and would fail the MEX. Why not the positional
arguments when a MEX is there: BisQue's engine (``mexparser.prepare_mex_params``) drops inputs without a
value, so the values after a dropped one shift onto the wrong input. With a MEX the positional values are
therefore ignored; they count only for a run by hand (``--user``/``--local``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INPUTS", "Params", "UsageError", "mex_input_values", "resolve_params"]

INPUTS = ("resource_url", "threshold", "min_dist", "label_threshd")  # module-XML order
_MISSING = ("", "none", "null")


class UsageError(ValueError):
    """Bad module arguments or MEX inputs; the message names the input and echoes its value."""


@dataclass(frozen=True)
class Params:
    """The run's inputs after resolution; None means the bundle's default. ``origin`` says where each came from."""

    resource_url: str
    threshold: float | None = None
    min_dist: int | None = None
    label_threshd: int | None = None
    origin: dict[str, str] = field(default_factory=dict)


def mex_input_values(mex: Any, /) -> dict[str, str | None]:
    """``{name: value}`` of the leaf tags under the MEX's ``inputs`` tag (None where a tag has no value).

    ``mex`` is the MEX element (lxml or ElementTree). A nested input (a tag holding tags) contributes its
    leaves, as BisQue's ``mexparser.prepare_inputs`` does; a ``<value>`` child stands for the value itself.
    """
    section = mex.find("tag[@name='inputs']")
    values: dict[str, str | None] = {}
    if section is None:
        return values
    for tag in section.iter("tag"):
        if tag is section or tag.find("tag") is not None:
            continue
        value = tag.get("value")
        if value is None and tag.find("value") is not None:
            value = tag.find("value").text
        values[tag.get("name", "")] = value
    return values


def _convert(name: str, raw: Any) -> str | float | int:
    if name == "resource_url":
        return str(raw).strip()
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {raw!r}") from None
    if name == "threshold":
        if not 0.0 <= number <= 1.0:
            raise UsageError(f"threshold must be between 0 and 1, got {raw!r}")
        return number
    if number < 0 or not number.is_integer():
        raise UsageError(f"{name} must be a whole number >= 0, got {raw!r}")
    return int(number)


def resolve_params(positional: Sequence[str], mex_values: Mapping[str, Any] | None, /) -> Params:
    """The run's inputs: from the MEX when there is one (``mex_values`` not None; the positional values are then
    ignored), else from ``positional`` (module-XML order). An empty value means the bundle's default.

    Raises:
        UsageError: no resource, or a value that is not a valid number for its input.
    """
    where = "MEX" if mex_values is not None else "argument"
    given = dict(mex_values) if mex_values is not None else dict(zip(INPUTS, positional))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in INPUTS:
        raw = given.get(name)
        if raw is None or str(raw).strip().lower() in _MISSING:
            origin[name] = "bundle default"
        else:
            values[name], origin[name] = _convert(name, raw), where
    if "resource_url" not in values:
        hint = "the MEX input 'resource_url'" if mex_values is not None else "the first argument"
        raise UsageError(f"no resource_url: give it as {hint}")
    return Params(**values, origin=origin)
