"""``cellseg3d segment``: one stack, or many with the model and backend loaded once.

Everything that can be checked without the network is checked before torch is imported: the argument
values (argparse types), that each input is a readable TIFF (its header), and that no output would replace
an input or another output. A single stack that fails is an error (exit 2 for input errors, 1 otherwise);
with many stacks a failing one is reported and skipped, the others complete, and the run exits 1 with the
list of the failed ones.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import io
from .backend_names import BACKEND_CHOICES
from .cli_args import count, fraction, parse_shape, parse_voxel_size, positive_float, positive_int, probability
from .errors import CellSegError, InputError

__all__ = ["StackJob", "add_segment", "plan_jobs"]

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class StackJob:
    """One stack and where its outputs go (None: not asked for); ``voxels`` from its header."""

    input: Path
    labels: Path
    prob: Path | None = None
    table: Path | None = None
    report: Path | None = None
    voxels: int = 0

    @property
    def outputs(self) -> tuple[Path | None, ...]:
        return (self.labels, self.prob, self.table, self.report)


def add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment cells in 3D TIFF stacks", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="3D TIFF (ZYX, CZYX, ImageJ hyperstack or OME-TIFF); several, a folder or a quoted glob for many stacks")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="label TIFF to write; with many stacks a folder (OUT/<name>_labels.tif)")
    p.add_argument("--bundle", type=Path, default=None, help="model bundle directory (default: the shipped model)")
    p.add_argument("--channel", type=count, default=None, help="channel to segment in a multi-channel image")
    p.add_argument("--prob", type=Path, default=None, help="also write the probability map here (many stacks: a folder)")
    p.add_argument("--table", type=Path, default=None, help="also write the per-cell table (CSV) here (many stacks: a folder)")
    p.add_argument("--report", type=Path, default=None, help="also write the run report (JSON) here (many stacks: a folder)")
    run = p.add_argument_group("inference")
    run.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="inference backend")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="arithmetic precision")
    run.add_argument("--patch", type=parse_shape, default=None, help="patch Z,Y,X (default: the bundle's)")
    run.add_argument("--overlap", type=fraction, default=None, help="patch overlap fraction (default: the bundle's)")
    run.add_argument("--batch", type=positive_int, default=None, help="patches per batch (default on CPU: 1, or 2 for a streamed stack or with --memory-limit; fitted to the free memory on CUDA)")
    run.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all available)")
    run.add_argument("--tta", action="store_true",
                     help="average the network over the 8 flips of each patch: 8x its time, a little more accurate")
    scale = p.add_argument_group("scale (the network runs at the cell size and voxel grid it was trained at)")
    scale.add_argument("--voxel-size", type=parse_voxel_size, default=None, help="Z,Y,X in µm (default: the file's, if it says)")
    scale.add_argument("--cell-diameter", type=positive_float, default=None,
                       help="typical cell diameter: µm with a voxel size, else xy voxels (default: estimated from the data)")
    scale.add_argument("--rescale", choices=("auto", "off"), default="auto", help="off: run on the input grid as it is")
    big = p.add_argument_group("big stacks (streamed in z-slabs when the working set exceeds the memory limit)")
    big.add_argument("--memory-limit", type=positive_float, default=None, help="host working-memory budget in GiB for the run's buffers (default: 2 less 0.375 for python, torch and the model, at most half the free memory)")
    big.add_argument("--slab-depth", type=positive_int, default=None, help="input planes per z-slab (default: from the memory limit)")
    big.add_argument("--halo", type=count, default=None, help="watershed halo, input planes on each side of a slab (default: max(8, 2*min-dist) at the model's scale)")
    post = p.add_argument_group("post-processing (defaults from the bundle)")
    post.add_argument("--threshold", type=probability, default=None,
                      help="cell-interior probability threshold (lowered on a zoomed-up model grid, see the README)")
    post.add_argument("--min-dist", type=positive_int, default=None, help="minimum distance between watershed seeds (voxels at the model's scale)")
    post.add_argument("--label-threshd", type=count, default=None, help="drop cells smaller than this (voxels at the model's scale)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_segment)


def _expand(inputs: list[Path]) -> tuple[list[Path], bool]:
    """Files named, folders' TIFFs and globs' matches, in order; True when a folder or glob was given."""
    found: list[Path] = []
    many = len(inputs) > 1
    for given in inputs:
        if given.is_dir():
            matches = sorted(p for p in given.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file())
            if not matches:
                raise InputError(f"{given}: a folder with no .tif/.tiff files")
            found += matches
            many = True
        elif not given.exists() and glob.has_magic(str(given)):
            matches = sorted(Path(p) for p in glob.glob(str(given)) if Path(p).is_file())
            if not matches:
                raise InputError(f"{given}: matches no file")
            found += matches
            many = True
        else:
            found.append(given)
    return found, many


def _in_folder(folder: Path | None, stem: str, suffix: str, what: str) -> Path | None:
    if folder is None:
        return None
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: with many stacks {what} must be a folder")
    return folder / f"{stem}{suffix}"


def _identity(path: Path) -> tuple[int, int] | Path:
    """The file itself (device, inode: a link is the same file), or the resolved path when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return path.resolve()
    return (st.st_dev, st.st_ino)


def plan_jobs(args: argparse.Namespace) -> tuple[list[StackJob], bool]:
    """The stacks to segment and their outputs; True for a many-stack run.

    Raises:
        InputError: an output would replace an input or another output, or two stacks share a name.
    """
    inputs, many = _expand(list(args.inputs))
    many = many or args.output.is_dir() or str(args.output).endswith(("/", "\\"))
    if not many:
        return [StackJob(inputs[0], args.output, args.prob, args.table, args.report)], False
    jobs, stems = [], {}
    for path in inputs:
        stem = path.name.split(".")[0]
        if stem in stems:
            raise InputError(f"{path}: has the same name as {stems[stem]}; their outputs would collide")
        stems[stem] = path
        jobs.append(StackJob(
            path, _in_folder(args.output, stem, "_labels.tif", "-o") or args.output, _in_folder(args.prob, stem, "_prob.tif", "--prob"),
            _in_folder(args.table, stem, "_cells.csv", "--table"), _in_folder(args.report, stem, "_report.json", "--report"),
        ))
    for folder in (args.output, args.prob, args.table, args.report):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)  # an empty folder is not a partial output
    inputs = {_identity(job.input): job.input for job in jobs}
    for job in jobs:
        for out in job.outputs:
            if out is not None and out.exists() and _identity(out) in inputs:
                raise InputError(f"{out}: is the input image {inputs[_identity(out)]}; choose another output folder")
    return jobs, True


def _checked(job: StackJob, channel: int | None) -> StackJob:
    """``job`` with its voxel count, after its outputs and its TIFF header were checked (InputError if not)."""
    io.refuse_overwrites(job.input, *job.outputs)
    with io.open_volume(job.input, channel=channel, channels=None) as reader:
        voxels = reader.shape[1] * reader.shape[2] * reader.shape[3]
    return StackJob(job.input, job.labels, job.prob, job.table, job.report, voxels)


class _Progress:
    """One bar over every stack's voxels (the engine reports each stack's own count)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.offset = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="vox", unit_scale=True, file=sys.stderr, leave=False)

    def for_stack(self) -> Callable[[int, int], None] | None:
        if self.bar is None:
            return None
        bar, offset = self.bar, self.offset

        def update(done: int, total: int) -> None:
            bar.update(offset + done - bar.n)

        return update

    def done(self, job: StackJob) -> None:
        self.offset += job.voxels

    def line(self, text: str, *, error: bool = False) -> None:
        stream = sys.stderr if error else sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_extras(job: StackJob, result) -> None:  # noqa: ANN001 - engine.pipeline.SegmentResult (imported late)
    if job.table is not None:
        from .cells import cell_table, write_cell_table_csv

        write_cell_table_csv(job.table, cell_table(result.labels, voxel_size_um=result.report.voxel_size_um))
    if job.report is not None:
        outputs = {"labels": job.labels, "probabilities": job.prob, "table": job.table}
        result.report.write_json(job.report, input=str(job.input), outputs={k: str(v) for k, v in outputs.items() if v})


def _options(args: argparse.Namespace):  # noqa: ANN202 - engine.run_plan.SegmentOptions (imported late)
    from .pipeline import SegmentOptions

    return SegmentOptions(
        backend=args.backend, precision=args.precision, patch_shape=args.patch, overlap=args.overlap,
        batch_size=args.batch, threads=args.threads, threshold=args.threshold, min_dist=args.min_dist,
        label_threshd=args.label_threshd, slab_depth=args.slab_depth, halo=args.halo,
        memory_limit_gib=args.memory_limit, progress_unit="voxel", voxel_size_um=args.voxel_size,
        cell_diameter=args.cell_diameter, rescale=args.rescale, tta=args.tta,
    )


def _cmd_segment(args: argparse.Namespace) -> int:
    jobs, many = plan_jobs(args)
    ready, failed = [], []
    for job in jobs:
        try:
            ready.append(_checked(job, args.channel))
        except InputError as exc:
            if not many:
                raise
            print(f"cellseg3d segment: skipped: {exc}", file=sys.stderr)
            failed.append(job.input)
    failed += _run_jobs(args, ready, many)
    if failed:
        print(f"cellseg3d segment: {len(failed)} of {len(jobs)} stacks failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


def _prefetch(path: Path) -> None:
    """Ask the kernel to read the next stack into the page cache while this one runs (network storage)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # reported when its turn comes
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _run_jobs(args: argparse.Namespace, jobs: list[StackJob], many: bool) -> list[Path]:
    """Segment each job with one bundle and backend; returns the inputs that failed (many stacks only)."""
    if not jobs:
        return []
    from .backends import BackendOptions, select_backend
    from .bundle import load_bundle
    from .pipeline import segment_file

    options = _options(args)
    bundle = load_bundle(args.bundle)
    backend = select_backend(options.backend, bundle, options=BackendOptions(precision=options.precision, threads=options.threads))
    progress = _Progress(sum(job.voxels for job in jobs), not args.no_progress and sys.stderr.isatty())
    failed = []
    try:
        for i, job in enumerate(jobs):
            if i + 1 < len(jobs):
                _prefetch(jobs[i + 1].input)
            try:
                result = segment_file(job.input, job.labels, bundle=bundle, options=options, channel=args.channel,
                                      prob_path=job.prob, progress=progress.for_stack(), backend=backend)
                _write_extras(job, result)
                progress.line(f"{job.labels}: {result.report.summary()}")
            except (CellSegError, OSError, RuntimeError, MemoryError) as exc:
                if not many:
                    raise
                progress.line(f"cellseg3d segment: {job.input}: failed: {' '.join(str(exc).split())}", error=True)
                failed.append(job.input)
            progress.done(job)
    finally:
        progress.close()
        backend.close()
    return failed
