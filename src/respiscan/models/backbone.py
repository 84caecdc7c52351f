"""Transfer-learning embedding models: a backbone + GAP + Dense(1280) + LeakyReLU + Dense(1).

Backbones are timm's (any name timm knows) or torchxrayvision's chest X-ray DenseNets (`xrv:<weights>`, e.g.
`xrv:densenet121-res224-all`; the `xrv` extra). The model takes the preprocessed uint8 grey image and
normalises it itself, so the normalisation travels with the saved weights (timm's lesson: preprocessing
belongs to the model).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from respiscan.errors import RespiscanError
from respiscan.extras import require

EMBED_DIM = 1280
LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, as in the reference
XRV = "xrv:"  # prefix of torchxrayvision backbone names


class XrvDenseNet(nn.Module):
    """torchxrayvision's DenseNet-121 features, shaped like a timm backbone: `forward_features` gives the last
    feature map, `forward` its ReLU + global average pool (torchxrayvision's `features2`), and `pretrained_cfg`
    the input normalisation. Its 18 pathology outputs (classifier, op_threshs) are not kept.

    torchxrayvision's models take one channel scaled to [-1024, 1024] at the resolution they were trained at
    (224 px); other sizes are resized bilinearly to it here, as torchxrayvision's `fix_resolution` does, but
    without its antialiasing when shrinking, which ONNX opset 17 cannot export (identical when enlarging).
    """

    def __init__(self, features: nn.Sequential, name: str, resolution: int):
        super().__init__()
        self.features = features
        self.resolution = resolution
        self.num_features = int(features[-1].num_features)  # the final BatchNorm ("norm5")
        # timm's convention (mean and std of the image in [0, 1]): (x - 127.5) / (255 / 2048) maps 0..255 onto
        # [-1024, 1024], as torchxrayvision.datasets.normalize(img, 255)
        self.pretrained_cfg = self.default_cfg = {"architecture": name, "mean": (0.5,), "std": (1 / 2048,),
                                                  "input_size": (1, resolution, resolution)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # unconditional, so that tracing for ONNX sees no size test; at the native size it returns x exactly
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.forward_features(x)), 1).flatten(1)


def _xrv_backbone(name: str, pretrained: bool | str | Path) -> XrvDenseNet:
    """`pretrained`: False (random), True (torchxrayvision's own weights) or a local .safetensors file.

    With True, torchxrayvision loads its weights file from its own cache directory (~/.torchxrayvision,
    downloading it there when absent); that file is a pickle, which torchxrayvision unpickles itself. A
    user-given file is never unpickled: it must be safetensors (a state dict with `features.*` keys).
    """
    with warnings.catch_warnings():  # importing torchxrayvision turns every warning off, process-wide
        xrv = require("torchxrayvision", f"backbone {name!r}")
    weights = name[len(XRV):]
    known = [k for k in xrv.models.model_urls if k.startswith("densenet")]
    if weights not in known:
        raise RespiscanError(f"unknown backbone {name!r}; torchxrayvision's: {', '.join(XRV + k for k in known)}")
    resolution = int(xrv.models.model_urls[weights].get("input_resolution", 224))
    if pretrained is True:
        try:
            model = xrv.models.DenseNet(weights=weights)
        except Exception as e:  # network, file and unpickling errors come in any type
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RespiscanError(f"backbone {name!r}: could not load torchxrayvision's weights ({first})") from e
    else:
        model = xrv.models.DenseNet(weights=None)
    backbone = XrvDenseNet(model.features, name, resolution)
    if isinstance(pretrained, (str, Path)) and str(pretrained):
        backbone.load_state_dict(_xrv_state(Path(pretrained), backbone, name))
    return backbone


def _xrv_state(path: Path, backbone: XrvDenseNet, name: str) -> dict[str, torch.Tensor]:
    """The `features.*` tensors of a safetensors file (a whole torchxrayvision DenseNet's state dict is fine)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise RespiscanError(f"{path}: pretrained weights file not found")
    if path.suffix != ".safetensors":
        raise RespiscanError(f"{path}: weights for {name!r} must be a .safetensors file (respiscan never unpickles "
                             f".pt/.pth files); save torchxrayvision's model.state_dict() with safetensors")
    try:
        state = {k: v for k, v in load_file(path).items() if k.startswith("features.")}
    except (SafetensorError, OSError) as e:
        raise RespiscanError(f"{path}: not a readable safetensors file ({e})") from e
    want = backbone.state_dict()
    wrong = sorted(set(want) ^ set(state)) or [k for k in want if state[k].shape != want[k].shape]
    if wrong:
        raise RespiscanError(f"{path}: not the weights of {name!r} ({len(wrong)} tensor(s) missing, extra or "
                             f"of another shape, e.g. {wrong[0]!r})")
    return state


def create_backbone(name: str, pretrained: bool | str | Path = False) -> nn.Module:
    """A one-channel feature extractor without classifier (pooled features out): timm's, or torchxrayvision's
    for `xrv:` names.

    `pretrained` is False, True (the library's published weights) or a local weights file (offline use).
    """
    if name.startswith(XRV):
        return _xrv_backbone(name, pretrained)
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise RespiscanError(f"unknown backbone {name!r}{hint}")
    kwargs: dict = {"num_classes": 0, "in_chans": 1}
    if isinstance(pretrained, (str, Path)) and str(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise RespiscanError(f"{path}: pretrained weights file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RespiscanError(f"backbone {name!r}: could not load pretrained weights ({first})") from e


class EmbeddingNet(nn.Module):
    """Backbone + Dense(1280) + LeakyReLU (the embedding) + Dense(1) (COVID logit)."""

    def __init__(self, backbone_name: str, pretrained: bool | str | Path = False):
        super().__init__()
        self.backbone = create_backbone(backbone_name, pretrained).to(memory_format=torch.channels_last)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean = float(sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,))))
        std = float(sum(cfg.get("std", (0.25,))) / len(cfg.get("std", (0.25,))))
        self.register_buffer("mean", torch.tensor(mean * 255.0))
        self.register_buffer("std", torch.tensor(std * 255.0))
        self.dense = nn.Linear(self.backbone.num_features, EMBED_DIM)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.out = nn.Linear(EMBED_DIM, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, 1, H, W) uint8 -> normalised float (B, 1, H, W), channels_last."""
        x = images if images.ndim == 4 else images.unsqueeze(1)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(features.float()))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, logit) from one pass: what a source adversary reads, and the prediction."""
        embedding = self.embed(images)
        return embedding, self.out(embedding).squeeze(-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[1]
