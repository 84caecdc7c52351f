"""The saved-model format: a folder with config.json (JSON, validated) and model.safetensors (never pickle).

The config carries everything prediction needs (model structure, preprocessing, thresholds), so a bundle
runs offline without the training data or the training code's state. Reading the config needs no torch
(the ONNX engine uses it); torch is imported only to save or read weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from respiscan import __version__
from respiscan.errors import RespiscanError
from respiscan.utils import atomic_write, write_json

if TYPE_CHECKING:
    import torch

FORMAT = "respiscan-bundle"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_REQUIRED = {"format": str, "format_version": int, "model": dict, "preprocess": dict, "class_names": list,
             "thresholds": dict, "weights_sha256": str}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_bundle(out: Path, net: "torch.nn.Module", config: dict[str, Any]) -> Path:
    """Write weights first, then the config that names their hash: a bundle is complete once config.json exists."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_write(out / WEIGHTS, "wb") as f:
        f.write(save(state))
    write_json(out / CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION, "respiscan_version": __version__,
                              **config, "weights_sha256": sha256_file(out / WEIGHTS)})
    return out


def read_config(bundle: Path) -> dict[str, Any]:
    """config.json, validated: clear one-line messages for anything missing, mistyped or too new."""
    path = Path(bundle) / CONFIG
    if not Path(bundle).is_dir():
        raise RespiscanError(f"{bundle}: not a bundle folder")
    if not path.is_file():
        raise RespiscanError(f"{path}: missing; not a respiscan bundle")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RespiscanError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise RespiscanError(f"{path}: expected a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in config:
            raise RespiscanError(f"{path}: missing key {key!r}")
        if not isinstance(config[key], kind):
            raise RespiscanError(f"{path}: {key!r} should be {kind.__name__}, got {type(config[key]).__name__}")
    if config["format"] != FORMAT:
        raise RespiscanError(f"{path}: format {config['format']!r} is not {FORMAT!r}")
    if config["format_version"] > FORMAT_VERSION:
        raise RespiscanError(f"{path}: bundle format version {config['format_version']} is newer than this respiscan "
                             f"supports ({FORMAT_VERSION}); upgrade respiscan")
    return config


def read_weights(bundle: Path, config: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The state dict, after checking the file's hash against the one recorded at save time."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(bundle) / WEIGHTS
    if not path.is_file():
        raise RespiscanError(f"{path}: missing weights file")
    if sha256_file(path) != config["weights_sha256"]:
        raise RespiscanError(f"{path}: weights do not match the hash in config.json (truncated or modified)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RespiscanError(f"{path}: unreadable safetensors file ({e})") from e
