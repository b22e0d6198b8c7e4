"""Datasets, as BisQue runs them: one sub-MEX per image with the top MEX's token (one container each, or several
in one container with blocked iteration), and by hand; plus the TensorRT plan cache shared by two runs.

Each run is the real wrapper script in a subprocess with the real bqapi client against the test server, the
command line built as BisQue's engine builds it (``bisque_engine.engine_runs``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bqapi")
from bisque_engine import engine_runs, module_definition, submit, web_ui_mex
from bisque_server import BisqueTestServer
from wrapper_runs import (
    cells_tiff,
    error_message,
    metadata_values,
    no_token_on_the_wire,
    run_wrapper,
)

from engine.bundle import Bundle

LOADED = "every image of this run reuses it"  # logged once per model load (wrapper.module_run)


def _dataset(server: BisqueTestServer, names: list[str]) -> tuple[str, list[str]]:
    data, _ = cells_tiff()
    images = [server.add_image(data, name)[0] for name in names]
    return server.add_dataset("stacks", images)[0], images


def _outputs_ok(server: BisqueTestServer, mex_url: str) -> dict[str, str]:
    assert server.mex_status(mex_url) == "FINISHED", error_message(server, mex_url)
    return metadata_values(server.mex_outputs(mex_url))


def test_one_sub_mex_per_image_each_in_its_own_process(bisque_server: BisqueTestServer, tiny_bundle: Bundle) -> None:
    dataset, images = _dataset(bisque_server, ["a.tif", "b.tif"])
    mex = web_ui_mex(module_definition(), {"resource_url": dataset, "min_dist": "2"}, resource_type="dataset")
    top, token = submit(bisque_server, mex)
    runs = engine_runs(bisque_server, top, token)
    assert len(runs) == 2 and {argv[-1] for argv in runs} == {token}  # the top MEX's token for every sub-MEX
    for argv in runs:
        ran = run_wrapper(tiny_bundle, *argv, secrets=(token,))
        assert ran.rc == 0, ran.err
    subs = [s.get("uri") for s in bisque_server.mex_document(top).findall("mex")]
    assert [_outputs_ok(bisque_server, sub)["input"] for sub in subs] == images
    assert all(_outputs_ok(bisque_server, sub)["min_dist"] == "2" for sub in subs)
    assert bisque_server.mex_history(top) == ["PENDING", "DISPATCH", "running parallel"]  # the engine's, not ours
    assert len(bisque_server.uploads) == 4
    no_token_on_the_wire(bisque_server, token)


def test_a_block_of_images_in_one_process_loads_the_model_once(bisque_server: BisqueTestServer,
                                                               tiny_bundle: Bundle) -> None:
    dataset, images = _dataset(bisque_server, ["a.tif", "b.tif", "c.tif"])
    mex = web_ui_mex(module_definition(), {"resource_url": dataset}, resource_type="dataset")
    top, token = submit(bisque_server, mex, blocksize=3)
    (argv,) = engine_runs(bisque_server, top, token)
    ran = run_wrapper(tiny_bundle, *argv, secrets=(token,))
    assert ran.rc == 0, ran.err
    assert ran.err.count(LOADED) == 1
    (block,) = bisque_server.mex_document(top).findall("mex")
    members = [m.get("uri") for m in block.findall("mex")]
    assert [_outputs_ok(bisque_server, m)["input"] for m in members] == images
    assert bisque_server.mex_status(block.get("uri")) == "FINISHED"
    assert {k: t.attrib for k, t in bisque_server.mex_outputs(block.get("uri")).items()} == {
        "mex_url": {"name": "mex_url", "type": "mex", "value": block.get("uri")}}
    block_history = bisque_server.mex_history(block.get("uri"))
    assert block_history == ["running image 1 of 3", "running image 2 of 3", "running image 3 of 3", "FINISHED"]


def test_a_failed_image_fails_its_sub_mex_and_the_run_but_not_the_others(bisque_server: BisqueTestServer,
                                                                        tiny_bundle: Bundle) -> None:
    _, images = _dataset(bisque_server, ["a.tif", "b.tif"])
    missing = f"{bisque_server.root}/data_service/00-gone"
    dataset = bisque_server.add_dataset("with a missing member", [images[0], missing, images[1]])[0]
    top, token = submit(bisque_server, web_ui_mex(module_definition(), {"resource_url": dataset},
                                                  resource_type="dataset"), blocksize=3)
    (argv,) = engine_runs(bisque_server, top, token)
    ran = run_wrapper(tiny_bundle, *argv, secrets=(token,))
    assert ran.rc == 1
    (block,) = bisque_server.mex_document(top).findall("mex")
    first, gone, last = (m.get("uri") for m in block.findall("mex"))
    assert _outputs_ok(bisque_server, first) and _outputs_ok(bisque_server, last)
    assert bisque_server.mex_status(gone) == "FAILED"
    assert "00-gone: not found (HTTP 404)" in error_message(bisque_server, gone)
    assert bisque_server.mex_status(block.get("uri")) == "FAILED"
    assert error_message(bisque_server, block.get("uri")).startswith("1 of 3 images failed; the first: reading")


def test_a_dataset_by_hand_runs_every_member_with_one_model_load(tiny_bundle: Bundle) -> None:
    with BisqueTestServer(user="alice", password="pw-s3cret-42") as server:
        dataset, images = _dataset(server, ["a.tif", "b.tif"])
        ran = run_wrapper(tiny_bundle, "--user", "alice", "--pwd", "pw-s3cret-42", "--root", server.root, dataset,
                          secrets=("pw-s3cret-42",))
        assert ran.rc == 0, ran.err
        outputs = json.loads(ran.out)
        assert [o["Metadata"]["input"] for o in outputs] == images and ran.err.count(LOADED) == 1
        assert len(server.uploads) == 4


_PLAN_PROBE = """
import json, sys
from engine import load_bundle
from engine.backends.engine_key import EngineKey, Host, Profile, engines_dir, find_plan, write_plan
bundle = load_bundle(sys.argv[1])
key = EngineKey(compute_capability=(9, 0), tensorrt_version="10.16.1.11", onnx_sha256="ab" * 32,
                profile=Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(16, 16, 16), opt_batch=2, max_batch=4))
if sys.argv[2] == "write":
    write_plan(engines_dir(bundle), key, b"serialized plan", meta={"gate": {"passed": True}})
for cc in ((9, 0), (8, 0)):
    record, why = find_plan(engines_dir(bundle), host=Host(compute_capability=cc, tensorrt_version="10.16.1.11"),
                            onnx_sha256="ab" * 32, patch_shape=(16, 32, 32), max_batch=4)
    print(json.dumps([str(engines_dir(bundle)), None if record is None else record.plan_path.name, why]))
"""


def test_two_runs_share_the_plan_cache_folder(bisque_server: BisqueTestServer, tiny_bundle: Bundle,
                                              tmp_path: Path) -> None:
    """Two runs with ``CELLSEG3D_ENGINES`` on one host folder (the mount of wrapper/deploy/docker_run_gpu.tmpl)
    report the same plan folder; a plan one process writes there is found by the next for the same GPU kind and
    passed over for another. On this CPU machine no plan is built or run: TensorRT needs a GPU."""
    cache = tmp_path / "host-cache"
    env = {"CELLSEG3D_ENGINES": str(cache)}
    data, _ = cells_tiff()
    folders = []
    for run in ("first", "second"):
        image, _ = bisque_server.add_image(data, f"{run}.tif")
        mex_url, token = submit(bisque_server, web_ui_mex(module_definition(), {"resource_url": image}))
        (argv,) = engine_runs(bisque_server, mex_url, token)
        ran = run_wrapper(tiny_bundle, *argv, env=env, secrets=(token,))
        assert ran.rc == 0, ran.err
        folders.append(_outputs_ok(bisque_server, mex_url)["plan_cache"])
        probe = subprocess.run([sys.executable, "-c", _PLAN_PROBE, str(tiny_bundle.path),
                                "write" if run == "first" else "read"], capture_output=True, text=True, timeout=120,
                               env={**__import__("os").environ, **env}, check=True)
        same_kind, other_kind = (json.loads(line) for line in probe.stdout.splitlines())
        assert same_kind[0] == folders[-1] and same_kind[1] is not None and same_kind[1].startswith("sm90_")
        assert other_kind[1] is None and "built for compute capability 9.0, this GPU is 8.0" in other_kind[2][0]
    assert folders == [str(cache / tiny_bundle.name)] * 2
    assert sorted(p.suffix for p in (cache / tiny_bundle.name).iterdir() if not p.name.startswith(".")) == \
        [".json", ".plan"]  # one plan, written once
