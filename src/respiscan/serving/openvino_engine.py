"""The OpenVINO engine: the bundle's own ONNX graphs (the same files, checked against the same hashes as the
ONNX engine) compiled by OpenVINO for this CPU, without torch. OpenVINO picks bf16 by itself where the CPU has
bf16 units; `respiscan export --choose-engine` checks that its probabilities agree with torch fp32 before `auto`
may run it. An optional extra: `pip install "respiscan[openvino]"`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle
from respiscan.extras import require
from respiscan.serving.onnx_engine import BATCH, checked_export, checked_graph
from respiscan.serving.pipeline import BasePipeline, Outputs


class OpenVinoPipeline(BasePipeline):
    """`BasePipeline` on OpenVINO's CPU plugin; `precision` is what OpenVINO chose ("bf16" or "fp32")."""

    def __init__(self, bundle: str | Path | Bundle):
        super().__init__(bundle)
        ov = require("openvino", "the OpenVINO engine")
        spec = checked_export(self)
        core = ov.Core()
        self.compiled = {m: checked_graph(self.bundle, m, lambda graph: core.compile_model(
            core.read_model(graph), "CPU", {"PERFORMANCE_HINT": "LATENCY"})) for m in self.modalities}
        first = next(iter(self.compiled.values()))
        self.precision = "bf16" if first.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "fp32"
        self.output_names = [spec.output, *([spec.embedding_output] if spec.embedding_output else [])]
        # calling a compiled model runs its one infer request: a second thread at once gets "Infer Request is busy"
        self._locks = {m: threading.Lock() for m in self.modalities}

    def outputs(self, images: np.ndarray, modality: str) -> Outputs:
        self.check_modality(modality)
        images = np.ascontiguousarray(images, dtype=np.uint8)
        compiled = self.compiled[modality]
        ports = [compiled.output(name) for name in self.output_names]
        out = []
        with self._locks[modality]:
            for i in range(0, len(images), BATCH):
                result = compiled(images[i:i + BATCH])
                out.append([result[port] for port in ports])
        if not out:
            return Outputs(np.zeros(0), np.zeros((0, 0), np.float32))
        p = np.concatenate([o[0] for o in out]).astype(np.float64)
        embedding = np.concatenate([o[1] for o in out]) if len(ports) > 1 else np.zeros((len(p), 0), np.float32)
        return Outputs(p, embedding)
