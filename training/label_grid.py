"""Labels on the input grid (shipped) vs on the model's grid, on the validation stacks of the stress rows
that zoom (the experiment behind the README's "labelling on the model grid" figures).

Command (from the repository root)::

    python -m training.label_grid

For each row whose run zooms (anisotropy, dome), its validation stack (seed ``BASELINE_SEED_BASE`` + row
index; never the stress seeds) is segmented as shipped, then upsampled whole (trilinear) to the zoom that
run chose, segmented there with rescaling off (labels on the isotropic model grid) and the labels sampled
back onto the input grid at the nearest voxel centre. Prints F1@0.5 / mean matched IoU for both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.bundle import load_bundle
from engine.metrics import match_instances
from engine.pipeline import SegmentOptions, segment

from .stress import BASELINE_SEED_BASE, stress_rows

__all__ = ["labels_on_model_grid", "main"]


def labels_on_model_grid(image: np.ndarray, zoom: tuple[float, float, float], bundle) -> np.ndarray:  # noqa: ANN001
    """``image`` zoomed to the model grid, segmented there, labels sampled back onto ``image``'s grid."""
    size = tuple(max(1, round(s * z)) for s, z in zip(image.shape, zoom))
    up = F.interpolate(torch.from_numpy(image.astype(np.float32))[None, None], size=size, mode="trilinear", align_corners=False)
    labels = segment(up[0, 0].numpy(), bundle=bundle, options=SegmentOptions(rescale="off")).labels
    centre = [np.clip(np.floor((np.arange(n) + 0.5) * (m / n)).astype(int), 0, m - 1) for n, m in zip(image.shape, size)]
    return labels[np.ix_(*centre)]


def main() -> int:
    bundle = load_bundle(None)
    for i, row in enumerate(stress_rows()):
        vol = row.volume(BASELINE_SEED_BASE + i)
        shipped = segment(vol.image, bundle=bundle, options=SegmentOptions(), voxel_size_um=row.voxel_size_um)
        if shipped.report.scale.identity:
            continue  # the run does not zoom: both ways are the same
        zoom = shipped.report.scale.zoom
        a = match_instances(shipped.labels, vol.labels, iou_threshold=0.5)
        b = match_instances(labels_on_model_grid(vol.image, zoom, bundle), vol.labels, iou_threshold=0.5)
        print(f"{row.name} (zoom {', '.join(f'{z:.2f}' for z in zoom)}): input grid F1 {a.f1:.3f} IoU {a.mean_matched_iou:.3f}"
              f" | model grid F1 {b.f1:.3f} IoU {b.mean_matched_iou:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
