"""What a run reports back to BisQue: the ``Metadata`` output and the MEX ``outputs`` tags (as bqapi tag dicts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .inputs import Params

__all__ = ["dataset_outputs_tag", "metadata", "outputs_tag"]


def _x(values: Sequence[Any]) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def metadata(result: Any, params: Params, bundle: Any, /, *, voxel: Sequence[float] | None,
             io_s: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The ``Metadata`` output: what ran, with which parameters and voxel size, and the seconds per stage
    (``io_s``: the wrapper's own, such as fetch and upload)."""
    report = result.report
    timings = {**report.timings, **(io_s or {})}
    defaults = bundle.postprocess
    return {
        "cell_count": report.n_cells, "backend": report.backend, "precision": report.precision,
        "device": report.device, "patch_shape": _x(report.patch_shape),
        "batch_size": report.batch_size, "model": bundle.name, "input": params.resource_url,
        "image_shape": _x(report.shape[-3:]),
        "voxel_size_um": _x([float(v) for v in voxel]) if voxel else "unknown",
        "threshold": params.threshold if params.threshold is not None else defaults.threshold,
        "threshold_used": report.threshold,  # lower on a zoomed-up model grid (engine.scale.ScalePlan.postprocess)
        "min_dist": params.min_dist if params.min_dist is not None else defaults.min_dist,
        "label_threshd": params.label_threshd if params.label_threshd is not None else defaults.label_threshd,
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total": round(sum(timings.values()), 3)},
    }


def _tag(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"name": name, "tag": [_tag(k, v) for k, v in value.items()]}
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"name": name, "value": str(value), **({"type": "number"} if numeric else {})}


def outputs_tag(segmentation_uri: str, table_uri: str, meta: Mapping[str, Any], /) -> dict[str, Any]:
    """The MEX ``outputs`` tag of one image, in the module XML's output order."""
    return {"name": "outputs", "tag": [
        {"name": "Segmentation", "type": "image", "value": segmentation_uri},
        {"name": "Cell table", "type": "table", "value": table_uri},
        _tag("Metadata", dict(meta)),
    ]}


def dataset_outputs_tag(dataset_url: str | None, mex_url: str, /) -> dict[str, Any]:
    """The ``outputs`` of a MEX whose sub-MEXes hold the results: the dataset (a top MEX has it, a block does
    not) and the MEX, as BisQue's engine writes them after an iterated run (``command_run.command_finish2``)."""
    dataset = [{"name": "resource_url", "type": "dataset", "value": dataset_url}] if dataset_url else []
    return {"name": "outputs", "tag": [*dataset, {"name": "mex_url", "type": "mex", "value": mex_url}]}
