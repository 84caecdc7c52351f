"""Data audit before anyone trusts a test score: duplicates across splits, class balance, source confounds.

Public COVID image collections are stitched together from a few sources and re-shared under new names, so the
same image (or a re-encoded, brightened or resized copy) often sits in train and in test, and one source often
brings only COVID images. Either makes a test score measure memory or scanner, not disease. The audit finds
exact copies (sha256 of the file bytes) and near copies (perceptual hash of the decoded grey image), counts
classes per split and per source, and measures how strongly source predicts label (Cramer's V).

Near duplicates are candidates to look at: chest images are alike at the 32x32 DCT scale phash works on, so
a small hamming distance between two different patients happens (synthetic phantoms reach 4 of 64 bits).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from respiscan.data.io import read_image
from respiscan.data.samples import CLASS_NAMES, Sample
from respiscan.errors import RespiscanError

CRAMERS_V_LIMIT = 0.5
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_ROWS_PER_BLOCK = 1024  # pairwise distances are computed in row blocks: memory stays O(block x n)


def class_balance(samples: list[Sample], key: Callable[[Sample], str]) -> dict[str, dict[str, int | float]]:
    """Per value of `key`: n, Non_COVID, COVID and the COVID fraction, sorted by key."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        counts[key(s)][CLASS_NAMES[s.label]] += 1
    return {k: {"n": c.total(), CLASS_NAMES[0]: c[CLASS_NAMES[0]], CLASS_NAMES[1]: c[CLASS_NAMES[1]],
                "covid_fraction": c[CLASS_NAMES[1]] / c.total()} for k, c in sorted(counts.items())}


def source_of(sample: Sample) -> str:
    """The sample's source, or 'unspecified', so samples without one still show up in every table."""
    return sample.source or "unspecified"


def _fingerprint(sample: Sample) -> tuple[str, int]:
    """(sha256 of the file bytes, 64-bit phash of the decoded grey image); raises RespiscanError if unreadable."""
    grey = read_image(sample.path, sample.modality)  # first: it names what is wrong with a bad file
    phash = imagehash.phash(Image.fromarray(grey))
    return hashlib.sha256(Path(sample.path).read_bytes()).hexdigest(), int(str(phash), 16)


def _hamming_pairs(hashes: np.ndarray, limit: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j for every pair of 64-bit hashes at most `limit` bits apart."""
    bytes_view = hashes.view(np.uint8).reshape(len(hashes), 8)
    found = []
    for start in range(0, len(hashes), _ROWS_PER_BLOCK):
        block = bytes_view[start:start + _ROWS_PER_BLOCK]
        distance = _POPCOUNT[block[:, None, :] ^ bytes_view[None, :, :]].sum(axis=2, dtype=np.int64)
        rows, cols = np.nonzero(distance <= limit)
        for i, j in zip(rows + start, cols):
            if i < j:
                found.append((int(i), int(j), int(distance[i - start, j])))
    return found


def _pair(a: Sample, b: Sample, distance: int) -> dict:
    return {"a": a.id, "split_a": a.split, "b": b.id, "split_b": b.split, "distance": distance,
            "cross_split": a.split != b.split}


def _pair_order(pair: dict) -> tuple:
    """Cross-split pairs first (they bias the test score), then closest, then by id: stable output."""
    return not pair["cross_split"], pair["distance"], pair["a"], pair["b"]


def _confounds(samples: list[Sample]) -> tuple[list[dict], float | None]:
    """Sources that bring one class only, and Cramer's V of source vs label (None with < 2 sources or 1 class)."""
    from scipy.stats.contingency import association

    by_source = class_balance(samples, source_of)
    if len(by_source) < 2:
        return [], None
    found = [{"kind": "single_class_source", "source": name, "class": CLASS_NAMES[int(c["covid_fraction"] == 1)],
              "n": c["n"]}
             for name, c in by_source.items() if c["covid_fraction"] in (0.0, 1.0)]
    table = np.array([[c[CLASS_NAMES[0]], c[CLASS_NAMES[1]]] for c in by_source.values()])
    if (table.sum(axis=0) == 0).any():
        return found, None
    v = float(association(table, method="cramer"))
    if v > CRAMERS_V_LIMIT:
        found.append({"kind": "cramers_v", "value": v})
    return found, v


def _warnings(result: dict) -> list[str]:
    out = []
    for kind in ("exact", "near"):
        pairs = result[f"{kind}_duplicates"]
        cross = [p for p in pairs if p["cross_split"]]
        what = "exact duplicate (identical file bytes)" if kind == "exact" else (
            f"near-duplicate (perceptual-hash distance <= {result['near_threshold']})")
        if cross:
            p = cross[0]
            out.append(f"{len(cross)} {what} pair(s) across splits, e.g. {p['a']} ({p['split_a']}) and {p['b']} "
                       f"({p['split_b']}): a model is scored on images it has seen, so test metrics are optimistic.")
        if len(pairs) > len(cross):
            out.append(f"{len(pairs) - len(cross)} {what} pair(s) within one split: they count one image twice "
                       "and narrow the confidence intervals.")
    for split, c in result["balance"]["by_split"].items():
        if c["covid_fraction"] in (0.0, 1.0):
            out.append(f"The {split} split holds only {CLASS_NAMES[int(c['covid_fraction'] == 1)]} images "
                       f"(n = {c['n']}); AUC, sensitivity or specificity cannot be measured on it.")
    for c in result["confounds"]:
        if c["kind"] == "single_class_source":
            out.append(f"Source {c['source']!r} contributes only {c['class']} images (n = {c['n']}): a model can "
                       "learn to recognise the source instead of the disease.")
        else:
            out.append(f"Source and label are strongly associated (Cramer's V = {c['value']:.2f} > "
                       f"{CRAMERS_V_LIMIT}): scores may reflect where an image came from, not COVID.")
    if result["unreadable"]:
        out.append(f"{len(result['unreadable'])} file(s) could not be read and were not audited, e.g. "
                   f"{result['unreadable'][0]['reason']}")
    return out


def audit(samples: list[Sample], *, near_threshold: int = 2, progress: bool = True) -> dict:
    """Duplicates (exact and near, within and across splits), class balance and source/label confounds.

    Returns n_images, near_threshold, exact_duplicates and near_duplicates (pairs {a, split_a, b, split_b,
    distance, cross_split}, cross-split first), cross_split_duplicates (count of both kinds), balance
    {by_split, by_source}, confounds, cramers_v, unreadable [{id, reason}] and warnings (plain sentences).
    """
    if not 0 <= near_threshold < 64:
        raise RespiscanError(f"near_threshold must be between 0 and 63 bits, got {near_threshold}")

    def work(s: Sample) -> tuple[str, int] | RespiscanError:
        try:
            return _fingerprint(s)
        except RespiscanError as e:
            return e

    readable, digests, hashes, unreadable = [], [], [], []
    with ThreadPoolExecutor() as pool:
        for s, out in tqdm(zip(samples, pool.map(work, samples)), total=len(samples), desc="audit", unit="img",
                           disable=not progress):
            if isinstance(out, RespiscanError):
                unreadable.append({"id": s.id, "reason": str(out)})
            else:
                readable.append(s)
                digests.append(out[0])
                hashes.append(out[1])

    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(digests):
        by_digest[d].append(i)
    exact = [_pair(readable[i], readable[j], 0) for members in by_digest.values() for i, j in combinations(members, 2)]
    near = [_pair(readable[i], readable[j], d)
            for i, j, d in _hamming_pairs(np.array(hashes, dtype=np.uint64), near_threshold)
            if digests[i] != digests[j]]
    confounds, cramers_v = _confounds(readable)
    result = {
        "n_images": len(samples),
        "near_threshold": near_threshold,
        "exact_duplicates": sorted(exact, key=_pair_order),
        "near_duplicates": sorted(near, key=_pair_order),
        "cross_split_duplicates": sum(p["cross_split"] for p in exact + near),
        "balance": {"by_split": class_balance(readable, lambda s: s.split),
                    "by_source": class_balance(readable, source_of)},
        "confounds": confounds,
        "cramers_v": cramers_v,
        "unreadable": unreadable,
    }
    result["warnings"] = _warnings(result)
    return result


def format_audit(result: dict) -> str:
    """A terminal summary: counts, class balance, the first few pairs and every warning."""
    lines = [f"audited {result['n_images']} images ({len(result['unreadable'])} unreadable)",
             f"exact duplicate pairs: {len(result['exact_duplicates'])}   near-duplicate pairs (distance <= "
             f"{result['near_threshold']}): {len(result['near_duplicates'])}   across splits: "
             f"{result['cross_split_duplicates']}"]
    for title, table in (("split", result["balance"]["by_split"]), ("source", result["balance"]["by_source"])):
        lines.append(f"class balance by {title}:")
        lines += [f"  {name:<16} n={c['n']:<6} COVID={c['COVID']:<6} Non_COVID={c['Non_COVID']:<6} "
                  f"COVID share={c['covid_fraction']:.2f}" for name, c in table.items()]
    if result["cramers_v"] is not None:
        lines.append(f"source vs label: Cramer's V = {result['cramers_v']:.2f}")
    for kind in ("exact", "near"):
        pairs = result[f"{kind}_duplicates"]
        for p in pairs[:5]:
            lines.append(f"  {kind}: {p['a']} ({p['split_a']}) ~ {p['b']} ({p['split_b']}), distance {p['distance']}")
        if len(pairs) > 5:
            lines.append(f"  ... {len(pairs) - 5} more {kind} pair(s)")
    lines += [f"warning: {w}" for w in result["warnings"]] or ["no problems found"]
    return "\n".join(lines)


def check_strict(result: dict) -> None:
    """For `--strict`: fail when a duplicate crosses splits, naming the first (exact before near)."""
    for kind in ("exact", "near"):
        first = next((p for p in result[f"{kind}_duplicates"] if p["cross_split"]), None)
        if first:
            raise RespiscanError(f"{result['cross_split_duplicates']} duplicate pair(s) across splits; first: "
                                 f"{first['a']} ({first['split_a']}) and {first['b']} ({first['split_b']}), {kind} "
                                 "duplicate")
