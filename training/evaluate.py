r"""Accuracy of a bundle on held-out synthetic membrane volumes, as a markdown table.

Command (from the repository root; the shipped bundle by default)::

    python -m training.evaluate [--bundle engine/default_bundle] [--old-bundle DIR] [--json /tmp/eval.json]
                                [--quick] [--record]

It segments, through ``engine.segment`` with the bundle's own settings, generated volumes whose seeds and
shapes were never used for training or validation (``training/data.py``): three 64x256x256 volumes at
voxel_scale 1 (seeds 700-702), and one each at voxel_scale 0.75 and 1.5 (seeds 710, 711) for voxel-size
robustness. For each it reports mean matched IoU, precision/recall/F1 at IoU 0.5 and the adapted Rand
error (``engine.metrics.match_instances``). Finally it compares bf16 with fp32 on the first volume:
the Dice of the foreground (cell-interior) masks and the largest probability difference; skipped where
the CPU lacks native bf16. Then the stress matrix (``training/stress.py``): one held-out volume of the second
simulator per pushed factor, for this bundle, ``--old-bundle`` (rescaling off) and the classical baseline.
``--quick`` uses 48x160x160 volumes (and smaller stress volumes). ``--record`` also writes the figures into
the bundle's ``bundle.json`` (``validation.held_out_evaluation``).

As a library::

    from training.evaluate import evaluate, format_report
    report = evaluate(load_bundle(None))
    print(format_report(report))
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.torch_backend import cpu_has_native_bf16
from engine.bundle import Bundle, load_bundle, write_bundle_json
from engine.metrics import foreground_dice, match_instances
from engine.pipeline import SegmentOptions, segment
from engine.labels import interior_probability
from engine.synthetic import make_membrane_volume

from .data import EVAL_SCALE_SEEDS, EVAL_SEEDS
from .stress import format_stress, run_stress

__all__ = [
    "Case", "default_cases", "score_case", "precision_agreement", "evaluate", "format_report", "held_out_record", "main",
]

_METRICS = ("n_gt", "n_pred", "mean_matched_iou", "precision", "recall", "f1", "adapted_rand_error")


@dataclass(frozen=True)
class Case:
    """One generated test volume: ``make_membrane_volume(shape, seed=seed, voxel_scale=voxel_scale)``."""

    name: str
    seed: int
    shape: tuple[int, int, int]
    voxel_scale: float = 1.0
    group: str = "held-out"

    def make(self):  # noqa: ANN201 - engine.synthetic.SyntheticVolume
        return make_membrane_volume(self.shape, seed=self.seed, voxel_scale=self.voxel_scale)


def default_cases(*, quick: bool = False) -> list[Case]:
    """Three held-out volumes at voxel_scale 1, then one at 0.75 and one at 1.5."""
    shape = (48, 160, 160) if quick else (64, 256, 256)
    cases = [Case(f"seed {s}", s, shape) for s in EVAL_SEEDS]
    for seed, scale in zip(EVAL_SCALE_SEEDS, (0.75, 1.5)):
        cases.append(Case(f"seed {seed}, scale {scale}", seed, shape, voxel_scale=scale, group="voxel size"))
    return cases


def score_case(bundle: Bundle, case: Case, /, *, options: SegmentOptions = SegmentOptions()) -> dict[str, Any]:
    """Segment one case and score it against its ground truth; also the run's seconds and backend."""
    volume = case.make()
    result = segment(volume.image, bundle=bundle, options=options)
    scores = match_instances(result.labels, volume.labels, iou_threshold=0.5).to_dict()
    return {
        "case": case.name, "group": case.group, "shape": list(case.shape), "voxel_scale": case.voxel_scale,
        **{k: scores[k] for k in _METRICS},
        "seconds": round(sum(result.report.timings.values()), 2), "precision_used": result.report.precision,
    }


def precision_agreement(bundle: Bundle, case: Case, /) -> dict[str, Any] | None:
    """bf16 against fp32 on ``case``: foreground Dice, max probability difference, both F1s; None without bf16."""
    if not cpu_has_native_bf16():
        return None
    volume = case.make()
    runs = {p: segment(volume.image, bundle=bundle, options=SegmentOptions(backend="torch-cpu", precision=p))
            for p in ("fp32", "bf16")}
    threshold = bundle.postprocess.threshold
    masks = {p: interior_probability(r.probabilities, bundle.output) > threshold for p, r in runs.items()}
    return {
        "case": case.name,
        "foreground_dice": foreground_dice(masks["fp32"], masks["bf16"]),
        "max_abs_prob_diff": float(np.max(np.abs(runs["fp32"].probabilities - runs["bf16"].probabilities))),
        "f1_fp32": match_instances(runs["fp32"].labels, volume.labels).f1,
        "f1_bf16": match_instances(runs["bf16"].labels, volume.labels).f1,
        "infer_s_fp32": round(runs["fp32"].report.timings["infer"], 2),
        "infer_s_bf16": round(runs["bf16"].report.timings["infer"], 2),
    }


def evaluate(bundle: Bundle, /, *, cases: list[Case] | None = None, compare_precision: bool = True) -> dict[str, Any]:
    """Score every case (default: ``default_cases()``) and, optionally, bf16 against fp32 on the first."""
    cases = default_cases() if cases is None else cases
    started = time.perf_counter()
    rows = [score_case(bundle, case) for case in cases]
    agreement = precision_agreement(bundle, cases[0]) if compare_precision else None
    skipped = None if agreement else ("not asked for" if not compare_precision else "this CPU has no native bf16")
    return {"bundle": str(bundle.path), "rows": rows, "precision_agreement": agreement,
            "precision_skipped": skipped, "wall_time_s": round(time.perf_counter() - started, 1)}


def _mean_row(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    mean: dict[str, Any] = {"case": name}
    for key in _METRICS:
        mean[key] = float(np.mean([r[key] for r in rows]))
    mean["seconds"] = float(np.mean([r["seconds"] for r in rows]))
    return mean


def format_report(report: dict[str, Any], /) -> str:
    """The markdown table (per volume, mean of the held-out group) and the bf16/fp32 line."""
    rows = report["rows"]
    header = ("| volume | shape | cells (gt / pred) | mean matched IoU | precision@0.5 | recall@0.5 | F1@0.5 "
              "| adapted Rand error | seconds |")
    lines = [header, "|" + "---|" * 9]

    def line(r: dict[str, Any], shape: str) -> str:
        cells = f"{r['n_gt']:.0f} / {r['n_pred']:.0f}"
        return (f"| {r['case']} | {shape} | {cells} | {r['mean_matched_iou']:.3f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['f1']:.3f} | {r['adapted_rand_error']:.3f} | {r['seconds']:.1f} |")

    held_out = [r for r in rows if r["group"] == "held-out"]
    for r in held_out:
        lines.append(line(r, "x".join(map(str, r["shape"]))))
    if held_out:
        lines.append(line(_mean_row(held_out, "**mean (held-out)**"), ""))
    for r in rows:
        if r["group"] != "held-out":
            lines.append(line(r, "x".join(map(str, r["shape"]))))
    agreement = report.get("precision_agreement")
    if agreement:
        lines.append("")
        lines.append(
            f"bf16 vs fp32 on {agreement['case']}: foreground Dice {agreement['foreground_dice']:.4f}, "
            f"max |prob diff| {agreement['max_abs_prob_diff']:.3f}, F1@0.5 fp32 {agreement['f1_fp32']:.3f} / "
            f"bf16 {agreement['f1_bf16']:.3f}, inference {agreement['infer_s_fp32']:.1f} s fp32 / "
            f"{agreement['infer_s_bf16']:.1f} s bf16"
        )
    elif report.get("precision_skipped"):
        lines.append("")
        lines.append(f"bf16 vs fp32: skipped ({report['precision_skipped']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory. Default: the shipped one")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--quick", action="store_true", help="48x160x160 volumes instead of 64x256x256")
    parser.add_argument("--no-bf16-check", action="store_true", help="skip the bf16 vs fp32 comparison")
    parser.add_argument("--old-bundle", type=Path, default=None, help="also score this bundle on the stress rows, rescaling off")
    parser.add_argument("--no-stress", action="store_true", help="skip the stress matrix")
    parser.add_argument("--probe", action="store_true",
                        help="also score the probe rows, factors past the training ranges (training.stress.probe_rows)")
    parser.add_argument("--tta", action="store_true", help="also score the model with test-time flips on the stress rows (nothing with --no-stress)")
    parser.add_argument("--record", action="store_true",
                        help="write the figures into the bundle's bundle.json (validation.held_out_evaluation)")
    return parser


def held_out_record(report: dict[str, Any], /, *, command: str) -> dict[str, Any]:
    """What ``--record`` stores: the command, the held-out means, every row and the bf16/fp32 comparison."""
    held_out = [r for r in report["rows"] if r["group"] == "held-out"]
    mean = _mean_row(held_out, "mean") if held_out else {}
    rounded = lambda row: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}  # noqa: E731
    agreement = report.get("precision_agreement")
    return {
        "command": command,
        "mean_held_out": {k: round(mean[k], 4) for k in _METRICS if k not in ("n_gt", "n_pred")} if mean else {},
        "rows": [rounded(r) for r in report["rows"]],
        "bf16_vs_fp32": rounded(agreement) if agreement else report.get("precision_skipped"),
        "wall_time_s": report["wall_time_s"],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bundle = load_bundle(args.bundle)
    report = evaluate(bundle, cases=default_cases(quick=args.quick), compare_precision=not args.no_bf16_check)
    command = f"python -m training.evaluate {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    print(format_report(report))
    if not args.no_stress:
        old = load_bundle(args.old_bundle) if args.old_bundle is not None else None
        report["stress"] = run_stress(bundle, old_bundle=old, quick=args.quick, tta=args.tta)
        print("\n" + format_stress(report["stress"]))
    if args.probe:
        report["probe"] = run_stress(bundle, quick=args.quick, probe=True)
        print("\nProbe rows, past the training ranges:\n" + format_stress(report["probe"]))
    extra = "".join(f" + {key} {report[key]['wall_time_s']:.0f} s" for key in ("stress", "probe") if key in report)
    print(f"\n({report['wall_time_s']:.0f} s{extra}; {command})")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.record:
        validation = {**bundle.validation, "held_out_evaluation": held_out_record(report, command=command)}
        if "stress" in report:
            validation["stress_evaluation"] = {"command": command, **report["stress"]}
        write_bundle_json(replace(bundle, validation=validation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
