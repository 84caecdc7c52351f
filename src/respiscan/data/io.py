"""Read chest X-rays and CT slices into 2-D grey uint8 arrays, and CT volumes into (slices, H, W) uint8.

Every failure to read a file (missing, unreadable, empty, truncated, not an image, too large, undecodable
DICOM) raises ImageReadError with a one-line "<path>: <problem>" message, so callers and the CLI handle a
single exception type whatever library did the parsing.

Grey levels:
  * 8-bit PNG/JPEG/BMP/TIFF keep their values. Colour becomes ITU-R BT.601 luma (as Pillow's and OpenCV's
    RGB -> grey), and transparent pixels are composited on black, so that they read as air.
  * 16-bit, 32-bit integer and float images (grey or colour) are scaled by their own min/max to 0..255; a
    constant image becomes all zeros. NaN counts as the minimum, +-inf as the maximum/minimum.
  * EXIF orientation is applied, so the array looks as the image does in a viewer. Multi-page TIFF gives
    its first page.
  * DICOM: the modality LUT (RescaleSlope/RescaleIntercept) comes first. CT is then windowed in HU with
    DicomWindow (default lung window: -1350 HU -> 0, 150 HU -> 255). Other modalities use the file's own VOI
    LUT or WindowCenter/WindowWidth, else min/max, and MONOCHROME1 is inverted so air is dark as on
    MONOCHROME2. CT is never inverted: HU mean the same whatever the PhotometricInterpretation.
"""

from __future__ import annotations

import errno
import math
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from respiscan.errors import ImageReadError, RespiscanError
from respiscan.extras import MissingDicomDecoder

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# pydicom is imported where DICOM is read: it costs 0.2 s, a fifth of a cold one-image prediction

MAX_PIXELS = 100_000_000  # per image or slice, checked from the header before decoding (decompression bombs)
MAX_VOXELS = 1_000_000_000  # per volume, checked from the headers before decoding

_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RASTER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
_HEAD_BYTES = 132  # DICOM's 128-byte preamble and "DICM"; also covers the PNG header's bit depth (byte 24)
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_ENCODINGS = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1",
              (False, False): "1.2.840.10008.1.2.2"}  # pydicom's (implicit VR, little endian) -> transfer syntax
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
_EXIF_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: np.transpose,
    6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).T, 8: np.rot90,
}


@dataclass(frozen=True)
class DicomWindow:
    """Display window for CT in Hounsfield units; the default is a lung window (-1350..150 HU)."""

    ct_center: float = -600.0
    ct_width: float = 1500.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ct_center) and math.isfinite(self.ct_width) and self.ct_width > 0):
            raise ValueError(f"the CT window needs a finite centre and a positive width, "
                             f"got centre {self.ct_center}, width {self.ct_width}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "window") -> DicomWindow:
        """Missing keys take the defaults; unknown keys and bad values are errors naming `where`."""
        if not isinstance(data, Mapping):
            raise RespiscanError(f"{where}: expected a mapping with ct_center and ct_width, got {data!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise RespiscanError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; accepted: "
                                 f"{', '.join(names)}")
        try:
            return cls(**{k: float(v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise RespiscanError(f"{where}: {exc}") from exc


def read_image(path: str | PathLike[str], modality: str | None = None,
               window: DicomWindow | None = None) -> np.ndarray:
    """One image as a 2-D grey uint8 array (see the module docstring for the grey levels).

    `modality` ("xray" or "ct") decides how DICOM is windowed; None takes the file's Modality tag. `window`
    is the CT window (default lung window). Files are recognised by content where cheap: DICOM by its
    "DICM" preamble (or a .dcm/.dicom suffix), the rest by Pillow; PNG, JPEG, BMP and TIFF are accepted.
    """
    if modality not in (None, "xray", "ct"):
        raise ValueError(f"modality must be 'xray', 'ct' or None, got {modality!r}")
    path = Path(path)
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise ImageReadError(f"{path}: a NIfTI volume; read it with read_volume")
    with _opened(path) as (f, head):
        if not _is_dicom(path, head):
            return _read_raster(path, f, head)
        ds = _read_dicom(path, f, head)
    with _reading(path, "read DICOM image"):
        frames = _frame_count(ds)
        if frames != 1:
            raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames); read it as a volume")
        ct = modality == "ct" or (modality is None and str(ds.get("Modality", "")).upper() == "CT")
        return _frame_to_uint8(_decode_dicom(path, ds)[0], ds, 0, ct, window or DicomWindow())


def read_volume(path: str | PathLike[str], window: DicomWindow | None = None) -> np.ndarray:
    """A CT volume as (n_slices, H, W) uint8 axial slices, lung-windowed in HU with `window`.

    Accepts a NIfTI file (.nii, .nii.gz), a DICOM series folder, or a (multi-frame) DICOM file.

    Orientation, the same for every source: slices run inferior -> superior, and each slice is shown as
    radiologists view axial CT, from the feet: anterior at the top, the patient's right on the image's left.
      * NIfTI: reoriented to RAS+ with nibabel.as_closest_canonical (the affine decides; oblique scans take the
        closest axes), scl_slope/scl_inter applied; slices are taken along the last axis.
      * DICOM: axial slices are flipped/transposed to that view from ImageOrientationPatient (standard axial
        CT, 1\\0\\0\\0\\1\\0, is already stored so); non-axial or unoriented slices are kept as stored. Slices
        are sorted by ImagePositionPatient z (per-frame functional groups for enhanced multi-frame files),
        else by InstanceNumber, else kept in file-name (or frame) order.
      * A series folder takes every regular file in it (not in subfolders) that has the DICM preamble or a
        .dcm/.dicom suffix, skipping hidden files and DICOM files that are not images (DICOMDIR, reports);
        the images must share one SeriesInstanceUID.
    """
    path = Path(path)
    window = window or DicomWindow()
    if path.is_dir():
        return _dicom_series(path, window)
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        return _nifti_volume(path, window)
    with _opened(path) as (f, head):
        if not _is_dicom(path, head):
            raise ImageReadError(f"{path}: not a volume; expected .nii/.nii.gz, a DICOM series folder or a "
                                 f"DICOM file")
        ds = _read_dicom(path, f, head)
    with _reading(path, "read DICOM volume"):
        frames = _decode_dicom(path, ds)
        slices = [_frame_to_uint8(frame, ds, i, True, window) for i, frame in enumerate(frames)]
        order = _slice_order([_position_z(ds, i) for i in range(len(slices))], [None] * len(slices))
        return np.stack([slices[i] for i in order])


def is_volume(path: str | PathLike[str]) -> bool:
    """True for what read_volume takes and read_image refuses: NIfTI files, folders, multi-frame DICOM.

    Never raises: a file that cannot be read is not a volume, and read_image will say what is wrong with it.
    """
    path = Path(path)
    if path.is_dir() or path.name.lower().endswith(_NIFTI_SUFFIXES):
        return True
    try:
        with _opened(path) as (f, head):
            if not _is_dicom(path, head):
                return False
            ds = _read_dicom(path, f, head, header_only=True)
        with _reading(path, "read DICOM header"):
            return _frame_count(ds) > 1
    except ImageReadError:
        return False


# --- files -------------------------------------------------------------------------------------------------

@contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, bytes]]:
    """The open regular file and its first bytes (enough for every magic number checked here)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ImageReadError(f"{path}: {_os_problem(path, exc)}") from exc
    if stat.S_ISDIR(mode):
        raise ImageReadError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise ImageReadError(f"{path}: not a regular file")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ImageReadError(f"{path}: {_os_problem(path, exc)}") from exc
    with f:
        with _reading(path, "read file"):
            head = f.read(_HEAD_BYTES)
        if not head:
            raise ImageReadError(f"{path}: empty file (0 bytes)")
        yield f, head


def _os_problem(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT:
        return "broken symbolic link (its target does not exist)" if path.is_symlink() else "no such file"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return f"cannot open: {exc.strerror or exc}"


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn a parser's failure into ImageReadError("<path>: cannot <what>: <reason>"): Pillow, pydicom and
    nibabel raise an open-ended set of exception types on malformed input."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(f"{path}: cannot {what}: {reason}") from exc


def _check_size(path: Path, width: int, height: int, slices: int = 1) -> None:
    """Refuse empty images, and images or volumes too large to decode safely, from their headers."""
    if width <= 0 or height <= 0 or slices <= 0:
        raise ImageReadError(f"{path}: empty image ({width}x{height} pixels, {slices} slice(s))")
    if width * height > MAX_PIXELS:
        raise ImageReadError(f"{path}: {width}x{height} pixels is over the limit of {MAX_PIXELS} "
                             f"(MAX_PIXELS); refusing a possible decompression bomb")
    if width * height * slices > MAX_VOXELS:
        raise ImageReadError(f"{path}: {slices}x{height}x{width} voxels is over the limit of {MAX_VOXELS} "
                             f"(MAX_VOXELS)")


# --- grey levels -------------------------------------------------------------------------------------------

def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo -> 0 and hi -> 255 linearly, clipping outside; NaN -> 0."""
    if hi == lo:
        return np.zeros(values.shape, np.uint8)
    # float32 input (images, CT volumes) stays float32 for speed and memory; anything else is float64
    scaled = np.subtract(values, lo, dtype=np.float32 if values.dtype == np.float32 else np.float64)
    scaled /= hi - lo
    scaled *= 255
    np.fmax(scaled, 0, out=scaled)  # fmax also turns NaN into 0
    np.fmin(scaled, 255, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def _ct_window(hu: np.ndarray, window: DicomWindow) -> np.ndarray:
    return _scale(hu, window.ct_center - window.ct_width / 2, window.ct_center + window.ct_width / 2)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale by the image's own finite min/max: images deeper than 8 bits have no fixed grey scale."""
    lo, hi = values.min(), values.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return np.zeros(values.shape, np.uint8)
        lo, hi = finite.min(), finite.max()
    return _scale(values, float(lo), float(hi))


def _to_grey_uint8(pixels: np.ndarray) -> np.ndarray:
    """Grey uint8 from decoded grey, grey+alpha, RGB or RGBA pixels (see the module docstring)."""
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype == np.uint8 and pixels.ndim == 2:
        return pixels
    values = pixels.astype(np.float32)  # exact for 8- and 16-bit data, and ample for an 8-bit result
    if values.ndim == 3:
        channels = values.shape[2]
        grey = values[..., :3] @ _LUMA if channels >= 3 else values[..., 0]
        if channels in (2, 4):
            grey *= values[..., -1] / np.iinfo(pixels.dtype).max
        values = grey
    if pixels.dtype == np.uint8:
        return _scale(values, 0, 255)
    return _minmax_to_uint8(values)


# --- PNG, JPEG, BMP, TIFF ----------------------------------------------------------------------------------

def _read_raster(path: Path, f: BinaryIO, head: bytes) -> np.ndarray:
    """Decode with Pillow: it reads the size lazily, so a decompression bomb is refused before decoding,
    and it refuses truncated files, which OpenCV may decode partially."""
    f.seek(0)
    with _reading(path, "read image header"):
        try:
            im = Image.open(f, formats=_RASTER_FORMATS)
        except UnidentifiedImageError as exc:
            raise ImageReadError(f"{path}: not a supported image (PNG, JPEG, BMP, TIFF or DICOM)") from exc
        except Image.DecompressionBombError as exc:  # Pillow's own limit, above ours by default
            raise ImageReadError(f"{path}: over the limit of {MAX_PIXELS} pixels (MAX_PIXELS); refusing a "
                                 f"possible decompression bomb") from exc
    with im:
        _check_size(path, *im.size)
        with _reading(path, f"decode {im.format} image"):
            im.load()
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            pixels = _opencv_pixels(f) if _is_deep_colour(im, head) else _pillow_pixels(im)
    grey = _to_grey_uint8(pixels)
    if orientation in _EXIF_ORIENTATION:
        grey = _EXIF_ORIENTATION[orientation](grey)
    return np.ascontiguousarray(grey)


def _pillow_pixels(im: Image.Image) -> np.ndarray:
    if im.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F") and not im.mode.startswith("I;16"):
        im = im.convert("RGBA")  # palette (with its transparency), CMYK, YCbCr, premultiplied modes
    return np.array(im)  # a writable copy


def _is_deep_colour(im: Image.Image, head: bytes) -> bool:
    """16-bit-per-channel colour PNG/TIFF, which Pillow reduces to 8 bits."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "PNG":
        return head[24] > 8  # IHDR bit depth
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 8)  # BitsPerSample
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _opencv_pixels(f: BinaryIO) -> np.ndarray:
    """Full-depth RGB(A) from OpenCV, for deep colour once Pillow has checked the whole file decodes.
    IMREAD_UNCHANGED ignores EXIF orientation, which the caller applies in both paths alike."""
    f.seek(0)
    pixels = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("OpenCV could not decode the 16-bit colour data")
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return pixels


# --- DICOM -------------------------------------------------------------------------------------------------

def _is_dicom(path: Path, head: bytes) -> bool:
    if head[128:132] == b"DICM":
        return True
    return path.suffix.lower() in _DICOM_SUFFIXES and not head.startswith(_RASTER_MAGIC)


def _read_dicom(path: Path, f: BinaryIO, head: bytes, header_only: bool = False) -> Dataset:
    """Parse a DICOM file; one without the preamble (old ACR-NEMA style, named .dcm) is parsed by force."""
    f.seek(0)
    forced = head[128:132] != b"DICM"
    with _reading(path, "read DICOM file"):
        import pydicom

        ds = pydicom.dcmread(f, force=forced, stop_before_pixels=header_only)
        if forced and "Rows" not in ds:  # forcing parses almost anything into a few nonsense elements
            raise ImageReadError(f"{path}: not a DICOM image (no DICM preamble, no image attributes)")
        if ds.file_meta.get("TransferSyntaxUID") is None and ds.original_encoding in _ENCODINGS:
            # no file meta: the pixel decoder needs the encoding that pydicom found while parsing
            from pydicom.uid import UID

            ds.file_meta.TransferSyntaxUID = UID(_ENCODINGS[ds.original_encoding])
        return ds


def _frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _decode_dicom(path: Path, ds: Dataset) -> np.ndarray:
    """Stored pixel values as (frames, rows, columns[, samples]), refusing what cannot or should not be
    decoded before decoding it."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000TransferSyntaxes

    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise ImageReadError(f"{path}: DICOM has no pixel data")
    frames = _frame_count(ds)
    _check_size(path, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), frames)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    pillow_only = False
    if syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ImageReadError(f"{path}: DICOM transfer syntax {syntax.name} is not supported") from None
        package = "pylibjpeg-openjpeg" if syntax in JPEG2000TransferSyntaxes else "pylibjpeg-libjpeg"
        if not decoder.is_available:
            raise MissingDicomDecoder(path, syntax.name, package)
        # Pillow (a core dependency) decodes 8-bit JPEG and some JPEG 2000, not 12/16-bit JPEG
        pillow_only = set(decoder.available_plugins) <= {"pillow"}
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        if pillow_only:
            raise MissingDicomDecoder(path, syntax.name, package, tried="Pillow") from exc
        raise
    return pixels[np.newaxis] if frames == 1 else pixels


def _frame_to_uint8(pixels: np.ndarray, ds: Dataset, index: int, ct: bool, window: DicomWindow) -> np.ndarray:
    """One decoded frame through the DICOM display pipeline: modality LUT, then the CT window or the file's
    VOI transform, MONOCHROME1 inversion (not for CT), and the radiological view for axial slices."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        grey = _to_grey_uint8(pixels)
    else:
        values = apply_modality_lut(pixels, _functional_item(ds, index, "PixelValueTransformationSequence"))
        if ct:
            grey = _ct_window(values, window)
        else:
            grey = _voi_to_uint8(values, ds)
            if photometric == "MONOCHROME1":
                grey = 255 - grey
    orientation = _functional_item(ds, index, "PlaneOrientationSequence").get("ImageOrientationPatient")
    return _radiological(grey, orientation)


def _voi_to_uint8(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The file's own display transform: VOI LUT, else window, else min/max; its output range -> 0..255."""
    from pydicom.pixels import apply_voi, apply_windowing

    luts = ds.get("VOILUTSequence")
    if luts and "LUTDescriptor" in luts[0] and "LUTData" in luts[0]:
        # the LUT indexes integer values; its output has 2**bits levels (PS3.3 C.11.2.1.1)
        out = apply_voi(np.rint(values).astype(np.int64), ds)
        return _scale(out, 0, 2 ** int(luts[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # pydicom maps the window onto the stored value range; its ends are what +-inf map to
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return _scale(apply_windowing(values, ds), lo, hi)
    return _minmax_to_uint8(values)


def _functional_item(ds: Dataset, index: int, sequence: str) -> Dataset:
    """Where frame `index` keeps the attributes of `sequence`: enhanced multi-frame files hold them in
    per-frame or shared functional groups, classic files at the top level."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        if group.get(sequence):
            return group[sequence][0]
    return ds


def _position_z(ds: Dataset, index: int) -> float | None:
    """Patient z (DICOM's LPS: larger is superior) of frame `index`."""
    position = _functional_item(ds, index, "PlanePositionSequence").get("ImagePositionPatient")
    return float(position[2]) if position is not None and len(position) == 3 else None


def _radiological(grey: np.ndarray, orientation: Any) -> np.ndarray:
    """An axial slice with anterior at the top and the patient's right on the left; others as stored.

    ImageOrientationPatient gives, in LPS, the directions in which the column index (first three values)
    and the row index (last three) increase; the target is +x (to the patient's left) and +y (posterior).
    """
    if orientation is None or len(orientation) != 6:
        return grey
    along_row, along_col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    if np.argmax(np.abs(np.cross(along_row, along_col))) != 2:  # normal not head-feet: not axial
        return grey
    if abs(along_row[1]) > abs(along_row[0]):  # columns run anterior-posterior: swap the axes
        grey, along_row, along_col = grey.T, along_col, along_row
    if along_row[0] < 0:
        grey = grey[:, ::-1]
    if along_col[1] < 0:
        grey = grey[::-1]
    return np.ascontiguousarray(grey)


def _slice_order(positions: list[float | None], numbers: list[int | None]) -> list[int]:
    """Indices inferior -> superior: by z position, else by InstanceNumber, else as given (stable)."""
    for keys in (positions, numbers):
        if all(k is not None for k in keys):
            return sorted(range(len(keys)), key=keys.__getitem__)
    return list(range(len(positions)))


def _dicom_series(folder: Path, window: DicomWindow) -> np.ndarray:
    """A series folder: headers first (to refuse mixed series and order slices cheaply), then pixels."""
    headers: list[tuple[Path, Dataset]] = []
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file():
            continue
        with _opened(file) as (f, head):
            if _is_dicom(file, head):
                ds = _read_dicom(file, f, head, header_only=True)
                if "Rows" in ds:  # DICOMDIR, reports and other non-images have no Rows
                    headers.append((file, ds))
    if not headers:
        raise ImageReadError(f"{folder}: no DICOM images in this folder")
    with _reading(folder, "read DICOM series"):
        series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
        if len(series) > 1:
            raise ImageReadError(f"{folder}: mixes {len(series)} DICOM series (SeriesInstanceUID); put each "
                                 f"series in its own folder")
        sizes = sorted({(int(ds.Rows), int(ds.get("Columns") or 0)) for _, ds in headers})
        if len(sizes) > 1:
            listed = ", ".join(f"{rows}x{columns}" for rows, columns in sizes)
            raise ImageReadError(f"{folder}: slices differ in size ({listed})")
        for file, ds in headers:
            if _frame_count(ds) > 1:
                raise ImageReadError(f"{folder}: {file.name} is a multi-frame file; read it on its own")
        rows, columns = sizes[0]
        _check_size(folder, columns, rows, len(headers))
        numbers = [int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None for _, ds in headers]
        order = _slice_order([_position_z(ds, 0) for _, ds in headers], numbers)
    slices = []
    for i in order:
        file = headers[i][0]
        with _opened(file) as (f, head):
            ds = _read_dicom(file, f, head)
        with _reading(file, "read DICOM slice"):
            slices.append(_frame_to_uint8(_decode_dicom(file, ds)[0], ds, 0, True, window))
    with _reading(folder, "stack DICOM series"):
        return np.stack(slices)


# --- NIfTI -------------------------------------------------------------------------------------------------

def _nifti_volume(path: Path, window: DicomWindow) -> np.ndarray:
    with _opened(path):  # the same one-line errors as every other reader for missing, unreadable, empty files
        pass
    with _reading(path, "read NIfTI"):
        import nibabel as nib  # only for NIfTI: keeps the one-image prediction path fast

        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise ImageReadError(f"{path}: NIfTI of shape {shape}; expected a 3-D CT volume")
    _check_size(path, shape[0], shape[1], shape[2])
    with _reading(path, "read NIfTI"):
        hu = nib.as_closest_canonical(nib.funcs.squeeze_image(img)).get_fdata(dtype=np.float32)
    grey = _ct_window(hu, window)
    # RAS+ axes are (to the patient's right, anterior, superior): radiological slices put the largest x on
    # the left and the largest y at the top
    return np.ascontiguousarray(grey.transpose(2, 1, 0)[:, ::-1, ::-1])
