"""Grad-CAM explanations of the final COVID logit, with plain PyTorch hooks (no extra dependency).

The heat map explains the whole network's decision (`net(images, modality)`: backbone, task-specific and
shared features, head), not the embedding model's own Dense(1) output, because the whole network is what
`predict` reports. It is taken on the backbone that produced the task-specific embedding of the modality.

Target layer rule (any timm CNN): the module that returns `backbone.forward_features(x)`, the last 4-D
(N, num_features, H, W) feature map before global pooling; token or channels-last outputs (ViT, Swin) are
refused. It is found by one probe pass with forward hooks on every submodule: the
target is the last module to finish that returned that very tensor, skipping nn.Identity (which only passes
it on). That is `layer4` for resnet*/test_resnet, `bn2` (after conv_head) for efficientnet*/test_efficientnet
and `stages` (after its last stage) for convnext*.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from torch import nn

from respiscan.errors import RespiscanError
from respiscan.figures import new_figure, save_png
from respiscan.models.backbone import EmbeddingNet


def target_layer(embedder: EmbeddingNet, size: int) -> tuple[str, nn.Module]:
    """(name, module) of the backbone's last feature-map layer, by the rule in the module docstring."""
    backbone = embedder.backbone
    finished: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda m, i, o, name=name: finished.append((name, m, o)))
               for name, module in backbone.named_modules() if name and not isinstance(module, nn.Identity)]
    try:
        with torch.no_grad():
            features = backbone.forward_features(embedder.normalise(torch.zeros(1, size, size, dtype=torch.uint8)))
    finally:
        for handle in handles:
            handle.remove()
    name = type(backbone).__name__
    channels = getattr(backbone, "num_features", None)
    if not (isinstance(features, torch.Tensor) and features.ndim == 4 and features.shape[1] == channels):
        raise RespiscanError(f"Grad-CAM needs a CNN backbone whose features are a (N, {channels}, H, W) map; "
                             f"{name} gives {tuple(getattr(features, 'shape', ()))}")
    for layer_name, module, output in reversed(finished):
        if output is features:
            return layer_name, module
    raise RespiscanError(f"Grad-CAM: no module of {name} returns its final feature map")


def gradcam(pipeline, image: np.ndarray, modality: str, layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM heat map (S, S) in [0, 1] of the final COVID logit for one preprocessed uint8 (S, S) image.

    ReLU(sum_c mean(d logit / d A_c) * A_c) on the target layer's activations A, resized bilinearly to the
    image and divided by its maximum (all zeros when nothing speaks for COVID). fp32 with autocast off, even
    inside a caller's autocast: bf16 gradients are too coarse. Passing `layer` (from target_layer) skips the
    probe pass when explaining many images.
    """
    net = getattr(pipeline, "net", None)
    if net is None:
        raise RespiscanError("Grad-CAM needs the torch engine (respiscan.serving.torch_engine.Pipeline), "
                             "not an exported model")
    pipeline.check_modality(modality)
    size = pipeline.preprocess_config.size
    image = np.asarray(image)
    if image.shape != (size, size) or image.dtype != np.uint8:
        raise RespiscanError(f"Grad-CAM expects a preprocessed uint8 image of {size}x{size}, "
                             f"got {image.dtype} {image.shape}; use pipeline.prepare first")
    layer = layer or target_layer(net.task_embedder(modality), size)[1]
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # A leaf that needs grad: gradients stop here, so frozen backbones work and nothing below is computed.
        act = output.detach().float().requires_grad_(True)
        captured.append(act)
        return act

    handle = layer.register_forward_hook(capture)
    try:
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            logit = net(torch.from_numpy(np.ascontiguousarray(image))[None], modality).reshape(())
            (grads,) = torch.autograd.grad(logit, captured[-1])
    finally:
        handle.remove()
    act, grads = captured[-1][0].detach(), grads[0]
    cam = torch.relu((grads.mean(dim=(1, 2))[:, None, None] * act).sum(0)).numpy().astype(np.float32)
    cam = cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
    peak = float(cam.max())
    return cam / peak if peak > 0 else np.zeros_like(cam)


def plot_gradcam_overlay(image: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str) -> Path:
    """Input beside its Grad-CAM overlay, so the reader can see what the heat covers."""
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8 or img.size == 0:
        raise RespiscanError(f"gradcam image must be a grey uint8 HxW array, got {img.dtype} {img.shape}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0 or not np.isfinite(heat).all():
        raise RespiscanError(f"gradcam heatmap must be a finite float HxW array, got shape {heat.shape}")
    heat = np.clip(cv2.resize(heat, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)
    h, w = img.shape
    fig = new_figure(2 * 3.6 * w / max(h, w) + 1.0, 3.6 * h / max(h, w) + 0.7)
    left, right = fig.subplots(1, 2)
    left.imshow(img, cmap="gray", vmin=0, vmax=255)
    left.set_title("Input")
    right.imshow(img, cmap="gray", vmin=0, vmax=255)
    right.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=0.45)
    right.set_title("Grad-CAM overlay")
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=right, fraction=0.046, pad=0.03, label="Activation")
    fig.suptitle(title)
    return save_png(fig, path)


def explain(pipeline, inputs: dict[str, str | Path], out_dir: str | Path) -> list[Path]:
    """One `<stem>_<modality>_gradcam.png` per input (modality -> image path) in `out_dir`: the preprocessed
    image the network saw beside its Grad-CAM overlay, titled with p(COVID) and the label as `predict` gives."""
    out_dir = Path(out_dir)
    written = []
    for modality, path in inputs.items():
        image = pipeline.prepare(path, modality)
        heatmap = gradcam(pipeline, image, modality)
        probability = float(pipeline.probabilities(image[None], modality)[0])
        label = pipeline.label(probability, modality)
        title = f"{Path(path).name} ({modality}): p(COVID) = {probability:.3f}, {label}"
        out = out_dir / f"{Path(path).stem}_{modality}_gradcam.png"
        written.append(plot_gradcam_overlay(image, heatmap, out, title))
    return written
