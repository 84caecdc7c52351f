"""Optional dependencies: each missing extra ends the command that needs it with one line and exit code 2.

A package is made missing in a fresh process by putting None into sys.modules for it, which makes its
import fail as if it were not installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.extras import EXTRAS, MissingExtra, require

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DICOM_DECODERS = ["pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "jpeg_ls"]  # every one pydicom may use
XRV = "xrv:densenet121-res224-all"


def respiscan(*argv: object, blocked: list[str]) -> subprocess.CompletedProcess:
    """`respiscan ARGV` in a fresh process in which the `blocked` modules cannot be imported."""
    code = ("import sys\n"
            f"for name in {blocked!r}:\n"
            "    sys.modules[name] = None\n"
            f"sys.argv = ['respiscan', *{[str(a) for a in argv]!r}]\n"
            "from respiscan.cli import main\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"


@pytest.fixture(scope="module")
def images(synth_data) -> dict[str, Path]:
    samples = discover(synth_data)
    return {m: next(s.path for s in samples if s.modality == m and s.split == "test") for m in ("xray", "ct")}


def test_extras_are_the_ones_pyproject_declares():
    declared = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    names = {extra: sorted(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in reqs)
             for extra, reqs in declared.items()}
    assert {k: v for k, v in names.items() if k not in ("test", "all")} == \
        {name: sorted(e.packages.values()) for name, e in EXTRAS.items()}
    assert declared["all"] == [f"respiscan[{','.join(EXTRAS)}]"]


def test_require_names_the_command_the_package_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtra) as info:
        require("onnx", "respiscan export")
    assert str(info.value) == 'respiscan export needs onnx: pip install "respiscan[onnx]"'
    assert json.loads(json.dumps(info.value.to_dict())) == {
        "error": str(info.value), "needed_by": "respiscan export", "package": "onnx", "extra": "onnx",
        "install": 'pip install "respiscan[onnx]"'}


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "__init__.py").write_text("import respiscan_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    with pytest.raises(RespiscanError) as info:
        require("onnx", "respiscan export")
    assert not isinstance(info.value, MissingExtra)
    assert "installed but cannot import 'respiscan_no_such_dependency'" in str(info.value)


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_export_without_onnx(bundle, tmp_path, package):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    before = sorted(p.name for p in copy.iterdir()), (copy / "config.json").read_bytes()
    proc = respiscan("export", copy, blocked=[package])
    assert_one_line_error(proc, f'respiscan export needs {package}: pip install "respiscan[onnx]"')
    assert (sorted(p.name for p in copy.iterdir()), (copy / "config.json").read_bytes()) == before


def test_onnx_engine_without_onnxruntime(bundle, images):
    proc = respiscan("predict", bundle, "--xray", images["xray"], "--engine", "onnx", blocked=["onnxruntime"])
    assert_one_line_error(proc, 'the ONNX engine needs onnxruntime: pip install "respiscan[onnx]"')


def _jpeg_ls_dicom() -> Path:
    """pydicom's own JPEG-LS lossless copy of its MR_small.dcm (shipped inside the pydicom package)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if path is None:
        pytest.skip("pydicom's test files are not installed")
    return Path(path)


def test_compressed_dicom_without_the_dicom_extra(images, tmp_path):
    dcm = _jpeg_ls_dicom()
    proc = respiscan("inspect", dcm, images["ct"], "--out", tmp_path / "panel.png", blocked=DICOM_DECODERS)
    assert_one_line_error(proc, f"{dcm}: decoding JPEG-LS Lossless Image Compression pixel data needs "
                                f'pylibjpeg-libjpeg: pip install "respiscan[dicom]"')
    assert not (tmp_path / "panel.png").exists()


def test_jpeg_that_pillow_cannot_decode_names_the_dicom_extra(images, tmp_path):
    """Pillow, a core dependency, decodes baseline JPEG; when it fails, the dicom extra's decoders may not."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, get_frame

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[:len(frame) // 2]])
    ds.save_as(tmp_path / "truncated.dcm")
    proc = respiscan("inspect", tmp_path / "truncated.dcm", images["ct"], "--out", tmp_path / "panel.png",
                     blocked=DICOM_DECODERS)
    assert_one_line_error(proc, f"{tmp_path / 'truncated.dcm'}: decoding JPEG Baseline (Process 1) pixel data "
                                f'(Pillow could not) needs pylibjpeg-libjpeg: pip install "respiscan[dicom]"')


@pytest.mark.skipif(importlib.util.find_spec("libjpeg") is None, reason="the dicom extra is not installed")
def test_the_dicom_extra_decodes_jpeg_ls_losslessly():
    from pydicom.data import get_testdata_file

    from respiscan.data.io import read_image

    np.testing.assert_array_equal(read_image(_jpeg_ls_dicom()), read_image(get_testdata_file("MR_small.dcm")))


def test_xrv_backbone_without_torchxrayvision(synth_data, tmp_path):
    proc = respiscan("train", synth_data, "--out", tmp_path / "bundle", "--preset", "tiny", "--backbone", XRV,
                     blocked=["torchxrayvision"])
    assert_one_line_error(proc, f"backbone {XRV!r} needs torchxrayvision: pip install \"respiscan[xrv]\"")
