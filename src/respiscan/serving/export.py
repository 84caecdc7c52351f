"""`respiscan export`: write a bundle's network as ONNX graphs, so prediction can run without torch.

One graph per modality (`model_xray.onnx`, `model_ct.onnx`): input `images`, preprocessed uint8 (batch, S, S)
with a dynamic batch; outputs `probability`, p(COVID) per image (the sigmoid is inside the graph), and
`embedding`, the task-specific 1280-d embedding the shift detector scores (serving/shift.py). A graph per
modality keeps each one the exact path `Pipeline.outputs` runs, with no unused backbone to load. The
file names, their sha256 and the opset go into config.json under "onnx", so the ONNX engine can refuse a
graph that was modified or exported from other weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from respiscan.bundle import OnnxExport, OnnxGraph, sha256_file
from respiscan.errors import RespiscanError
from respiscan.extras import require
from respiscan.serving.torch_engine import Pipeline

INPUT = "images"
OUTPUT = "probability"
EMBEDDING = "embedding"
TOLERANCE = 1e-3  # max |p_onnx - p_torch_fp32| accepted on random inputs


def graph_name(modality: str) -> str:
    return f"model_{modality}.onnx"


class _Probability(nn.Module):
    """The bundle's network for one modality, sigmoid included: uint8 images -> (p(COVID), embedding)."""

    def __init__(self, net: nn.Module, modality: str):
        super().__init__()
        self.net, self.modality = net, modality

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net.logits_and_embedding(images, self.modality)
        return torch.sigmoid(out.logits), out.embedding


def _export_graph(model: nn.Module, size: int, path: Path, opset: int) -> None:
    onnx = require("onnx", "respiscan export")  # first: torch.onnx.export needs it too

    example = torch.zeros((2, size, size), dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript; it
        # exports timm's CNNs exactly, so its deprecation notices are noise for the user
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT, EMBEDDING],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}, EMBEDDING: {0: "batch"}})
    onnx.checker.check_model(str(path), full_check=True)


def _max_difference(model: nn.Module, path: Path, size: int, seed: int = 0) -> float:
    """Largest |p_onnx - p_torch| on random images (batch 3, not the export's 2: checks the dynamic batch)."""
    ort = require("onnxruntime", "respiscan export")

    images = np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: images})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(images))[0].numpy()
    return float(np.abs(got.astype(np.float64) - want).max())


def export_onnx(bundle: str | Path, opset: int = 17) -> dict[str, Path]:
    """Write one ONNX graph per modality into the bundle and record them in config.json; returns the graphs.

    Each graph is checked with onnx.checker and compared with the torch fp32 network on random images; a
    difference above TOLERANCE raises RespiscanError and leaves the bundle as it was.
    """
    bundle = Path(bundle)
    pipe = Pipeline(bundle, bf16=False)
    size = int(pipe.preprocess_config.size)
    graphs: dict[str, OnnxGraph] = {}
    written: dict[str, Path] = {}
    pending: list[tuple[Path, Path]] = []
    try:
        for modality in pipe.modalities:
            model = _Probability(pipe.net, modality).eval()
            target = bundle / graph_name(modality)
            tmp = bundle / f".{target.name}.tmp"
            pending.append((tmp, target))
            _export_graph(model, size, tmp, opset)
            diff = _max_difference(model, tmp, size)
            if not diff <= TOLERANCE:
                raise RespiscanError(f"{bundle}: the ONNX graph for {modality} differs from the torch model by "
                                     f"{diff:.2e} (> {TOLERANCE:.0e}); not exported")
            graphs[modality] = OnnxGraph(file=target.name, sha256=sha256_file(tmp), max_abs_diff=diff)
            written[modality] = target
        # graphs first, then the config that names their hashes: a crash in between leaves hashes that
        # do not match, which the ONNX engine refuses, never a silently stale graph
        for tmp, target in pending:
            os.replace(tmp, target)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    # the hash of the weights that were exported, so the ONNX engine can tell graphs of other weights
    pipe.bundle.save_config(pipe.config.with_onnx(OnnxExport(
        opset=opset, input=INPUT, output=OUTPUT, weights_sha256=pipe.config.weights_sha256,
        torch_version=torch.__version__, graphs=graphs, embedding_output=EMBEDDING)))
    return written
