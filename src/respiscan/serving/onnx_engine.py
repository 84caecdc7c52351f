"""The ONNX engine: a bundle's exported graphs run with onnxruntime, without importing torch.

`import torch, timm` costs seconds and most of a gigabyte before any work; onnxruntime a tenth of a second.
A one-image prediction from the command line is dominated by that start-up, so this module (and everything
it imports) must stay torch-free; tests/test_onnx.py checks it in a fresh process.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from respiscan.bundle import Bundle, OnnxExport
from respiscan.errors import RespiscanError
from respiscan.extras import require
from respiscan.serving.pipeline import BasePipeline, Outputs

T = TypeVar("T")
BATCH = 32  # images per onnxruntime call: bounds memory on large batches, big enough to keep the cores busy


class OnnxPipeline(BasePipeline):
    """`BasePipeline` on onnxruntime: same preprocessing, fusion and labels as the torch engine, fp32."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None, few_images: bool = False,
                 modalities: Iterable[str] | None = None):
        """`few_images`: for a handful of images (one case from the command line), skip prepacking the weights
        and the layout rewrites, which speed every later batch but make building a session slower.
        `modalities`: the graphs to load now (default all); another one is loaded on first use, so that an
        X-ray-only prediction does not pay for building the CT session."""
        super().__init__(bundle)
        ort = require("onnxruntime", "the ONNX engine")  # imported here: the torch path must not need it

        spec = checked_export(self)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # idle pool threads sleep instead of busy-waiting: on busy cores (the other session being built, image
        # decoding, other processes) spinning ones made building a session 3x and a 32-image batch 1.7x slower
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if few_images:
            options.add_session_config_entry("session.disable_prepacking", "1")
        # the layout-changing (NCHWc) rewrites of ENABLE_ALL make a batch of 8 1.7x faster but building the session
        # 2.4x slower (median 281 vs 117 ms for a 74 MB resnet18 graph, measured): for one case, basic rewrites only
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if few_images
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.input, self.output = spec.input, spec.output
        self.run_outputs = [self.output, *([spec.embedding_output] if spec.embedding_output else [])]

        self._ort, self._options, self._lock = ort, options, threading.Lock()
        now = [m for m in self.modalities if modalities is None or m in set(modalities)]
        # building a session is mostly native work outside the GIL: the graphs load side by side
        with ThreadPoolExecutor(max(1, len(now))) as pool:
            self.sessions: dict[str, ort.InferenceSession] = dict(zip(now, pool.map(self._session, now)))

    def _session(self, modality: str):
        return checked_graph(self.bundle, modality, lambda graph: self._ort.InferenceSession(
            graph, self._options, providers=["CPUExecutionProvider"]))

    def outputs(self, images: np.ndarray, modality: str) -> Outputs:
        self.check_modality(modality)
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if modality not in self.sessions:
            with self._lock:
                if modality not in self.sessions:
                    self.sessions[modality] = self._session(modality)
        session = self.sessions[modality]
        out = [session.run(self.run_outputs, {self.input: images[i:i + BATCH]}) for i in range(0, len(images), BATCH)]
        if not out:
            return Outputs(np.zeros(0), np.zeros((0, 0), np.float32))
        p = np.concatenate([o[0] for o in out]).astype(np.float64)
        embedding = np.concatenate([o[1] for o in out]) if len(out[0]) > 1 else np.zeros((len(p), 0), np.float32)
        return Outputs(p, embedding)


def checked_export(pipe: BasePipeline) -> OnnxExport:
    """The bundle's ONNX export, if its graphs can serve `pipe` (every engine that runs the graphs asks)."""
    where, spec = pipe.bundle.path, pipe.config.onnx
    if spec is None or not pipe.bundle.has_onnx:
        raise RespiscanError(f"{where}: no ONNX graph; run `respiscan export {where}` first")
    if spec.weights_sha256 != pipe.config.weights_sha256:
        raise RespiscanError(f"{where}: the ONNX graphs were exported from other weights; "
                             f"run `respiscan export {where}` again")
    if pipe.shift is not None and spec.embedding_output is None:
        raise RespiscanError(f"{where}: the ONNX graphs predate the shift detector (no embedding output); "
                             f"run `respiscan export {where}` again")
    missing = [m for m in pipe.modalities if m not in spec.graphs]
    if missing:
        raise RespiscanError(f"{where}: no ONNX graph for {missing[0]}; run `respiscan export {where}` again")
    return spec


def checked_graph(bundle: Bundle, modality: str, build: Callable[[bytes], T]) -> T:
    """`build(graph)` of a modality's graph bytes, returned only if those bytes match their hash in config.json.

    The hash runs on another thread while `build` runs (both release the GIL): hashing a 74 MB resnet18 graph
    costs half as much as building its session, and a one-image prediction waits for both."""
    where, graph = bundle.path, bundle.config.onnx.graphs[modality]
    data = _read(where / graph.file, where)
    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            built = build(data)
        finally:  # a mismatch is the error to report, also when it made `build` fail
            if digest.result() != graph.sha256:
                raise RespiscanError(f"{where / graph.file}: does not match the hash in config.json "
                                     f"(truncated or modified); run `respiscan export {where}` again") from None
    return built


def _read(path: Path, bundle: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RespiscanError(f"{path}: cannot read the ONNX graph ({e.strerror}); "
                             f"run `respiscan export {bundle}` again") from e
