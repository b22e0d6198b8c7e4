"""TensorRT plan keys: the GPU, TensorRT version, ONNX file and profile a plan was built for.

A plan is only valid for what it was built with, so every plan in a bundle's ``engines/`` folder has a
JSON beside it holding its :class:`EngineKey` (plus build facts and the accuracy gate's result) and the
plan's own sha256. :func:`find_plan` picks a plan whose key fits this host and this request, and says why
each other plan does not fit; :func:`read_plan` refuses a plan whose bytes do not match its JSON.

This module imports neither TensorRT nor CUDA: the host facts come in as a :class:`Host`, so the key logic
is tested on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError

__all__ = [
    "ENGINES_ENV",
    "FP16_FILE",
    "INPUT_NAME",
    "ONNX_FILE",
    "OUTPUT_NAME",
    "EngineKey",
    "Host",
    "PlanRecord",
    "Profile",
    "engines_dir",
    "find_plan",
    "plan_lock",
    "read_plan",
    "sha256_file",
    "verify_onnx",
    "write_plan",
]

ENGINES_ENV = "CELLSEG3D_ENGINES"
PLAN_SUFFIX = ".plan"
# The ONNX contract between ``export`` and the engine: file names in the bundle, tensor names, and the
# ``bundle.json`` export records ("onnx", "fp16") that hold each file's sha256 and its model.pt's sha256.
ONNX_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_RECORDS = {ONNX_FILE: "onnx", FP16_FILE: "fp16"}
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
_CROSS_MAJOR = {(8, 10), (10, 11)}  # version-compatible plans across majors (TensorRT 11.4 support matrix)


def sha256_file(path: Path, /) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_onnx(bundle: Bundle, path: Path, /) -> str:
    """Check an exported ONNX file against the bundle and return its sha256.

    The file must be the one ``bundle.json``'s export record describes, exported from the ``model.pt``
    that is there now (a stale export after new weights is refused, not run).

    Raises:
        BackendUnavailableError: the file is missing (the message says how to export it).
        BundleError: the file or the weights changed since export.
    """
    if not path.is_file():
        raise BackendUnavailableError(f"{path}: missing; write it with 'cellseg3d export {bundle.path}'")
    sha = sha256_file(path)
    record = bundle.export.get(_RECORDS.get(path.name, ""), {})
    if isinstance(record, dict) and record.get("sha256") and record["sha256"] != sha:
        raise BundleError(
            f"{path}: not the file bundle.json records (sha256 {sha[:12]}..., recorded {str(record['sha256'])[:12]}...); "
            f"re-run 'cellseg3d export {bundle.path}'"
        )
    if isinstance(record, dict) and record.get("model_sha256"):
        weights = sha256_file(bundle.weights_path)
        if weights != record["model_sha256"]:
            raise BundleError(
                f"{path}: exported from another model.pt (sha256 {str(record['model_sha256'])[:12]}..., "
                f"{bundle.weights_path.name} is {weights[:12]}...); re-run 'cellseg3d export {bundle.path}'"
            )
    return sha


def engines_dir(bundle: Bundle, /) -> Path:
    """Where plans for ``bundle`` live: ``$CELLSEG3D_ENGINES/<bundle name>`` if set, else ``<bundle>/engines``.

    The variable lets an image keep a read-only bundle and cache plans in a mounted, writable folder.
    """
    override = os.environ.get(ENGINES_ENV)
    return Path(override) / bundle.name if override else bundle.path / "engines"


def _version_tuple(text: str) -> tuple[int, int, int]:
    match = _VERSION.match(text)
    if not match:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


@dataclass(frozen=True)
class Profile:
    """The one optimization profile of a plan: batch ``min..opt..max``, spatial ``min_spatial..patch_shape``.

    The spatial axes are dynamic so patches shrunk to a small volume still fit; TensorRT tunes for
    ``(opt_batch, channels, *patch_shape)``.
    """

    channels: int
    patch_shape: tuple[int, int, int]
    min_spatial: tuple[int, int, int]
    opt_batch: int
    max_batch: int
    min_batch: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            got = f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            raise ValueError(f"profile batches must satisfy 1 <= min <= opt <= max, got {got}")
        if any(lo < 1 or lo > hi for lo, hi in zip(self.min_spatial, self.patch_shape)):
            raise ValueError(f"profile spatial range {self.min_spatial}..{self.patch_shape} is empty")

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(min, opt, max)`` input shapes ``(N, C, Z, Y, X)`` for ``IOptimizationProfile.set_shape``."""
        return (
            (self.min_batch, self.channels, *self.min_spatial),
            (self.opt_batch, self.channels, *self.patch_shape),
            (self.max_batch, self.channels, *self.patch_shape),
        )

    def covers(self, spatial: tuple[int, ...], /) -> bool:
        """Whether patches of ``spatial`` (Z, Y, X) fit the profile (any batch is split to ``max_batch``)."""
        return all(lo <= s <= hi for s, lo, hi in zip(spatial, self.min_spatial, self.patch_shape))

    def tag(self) -> str:
        z, y, x = self.patch_shape
        return f"b{self.min_batch}-{self.opt_batch}-{self.max_batch}_c{self.channels}_p{z}x{y}x{x}_m{'x'.join(map(str, self.min_spatial))}"


@dataclass(frozen=True)
class Host:
    """What this machine runs: GPU compute capability, TensorRT version, and whether only the lean runtime is installed."""

    compute_capability: tuple[int, int]
    tensorrt_version: str
    lean_only: bool = False


@dataclass(frozen=True)
class EngineKey:
    """What a plan is valid for; see :meth:`mismatch` for which TensorRT runs a ``version_compatible`` plan."""

    compute_capability: tuple[int, int]
    tensorrt_version: str
    onnx_sha256: str
    profile: Profile
    version_compatible: bool = False

    def stem(self) -> str:
        """File name without suffix, unique per key."""
        major, minor = self.compute_capability
        vc = "_vc" if self.version_compatible else ""
        return f"sm{major}{minor}_trt{self.tensorrt_version}_{self.onnx_sha256[:16]}_{self.profile.tag()}{vc}"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["compute_capability"] = list(self.compute_capability)
        doc["profile"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.profile).items()}
        return doc

    @classmethod
    def from_json(cls, doc: Any, /, *, where: Path) -> EngineKey:
        """Parse the ``key`` object of a plan's JSON.

        Raises:
            BundleError: the object is not a key (the message names ``where``).
        """
        try:
            prof = doc["profile"]
            profile = Profile(
                channels=int(prof["channels"]), patch_shape=_triple(prof["patch_shape"]),
                min_spatial=_triple(prof["min_spatial"]), opt_batch=int(prof["opt_batch"]),
                max_batch=int(prof["max_batch"]), min_batch=int(prof.get("min_batch", 1)),
            )
            cc = doc["compute_capability"]
            key = cls(
                compute_capability=(int(cc[0]), int(cc[1])), tensorrt_version=str(doc["tensorrt_version"]),
                onnx_sha256=str(doc["onnx_sha256"]), profile=profile, version_compatible=bool(doc.get("version_compatible", False)),
            )
            _version_tuple(key.tensorrt_version)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{where}: not a plan key ({type(exc).__name__}: {exc}); delete it and its plan to rebuild") from exc
        return key

    def mismatch(self, host: Host, /, *, onnx_sha256: str, patch_shape: tuple[int, ...]) -> str | None:
        """Why this plan cannot run here for ``patch_shape`` patches of that ONNX, or None when it can."""
        if tuple(self.compute_capability) != tuple(host.compute_capability):
            have, want = ".".join(map(str, self.compute_capability)), ".".join(map(str, host.compute_capability))
            return f"built for compute capability {have}, this GPU is {want}"
        reason = self._version_mismatch(host)
        if reason is not None:
            return reason
        if self.onnx_sha256 != onnx_sha256:
            return f"built from another ONNX file (sha256 {self.onnx_sha256[:12]}..., the bundle's is {onnx_sha256[:12]}...)"
        if not self.profile.covers(tuple(patch_shape)):
            return f"profile {self.profile.min_spatial}..{self.profile.patch_shape} does not cover patch {tuple(patch_shape)}"
        return None


    def _version_mismatch(self, host: Host) -> str | None:
        """TensorRT's guarantee: a plan runs on the version that built it; a version-compatible one also on
        later full runtimes of the same major (and 8 -> 10, 10 -> 11); the lean runtime runs only
        version-compatible plans of its own version."""
        built, running = _version_tuple(self.tensorrt_version), _version_tuple(host.tensorrt_version)
        if not self.version_compatible:
            if host.lean_only:
                return "not version-compatible; the lean runtime (tensorrt_lean) runs only plans exported with --lean"
            if built != running:
                return f"built with TensorRT {self.tensorrt_version}, this is TensorRT {host.tensorrt_version}"
            return None
        if host.lean_only and built != running:
            return f"version-compatible plan from TensorRT {self.tensorrt_version}; the lean runtime {host.tensorrt_version} runs only its own version's"
        if built > running or (built[0] != running[0] and (built[0], running[0]) not in _CROSS_MAJOR):
            return f"version-compatible plan from TensorRT {self.tensorrt_version} cannot run on TensorRT {host.tensorrt_version}"
        return None


def _triple(value: Any) -> tuple[int, int, int]:
    if len(value) != 3:
        raise ValueError(f"expected 3 ints, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


@dataclass(frozen=True)
class PlanRecord:
    """A plan file, its JSON and the key read from it."""

    plan_path: Path
    json_path: Path
    key: EngineKey
    meta: dict[str, Any]


def _load_record(json_path: Path) -> PlanRecord:
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{json_path}: cannot read plan JSON ({exc}); delete it and its plan to rebuild") from exc
    if not isinstance(doc, dict) or "key" not in doc or "plan_sha256" not in doc:
        raise BundleError(f"{json_path}: plan JSON lacks 'key' or 'plan_sha256'; delete it and its plan to rebuild")
    key = EngineKey.from_json(doc["key"], where=json_path)
    return PlanRecord(plan_path=json_path.with_suffix(PLAN_SUFFIX), json_path=json_path, key=key, meta=doc)


def find_plan(
    directory: Path, /, *, host: Host, onnx_sha256: str, patch_shape: tuple[int, ...], max_batch: int
) -> tuple[PlanRecord | None, list[str]]:
    """The best plan in ``directory`` for this host and request, and why each other plan was passed over.

    Among fitting plans, one built for exactly this TensorRT version wins over a version-compatible one,
    then the one whose ``max_batch`` is closest to (and at least) ``max_batch``.

    Raises:
        BundleError: a plan JSON in ``directory`` is malformed.
    """
    fitting: list[PlanRecord] = []
    reasons: list[str] = []
    for json_path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if not json_path.with_suffix(PLAN_SUFFIX).is_file():
            continue  # e.g. a timing-cache note; only JSONs beside a plan are keys
        record = _load_record(json_path)
        reason = record.key.mismatch(host, onnx_sha256=onnx_sha256, patch_shape=patch_shape)
        if reason is None and record.meta.get("gate", {}).get("passed") is False:
            reason = "failed its accuracy gate"
        if reason is None:
            fitting.append(record)
        else:
            reasons.append(f"{record.plan_path.name}: {reason}")
    if not fitting:
        return None, reasons
    exact = _version_tuple(host.tensorrt_version)

    def rank(rec: PlanRecord) -> tuple[int, int, int]:
        same_version = _version_tuple(rec.key.tensorrt_version) == exact and not rec.key.version_compatible
        enough = rec.key.profile.max_batch >= max_batch
        return (0 if same_version else 1, 0 if enough else 1, abs(rec.key.profile.max_batch - max_batch))

    return min(fitting, key=rank), reasons


def read_plan(record: PlanRecord, /) -> bytes:
    """The plan's bytes, checked against the sha256 in its JSON.

    Raises:
        BundleError: the plan is missing, unreadable or not the file its JSON describes.
    """
    try:
        data = record.plan_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{record.plan_path}: cannot read plan ({exc})") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != record.meta.get("plan_sha256"):
        raise BundleError(
            f"{record.plan_path}: corrupt or replaced plan (sha256 {actual[:12]}... differs from "
            f"{str(record.meta.get('plan_sha256'))[:12]}... in {record.json_path.name}); delete both files to rebuild"
        )
    return data


def write_plan(directory: Path, key: EngineKey, plan: bytes, /, *, meta: dict[str, Any]) -> PlanRecord:
    """Write ``<stem>.plan`` and ``<stem>.json`` (key, sha256, ``meta``) atomically; returns the record."""
    directory.mkdir(parents=True, exist_ok=True)
    plan_path = directory / f"{key.stem()}{PLAN_SUFFIX}"
    doc = {**meta, "key": key.to_json(), "plan_sha256": hashlib.sha256(plan).hexdigest(), "plan_bytes": len(plan)}
    atomic_write_bytes(plan_path, plan)
    atomic_write_bytes(plan_path.with_suffix(".json"), (json.dumps(doc, indent=2) + "\n").encode())
    return PlanRecord(plan_path=plan_path, json_path=plan_path.with_suffix(".json"), key=key, meta=doc)


@contextmanager
def plan_lock(directory: Path, name: str, /) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.name.lock`` so two processes do not build the same plan at once.

    Raises:
        BackendUnavailableError: the folder cannot be created or written (the message names it).
    """
    import fcntl  # POSIX only; the GPU runtime images are Linux

    lock = directory / f".{name}.lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as exc:
        raise BackendUnavailableError(
            f"{directory}: cannot write TensorRT plans there ({exc}); set {ENGINES_ENV} to a writable folder"
        ) from exc
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
