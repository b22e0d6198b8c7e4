"""One module run: MEX inputs -> fetch -> ``engine.segment_file`` -> cell table -> upload -> FINISHED.

The model and its backend are loaded once per process and reused for every image the process segments:
the images of a dataset whose sub-MEXes run in one container (a top or block MEX holding them), or a
dataset given by hand. So one TensorRT plan serves them all, built (or read from ``$CELLSEG3D_ENGINES``)
once. The failure boundary (FAILED + nonzero exit) is the script's, ``PythonScriptWrapper.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .bisque_io import (
    BisqueError,
    dataset_members,
    fetch_resource,
    get_xml,
    upload_file,
    voxel_size_from_meta,
)
from .errors import Terminated, one_line
from .inputs import Params, mex_input_values, resolve_params
from .mex import Mex, sub_mex_urls
from .results import dataset_outputs_tag, metadata, outputs_tag

__all__ = ["MODULE", "ModuleRun"]

logger = logging.getLogger("cellseg3d.module")

MODULE = "CellSegment3DUnet"


class ModuleRun:
    """The steps of a run; ``stage`` names the step in progress, for the failure message."""

    def __init__(self, args: argparse.Namespace, /, *, secrets: Sequence[str] = ()) -> None:
        self.args = args
        self.secrets = tuple(secrets)  # masked in every failure message
        self.stage = "starting"
        self._bundle: Any = None
        self._backend: Any = None
        self._plan_cache: str | None = None

    def close(self) -> None:
        """Release the backend (GPU memory, TensorRT context)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def bundle(self) -> Any:
        """The model bundle, loaded once (before any download, so a missing model fails fast)."""
        if self._bundle is None:
            from engine import load_bundle

            self.stage = "loading the model"
            self._bundle = load_bundle(self.args.bundle)
        return self._bundle

    def backend(self) -> Any:
        """The inference backend, constructed once per process and reused for every image."""
        if self._backend is None:
            from engine import select_backend

            bundle = self.bundle()
            self.stage = "loading the model"
            self._backend = select_backend(self.args.backend, bundle)
            logger.info("model %s loaded on %s (%s, %s); every image of this run reuses it", bundle.name,
                        self._backend.name, self._backend.device_name, self._backend.precision)
        return self._backend

    def plan_cache(self) -> str:
        """Where TensorRT plans for the model are kept between runs (``$CELLSEG3D_ENGINES/<model>``), checked
        writable once: a plan cached in a folder that does not outlive the container is rebuilt every run."""
        if self._plan_cache is None:
            from engine.backends.engine_key import ENGINES_ENV, engines_dir

            folder = engines_dir(self.bundle())
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test-{os.getpid()}"
                probe.touch()
                probe.unlink()
            except OSError as exc:
                logger.warning("%s: TensorRT plans cannot be cached there (%s); mount a writable host folder and "
                               "set %s to it", folder, exc, ENGINES_ENV)
            if not os.environ.get(ENGINES_ENV):
                logger.warning("%s is not set: plans go into the model folder %s; mount a host folder and set it "
                               "so they outlive the container", ENGINES_ENV, folder)
            self._plan_cache = str(folder)
        return self._plan_cache

    def segment(self, image: Path, out_dir: Path, params: Params, progress: Any,
                voxel_size_um: tuple[float, float, float] | None = None) -> tuple[Any, Path, Path]:
        """Segment ``image`` into ``out_dir`` and write its cell table; returns (result, labels, table).

        ``voxel_size_um``: from the image's BisQue metadata; it overrides the file's (the image service
        re-encodes TIFFs without ImageJ spacing) and is written into the label image.
        """
        from engine import SegmentOptions, segment_file
        from engine.cells import cell_table, write_cell_table_csv

        backend = self.backend()
        self.stage = f"segmenting {image.name}"
        stem = image.name.split(".")[0] or "image"
        labels_path, table_path = out_dir / f"{stem}_labels.tif", out_dir / f"{stem}_cells.csv"
        options = SegmentOptions(threshold=params.threshold, min_dist=params.min_dist,
                                 label_threshd=params.label_threshd, voxel_size_um=voxel_size_um)
        result = segment_file(image, labels_path, bundle=self.bundle(), options=options, progress=progress,
                              backend=backend)
        logger.info("%s: %s", image.name, result.report.summary())
        self.stage = "measuring cells"
        write_cell_table_csv(table_path, cell_table(result.labels, voxel_size_um=result.report.voxel_size_um))
        return result, labels_path, table_path

    def local(self, inputs: list[str]) -> dict[str, Any]:
        """``--local``: segment a TIFF into ``--out-dir``; no BisQue."""
        params = resolve_params(inputs, None)
        result, labels_path, table_path = self.segment(Path(params.resource_url), self.args.out_dir, params, None)
        return {"Segmentation": str(labels_path), "Cell table": str(table_path),
                "Metadata": metadata(result, params, self.bundle(), voxel=result.report.voxel_size_um)}

    def image(self, bq: Any, mex: Mex, params: Params, workdir: Path) -> dict[str, Any]:
        """One image: fetch -> segment -> upload -> FINISHED (checked) on ``mex``."""
        self.plan_cache()
        self.backend()
        self.stage = "fetching the image"
        mex.update("fetching image")
        started = time.perf_counter()
        fetched = fetch_resource(bq, params.resource_url, workdir, source=self.args.source)
        io_s = {"fetch": time.perf_counter() - started}
        meta_voxel = voxel_size_from_meta(bq, fetched.uniq) if fetched.kind == "image" else None
        logger.info("%s: voxel size %s", fetched.name, f"{meta_voxel} um (image metadata)" if meta_voxel else
                    "not in the image metadata: the file's, else estimated")
        mex.update("segmenting 0%")
        result, labels_path, table_path = self.segment(fetched.path, workdir, params, mex.progress("segmenting"),
                                                       voxel_size_um=meta_voxel)
        self.stage = "uploading results"
        mex.update("uploading results")
        folder, started = f"ModuleExecutions/{MODULE}", time.perf_counter()
        segmentation = upload_file(bq, labels_path, kind="image", name=f"{folder}/{labels_path.name}")
        try:
            table_uri = upload_file(bq, table_path, kind="table", name=f"{folder}/{table_path.name}")
        except BisqueError as exc:
            raise BisqueError(f"{exc}; the label image had been uploaded as {segmentation}") from exc
        io_s["upload"] = time.perf_counter() - started
        meta = {**metadata(result, params, self.bundle(), voxel=result.report.voxel_size_um, io_s=io_s),
                "plan_cache": self.plan_cache()}
        self.stage = "finishing the MEX"
        mex.finish(outputs_tag(segmentation, table_uri, meta))
        return {"Segmentation": segmentation, "Cell table": table_uri, "Metadata": meta}

    def bisque(self, bq: Any, inputs: list[str], workdir: Path) -> Any:
        """Run the session's MEX: one image, or each sub-MEX it holds; by hand (no MEX), each dataset member."""
        self.stage = "reading the inputs"
        if bq.mex is None:
            params = resolve_params(inputs, None)
            members = dataset_members(bq, params.resource_url)
            if members is None:
                return self.image(bq, Mex(None), params, workdir)
            return [self.image(bq, Mex(None), replace(params, resource_url=m), workdir) for m in members]
        if inputs:
            logger.info("positional inputs ignored: the MEX's inputs are used (BisQue drops empty ones)")
        doc = bq.mex.xmltree
        children = sub_mex_urls(doc)
        if children:
            return self.sub_mexes(bq, Mex(bq), children, mex_input_values(doc).get("resource_url"), workdir)
        params = resolve_params([], mex_input_values(doc))
        self._log_inputs(params)
        return self.image(bq, Mex(bq), params, workdir)

    def sub_mexes(self, bq: Any, top: Mex, urls: list[str], dataset: str | None, workdir: Path) -> list[Any]:
        """Each sub-MEX in turn, with this session's (the top MEX's) token; one failure does not stop the rest.

        Raises:
            BisqueError: some sub-MEXes failed (each is FAILED with its own message).
        """
        results, failed = [], []
        for number, url in enumerate(urls, 1):
            top.update(f"running image {number} of {len(urls)}")
            child = Mex(bq, url)
            try:
                self.stage = f"reading the sub-MEX {url}"
                params = resolve_params([], mex_input_values(get_xml(bq, url, self.stage, view="deep")))
                self._log_inputs(params)
                sub_dir = workdir / f"image{number}"
                sub_dir.mkdir()
                results.append(self.image(bq, child, params, sub_dir))
            except Terminated as exc:  # docker stop: this sub-MEX and the whole run end FAILED
                child.fail(one_line(exc, self.stage, self.secrets))
                raise
            except Exception as exc:  # noqa: BLE001 - one image's failure is its sub-MEX's; the others still run
                message = one_line(exc, self.stage, self.secrets)
                logger.error("sub-MEX %d of %d FAILED: %s", number, len(urls), message)
                child.fail(message)
                failed.append(message)
        if failed:
            raise BisqueError(f"{len(failed)} of {len(urls)} images failed; the first: {failed[0]}")
        self.stage = "finishing the MEX"
        top.finish(dataset_outputs_tag(dataset, top.url))
        return results

    @staticmethod
    def _log_inputs(params: Params) -> None:
        logger.info("inputs: %s", ", ".join(f"{k}={getattr(params, k)} ({v})" for k, v in params.origin.items()))
