"""How a MEX reaches the module on a real BisQue server, for the test server: made by the web UI, expanded
into sub-MEXes by the module service, turned into a command line by the engine. Each step follows the
BisQue source it names (UCSB-VRL/bisqueUCSB); the module XML read is the shipped ``wrapper/CellSegment3DUnet.xml``.
"""

from __future__ import annotations

import copy
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

from bisque_server import BisqueTestServer

__all__ = ["MODULE_XML", "engine_argv", "engine_runs", "module_definition", "submit", "uniq_of", "web_ui_mex"]

MODULE_XML = Path(__file__).resolve().parents[2] / "wrapper" / "CellSegment3DUnet.xml"
_SPECIALS = ("mex_url", "bisque_token", "module_url")  # mexparser.prepare_inputs: filled in by the engine


def module_definition() -> ET.Element:
    """The module XML, with the ``uri`` the module service would give it."""
    module = ET.parse(MODULE_XML).getroot()
    module.set("uri", "http://bisque.test/data_service/00-module")
    return module


def web_ui_mex(module: ET.Element, values: dict[str, str | None], /, *, resource_type: str = "image") -> ET.Element:
    """The MEX the web UI posts (``bq_api.js`` ``BQModule.createMEX``): every input of the module cloned with
    its type and default ``value``, the user's ``values`` over it (None: no value attribute), the resource
    input typed as the chosen resource; ``execute_options`` with the static iterable when its type matches."""
    mex = ET.Element("mex", name=module.get("name", ""), type=module.get("uri", ""))
    inputs = ET.SubElement(mex, "tag", name="inputs")
    for formal in module.find("tag[@name='inputs']"):
        name = formal.get("name", "")
        tag = ET.SubElement(inputs, "tag", {k: v for k, v in formal.attrib.items() if k != "value"})
        value = values.get(name, formal.get("value")) if name not in _SPECIALS else None
        if value is not None:
            tag.set("value", value)
        if formal.get("type") == "resource":
            tag.set("type", resource_type)
    options = module.find("tag[@name='execute_options']")
    iterables = [] if options is None else options.findall("tag[@name='iterable']")
    chosen = [it for it in iterables if it.get("type") == resource_type]
    if chosen:
        execute = ET.SubElement(mex, "tag", name="execute_options")
        execute.extend(copy.deepcopy(it) for it in chosen)
        execute.extend(copy.deepcopy(t) for t in options.findall("tag[@name='blocked_iter']"))
    return mex


def _members(server: BisqueTestServer, dataset_url: str) -> list[str]:
    doc = server.resource_document(dataset_url)
    return [v.text or "" for v in doc.findall("value")]


def submit(server: BisqueTestServer, mex: ET.Element, /, *, blocksize: int = 1) -> tuple[str, str]:
    """Store ``mex`` as the module service and the engine leave it: ``module_server.create_mex`` makes one
    sub-MEX per dataset member (the resource input replaced by an untyped tag; ``blocksize`` members per
    ``type="block"`` sub-MEX when ``blocked_iter`` is set, as with ``bisque.module_service.blocksize``), the
    status goes PENDING -> DISPATCH, then the engine's ``command_start`` posts ``starting`` (``running
    parallel`` for an iterated MEX). Returns ``(mex_url, token)`` of the top MEX."""
    iterable = mex.find("tag[@name='execute_options']/tag[@name='iterable']")
    inputs = mex.find("tag[@name='inputs']")
    found = None if iterable is None else inputs.find(f"tag[@name='{iterable.get('value')}'][@type='dataset']")
    blocked = mex.find("tag[@name='execute_options']/tag[@name='blocked_iter'][@value='true']") is not None
    size = blocksize if blocked else 1
    members = _members(server, found.get("value", "")) if found is not None else []
    for start in range(0, len(members), size):
        submex = ET.SubElement(mex, "mex", name=mex.get("name", ""), type=mex.get("type", "") if size == 1 else "block")
        for member in members[start:start + size]:
            single = submex if size == 1 else ET.SubElement(submex, "mex", name=mex.get("name", ""))
            sub_inputs = ET.SubElement(single, "tag", name="inputs")
            for tag in inputs:
                if tag is found:
                    ET.SubElement(sub_inputs, "tag", name=tag.get("name", ""), value=member)
                else:
                    sub_inputs.append(copy.deepcopy(tag))
    started = "running parallel" if members else "starting"
    return server.create_mex_document(mex, statuses=("PENDING", "DISPATCH", started))


def engine_argv(module: ET.Element, mex: ET.Element, mex_url: str, token: str, /) -> list[str]:
    """The module's arguments as the engine builds them (``mexparser.prepare_inputs`` then
    ``prepare_mex_params``, positional style): the module's inputs in XML order, ``mex_url`` and
    ``bisque_token`` filled in, the leaves of each MEX input (a block's first member's), valueless ones dropped."""
    actual = mex.find("tag[@name='inputs']")
    if actual is None:
        actual = mex.find("mex/tag[@name='inputs']")
    specials = {"mex_url": mex_url, "bisque_token": token, "module_url": module.get("uri", "")}
    argv: list[str] = []
    for formal in module.find("tag[@name='inputs']"):
        name = formal.get("name", "")
        if name in specials:
            argv.append(specials[name])
            continue
        found = actual.find(f"tag[@name='{name}']") if actual is not None else None
        leaves = [] if found is None else [t for t in found.iter("tag") if t.find("tag") is None]
        argv.extend(t.get("value", "") for t in leaves if t.get("value"))
    return argv


def engine_runs(server: BisqueTestServer, mex_url: str, token: str, /) -> list[list[str]]:
    """One command line per process the engine starts (``command_run.CommandRunner.command_execute``): one
    per sub-MEX (or block), each with the top MEX's token; the MEX itself when it has none."""
    module, doc = module_definition(), server.mex_document(mex_url)
    subs = doc.findall("mex")
    targets = [(sub, sub.get("uri", "")) for sub in subs] if subs else [(doc, mex_url)]
    return [engine_argv(module, sub, url, token) for sub, url in targets]


def uniq_of(url: str, /) -> str:
    """The resource uniq at the end of a BisQue URL."""
    return urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
