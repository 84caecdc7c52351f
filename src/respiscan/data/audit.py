"""Data audit before anyone trusts a test score: what leaks between splits, and what predicts the label besides
the disease.

Public COVID image collections are stitched together from a few sources and re-shared under new names, so the
same image (cropped, padded, flipped, slightly rotated, contrast-processed, resized or re-encoded) often sits in
train and in test, sometimes with the opposite label; adjacent slices of one CT scan land on both sides of a
split when the data has no patient ids; and one source often brings only COVID images. Each makes a test score
measure memory or scanner, not disease. The audit looks for all of them:

- exact copies: sha256 of the file bytes;
- near copies: every image is normalised (dark margins trimmed relative to its Otsu threshold, CLAHE,
  histogram equalisation) so that crops, pads and contrast changes mostly cancel; candidates are each image's nearest
  neighbours by the correlation of 16x16 thumbnails in both horizontal orientations; each candidate pair is
  then aligned by an affine ECC fit and scored by the contrast-weighted local correlation of the aligned 128 px
  images (1 = the same picture). At NEAR_SIMILARITY or more a pair is a near-duplicate; a cross-split pair
  between SIMILAR_SIMILARITY and that, which also stands out from both images' other candidates by
  SIMILAR_MARGIN, is probably the same patient (adjacent slices, a follow-up film);
- label conflicts: near or exact copies with opposite labels (errors);
- groups (patients) on both sides of a split, and modalities without groups;
- shortcut baselines per modality: small models fitted on train and scored on test that see only the outer 5 %
  of the image, only seven global intensity statistics, or only file metadata;
- class balance per split and source, and how strongly source predicts label (Cramer's V).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from respiscan.data.io import read_image
from respiscan.data.samples import CLASS_NAMES, MODALITIES, Sample
from respiscan.errors import RespiscanError

CRAMERS_V_LIMIT = 0.5
NEAR_SIMILARITY = 0.88  # aligned local correlation at or above which two images are called near-duplicates
SIMILAR_SIMILARITY = 0.83  # ... at or above which (with SIMILAR_MARGIN) two images probably show one patient
SIMILAR_MARGIN = 0.06  # how far such a pair must stand out from both images' other candidates
SHORTCUT_AUC_LIMIT = 0.7  # a baseline that sees no anatomy should stay near 0.5
SHORTCUT_MODEL_GAP = 0.1  # ... and well below the model
BORDER_FRACTION = 0.05
SHORTCUT_FEATURES = ("border", "intensity", "metadata")
SHORTCUT_MODELS = ("logistic", "boosting")

_SCORE_SIZE = 128  # side of the normalised image the similarity is measured on
_ALIGN_SIZE = 64  # side the affine alignment is fitted on (ECC cost grows with the pixel count)
_RETRIEVE_SIZE = 16  # side of the thumbnail whose correlation proposes candidates
_CANDIDATES_ACROSS = 4  # nearest images from the other splits verified per image
_CANDIDATES_WITHIN = 2  # nearest images from its own split verified per image
_CLAHE_SIZE = 256  # images are resized to this side before CLAHE, so that its tiles mean the same everywhere
_LOCAL_SIGMA = 3.0  # pixels at _SCORE_SIZE: the scale of "local" in the local correlation
_FORMATS = {".png": 0, ".jpg": 1, ".jpeg": 1, ".bmp": 2, ".tif": 3, ".tiff": 3, ".dcm": 4, ".dicom": 4}
_BITS = {"1": (1, 1), "L": (8, 1), "P": (8, 1), "LA": (8, 2), "RGB": (8, 3), "RGBA": (8, 4), "CMYK": (8, 4),
         "I;16": (16, 1), "I;16B": (16, 1), "I;16L": (16, 1), "I": (32, 1), "F": (32, 1)}


@dataclass(frozen=True)
class _Fingerprint:
    """What the audit keeps of one readable image."""

    digest: str  # sha256 of the file bytes
    normalised: np.ndarray  # (_SCORE_SIZE, _SCORE_SIZE) uint8, border trimmed, CLAHE + equalised
    border: np.ndarray  # shortcut features: the outer 5 % only
    intensity: np.ndarray  # shortcut features: seven global statistics
    metadata: np.ndarray  # shortcut features: format, bytes, width, height, bit depth, channels


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


# --- reading: one pass per image gives everything the audit compares -------------------------------------

def _trim(grey: np.ndarray) -> np.ndarray:
    """The bounding box of what is clearly brighter than the darkest level (scaled to the Otsu threshold, so
    contrast changes move it along): black pads and empty surroundings go, dark anatomy stays."""
    h, w = grey.shape
    k = max(3, (min(h, w) // 50) | 1)
    blurred = cv2.GaussianBlur(grey, (k, k), 0)
    otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    darkest = float(blurred.min())
    foreground = blurred > darkest + 0.3 * (otsu - darkest)  # well below Otsu: dark anatomy is not margin
    rows, cols = np.flatnonzero(foreground.mean(axis=1) > 0.02), np.flatnonzero(foreground.mean(axis=0) > 0.02)
    if len(rows) < h // 4 or len(cols) < w // 4:  # almost nothing is foreground: keep the whole image
        return grey
    return grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _normalise(grey: np.ndarray) -> np.ndarray:
    """Trimmed, resized, CLAHE, equalised: crops, pads, resizing and contrast processing mostly cancel."""
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    resized = clahe.apply(cv2.resize(_trim(grey), (_CLAHE_SIZE, _CLAHE_SIZE), interpolation=cv2.INTER_AREA))
    return cv2.equalizeHist(cv2.resize(resized, (_SCORE_SIZE, _SCORE_SIZE), interpolation=cv2.INTER_AREA))


def _border_features(grey: np.ndarray) -> np.ndarray:
    """The outer 5 % of the image on each side, as 8 bins along each side plus each side's mean and spread."""
    image = cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    width = max(1, round(64 * BORDER_FRACTION))
    sides = [image[:width].mean(axis=0), image[-width:].mean(axis=0), image[:, :width].mean(axis=1),
             image[:, -width:].mean(axis=1)]
    return np.concatenate([np.concatenate([s.reshape(8, 8).mean(axis=1), [s.mean(), s.std()]]) for s in sides])


def _intensity_features(grey: np.ndarray) -> np.ndarray:
    """Mean, standard deviation, skewness, kurtosis and the 5th, 50th and 95th percentiles of the grey levels."""
    values = grey.astype(np.float64).ravel()
    mean, sd = values.mean(), values.std()
    z = (values - mean) / sd if sd > 0 else np.zeros_like(values)
    return np.array([mean, sd, (z ** 3).mean(), (z ** 4).mean(), *np.percentile(values, [5, 50, 95])])


def _metadata_features(path: Path, grey: np.ndarray) -> np.ndarray:
    """File format, size in bytes, width, height, bit depth and channels (-1 where the header does not say)."""
    bits, channels = -1, -1
    try:
        with Image.open(path) as im:  # reads the header only
            bits, channels = _BITS.get(im.mode, (-1, -1))
    except (OSError, ValueError):  # DICOM and other files Pillow does not know
        pass
    return np.array([_FORMATS.get(path.suffix.lower(), -1), path.stat().st_size, grey.shape[1], grey.shape[0],
                     bits, channels], dtype=np.float64)


def _fingerprint(sample: Sample) -> _Fingerprint:
    """Everything the audit needs of one image; raises RespiscanError if it is unreadable."""
    grey = read_image(sample.path, sample.modality)  # first: it names what is wrong with a bad file
    path = Path(sample.path)
    return _Fingerprint(hashlib.sha256(path.read_bytes()).hexdigest(), _normalise(grey), _border_features(grey),
                        _intensity_features(grey), _metadata_features(path, grey))


# --- near copies: candidates by thumbnail correlation, confirmed after alignment ------------------------

def _unit_rows(images: np.ndarray) -> np.ndarray:
    """16x16 thumbnails, centred and scaled to unit length, one row per image."""
    small = np.stack([cv2.resize(im, (_RETRIEVE_SIZE, _RETRIEVE_SIZE), interpolation=cv2.INTER_AREA)
                      for im in images]).reshape(len(images), -1).astype(np.float32)
    small -= small.mean(axis=1, keepdims=True)
    return small / (np.linalg.norm(small, axis=1, keepdims=True) + 1e-6)


def _candidates(normalised: np.ndarray, splits: np.ndarray) -> dict[tuple[int, int], bool]:
    """(i, j) with i < j -> whether j matches i flipped: each image's nearest neighbours in the other splits
    and in its own, by thumbnail correlation in the better of the two horizontal orientations."""
    plain, flipped = _unit_rows(normalised), _unit_rows(normalised[:, :, ::-1])
    straight, mirrored = plain @ plain.T, plain @ flipped.T
    similarity = np.maximum(straight, mirrored)
    np.fill_diagonal(similarity, -np.inf)
    found: dict[tuple[int, int], bool] = {}
    for i in range(len(normalised)):
        other = splits != splits[i]
        for pool, k in ((np.flatnonzero(other), _CANDIDATES_ACROSS), (np.flatnonzero(~other), _CANDIDATES_WITHIN)):
            pool = pool[pool != i]
            for j in pool[np.argsort(-similarity[i, pool], kind="stable")[:k]]:
                found[min(i, int(j)), max(i, int(j))] = bool(mirrored[i, j] > straight[i, j])
    return found


def _local_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Contrast-weighted mean of the local (Gaussian window) correlation of a and b inside mask: SSIM's
    structure term, weighted so that flat background does not count as agreement."""
    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (0, 0), _LOCAL_SIGMA)

    mean_a, mean_b = blur(a), blur(b)
    covariance = blur(a * b) - mean_a * mean_b
    spread = np.sqrt(np.maximum(blur(a * a) - mean_a ** 2, 0) * np.maximum(blur(b * b) - mean_b ** 2, 0))
    return float(covariance[mask].sum() / (spread[mask].sum() + 1e-6))


def _similarity(a: np.ndarray, b: np.ndarray, flip: bool) -> float:
    """How alike two normalised images are after an affine alignment of b onto a (fitted at 64 px by ECC)."""
    b = np.ascontiguousarray(b[:, ::-1]) if flip else b
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    small_a, small_b = (cv2.resize(x, (_ALIGN_SIZE, _ALIGN_SIZE), interpolation=cv2.INTER_AREA) for x in (fa, fb))
    warp = np.eye(2, 3, dtype=np.float32)
    try:
        _, warp = cv2.findTransformECC(small_a, small_b, warp, cv2.MOTION_AFFINE,
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4), None, 3)
    except cv2.error:  # did not converge (flat or unrelated images): score them unaligned
        warp = np.eye(2, 3, dtype=np.float32)
    scale = _SCORE_SIZE / _ALIGN_SIZE  # the same warp in full-size pixel coordinates (pixel centres at +0.5)
    warp[:, 2] = warp[:, 2] * scale + (scale - 1) / 2 * (1 - warp[:, :2].sum(axis=1))
    size = (_SCORE_SIZE, _SCORE_SIZE)
    warped = cv2.warpAffine(fb, warp, size, flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP)
    inside = cv2.warpAffine(np.ones_like(fb), warp, size, flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP)
    mask = cv2.erode(inside, np.ones((5, 5), np.uint8)) > 0
    return _local_correlation(fa, warped, mask) if mask.any() else 0.0


def _margins(scores: dict[tuple[int, int], float], splits: np.ndarray) -> dict[tuple[int, int], float]:
    """How far each cross-split pair stands out: its score minus the smaller of the two images' median score
    with their other cross-split candidates (images alike in general, such as phantoms, stand out little)."""
    others: dict[int, list[tuple[tuple[int, int], float]]] = defaultdict(list)
    for pair, score in scores.items():
        if splits[pair[0]] != splits[pair[1]]:
            for i in pair:
                others[i].append((pair, score))

    def background(i: int, pair: tuple[int, int]) -> float:
        rest = [s for p, s in others[i] if p != pair]
        return float(np.median(rest)) if rest else 0.0

    return {pair: score - min(background(pair[0], pair), background(pair[1], pair))
            for pair, score in scores.items() if splits[pair[0]] != splits[pair[1]]}


# --- pairs, groups, shortcuts ----------------------------------------------------------------------------

def _pair(a: Sample, b: Sample, similarity: float) -> dict:
    return {"a": a.id, "split_a": a.split, "label_a": CLASS_NAMES[a.label], "b": b.id, "split_b": b.split,
            "label_b": CLASS_NAMES[b.label], "similarity": round(similarity, 4), "cross_split": a.split != b.split,
            "same_group": a.group is not None and a.group == b.group}


def _pair_order(pair: dict) -> tuple:
    """Cross-split pairs first (they bias the test score), then most alike, then by id: stable output."""
    return not pair["cross_split"], -pair["similarity"], pair["a"], pair["b"]


def _groups_across_splits(samples: list[Sample]) -> list[dict]:
    """Groups (patients, scans) with images in more than one split, with the count per split."""
    by_group: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        if s.group is not None:
            by_group[s.group][s.split] += 1
    return [{"group": g, "splits": dict(sorted(c.items()))} for g, c in sorted(by_group.items()) if len(c) > 1]


def _ungrouped(samples: list[Sample]) -> list[str]:
    """Modalities whose images carry no group, or each its own (and no other modality shares them, as a
    patient's X-ray and CT would): nothing ties slices of one scan or films of one patient together."""
    out = []
    for m in MODALITIES:
        groups = Counter(s.group for s in samples if s.modality == m)
        shared = {s.group for s in samples if s.modality != m} & set(groups)
        if groups and (None in groups or (max(groups.values()) == 1 and not shared)):
            out.append(m)
    return out


def _shortcuts(samples: list[Sample], prints: list[_Fingerprint]) -> dict[str, dict]:
    """Per modality: the test AUC of each small model fitted on every non-test image on each feature set alone."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = {"logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
              # single-threaded: the histogram variant's OpenMP threads crawl on a busy machine
              "boosting": lambda: GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=0)}
    out: dict[str, dict] = {}
    for m in MODALITIES:
        fit = [i for i, s in enumerate(samples) if s.modality == m and s.split != "test"]
        test = [i for i, s in enumerate(samples) if s.modality == m and s.split == "test"]
        y_fit, y_test = (np.array([samples[i].label for i in idx]) for idx in (fit, test))
        if len(set(y_fit)) < 2 or len(set(y_test)) < 2:
            continue
        result: dict = {"n_train": len(fit), "n_test": len(test)}
        for features in SHORTCUT_FEATURES:
            x = np.stack([getattr(p, features) for p in prints])
            result[features] = {}
            for name, make in models.items():
                model = make().fit(x[fit], y_fit)
                result[features][name] = round(float(roc_auc_score(y_test, model.predict_proba(x[test])[:, 1])), 4)
        out[m] = result
    return out


_FEATURE_WORDS = {"border": "the outer 5 % of the image alone", "intensity": "seven global intensity statistics",
                  "metadata": "file metadata alone (format, size, bit depth)"}


@dataclass(frozen=True)
class ShortcutBaseline:
    """The better of a modality's two baseline models on one feature set, beside the model's test AUC."""

    modality: str
    features: str  # one of SHORTCUT_FEATURES
    fitted: str  # the baseline model that scored `auc`: one of SHORTCUT_MODELS
    auc: float
    model_auc: float | None  # the model's test AUC on the same test images, where given
    warning: str | None  # the sentence when the baseline reaches SHORTCUT_AUC_LIMIT or comes near the model


def shortcut_baselines(shortcuts: dict[str, dict], model_auc: dict[str, float] | None = None) -> list[ShortcutBaseline]:
    """Per modality and feature set, the best baseline and, when it reaches SHORTCUT_AUC_LIMIT or comes within
    SHORTCUT_MODEL_GAP of the model's test AUC where one is given (per modality), a warning: evaluate calls it
    with the AUC it measured."""
    out = []
    for m, result in shortcuts.items():
        model = (model_auc or {}).get(m)
        for features in SHORTCUT_FEATURES:
            name, auc = max(result[features].items(), key=lambda kv: kv[1])
            close = model is not None and auc >= model - SHORTCUT_MODEL_GAP
            warning = None
            if auc >= SHORTCUT_AUC_LIMIT or close:
                against = f", against the model's {model:.2f}" if model is not None else ""
                warning = (f"{m}: {_FEATURE_WORDS[features]} give(s) test AUC {auc:.2f} ({name}, fitted on train"
                           f"{against}): the label is predictable without the anatomy, so the model may use the "
                           "same shortcut.")
            out.append(ShortcutBaseline(m, features, name, auc, model, warning))
    return out


def shortcut_warnings(shortcuts: dict[str, dict], model_auc: dict[str, float] | None = None) -> list[str]:
    """The warnings of shortcut_baselines."""
    return [b.warning for b in shortcut_baselines(shortcuts, model_auc) if b.warning]


# --- the audit -------------------------------------------------------------------------------------------

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


def _example(p: dict) -> str:
    return f"{p['a']} ({p['split_a']}, {p['label_a']}) and {p['b']} ({p['split_b']}, {p['label_b']})"


def _errors(result: dict) -> list[str]:
    conflicts = result["label_conflicts"]
    if not conflicts:
        return []
    return [f"{len(conflicts)} copy pair(s) with opposite labels, e.g. {_example(conflicts[0])} (similarity "
            f"{conflicts[0]['similarity']:.2f}): at least one label of each pair is wrong."]


def _warnings(result: dict) -> list[str]:
    out = []
    for kind in ("exact", "near"):
        pairs = result[f"{kind}_duplicates"]
        cross = [p for p in pairs if p["cross_split"]]
        within = [p for p in pairs if not p["cross_split"] and not p["same_group"]]
        what = "exact duplicate (identical file bytes)" if kind == "exact" else (
            f"near-duplicate (similarity >= {result['similarity']:.2f} after alignment)")
        if cross:
            out.append(f"{len(cross)} {what} pair(s) across splits, e.g. {_example(cross[0])}: a model is scored "
                       "on images it has seen, so test metrics are optimistic.")
        if within:
            out.append(f"{len(within)} {what} pair(s) within one split and not in one group: they count one image "
                       "twice and narrow the confidence intervals.")
    similar = result["similar_across_splits"]
    if similar:
        out.append(f"{len(similar)} pair(s) across splits are very alike without being copies (likely the same "
                   f"patient: adjacent slices, a repeat film), e.g. {_example(similar[0])} (similarity "
                   f"{similar[0]['similarity']:.2f}); their groups differ, so grouping does not keep them together.")
    spread = result["groups_across_splits"]
    if spread:
        g = spread[0]
        out.append(f"{len(spread)} group(s) have images in more than one split, e.g. {g['group']!r} "
                   f"({', '.join(f'{k}: {n}' for k, n in g['splits'].items())}): one patient is seen in training "
                   "and scored in test.")
    for m in result["ungrouped"]:
        out.append(f"{m} images have no groups (no group column, or each image its own): slices of one scan or "
                   "films of one patient may sit on both sides of a split; give a patient or scan id as group.")
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
    out += shortcut_warnings(result["shortcuts"], result["model_auc"])
    if result["unreadable"]:
        out.append(f"{len(result['unreadable'])} file(s) could not be read and were not audited, e.g. "
                   f"{result['unreadable'][0]['reason']}")
    return out


def _read_all(samples: list[Sample], progress: bool) -> tuple[list[Sample], list[_Fingerprint], list[dict]]:
    def work(s: Sample) -> _Fingerprint | RespiscanError:
        try:
            return _fingerprint(s)
        except RespiscanError as e:
            return e

    readable, prints, unreadable = [], [], []
    with ThreadPoolExecutor() as pool:
        for s, out in tqdm(zip(samples, pool.map(work, samples)), total=len(samples), desc="audit", unit="img",
                           disable=not progress):
            if isinstance(out, RespiscanError):
                unreadable.append({"id": s.id, "reason": str(out)})
            else:
                readable.append(s)
                prints.append(out)
    return readable, prints, unreadable


Pairs = dict[tuple[int, int], float]


def _compare(samples: list[Sample], prints: list[_Fingerprint]) -> tuple[Pairs, Pairs]:
    """Verified similarity and (cross-split) margin of every candidate pair, within each modality."""
    candidates: dict[tuple[int, int], bool] = {}
    for m in MODALITIES:
        idx = np.array([i for i, s in enumerate(samples) if s.modality == m])
        if len(idx) < 2:
            continue
        splits = np.array([samples[i].split for i in idx])
        found = _candidates(np.stack([prints[i].normalised for i in idx]), splits)
        candidates.update({(int(idx[a]), int(idx[b])): flip for (a, b), flip in found.items()})
    pairs = [p for p in candidates if prints[p[0]].digest != prints[p[1]].digest]
    with ThreadPoolExecutor() as pool:
        values = pool.map(lambda p: _similarity(prints[p[0]].normalised, prints[p[1]].normalised, candidates[p]),
                          pairs)
        scores = dict(zip(pairs, values))
    return scores, _margins(scores, np.array([s.split for s in samples]))


def audit(samples: list[Sample], *, similarity: float = NEAR_SIMILARITY, model_auc: dict[str, float] | None = None,
          progress: bool = True) -> dict:
    """Copies, label conflicts, patients across splits, shortcut baselines, class balance and source confounds.

    Returns n_images, similarity (the near-duplicate threshold), exact_duplicates and near_duplicates (pairs
    {a, split_a, label_a, b, split_b, label_b, similarity, cross_split, same_group}, cross-split first),
    cross_split_duplicates (count of both kinds), label_conflicts (copy pairs with opposite labels),
    similar_across_splits (likely the same patient), groups_across_splits [{group, splits}], ungrouped
    (modalities), shortcuts {modality: {n_train, n_test, border|intensity|metadata: {logistic, boosting}}}
    with model_auc, balance {by_split, by_source}, confounds, cramers_v, unreadable [{id, reason}], errors and
    warnings (plain sentences).
    """
    if not SIMILAR_SIMILARITY <= similarity <= 1:
        raise RespiscanError(f"similarity must be between {SIMILAR_SIMILARITY} and 1, got {similarity}")
    readable, prints, unreadable = _read_all(samples, progress)

    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prints):
        by_digest[p.digest].append(i)
    exact = [_pair(readable[i], readable[j], 1.0)
             for members in by_digest.values() for i, j in combinations(members, 2)]
    scores, margins = _compare(readable, prints)
    near = [_pair(readable[i], readable[j], s) for (i, j), s in scores.items() if s >= similarity]
    similar = [_pair(readable[i], readable[j], s) for (i, j), s in scores.items()
               if SIMILAR_SIMILARITY <= s < similarity and margins.get((i, j), 0.0) >= SIMILAR_MARGIN]
    confounds, cramers_v = _confounds(readable)
    result = {
        "n_images": len(samples),
        "similarity": similarity,
        "exact_duplicates": sorted(exact, key=_pair_order),
        "near_duplicates": sorted(near, key=_pair_order),
        "cross_split_duplicates": sum(p["cross_split"] for p in exact + near),
        "label_conflicts": sorted((p for p in exact + near if p["label_a"] != p["label_b"]), key=_pair_order),
        "similar_across_splits": sorted((p for p in similar if not p["same_group"]), key=_pair_order),
        "groups_across_splits": _groups_across_splits(readable),
        "ungrouped": _ungrouped(readable),
        "shortcuts": _shortcuts(readable, prints),
        "model_auc": model_auc,
        "balance": {"by_split": class_balance(readable, lambda s: s.split),
                    "by_source": class_balance(readable, source_of)},
        "confounds": confounds,
        "cramers_v": cramers_v,
        "unreadable": unreadable,
    }
    result["errors"] = _errors(result)
    result["warnings"] = _warnings(result)
    return result


def format_audit(result: dict) -> str:
    """A terminal summary: counts, class balance, shortcut baselines, the first few pairs, errors and warnings."""
    lines = [f"audited {result['n_images']} images ({len(result['unreadable'])} unreadable)",
             f"exact duplicate pairs: {len(result['exact_duplicates'])}   near-duplicate pairs (similarity >= "
             f"{result['similarity']:.2f}): {len(result['near_duplicates'])}   across splits: "
             f"{result['cross_split_duplicates']}   label conflicts: {len(result['label_conflicts'])}",
             f"likely same patient across splits: {len(result['similar_across_splits'])}   groups in several "
             f"splits: {len(result['groups_across_splits'])}"]
    for title, table in (("split", result["balance"]["by_split"]), ("source", result["balance"]["by_source"])):
        lines.append(f"class balance by {title}:")
        lines += [f"  {name:<16} n={c['n']:<6} COVID={c['COVID']:<6} Non_COVID={c['Non_COVID']:<6} "
                  f"COVID share={c['covid_fraction']:.2f}" for name, c in table.items()]
    if result["cramers_v"] is not None:
        lines.append(f"source vs label: Cramer's V = {result['cramers_v']:.2f}")
    for m, r in result["shortcuts"].items():
        model = (result["model_auc"] or {}).get(m)
        lines.append(f"shortcut baselines, {m} test AUC (train n={r['n_train']}, test n={r['n_test']}"
                     + (f"; model {model:.3f}" if model is not None else "") + "): "
                     + "   ".join(f"{f} " + "/".join(f"{r[f][k]:.3f}" for k in SHORTCUT_MODELS)
                                  for f in SHORTCUT_FEATURES) + "  (logistic/boosting)")
    for kind in ("exact_duplicates", "near_duplicates", "similar_across_splits"):
        pairs = result[kind]
        name = kind.replace("_", " ")
        for p in pairs[:5]:
            lines.append(f"  {name}: {p['a']} ({p['split_a']}, {p['label_a']}) ~ {p['b']} ({p['split_b']}, "
                         f"{p['label_b']}), similarity {p['similarity']:.3f}")
        if len(pairs) > 5:
            lines.append(f"  ... {len(pairs) - 5} more {name}")
    lines += [f"error: {e}" for e in result["errors"]]
    lines += [f"warning: {w}" for w in result["warnings"]] or ["no problems found"]
    return "\n".join(lines)


def check_strict(result: dict) -> None:
    """For `--strict`: fail on a label conflict, a copy across splits or a group in two splits, naming the first."""
    if result["errors"]:
        raise RespiscanError(result["errors"][0])
    for kind in ("exact", "near"):
        first = next((p for p in result[f"{kind}_duplicates"] if p["cross_split"]), None)
        if first:
            raise RespiscanError(f"{result['cross_split_duplicates']} duplicate pair(s) across splits; first: "
                                 f"{first['a']} ({first['split_a']}) and {first['b']} ({first['split_b']}), {kind} "
                                 "duplicate")
    if result["groups_across_splits"]:
        g = result["groups_across_splits"][0]
        raise RespiscanError(f"{len(result['groups_across_splits'])} group(s) in more than one split; first: "
                             f"{g['group']!r} ({', '.join(f'{k}: {n}' for k, n in g['splits'].items())})")
