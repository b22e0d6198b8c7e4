"""The module's files as BisQue reads them: the module XML (web UI), runtime-module.cfg (engine), the GPU
templates for the classic docker runner and Argo, and the registration steps of wrapper/README.md.

Nothing here needs docker, Argo or a GPU: the XML and config are parsed the way BisQue parses them, the classic
docker template is rendered as ``docker_env.py`` renders it and run by bash against a recording ``docker``
command (there is no Docker engine here), and the registration steps run against the test server.
"""

from __future__ import annotations

import configparser
import json
import os
import string
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from bisque_server import BisqueTestServer

from wrapper.inputs import INPUTS
from wrapper.results import outputs_tag

ROOT = Path(__file__).resolve().parents[2]
WRAPPER_DIR = ROOT / "wrapper"
BUNDLE_JSON = ROOT / "engine" / "default_bundle" / "bundle.json"


def _module() -> ET.Element:
    return ET.parse(WRAPPER_DIR / "CellSegment3DUnet.xml").getroot()


def _template(tag: ET.Element) -> dict[str, str]:
    return {t.get("name", ""): t.get("value", "") for t in tag.findall("template/tag")}


def test_module_xml_inputs_outputs_and_iteration() -> None:
    doc = _module()
    assert (doc.tag, doc.get("name"), doc.get("type")) == ("module", "CellSegment3DUnet", "runtime")
    inputs = doc.find("tag[@name='inputs']")
    assert [t.get("name") for t in inputs] == [*INPUTS, "mex_url", "bisque_token"]
    assert [t.get("type") for t in inputs][-2:] == ["system-input", "system-input"]
    accepted = {t.get("value") for t in inputs.findall("tag[@name='resource_url']/template/tag[@name='accepted_type']")}
    assert accepted == {"image", "dataset"}
    options = doc.find("tag[@name='execute_options']")
    iterable = options.find("tag[@name='iterable']")
    assert (iterable.get("value"), iterable.get("type")) == ("resource_url", "dataset")
    assert options.find("tag[@name='blocked_iter']").get("value") == "true"
    posted = outputs_tag("u1", "u2", {"cell_count": 1})["tag"]
    outputs = doc.find("tag[@name='outputs']")
    assert [(t.get("name"), t.get("type")) for t in outputs] == [(t["name"], t.get("type")) for t in posted]
    for name in ("title", "authors", "description", "help", "thumbnail"):
        assert doc.find(f"tag[@name='{name}']").get("value"), name


def test_number_inputs_have_the_bundles_defaults_and_the_web_ui_can_run_them() -> None:
    """bq_ui_renderes.js ``BQ.selectors.Number.isValid`` refuses an undefined value (``allowNone`` plays no part),
    so Run stays disabled without ``value=``; ``allowDecimals`` false makes the field take whole numbers."""
    defaults = json.loads(BUNDLE_JSON.read_text())["postprocess"]
    inputs = _module().find("tag[@name='inputs']")
    for name, integer in (("threshold", False), ("min_dist", True), ("label_threshd", True)):
        tag = inputs.find(f"tag[@name='{name}']")
        template = _template(tag)
        assert tag.get("type") == "number" and tag.get("value") is not None, name
        assert float(tag.get("value")) == defaults[name], name
        assert template["allowDecimals"] == ("false" if integer else "true"), name
        assert "allowNone" not in template, name
        assert "empty" not in template["description"].lower(), name
        assert float(template["minValue"]) <= float(tag.get("value")) <= float(template.get("maxValue", "inf"))
    assert "empty" not in (WRAPPER_DIR / "public" / "help.html").read_text().lower()


def test_help_and_thumbnail_files_exist() -> None:
    """engine_service.serve_entry_point serves ``type="file"`` entries from the module folder (else a broken icon)."""
    doc = _module()
    for name in ("help", "thumbnail"):
        entry = doc.find(f"tag[@name='{name}']")
        assert entry.get("type") == "file" and (WRAPPER_DIR / entry.get("value")).is_file(), name
    svg = ET.parse(WRAPPER_DIR / doc.find("tag[@name='thumbnail']").get("value")).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg" and svg.get("viewBox")


def test_runtime_module_cfg() -> None:
    """engine_service.load_module reads the global keys (``module_enabled``, ``definition``); command_run and
    docker_env the ``[command]`` section."""
    cfg = configparser.ConfigParser()
    cfg.read_string("[module]\n" + (WRAPPER_DIR / "runtime-module.cfg").read_text())  # keys before any section
    top = cfg["module"]
    assert top["runtime.platforms"] == "command" and top["module_enabled"].lower() in ("true", "1", "yes")
    assert (WRAPPER_DIR / top["definition"]).is_file() and top["definition"] == "CellSegment3DUnet.xml"
    command = cfg["command"]
    assert command["executable"] == "python PythonScriptWrapper.py" and command["exec_env"] == "use_gpu"
    assert command["docker.image"] and "Docker" in command["environments"]
    for name in command["files"].split(","):
        assert (WRAPPER_DIR / name.strip()).exists(), name


def _render_classic(image: str) -> str:
    """As docker_env.DockerEnvironment.create_docker_launcher renders DOCKER_RUN (string.Template.safe_substitute)."""
    template = string.Template((WRAPPER_DIR / "deploy" / "docker_run_gpu.tmpl").read_text())
    return template.safe_substitute(MEX_ID="00-abc", DOCKER_IMAGE=image, DOCKER_LOGIN="", DOCKER_PULL="",
                                    DOCKER_INPUTS="", DOCKER_OUTPUTS="")


_RECORDING_DOCKER = """#!/bin/bash
echo "$*" >> "$DOCKER_LOG"
case "$1" in create) echo container-1;; wait) echo 3;; esac
"""


def test_classic_docker_template_passes_the_gpu_and_mounts_the_plan_cache(tmp_path: Path) -> None:
    script = tmp_path / "docker_run"
    script.write_text(_render_classic("registry:5000/cellsegment3dunet:2.0"))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "docker").write_text(_RECORDING_DOCKER)
    (fake_bin / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "DOCKER_LOG": str(tmp_path / "calls"),
           "CELLSEG3D_HOST_CACHE": str(tmp_path / "plans")}
    done = subprocess.run(["bash", str(script), "python", "PythonScriptWrapper.py", "http://h/data_service/00-a",
                           "http://h/module_service/mex/00-m", "admin:00-m"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 3  # the module's exit status, from `docker wait`
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == (f"create --gpus all --ipc=host -v {tmp_path / 'plans'}:/cache/engines "
                        "-e CELLSEG3D_ENGINES=/cache/engines registry:5000/cellsegment3dunet:2.0 python "
                        "PythonScriptWrapper.py http://h/data_service/00-a http://h/module_service/mex/00-m "
                        "admin:00-m")
    assert [c.split()[0] for c in calls] == ["create", "start", "wait", "logs", "cp", "rm"]
    assert (tmp_path / "plans").is_dir()


def test_argo_gpu_template_is_the_one_use_gpu_submits() -> None:
    """docker_env.DOCKER_RUN_GPU submits ``workflowtemplate/bqflow-module-gpu-template`` with ``image`` and
    ``args`` in params.yaml."""
    doc = yaml.safe_load((WRAPPER_DIR / "deploy" / "bqflow-module-gpu-template.yaml").read_text())
    assert (doc["kind"], doc["metadata"]["name"]) == ("WorkflowTemplate", "bqflow-module-gpu-template")
    assert [p["name"] for p in doc["spec"]["arguments"]["parameters"]] == ["image", "args"]
    (template,) = doc["spec"]["templates"]
    container = template["container"]
    assert container["image"] == "{{workflow.parameters.image}}" and container["args"] == ["{{workflow.parameters.args}}"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {"/cache/engines", "/dev/shm"}
    assert {"name": "CELLSEG3D_ENGINES", "value": "/cache/engines"} in container["env"]
    volumes = {v["name"]: v for v in doc["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/cache/engines"]]


def test_registering_over_the_stock_module_needs_the_unregister_step(bisque_server: BisqueTestServer) -> None:
    """module_server.register_engine answers 405 while a module of that name has an engine; the README's steps
    (list, unregister the stock module by its uniq, register) get past it. bq-admin's ``register`` posts the
    engine's definition to ``module_service/register_engine/?engine_uri=...`` (engine/commands/module_admin.py)."""
    from wrapper.bisque_io import HttpPolicy, new_session

    stock = bisque_server.add_module(ET.Element("module", name="CellSegment3DUnet"), "http://old-engine/engine_service/")
    bq = new_session(HttpPolicy(read_timeout=5, retries=0)).init_local(
        "admin", "admin", bisque_root=bisque_server.root, create_mex=False)
    register = f"{bisque_server.root}/module_service/register_engine/"
    engine = {"engine_uri": "http://new-engine/engine_service/CellSegment3DUnet/"}
    body = ET.tostring(_module())
    assert bq.c.post(register, params=engine, data=body, headers={"Content-Type": "text/xml"}).status_code == 405
    listed = bq.c.get(f"{bisque_server.root}/module_service/").content  # bq-admin module list-server
    assert stock.get("resource_uniq", "").encode() in listed
    unregister = f"{bisque_server.root}/module_service/unregister_engine/{stock.get('resource_uniq')}"
    assert bq.c.get(unregister).status_code == 200
    answer = bq.c.post(register, params=engine, data=body, headers={"Content-Type": "text/xml"})
    assert answer.status_code == 200 and ET.fromstring(answer.content).get("value") == engine["engine_uri"]


@pytest.mark.parametrize("path", ["wrapper/README.md"])
def test_readme_gives_the_install_steps_in_order(path: str) -> None:
    """The administrator's order: build, place the module, docker settings, GPU template, unregister, register."""
    text = (ROOT / path).read_text().split("## Install and register", 1)[1].split("\n## ", 1)[0]
    steps = ["docker build", "runtime-bisque.cfg", "docker.enabled", "docker.hub", "docker_run_gpu.tmpl",
             "bqflow-module-gpu-template", "unregister_engine", "bq-admin module register"]
    positions = [text.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions) if p == -1]
    assert positions == sorted(positions), "steps out of order"
