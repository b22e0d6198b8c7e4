"""The training loop: volumes made ahead in worker processes give the same run as volumes made in the
loop (a volume depends only on its seed), and a run resumed from its checkpoint ends where an unbroken
run does."""

from __future__ import annotations

import torch

from training.data import DataSettings
from training.train_default import TrainConfig, machine_name, train

SETTINGS = DataSettings(volume_shape=(36, 72, 72), crop_shape=(16, 32, 32), p_tissue=0.5)


def _run(tmp_path, name: str, *, steps: int, workers: int) -> dict:
    config = TrainConfig(steps=steps, batch_size=1, pool_size=2, refresh_every=1.5, threads=1, workers=workers, bf16=False)
    return train(config, SETTINGS, tmp_path / f"{name}.pt", save_every=2, log_every=1)


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])


def test_workers_make_the_same_volumes_as_the_loop(tmp_path) -> None:
    inline = _run(tmp_path, "inline", steps=4, workers=0)
    ahead = _run(tmp_path, "ahead", steps=4, workers=2)
    assert inline["next_seed"] > 1_000_002  # the pool was refreshed during the run
    assert inline["pool_seeds"] == ahead["pool_seeds"] and _same_weights(inline, ahead)


def test_resumed_run_ends_where_an_unbroken_run_does(tmp_path) -> None:
    unbroken = _run(tmp_path, "unbroken", steps=4, workers=0)
    _run(tmp_path, "resumed", steps=2, workers=0)
    resumed = _run(tmp_path, "resumed", steps=4, workers=0)
    assert resumed["step"] == 4 and _same_weights(unbroken, resumed)


def test_time_limit_stops_the_run_and_keeps_its_checkpoint(tmp_path) -> None:
    config = TrainConfig(steps=50, batch_size=1, pool_size=1, threads=1, bf16=False, time_limit_s=1e-3)
    state = train(config, SETTINGS, tmp_path / "timed.pt", save_every=100, log_every=100)
    assert state["step"] == 1 and torch.load(tmp_path / "timed.pt", weights_only=True)["step"] == 1


def test_a_rerun_with_no_step_left_keeps_the_machine_that_trained(tmp_path) -> None:
    """Rerunning a finished command only writes the bundle: the record must name the machine (and bf16)
    of the run that made the steps, not the one that reran it."""
    trained = _run(tmp_path, "done", steps=2, workers=0)
    assert trained["machine"] == machine_name(torch.device("cpu")) and trained["bf16"] is False
    state = torch.load(tmp_path / "done.pt", weights_only=True)
    torch.save({**state, "machine": "2-core elsewhere (native bf16: True)", "bf16": True}, tmp_path / "done.pt")
    rerun = _run(tmp_path, "done", steps=2, workers=0)
    assert rerun["step"] == 2 and rerun["machine"] == "2-core elsewhere (native bf16: True)" and rerun["bf16"] is True
