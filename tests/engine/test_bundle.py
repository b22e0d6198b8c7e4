"""Bundles: validated once, unknown keys rejected, checkpoints of every supported kind load, mismatches named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tiny_bundles import tiny_template
from engine.bundle import load_bundle, make_bundle
from engine.errors import BundleError


def _write(tmp_path: Path, doc: dict) -> Path:
    (tmp_path / "bundle.json").write_text(json.dumps(doc))
    torch.save({}, tmp_path / "model.pt")
    return tmp_path


def test_round_trip(tiny_bundle) -> None:
    again = load_bundle(tiny_bundle.path)
    assert again == tiny_bundle
    model = again.load_model()
    assert not model.training and again.divisor == 4


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(colour="blue"), r"unknown key\(s\) \['colour'\]"),
        (lambda d: d["normalization"].update(kind="minmax"), r"normalization.kind' must be one of"),
        (lambda d: d["output"].update(flavour=1), r"unknown key\(s\) \['flavour'\] in 'output'"),
        (lambda d: d.update(patch_shape=[10, 32, 32]), r"'patch_shape' must be 3 positive ints divisible by 4"),
        (lambda d: d.update(overlap=1.5), "'overlap' must be >= 0 and < 1"),
        (lambda d: d["postprocess"].update(threshold_per_upsampling=-0.1), "'postprocess.threshold_per_upsampling' must be a number >= 0"),
        (lambda d: d["postprocess"].update(threshold_per_upsampling=None), "'postprocess.threshold_per_upsampling' must be a number >= 0"),
        (lambda d: d["architecture"].update(name="VNet"), "unknown architecture 'VNet'"),
        (lambda d: d.update(format_version=9), "format_version"),
    ],
)
def test_bad_bundle_json_is_named(tiny_bundle, tmp_path: Path, edit, match: str) -> None:
    doc = tiny_bundle.to_json()
    edit(doc)
    with pytest.raises(BundleError, match=match):
        load_bundle(_write(tmp_path, doc))


def test_missing_pieces(tmp_path: Path, tiny_bundle) -> None:
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps(tiny_bundle.to_json()))
    with pytest.raises(BundleError, match="model.pt: missing"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", None])
def test_checkpoint_formats_load(tmp_path: Path, tiny_bundle, key: str | None) -> None:
    state = tiny_bundle.load_model().state_dict()
    ckpt = tmp_path / "ckpt.pytorch"
    torch.save({key: state, "epoch": 3} if key else state, ckpt)
    out = tmp_path / "b"
    bundle = make_bundle(ckpt, out, template=tiny_template(out))
    for a, b in zip(bundle.load_model().state_dict().values(), state.values()):
        assert torch.equal(a, b)


def test_mismatched_checkpoint_names_keys_and_writes_nothing(tmp_path: Path, tiny_bundle) -> None:
    state = tiny_bundle.load_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["final_conv.bias"]
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": state}, ckpt)
    out = tmp_path / "b"
    with pytest.raises(BundleError, match=r"missing: final_conv.bias.*unexpected: extra.weight"):
        make_bundle(ckpt, out, template=tiny_template(out))
    assert not out.exists()
    bigger = replace(tiny_template(out), arch_kwargs={**tiny_bundle.arch_kwargs, "f_maps": 16})
    torch.save(tiny_bundle.load_model().state_dict(), ckpt)
    with pytest.raises(BundleError, match="wrong shape"):
        make_bundle(ckpt, out, template=bigger)


def test_unloadable_checkpoint(tmp_path: Path, tiny_bundle) -> None:
    ckpt = tmp_path / "junk.pt"
    ckpt.write_bytes(b"\x00garbage")
    with pytest.raises(BundleError, match="junk.pt: cannot load checkpoint"):
        make_bundle(ckpt, tmp_path / "b", template=tiny_template(tmp_path / "b"))
    torch.save({"note": "no tensors"}, ckpt)
    with pytest.raises(BundleError, match="not a state dict"):
        make_bundle(ckpt, tmp_path / "b", template=tiny_template(tmp_path / "b"))
