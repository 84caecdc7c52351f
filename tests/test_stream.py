"""Streaming prediction over a manifest: chunked through predict_samples, resumable after SIGKILL, sharded under
torchrun with the single-process result, and every column an engine adds reaching the CSV."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from respiscan.data.samples import discover
from respiscan.serving import load
from respiscan.serving.stream import Shard, parts_folder, stream_predictions

ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def big_manifest(synth_data: Path, folder: Path, n: int) -> Path:
    """`n` manifest rows over the few synthetic images: each row its own hard link (a symlink would point out of
    the data folder), so each has its own id."""
    images = [s for s in discover(synth_data) if s.split == "test"]
    (folder / "img").mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "modality", "label", "split"])
        for i in range(n):
            s = images[i % len(images)]
            link = folder / "img" / f"{i:06d}{s.path.suffix}"
            os.link(s.path, link)
            w.writerow([f"img/{link.name}", s.modality, s.label, "test"])
    return folder / "manifest.csv"


def test_stream_equals_predict_samples_and_keeps_added_columns(bundle, synth_data, tmp_path, monkeypatch):
    pipe = load(bundle, "torch")
    samples = discover(synth_data)
    want = {r["id"]: r for r in pipe.predict_samples(samples)[0]}
    result = stream_predictions(pipe, synth_data / "manifest.csv", tmp_path / "p.csv", chunk=5, progress=False)
    got = _rows(tmp_path / "p.csv")
    assert result.total == result.predicted == len(samples) == len(got) and result.already == 0
    assert sorted(r["id"] for r in got) == sorted(want)
    assert all(abs(float(r["probability"]) - want[r["id"]]["probability"]) < 1e-6 for r in got)
    assert not parts_folder(tmp_path / "p.csv").exists()

    # a column another engine or feature adds to the rows reaches the CSV header without a change here
    plain = type(pipe).predict_samples

    def with_score(self, todo, **options):
        rows, skipped = plain(self, todo, **options)
        return [{**r, "extra_score": len(r["id"])} for r in rows], skipped

    monkeypatch.setattr(type(pipe), "predict_samples", with_score)
    stream_predictions(pipe, synth_data / "manifest.csv", tmp_path / "q.csv", chunk=7, progress=False)
    rows = _rows(tmp_path / "q.csv")
    assert list(rows[0])[-1] == "extra_score" and all(int(r["extra_score"]) == len(r["id"]) for r in rows)


def test_a_crash_between_merge_and_cleanup_leaves_no_duplicate(bundle, synth_data, tmp_path, monkeypatch):
    pipe = load(bundle, "torch")
    out = tmp_path / "p.csv"
    import respiscan.serving.stream as stream

    def crash(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        stream_predictions(pipe, synth_data, out, chunk=5, progress=False)
    assert parts_folder(out).is_dir() and len(_rows(out)) == 48  # merged, parts left behind
    monkeypatch.undo()
    result = stream_predictions(pipe, synth_data, out, chunk=5, progress=False)
    ids = [r["id"] for r in _rows(out)]
    assert result.predicted == 0 and result.already == 48
    assert len(ids) == len(set(ids)) == 48 and not parts_folder(out).exists()


def test_resumes_after_sigkill_without_duplicate_or_missing_row(bundle, synth_data, tmp_path):
    manifest = big_manifest(synth_data, tmp_path / "data", 1600)
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "respiscan", "predict", str(bundle), "--data", str(manifest), "--out", str(out),
           "--engine", "torch"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = parts_folder(out)
    deadline = time.monotonic() + 120
    while not list(parts.glob("0*.csv")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(parts.glob("0*.csv")) and not out.exists(), "killed after the first chunk, before the merge"
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "kept from an earlier run" in again.stdout
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == 1600
    assert set(ids) == {f"img/{i:06d}.png" for i in range(1600)}


def test_torchrun_two_ranks_equal_one_process(bundle, synth_data, tmp_path):
    manifest = big_manifest(synth_data, tmp_path / "data", 1100)  # three chunks: rank 0 takes two, rank 1 one
    args = ["-m", "respiscan", "predict", str(bundle), "--data", str(manifest), "--engine", "torch"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.csv")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two.csv")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert _rows(tmp_path / "two.csv") == _rows(tmp_path / "one.csv")
    assert len(_rows(tmp_path / "one.csv")) == 1100


def test_shards_take_alternate_chunks():
    shards = [Shard(r, 3) for r in range(3)]
    assert [[c for c in range(7) if s.owns(c)] for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
