import cv2
import numpy as np
import pytest

from respiscan.data.preprocess import PreprocessConfig, preprocess
from respiscan.errors import RespiscanError


def _image(h=300, w=200, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (9, 9), 3)


def test_xray_is_clahe_then_resize():
    img = _image()
    expected = cv2.resize(cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8)).apply(img), (224, 224),
                          interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(preprocess(img, "xray", 224), expected)


def test_ct_adds_2x2_opening_and_upsizes_linearly():
    img = _image(100, 120)
    clahe = cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8)).apply(img)
    opened = cv2.morphologyEx(clahe, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    assert not np.array_equal(opened, clahe)
    expected = cv2.resize(opened, (224, 224), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(preprocess(img, "ct", 224), expected)


def test_config_apply_matches_function_and_round_trips():
    cfg = PreprocessConfig(size=96, clahe_clip=2.0)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    img = _image()
    np.testing.assert_array_equal(cfg.apply(img, "ct"), preprocess(img, "ct", 96, clahe_clip=2.0))
    assert cfg.apply(img, "xray").shape == (96, 96)


@pytest.mark.parametrize("bad", [np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.float32)])
def test_rejects_non_grey_uint8(bad):
    with pytest.raises(RespiscanError):
        preprocess(bad, "xray", 64)


def test_rejects_unknown_modality():
    with pytest.raises(RespiscanError, match="modality"):
        preprocess(_image(), "mri", 64)
