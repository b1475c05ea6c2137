"""The embedded source domain: ten classes of shapes and textures the project draws itself.

`shapes_domain()` renders 32x32 RGB images (five shapes, a ring, three textures and a soft blob),
each with a random colour, size, aspect, rotation and position on a random textured background,
plus pixel noise. Rendering is vectorised numpy, deterministic (fixed seeds; train and test from
different ones) and prefix-stable: images come in chunks of `_CHUNK`, each from its own seed, so
`shapes_domain(n_train=20000).train` starts with `shapes_domain().train`. The embedded ViT
(`engine.embedded`) was pre-trained on it.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .splits import Domain, Split

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "stripes", "checker", "dots", "blob")
IMAGE_SIZE = 32
_TRAIN_SEED, _TEST_SEED = 20240601, 20240602  # never reused elsewhere: the test split is unseen
_CHUNK = 1000                                  # images per seed; a multiple of the class count
_MAX_ROTATION = np.pi / 6                      # +-30 degrees: a square stays a square, not a diamond


def shapes_domain(n_train: int = 5000, n_test: int = 1000) -> Domain:
    """The embedded source domain: `n_train` / `n_test` images, classes balanced per 1,000.

    The arrays are cached and shared between calls (do not write into them); the Domain and
    Split objects are new on every call, so a caller may replace their fields freely.
    """
    train_images, train_labels = _render(n_train, _TRAIN_SEED)
    test_images, test_labels = _render(n_test, _TEST_SEED)
    return Domain("shapes", list(CLASSES),
                  Split(labels=train_labels, images=train_images),
                  Split(labels=test_labels, images=test_images))


@functools.lru_cache(maxsize=8)
def _render(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) uint8 images and (n,) int64 labels, from whole chunks cut to n."""
    if n < 0:
        raise ValueError(f"number of images must be >= 0, got {n}")
    chunks = [_render_chunk(np.random.default_rng([seed, i])) for i in range(math.ceil(n / _CHUNK))]
    if not chunks:
        return (np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), np.zeros(0, np.int64))
    images = np.concatenate([c[0] for c in chunks])[:n]
    labels = np.concatenate([c[1] for c in chunks])[:n]
    images.flags.writeable = False  # shared by every caller through the cache
    labels.flags.writeable = False
    return images, labels


def _render_chunk(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    m = _CHUNK
    labels = rng.permutation(np.arange(m) % len(CLASSES)).astype(np.int64)

    # Object geometry. `scale` is the object's radius as a fraction of the half image (16 px).
    scale = rng.uniform(0.5, 0.85, m).astype(np.float32)
    aspect = np.exp(rng.uniform(-0.15, 0.15, m)).astype(np.float32)
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, m).astype(np.float32)
    reach = 1.0 - 0.75 * scale                        # centres keep most of the object in view
    tx = rng.uniform(-1, 1, m).astype(np.float32) * reach
    ty = rng.uniform(-1, 1, m).astype(np.float32) * reach
    period = rng.uniform(0.55, 0.8, m).astype(np.float32) / np.sqrt(scale / 0.5)  # textures: >= ~4.4 px

    # Pixel centres in [-1, 1], then each image's object frame: (m, 32, 32).
    grid = ((np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / (IMAGE_SIZE / 2) - 1.0)
    x, y = grid[None, None, :], grid[None, :, None]
    dx, dy = x - tx[:, None, None], y - ty[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    sx = (scale * aspect)[:, None, None]
    sy = (scale / aspect)[:, None, None]
    u = (c * dx + s * dy) / sx
    v = (-s * dx + c * dy) / sy

    px = (scale * IMAGE_SIZE / 2)[:, None, None]  # pixels per object unit, for 1-pixel anti-aliasing
    alpha = np.zeros((m, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for k, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == k)
        alpha[idx] = _SHAPES[name](u[idx], v[idx], px[idx], period[idx, None, None])

    image = _background(rng, m)                               # (m, 32, 32, 3)
    bg_mean = image.mean(axis=(1, 2))                          # (m, 3)
    fg = _contrasting_colours(rng, bg_mean)                    # (m, 3)
    shade = 1.0 + rng.uniform(-0.25, 0.25, (m, 1, 1, 1)).astype(np.float32) * v[..., None] / 1.5
    image = image * (1 - alpha[..., None]) + (fg[:, None, None, :] * shade) * alpha[..., None]
    sigma = rng.uniform(0.0, 0.08, (m, 1, 1, 1)).astype(np.float32)
    image = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels


def _background(rng: np.random.Generator, m: int) -> np.ndarray:
    """A colour, a linear gradient to a second colour, and low-frequency colour noise: (m, 32, 32, 3)."""
    base = rng.uniform(0, 1, (m, 3)).astype(np.float32)
    other = np.clip(base + rng.normal(0, 0.25, (m, 3)), 0, 1).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
    grid = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE  # [0, 1]
    ramp = (np.cos(direction)[:, None, None] * (grid[None, None, :] - 0.5)
            + np.sin(direction)[:, None, None] * (grid[None, :, None] - 0.5)) + 0.5  # (m, 32, 32)
    image = base[:, None, None] + (other - base)[:, None, None] * ramp[..., None]
    # Low-frequency noise: a 5x5 grid of random colours, bilinearly upsampled as W G W^T.
    coarse = rng.normal(0, 0.08, (m, 5, 5, 3)).astype(np.float32)
    up = _bilinear_matrix(5, IMAGE_SIZE)                                 # (32, 5)
    image = image + np.einsum("ia,mabc,jb->mijc", up, coarse, up, optimize=True)
    return image


@functools.lru_cache(maxsize=None)
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    mat = np.zeros((n_out, n_in), np.float32)
    mat[np.arange(n_out), lo] += 1 - w
    mat[np.arange(n_out), hi] += w
    return mat


def _contrasting_colours(rng: np.random.Generator, background: np.ndarray, min_distance: float = 0.4):
    """A random colour per image at least `min_distance` (RGB, 0..1) from its background mean."""
    colours = rng.uniform(0, 1, background.shape).astype(np.float32)
    for _ in range(50):
        close = np.linalg.norm(colours - background, axis=1) < min_distance
        if not close.any():
            break
        colours[close] = rng.uniform(0, 1, (int(close.sum()), 3))
    return colours


# Each shape maps object-frame coordinates u, v (the object spans about [-1, 1]) to an alpha in
# [0, 1]. Signed distances (positive inside, in object units) times `px` give pixels; 0.5 + that,
# clipped, is a one-pixel anti-aliased edge. `period` sets the textures' spatial period.

def _edge(distance, px):
    return np.clip(0.5 + distance * px, 0.0, 1.0)


def _circle(u, v, px, period):
    return _edge(0.9 - np.hypot(u, v), px)


def _square(u, v, px, period):
    return _edge(0.78 - np.maximum(np.abs(u), np.abs(v)), px)


def _triangle(u, v, px, period):
    # Equilateral, circumradius 1: inside where every edge's outward normal n has n.p <= 0.5.
    d = None
    for k in range(3):
        a = -np.pi / 2 + 2 * np.pi * k / 3
        dk = 0.5 - (np.cos(a) * u + np.sin(a) * v)
        d = dk if d is None else np.minimum(d, dk)
    return _edge(d, px)


def _star(u, v, px, period):
    # Five points: the boundary radius swings between 0.42 and 1.0 with the polar angle.
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    swing = np.abs(((phi * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2        # 1 at the tips, 0 between
    boundary = 0.42 + 0.58 * swing
    return _edge((boundary - r) * 0.6, px)                             # 0.6: radial gap to distance


def _cross(u, v, px, period):
    arm = 0.28
    horizontal = np.minimum(arm - np.abs(v), 0.95 - np.abs(u))
    vertical = np.minimum(arm - np.abs(u), 0.95 - np.abs(v))
    return _edge(np.maximum(horizontal, vertical), px)


def _ring(u, v, px, period):
    return _edge(0.2 - np.abs(np.hypot(u, v) - 0.72), px)


def _stripes(u, v, px, period):
    wave = np.sin(2 * np.pi * u / period)
    return _edge(0.92 - np.hypot(u, v), px) * _edge(wave * period / (2 * np.pi), px)


def _checker(u, v, px, period):
    wave = np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
    return _edge(0.8 - np.maximum(np.abs(u), np.abs(v)), px) * _edge(wave * period / (2 * np.pi), px)


def _dots(u, v, px, period):
    du = (u / period) % 1.0 - 0.5
    dv = (v / period) % 1.0 - 0.5
    dot = (0.3 - np.hypot(du, dv)) * period
    return _edge(0.92 - np.hypot(u, v), px) * _edge(dot, px)


def _blob(u, v, px, period):
    return np.minimum(np.exp(-(u * u + v * v) / (2 * 0.4 ** 2)) * 1.2, 1.0)


_SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross,
           "ring": _ring, "stripes": _stripes, "checker": _checker, "dots": _dots, "blob": _blob}
