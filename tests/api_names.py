"""The TensorRT and ONNX Runtime API the engine uses, read from its source, and that API in the real packages.

:func:`used_api` walks the backend sources (:data:`SOURCES`): every ``trt.X.Y`` / ``ort.X.Y`` chain, and
every attribute and keyword used on objects whose class is known from the variable's name (:data:`ROLES`).
:func:`describe` reads those names from a real module (enum members and values, parameter names from the
signature or, for pybind11 functions, from their signature lines). ``engine/trt_api_snapshot.json`` holds
that description for the real TensorRT 11.x wheels; CI regenerates and compares it, and the stand-in module
of ``test_trt_build.py`` is built from it, so the stand-in cannot drift from the real bindings.
"""

from __future__ import annotations

import ast
import enum
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "DESCRIBE_TRT", "ROLES", "SNAPSHOT", "SOURCES", "Usage", "describe", "load_snapshot", "problems", "snapshot_enum", "used_api",
]

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).resolve().parent / "engine" / "trt_api_snapshot.json"
# module -> (its name in the source, the sources whose names it must have). The lean runtime runs plans;
# only the full package builds.
SOURCES = {
    "tensorrt": ("trt", ("engine/backends/trt_build.py", "engine/backends/trt_runtime.py")),
    "tensorrt_lean": ("trt", ("engine/backends/trt_runtime.py",)),
    "onnxruntime": ("ort", ("engine/backends/ort_backend.py",)),
}
# per module: variable (as written in the source) -> the class it holds
_TRT_ROLES = {
    "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
    "optimization_profile": "IOptimizationProfile", "cache": "ITimingCache", "fresh": "ITimingCache",
    "serialized": "IHostMemory", "self._runtime": "Runtime", "engine": "ICudaEngine", "self.engine": "ICudaEngine",
    "self.context": "IExecutionContext",
}
ROLES = {
    "tensorrt": _TRT_ROLES,
    "tensorrt_lean": _TRT_ROLES,
    "onnxruntime": {
        "opts": "SessionOptions", "session": "InferenceSession", "self.session": "InferenceSession", "binding": "IOBinding",
        "self.run_options": "RunOptions", "ort.InferenceSession": "InferenceSession",
    },
}
# run in a child Python where the real ``tensorrt`` and ``tensorrt_lean`` import (tests/real_packages.py)
DESCRIBE_TRT = """
import json, api_names, tensorrt, tensorrt_lean
mods = (("tensorrt", tensorrt), ("tensorrt_lean", tensorrt_lean))
print(json.dumps({n: api_names.describe(m, api_names.used_api(n)) for n, m in mods}, indent=1, sort_keys=True))
"""
_SIGNATURE = re.compile(r"^(?:\d+\. )?(\w+)\((.*?)\)(?: ->|$)", re.MULTILINE)


@dataclass
class Usage:
    """Names one set of sources uses: ``trt.`` chains, ``(class, attribute)`` pairs, ``(class, method)`` keywords."""

    chains: set[str] = field(default_factory=set)
    attributes: set[tuple[str, str]] = field(default_factory=set)
    keywords: dict[tuple[str, str], set[str]] = field(default_factory=dict)


def _chain(node: ast.AST, alias: str) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == alias and parts[-1] != "__name__":
        return ".".join(reversed(parts))
    return None


def _record_call(usage: Usage, node: ast.Call, roles: dict[str, str]) -> None:
    """Keywords of ``role.method(...)`` and of ``ort.Class(...)`` constructors."""
    func = ast.unparse(node.func)
    if func in roles:
        key = (roles[func], "__init__")
    elif isinstance(node.func, ast.Attribute) and ast.unparse(node.func.value) in roles:
        key = (roles[ast.unparse(node.func.value)], node.func.attr)
    else:
        return
    usage.keywords.setdefault(key, set()).update(k.arg for k in node.keywords if k.arg)


def used_api(module: str, /) -> Usage:
    """What the engine's backend code uses of ``module`` (a key of :data:`SOURCES`)."""
    alias, sources = SOURCES[module]
    roles = ROLES[module]
    usage = Usage()
    for rel in sources:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Attribute):
                chain = _chain(node, alias)
                if chain and not isinstance(node.ctx, ast.Store):
                    usage.chains.add(chain)
                elif ast.unparse(node.value) in roles:
                    usage.attributes.add((roles[ast.unparse(node.value)], node.attr))
            if isinstance(node, ast.Call):
                _record_call(usage, node, roles)
    usage.chains = {c for c in usage.chains if not any(other.startswith(c + ".") for other in usage.chains)}
    return usage


def _parameters(function: Any) -> list[str]:
    """Parameter names of a Python function, or of a pybind11 one from its signature lines (every overload)."""
    try:
        return [p for p in inspect.signature(function).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        pass
    names: list[str] = []
    for _, params in _SIGNATURE.findall(getattr(function, "__doc__", "") or ""):
        for param in params.split(", "):
            name = param.split(":")[0].split("=")[0].strip()
            if name and name not in ("self", "*args", "**kwargs") and name not in names:
                names.append(name)
    return names


def describe(trt: ModuleType, usage: Usage, /) -> dict[str, Any]:
    """The real module's answer for every name in ``usage``: enums (member -> value), methods (parameters),
    and which names are missing."""
    enums: dict[str, dict[str, int]] = {}
    missing: list[str] = []
    for chain in sorted(usage.chains):
        obj: Any = trt
        for part in chain.split("."):
            if not hasattr(obj, part):
                missing.append(chain)
                break
            parent, obj = obj, getattr(obj, part)
        else:
            members = getattr(parent, "__members__", None)
            if members is not None and "." in chain:
                enums[chain.rsplit(".", 1)[0]] = {k: int(v) for k, v in members.items()}
    methods: dict[str, list[str]] = {}
    for cls_name, attr in sorted(usage.attributes | set(usage.keywords)):
        cls = getattr(trt, cls_name, None)
        if cls is None or not hasattr(cls, attr):
            missing.append(f"{cls_name}.{attr}")
        elif callable(getattr(cls, attr)):
            methods[f"{cls_name}.{attr}"] = _parameters(getattr(cls, attr))
    return {"version": str(trt.__version__), "enums": enums, "methods": methods, "missing": missing}


def problems(description: dict[str, Any], usage: Usage, /) -> list[str]:
    """Names the code uses that the module lacks, and keywords its methods do not take."""
    found = [f"missing: {name}" for name in description["missing"]]
    for (cls_name, method), keywords in sorted(usage.keywords.items()):
        params = description["methods"].get(f"{cls_name}.{method}", [])
        found += [f"{cls_name}.{method} takes no keyword {k!r} (takes {params})" for k in sorted(keywords) if k not in params]
    return found


def load_snapshot() -> dict[str, Any]:
    """The committed description of the real wheels (``{"tensorrt": ..., "tensorrt_lean": ...}``)."""
    doc: dict[str, Any] = json.loads(SNAPSHOT.read_text())
    return doc


def snapshot_enum(section: dict[str, Any], name: str, /) -> type[enum.IntEnum]:
    """An ``IntEnum`` with the real members and values of enum ``name`` (e.g. ``BuilderFlag``)."""
    members: dict[str, int] = section["enums"][name]
    made: type[enum.IntEnum] = enum.IntEnum(name.rsplit(".", 1)[-1], members)  # type: ignore[misc]
    return made
