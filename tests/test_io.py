"""Image and volume reading: exact grey levels, orientation, and one clean error for every unreadable file."""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, generate_uid

from respiscan.data import io
from respiscan.data.io import DicomWindow, is_volume, read_image, read_volume
from respiscan.errors import ImageReadError, RespiscanError

HYPOTHESIS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_error(path: Path, *args, reader=read_image) -> str:
    """The message of the ImageReadError that reading `path` must raise: one line, starting with the path."""
    with pytest.raises(ImageReadError) as info:
        reader(path, *args)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def dicom(pixels, modality: str = "CT", photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A minimal valid DICOM image; a 3-D monochrome array becomes a multi-frame file."""
    pixels = np.ascontiguousarray(pixels)
    colour = photometric == "RGB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    if pixels.ndim == 4 or (pixels.ndim == 3 and not colour):
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = pixels.tobytes()
    for name, value in attrs.items():
        setattr(ds, name, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def hu_slice(hu) -> np.ndarray:
    """Stored int16 values for HU under RescaleSlope 1, RescaleIntercept -1024."""
    return (np.asarray(hu) + 1024).astype(np.int16)


CT_RESCALE = {"RescaleSlope": 1, "RescaleIntercept": -1024}


# --- DicomWindow -------------------------------------------------------------------------------------------

def test_window_defaults_to_lung_and_round_trips_through_json():
    window = DicomWindow(ct_center=40, ct_width=400)
    assert DicomWindow().to_dict() == {"ct_center": -600.0, "ct_width": 1500.0}
    assert DicomWindow.from_dict(json.loads(json.dumps(window.to_dict()))) == window
    assert DicomWindow.from_dict({"ct_width": "1000"}) == DicomWindow(ct_width=1000.0)


@pytest.mark.parametrize("data, problem", [({"ct_centre": 0}, "unknown key"), ({"ct_width": 0}, "positive width"),
                                           ({"ct_center": "lung"}, "could not convert"), ([1, 2], "mapping")])
def test_window_from_dict_refuses_bad_config(data, problem):
    with pytest.raises(RespiscanError, match=f"^config.json: .*{problem}"):
        DicomWindow.from_dict(data, where="config.json")


# --- PNG, JPEG, BMP, TIFF ----------------------------------------------------------------------------------

def test_8bit_grey_png_bmp_tiff_keep_their_values(tmp_path):
    img = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    for suffix in (".png", ".bmp", ".tif"):
        cv2.imwrite(str(tmp_path / f"a{suffix}"), img)
        out = read_image(tmp_path / f"a{suffix}")
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, img)


def test_jpeg_of_a_flat_grey_image(tmp_path):
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / "a.jpg", quality=95)
    np.testing.assert_array_equal(read_image(tmp_path / "a.jpg"), np.full((16, 16), 100))


def test_16bit_png_is_scaled_by_its_min_max(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.array([[1000, 2000, 3000]], np.uint16))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), [[0, 128, 255]])  # 127.5 rounds to even


def test_constant_16bit_image_becomes_zeros(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((3, 4), 4000, np.uint16))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), np.zeros((3, 4)))


def test_float_tiff_is_scaled_by_its_finite_min_max(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, np.nan, np.inf]], np.float32)).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), [[0, 64, 128, 255, 0, 255]])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_keeps_its_depth(tmp_path, suffix):
    # Pillow alone would reduce these to their high bytes (3, 7, 11) before any scaling
    grey = np.array([[1000, 2000, 3000]], np.uint16)
    cv2.imwrite(str(tmp_path / f"a{suffix}"), np.dstack([grey] * 3))
    np.testing.assert_array_equal(read_image(tmp_path / f"a{suffix}"), [[0, 128, 255]])


def test_rgb_becomes_bt601_luma(tmp_path):
    Image.fromarray(np.array([[[200, 100, 50], [255, 0, 0], [0, 0, 255]]], np.uint8)).save(tmp_path / "a.png")
    # 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), [[124, 76, 29]])


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [200, 100, 50, 255], [255, 255, 255, 0]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    # luma 124.2, times alpha/255
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), [[62, 124, 0]])


def test_grey_alpha_palette_and_1bit(tmp_path):
    Image.fromarray(np.array([[[100, 255], [100, 51]]], np.uint8), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), [[100, 20]])

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 10, 10, 10])
    palette.putdata([0, 1, 2])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[76, 150, 10]])

    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "bit.png")
    assert Image.open(tmp_path / "bit.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "bit.png"), [[255, 0, 255]])


def test_1x1_image_is_valid(tmp_path):
    Image.fromarray(np.array([[77]], np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), [[77]])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20).save(tmp_path / "a.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a.png")))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), expected)


def test_content_wins_over_suffix(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((2, 2), 9, np.uint8))
    (tmp_path / "png.dcm").write_bytes((tmp_path / "a.png").read_bytes())
    np.testing.assert_array_equal(read_image(tmp_path / "png.dcm"), np.full((2, 2), 9))
    save(dicom(np.zeros((2, 2), np.uint16), modality="DX"), tmp_path / "dicom.png")
    np.testing.assert_array_equal(read_image(tmp_path / "dicom.png"), np.zeros((2, 2)))


# --- unreadable files --------------------------------------------------------------------------------------

def test_missing_empty_and_folder(tmp_path):
    assert "no such file" in read_error(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in read_error(tmp_path / "empty.png")
    assert "folder" in read_error(tmp_path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / f"a{suffix}"), rng.integers(0, 256, (64, 64), dtype=np.uint8))
    data = (tmp_path / f"a{suffix}").read_bytes()
    (tmp_path / f"a{suffix}").write_bytes(data[:len(data) // 2])
    assert "cannot decode" in read_error(tmp_path / f"a{suffix}")


def test_text_named_png(tmp_path):
    (tmp_path / "a.png").write_text("not an image\n")
    assert "not a supported image" in read_error(tmp_path / "a.png")


def test_unsupported_tiff_variant_is_refused_cleanly(tmp_path):
    cv2.imwrite(str(tmp_path / "a.tif"), np.zeros((4, 4, 3), np.float32))  # Pillow cannot read float RGB
    read_error(tmp_path / "a.tif")


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width, height", [(11_000, 10_000), (50_000, 50_000)])  # ours, then Pillow's limit
def test_decompression_bomb_is_refused_from_the_header(tmp_path, width, height):
    (tmp_path / "bomb.png").write_bytes(_png_header(width, height))
    assert "decompression bomb" in read_error(tmp_path / "bomb.png")


def test_pixel_limit_is_the_module_constant(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20), np.uint8))
    monkeypatch.setattr(io, "MAX_PIXELS", 399)
    assert "over the limit of 399" in read_error(tmp_path / "a.png")


def test_zero_sized_image_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_header(0, 10))
    read_error(tmp_path / "a.png")


def test_symlinks_broken_and_looping(tmp_path):
    (tmp_path / "broken.png").symlink_to(tmp_path / "missing.png")
    assert "broken symbolic link" in read_error(tmp_path / "broken.png")
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert "symbolic link loop" in read_error(tmp_path / "a.png")
    assert not is_volume(tmp_path / "a.png")


def test_fifo_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "a.png")
    assert "not a regular file" in read_error(tmp_path / "a.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((2, 2), np.uint8))
    (tmp_path / "a.png").chmod(0)
    try:
        assert "permission denied" in read_error(tmp_path / "a.png")
    finally:
        (tmp_path / "a.png").chmod(0o644)


def test_permission_denied_message(tmp_path, monkeypatch):
    """What the chmod test checks, for root too: a file that cannot be opened."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((2, 2), np.uint8))
    monkeypatch.setattr(io, "open", denied, raising=False)
    assert read_error(tmp_path / "a.png") == f"{tmp_path / 'a.png'}: permission denied"


def test_garbage_named_dcm(tmp_path):
    (tmp_path / "a.dcm").write_text("<html>404 Not Found</html>")
    assert "not a DICOM image" in read_error(tmp_path / "a.dcm")


# --- DICOM -------------------------------------------------------------------------------------------------

def test_ct_gets_modality_lut_then_lung_window(tmp_path):
    hu = [[-1350, -600, 150], [-3000, -975, 3000]]
    path = save(dicom(hu_slice(hu), **CT_RESCALE), tmp_path / "ct.dcm")
    expected = [[0, 128, 255], [0, 64, 255]]  # (HU + 1350) / 1500 * 255, clipped; 127.5 rounds to even
    np.testing.assert_array_equal(read_image(path), expected)
    np.testing.assert_array_equal(read_image(path, modality="ct"), expected)
    # a mediastinal window: (HU - (40 - 200)) / 400 * 255
    np.testing.assert_array_equal(read_image(path, window=DicomWindow(40, 400))[0], [0, 0, 198])


def test_ct_read_as_xray_uses_min_max(tmp_path):
    path = save(dicom(hu_slice([[-1000, 0, 1000]]), **CT_RESCALE), tmp_path / "ct.dcm")
    np.testing.assert_array_equal(read_image(path, modality="xray"), [[0, 128, 255]])


def test_monochrome1_xray_is_inverted(tmp_path):
    path = save(dicom(np.array([[0, 500, 1000]], np.uint16), modality="CR", photometric="MONOCHROME1"),
                tmp_path / "cr.dcm")
    np.testing.assert_array_equal(read_image(path), [[255, 127, 0]])


def test_xray_uses_the_files_window(tmp_path):
    stored = np.array([[0, 1000, 1250, 1500, 1750, 2000, 4095]], np.uint16)
    path = save(dicom(stored, modality="DX", BitsStored=12, HighBit=11, WindowCenter=1500, WindowWidth=1001),
                tmp_path / "dx.dcm")
    # DICOM LINEAR window: ((x - 1499.5) / 1000 + 0.5), clipped to 0..1, times 255
    np.testing.assert_array_equal(read_image(path), [[0, 0, 64, 128, 191, 255, 255]])


def test_xray_uses_the_files_voi_lut(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]
    lut.add_new("LUTData", "US", [0, 50, 200, 255])
    path = save(dicom(np.array([[0, 1, 2, 3, 9]], np.uint16), modality="DX", VOILUTSequence=[lut]),
                tmp_path / "dx.dcm")
    np.testing.assert_array_equal(read_image(path), [[0, 50, 200, 255, 255]])


def test_rgb_dicom_becomes_grey(tmp_path):
    path = save(dicom(np.array([[[200, 100, 50], [0, 0, 255]]], np.uint8), modality="XC", photometric="RGB"),
                tmp_path / "rgb.dcm")
    np.testing.assert_array_equal(read_image(path), [[124, 29]])


def test_multiframe_is_refused_by_read_image_and_read_by_read_volume(tmp_path):
    frames = hu_slice([[[-1350, 150]], [[150, -1350]], [[-600, -600]]])
    path = save(dicom(frames, **CT_RESCALE), tmp_path / "multi.dcm")
    assert "multi-frame DICOM (3 frames); read it as a volume" in read_error(path)
    assert is_volume(path)
    np.testing.assert_array_equal(read_volume(path), [[[0, 255]], [[255, 0]], [[128, 128]]])
    assert not is_volume(save(dicom(frames[0], **CT_RESCALE), tmp_path / "single.dcm"))


def test_enhanced_multiframe_uses_functional_groups(tmp_path):
    def group(**sequences) -> Dataset:
        item = Dataset()
        for name, attrs in sequences.items():
            inner = Dataset()
            for key, value in attrs.items():
                setattr(inner, key, value)
            setattr(item, name, [inner])
        return item

    frames = hu_slice([[[150]], [[-1350]], [[-600]]])
    ds = dicom(frames)
    ds.SharedFunctionalGroupsSequence = [group(PixelValueTransformationSequence=CT_RESCALE)]
    ds.PerFrameFunctionalGroupsSequence = [group(PlanePositionSequence={"ImagePositionPatient": [0, 0, z]})
                                           for z in (20, 0, 10)]
    np.testing.assert_array_equal(read_volume(save(ds, tmp_path / "enhanced.dcm")), [[[0]], [[128]], [[255]]])


def test_missing_pixel_data(tmp_path):
    ds = dicom(np.zeros((2, 2), np.uint16))
    del ds.PixelData
    path = save(ds, tmp_path / "a.dcm")
    assert read_error(path) == f"{path}: DICOM has no pixel data"


def test_compressed_dicom_without_decoder_names_the_package(tmp_path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    ds = dicom(np.zeros((2, 2), np.uint16))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 12])
    message = read_error(save(ds, tmp_path / "jls.dcm"))
    assert message.endswith('needs pylibjpeg-libjpeg: pip install "respiscan[dicom]"')


def test_compressed_dicom_with_an_installed_decoder(tmp_path):
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG baseline decoder installed")
    grey = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=100)
    ds = dicom(grey, modality="DX")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([(tmp_path / "a.jpg").read_bytes()])
    out = read_image(save(ds, tmp_path / "jpeg.dcm"))
    assert np.abs(out.astype(int) - grey).max() <= 4


def test_dicom_without_preamble_is_read_by_suffix(tmp_path):
    ds = dicom(hu_slice([[-1350, 150]]), **CT_RESCALE)
    del ds.file_meta
    ds.save_as(tmp_path / "old.dcm", implicit_vr=True, little_endian=True)
    assert (tmp_path / "old.dcm").read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(tmp_path / "old.dcm"), [[0, 255]])


# --- volumes -----------------------------------------------------------------------------------------------

def _ras_volume() -> tuple[np.ndarray, np.ndarray]:
    """HU in RAS+ (x to the patient's right, y anterior, z superior) with asymmetric markers, and the
    expected (z, rows, columns) uint8: anterior on top, the patient's right on the left, inferior first."""
    hu = np.full((4, 3, 2), -1350.0)  # x, y, z
    hu[3, 2, 0] = 150  # right, anterior, inferior
    hu[0, 0, 1] = -600  # left, posterior, superior
    hu[3, 0, 1] = -975  # right, posterior, superior
    expected = np.zeros((2, 3, 4), np.uint8)
    expected[0, 0, 0] = 255
    expected[1, 2, 3] = 128
    expected[1, 2, 0] = 64
    return hu, expected


def test_nifti_is_shown_radiologically_inferior_first(tmp_path):
    hu, expected = _ras_volume()
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "ras.nii.gz"), expected)
    assert is_volume(tmp_path / "ras.nii.gz")


def test_nifti_orientation_comes_from_the_affine(tmp_path):
    hu, expected = _ras_volume()
    flipped = np.array([[-1, 0, 0, 3], [0, 1, 0, 0], [0, 0, -1, 1], [0, 0, 0, 1]], float)  # L, A, I
    nib.save(nib.Nifti1Image(hu[::-1, :, ::-1].astype(np.float32), flipped), tmp_path / "lai.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "lai.nii"), expected)
    swapped = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # A, R, S
    nib.save(nib.Nifti1Image(hu.transpose(1, 0, 2).astype(np.float32), swapped), tmp_path / "ars.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "ars.nii"), expected)


def test_nifti_scaling_is_applied(tmp_path):
    hu, expected = _ras_volume()
    img = nib.Nifti1Image((hu + 1024).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    assert nib.load(tmp_path / "scaled.nii").dataobj.inter == -1024
    np.testing.assert_array_equal(read_volume(tmp_path / "scaled.nii"), expected)


def test_4d_nifti_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), tmp_path / "4d.nii")
    assert "expected a 3-D CT volume" in read_error(tmp_path / "4d.nii", reader=read_volume)
    assert "read it with read_volume" in read_error(tmp_path / "4d.nii")


def _series(folder: Path, slices: list[np.ndarray], positions, numbers, series_uid: str = "1.2.3",
            orientation=(1, 0, 0, 0, 1, 0), names=None) -> None:
    folder.mkdir(exist_ok=True)
    for i, pixels in enumerate(slices):
        attrs = dict(CT_RESCALE, SeriesInstanceUID=series_uid, ImageOrientationPatient=list(orientation))
        if positions is not None:
            attrs["ImagePositionPatient"] = [0, 0, positions[i]]
        if numbers is not None:
            attrs["InstanceNumber"] = numbers[i]
        save(dicom(pixels, **attrs), folder / (names[i] if names else f"{i}.dcm"))


def test_dicom_series_is_sorted_by_position(tmp_path):
    _series(tmp_path / "s", [hu_slice([[v]]) for v in (150, -1350, -600)], positions=[10, -5, 0],
            numbers=[1, 2, 3], names=["a.dcm", "b.dcm", "IM0003"])
    ds = Dataset()  # a DICOM file that is not an image (like DICOMDIR) is skipped
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", "1.2"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    save(ds, tmp_path / "s" / "DICOMDIR")
    (tmp_path / "s" / "notes.txt").write_text("not a slice")
    (tmp_path / "s" / "._a.dcm").write_bytes(b"\0\5\26\7 macOS resource fork")
    assert is_volume(tmp_path / "s")
    np.testing.assert_array_equal(read_volume(tmp_path / "s"), [[[0]], [[128]], [[255]]])


def test_dicom_series_falls_back_to_instance_number(tmp_path):
    _series(tmp_path / "s", [hu_slice([[v]]) for v in (150, -1350, -600)], positions=None, numbers=[3, 1, 2])
    np.testing.assert_array_equal(read_volume(tmp_path / "s"), [[[0]], [[128]], [[255]]])


def test_dicom_series_refuses_mixed_series_and_sizes(tmp_path):
    _series(tmp_path / "s", [hu_slice([[0]])], positions=[0], numbers=[1], names=["a.dcm"])
    _series(tmp_path / "s", [hu_slice([[0]])], positions=[1], numbers=[2], series_uid="4.5.6", names=["b.dcm"])
    assert "mixes 2 DICOM series" in read_error(tmp_path / "s", reader=read_volume)
    _series(tmp_path / "t", [hu_slice([[0]]), hu_slice([[0, 0]])], positions=[0, 1], numbers=None)
    assert "slices differ in size (1x1, 1x2)" in read_error(tmp_path / "t", reader=read_volume)
    (tmp_path / "empty").mkdir()
    assert "no DICOM images" in read_error(tmp_path / "empty", reader=read_volume)


def test_dicom_series_matches_the_same_scan_as_nifti(tmp_path):
    hu, expected = _ras_volume()
    # DICOM is LPS: a standard axial slice's column index runs to the patient's left (-x in RAS), rows run
    # posterior (-y in RAS)
    stored = [hu[::-1, ::-1, k].T for k in range(hu.shape[2])]
    _series(tmp_path / "standard", [hu_slice(s) for s in stored], positions=[0, 1], numbers=None)
    np.testing.assert_array_equal(read_volume(tmp_path / "standard"), expected)
    # the same scan stored rotated by 180 degrees in-plane
    _series(tmp_path / "rotated", [hu_slice(s[::-1, ::-1]) for s in stored], positions=[0, 1], numbers=None,
            orientation=(-1, 0, 0, 0, -1, 0))
    np.testing.assert_array_equal(read_volume(tmp_path / "rotated"), expected)
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), tmp_path / "ras.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "ras.nii"), expected)


def test_read_volume_refuses_flat_images(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((2, 2), np.uint8))
    assert "not a volume" in read_error(tmp_path / "a.png", reader=read_volume)
    assert not is_volume(tmp_path / "a.png")
    assert not is_volume(tmp_path / "missing.dcm")


# --- properties --------------------------------------------------------------------------------------------

def _only_grey_uint8_or_read_error(path: Path) -> None:
    try:
        out = read_image(path)
    except RespiscanError as exc:
        assert isinstance(exc, ImageReadError) and str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        return
    assert out.dtype == np.uint8 and out.ndim == 2


_MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"MM\x00*", b"\0" * 128 + b"DICM"]


@HYPOTHESIS
@given(prefix=st.sampled_from(_MAGIC), data=st.binary(max_size=600), suffix=st.sampled_from([".png", ".jpg", ".dcm"]))
def test_random_bytes_never_escape_as_other_errors(tmp_path, prefix, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(prefix + data)
    _only_grey_uint8_or_read_error(path)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> list[tuple[str, bytes]]:
    """(suffix, bytes) of small valid files of every kind, to corrupt."""
    folder = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65535, (9, 7), dtype=np.uint16)
    files = []
    for i, (suffix, pixels) in enumerate([(".png", deep), (".png", deep >> 8), (".jpg", (deep >> 8).astype(np.uint8)),
                                          (".tif", deep), (".bmp", np.dstack([deep >> 8] * 3).astype(np.uint8))]):
        cv2.imwrite(str(folder / f"{i}{suffix}"), pixels)
        files.append((suffix, (folder / f"{i}{suffix}").read_bytes()))
    attrs = dict(CT_RESCALE, WindowCenter=40, WindowWidth=400, ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    for i, pixels in enumerate([deep.astype(np.int16), np.stack([deep] * 3)]):
        files.append((".dcm", save(dicom(pixels, **attrs), folder / f"{i}.dcm").read_bytes()))
    nib.save(nib.Nifti1Image(np.dstack([deep] * 2).astype(np.int16), np.eye(4)), folder / "a.nii.gz")
    files.append((".nii.gz", (folder / "a.nii.gz").read_bytes()))
    return files


@HYPOTHESIS
@given(choice=st.integers(0, 7), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_corrupted_files_never_escape_as_other_errors(tmp_path, valid_files, choice, edits, cut):
    suffix, data = valid_files[choice]
    data = bytearray(data)
    for position, value in edits:
        data[position % len(data)] = value
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(bytes(data[:None if cut is None else cut % (len(data) + 1)]))
    for reader, ndim in ((read_image, 2), (read_volume, 3)):
        try:
            out = reader(path)
        except ImageReadError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        else:
            assert out.dtype == np.uint8 and out.ndim == ndim
    is_volume(path)


_WRITERS = [  # (library, suffix, dtype, channels)
    ("cv2", ".png", np.uint8, 1), ("cv2", ".png", np.uint8, 3), ("cv2", ".png", np.uint8, 4),
    ("cv2", ".png", np.uint16, 1), ("cv2", ".png", np.uint16, 3), ("cv2", ".png", np.uint16, 4),
    ("cv2", ".tif", np.uint16, 3), ("cv2", ".tif", np.float32, 1), ("cv2", ".tif", np.int16, 1),
    ("cv2", ".bmp", np.uint8, 3), ("cv2", ".jpg", np.uint8, 1), ("cv2", ".jpg", np.uint8, 3),
    ("pil", ".png", np.uint8, 2), ("pil", ".png", np.uint16, 1), ("pil", ".png", np.bool_, 1),
    ("pil", ".tif", np.float32, 1), ("pil", ".tif", np.int32, 1), ("pil", ".bmp", np.uint8, 1),
    ("pil", ".jpg", np.uint8, 3), ("pil", ".tif", np.uint8, 4),
]


@st.composite
def _written_images(draw):
    library, suffix, dtype, channels = draw(st.sampled_from(_WRITERS))
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12))) + ((channels,) if channels > 1 else ())
    elements = st.floats(width=32) if dtype == np.float32 else None  # NaN and +-inf included
    return library, suffix, draw(hnp.arrays(dtype, shape, elements=elements))


@HYPOTHESIS
@given(image=_written_images())
def test_any_written_image_reads_as_grey_uint8_of_its_shape(tmp_path, image):
    library, suffix, pixels = image
    path = tmp_path / f"image{suffix}"
    if library == "cv2":
        assert cv2.imwrite(str(path), pixels)
    else:
        Image.fromarray(pixels).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == pixels.shape[:2]
    if suffix in (".png", ".bmp") and pixels.dtype == np.uint8 and pixels.ndim == 2:
        np.testing.assert_array_equal(out, pixels)


@HYPOTHESIS
@given(pixels=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int16]), hnp.array_shapes(min_dims=2, max_dims=2,
                                                                                             max_side=8)),
       photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2"]), modality=st.sampled_from(["CT", "DX"]),
       slope=st.sampled_from([None, 1.0, 0.5, 2.0]), window=st.sampled_from([None, (40, 400), (2000, 1)]))
def test_any_dicom_reads_as_grey_uint8_of_its_shape(tmp_path, pixels, photometric, modality, slope, window):
    attrs = {}
    if slope is not None:
        attrs.update(RescaleSlope=slope, RescaleIntercept=-1024)
    if window is not None:
        attrs.update(WindowCenter=window[0], WindowWidth=window[1])
    path = save(dicom(pixels, modality=modality, photometric=photometric, **attrs), tmp_path / "a.dcm")
    for requested in (None, "xray", "ct"):
        out = read_image(path, modality=requested)
        assert out.dtype == np.uint8 and out.shape == pixels.shape
