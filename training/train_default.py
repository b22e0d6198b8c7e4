r"""Train the default boundary model shipped in ``engine/default_bundle`` (plain torch, CPU or CUDA).

How the shipped model was trained, stage by stage with each command, and what was tried and not kept:
``training/STAGES.md``.

On a GPU host, ``scripts/train_gpu.sh OUT [SECONDS]`` runs ``--device cuda`` (bf16 autocast), ``--workers``
(the host's cores make the training volumes ahead of the steps; the same volumes as without workers) and
``--time-limit`` (the cosine decay runs over the wall clock, so the run fits one device call). Checkpoints
written on a GPU hold CUDA tensors; ``--init`` and resuming load them onto the CPU first.

A new run starts from random weights, or with ``--init`` from a training checkpoint's or a bundle's
weights (fresh optimizer, step 0, fresh data pool).

Rerunning the same command resumes from ``--checkpoint`` if it exists (model, optimizer, step, data pool
and random states are all in it). When the steps are done it writes the weights to
``engine/default_bundle`` (``--bundle-out``); ``python -m training.tune_postprocess`` then tunes the
post-processing defaults on validation volumes and records the figures in ``bundle.json``.

Model: pytorch-3dunet ``UNet3D`` (layer order ``gcr``, f_maps 16 -> [16, 32, 64], 3 levels, GroupNorm 8
groups), one output channel: the boundary (membrane) probability. Loss: BCE + soft Dice on that channel.
Optimizer: AdamW, lr 2e-3 (``--lr``; 1e-3 for the fine-tune) with 50 warm-up steps and cosine decay to 2 % of it, weight decay 1e-4. Batches of
2 crops of 32x64x64 voxels, bf16 autocast and ``channels_last_3d`` on CPUs with native bf16.

Data (``training/data.py``): a pool of 32 membrane volumes (48x128x128; ``engine.synthetic`` with cell
diameter 11-17, voxel_scale 0.7-1.6, uint8 or uint16, and with ``--p-tissue`` that fraction from
``engine.tissue``), one replaced by a fresh volume every 4 steps on average; crops are rotated/flipped and
given random gain, offset, gamma and noise.

Measured wall time: see ``training.wall_time_s`` in ``engine/default_bundle/bundle.json`` (the machine is
``training.machine`` there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.backends.torch_backend import cpu_has_native_bf16
from engine.bundle import (
    DEFAULT_BUNDLE_DIR,
    Bundle,
    OutputSpec,
    PostprocessSpec,
    load_bundle,
    make_bundle,
)
from engine.models.unet3d import UNet3D

from .data import (
    NORMALIZATION,
    TRAIN_SEED_BASE,
    DataSettings,
    TrainVolume,
    make_train_volume,
    sample_crop,
)

__all__ = ["ARCH_KWARGS", "TrainConfig", "build_parser", "main", "bundle_template", "train"]

logger = logging.getLogger("training.train_default")

ARCH_KWARGS = {
    "in_channels": 1, "out_channels": 1, "final_sigmoid": True, "f_maps": 16, "num_levels": 3,
    "layer_order": "gcr", "num_groups": 8,
}
OUTPUT = OutputSpec(kind="boundary", channel=0, names=("boundary",))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint and in bundle.json)."""

    steps: int = 1800
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    seed: int = 0
    pool_size: int = 32
    refresh_every: float = 4.0
    bf16: bool = True
    threads: int = 2
    device: str = "cpu"
    workers: int = 0
    time_limit_s: float = 0.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train_default", description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/cellseg3d_train/ckpt.pt"),
                        help="resumed from if it exists, written every --save-every steps. Default: %(default)s")
    parser.add_argument("--init", type=Path, default=None,
                        help="start a new run (step 0, fresh optimizer and data pool) from these weights: a "
                             "training checkpoint or a bundle's model.pt; ignored when resuming from --checkpoint")
    parser.add_argument("--bundle-out", type=Path, default=DEFAULT_BUNDLE_DIR, help="Default: %(default)s")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="Default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Default: %(default)s")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Default: %(default)s")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Default: %(default)s")
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="Default: %(default)s")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 even where the CPU has bf16")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="Default: %(default)s")
    parser.add_argument("--device", default=defaults.device,
                        help="where the steps run: cpu, or cuda on a GPU host (bf16 autocast where it is supported). Default: %(default)s")
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit_s,
                        help="stop after this many seconds of training, the learning rate decayed over them "
                             "(0: run --steps; a time-limited run resumes, but not bit for bit). Default: %(default)s")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="processes that make the next training volumes ahead of the steps (0: made in "
                             "the training loop; a GPU step is much faster than one volume). Default: %(default)s")
    parser.add_argument("--p-tissue", type=float, default=0.0,
                        help="fraction of training volumes from engine.tissue (wide randomization). Default: %(default)s")
    parser.add_argument("--tissue-diameter", type=float, nargs=2, default=DataSettings.tissue_diameter, metavar=("LO", "HI"),
                        help="cell diameters (voxels) of the engine.tissue volumes. Default: %(default)s")
    for flag, default, what in (("--tissue-size-spread", DataSettings.tissue_size_spread, "relative spread of the cells' sizes"),
                                ("--tissue-warp", DataSettings.tissue_warp, "wall bending, a fraction of the cell diameter"),
                                ("--tissue-patchiness", DataSettings.tissue_patchiness, "unevenness of the membrane staining, 0..1")):
        parser.add_argument(flag, type=float, nargs=2, default=default, metavar=("LO", "HI"),
                            help=f"range of the engine.tissue volumes' {what}. Default: %(default)s")
    parser.add_argument("--p-engine-zoom", type=float, default=0.0,
                        help="odds that a tissue volume whose cells lie outside the model's diameter range is zoomed "
                             "into it as the engine zooms (small cells grown). Default: %(default)s")
    parser.add_argument("--p-empty", type=float, default=0.0,
                        help="fraction of training volumes that are empty fields (camera noise, target: no cell). Default: %(default)s")
    parser.add_argument("--save-every", type=int, default=100, help="Default: %(default)s")
    parser.add_argument("--log-every", type=int, default=25, help="Default: %(default)s")
    return parser


def _lr_at(step: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Warm-up, then cosine decay over the steps, or over the time limit when that comes first."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    if config.time_limit_s > 0:
        progress = max(progress, elapsed / config.time_limit_s)
    return config.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on the boundary channel (both in fp32)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + dice


class _VolumeFeed:
    """Training volumes by seed, seeds asked for in increasing order; with ``workers`` > 0 the next
    ``2 * workers`` are made ahead in other processes (a volume depends only on its seed, so the run is
    the same either way)."""

    def __init__(self, settings: DataSettings, workers: int) -> None:
        self.settings = settings
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None
        self._ahead = 2 * workers
        self._futures: dict[int, Future[TrainVolume]] = {}

    def get(self, seed: int) -> TrainVolume:
        if self._pool is None:
            return make_train_volume(seed, self.settings)
        for s in range(seed, seed + self._ahead + 1):
            if s not in self._futures:
                self._futures[s] = self._pool.submit(make_train_volume, s, self.settings)
        for s in [s for s in self._futures if s < seed]:
            self._futures.pop(s).cancel()
        return self._futures.pop(seed).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _init_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` (a training checkpoint or a bare state dict such as a bundle's ``model.pt``) into ``model``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not weights for this architecture; missing {missing}, unexpected {unexpected}")
    logger.info("%s: initial weights loaded", path)


@dataclasses.dataclass
class _Progress:
    """Where a run stands besides its weights and optimizer (all of it goes into the checkpoint)."""

    step: int
    elapsed: float
    losses: list[list[float]]
    pool_seeds: list[int]
    next_seed: int
    history: list[list[int]]  # [first step, --steps] of each (re)started run
    init: Path | None
    machine: str = ""  # where the last step ran, and whether in bf16 (a rerun that only writes the bundle keeps them)
    bf16: bool | None = None


def _start(config: TrainConfig, checkpoint: Path, init: Path | None, *, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> _Progress:
    """Resume from ``checkpoint`` if it exists, else start at step 0 (from ``init``'s weights if given)."""
    progress = _Progress(0, 0.0, [], [TRAIN_SEED_BASE + i for i in range(config.pool_size)],
                         TRAIN_SEED_BASE + config.pool_size, [], init)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        progress = _Progress(
            state["step"], state["elapsed_s"], list(state["losses"]), list(state["pool_seeds"]), state["next_seed"],
            list(state.get("history", [[0, json.loads(state["config"])["steps"]]])),
            Path(state["init"]) if state.get("init") else None,
            state.get("machine", ""), state.get("bf16"),
        )
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("%s: resumed at step %d (%.0f s trained)", checkpoint, progress.step, progress.elapsed)
    elif init is not None:
        _init_weights(model, init)
    progress.history.append([progress.step, config.steps])
    return progress


def machine_name(device: torch.device) -> str:
    """The host (cores, CPU, native bf16), torch and the GPU if one trains: what a step's time depends on."""
    name = f"{os.cpu_count()}-core {platform.processor() or platform.machine()} (native bf16: {cpu_has_native_bf16()}), torch {torch.__version__}"
    return name + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, crops: list, *, lr: float,
                device: torch.device, bf16: bool) -> float:
    """One optimizer step on ``crops`` (``(image, target)`` pairs); returns the loss."""
    x = torch.from_numpy(np.stack([c[0] for c in crops])[:, None]).to(device).contiguous(memory_format=torch.channels_last_3d)
    y = torch.from_numpy(np.stack([c[1] for c in crops])[:, None]).to(device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model.forward_logits(x)
    loss = _loss(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train(config: TrainConfig, settings: DataSettings, checkpoint: Path, *, save_every: int, log_every: int,
          init: Path | None = None) -> dict:
    """Train (or resume) until ``config.steps``; returns the final checkpoint dict.

    A new run (no ``checkpoint`` yet) starts from random weights, or from ``init``'s weights (fine-tuning).
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    bf16 = config.bf16 and (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16())
    model = UNet3D(**{k: v for k, v in ARCH_KWARGS.items() if k not in ("in_channels", "out_channels")},
                   in_channels=1, out_channels=1).to(device=device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    run = _start(config, checkpoint, init, model=model, optimizer=optimizer, rng=rng)
    machine = machine_name(device)
    feed = _VolumeFeed(settings, config.workers)
    made = {s: feed.get(s) for s in sorted(run.pool_seeds)}
    pool = [made.pop(s) for s in run.pool_seeds]

    def snapshot() -> dict:
        return {
            "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "step": run.step, "elapsed_s": run.elapsed, "losses": run.losses, "pool_seeds": run.pool_seeds,
            "next_seed": run.next_seed, "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(), "config": json.dumps(dataclasses.asdict(config)),
            "bf16": run.bf16, "machine": run.machine, "history": run.history,
            "init": str(run.init) if run.init is not None else "",
        }

    def done() -> bool:
        return run.step >= config.steps or (config.time_limit_s > 0 and run.elapsed >= config.time_limit_s)

    model.train()
    started, window = time.perf_counter() - run.elapsed, []
    while not done():
        if rng.random() < 1.0 / config.refresh_every:
            slot = int(rng.integers(0, len(pool)))
            pool[slot], run.pool_seeds[slot] = feed.get(run.next_seed), run.next_seed
            run.next_seed += 1
        crops = [sample_crop(pool[int(rng.integers(0, len(pool)))], rng, settings) for _ in range(config.batch_size)]
        loss = _train_step(model, optimizer, crops, lr=_lr_at(run.step, config, run.elapsed), device=device, bf16=bf16)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {run.step}; lower --lr or use --no-bf16")
        window.append(loss)
        run.step += 1
        run.machine, run.bf16 = machine, bf16
        run.elapsed = time.perf_counter() - started
        if run.step % log_every == 0 or done():
            run.losses.append([run.step, float(np.mean(window))])
            logger.info("step %d/%d loss %.4f lr %.2e %.0f s", run.step, config.steps, np.mean(window),
                        _lr_at(run.step - 1, config, run.elapsed), run.elapsed)
            window = []
        if run.step % save_every == 0 or done():
            _save(checkpoint, snapshot())
    feed.close()
    return snapshot()


def bundle_template(out: Path, *, training: dict, validation: dict | None = None,
                    postprocess: PostprocessSpec | None = None,
                    patch_shape: tuple[int, int, int] = (64, 128, 128), overlap: float = 0.25,
                    cell_diameter_voxels: tuple[float, float] | None = (9.0, 24.0)) -> Bundle:
    """The default bundle's facts (weights come from the checkpoint)."""
    return Bundle(
        path=out,
        name="cellseg3d-default-membrane",
        description=("pytorch-3dunet UNet3D (gcr, f_maps 16, 3 levels) trained on the project's two synthetic "
                     "membrane-stained tissue simulators (engine.synthetic, engine.tissue); channel 0 = cell boundary "
                     "(and background) probability"),
        architecture="UNet3D",
        arch_kwargs=dict(ARCH_KWARGS),
        in_channels=1,
        normalization=NORMALIZATION,
        output=OUTPUT,
        patch_shape=patch_shape,
        overlap=overlap,
        postprocess=postprocess or PostprocessSpec(method="watershed", threshold=0.5, min_dist=4, label_threshd=20),
        voxel_size_um=None,
        cell_diameter_voxels=cell_diameter_voxels,
        training=training,
        validation=validation or {},
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         pool_size=args.pool_size, bf16=not args.no_bf16, threads=args.threads, device=args.device,
                         workers=args.workers, time_limit_s=args.time_limit)
    settings = DataSettings(p_tissue=args.p_tissue, tissue_diameter=tuple(args.tissue_diameter), p_engine_zoom=args.p_engine_zoom,
                            p_empty=args.p_empty, tissue_size_spread=tuple(args.tissue_size_spread),
                            tissue_warp=tuple(args.tissue_warp), tissue_patchiness=tuple(args.tissue_patchiness))
    state = train(config, settings, args.checkpoint, save_every=args.save_every, log_every=args.log_every,
                  init=args.init)
    command = "python -m training.train_default " + " ".join(argv if argv is not None else sys.argv[1:])
    training = {
        "command": command.strip(),
        "config": dataclasses.asdict(config),
        "bf16_autocast": state["bf16"],
        "data": {**dataclasses.asdict(settings), "generator": f"engine.synthetic.make_membrane_volume, engine.tissue.make_tissue_volume (p={settings.p_tissue})",
                 "train_seeds": f"{TRAIN_SEED_BASE}..{state['next_seed'] - 1}"},
        "target": "boundary: voxels with a 6-neighbour of another cell (2-voxel ridge on every interface)",
        "loss": "BCE + soft Dice",
        "steps": state["step"],
        "runs": [{"from_step": a, "steps_arg": b} for a, b in state["history"]],
        "init": state["init"] or None,
        "wall_time_s": round(state["elapsed_s"], 1),
        "final_loss": state["losses"][-1][1] if state["losses"] else None,
        "machine": state["machine"] or "not recorded (a checkpoint from before machines were recorded, resumed with no step run)",
    }
    old = None
    if (args.bundle_out / "bundle.json").exists():
        old = load_bundle(args.bundle_out)
    template = bundle_template(args.bundle_out, training=training,
                               validation=old.validation if old else None,
                               postprocess=old.postprocess if old else None,
                               patch_shape=old.patch_shape if old else (64, 128, 128),
                               overlap=old.overlap if old else 0.25,
                               cell_diameter_voxels=old.cell_diameter_voxels if old else (9.0, 24.0))
    make_bundle(args.checkpoint, args.bundle_out, template=template)
    logger.info("%s: bundle written (%d steps, %.0f s)", args.bundle_out, state["step"], state["elapsed_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
