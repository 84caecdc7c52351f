"""torchxrayvision backbones (`xrv:` names): torchxrayvision's own features, safe weights, a whole bundle.

Skipped without torchxrayvision (the `xrv` extra); tests/test_extras.py checks the error when it is missing.
No weights can be downloaded here, so the networks are randomly initialised (or loaded from a file made here).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_config
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.models.backbone import EmbeddingNet
from respiscan.models.spec import ModelSpec

xrv = pytest.importorskip("torchxrayvision")

XRV = "xrv:densenet121-res224-all"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random torchxrayvision DenseNet and its state dict as a safetensors file."""
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()
    path = tmp_path_factory.mktemp("xrv") / "densenet.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


@pytest.mark.parametrize("size", [224, 64])
def test_features_are_torchxrayvisions_on_its_own_input_scaling(reference, size):
    model, path = reference
    net = EmbeddingNet(XRV, path).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, size, size), dtype=np.uint8)
    model.input_resolution = 224  # what its published weights set: inputs of other sizes are resized
    with torch.no_grad():
        want = model.features2(torch.from_numpy(xrv.utils.normalize(images, 255))[:, None])
        got = net.features(torch.from_numpy(images))
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert net.normalise(torch.tensor([[[0, 255]]], dtype=torch.uint8)).flatten().tolist() == [-1024.0, 1024.0]


def test_weights_must_be_safetensors_of_this_network(reference, tmp_path):
    pickle = tmp_path / "densenet.pt"
    pickle.write_bytes(b"never unpickled")
    with pytest.raises(RespiscanError, match=r"densenet\.pt: weights for .* must be a \.safetensors file"):
        EmbeddingNet(XRV, pickle)
    state = dict(xrv.models.DenseNet(weights=None).state_dict())
    state["features.conv0.weight"] = torch.zeros(64, 3, 7, 7)
    save_file(state, str(tmp_path / "rgb.safetensors"))
    with pytest.raises(RespiscanError, match=r"rgb\.safetensors: not the weights of .*'features\.conv0\.weight'"):
        EmbeddingNet(XRV, tmp_path / "rgb.safetensors")


def test_unknown_xrv_name_lists_the_known_ones():
    with pytest.raises(RespiscanError, match=r"^unknown backbone 'xrv:resnet50-res512-all'; .*-res224-nih"):
        EmbeddingNet("xrv:resnet50-res512-all")


@pytest.mark.slow
def test_xrv_bundle_predicts_exports_and_explains(reference, tmp_path):
    """X-ray on the xrv DenseNet, CT on timm's, both from a --weights folder (frozen: a DenseNet's backward
    pass at 224 px is too slow for a test on a shared CPU)."""
    import timm

    from respiscan.data.synth import generate
    from respiscan.serving.explain import gradcam, target_layer
    from respiscan.serving.export import export_onnx
    from respiscan.serving.onnx_engine import OnnxPipeline
    from respiscan.serving.torch_engine import Pipeline
    from respiscan.training.trainer import train

    model, path = reference
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(path, weights / f"{XRV}.safetensors")
    save_file(timm.create_model("test_resnet", in_chans=1, num_classes=0).state_dict(),
              str(weights / "test_resnet.safetensors"))
    data = generate(tmp_path / "data", n_per_class=4, size=64, seed=3, progress=False)
    cfg = tiny_config()
    cfg = replace(cfg, model=ModelSpec(task_backbones={"xray": XRV, "ct": "test_resnet"}), pretrained=str(weights),
                  backbone_fit=replace(cfg.backbone_fit, epochs=1))
    bundle = train(data, tmp_path / "bundle", cfg)

    pipe = Pipeline(bundle, bf16=False)
    assert torch.equal(pipe.net.task_embedder("xray").backbone.features.conv0.weight, model.features.conv0.weight)
    xray = next(s.path for s in discover(data) if s.modality == "xray" and s.split == "test")
    result = pipe.predict(xray=xray)
    assert 0 <= result["xray_probability"] <= 1 and result["label"] in pipe.config.class_names

    exported = shutil.copytree(bundle, tmp_path / "exported")
    export_onnx(exported)  # compares the graph with torch fp32 and refuses a difference over 1e-3
    onnx = OnnxPipeline(exported, threads=1).predict(xray=xray)
    assert abs(onnx["xray_probability"] - result["xray_probability"]) < 1e-3

    size = pipe.preprocess_config.size
    name, layer = target_layer(pipe.net.task_embedder("xray"), size)
    assert name == "features"  # the DenseNet's final BatchNorm'd map, before torchxrayvision's ReLU + pool
    cam = gradcam(pipe, pipe.prepare(xray, "xray"), "xray", layer)
    assert cam.shape == (size, size) and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() in (0.0, 1.0)
