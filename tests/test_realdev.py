"""Checks on the real images in ../shared/data/realdev (skipped where the folder is absent)."""

from collections import Counter

import numpy as np
import pytest

from conftest import REALDEV
from respiscan.data.images import load_dataset_images
from respiscan.data.preprocess import PreprocessConfig
from respiscan.data.samples import carve_validation, discover

pytestmark = pytest.mark.skipif(not REALDEV.is_dir(), reason="../shared/data/realdev is absent")


def test_reference_layout_and_manifest_agree(tmp_path):
    from_manifest = discover(REALDEV)
    counts = Counter((s.modality, s.split, s.label) for s in from_manifest)
    assert counts == {("xray", "train", 1): 400, ("xray", "train", 0): 400, ("xray", "test", 1): 100,
                      ("xray", "test", 0): 100, ("ct", "train", 1): 275, ("ct", "train", 0): 316,
                      ("ct", "test", 1): 73, ("ct", "test", 0): 80}
    for split_dir in ("X_Ray_Train", "X_Ray_Test", "CT_Scan_Train", "CT_Scan_Test"):
        (tmp_path / split_dir).symlink_to(REALDEV / split_dir)  # the folders without the manifest
    layout_only = discover(tmp_path)
    assert {(s.id, s.label, s.split) for s in layout_only} == {(s.id, s.label, s.split) for s in from_manifest}


def test_validation_keeps_ct_papers_together():
    carved = carve_validation(discover(REALDEV), 0.15, seed=0)
    ct = [s for s in carved if s.modality == "ct"]
    val_groups = {s.group for s in ct if s.split == "val"}
    assert val_groups and not val_groups & {s.group for s in ct if s.split == "train"}


def test_real_png_and_jpeg_images_read_and_preprocess():
    samples = discover(REALDEV)
    picked = [s for s in samples if s.modality == "xray"][:4] + \
        [s for s in samples if s.modality == "ct" and s.path.suffix.lower() in (".jpg", ".jpeg")][:4] + \
        [s for s in samples if s.modality == "ct" and s.path.suffix.lower() == ".png"][:4]
    images, kept, skipped = load_dataset_images(picked, PreprocessConfig(size=224), desc="realdev")
    assert not skipped and images.shape == (len(picked), 224, 224) and images.dtype == np.uint8
    assert all(img.std() > 10 for img in images)  # real content, not a blank or saturated image
