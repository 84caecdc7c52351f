"""The saved-model format: a folder with config.json (JSON, validated) and model.safetensors (never pickle).

The config carries everything prediction needs (model structure, preprocessing, thresholds), so a bundle
runs offline without the training data or the training code's state. `BundleConfig` is the one typed owner
of config.json: every reader goes through `Bundle.open`, which checks the types of every key and the values
a person may edit by hand, and says which file and key is wrong in one line. Keys this version does not know
(a newer minor version's additions) are kept and written back. Reading a bundle needs no torch (the ONNX
engine uses it); torch is imported only to save or read weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from respiscan import __version__
from respiscan.calibration import IDENTITY, Calibration, OperatingPoint, ScoreCounts
from respiscan.data.preprocess import PreprocessConfig
from respiscan.data.samples import CLASS_NAMES, MODALITIES
from respiscan.errors import RespiscanError
from respiscan.models.spec import ModelSpec
from respiscan.records import Invalid, build, describe, dump
from respiscan.utils import atomic_write, write_json

if TYPE_CHECKING:
    import torch

FORMAT = "respiscan-bundle"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SPLITS_FILE = "splits.csv"  # the samples it was trained, validated and tested on (optional)
LOGS = "logs"  # one CSV per training stage (optional)
OOD_FILE = "ood.safetensors"  # the shift detector's statistics (optional)
FUSION = "mean of the per-modality probabilities"
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048  # below: nothing left to see; above: no CPU batch fits in memory
MAX_CLAHE_TILES = 64
LEGACY_DISCRIMINATOR = "shared.discriminator."

Modality = Literal["xray", "ct"]
Kind = Literal["xray", "ct", "fused"]  # what a threshold or a metric is for: one modality, or both fused
Precision = Literal["bf16", "fp32"]


@dataclass(frozen=True)
class Bf16Check:
    """How far bf16 autocast moved the validation probabilities at training; prediction follows it."""

    max_abs_difference: float
    tolerance: float
    images: str
    prediction_default: Precision

    @property
    def allows_bf16(self) -> bool:
        return self.max_abs_difference <= self.tolerance


@dataclass(frozen=True)
class OnnxGraph:
    file: str  # a file name inside the bundle folder
    sha256: str
    max_abs_diff: float  # largest |p_onnx - p_torch_fp32| measured at export


@dataclass(frozen=True)
class OnnxExport:
    """What `respiscan export` wrote: the graphs, their hashes, and the weights they were exported from."""

    opset: int
    input: str
    output: str
    weights_sha256: str
    torch_version: str
    graphs: dict[Modality, OnnxGraph]
    # the task-specific embedding, for the shift detector; absent from graphs exported before it existed
    embedding_output: str | None = field(default=None, metadata={"omit_none": True})


EngineName = Literal["torch", "onnx", "openvino"]
TrialStatus = Literal["agrees", "disagrees", "unavailable"]


@dataclass(frozen=True)
class EngineTrial:
    """One engine measured on one modality's check images (serving/engine_choice.py)."""

    engine: EngineName
    precision: Precision
    status: TrialStatus
    img_s: float | None = None
    max_abs_difference: float | None = None  # largest |p - p_torch_fp32| on the check images
    note: str = ""  # why an engine is unavailable


@dataclass(frozen=True)
class EngineChoice:
    """The fastest engine that agrees with torch fp32 within `tolerance` on `images`: what `auto` runs."""

    engine: EngineName
    precision: Precision
    tolerance: float
    images: str  # what the engines were checked on
    trials: list[EngineTrial]


@dataclass(frozen=True)
class OodThreshold:
    """One modality's shift-detector thresholds, set together on the validation images: an image is flagged when
    either distance exceeds its threshold, and (1 - false_alarm_rate) of the validation images stay under both."""

    threshold: float  # on the embedding's Mahalanobis distance
    n_train: int  # training images the statistics come from
    n_val: int  # held-out images the thresholds come from (validation, and calibration where there is one)
    val_flagged: float  # share of the validation images flagged (the false-alarm rate measured)
    image_threshold: float | None = None  # on the image statistics' distance; None: bundles from before it
    # The validation images' scores (distance over threshold), ascending: the reference a whole set of new
    # images is compared with (serving/shift.py `SetShiftTest`). None: bundles from before it.
    val_scores: list[float] | None = field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True)
class OodDetector:
    """The "unlike my training images" warning (serving/shift.py): Mahalanobis distances of the task-specific
    embedding and of the image statistics (data/image_stats.py) from the training images' (Ledoit-Wolf shrunk
    covariances), statistics in `file` (safetensors)."""

    file: str  # a file name inside the bundle folder
    sha256: str
    false_alarm_rate: float  # on validation images, by construction of the thresholds
    modalities: dict[Modality, OodThreshold]
    space: str = "task-specific embedding (1280-d)"
    method: str = "mahalanobis-ledoit-wolf"
    # Also flag an image whose statistics lie nearer the other modality's training images than its own (each
    # distance over its threshold): the wrong-modality check. False: bundles from before it.
    modality_check: bool = field(default=False, metadata={"omit_default": True})


@dataclass(frozen=True)
class DataFingerprint:
    n_samples: int
    samples_sha256: str  # the sample listing: ids, modalities, labels, splits, groups
    files_sha256: str  # the file contents


@dataclass(frozen=True)
class SkippedImage:
    id: str
    reason: str


@dataclass(frozen=True)
class DataRecord:
    """The data the bundle was trained on."""

    path: str  # the data folder, or the several joined by ", "
    fingerprint: DataFingerprint
    counts: dict[str, int]  # "modality/split/class" -> images
    skipped: list[SkippedImage]
    # absent in earlier bundles: every data folder given; source -> "modality/split/class" -> images
    paths: list[str] | None = field(default=None, metadata={"omit_none": True})
    sources: dict[str, dict[str, int]] | None = field(default=None, metadata={"omit_none": True})

    def sources_by_modality(self) -> dict[str, list[str]]:
        """The training sources of each modality (empty for bundles that predate the record)."""
        found: dict[str, set[str]] = {}
        for source, counts in (self.sources or {}).items():
            for key in counts:
                found.setdefault(key.split("/")[0], set()).add(source)
        return {m: sorted(names) for m, names in sorted(found.items())}

    def transfer_note(self) -> str:
        """One line on what the sources allow a reader to expect at another site."""
        by_modality = self.sources_by_modality()
        if not by_modality:
            return "training sources not recorded (bundle predates the record)"
        single = [m for m, names in by_modality.items() if len(names) < 2]
        parts = "; ".join(f"{m}: {', '.join(names)}" for m, names in by_modality.items())
        if single:
            return f"{parts} (one source for {', '.join(single)}: transfer to other sites is unverified)"
        return parts


@dataclass(frozen=True)
class OperatingPointRecord:
    """How a threshold was chosen: the rule, on which images, its bootstrap interval, what it reached there,
    and those images' scores (the ROC), from which `predict --operating-point` chooses another."""

    point: OperatingPoint
    threshold: float
    ci: list[float] | None  # 95 % percentile bootstrap interval of the threshold (patients resampled)
    chosen_on: str
    n: int
    n_positive: int
    sensitivity: float | None
    specificity: float | None
    scores: ScoreCounts


Setting = Literal["in-source", "external", "unknown"]


@dataclass(frozen=True)
class CardResult:
    """One measured result on the model card. "in-source": a test split of a source the bundle was trained on;
    "external": a source it never saw; "unknown": the bundle does not record its training sources."""

    setting: Setting
    source: str
    kind: Kind
    method: Literal["evaluate", "crossval"]
    data: str  # the data folders it was measured on (crossval: which fold left what out)
    n: int
    n_positive: int | None
    roc_auc: float | None
    roc_auc_ci: list[float] | None
    sensitivity: float | None
    sensitivity_ci: list[float] | None
    specificity: float | None
    specificity_ci: list[float] | None
    threshold: float | None
    ece: float | None
    date: str
    # the test images as a set against the validation images (serving/shift.py SetShift); None: not measured
    set_shift_auc: float | None = field(default=None, metadata={"omit_none": True})
    set_shifted: bool | None = field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True)
class ModelCard:
    """MODEL_CARD.md as data (card.py writes both). The sections are rebuilt from the config whenever the card
    is written; `results` accumulate as evaluate and crossval measure the bundle."""

    intended_use: str
    training_data: list[str]
    validation: list[str]
    calibration: list[str]
    operating_points: list[str]
    shift_detector: str
    limitations: list[str]
    versions: dict[str, str]
    results: list[CardResult] = field(default_factory=list)
    updated: str = ""


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    """config.json, typed; fields in the order they are written. Records (training, audit, validation metrics)
    are kept as the plain JSON objects their writers produce."""

    format: Literal["respiscan-bundle"] = FORMAT
    format_version: int = FORMAT_VERSION
    respiscan_version: str | None = None  # the version that trained the bundle
    model: ModelSpec
    preprocess: PreprocessConfig
    class_names: list[str]
    positive_class: str = CLASS_NAMES[1]
    thresholds: dict[Kind, float]  # COVID when p >= threshold
    fusion: str = FUSION
    training: dict[str, Any] = field(default_factory=dict)  # the TrainConfig, as its to_dict() wrote it
    versions: dict[str, str] = field(default_factory=dict)
    data: DataRecord
    audit: dict[str, Any] | None = None
    validation_metrics: dict[Kind, dict[str, Any]] = field(default_factory=dict)
    bf16_check: Bf16Check | None = None  # None: not measured, the torch engine runs fp32
    train_seconds: float | None = None
    weights_sha256: str
    # absent in bundles trained before the shift detector existed: they report no shift score
    ood: OodDetector | None = field(default=None, metadata={"omit_none": True})
    # absent in bundles trained before calibration: their probabilities are the network's (identity)
    calibration: dict[Modality, Calibration] | None = field(default=None, metadata={"omit_none": True})
    operating_points: dict[Kind, OperatingPointRecord] | None = field(default=None, metadata={"omit_none": True})
    model_card: ModelCard | None = field(default=None, metadata={"omit_none": True})
    # absent until exported: bundles written before `export` existed have no such key
    onnx: OnnxExport | None = field(default=None, metadata={"omit_none": True})
    # absent until `respiscan export --choose-engine`: then `auto` runs the ONNX engine when it can
    engines: dict[Modality, EngineChoice] | None = field(default=None, metadata={"omit_none": True})
    # keys this version does not know, at every level, as read: written back unchanged
    unknown: dict = field(default_factory=dict, compare=False, repr=False, metadata={"json": False})

    @classmethod
    def from_dict(cls, document: Any, where: str | Path = CONFIG) -> BundleConfig:
        """The config of a JSON document, checked; RespiscanError naming `where` and the key otherwise."""
        if not isinstance(document, dict):
            raise RespiscanError(f"{where}: expected a JSON object, got {describe(document)}")
        try:
            _check_format(document)
            config, unknown = build(cls, document, "")
            config = replace(config, unknown=unknown)
            _check_values(config)
        except Invalid as e:
            raise RespiscanError(f"{where}: {e}") from None
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, in the format's key order, with the unknown keys as they were read."""
        return dump(self, self.unknown)

    def calibration_of(self, modality: str) -> Calibration:
        """The modality's calibration map (identity for bundles that predate calibration)."""
        return (self.calibration or {}).get(modality, IDENTITY)

    def thresholds_at(self, point: OperatingPoint) -> dict[str, float]:
        """The thresholds `point` gives on the stored calibration scores, per modality and fused (a fused
        threshold that was the mean of the modalities' stays that mean); RespiscanError without the scores."""
        records = self.operating_points or {}
        missing = [m for m in self.model.modalities if m not in records]
        if missing:
            raise RespiscanError(f"{CONFIG}: no calibration scores for {missing[0]} (the bundle predates operating "
                                 "points, or that split had one class); retrain to choose another operating point")
        thresholds = {m: records[m].scores.threshold(point) for m in self.model.modalities}
        if len(self.model.modalities) > 1:
            fused = records.get("fused")
            thresholds["fused"] = (fused.scores.threshold(point) if fused
                                   else sum(thresholds.values()) / len(thresholds))
        return thresholds

    def with_onnx(self, onnx: OnnxExport) -> BundleConfig:
        """A copy recording newly exported graphs (what an older export left under "onnx" is dropped)."""
        return replace(self, onnx=onnx, unknown={k: v for k, v in self.unknown.items() if k != "onnx"})


@dataclass(frozen=True)
class Bundle:
    """A bundle folder and its checked config; `Bundle.open(path)` is how every consumer reads one."""

    path: Path
    config: BundleConfig

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise RespiscanError(f"{path}: not a bundle folder")
        file = path / CONFIG
        if not file.is_file():
            raise RespiscanError(f"{file}: missing; not a respiscan bundle")
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RespiscanError(f"{file}: not valid JSON ({e})") from e
        except OSError as e:
            raise RespiscanError(f"{file}: cannot read ({e.strerror})") from e
        return cls(path, BundleConfig.from_dict(document, file))

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def has_onnx(self) -> bool:
        """Whether `respiscan export` has been run on this bundle."""
        return self.config.onnx is not None and bool(self.config.onnx.graphs)

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict, after checking the file's hash against the one recorded at save time."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.weights_path
        if not path.is_file():
            raise RespiscanError(f"{path}: missing weights file")
        if sha256_file(path) != self.config.weights_sha256:
            raise RespiscanError(f"{path}: weights do not match the hash in {CONFIG} (truncated or modified)")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise RespiscanError(f"{path}: unreadable safetensors file ({e})") from e
        # adversarial bundles of earlier releases also carried the modality discriminator, which prediction
        # never runs: its weights are dropped, so those bundles load into today's network
        return {k: v for k, v in state.items() if not k.startswith(LEGACY_DISCRIMINATOR)}

    def save_config(self, config: BundleConfig) -> Bundle:
        """Check `config` and replace config.json with it atomically; the bundle as it now is."""
        checked = BundleConfig.from_dict(config.to_dict(), self.config_path)
        write_json(self.config_path, checked.to_dict())
        return Bundle(self.path, checked)


def ood_mean_key(modality: str) -> str:
    """Name of a modality's embedding mean in OOD_FILE."""
    return f"{modality}.mean"


def ood_precision_key(modality: str) -> str:
    """Name of a modality's shrunk precision matrix in OOD_FILE."""
    return f"{modality}.precision"


def ood_image_key(modality: str, what: str) -> str:
    """Name of a modality's image-statistics mean or precision ("mean", "precision") in OOD_FILE."""
    return f"{modality}.image.{what}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_bundle(out: str | Path, net: torch.nn.Module, config: BundleConfig | dict[str, Any]) -> Path:
    """Write a bundle: the weights, then the config that names their hash (complete once config.json exists).

    `config` is a BundleConfig, or the plain dict the trainer builds (every key but format, format_version,
    respiscan_version and weights_sha256); either is checked before anything is written.
    """
    from respiscan.runtime import tensor_bytes  # torch: only where weights are written

    out = Path(out)
    weights = tensor_bytes(net.state_dict())
    document = config.to_dict() if isinstance(config, BundleConfig) else {
        "format": FORMAT, "format_version": FORMAT_VERSION, "respiscan_version": __version__, **config}
    document["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    checked = BundleConfig.from_dict(document, out / CONFIG)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / WEIGHTS, "wb") as f:
        f.write(weights)
    write_json(out / CONFIG, checked.to_dict())
    return out


def _check_format(document: dict) -> None:
    """Format and version first: a newer version's other keys must not hide that it is newer."""
    if "format" not in document:
        raise Invalid("", "missing key 'format': not a respiscan bundle")
    if document["format"] != FORMAT:
        raise Invalid("format", f"is {document['format']!r}, not {FORMAT!r}: not a respiscan bundle")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise Invalid("format_version", f"should be a positive integer, got {describe(version)}")
    if version > FORMAT_VERSION:
        raise Invalid("", f"bundle format version {version} is newer than this respiscan supports "
                           f"({FORMAT_VERSION}); upgrade respiscan")


def _check_values(config: BundleConfig) -> None:
    """The values a person may edit by hand, checked where types cannot say it."""
    model, pre = config.model, config.preprocess
    if not model.modalities or len(set(model.modalities)) != len(model.modalities):
        raise Invalid("model.modalities", f"should list each modality once, got {model.modalities}")
    for m in model.modalities:
        if m not in MODALITIES:
            raise Invalid("model.modalities", f"has an unknown modality {m!r}; accepted: {', '.join(MODALITIES)}")
    for name, backbones in (("task_backbones", model.task_backbones), ("shared_backbones", model.shared_backbones)):
        missing = [m for m in model.modalities if backbones is not None and m not in backbones]
        if missing:
            raise Invalid(f"model.{name}", f"has no backbone for {missing[0]}")
    if not MIN_IMAGE_SIZE <= pre.size <= MAX_IMAGE_SIZE:
        raise Invalid("preprocess.size", f"is {pre.size}; accepted: {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels")
    if not pre.clahe_clip > 0:
        raise Invalid("preprocess.clahe_clip", f"is {pre.clahe_clip:g}; the CLAHE clip limit must be positive")
    if not 1 <= pre.clahe_tiles <= min(MAX_CLAHE_TILES, pre.size):
        raise Invalid("preprocess.clahe_tiles", f"is {pre.clahe_tiles}; accepted: 1 to "
                                                 f"{min(MAX_CLAHE_TILES, pre.size)} tiles per side")
    if not 0 <= pre.ct_opening < pre.size:
        raise Invalid("preprocess.ct_opening", f"is {pre.ct_opening}; accepted: 0 (off) to {pre.size - 1} pixels")
    if not pre.dicom_ct_width > 0:
        raise Invalid("preprocess.dicom_ct_width", f"is {pre.dicom_ct_width:g}; the CT window width must be "
                                                    "positive (HU)")
    if config.class_names != list(CLASS_NAMES):
        raise Invalid("class_names", f"is {config.class_names}; format {FORMAT_VERSION} has {list(CLASS_NAMES)}")
    if config.positive_class != CLASS_NAMES[1]:
        raise Invalid("positive_class", f"is {config.positive_class!r}; format {FORMAT_VERSION} has "
                                         f"{CLASS_NAMES[1]!r}")
    for kind, threshold in config.thresholds.items():
        if not 0 <= threshold <= 1:
            raise Invalid(f"thresholds.{kind}", f"is {threshold:g}; a threshold must lie in [0, 1]")
    for kind, record in (config.operating_points or {}).items():
        if not 0 <= record.threshold <= 1:
            raise Invalid(f"operating_points.{kind}.threshold", f"is {record.threshold:g}; a threshold must lie "
                                                                "in [0, 1]")
    needed = [*model.modalities, *(["fused"] if len(model.modalities) > 1 else [])]
    missing = [k for k in needed if k not in config.thresholds]
    if missing:
        raise Invalid("thresholds", f"has no threshold for {missing[0]}")
    if config.ood is not None and (not config.ood.file or Path(config.ood.file).name != config.ood.file):
        raise Invalid("ood.file", f"is {config.ood.file!r}; expected a file name inside the bundle")
    for m, limit in (config.ood.modalities.items() if config.ood else ()):
        if not limit.threshold > 0:
            raise Invalid(f"ood.modalities.{m}.threshold", f"is {limit.threshold:g}; a distance must be positive")
    for m, graph in (config.onnx.graphs.items() if config.onnx else ()):
        if not graph.file or Path(graph.file).name != graph.file or graph.file in (".", ".."):
            raise Invalid(f"onnx.graphs.{m}.file", f"is {graph.file!r}; expected a file name inside the bundle")
