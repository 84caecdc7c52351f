"""Predictions over a whole archive: `respiscan predict BUNDLE --data MANIFEST --out preds.csv`.

The manifest is read row by row and predicted a chunk at a time through `BasePipeline.predict_samples`, so memory
holds one chunk whatever the number of rows, and every column an engine adds reaches the CSV (its header comes
from the rows). Each finished chunk is one CSV file in `.preds.csv.parts/`, written atomically; when every chunk
is done they are merged, in manifest order, into the output (atomically too), so neither is ever half-written. A
rerun after a kill skips the ids already in the output or in finished chunks. Under `torchrun` rank r takes the
chunks r, r + world, ...; rank 0 merges once every rank is done (the output's folder must be one they all see).
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from pathlib import Path

from respiscan.bundle import OodDetector
from respiscan.data.samples import MANIFEST_NAME, Sample, discover, folder_samples, iter_manifest
from respiscan.errors import RespiscanError
from respiscan.serving.pipeline import BasePipeline
from respiscan.serving.shift import SetShift, SetShiftTest
from respiscan.utils import atomic_write

CHUNK = 512  # rows per part file: big enough for full batches, small enough that a kill loses little


@dataclass(frozen=True)
class Shard:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank


@dataclass(frozen=True)
class StreamResult:
    out: Path
    predicted: int  # rows this process predicted in this run
    already: int  # rows skipped because an earlier run had predicted them
    total: int  # rows in the output (rank 0, once merged; 0 on the other ranks)
    flagged: int = 0  # rows this process predicted that the shift detector finds unlike the training images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of unreadable images
    # per modality, the whole output as a set against the validation images (rank 0, once merged)
    set_shift: dict[str, SetShift] = field(default_factory=dict)


def iter_samples(data: Path, modality: str | None = None) -> Iterator[Sample]:
    """The samples of `data` in order: a manifest row by row, any other layout as `discover` lists it."""
    if modality:
        yield from folder_samples(data, modality)
        return
    manifest = data if data.is_file() else data / MANIFEST_NAME
    if manifest.is_file() and manifest.suffix.lower() == ".csv":
        source = manifest.parent.name
        for s in iter_manifest(manifest, manifest.parent):
            yield s if s.source else Sample(s.id, s.path, s.modality, s.label, s.split, s.group, source)
        return
    yield from discover(data)


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    it = iter(samples)
    while chunk := list(islice(it, size)):
        yield chunk


def _ids(path: Path) -> Iterator[str]:
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield row["id"]


def parts_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _done_ids(out: Path, parts: Path) -> tuple[set[str], list[Path]]:
    """Ids predicted by earlier runs (in the output, or in finished chunk files of any rank), and the parts that
    are in the output already: a run killed between writing the merged output and deleting its parts left them
    (a merge takes every part, so a part whose first id is in the output is in it whole)."""
    done = set(_ids(out)) if out.is_file() else set()
    merged = []
    for part in sorted(parts.glob("*.csv")):
        first = next(_ids(part), None)
        if first is not None and first in done:
            merged.append(part)
        else:
            done.update(_ids(part))
    return done, merged


def _count(data: Path, modality: str | None) -> int:
    return sum(1 for _ in iter_samples(data, modality))


def _progress(total: int, chunk: int, shard: Shard, enabled: bool):
    """A bar with the rate and the time left (tqdm), on rank 0 only, over rank 0's share of the rows."""
    from tqdm import tqdm

    share = len(range(shard.rank, -(-total // chunk), shard.world)) * chunk
    desc = "predict" if shard.world == 1 else f"predict (rank 0 of {shard.world})"
    return tqdm(total=min(total, share), desc=desc, unit="img", file=sys.stderr, smoothing=0.1,
                disable=not enabled or shard.rank != 0)


def _write_part(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _merge(out: Path, parts: Path) -> int:
    """The output's rows, then every part's in chunk order, as one CSV (header: every column, in order of
    appearance); returns the number of rows."""
    files = ([out] if out.is_file() else []) + sorted(parts.glob("*.csv"))
    fields: dict[str, None] = {}
    for f in files:
        with open(f, newline="", encoding="utf-8") as handle:
            fields.update(dict.fromkeys(csv.DictReader(handle).fieldnames or []))
    n = 0
    with atomic_write(out, "w", newline="", encoding="utf-8") as target:
        writer = csv.DictWriter(target, fieldnames=list(fields))
        writer.writeheader()
        for f in files:
            with open(f, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    writer.writerow(row)
                    n += 1
    shutil.rmtree(parts)
    return n


def _set_shifts(out: Path, detector: OodDetector | None, batch: int = 65536) -> dict[str, SetShift]:
    """Per modality, every shift score in the output (read back from it, so rows of earlier runs and other ranks
    count) as a set against the validation images'; memory holds a batch of scores, not the output."""
    tests = {m: SetShiftTest(t.val_scores) for m, t in (detector.modalities.items() if detector else ())
             if t.val_scores}
    if not tests:
        return {}
    pending: dict[str, list[float]] = {m: [] for m in tests}
    with open(out, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            scores = pending.get(row.get("modality", ""))
            if scores is not None and row.get("ood_score"):
                scores.append(float(row["ood_score"]))
                if len(scores) == batch:
                    tests[row["modality"]].add(scores)
                    scores.clear()
    for m, scores in pending.items():
        tests[m].add(scores)
    return {m: result for m, test in tests.items() if (result := test.result()) is not None}


def _check_same_bundle(parts: Path, weights_sha256: str, shard: Shard) -> None:
    """An interrupted run resumes only with the bundle that began it: its chunks must not mix two models."""
    record = parts / "bundle.sha256"
    if record.is_file() and record.read_text().strip() != weights_sha256:
        raise RespiscanError(f"{parts}: unfinished predictions of another bundle; delete the folder to start over")
    if shard.rank == 0 and not record.is_file():
        with atomic_write(record) as f:
            f.write(weights_sha256 + "\n")


def _barrier(shard: Shard) -> None:
    """Wait for every rank (gloo, so no GPU is needed); torch is imported only under torchrun."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=1))  # a rank may finish its share long before
    dist.barrier()


def stream_predictions(pipe: BasePipeline, data: str | Path, out: str | Path, *, modality: str | None = None,
                       strict: bool = False, chunk: int = CHUNK, progress: bool = True,
                       shard: Shard | None = None, tta: int = 1) -> StreamResult:
    """Predict every image of `data` into the CSV `out`, chunk by chunk, resuming what an earlier run left."""
    data, out, shard = Path(data), Path(out), shard or Shard.from_env()
    if out.is_dir():
        raise RespiscanError(f"{out}: is a folder; give a CSV file to write")
    parts = parts_folder(out)
    parts.mkdir(parents=True, exist_ok=True)
    _check_same_bundle(parts, pipe.config.weights_sha256, shard)
    done, merged = _done_ids(out, parts)
    _barrier(shard)  # every rank has read the finished chunks before any rank writes or deletes one
    if shard.rank == 0:
        for part in merged:
            part.unlink()
    total = _count(data, modality)
    run = uuid.uuid4().hex[:8]  # a part of this run never replaces an earlier run's part of the same chunk
    predicted = already = flagged = 0
    skipped: list[tuple[str, str]] = []
    with _progress(total, chunk, shard, progress) as bar:
        for index, rows_in in enumerate(_chunks(iter_samples(data, modality), chunk)):
            if not shard.owns(index):
                continue
            todo = [s for s in rows_in if s.id not in done]
            already += len(rows_in) - len(todo)
            if todo:
                rows, bad = pipe.predict_samples(todo, strict=strict, tta=tta)
                skipped += bad
                flagged += sum(r.get("in_distribution") is False for r in rows)
                if rows:
                    _write_part(parts / f"{index:09d}-{run}.csv", rows)
                predicted += len(rows)
            bar.update(len(rows_in))
    _barrier(shard)
    total_rows = _merge(out, parts) if shard.rank == 0 else 0
    shifts = _set_shifts(out, pipe.config.ood) if total_rows else {}
    return StreamResult(out, predicted, already, total_rows, flagged, skipped, shifts)
