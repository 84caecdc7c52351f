"""Synthetic chest X-rays and axial CT slices with planted COVID-like ground-glass opacities.

Real COVID data sets cannot ship with the package, so the demo and the tests run on these phantoms. Each
image is drawn analytically (soft-edged ellipses, periodic rib bands, a few cv2 lines for vessels) in a
canonical frame, then jittered by a small random affine warp, so anatomy varies from case to case. COVID
cases get 1-4 hazy peripheral patches, some faint; about 30% of Non-COVID cases get a confounder (a dense
sharp-edged lobar consolidation or a small nodule), so that "any brightness in the lung" does not separate
the classes and a model has to learn what the opacity looks like and where it sits.

With `sites`, the same phantoms are rendered by several synthetic hospitals, each with its own look (intensity
profile, noise, blur, frame, burned-in text, field of view, file format), one folder per site; `confound` skews
each site's COVID share, so a model can score by recognising the site: the test bed for methods against that.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from respiscan.data.samples import CLASS_NAMES, MANIFEST_NAME, MODALITIES
from respiscan.errors import RespiscanError
from respiscan.utils import write_json

_LAYOUT_PREFIX = {"xray": "X_Ray", "ct": "CT_Scan"}
_MIN_SIZE = 32
_OTHER_FINDING_RATE = 0.3


# --- drawing primitives (all in normalised coordinates: x right, y down, both in [0, 1]) ---------------

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, cached because every shape of every image needs them."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    X, Y = np.meshgrid(axis, axis)
    X.flags.writeable = Y.flags.writeable = False
    return X, Y


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 across a band of `width` centred on x = 0: a soft edge, so shapes look like blurred anatomy."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float | np.ndarray,
             angle: float = 0.0, edge: float = 0.05, power: float = 2.0) -> np.ndarray:
    """Soft (super-)ellipse: 1 inside, 0 outside, edge width `edge` in units of the radius."""
    dx, dy = X - float(cx), Y - float(cy)  # Python floats keep the maths in float32
    if angle:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        dx, dy = c * dx + s * dy, c * dy - s * dx
    u, v = dx / rx, dy / ry
    q = u * u + v * v if power == 2.0 else np.abs(u) ** power + np.abs(v) ** power
    return _ramp((1.0 - q) / power, edge)  # (1 - r**p) / p ~ 1 - r at the rim, and needs no root


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise of roughly unit amplitude: uneven exposure, tissue texture, haze."""
    small = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=max(sigma_px, 0.3))


def _px(points: np.ndarray, size: int) -> np.ndarray:
    """Normalised points -> cv2 fixed-point pixel coordinates (shift=4), for sub-pixel placement."""
    return np.rint((np.asarray(points) * size - 0.5) * 16).astype(int)


def _lines(size: int, segments: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Anti-aliased line segments (start, end, width as a fraction of the image) as a float layer in [0, 1]."""
    canvas = np.zeros((size, size), np.uint8)
    if segments:
        starts, ends, widths = zip(*segments)
        thickness = np.maximum(1, np.rint(np.array(widths) * size)).astype(int).tolist()
        for a, b, t in zip(_px(starts, size).tolist(), _px(ends, size).tolist(), thickness):
            cv2.line(canvas, a, b, 255, t, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / 255.0


def _vessel_tree(start: np.ndarray, angle: float, length: float, width: float, depth: int,
                 rng: np.random.Generator, out: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
    """Branching segments radiating from a hilum: the lung markings on an X-ray."""
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    out.append((start, end, width))
    if depth > 0:
        for turn in (-1, 1):
            _vessel_tree(end, angle + turn * rng.uniform(0.2, 0.55), length * rng.uniform(0.6, 0.85),
                         width * 0.7, depth - 1, rng, out)


def _warp(images: list[np.ndarray], rng: np.random.Generator, max_deg: float, scale: tuple[float, float],
          shift: float) -> list[np.ndarray]:
    """One random rotation/scale/shift applied to image and mask alike: patient positioning varies."""
    size = images[0].shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-max_deg, max_deg), rng.uniform(*scale))
    matrix[:, 2] += rng.uniform(-shift, shift, 2) * size
    return [cv2.warpAffine(im, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            for im in images]


# --- findings, shared by both modalities --------------------------------------------------------------

def _pick(lung: np.ndarray, lo_px: float, hi_px: float, prefer: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """A random lung point `lo_px`..`hi_px` from the lung edge, drawn with weights `prefer`."""
    size = lung.shape[0]
    dist = cv2.distanceTransform((lung > 0.5).astype(np.uint8), cv2.DIST_L2, 3).ravel()
    candidates = np.flatnonzero((dist >= lo_px) & (dist <= hi_px))
    if candidates.size == 0:
        candidates = np.flatnonzero(dist > 0)
    weight = prefer.ravel()[candidates].astype(np.float64)
    i = candidates[rng.choice(candidates.size, p=weight / weight.sum())]
    return np.array([(i % size + 0.5) / size, (i // size + 0.5) / size])


def _blob(size: int, center: np.ndarray, r: float, lobules: int, rng: np.random.Generator) -> np.ndarray:
    """Filled, overlapping random ellipses (uint8 layer, 255 inside): the outline of an irregular lesion."""
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(lobules):
        offset = rng.uniform(-0.6, 0.6, 2) * r if lobules > 1 else 0.0  # a single lobule sits on the centre
        xy = _px(center + offset, size).tolist()
        axes = np.rint(rng.uniform(0.5, 0.9, 2) * r * size * 16).astype(int).tolist()
        cv2.ellipse(canvas, xy, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
    return canvas


def _ggo(lung: np.ndarray, prefer: np.ndarray, amp: tuple[float, float], radius: tuple[float, float],
         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-4 hazy peripheral patches: (brightness to add, bool mask). Clipped to the lung like real subpleural GGO."""
    size = lung.shape[0]
    haze = 0.7 + 0.3 * np.tanh(_smooth_noise(size, max(4, size // 10), rng))
    add = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 5)):
        r = max(rng.uniform(*radius), 3.0 / size)
        center = _pick(lung, 0.3 * r * size, 1.2 * r * size, prefer, rng)
        field = _blur(_blob(size, center, r, rng.integers(2, 5), rng).astype(np.float32) * haze, 0.4 * r * size)
        field *= lung
        field /= max(float(field.max()), 1e-6)
        add = np.maximum(add, rng.uniform(*amp) * field)
        mask |= (field > 0.4) & (lung > 0.5)
    return add, mask


def _consolidation(lung: np.ndarray, hilum: np.ndarray, prefer: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A sharp-edged dense region filling part of one lobe, bounded by a fissure: (region, air bronchograms)."""
    size = lung.shape[0]
    X, Y = _grid(size)
    center = _pick(lung, 0.05 * size, size, prefer, rng)
    fissure = center[1] - rng.uniform(0.02, 0.08) + rng.uniform(-0.5, 0.5) * (X - center[0])
    linear = _ellipse(X, Y, center[0], center[1] + 0.05, rng.uniform(0.12, 0.28), rng.uniform(0.12, 0.25),
                      rng.uniform(0, np.pi), edge=1.0)  # ~ 1.5 - r near the rim: room for a ragged outline
    fill = _ramp(linear - 0.5 + 0.15 * _smooth_noise(size, 8, rng), 0.08)
    region = _ramp(lung - 0.5, 0.25) * _ramp(Y - fissure, 0.006) * fill
    outward = center - hilum
    angle = float(np.arctan2(outward[1], outward[0]))
    segments = []
    for _ in range(rng.integers(2, 4)):
        _vessel_tree(hilum + 0.5 * outward, angle + rng.uniform(-0.6, 0.6), rng.uniform(0.03, 0.06), 0.006, 1,
                     rng, segments)
    return region, _lines(size, segments) * region


def _findings(img: np.ndarray, covid: bool, lungs: tuple[np.ndarray, np.ndarray],
              hila: tuple[np.ndarray, np.ndarray], dense: float, ggo_amp: tuple[float, float],
              ggo_radius: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Plant GGO (COVID) or, for some Non-COVID cases, a confounding consolidation or nodule."""
    size = img.shape[0]
    X, Y = _grid(size)
    lung = np.maximum(*lungs)
    if covid:  # peripheral and lower-zone, as in COVID pneumonia
        add, mask = _ggo(lung, (0.3 + Y) * (np.abs(X - 0.5) + 0.05) ** 2, ggo_amp, ggo_radius, rng)
        return img + add, mask
    mask = np.zeros(img.shape, bool)
    if rng.random() >= _OTHER_FINDING_RATE:
        return img, mask
    level = dense * rng.uniform(0.85, 1.05)
    if rng.random() < 0.6:
        side = rng.integers(2)
        region, bronchi = _consolidation(lungs[side], hila[side], (0.3 + Y) ** 2, rng)
        return img + (level - img) * rng.uniform(0.7, 1.0) * (region - 0.4 * bronchi), mask
    r = max(rng.uniform(0.01, 0.025), 1.5 / size)
    center = _pick(lung, r * size + 2, size, np.ones_like(lung), rng)
    nodule = _blur(_blob(size, center, r, 1, rng).astype(np.float32) / 255, 0.6 * size / 224) * lung
    return img + (level - img) * nodule, mask


def _finish(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            warp: tuple[float, tuple[float, float], float], noise: tuple[float, float],
            blur: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Positioning warp, contrast/gamma, blur and detector noise, then quantise to uint8."""
    size = img.shape[0]
    img, warped = _warp([img, mask.astype(np.float32)], rng, *warp)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.2)
    grain = rng.uniform(*noise) * min(1.0, size / 224)  # small images look like downsampled 224-px ones
    img = _blur(img + grain * rng.standard_normal(img.shape, dtype=np.float32), rng.uniform(*blur) * size / 224)
    img += 0.4 * grain * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), warped > 0.5


# --- the two modalities --------------------------------------------------------------------------------

def _xray(covid: bool, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """PA chest radiograph: bright body and bones, dark lungs, ribs, heart, diaphragm, film noise."""
    X, Y = _grid(size)
    mid = 0.5 + rng.uniform(-0.015, 0.015)
    bg, tissue = rng.uniform(0.03, 0.1), rng.uniform(0.5, 0.6)
    body = np.maximum(_ellipse(X, Y, mid, 0.64, rng.uniform(0.42, 0.47), 0.66, edge=0.04, power=3.0),
                      _ellipse(X, Y, mid, 0.0, 0.13, 0.16, edge=0.1))
    img = bg + (tissue + 0.12 * np.exp(-((X - mid) / 0.25) ** 2) - bg) * body

    top = rng.uniform(0.09, 0.14)
    dome_r = rng.uniform(0.64, 0.72)  # the right hemidiaphragm (image left) sits higher
    dome_l = dome_r + rng.uniform(0.01, 0.05)
    heart_cy = dome_l - rng.uniform(0.05, 0.09)
    heart_x, heart_rx = mid + rng.uniform(0.05, 0.08), rng.uniform(0.16, 0.2)
    heart = _ellipse(X, Y, heart_x, heart_cy, heart_rx, rng.uniform(0.12, 0.15), rng.uniform(-0.4, -0.15),
                     edge=0.06)
    knob_y = top + rng.uniform(0.17, 0.22)
    knob = _ellipse(X, Y, mid + 0.045, knob_y, 0.03, 0.03, edge=0.2)
    # Cardiomediastinal silhouette: narrow above the aortic knob, widening down into the heart.
    down = np.clip((Y - knob_y) / (heart_cy - knob_y), 0, 1)
    band = (_ramp(X - (mid - 0.05 - 0.04 * down), 0.012)
            * _ramp(mid + 0.05 + (heart_x + 0.75 * heart_rx - mid - 0.05) * down ** 1.5 - X, 0.012))
    mediastinum = np.maximum.reduce([band, heart, knob])

    lungs, hila, domes = [], [], []
    for sign, dome_y in ((-1, dome_r), (1, dome_l)):
        cx = mid + sign * rng.uniform(0.19, 0.22)
        rx, ry = rng.uniform(0.15, 0.18), rng.uniform(0.34, 0.4)
        taper = np.clip(0.6 + 0.55 * (Y - top) / (2 * ry), 0.5, 1.2)  # narrow apex, wide base
        dome = dome_y + rng.uniform(2.0, 3.0) * (X - cx) ** 2
        domes.append(np.where(X * sign > mid * sign, dome, np.inf))
        lungs.append(_ellipse(X, Y, cx, top + ry, rx * taper, ry, edge=0.08) * _ramp(dome - Y, 0.008))
        hila.append(np.array([mid + sign * 0.1, heart_cy - rng.uniform(0.18, 0.24)]))
    lungs = tuple(lung * (1 - mediastinum) for lung in lungs)
    lung = np.maximum(*lungs)
    below = _ramp(Y - np.minimum(*domes), 0.01) * body

    lung_val = rng.uniform(0.2, 0.34)
    t = np.abs(X - mid) / 0.42  # lateral distance from the midline
    lung_map = lung_val + 0.08 * (Y - 0.45) + 0.1 * t ** 4 + 0.02 * _smooth_noise(size, 6, rng)
    for hilum in hila:
        lung_map += 0.09 * np.exp(-(((X - float(hilum[0])) / 0.06) ** 2 + ((Y - float(hilum[1])) / 0.09) ** 2))
    segments = []
    for hilum, sign in zip(hila, (-1, 1)):
        for angle in np.linspace(-1.3, 1.4, rng.integers(5, 8)) + rng.normal(0, 0.1):
            direction = angle if sign == 1 else np.pi - angle
            _vessel_tree(hilum, direction, rng.uniform(0.06, 0.09), 0.008, 3, rng, segments)
    lung_map += rng.uniform(0.05, 0.09) * _blur(_lines(size, segments), 0.6 * size / 224)
    img = img + (lung_map - img) * lung * 0.95
    img, mask = _findings(img, covid, lungs, tuple(hila), tissue + 0.05, (0.12, 0.45), (0.05, 0.12), rng)
    img = img + (tissue + 0.1 - img) * below * rng.uniform(0.85, 1.0)
    bubble = _ellipse(X, Y, mid + 0.2, dome_l + 0.06, 0.05, 0.03, edge=0.5) * below
    img -= rng.uniform(0.0, 0.12) * bubble

    # Bones over everything: posterior ribs arc out from the spine, anterior ribs slope down medially.
    spacing = rng.uniform(0.06, 0.072)
    phase = (Y - top + 0.03 - (-0.07 * t + 0.28 * t * t)) / spacing
    posterior = _ramp(0.22 - np.abs(phase - np.floor(phase) - 0.5), 0.08)
    phase = (Y - top - 0.05 - 0.14 * (1 - t)) / (spacing * 1.15)
    anterior = _ramp(0.2 - np.abs(phase - np.floor(phase) - 0.5), 0.1) * _ramp(t - 0.4, 0.15)
    cage = _ellipse(X, Y, mid, top + 0.33, 0.41, 0.38, edge=0.1) * _ramp(t - 0.08, 0.05) * (1 - 0.8 * below)
    img += rng.uniform(0.05, 0.1) * (posterior + 0.45 * anterior) * cage * (0.4 + 0.6 * lung)
    clavicle_y = top + 0.05 - 0.1 * t + 0.07 * t * t
    img += 0.14 * _ramp(0.012 - np.abs(Y - clavicle_y), 0.008) * _ramp(t - 0.1, 0.05) * _ramp(0.85 - t, 0.1)
    spine = _ramp(0.035 - np.abs(X - mid), 0.01) * (0.7 + 0.3 * np.cos(2 * np.pi * Y / 0.055))
    img += 0.06 * spine * (1 - below)
    img -= 0.1 * _ramp(0.018 - np.abs(X - mid), 0.008) * _ramp(top + 0.2 - Y, 0.04)  # trachea

    img = img * (1 + 0.05 * _smooth_noise(size, 4, rng)) + rng.uniform(-0.04, 0.04) * (Y - 0.5)
    return _finish(img, mask, rng, (4.0, (0.92, 1.05), 0.03), (0.01, 0.025), (0.4, 1.0))


def _ct(covid: bool, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Axial chest CT slice (lung-ish window): black air, grey body, dark lungs with bright vessels, spine."""
    X, Y = _grid(size)
    cx, cy = 0.5 + rng.uniform(-0.01, 0.01), 0.5 + rng.uniform(-0.02, 0.02)
    rx, ry = rng.uniform(0.4, 0.45), rng.uniform(0.28, 0.32)
    ry_map = np.where(Y > cy, ry * 0.88, ry)  # the back is flattened by the table
    body = _ellipse(X, Y, cx, cy, rx, ry_map, edge=0.02, power=2.4)
    inner = _ellipse(X, Y, cx, cy, rx - 0.025, ry_map - 0.025, edge=0.03, power=2.4)
    air, fat, muscle = rng.uniform(0.0, 0.03), rng.uniform(0.42, 0.5), rng.uniform(0.56, 0.64)
    img = air + (fat - air) * body + (muscle - fat) * inner + 0.03 * _smooth_noise(size, 8, rng) * inner
    img += 0.25 * (body - _ellipse(X, Y, cx, cy, rx - 0.004, ry_map - 0.004, edge=0.03, power=2.4))  # skin
    table_y = cy + ry * 0.88 + 0.03 + 0.08 * (X - cx) ** 2
    img += 0.3 * _ramp(0.008 - np.abs(Y - table_y), 0.006) * _ramp(0.38 - np.abs(X - cx), 0.02)

    theta = np.arctan2((Y - cy) / ry_map, (X - cx) / rx)
    cage_r = np.sqrt(((X - cx) / (rx * 0.86)) ** 2 + ((Y - cy) / (ry_map * 0.84)) ** 2)
    ribs = _ramp(0.02 - np.abs(cage_r - 1), 0.015) * _ramp(np.cos(rng.integers(9, 13) * theta
                                                                  + rng.uniform(0, 6)) - 0.2, 0.3)
    img += rng.uniform(0.25, 0.35) * ribs * _ramp(np.abs(np.cos(theta)) - 0.15, 0.1)

    vert_y = cy + ry * 0.66
    vertebra = _ellipse(X, Y, cx, vert_y, 0.055, 0.05, edge=0.15)
    canal = _ellipse(X, Y, cx, vert_y + 0.075, 0.022, 0.02, edge=0.2)
    processes = _ramp(0.012 - np.abs(X - cx), 0.006) * _ramp(Y - vert_y, 0.01) * _ramp(vert_y + 0.14 - Y, 0.01)
    processes = np.maximum(processes, _ellipse(X, Y, cx, vert_y + 0.07, 0.075, 0.015, edge=0.2))
    bone = np.maximum(vertebra, processes) * (1 - canal)
    img += (rng.uniform(0.85, 0.95) - img) * bone
    heart = _ellipse(X, Y, cx + rng.uniform(0.02, 0.06), cy - 0.06 + rng.uniform(-0.02, 0.02),
                     rng.uniform(0.12, 0.15), rng.uniform(0.11, 0.14), rng.uniform(-0.6, 0.0), edge=0.06)
    aorta = _ellipse(X, Y, cx + 0.05, vert_y - 0.075, 0.032, 0.032, edge=0.15)
    mediastinum = np.maximum.reduce([heart, aorta, vertebra, canal,
                                     _ellipse(X, Y, cx, cy - 0.02, 0.07, 0.24, edge=0.1)])
    img += 0.05 * aorta

    chest_cavity = _ellipse(X, Y, cx, cy, rx - 0.05, ry_map - 0.05, edge=0.03, power=2.4)  # lungs stay off the wall
    lungs, hila = [], []
    for sign in (-1, 1):
        lx = cx + sign * rng.uniform(0.17, 0.2)
        lungs.append(_ellipse(X, Y, lx, cy + rng.uniform(-0.01, 0.02), rng.uniform(0.13, 0.16),
                              ry * rng.uniform(0.72, 0.8), sign * rng.uniform(-0.1, 0.15), edge=0.04)
                     * (1 - mediastinum) * chest_cavity)
        hila.append(np.array([cx + sign * 0.09, cy]))
    lung = np.maximum(*lungs)

    lung_val = rng.uniform(0.06, 0.12)
    lung_map = lung_val + 0.03 * (Y - cy) / ry + 0.015 * _smooth_noise(size, 10, rng)  # dependent-zone density
    inside = np.flatnonzero(lung.ravel() > 0.5)
    points = np.stack([(inside % size + 0.5) / size, (inside // size + 0.5) / size], axis=1)
    near = np.exp(-np.min([np.hypot(*(points - h).T) for h in hila], axis=0) / 0.12)  # vessels thin outwards
    chosen = rng.choice(len(points), rng.integers(40, 80), p=near / near.sum())
    segments = []
    for p, closeness in zip(points[chosen], near[chosen]):
        width = 0.004 + 0.01 * closeness * rng.uniform(0.5, 1.0)
        outward = p - hila[int(p[0] > cx)]
        direction = outward / max(np.hypot(*outward), 1e-6)
        length = rng.uniform(0.0, 0.035) if rng.random() < 0.5 else 0.0  # dots and short in-plane branches
        segments.append((p, p + length * direction, width))
    vessels = _blur(_lines(size, segments), 0.5 * size / 224)
    lung_map += (muscle * rng.uniform(0.8, 1.0) - lung_map) * vessels
    img = img + (lung_map - img) * lung

    img, mask = _findings(img, covid, tuple(lungs), tuple(hila), muscle, (0.08, 0.35), (0.04, 0.1), rng)
    return _finish(img, mask, rng, (6.0, (0.92, 1.05), 0.03), (0.01, 0.03), (0.4, 0.9))


_DRAW = {"xray": _xray, "ct": _ct}


def make_image(modality: str, covid: bool, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns (grey uint8 image of shape (size, size), bool mask of the planted COVID opacities
    (all False for Non-COVID))."""
    if modality not in _DRAW:
        raise RespiscanError(f"synthetic data: unknown modality {modality!r}; accepted: xray, ct")
    if size < _MIN_SIZE:
        raise RespiscanError(f"synthetic data: image size {size} is too small; use at least {_MIN_SIZE}")
    return _DRAW[modality](bool(covid), int(size), rng)


# --- sites: how one hospital's scanners and export pipeline render every image ----------------------------

_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class SiteLook:
    """One site's rendering of one modality; every field is a cue a model can learn instead of the disease."""
    gamma: float  # intensity profile: offset + contrast * image ** gamma
    contrast: float
    offset: float
    noise: float  # detector noise (sd, intensity in [0, 1])
    blur: float  # Gaussian sigma in pixels of a 224-px image
    zoom: float  # field of view: > 1 crops into the centre
    border_width: float  # frame width as a fraction of the side (0: none)
    border_value: float  # 0 black frame, 1 white
    mark_corner: str | None  # corner of the burned-in text block (None: no text)
    mark_height: float  # text height as a fraction of the side
    jpeg_quality: int | None  # None: lossless PNG


def site_looks(n_sites: int, seed: int) -> list[dict[str, SiteLook]]:
    """Each site's look per modality: every numeric setting spread evenly over its range and shuffled across
    sites, so that any two sites differ in each of them (random draws could make two sites near twins); frame
    colour, text corner and file format cycle through their options."""
    rng = np.random.default_rng([seed, 7919])

    def spread(lo: float, hi: float) -> list[float]:
        return rng.permutation(np.linspace(lo, hi, n_sites)).tolist()

    def cycle(options: tuple) -> list:
        return [options[i % len(options)] for i in rng.permutation(n_sites)]

    looks: list[dict[str, SiteLook]] = [{} for _ in range(n_sites)]
    for modality in MODALITIES:
        settings = zip(spread(0.7, 1.4), spread(0.75, 1.0), spread(0.0, 0.15), spread(0.005, 0.04),
                       spread(0.3, 1.5), spread(1.0, 1.25), spread(0.0, 0.07), cycle((0.0, 1.0)),
                       cycle((None, *_CORNERS)), spread(0.04, 0.08), cycle((None, 70, 90)))
        for look, values in zip(looks, settings):
            look[modality] = SiteLook(*(round(v, 4) if isinstance(v, float) else v for v in values))
    return looks


def _burn_text(img: np.ndarray, look: SiteLook, inset: int, rng: np.random.Generator) -> None:
    """A line of random 5x3 glyphs in the site's corner, like a burned-in name or date."""
    size = img.shape[0]
    height = max(5, round(look.mark_height * size))
    chars = rng.integers(3, 7)
    glyphs = np.zeros((5, 4 * chars - 1), np.uint8)
    for c in range(chars):
        glyphs[:, 4 * c:4 * c + 3] = rng.random((5, 3)) < 0.55
    width = min(size - 2 * inset, round(height * glyphs.shape[1] / 5))
    text = cv2.resize(glyphs, (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    top = inset if look.mark_corner.startswith("top") else size - inset - height
    left = inset if look.mark_corner.endswith("left") else size - inset - width
    img[top:top + height, left:left + width][text] = 1.0


def apply_look(image: np.ndarray, look: SiteLook, rng: np.random.Generator) -> np.ndarray:
    """Render a uint8 phantom the way the site would: field of view, intensity, blur, noise, frame, text."""
    size = image.shape[0]
    img = image.astype(np.float32) / 255.0
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, look.zoom)
    img = cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    img = look.offset + look.contrast * np.clip(img, 0.0, 1.0) ** look.gamma
    img = _blur(img, look.blur * size / 224) + look.noise * rng.standard_normal(img.shape, dtype=np.float32)
    width = round(look.border_width * size)
    if width:
        img[:width], img[-width:], img[:, :width], img[:, -width:] = (look.border_value,) * 4
    if look.mark_corner:
        _burn_text(img, look, width + max(1, round(0.02 * size)), rng)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def covid_shares(n_sites: int, confound: float) -> list[float]:
    """Each site's COVID share: from 0.5 + confound / 2 (site 0) down to 0.5 - confound / 2 (the last), so that
    with two equal sites `confound` is the correlation (phi, Cramer's V) between site and label."""
    return [0.5 + confound / 2 * (1 - 2 * k / (n_sites - 1)) for k in range(n_sites)]


def _patients(n_covid: int, n_non_covid: int, test_fraction: float,
              seed: int | list[int]) -> list[tuple[int, int, str]]:
    """(patient index, label, split) per patient; labels shuffled so ids say nothing. Each class keeps at least
    one test patient, and one train patient, when it has two or more."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat([1, 0], [n_covid, n_non_covid]))
    splits = np.full(labels.size, "train", dtype=object)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        n_test = min(max(1, round(members.size * test_fraction)), members.size - 1)
        if n_test > 0:
            splits[rng.choice(members, n_test, replace=False)] = "test"
    return [(k, int(labels[k]), str(splits[k])) for k in range(labels.size)]


def _write_folder(root: Path, patients: list[tuple[int, int, str]], size: int, seeds: list[int],
                  looks: dict[str, SiteLook] | None, source: str, group_prefix: str, bar: tqdm) -> None:
    """One data folder: the reference layout plus a manifest (group = patient, with an X-ray and a CT each)."""
    rows = []
    for k, label, split in patients:
        for m, modality in enumerate(MODALITIES):
            rng = np.random.default_rng([*seeds, k, m])
            image, _ = make_image(modality, bool(label), size, rng)
            look = looks[modality] if looks else None
            quality = look.jpeg_quality if look else None
            if look:
                image = apply_look(image, look, rng)
            suffix = ".jpg" if quality else ".png"
            rel = f"{_LAYOUT_PREFIX[modality]}_{split.title()}/{CLASS_NAMES[label]}/p{k:04d}{suffix}"
            ok, encoded = cv2.imencode(suffix, image, [cv2.IMWRITE_JPEG_QUALITY, quality] if quality else [])
            if not ok:
                raise RespiscanError(f"{root / rel}: could not encode the image as {suffix[1:].upper()}")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encoded.tobytes())
            rows.append((rel, modality, CLASS_NAMES[label], split, f"{group_prefix}-p{k:04d}", source))
            bar.update()
    with open(root / MANIFEST_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "modality", "label", "split", "group", "source"])
        writer.writerows(sorted(rows))


def generate(out: str | Path, n_per_class: int, size: int = 224, seed: int = 0, test_fraction: float = 0.25,
             progress: bool = True, sites: int = 0, confound: float = 0.0) -> Path:
    """Writes the reference folder layout under `out` and returns `out`.

    With `sites` >= 2, writes one such folder per site instead (out/site0, out/site1, ..., each with
    2 * n_per_class patients, its own look and a manifest whose source is the site), and out/sites.json with
    each site's look and COVID share (see `covid_shares` for `confound`).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RespiscanError(f"{out}: already exists and is not an empty folder; choose a new or empty folder")
    if n_per_class < 2:
        raise RespiscanError(f"synthetic data: n_per_class={n_per_class}; need at least 2 (one train, one test)")
    if not 0.0 <= test_fraction < 1.0:
        raise RespiscanError(f"synthetic data: test_fraction={test_fraction}; must be in [0, 1)")
    if seed < 0:
        raise RespiscanError(f"synthetic data: seed={seed}; must be 0 or more")
    if sites < 0:
        raise RespiscanError(f"synthetic data: sites={sites}; must be 0 or more")
    if not 0.0 <= confound <= 1.0:
        raise RespiscanError(f"synthetic data: confound={confound}; must be in [0, 1]")
    if confound and sites < 2:
        raise RespiscanError(f"synthetic data: confound={confound} needs at least 2 sites (sites={sites})")
    out.mkdir(parents=True, exist_ok=True)
    n = 2 * n_per_class
    if sites < 2:
        with tqdm(total=n * len(MODALITIES), desc="synthetic images", unit="img", disable=not progress) as bar:
            _write_folder(out, _patients(n_per_class, n_per_class, test_fraction, seed), size, [seed], None,
                          "synthetic", "synth", bar)
        return out
    names = [f"site{k:0{len(str(sites - 1))}d}" for k in range(sites)]
    looks, shares = site_looks(sites, seed), covid_shares(sites, confound)
    written = {}
    with tqdm(total=sites * n * len(MODALITIES), desc="synthetic images", unit="img", disable=not progress) as bar:
        for k, (name, look, share) in enumerate(zip(names, looks, shares)):
            n_covid = round(n * share)
            patients = _patients(n_covid, n - n_covid, test_fraction, [seed, k + 1])
            (out / name).mkdir()
            _write_folder(out / name, patients, size, [seed, k + 1], look, name, name, bar)
            written[name] = {"covid_share": n_covid / n, "looks": {m: asdict(v) for m, v in look.items()}}
    write_json(out / "sites.json", {"confound": confound, "seed": seed, "sites": written})
    return out
