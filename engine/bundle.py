"""Model bundles: ``bundle.json`` (the model's facts) + ``model.pt`` (its weights), parsed once, here.

A bundle is the contract between ``export`` and the engine (see DESIGN.md). ``load_bundle`` validates
``bundle.json`` into frozen dataclasses that reject unknown keys; ``Bundle.load_model`` builds the
architecture from the registry and loads the state dict with ``weights_only=True``. ``make_bundle`` turns
a bare checkpoint (pytorch-3dunet or the original module's) plus a few options into a bundle directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .atomic import atomic_write, atomic_write_bytes
from .errors import BundleError
from .models import build_model, model_divisor

__all__ = [
    "DEFAULT_BUNDLE_DIR",
    "Bundle",
    "Normalization",
    "OutputSpec",
    "PostprocessSpec",
    "load_bundle",
    "load_state_dict",
    "make_bundle",
    "read_state_dict",
    "write_bundle_json",
]

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"
FORMAT_VERSION = 1

NORMALIZATION_KINDS = ("percentile", "zscore")
OUTPUT_KINDS = ("boundary", "foreground")
POSTPROCESS_METHODS = ("watershed", "components")


@dataclass(frozen=True)
class Normalization:
    """How raw intensities become network input; statistics are taken over the whole volume.

    ``percentile``: (x - p[low]) / (p[high] - p[low]); ``zscore``: (x - mean) / std.
    """

    kind: Literal["percentile", "zscore"] = "percentile"
    low: float = 1.0
    high: float = 99.8


@dataclass(frozen=True)
class OutputSpec:
    """What the network's output channels mean.

    ``kind='boundary'``: channel ``channel`` is the membrane/boundary probability (cell interior is its
    complement); ``kind='foreground'``: channel ``channel`` is the cell/nucleus interior probability.
    """

    kind: Literal["boundary", "foreground"]
    channel: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class PostprocessSpec:
    """Probabilities -> labelled cells; names follow the original module's parameters.

    Args:
        method: ``watershed`` (seeded by distance-transform maxima) or ``components`` (connected components).
        threshold: interior probability above which a voxel is inside a cell.
        min_dist: minimum distance in voxels between two watershed seeds.
        label_threshd: cells smaller than this many voxels are dropped.
        merge_threshold: boundary models, watershed: merge touching regions while the mean boundary
            probability on their shared faces is below this (average-linkage agglomeration,
            :mod:`engine.labels.graph`); None: no merging.
        merge_min_size: with ``merge_threshold``, regions under this many voxels then join their
            weakest-boundary neighbour.
        threshold_per_upsampling: labelling on a model grid zoomed up by ``u`` in z, the threshold is
            lowered by this times ``u - 1``, not below 0.5
            (:meth:`engine.scale.ScalePlan.postprocess`).
    """

    method: Literal["watershed", "components"] = "watershed"
    threshold: float = 0.5
    min_dist: int = 10
    label_threshd: int = 10
    merge_threshold: float | None = None
    merge_min_size: int = 0
    threshold_per_upsampling: float = 0.0


@dataclass(frozen=True)
class Bundle:
    """A parsed model bundle. ``path`` is the directory holding ``bundle.json`` and ``model.pt``."""

    path: Path
    name: str
    architecture: str
    arch_kwargs: dict[str, Any]
    in_channels: int
    normalization: Normalization
    output: OutputSpec
    patch_shape: tuple[int, int, int]
    overlap: float
    postprocess: PostprocessSpec
    voxel_size_um: tuple[float, float, float] | None = None
    cell_diameter_voxels: tuple[float, float] | None = None
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.path / "model.pt"

    def build_model(self) -> nn.Module:
        """The architecture with random weights (no file read)."""
        return build_model(self.architecture, self.arch_kwargs)

    def load_model(self) -> nn.Module:
        """The architecture with the bundle's weights, in eval mode, on the CPU."""
        model = self.build_model()
        load_state_dict(model, self.weights_path)
        return model.eval()

    @property
    def divisor(self) -> int:
        """Patch sides must be multiples of this."""
        return model_divisor(self.build_model())

    def to_json(self) -> dict[str, Any]:
        """The ``bundle.json`` document for this bundle."""
        doc = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "architecture": {"name": self.architecture, "kwargs": self.arch_kwargs},
            "input": {"axes": "CZYX", "channels": self.in_channels},
            "normalization": asdict(self.normalization),
            "output": {**asdict(self.output), "names": list(self.output.names)},
            "voxel_size_um": list(self.voxel_size_um) if self.voxel_size_um else None,
            "cell_diameter_voxels": list(self.cell_diameter_voxels) if self.cell_diameter_voxels else None,
            "patch_shape": list(self.patch_shape),
            "overlap": self.overlap,
            "postprocess": asdict(self.postprocess),
            "training": self.training,
            "validation": self.validation,
            "export": self.export,
        }
        return doc


_TOP_KEYS = {
    "format_version", "name", "description", "architecture", "input", "normalization", "output",
    "voxel_size_um", "cell_diameter_voxels", "patch_shape", "overlap", "postprocess", "training", "validation", "export",
}


def _section(path: Path, doc: dict[str, Any], key: str, cls: type, allowed: dict[str, tuple[str, ...]]) -> Any:
    """Parse ``doc[key]`` into dataclass ``cls``, rejecting unknown keys and values outside ``allowed``."""
    raw = doc.get(key, {})
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: '{key}' must be an object, got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise BundleError(f"{path}: unknown key(s) {unknown} in '{key}'; allowed: {sorted(names)}")
    for name, choices in allowed.items():
        if name in raw and raw[name] not in choices:
            raise BundleError(f"{path}: '{key}.{name}' must be one of {list(choices)}, got {raw[name]!r}")
    if "names" in raw:
        raw = {**raw, "names": tuple(raw["names"])}
    try:
        return cls(**raw)
    except TypeError as exc:
        raise BundleError(f"{path}: '{key}': {exc}") from exc


def _patch_shape(path: Path, value: Any, divisor: int) -> tuple[int, int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)
    if not ok or any(v % divisor for v in value):
        raise BundleError(
            f"{path}: 'patch_shape' must be 3 positive ints divisible by {divisor}, got {value!r}; "
            "edit bundle.json or pass --patch"
        )
    return (value[0], value[1], value[2])


def _diameter_range(value: Any) -> bool:
    numbers = isinstance(value, (list, tuple)) and len(value) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return bool(numbers and 0 < value[0] <= value[1])


def parse_bundle(doc: dict[str, Any], path: Path) -> Bundle:
    """Validate a ``bundle.json`` document (``path`` is the bundle directory, used in messages)."""
    where = path / "bundle.json"
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise BundleError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: 'format_version' must be {FORMAT_VERSION}, got {doc.get('format_version')!r}")
    arch = doc.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise BundleError(f"{where}: 'architecture' must be {{'name': ..., 'kwargs': {{...}}}}, got {arch!r}")
    kwargs = dict(arch.get("kwargs", {}))
    model = build_model(arch["name"], kwargs)
    output = _section(where, doc, "output", OutputSpec, {"kind": OUTPUT_KINDS})
    voxel = doc.get("voxel_size_um")
    diameter = doc.get("cell_diameter_voxels")
    if diameter is not None and not _diameter_range(diameter):
        raise BundleError(f"{where}: 'cell_diameter_voxels' must be [low, high] with 0 < low <= high, or null, got {diameter!r}")
    postprocess = _section(where, doc, "postprocess", PostprocessSpec, {"method": POSTPROCESS_METHODS})
    if not isinstance(postprocess.threshold_per_upsampling, (int, float)) or not postprocess.threshold_per_upsampling >= 0:
        raise BundleError(f"{where}: 'postprocess.threshold_per_upsampling' must be a number >= 0, "
                          f"got {postprocess.threshold_per_upsampling!r}")
    overlap = doc.get("overlap", 0.25)
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise BundleError(f"{where}: 'overlap' must be >= 0 and < 1, got {overlap!r}")
    return Bundle(
        path=path,
        name=str(doc.get("name", path.name)),
        description=str(doc.get("description", "")),
        architecture=arch["name"],
        arch_kwargs=kwargs,
        in_channels=int(doc.get("input", {}).get("channels", 1)),
        normalization=_section(where, doc, "normalization", Normalization, {"kind": NORMALIZATION_KINDS}),
        output=output,
        patch_shape=_patch_shape(where, doc.get("patch_shape"), model_divisor(model)),
        overlap=float(overlap),
        postprocess=postprocess,
        voxel_size_um=tuple(float(v) for v in voxel) if voxel else None,  # type: ignore[arg-type]
        cell_diameter_voxels=(float(diameter[0]), float(diameter[1])) if diameter is not None else None,
        training=dict(doc.get("training", {})),
        validation=dict(doc.get("validation", {})),
        export=dict(doc.get("export", {})),
    )


def load_bundle(path: str | os.PathLike[str] | None = None, /) -> Bundle:
    """Read and validate the bundle in directory ``path`` (the shipped default when None).

    Raises:
        BundleError: the directory, ``bundle.json`` or ``model.pt`` is missing or malformed.
    """
    directory = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    where = directory / "bundle.json"
    if not where.is_file():
        raise BundleError(f"{directory}: not a model bundle (no bundle.json); make one with 'cellseg3d bundle'")
    try:
        doc = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: cannot read bundle.json: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: must hold a JSON object")
    bundle = parse_bundle(doc, directory)
    if not bundle.weights_path.is_file():
        raise BundleError(f"{bundle.weights_path}: missing; a bundle needs its weights beside bundle.json")
    return bundle


def _load_failure(exc: Exception) -> str:
    """torch's refusal in one line, without its advice to load unsafely (``weights_only=False``)."""
    text = " ".join(str(exc).split())
    if "weights_only" not in text:
        return f"{type(exc).__name__}: {text}"
    found = re.search(r"(unsupported GLOBAL \S+|WeightsUnpickler error: .*?)(?: Check the documentation|$)", text)
    why = found.group(1).rstrip(". ") if found else "not plain tensors"
    return f"refused by the safe loader, which takes only tensors and plain containers ({why})"


def read_state_dict(path: Path, /) -> dict[str, torch.Tensor]:
    """The state dict in checkpoint ``path`` (pytorch-3dunet's, the original module's or a bare one), read
    with ``weights_only=True``; a ``module.`` prefix (DataParallel) is dropped.

    Raises:
        BundleError: unreadable file, or no tensors where a state dict should be.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, RuntimeError) for a bad file
        raise BundleError(f"{path}: cannot load checkpoint: {_load_failure(exc)}") from exc
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BundleError(
            f"{path}: not a state dict (expected tensors, or a dict with 'model_state_dict' or 'state_dict')"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict(model: nn.Module, path: Path, /) -> None:
    """Load checkpoint ``path`` into ``model``; mismatches are reported by key name.

    Raises:
        BundleError: unreadable file, or keys/shapes that do not match the architecture.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})")
        raise BundleError(f"{path}: checkpoint does not match {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state)


def write_bundle_json(bundle: Bundle, /) -> Path:
    """Write ``bundle.json`` atomically (temporary file + rename) and return its path."""
    return atomic_write_bytes(bundle.path / "bundle.json", (json.dumps(bundle.to_json(), indent=2) + "\n").encode())


def make_bundle(checkpoint: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], /, *, template: Bundle) -> Bundle:
    """Make a bundle directory from a checkpoint and the facts in ``template`` (its ``path`` is ignored).

    The checkpoint is checked against the architecture before anything is written; ``checkpoint=None``
    writes randomly initialised weights (for smoke tests only).

    Returns:
        The bundle as loaded back from ``out_dir``.
    """
    out = Path(out_dir)
    bundle = replace(template, path=out)
    parse_bundle(bundle.to_json(), out)  # validate before writing anything
    model = bundle.build_model()
    if checkpoint is not None:
        load_state_dict(model, Path(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    write_bundle_json(bundle)
    return load_bundle(out)
