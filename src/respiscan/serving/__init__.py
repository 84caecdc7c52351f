"""Serving: the prediction pipeline and its engines (torch, onnxruntime, OpenVINO), ONNX export, the engine
choice, streaming over archives, CT volumes, Grad-CAM.

Nothing here imports `respiscan.training` or `respiscan.evaluation`, and the ONNX path never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import Literal, get_args

from respiscan.errors import RespiscanError
from respiscan.serving.pipeline import BasePipeline

Engine = Literal["auto", "torch", "onnx", "openvino"]
ENGINES: tuple[str, ...] = get_args(Engine)


def load(bundle: str | Path, engine: Engine = "auto", bf16: bool | None = None,
         few_images: bool = False, modalities: Iterable[str] | None = None) -> BasePipeline:
    """The pipeline for `engine`: "onnx", "openvino", "torch", or "auto": per modality the engine that
    `respiscan export --choose-engine` recorded (serving/engine_choice.py), else ONNX when the bundle has graphs
    and onnxruntime is installed, else torch.

    `respiscan.load`, `respiscan predict` and `evaluate` all choose through here. The torch engine is imported
    only when chosen, so "onnx"/"auto" on an exported bundle never loads torch. `few_images` (one case from the
    command line) lets the ONNX engine skip set-up that pays off only over many batches, and `modalities` (the
    ones a case gives) load only those graphs up front.
    """
    if engine not in ENGINES:
        raise RespiscanError(f"unknown engine {engine!r}; accepted: {', '.join(ENGINES)}")
    from respiscan.bundle import Bundle
    from respiscan.serving.onnx_engine import OnnxPipeline

    opened = Bundle.open(bundle)
    if engine == "openvino":
        from respiscan.serving.openvino_engine import OpenVinoPipeline

        return OpenVinoPipeline(opened)
    if engine == "auto" and opened.config.engines:
        from respiscan.serving.engine_choice import load_chosen

        chosen = load_chosen(opened, bf16)
        if chosen is not None:
            return chosen
    if engine == "onnx" or (engine == "auto" and opened.has_onnx and find_spec("onnxruntime") is not None):
        return OnnxPipeline(opened, few_images=few_images, modalities=modalities)
    from respiscan.serving.torch_engine import Pipeline

    return Pipeline(opened, bf16=bf16)
