"""The CLI end to end (train -> predict -> evaluate) and its error paths: one line, exit code 2."""

import csv
import json
import subprocess
import sys

import pytest

from respiscan.cli import main


def run(argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["respiscan", *map(str, argv)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def _pair(data):
    name = sorted(p.name for p in (data / "X_Ray_Test" / "COVID").iterdir())[0]
    return data / "X_Ray_Test" / "COVID" / name, data / "CT_Scan_Test" / "COVID" / name


def test_predict_json_one_case(bundle, synth_data, capsys, monkeypatch):
    xray, ct = _pair(synth_data)
    code, out, _ = run(["predict", bundle, "--xray", xray, "--ct", ct, "--json"], capsys, monkeypatch)
    assert code == 0
    result = json.loads(out)
    assert {"xray_probability", "ct_probability", "probability", "label"} <= set(result)
    assert result["probability"] == pytest.approx((result["xray_probability"] + result["ct_probability"]) / 2)


def test_predict_batch_and_evaluate(bundle, synth_data, tmp_path, capsys, monkeypatch):
    code, out, _ = run(["predict", bundle, "--data", synth_data, "--out", tmp_path / "p.csv"], capsys, monkeypatch)
    assert code == 0 and "48 predictions written" in out
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 48 and {"id", "path", "modality", "probability", "prediction", "in_distribution",
                                "ood_score"} <= set(rows[0])
    code, out, _ = run(["predict", bundle, "--data", synth_data / "CT_Scan_Test", "--modality", "ct",
                        "--out", tmp_path / "ct.csv"], capsys, monkeypatch)
    assert code == 0 and len(list(csv.DictReader(open(tmp_path / "ct.csv")))) == 6
    code, out, _ = run(["evaluate", bundle, synth_data, "--out", tmp_path / "eval"], capsys, monkeypatch)
    assert code == 0 and "AUC=" in out and (tmp_path / "eval" / "metrics.json").is_file()


def test_train_cli_writes_bundle(synth_data, tmp_path, capsys, monkeypatch):
    code, out, _ = run(["train", synth_data, "--out", tmp_path / "b", "--preset", "tiny", "--backbone", "test_resnet",
                        "--image-size", "48", "--epochs", "1", "--shared", "none"], capsys, monkeypatch)
    assert code == 0, out
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model"]["shared"] == "none" and config["preprocess"]["size"] == 48


@pytest.mark.parametrize("argv, message", [
    (["predict", "{bundle}", "--xray", "{tmp}/missing.png"], "missing.png: "),
    (["predict", "{bundle}", "--xray", "{tmp}/text.png"], "text.png: "),
    (["predict", "{tmp}", "--xray", "{tmp}/text.png"], "config.json: missing"),
    (["predict", "{bundle}"], "give --xray and/or --ct"),
    (["train", "{tmp}/empty", "--out", "{tmp}/b"], "no images found"),
    (["train", "{tmp}/oneclass", "--out", "{tmp}/b"], "only one class"),
    (["train", "{data}", "--out", "{tmp}/b", "--backbone", "resnet_nope"], "unknown backbone 'resnet_nope'"),
    (["train", "{tmp}/nope", "--out", "{tmp}/b"], "nope: no such file"),
    (["evaluate", "{bundle}", "{tmp}/empty"], "no images found"),
])
def test_bad_input_is_one_line_exit_2(argv, message, bundle, synth_data, tmp_path, capsys, monkeypatch):
    import cv2
    import numpy as np

    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    for split in ("X_Ray_Train", "X_Ray_Test"):
        (tmp_path / "oneclass" / split / "COVID").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "oneclass" / split / "COVID" / "a.png"), np.zeros((8, 8), np.uint8))
    argv = [a.format(bundle=bundle, tmp=tmp_path, data=synth_data) for a in argv]
    code, out, err = run(argv, capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_console_script_help_and_usage_error():
    exe = [sys.executable, "-m", "respiscan"]
    done = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("demo", "synth", "train", "predict", "evaluate", "preprocess"):
        assert command in done.stdout
    bad = subprocess.run([*exe, "predict"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_preprocess_writes_copies_and_refuses_to_overwrite(synth_data, tmp_path, capsys, monkeypatch):
    code, out, _ = run(["preprocess", synth_data, tmp_path / "pre", "--size", "32"], capsys, monkeypatch)
    assert code == 0
    from respiscan.data.samples import discover

    copies = discover(tmp_path / "pre")
    assert len(copies) == 48 and {s.id for s in copies} == {s.id for s in discover(synth_data)}
    import cv2

    assert cv2.imread(str(copies[0].path), cv2.IMREAD_GRAYSCALE).shape == (32, 32)
    code, _, err = run(["preprocess", synth_data, synth_data / "out"], capsys, monkeypatch)
    assert code == 2 and "outside the data folder" in err


def test_info_prints_what_the_bundle_is(bundle, capsys, monkeypatch):
    code, out, _ = run(["info", bundle], capsys, monkeypatch)
    assert code == 0
    assert "test_resnet" in out and "thresholds" in out and "samples_sha256" in out and "sha256" in out
    assert "bf16 " in out and ("torch engine runs" in out)
    sources = next(line for line in out.splitlines() if line.startswith("sources"))
    assert "one source for ct, xray: transfer to other sites is unverified" in sources


def test_info_names_each_modalitys_sources(bundle):
    from dataclasses import replace

    from respiscan.bundle import Bundle

    record = replace(Bundle.open(bundle).config.data, sources={
        "site_a": {"ct/train/COVID": 3, "xray/train/COVID": 2}, "site_b": {"ct/val/COVID": 1}})
    assert record.transfer_note() == ("ct: site_a, site_b; xray: site_a "
                                      "(one source for xray: transfer to other sites is unverified)")


def test_inspect_writes_the_panel(synth_data, tmp_path, capsys, monkeypatch):
    from PIL import Image

    xray, ct = _pair(synth_data)
    code, out, _ = run(["inspect", xray, ct, "--out", tmp_path / "panel.png"], capsys, monkeypatch)
    assert code == 0 and Image.open(tmp_path / "panel.png").size[0] > 500


def test_audit_strict_fails_on_a_duplicate_across_splits(synth_data, tmp_path, capsys, monkeypatch):
    import shutil

    data = shutil.copytree(synth_data, tmp_path / "data")
    (data / "manifest.csv").unlink()  # the reference layout alone
    train_image = sorted((data / "X_Ray_Train" / "COVID").iterdir())[0]
    shutil.copy(train_image, data / "X_Ray_Test" / "COVID" / "copied.png")
    code, out, _ = run(["audit", data, "--out", tmp_path / "audit"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "audit" / "audit.json").is_file()
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["cross_split_duplicates"] >= 1
    code, _, err = run(["audit", data, "--strict"], capsys, monkeypatch)
    assert code == 2 and "copied.png" in err


def test_export_then_predict_with_onnx_matches_torch(bundle, synth_data, tmp_path, capsys, monkeypatch):
    import shutil

    copy = shutil.copytree(bundle, tmp_path / "b")
    xray, ct = _pair(synth_data)
    code, _, _ = run(["export", copy], capsys, monkeypatch)
    assert code == 0 and (copy / "model_xray.onnx").is_file()
    results = {}
    for engine in ("onnx", "torch"):
        code, out, _ = run(["predict", copy, "--xray", xray, "--ct", ct, "--json", "--engine", engine],
                           capsys, monkeypatch)
        assert code == 0
        results[engine] = json.loads(out)
    # the torch engine runs bf16 where the CPU has it; ONNX is fp32 (agreement with torch fp32: tests/test_onnx.py)
    assert results["onnx"]["probability"] == pytest.approx(results["torch"]["probability"], abs=2e-2)


def test_crossval_refuses_bad_folds_before_training(synth_data, bundle, tmp_path, capsys, monkeypatch):
    code, _, err = run(["crossval", synth_data, "--out", tmp_path / "cv", "--by", "site"], capsys, monkeypatch)
    assert code == 2 and "unknown --by 'site'; accepted: source, group" in err
    code, _, err = run(["crossval", synth_data, "--out", tmp_path / "cv"], capsys, monkeypatch)
    assert code == 2 and "needs at least two sources" in err and "Traceback" not in err
    assert not (tmp_path / "cv").exists()  # nothing written for a refused plan
    # the tests' bundle is a tiny preset at 32 px: a default-preset crossval would describe another model
    code, _, err = run(["crossval", synth_data, synth_data, "--out", tmp_path / "cv", "--card", bundle],
                       capsys, monkeypatch)
    assert code == 2 and "trained with other settings than the crossval folds (" in err and "preset" in err
    assert not (tmp_path / "cv").exists()


def test_demo_runs_end_to_end_and_keeps_the_whole_backbone_schedule(tmp_path, capsys):
    """The README's first command: synth, train, evaluate, predict. Its backbones run every epoch of the schedule
    (a 32-image validation split once chose X-ray epoch 2 of 12 and a test AUC of 0.48)."""
    import csv

    from respiscan.bundle import Bundle
    from respiscan.experiments.demo import run_demo

    result = run_demo(tmp_path / "demo", n_per_class=12, size=64)
    out = capsys.readouterr().out
    assert all(f"[{i}/4]" in out for i in range(1, 5)) and result["prediction"]["label"] in ("COVID", "Non_COVID")
    training = Bundle.open(result["bundle"]).config.training
    epochs = training["backbone_fit"]["epochs"]
    assert training["backbone_fit"]["select"] == "last"
    for m in ("xray", "ct"):
        log = list(csv.DictReader(open(result["bundle"] / "logs" / f"embedding_task_{m}.csv")))
        assert len(log) == epochs
    assert set(result["evaluation"]["modalities"]) == {"xray", "ct"}


def test_train_refuses_a_negative_backbone_adversary(synth_data, tmp_path, capsys, monkeypatch):
    code, _, err = run(["train", synth_data, "--out", tmp_path / "b", "--backbone-adversary", "-1"], capsys,
                       monkeypatch)
    assert code == 2 and "a source adversary's weight must be >= 0" in err
    assert not (tmp_path / "b").exists()


def test_train_refuses_an_unknown_calibration_source(synth_data, tmp_path, capsys, monkeypatch):
    code, _, err = run(["train", synth_data, "--out", tmp_path / "b", "--calibrate-on", "test"], capsys, monkeypatch)
    assert code == 2 and "unknown calibrate_on 'test'; accepted: cross-fitted, calibration" in err
    assert not (tmp_path / "b").exists()
