"""Find the samples of a data set: the reference folder layout, a manifest CSV, or train.csv/test.csv.

Every sample gets an id (its path relative to the data root), a modality, a label (1 = COVID), a split, a
source (the manifest's, else the data folder's name) and, when known, a group (patient/case). Several data
folders (sites, hospitals) can be read together. A validation split is carved from train here, grouped by
`group`, so that no later stage ever needs the test split for a choice.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from respiscan.errors import RespiscanError

MODALITIES = ("xray", "ct")
CLASS_NAMES = ("Non_COVID", "COVID")  # index = label; COVID is the positive class
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
MANIFEST_NAME = "manifest.csv"

_LABELS = {
    "covid": 1, "covid19": 1, "covidpositive": 1, "positive": 1, "pos": 1, "1": 1, "true": 1,
    "noncovid": 0, "noncovid19": 0, "notcovid": 0, "covidnegative": 0, "negative": 0, "neg": 0, "normal": 0,
    "0": 0, "false": 0,
}
_MODALITIES = {"xray": "xray", "cxr": "xray", "chestxray": "xray", "ct": "ct", "ctscan": "ct", "ctscans": "ct"}
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test", "testing": "test"}
_LAYOUT_DIR = re.compile(r"^(x_?ray|ct(?:_?scan)?)_?(train|test|val|validation)$")


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).strip().lower())


def parse_label(value: str, where: str) -> int:
    """1 for COVID, 0 for Non-COVID; common spellings are accepted, anything else is an error."""
    label = _LABELS.get(_key(value))
    if label is None:
        raise RespiscanError(
            f"{where}: unknown label {value!r}; "
            "accepted: COVID, Non_COVID (or covid/non-covid, positive/negative, 1/0)")
    return label


def parse_modality(value: str, where: str) -> str:
    modality = _MODALITIES.get(_key(value))
    if modality is None:
        raise RespiscanError(f"{where}: unknown modality {value!r}; accepted: xray, ct")
    return modality


@dataclass(frozen=True)
class Sample:
    id: str
    path: Path
    modality: str
    label: int
    split: str
    group: str | None = None
    source: str | None = None

    def as_row(self) -> dict:
        row = asdict(self)
        row["path"] = str(self.path)
        return row


DataPaths = str | Path | Sequence[str | Path]


def data_paths(data: DataPaths) -> list[Path]:
    """The data folders (or manifests) given, as a list: callers accept one path or several."""
    return [Path(d) for d in data] if isinstance(data, (list, tuple)) else [Path(data)]


def describe(data: DataPaths) -> str:
    """The data folder(s) as messages and records name them."""
    return ", ".join(map(str, data_paths(data)))


def folder_name(data: str | Path) -> str:
    """The name of a data folder (of a manifest file: its folder's), unresolved so a symlink keeps its own name."""
    path = Path(os.path.abspath(data))
    return (path.parent if path.is_file() else path).name


def discover(data: DataPaths) -> list[Sample]:
    """All samples under one data folder or several, sorted by id. Each is a folder in the reference layout, a
    folder with manifest.csv or train.csv/test.csv, or a manifest CSV file.

    With several, ids get the folder's name as a prefix ("site_a/X_Ray_Train/COVID/1.png") and groups their
    source's ("site_a:p1"), so neither collides nor merges across folders; two folders of the same name are an
    error, since ids and default sources would be ambiguous.
    """
    paths = data_paths(data)
    if not paths:
        raise RespiscanError("no data folder given")
    if len(paths) == 1:
        return _discover_one(paths[0])
    names = [folder_name(p) for p in paths]
    for name, n in Counter(names).items():
        if n > 1:
            same = ", ".join(str(p) for p, other in zip(paths, names) if other == name)
            raise RespiscanError(f"{same}: {n} data folders named {name!r}; sample ids and sources are named "
                                 "after the folder, so give each a distinct name (a symlink will do)")
    samples = [replace(s, id=f"{name}/{s.id}", group=s.group and f"{s.source}:{s.group}")
               for path, name in zip(paths, names) for s in _discover_one(path)]
    return sorted(samples, key=lambda s: s.id)


def _discover_one(data: Path) -> list[Sample]:
    if not data.exists():
        raise RespiscanError(f"{data}: no such file or folder")
    if data.is_file():
        samples = _from_manifest(data, data.parent)
    elif (data / MANIFEST_NAME).is_file():
        samples = _from_manifest(data / MANIFEST_NAME, data)
    elif (data / "train.csv").is_file() or (data / "test.csv").is_file():
        samples = []
        for split in ("train", "test"):
            if (data / f"{split}.csv").is_file():
                samples += _from_manifest(data / f"{split}.csv", data, default_split=split)
    else:
        samples = _from_layout(data)
    if not samples:
        raise RespiscanError(f"{data}: no images found (expected X_Ray_Train/COVID/... folders, manifest.csv, "
                             "or train.csv/test.csv)")
    ids = Counter(s.id for s in samples)
    dupes = [i for i, n in ids.items() if n > 1]
    if dupes:
        raise RespiscanError(f"{data}: duplicate sample id {dupes[0]!r} ({len(dupes)} duplicated)")
    name = folder_name(data)
    return sorted((replace(s, source=s.source or name) for s in samples), key=lambda s: s.id)


def _from_layout(root: Path) -> list[Sample]:
    samples = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _LAYOUT_DIR.match(split_dir.name.lower())
        if not m:
            continue
        modality = "xray" if m.group(1).startswith("x") else "ct"
        split = _SPLITS[m.group(2)]
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not class_dirs:
            raise RespiscanError(f"{split_dir}: no class folders (expected COVID and Non_COVID)")
        for class_dir in class_dirs:
            label = parse_label(class_dir.name, f"{class_dir}: class folder")
            files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise RespiscanError(f"{class_dir}: empty class folder (no images)")
            for f in files:
                rel = f.relative_to(root).as_posix()
                samples.append(Sample(rel, f, modality, label, split))
    return samples


def _resolve_inside(root: Path, rel: str, where: str) -> Path:
    if not rel:
        raise RespiscanError(f"{where}: empty path")
    p = Path(rel)
    if p.is_absolute():
        raise RespiscanError(f"{where}: absolute path {rel!r}; paths must be relative to the data folder")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise RespiscanError(f"{where}: path {rel!r} escapes the data folder")
    return root / p


def _from_manifest(manifest: Path, root: Path, default_split: str | None = None) -> list[Sample]:
    return list(iter_manifest(manifest, root, default_split))


def iter_manifest(manifest: Path, root: Path, default_split: str | None = None) -> Iterator[Sample]:
    """A manifest's samples one row at a time, in file order: streaming prediction reads a million-row
    manifest without holding it (no duplicate-id check, which needs every id; `discover` does it)."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {_key(c): c for c in reader.fieldnames or []}
        path_col = next((columns[c] for c in ("path", "filepath", "file", "filename", "image") if c in columns), None)
        need = {"path": path_col, "label": columns.get("label"), "modality": columns.get("modality"),
                "split": columns.get("split") or (default_split and "__default__")}
        missing = [k for k, v in need.items() if v is None]
        if missing:
            raise RespiscanError(f"{manifest}: missing column(s) {', '.join(missing)}; "
                                 "needs path, modality, label, split (group and source optional)")
        for n, row in enumerate(reader, start=2):
            where = f"{manifest}:{n}"
            rel = (row.get(need["path"]) or "").strip()
            path = _resolve_inside(root, rel, where)
            split_value = row.get(need["split"]) or default_split or ""
            split = _SPLITS.get(_key(split_value))
            if split is None:
                raise RespiscanError(f"{where}: unknown split {split_value!r}; accepted: train, val, test")
            group = (row.get(columns.get("group", ""), "") or row.get(columns.get("patient", ""), "") or "").strip()
            source = (row.get(columns.get("source", ""), "") or "").strip()
            yield Sample(Path(rel).as_posix(), path, parse_modality(row.get(need["modality"], ""), where),
                         parse_label(row.get(need["label"], ""), where), split, group or None, source or None)


def check_trainable(samples: list[Sample], where: str) -> None:
    """Each modality present in train must have both classes, or nothing can be learned."""
    train = [s for s in samples if s.split in ("train", "val")]
    if not train:
        raise RespiscanError(f"{where}: no training images (train split is empty)")
    for modality in MODALITIES:
        labels = {s.label for s in train if s.modality == modality}
        if len(labels) == 1:
            only = CLASS_NAMES[labels.pop()]
            raise RespiscanError(f"{where}: {modality} training data has only one class ({only}); "
                                 "need COVID and Non_COVID")


def carve_validation(samples: list[Sample], fraction: float = 0.15, seed: int = 0, into: str = "val") -> list[Sample]:
    """Move a stratified, group-aware fraction of each modality's train samples to split `into` ('val', or the
    trainer's calibration split).

    Strata are source x class where every stratum is large enough, so each source is validated on. A source
    that already has samples of a modality in split `into` keeps them, and its train samples stay in train.
    Test samples are never touched.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    out = list(samples)
    index = {s.id: i for i, s in enumerate(out)}
    for modality in MODALITIES:
        mod = [s for s in out if s.modality == modality]
        validated = {s.source for s in mod if s.split == into}
        train = [s for s in mod if s.split == "train" and s.source not in validated]
        if len(train) < 4:
            continue
        labels = np.array([s.label for s in train])
        groups = np.array([s.group or f"__{s.id}" for s in train])
        n_splits = max(2, min(round(1 / fraction), int(np.bincount(labels).min())))
        strata = np.unique([f"{s.source}|{s.label}" for s in train], return_inverse=True)[1]
        y = strata if np.bincount(strata).min() >= n_splits else labels
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val_idx = next(folds.split(np.zeros(len(train)), y, groups))
        for i in val_idx:
            out[index[train[i].id]] = replace(train[i], split=into)
    return out


def fingerprint(samples: list[Sample]) -> dict[str, str | int]:
    """Hashes that identify the data a model saw: the sample list (ids, labels, splits) and the file contents."""
    import hashlib

    listing, contents = hashlib.sha256(), hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.id):
        listing.update(f"{s.id},{s.modality},{s.label},{s.split},{s.group or ''}\n".encode())
        try:
            contents.update(hashlib.sha256(Path(s.path).read_bytes()).digest())
        except OSError:
            contents.update(b"unreadable")
    return {"n_samples": len(samples), "samples_sha256": listing.hexdigest(), "files_sha256": contents.hexdigest()}


def write_manifest(samples: list[Sample], path: Path, root: Path | None = None) -> None:
    """Write samples as a manifest CSV: paths relative to `root` when given (each must lie under it), else
    absolute, so that the file (a bundle's splits.csv) means the same from any working directory."""
    from respiscan.utils import write_rows

    def where(s: Sample) -> str:
        if root is None:
            return os.path.abspath(s.path)
        if not Path(s.path).is_relative_to(root):
            raise RespiscanError(f"{path}: {s.path} is not inside {root}, so it has no path relative to it")
        return Path(s.path).relative_to(root).as_posix()

    rows = [{**s.as_row(), "path": where(s), "label": CLASS_NAMES[s.label], "group": s.group or "",
             "source": s.source or ""} for s in samples]
    write_rows(path, rows, ["id", "path", "modality", "label", "split", "group", "source"])


def count_by_source(samples: list[Sample]) -> list[dict[str, str | int]]:
    """Labelled samples per source x modality x split x class, as rows: what each site brought (the bundle
    records it)."""
    counts = Counter((s.source or "unspecified", s.modality, s.split, CLASS_NAMES[s.label]) for s in samples)
    return [{"source": source, "modality": modality, "split": split, "label": label, "n": n}
            for (source, modality, split, label), n in sorted(counts.items())]


def pair_cases(xray: list[Sample], ct: list[Sample], seed: int = 0) -> tuple[list[tuple[Sample, Sample]], str]:
    """X-ray/CT pairs for the fused probability: by shared group (patient) when the data has them, else
    same-label pseudo-pairs (seeded), which a report must call what they are (evaluation and the fused
    threshold of training both pair this way)."""
    by_group = {s.group: s for s in ct if s.group}
    pairs = [(x, by_group[x.group]) for x in xray if x.group in by_group and by_group[x.group].label == x.label]
    if pairs:
        return pairs, "patient (shared group id)"
    rng = np.random.default_rng(seed)
    pairs = []
    for label in (0, 1):
        xs = [s for s in xray if s.label == label]
        cs = [s for s in ct if s.label == label]
        rng.shuffle(xs)
        rng.shuffle(cs)
        pairs += list(zip(xs, cs))
    return pairs, "same-label pseudo-pairs (the data has no X-ray/CT pairs of one patient)"


def folder_samples(folder: str | Path, modality: str) -> list[Sample]:
    """Every image under a plain folder, as unlabelled samples (label -1) of one modality, for batch prediction."""
    folder = Path(folder)
    modality = parse_modality(modality, "--modality")
    if not folder.is_dir():
        raise RespiscanError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise RespiscanError(f"{folder}: no images found")
    return [Sample(p.relative_to(folder).as_posix(), p, modality, -1, "test") for p in files]
