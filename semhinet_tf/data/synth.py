"""Procedural synthetic SEM images: the quickstart's data set and the tests' fixtures.

Why procedural: the project must train, test and demo without any real fab data. Each image is a
physically-motivated SEM frame of a line/space pattern (or a contact-hole array): a height map of the
pattern, optionally altered by one defect, imaged with edge effect, beam blur, shot noise, scan-line
noise, charging and brightness/contrast drift.

Rules the generator keeps so a classifier cannot cheat:
- Pattern and imaging parameters (pitch, duty, orientation, dose, blur, drift, ...) are drawn by
  `_sample_scene` from one distribution that never sees the label; only the defect stream does.
- Every image uses three independent random streams (scene, defect, noise), so a defect image and its
  clean twin (`render_pair`) share pattern *and* noise and differ only where the defect is.
- Defect severity s is drawn per image from Beta(1 + 2(1-d), 1 + 2d) for difficulty d (default 0.5, so
  s ~ Beta(2, 2)): s=0 is barely visible, s=1 obvious. s sets each defect's size and contrast (bridge
  length and height, gap length and depth, crack length and width, residue size/cover/particle count,
  extra edge roughness, scum area and fill). d also widens, for every class alike, the bad-imaging
  tail: lower minimum dose (more shot noise), more beam blur, more scan-line noise.
- Shot noise is Poisson statistics in the normal approximation (variance = mean, rounded to whole
  electrons), so the noise draw of a pixel does not depend on its signal and twins stay aligned.

Labels (generator 1.1): with `labels="visible"` (the default) a defect draw is labelled only if an expert
could see it at the model's input size: each draw is scored against what only the generator knows (the
frame's defect-free twin, a second noise draw of that twin, its edges) and a draw scoring below 1 is redrawn,
the defect only (scene and noise stay). Point defects: the largest Gaussian-smoothed defect-minus-twin
difference over positions and scales, over the noise sigma, against the 99.5th percentile of the same
statistic on twin-vs-twin pairs of normal frames (calibrated per frame size, difficulty and model size).
ler: the imaged roughness of the roughened edges (blur, an ideal edge locator's noise, the model's pixels)
over at least ROUGH_MIN_LENGTH px of edge, against the 99.5th percentile of normal frames under the same
imaging. After MAX_DRAWS failed draws the severity's floor rises to 1, then a new scene is drawn; if no draw
of MAX_SCENES scenes passes, the most visible one is written with its score below 1 (counted). With
`labels="cause"` every draw is labelled: the frames of generator 1.0, byte for byte (kept for old
benchmarks and as a stress set); they are scored all the same.

Determinism: image k of class c is rendered from SeedSequence(seed, spawn_key=(c, k)) with c the index in
`LEAVES`, so the output does not depend on the number of workers, on the chunking, or on which other
classes are generated. Redraw j of a frame's defect uses the stream [defect seed, j]; draw 0 is 1.0's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from semhinet_tf.artifacts.files import OutputError, atomic_write, atomic_write_text
from semhinet_tf.data.decode import DATASET_RECORD

GENERATOR_VERSION = "1.1.1"  # 1.1: the `visible` label rule (the `cause` rule is 1.0's frames); 1.1.1: dataset.json
# also records each SEM frame's pattern (the frames are 1.1.0's, byte for byte)
LEAVES: tuple[str, ...] = ("bogus", "normal", "bridge", "open", "cmp", "crack", "ler", "inc_etch")
DEFECTS: tuple[str, ...] = LEAVES[2:]
DEFAULT_DIFFICULTY = 0.5

__all__ = ["GENERATOR_VERSION", "LEAVES", "DEFECTS", "DEFAULT_DIFFICULTY", "LABEL_RULES", "DEFAULT_LABELS", "LabelRule",
           "Frame", "label_rule", "render", "render_pair", "render_frame", "image_seed", "generate", "label_summary"]


# ====================================================================== scene (label-blind parameters)
@dataclass
class Scene:
    """Pattern and imaging parameters: drawn without knowing the label, identical for every SEM class."""

    size: int
    kind: str  # "lines" or "holes"
    theta: float  # radians; 0 = vertical lines
    pitch: float  # px
    duty: float  # line width / pitch (lines) or hole diameter / pitch (holes)
    offset: float  # px, pattern phase across the lines
    offset_v: float  # px, lattice phase along v (holes)
    stagger: bool  # holes: staggered rows
    rough_sigma: float  # px, natural edge roughness
    rough_corr: float  # px, its correlation length
    cd_sigma: float  # relative line-width / hole-radius variation
    polarity: float  # +1: lines brighter than spaces; -1: darker
    space_level: float
    line_level: float
    edge_gain: float  # edge-effect brightness
    topo_sigma: float  # px, sidewall slope (smooths the height map before the edge effect)
    blur: tuple[float, float]  # px, beam blur (sigma_y, sigma_x)
    dose: float  # electrons per unit signal
    scan_noise: float  # std of row-wise offsets
    jitter_rows: float  # fraction of rows shifted by a pixel (scan jitter)
    charge_grad: tuple[float, float, float]  # linear (y, x) and radial charging gradient
    charge_tail: tuple[float, float]  # (strength, decay per px) of the dark trail after bright edges
    grain: float  # amplitude of material grain texture
    gain: float
    level: float
    drift: tuple[float, float, float]  # row-wise gain drift: linear, sine amplitude, sine phase


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _sample_scene(rng: np.random.Generator, size: int, difficulty: float) -> Scene:
    """All label-independent parameters; the difficulty widens the bad-imaging tail for every class alike."""
    sc = size / 256.0
    kind = "holes" if rng.random() < 0.18 else "lines"
    r = rng.random()
    if kind == "holes":
        theta = float(rng.normal(0.0, 0.02)) + (math.pi / 4 if rng.random() < 0.15 else 0.0)
        pitch = _loguniform(rng, 15.0, 46.0) * sc
        duty = float(rng.uniform(0.42, 0.72))
    else:
        if r < 0.45:
            theta = 0.0
        elif r < 0.85:
            theta = math.pi / 2
        else:
            theta = float(rng.choice([-1.0, 1.0]) * rng.uniform(math.radians(25), math.radians(65)))
        theta += float(rng.normal(0.0, 0.012))  # a frame is never perfectly aligned
        pitch = _loguniform(rng, 10.0, 42.0) * sc
        duty = float(rng.uniform(0.32, 0.62))
    polarity = -1.0 if rng.random() < 0.12 else 1.0
    space = float(rng.uniform(0.12, 0.32))
    line = space + float(rng.uniform(0.12, 0.4))
    if polarity < 0:
        space, line = line, space
    blur_hi = 1.2 + 1.0 * difficulty
    b = float(rng.uniform(0.5, blur_hi)) * sc
    astig = float(rng.uniform(0.65, 1.5)) if rng.random() < 0.15 else 1.0
    dose_lo = 30.0 - 30.0 * difficulty
    return Scene(
        size=size, kind=kind, theta=theta, pitch=pitch, duty=duty,
        offset=float(rng.uniform(0, pitch)), offset_v=float(rng.uniform(0, pitch)), stagger=bool(rng.random() < 0.5),
        rough_sigma=float(rng.uniform(0.15, 0.6)) * sc, rough_corr=float(rng.uniform(3.0, 14.0)) * sc,
        cd_sigma=float(rng.uniform(0.0, 0.035)), polarity=polarity, space_level=space, line_level=line,
        edge_gain=float(rng.uniform(0.45, 1.2)), topo_sigma=float(rng.uniform(0.7, 1.5)) * sc,
        blur=(b * astig, b / astig), dose=_loguniform(rng, max(dose_lo, 4.0), 160.0),
        scan_noise=float(rng.uniform(0.0, 0.015 + 0.03 * difficulty)),
        jitter_rows=float(rng.uniform(0.0, 0.05)) if rng.random() < 0.2 else 0.0,
        charge_grad=(float(rng.normal(0, 0.08)), float(rng.normal(0, 0.08)), float(rng.normal(0, 0.1))),
        charge_tail=((float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.7, 0.95))) if rng.random() < 0.3
                     else (0.0, 0.0)),
        grain=float(rng.uniform(0.0, 0.05)), gain=float(rng.uniform(0.7, 1.0)), level=float(rng.uniform(-0.04, 0.1)),
        drift=(float(rng.normal(0, 0.06)), float(rng.uniform(0, 0.04)), float(rng.uniform(0, 2 * math.pi))),
    )


# ====================================================================== pattern geometry
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the frame centre (cached: every image of a run shares it)."""
    c = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y - c, x - c


def _smooth_rows(rng: np.random.Generator, n: int, length: int,
                 scales: Sequence[tuple[float, float]]) -> np.ndarray:
    """n periodic 1-D Gaussian processes (edge roughness): a weighted sum of Gaussian-correlated components.

    Built in the Fourier domain, one FFT for all rows: each (corr, weight) component has std `weight`.
    """
    spec = np.fft.rfft(rng.standard_normal((n, length), dtype=np.float32), axis=1)
    f2 = np.fft.rfftfreq(length) ** 2
    transfer = np.zeros_like(f2)
    for corr, weight in scales:
        corr = max(corr, 0.5)
        transfer += weight * math.sqrt(2.0 * math.sqrt(math.pi) * corr) * np.exp(-2.0 * math.pi ** 2 * f2 * corr ** 2)
    return np.fft.irfft(spec * transfer, n=length, axis=1).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth unit-ish noise at feature scale `cell` px: a coarse grid upsampled bicubically (cheap clouds)."""
    from PIL import Image

    cell = max(cell, 1.0)
    n = max(2, int(math.ceil(size / cell)) + 3)
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    big = int(round(n * cell))
    z = np.asarray(Image.fromarray(coarse, mode="F").resize((big, big), Image.BICUBIC))
    o = int(cell)
    return np.ascontiguousarray(z[o:o + size, o:o + size])


@dataclass
class Pattern:
    """A rendered pattern plus what a defect needs to edit it in pattern coordinates."""

    scene: Scene
    u: np.ndarray  # across-line coordinate per pixel
    v: np.ndarray  # along-line coordinate per pixel
    height: np.ndarray  # 0 = space / hole bottom, 1 = line top
    yield_map: np.ndarray  # additive material brightness (residue, particles)
    cell: np.ndarray  # line or hole id per pixel
    geo: dict[str, Any]

    def to_xy(self, u: float, v: float) -> tuple[float, float]:
        c, s = math.cos(self.scene.theta), math.sin(self.scene.theta)
        half = (self.scene.size - 1) / 2.0
        return u * c - v * s + half, u * s + v * c + half

    def to_uv(self, x: float, y: float) -> tuple[float, float]:
        c, s = math.cos(self.scene.theta), math.sin(self.scene.theta)
        half = (self.scene.size - 1) / 2.0
        x, y = x - half, y - half
        return x * c + y * s, -x * s + y * c


def _rotated(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(scene.size)
    c, s = np.float32(math.cos(scene.theta)), np.float32(math.sin(scene.theta))
    return xx * c + yy * s, -xx * s + yy * c


def _make_lines(scene: Scene, rng: np.random.Generator) -> Pattern:
    u, v = _rotated(scene)
    half = scene.size * 0.7072 + 2.0
    lo = int(math.floor((-half - scene.offset) / scene.pitch)) - 1
    hi = int(math.ceil((half - scene.offset) / scene.pitch)) + 1
    n = hi - lo + 1
    i = np.floor((u - scene.offset) * np.float32(1 / scene.pitch) + np.float32(0.5))
    cell = (i - lo).astype(np.int32)
    d = u - (np.float32(scene.offset) + i * np.float32(scene.pitch))
    nv = int(2 * half) + 2
    flat = cell * nv + np.clip((v + half).astype(np.int32), 0, nv - 1)  # index into (n, nv) edge profiles
    hw = (0.5 * scene.duty * scene.pitch * (1.0 + rng.normal(0, scene.cd_sigma, n))).astype(np.float32)
    scales = ((scene.rough_corr, 0.75 * scene.rough_sigma), (scene.rough_corr / 4, 0.45 * scene.rough_sigma))
    rough = _smooth_rows(rng, 2 * n, nv, scales)
    geo = {"lo": lo, "n": n, "d": d, "flat": flat, "hw": hw, "rl": rough[:n], "rr": rough[n:], "half": half}
    pat = Pattern(scene, u, v, np.zeros_like(u), np.zeros_like(u), cell, geo)
    pat.height = _line_coverage(pat, geo["rl"], geo["rr"])
    return pat


def _soft_limit(r: np.ndarray, out_lim: np.ndarray, in_lim: np.ndarray) -> np.ndarray:
    """Bound edge excursions smoothly: lines never touch a neighbour nor vanish through roughness alone."""
    pos = out_lim * np.tanh(np.maximum(r, 0) / out_lim)
    neg = in_lim * np.tanh(np.minimum(r, 0) / in_lim)
    return (pos + neg).astype(np.float32)


def _line_coverage(pat: Pattern, rl: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """Anti-aliased line coverage from per-line edge profiles (left edge moves by -rl, right by +rr)."""
    g, sc = pat.geo, pat.scene
    hw = g["hw"][:, None]
    out_lim = np.maximum(0.5 * (sc.pitch / 2 - hw), 0.3)  # a space never closes below half its width
    in_lim = np.maximum(0.34 * hw, 0.3)
    rl = _soft_limit(rl, out_lim, in_lim)
    rr = _soft_limit(rr, out_lim, in_lim)
    hwp = g["hw"].take(pat.cell)
    d = g["d"]
    inside = np.minimum(d + hwp + rl.ravel().take(g["flat"]), hwp + rr.ravel().take(g["flat"]) - d)
    return np.clip(inside + np.float32(0.5), 0.0, 1.0)


def _make_holes(scene: Scene, rng: np.random.Generator) -> Pattern:
    u, v = _rotated(scene)
    px = scene.pitch
    py = scene.pitch * (0.866 if scene.stagger else 1.0)
    half = scene.size * 0.7072 + px
    jlo, jhi = int(math.floor((-half - scene.offset_v) / py)) - 1, int(math.ceil((half - scene.offset_v) / py)) + 1
    ilo, ihi = int(math.floor((-half - scene.offset) / px)) - 2, int(math.ceil((half - scene.offset) / px)) + 2
    ni, nj = ihi - ilo + 1, jhi - jlo + 1
    j = np.floor((v - scene.offset_v) / py + 0.5)
    shift = (np.mod(j, 2) * (px / 2)) if scene.stagger else 0.0
    i = np.floor((u - scene.offset - shift) / px + 0.5)
    du = u - (scene.offset + shift + i * px)
    dv = v - (scene.offset_v + j * py)
    cell = ((i - ilo) * nj + (j - jlo)).astype(np.int32)
    n = ni * nj
    r0 = (0.5 * scene.duty * px * (1.0 + rng.normal(0, scene.cd_sigma, n))).astype(np.float32)
    k = np.arange(2, 6)
    amp = scene.rough_sigma * 0.6 / np.sqrt(k - 1)  # contact holes are rounder than lines are straight
    coef = (rng.normal(0, 1, (n, k.size)) + 1j * rng.normal(0, 1, (n, k.size))) * amp / math.sqrt(2)
    geo = {"ilo": ilo, "jlo": jlo, "nj": nj, "px": px, "py": py, "du": du, "dv": dv, "r0": r0, "coef": coef,
           "r": np.hypot(du, dv)}
    pat = Pattern(scene, u, v, np.zeros_like(u), np.zeros_like(u), cell, geo)
    pat.height = 1.0 - _hole_coverage(pat, r0, coef)
    return pat


def _hole_coverage(pat: Pattern, r0: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Anti-aliased hole coverage: radius r0 plus Fourier harmonics (k = 2, 3, ...) of the edge."""
    g, cell = pat.geo, pat.cell
    r = g["r"]
    inv = 1.0 / np.maximum(r, 1e-3)
    c1, s1 = g["du"] * inv, g["dv"] * inv
    ck, sk = c1, s1
    radius = r0[cell].copy()
    for k in range(coef.shape[1]):
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1  # cos/sin of (k+2)*angle by recurrence
        cc = coef[:, k]
        radius += cc.real.astype(np.float32)[cell] * ck + cc.imag.astype(np.float32)[cell] * sk
    return np.clip(radius - r + 0.5, 0.0, 1.0)


def _hole_center(pat: Pattern, hole: int) -> tuple[float, float]:
    """(u, v) of a hole id (inverse of the lattice index in `_make_holes`)."""
    g, sc = pat.geo, pat.scene
    i, j = divmod(hole, g["nj"])
    i, j = i + g["ilo"], j + g["jlo"]
    shift = (j % 2) * g["px"] / 2 if sc.stagger else 0.0
    return sc.offset + shift + i * g["px"], sc.offset_v + j * g["py"]


def _make_pattern(scene: Scene, rng: np.random.Generator) -> Pattern:
    return _make_holes(scene, rng) if scene.kind == "holes" else _make_lines(scene, rng)


# ====================================================================== defect helpers
def _severity(rng: np.random.Generator, difficulty: float) -> float:
    """0 = barely visible, 1 = obvious; the difficulty moves the mass towards faint defects."""
    return float(rng.beta(1.0 + 2.0 * (1.0 - difficulty), 1.0 + 2.0 * difficulty))


def _interior_point(rng: np.random.Generator, size: int, margin: float = 0.12) -> tuple[float, float]:
    lo, hi = margin * size, (1 - margin) * size
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _stroke(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """Soft mask of a polyline given as dense (x, y) samples 0.5 px apart (bilinear splat + Gaussian)."""
    out = np.zeros((size, size), np.float32)
    if len(points) == 0:
        return out
    sigma = max(width, 0.9) / 2.355
    pad = int(3 * sigma) + 3
    x0 = max(int(points[:, 0].min()) - pad, 0)
    y0 = max(int(points[:, 1].min()) - pad, 0)
    x1 = min(int(points[:, 0].max()) + pad + 2, size)
    y1 = min(int(points[:, 1].max()) + pad + 2, size)
    if x1 <= x0 or y1 <= y0:
        return out
    h, w = y1 - y0, x1 - x0
    px, py = points[:, 0] - x0, points[:, 1] - y0
    ix, iy = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - ix, py - iy
    acc = np.zeros(h * w, np.float64)
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xx, yy = ix + dx, iy + dy
        ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        acc += np.bincount(yy[ok] * w + xx[ok], weights=wgt[ok], minlength=h * w)
    blur = ndimage.gaussian_filter(acc.reshape(h, w).astype(np.float32), sigma)
    peak = 2.0 / (math.sqrt(2 * math.pi) * sigma)  # 2 samples per px along the line
    strength = min(1.0, width / 0.9)
    out[y0:y1, x0:x1] = np.clip(blur * (2.0 / peak), 0.0, 1.0) * strength
    return out


def _densify(vertices: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Resample a polyline so consecutive samples are `step` px apart."""
    seg = np.diff(vertices, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    if cum[-1] <= 0:
        return vertices[:1]
    t = np.arange(0.0, cum[-1], step)
    return np.stack([np.interp(t, cum, vertices[:, 0]), np.interp(t, cum, vertices[:, 1])], axis=1)


def _jagged_path(rng: np.random.Generator, start: tuple[float, float], angle: float, length: float,
                 jag: float) -> np.ndarray:
    """A fracture-like random walk: short straight segments with abrupt direction changes."""
    n = max(2, int(length / 2.5))
    steps = rng.uniform(1.2, 4.0, n)
    drift = np.cumsum(rng.normal(0, 0.06, n))
    ang = angle + drift + rng.normal(0, jag, n)
    verts = np.cumsum(np.stack([steps * np.cos(ang), steps * np.sin(ang)], axis=1), axis=0)
    verts = np.vstack([[0.0, 0.0], verts]) + np.asarray(start)
    return _densify(verts)


def _disk_field(size: int, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased union of small discs (particles, filled holes)."""
    out = np.zeros((size, size), np.float32)
    for (cx, cy), r in zip(centers, radii, strict=True):
        x0, x1 = max(int(cx - r - 2), 0), min(int(cx + r + 3), size)
        y0, y1 = max(int(cy - r - 2), 0), min(int(cy + r + 3), size)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        m = np.clip(r - np.hypot(xx - cx, yy - cy) + 0.5, 0.0, 1.0)
        np.maximum(out[y0:y1, x0:x1], m, out=out[y0:y1, x0:x1])
    return out


def _blob(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """An irregular soft blob (residue patch): a wobbly ellipse with a noisy rim."""
    out = np.zeros((size, size), np.float32)
    ext = radius * 1.6 + 3
    x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, size)
    y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    phi = rng.uniform(0, math.pi)
    aspect = rng.uniform(0.45, 1.0)
    a, b = radius, radius * aspect
    ru = (dx * math.cos(phi) + dy * math.sin(phi)) / a
    rv = (-dx * math.sin(phi) + dy * math.cos(phi)) / b
    rn = np.hypot(ru, rv)
    ang = np.arctan2(rv, ru)
    wob = 1.0 + sum(rng.uniform(0, 0.18) * np.cos(k * ang + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5))
    rim = 0.12 * _smooth_noise(rng, max(y1 - y0, x1 - x0), max(radius / 3, 2.0))[:y1 - y0, :x1 - x0]
    out[y0:y1, x0:x1] = np.clip((wob + rim - rn) * b * 0.8 + 0.5, 0.0, 1.0)
    return out


# ====================================================================== defects
def _bridge(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    """Extra material across one space (lines), or a dark neck merging two contact holes."""
    size = pat.scene.size
    sc = size / 256.0
    n = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
    x, y = _interior_point(rng, size)
    u0, v0 = pat.to_uv(x, y)
    for _ in range(n):
        if pat.scene.kind == "holes":
            _hole_bridge(pat, rng, s, u0, v0)
        else:
            _line_bridge(pat, rng, s, u0, v0, sc)
        u0 += float(rng.choice([-1, 0, 1])) * pat.scene.pitch
        v0 += float(rng.uniform(-3, 3)) * pat.scene.pitch


def _line_bridge(pat: Pattern, rng: np.random.Generator, s: float, u0: float, v0: float, sc: float) -> None:
    sce, g = pat.scene, pat.geo
    i = int(math.floor((u0 - sce.offset) / sce.pitch))
    a, b = i - g["lo"], i + 1 - g["lo"]
    if not (0 <= a and b < g["n"]):
        return
    left = sce.offset + i * sce.pitch + g["hw"][a]
    right = sce.offset + (i + 1) * sce.pitch - g["hw"][b]
    mid, half_space = (left + right) / 2, (right - left) / 2 + 1.5
    half_len = min((0.9 + 7.0 * s ** 1.5 + rng.uniform(0, 1.5 * s)) * sc, 1.5 * sce.pitch)
    height = min(1.0, 0.55 + 0.45 * min(1.0, 1.8 * s + rng.uniform(0, 0.3)))
    pinch = rng.uniform(0.0, 0.6)
    t = (pat.u - mid) / half_space
    inside_u = np.clip((1 - np.abs(t)) * half_space + 0.5, 0, 1)
    length = half_len * np.maximum(1 - pinch * (1 - np.minimum(t * t, 1)), 0.35)
    inside_v = np.clip(length - np.abs(pat.v - v0) + 0.5, 0, 1)
    np.maximum(pat.height, height * inside_u * inside_v, out=pat.height)


def _hole_bridge(pat: Pattern, rng: np.random.Generator, s: float, u0: float, v0: float) -> None:
    g = pat.geo
    hole = _nearest_hole(pat, u0, v0)
    if hole is None:
        return
    cu, cv = _hole_center(pat, hole)
    px, py = g["px"], g["py"]
    steps = ([(px, 0), (-px, 0), (px / 2, py), (-px / 2, py), (px / 2, -py), (-px / 2, -py)] if pat.scene.stagger
             else [(px, 0), (-px, 0), (0, py), (0, -py)])
    su, sv = steps[int(rng.integers(0, len(steps)))]
    nu, nv = cu + su, cv + sv
    r0 = float(g["r0"][hole])
    width = r0 * (0.15 + 0.8 * s)
    depth = 0.55 + 0.45 * min(1.0, 1.6 * s + rng.uniform(0, 0.3))
    du, dv = nu - cu, nv - cv
    seg2 = du * du + dv * dv
    t = np.clip(((pat.u - cu) * du + (pat.v - cv) * dv) / seg2, 0, 1)
    dist = np.hypot(pat.u - (cu + t * du), pat.v - (cv + t * dv))
    neck = np.clip(width - dist + 0.5, 0, 1)
    np.minimum(pat.height, 1 - depth * neck, out=pat.height)


def _nearest_hole(pat: Pattern, u0: float, v0: float) -> int | None:
    x, y = pat.to_xy(u0, v0)
    size = pat.scene.size
    xi, yi = int(np.clip(round(x), 0, size - 1)), int(np.clip(round(y), 0, size - 1))
    return int(pat.cell[yi, xi])


def _open(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    """A break in a line (rounded line ends), or a contact hole that did not open."""
    size = pat.scene.size
    sc = size / 256.0
    n = 1 if rng.random() < 0.85 else 2
    x, y = _interior_point(rng, size)
    u0, v0 = pat.to_uv(x, y)
    for _ in range(n):
        if pat.scene.kind == "holes":
            hole = _nearest_hole(pat, u0, v0)
            if hole is not None:
                cu, cv = _hole_center(pat, hole)
                cx, cy = pat.to_xy(cu, cv)
                r = float(pat.geo["r0"][hole]) * rng.uniform(1.05, 1.2)
                fill = 0.55 + 0.45 * min(1.0, 1.5 * s + rng.uniform(0, 0.3))
                disc = _disk_field(size, np.array([[cx, cy]]), np.array([r]))
                np.maximum(pat.height, fill * ndimage.gaussian_filter(disc, 0.6), out=pat.height)
        else:
            _line_break(pat, rng, s, u0, v0, sc)
        u0 += float(rng.choice([-1, 1])) * pat.scene.pitch
        v0 += float(rng.uniform(-2, 2)) * pat.scene.pitch


def _line_break(pat: Pattern, rng: np.random.Generator, s: float, u0: float, v0: float, sc: float) -> None:
    sce, g = pat.scene, pat.geo
    i = int(math.floor((u0 - sce.offset) / sce.pitch + 0.5))
    idx = i - g["lo"]
    if not 0 <= idx < g["n"]:
        return
    gap = (1.3 + 14.0 * s ** 1.5 + rng.uniform(0, 2.0 * s)) * sc
    depth = min(1.0, 0.7 + 0.3 * min(1.0, 2.0 * s + rng.uniform(0, 0.3)))
    hw = float(g["hw"][idx])
    rounding = rng.uniform(0.2, 0.9) * hw
    dn = np.clip(g["d"] / max(hw, 0.5), -1.5, 1.5)
    half = gap / 2 + rounding * dn * dn
    m = np.clip(half - np.abs(pat.v - v0) + 0.5, 0, 1) * (pat.cell == idx)
    pat.height *= 1 - depth * m


def _crack(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    """A thin jagged fracture crossing the lines (dark groove; bright rims come from the edge effect)."""
    size = pat.scene.size
    sc = size / 256.0
    length = (0.22 + 1.0 * s + rng.uniform(0, 0.2)) * size
    width = (0.6 + 1.5 * s * rng.uniform(0.6, 1.0)) * sc
    across = pat.scene.theta + float(rng.uniform(-0.9, 0.9))  # across the lines, +-50 deg
    x, y = _interior_point(rng, size, 0.18)
    jag = rng.uniform(0.25, 0.6)
    back = _jagged_path(rng, (x, y), across + math.pi, length / 2, jag)
    fwd = _jagged_path(rng, (x, y), across, length / 2, jag)
    path = np.vstack([back[::-1], fwd])
    mask = _stroke(path, width, size)
    if rng.random() < 0.3:
        k = int(rng.integers(len(path) // 4, max(len(path) * 3 // 4, len(path) // 4 + 1)))
        branch = _jagged_path(rng, tuple(path[k]), across + float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)),
                              length * rng.uniform(0.15, 0.35), jag)
        np.maximum(mask, _stroke(branch, width * 0.7, size), out=mask)
    depth = 0.75 + 0.25 * rng.random()
    pat.height *= 1 - depth * mask
    pat.yield_map -= (0.05 + 0.12 * s) * mask


def _cmp(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    """CMP residue: irregular film patches, polishing scratches (arcs, chatter) or a particle field."""
    mode = rng.choice(["blobs", "scratch", "particles"], p=[0.42, 0.33, 0.25])
    {"blobs": _cmp_blobs, "scratch": _cmp_scratch, "particles": _cmp_particles}[str(mode)](pat, rng, s)
    if rng.random() < 0.15:  # residue rarely comes alone
        other = {"blobs": _cmp_particles, "scratch": _cmp_blobs, "particles": _cmp_scratch}[str(mode)]
        other(pat, rng, s * 0.6)


def _cmp_blobs(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    size = pat.scene.size
    sc = size / 256.0
    n = int(rng.integers(1, 3)) if s > 0.5 else int(rng.integers(1, 5))
    tex = _smooth_noise(rng, size, 3.0 * sc)
    for _ in range(n):
        radius = (3.0 + 75.0 * s ** 2 * rng.uniform(0.5, 1.0) + rng.uniform(0, 4)) * sc
        cx, cy = _interior_point(rng, size, 0.05)
        m = _blob(rng, size, cx, cy, radius)
        cover = rng.uniform(0.45, 1.0)
        level = rng.uniform(0.35, 1.1) + 0.12 * tex
        pat.height += cover * m * (level - pat.height)
        pat.yield_map += m * (rng.choice([-1, 1]) * rng.uniform(0.04, 0.2) * (0.5 + s) + 0.05 * tex)


def _arc_points(rng: np.random.Generator, size: int, length: float) -> np.ndarray:
    """Dense samples of a wide circular arc through the frame (a polishing scratch)."""
    cx, cy = _interior_point(rng, size, 0.1)
    radius = rng.uniform(0.8, 4.0) * size
    phi = rng.uniform(0, 2 * math.pi)
    ox, oy = cx - radius * math.cos(phi), cy - radius * math.sin(phi)
    span = length / radius
    t = np.linspace(phi - span / 2, phi + span / 2, max(int(length * 2), 2))
    return np.stack([ox + radius * np.cos(t), oy + radius * np.sin(t)], axis=1)


def _cmp_scratch(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    size = pat.scene.size
    sc = size / 256.0
    for _ in range(int(rng.integers(1, 4))):
        pts = _arc_points(rng, size, (0.3 + 0.9 * s + rng.uniform(0, 0.3)) * size)
        if rng.random() < 0.3:  # chatter marks: a dashed scratch
            period = rng.uniform(4, 10) * sc
            keep = np.sin(np.arange(len(pts)) * 0.5 / period * 2 * math.pi) > rng.uniform(-0.2, 0.5)
            pts = pts[keep]
        width = (0.7 + 2.4 * s * rng.uniform(0.5, 1.0)) * sc
        mask = _stroke(pts, width, size)
        depth = rng.uniform(0.5, 0.95)
        pat.height -= depth * mask * np.maximum(pat.height, 0.35)
        pat.yield_map -= (0.04 + 0.1 * s) * mask


def _cmp_particles(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    size = pat.scene.size
    sc = size / 256.0
    n = int(4 + 50 * s * rng.uniform(0.3, 1.0))
    centers = rng.uniform(0, size, (n, 2))
    if rng.random() < 0.5:  # clustered residue
        c = np.asarray(_interior_point(rng, size))
        centers = c + rng.normal(0, size * rng.uniform(0.06, 0.25), (n, 2))
    radii = (0.8 + rng.gamma(1.5, 0.8 + 1.6 * s, n)) * sc
    disks = _disk_field(size, centers, radii)
    np.maximum(pat.height, 1.1 * disks, out=pat.height)
    pat.yield_map += rng.uniform(0.05, 0.2) * ndimage.gaussian_filter(disks, 2.5 * sc) + 0.1 * disks


def _ler(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    """Strong line-edge roughness (or contact-edge roughness), everywhere or in a region."""
    size = pat.scene.size
    sc = size / 256.0
    extra = (0.35 + 1.8 * s * s) * sc
    corr = rng.uniform(1.5, 8.0) * sc
    if pat.scene.kind == "holes":
        g = pat.geo
        n = g["r0"].size
        k = np.arange(2, 10)
        amp = (0.5 + 2.4 * s) * sc / np.sqrt(k - 1)  # a hole edge needs more to look rough than a line edge
        add = (rng.normal(0, 1, (n, k.size)) + 1j * rng.normal(0, 1, (n, k.size))) * amp / math.sqrt(2)
        weights = _region_weights(pat, rng, n, per_hole=True)
        add *= weights[:, None]
        coef = np.zeros((n, k.size), complex)
        coef[:, :g["coef"].shape[1]] = g["coef"]
        cap = 0.45 * g["r0"][:, None]
        coef = coef + add
        scale = np.minimum(1.0, cap / np.maximum(np.abs(coef).sum(axis=1, keepdims=True), 1e-6))
        pat.height[:] = np.minimum(pat.height, 1.0 - _hole_coverage(pat, g["r0"], coef * scale))
        g["ler_holes"] = (coef * scale, weights)  # for the visibility rule: which hole edges it roughened
        return
    g = pat.geo
    n, nv = g["rl"].shape
    extra = min(extra, 0.3 * (pat.scene.pitch - 2 * float(g["hw"].mean())))  # roughness, not bridging
    w = _region_weights(pat, rng, n, per_hole=False)
    add = _smooth_rows(rng, 2 * n, nv, ((corr, extra),))
    rl = g["rl"] + add[:n] * w
    rr = g["rr"] + add[n:] * w
    g["ler_lines"] = (rl, rr, np.broadcast_to(w, rl.shape))  # for the visibility rule: the edges it drew
    cov = _line_coverage(pat, rl, rr)
    pat.height += cov - _line_coverage(pat, g["rl"], g["rr"])


def _region_weights(pat: Pattern, rng: np.random.Generator, n: int, per_hole: bool) -> np.ndarray:
    """Where strong roughness applies: all lines, a band of lines and/or a stretch along them."""
    if rng.random() < 0.55:
        return np.ones(n, np.float32) if per_hole else np.ones((n, 1), np.float32)
    size = pat.scene.size
    x, y = _interior_point(rng, size)
    if per_hole:
        cu, cv = pat.to_uv(x, y)
        ids = np.arange(n)
        centers = np.array([_hole_center(pat, int(h)) for h in ids])
        rad = rng.uniform(0.2, 0.5) * size
        return np.clip(1.5 - np.hypot(centers[:, 0] - cu, centers[:, 1] - cv) / rad, 0, 1).astype(np.float32)
    g = pat.geo
    u0, v0 = pat.to_uv(x, y)
    i0 = int(math.floor((u0 - pat.scene.offset) / pat.scene.pitch + 0.5)) - g["lo"]
    band = int(rng.integers(2, 7))
    lines = np.zeros(n, np.float32)
    lines[max(i0 - band // 2, 0):i0 + band - band // 2] = 1.0
    if rng.random() < 0.4:
        lines[:] = 1.0
    nv = g["rl"].shape[1]
    vpos = np.arange(nv) - g["half"]
    span = rng.uniform(0.25, 0.7) * size
    along = np.clip((span / 2 - np.abs(vpos - v0)) / (4 * size / 256) + 0.5, 0, 1)
    return (lines[:, None] * along[None, :]).astype(np.float32)


def _inc_etch(pat: Pattern, rng: np.random.Generator, s: float) -> None:
    """Incomplete etch: grey scum / residue left in parts of the spaces (or contact holes)."""
    size = pat.scene.size
    sc = size / 256.0
    space = 1.0 - np.clip(pat.height, 0, 1)
    x, y = _interior_point(rng, size, 0.1)
    radius = (0.09 + 0.4 * s * rng.uniform(0.6, 1.0)) * size
    mode = rng.choice(["scum", "stripes", "footing"], p=[0.5, 0.25, 0.25])
    if mode == "stripes" and pat.scene.kind == "lines":
        region = _space_stripes(pat, rng, x, y, radius)
    else:
        env = _blob(rng, size, x, y, radius)
        clouds = _smooth_noise(rng, size, max(pat.scene.pitch * 0.7, 3.0 * sc))
        region = env * np.clip(0.9 + 0.9 * clouds, 0, 1) if mode == "scum" else env
        if mode == "footing":
            foot = ndimage.gaussian_filter(np.clip(pat.height, 0, 1), pat.scene.pitch * 0.18)
            region = region * np.clip(3.0 * (foot - 0.1), 0, 1)
    level = (0.55 + 0.35 * rng.uniform(0.5, 1.0)) * (0.65 + 0.35 * s)
    tex = rng.standard_normal((size, size), dtype=np.float32)  # granular scum; the imaging blur softens it
    fill = space * region
    pat.height += fill * level * np.clip(0.8 + 0.5 * tex, 0.3, 1.4)
    pat.yield_map += fill * (rng.uniform(-0.04, 0.08) + 0.12 * np.maximum(tex, 0) * rng.uniform(0.3, 1.0))


def _space_stripes(pat: Pattern, rng: np.random.Generator, x: float, y: float, radius: float) -> np.ndarray:
    """Residue along one or a few spaces, over a long stretch of them."""
    sce, g = pat.scene, pat.geo
    u0, v0 = pat.to_uv(x, y)
    i = int(math.floor((u0 - sce.offset) / sce.pitch)) - g["lo"]
    k = int(rng.integers(1, 4))
    d = g["d"]
    region = np.zeros_like(pat.height)
    for j in range(i, i + k):
        region += ((pat.cell == j) & (d > 0)) | ((pat.cell == j + 1) & (d <= 0))
    half_len = radius * rng.uniform(1.0, 2.5)
    along = np.clip((half_len - np.abs(pat.v - v0)) / 3.0 + 0.5, 0, 1)
    wobble = np.clip(0.75 + 0.6 * _smooth_noise(rng, sce.size, sce.pitch), 0, 1)
    return ndimage.gaussian_filter(region, 0.8) * along * wobble


DEFECT_FUNCS = {"bridge": _bridge, "open": _open, "cmp": _cmp, "crack": _crack, "ler": _ler, "inc_etch": _inc_etch}


# ====================================================================== SEM imaging
def _image(height: np.ndarray, yield_map: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Height map -> SEM signal (about 0..1): edge effect, beam blur, charging, shot noise, scan lines, drift."""
    size = scene.size
    topo = ndimage.gaussian_filter(height, scene.topo_sigma, truncate=3.0)
    gy, gx = np.gradient(topo)
    edge = np.hypot(gx, gy)
    edge *= np.float32(math.sqrt(2 * math.pi) * scene.topo_sigma)  # 1 at the steepest point of a full step
    np.minimum(edge, 1.5, out=edge)
    sig = np.clip(topo, 0.0, 1.3)
    sig *= scene.line_level - scene.space_level
    sig += scene.space_level
    sig += scene.edge_gain * edge
    sig += yield_map
    if scene.grain > 0.01:  # material grain: white noise that the beam blur below correlates
        sig += scene.grain * rng.standard_normal(sig.shape, dtype=np.float32)
    if scene.charge_tail[0] > 0:
        sig -= scene.charge_tail[0] * _trail(edge, scene.charge_tail[1])
    sig = ndimage.gaussian_filter(sig, scene.blur, truncate=3.0)
    sig *= _charging(size, scene.charge_grad)
    lam = np.maximum(sig, 0.0, out=sig)
    lam *= scene.dose
    noise = rng.standard_normal(lam.shape, dtype=np.float32)
    noise *= np.sqrt(lam)
    noise += lam
    counts = np.maximum(np.rint(noise, out=noise), 0.0, out=noise)  # shot noise, in electrons
    rows = np.arange(size, dtype=np.float32) / size - 0.5
    lin, amp, ph = scene.drift
    row_gain = (1 + lin * rows + amp * np.sin(2 * math.pi * rows * 1.3 + ph)) * (
        0.92 * scene.gain / (scene.line_level + 0.6 * scene.edge_gain))
    row_offset = scene.scan_noise * rng.standard_normal(size, dtype=np.float32) * row_gain + 0.92 * scene.level
    counts *= (row_gain / scene.dose)[:, None]
    counts += row_offset[:, None]
    if scene.jitter_rows > 0:
        counts = _jitter(counts, rng, scene.jitter_rows)
    return counts


def _charging(size: int, grad: tuple[float, float, float]) -> np.ndarray:
    """Slow charging: a linear brightness gradient plus a centre-to-corner term."""
    yy, xx = _grid(size)
    return 1 + grad[0] / size * yy[:, :1] + grad[1] / size * xx[:1, :] + grad[2] * _radius2(size)


@lru_cache(maxsize=8)
def _radius2(size: int) -> np.ndarray:
    yy, xx = _grid(size)
    return ((xx * xx + yy * yy) / (size * size)).astype(np.float32)


def _trail(edge: np.ndarray, decay: float) -> np.ndarray:
    """Charging trail: a dark tail that follows bright edges along the scan direction (left to right)."""
    length = max(2, int(math.ceil(math.log(0.03) / math.log(decay))))
    kernel = np.zeros(2 * length + 1, np.float32)
    kernel[length + 1:] = (1 - decay) * decay ** np.arange(length)
    return ndimage.convolve1d(edge, kernel, axis=1, mode="nearest")


def _jitter(sig: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    """Scan jitter: a few rows land one pixel off."""
    size = sig.shape[0]
    shift = np.where(rng.random(size) < frac, rng.choice([-1, 1], size), 0)
    cols = np.clip(np.arange(size)[None, :] + shift[:, None], 0, size - 1)
    return np.take_along_axis(sig, cols, axis=1)


def _to_uint8(sig: np.ndarray) -> np.ndarray:
    return np.clip(sig * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ====================================================================== bogus frames
# Photographs shipped with this package (semhinet_tf/data/photos, licences in LICENSES.md there): grey, at most
# 640 px, the very pixels the generator used when it read them from scikit-image's and scikit-learn's sample data,
# so the data sets are unchanged without those packages. The order is part of the generator (draws index it).
_PHOTOS = ("camera", "coins", "moon", "astronaut", "coffee", "chelsea", "rocket", "horse", "clock_motion",
           "hubble_deep_field", "ihc", "cell", "retina", "page", "text", "brick", "grass", "gravel", "logo", "color",
           "microaneurysms", "motorcycle_left", "phantom", "china", "flower")
_PHOTO_DIR = Path(__file__).resolve().parent / "photos"


@lru_cache(maxsize=32)
def _photo(name: str) -> np.ndarray | None:
    """A shipped photograph as float grey 0..1, or None when the file is missing (a trimmed install)."""
    from PIL import Image

    try:
        with Image.open(_PHOTO_DIR / f"{name}.png") as im:
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except OSError:
        return None


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _bogus_photo(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    img = _photo(_PHOTOS[int(rng.integers(0, len(_PHOTOS)))])
    if img is None:
        return _bogus_graphics(rng, size, scene)
    h, w = img.shape
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = _resize(img[y0:y0 + side, x0:x0 + side], size)
    out = np.rot90(out, int(rng.integers(0, 4))) if rng.random() < 0.3 else out
    if rng.random() < 0.5:  # SEM-like noise so that noise alone does not tell SEM from photo
        out = out + rng.normal(0, rng.uniform(0.01, 0.08), out.shape).astype(np.float32)
    return out


def _bogus_noise(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    kind = rng.integers(0, 4)
    mean, std = rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.35)
    if kind == 0:
        return mean + std * rng.standard_normal((size, size)).astype(np.float32)
    if kind == 1:
        return rng.random((size, size)).astype(np.float32)
    if kind == 2:
        out = np.full((size, size), mean, np.float32)
        m = rng.random((size, size))
        p = rng.uniform(0.02, 0.3)
        out[m < p / 2], out[m > 1 - p / 2] = 0.0, 1.0
        return out
    cell = rng.uniform(3, 40) * size / 256
    return mean + std * _smooth_noise(rng, size, cell) + 0.03 * rng.standard_normal((size, size)).astype(np.float32)


def _bogus_blank(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:  # black, grey or white frame with a little noise
        level = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
        return level + rng.uniform(0, 0.03) * rng.standard_normal((size, size)).astype(np.float32)
    if kind == 1:  # a SEM frame with the contrast blown out
        pat = _make_pattern(scene, rng)
        sig = _image(pat.height, pat.yield_map, scene, rng)
        return (sig - rng.uniform(-0.6, 0.3)) * rng.uniform(4.0, 12.0)
    out = np.full((size, size), rng.uniform(0.85, 1.0), np.float32)  # white frame with a few specks
    n = int(rng.integers(0, 6))
    specks = _disk_field(size, rng.uniform(0, size, (n, 2)), rng.uniform(1, 4, n) * size / 256)
    return out - 0.8 * specks


def _bogus_defocus(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    """Beam far out of focus: the pattern smears into a soft haze."""
    pat = _make_pattern(scene, rng)
    sigma = rng.uniform(0.35, 1.2) * scene.pitch
    blurred = ndimage.gaussian_filter(pat.height, sigma)
    scene.blur = (sigma * rng.uniform(0.6, 1.4), sigma)
    return _image(blurred, pat.yield_map, scene, rng)


def _bogus_beam_lost(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    """Beam lost mid-frame: the scan goes on as horizontal streaks or a frozen line."""
    pat = _make_pattern(scene, rng)
    sig = _image(pat.height, pat.yield_map, scene, rng)
    start = int(rng.uniform(0.0, 0.7) * size)
    kind = rng.integers(0, 3)
    rows = size - start
    if kind == 0:
        streak = rng.uniform(0, 0.6, (rows, 1)) + rng.normal(0, 0.05, (rows, size))
    elif kind == 1:
        streak = np.repeat(sig[max(start - 1, 0):max(start, 1)], rows, axis=0)
    else:
        streak = rng.uniform(0.0, 0.15) + rng.normal(0, 0.03, (rows, size))
    sig[start:] = streak
    return sig


def _bogus_graphics(rng: np.random.Generator, size: int, scene: Scene) -> np.ndarray:
    """Gradients, shapes, checkerboards and text: the things that end up in an image folder by mistake."""
    from PIL import Image, ImageDraw, ImageFont

    yy, xx = _grid(size)
    kind = rng.integers(0, 4)
    if kind == 0:
        a = rng.uniform(0, 2 * math.pi)
        base = (xx * math.cos(a) + yy * math.sin(a)) / size + 0.5
    elif kind == 1:
        base = np.hypot(xx - rng.uniform(-0.3, 0.3) * size, yy) / size
    elif kind == 2:
        cell = int(rng.integers(8, 48) * size / 256) or 1
        base = ((((xx + size) // cell) + ((yy + size) // cell)) % 2).astype(np.float32) * rng.uniform(0.3, 1)
    else:
        base = np.full((size, size), rng.uniform(0, 1), np.float32)
    img = Image.fromarray(np.clip(base * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 6))):
        x0, y0 = rng.uniform(0, size, 2)
        x1, y1 = x0 + rng.uniform(5, size / 2), y0 + rng.uniform(5, size / 2)
        fill = int(rng.integers(0, 256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .:%-"))
    for _ in range(int(rng.integers(0, 5))):
        font = ImageFont.load_default(size=max(8, int(rng.uniform(0.04, 0.15) * size)))
        text = "".join(rng.choice(letters, int(rng.integers(3, 20))))
        draw.text(tuple(rng.uniform(0, size * 0.8, 2)), text, fill=int(rng.integers(0, 256)), font=font)
    return np.asarray(img, np.float32) / 255.0


_BOGUS = ((_bogus_photo, 0.36), (_bogus_noise, 0.12), (_bogus_blank, 0.12), (_bogus_defocus, 0.14),
          (_bogus_beam_lost, 0.12), (_bogus_graphics, 0.14))
# What dataset.json records as a bogus frame's "kind" (the experiments' leave-one-kind-out splits by it). A photo
# drawn when the shipped photographs are missing is rendered as graphics but still recorded as "photo".
BOGUS_KINDS: tuple[str, ...] = tuple(fn.__name__.removeprefix("_bogus_") for fn, _ in _BOGUS)


# ====================================================================== the label rule: what an expert would see
# A defect draw is labelled only if it can be seen at the model's input resolution against the spread of normal
# variation for the same imaging. Both tests use what only the generator knows (the frame's defect-free twin, its
# edges, a second noise draw of the twin) and end in one score normalised so that 1 is the rule's threshold.
LABEL_RULES: tuple[str, ...] = ("visible", "cause")
DEFAULT_LABELS = "visible"
VISIBILITY_QUANTILE = 0.995  # false alarms the rule allows on normal frames (per frame, resp. per edge window)
CNR_SCALES = (1.0, 2.0, 4.0, 8.0)  # model px: the matched filter's Gaussian sigmas (from a bridge to a scum patch)
CALIBRATION_FRAMES = 200  # normal frames whose twin-vs-twin statistic sets the contrast-to-noise threshold
CALIBRATION_SEED = 26_2026  # their seed: a property of the generator, not of a data set's --seed
ROUGH_WINDOW = 16  # model px of edge over which an observer judges roughness (a tenth of a 160 px frame)
ROUGH_MIN_LENGTH = 48  # model px of rough edge the rule asks for: three windows, a third of the frame's side
ROUGH_NULL_EDGES = 200  # normal frames simulated per ler scene for the roughness threshold
MAX_DRAWS = 8  # fresh defect draws of the same scene before the severity is raised
ESCALATION_STEPS = 4  # then the severity's floor rises to 1 in this many draws
MAX_SCENES = 4  # then a new scene (counted: it biases imaging if common); then the best draw, reported below 1


@dataclass(frozen=True)
class LabelRule:
    """How defect draws become labels: `cause` labels every draw (the old generator), `visible` only those whose
    visibility score reaches 1. `size` is the model's input side; `cnr_threshold` the calibrated bound."""

    labels: str = DEFAULT_LABELS
    size: int = 160
    cnr_threshold: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "visibility_size": self.size, "quantile": VISIBILITY_QUANTILE,
                "cnr_threshold": round(self.cnr_threshold, 4), "cnr_scales_px": list(CNR_SCALES),
                "calibration_frames": CALIBRATION_FRAMES, "rough_window_px": ROUGH_WINDOW,
                "rough_min_length_px": ROUGH_MIN_LENGTH, "max_draws": MAX_DRAWS,
                "escalation_steps": ESCALATION_STEPS, "max_scenes": MAX_SCENES}


def _check_labels(labels: str) -> None:
    if labels not in LABEL_RULES:
        raise ValueError(f"unknown label rule {labels!r}: use one of {', '.join(LABEL_RULES)}")


def label_rule(labels: str = DEFAULT_LABELS, size: int = 256, difficulty: float = DEFAULT_DIFFICULTY,
               visibility_size: int | None = None) -> LabelRule:
    """The rule with its threshold calibrated for this imaging (frame size, difficulty, model input size)."""
    _check_labels(labels)
    vis = int(visibility_size or _default_visibility_size())
    if vis < 16:
        raise ValueError(f"visibility size {vis} is too small: use at least 16 px")
    return LabelRule(labels, vis, _cnr_threshold(int(size), float(difficulty), min(vis, int(size))))


def _default_visibility_size() -> int:
    from semhinet_tf.data.decode import DEFAULT_IMG_SIZE

    return int(DEFAULT_IMG_SIZE)


def _to_model(img: np.ndarray, vis: int) -> np.ndarray:
    """The frame as the model sees it: the decoder's own resize (Pillow bilinear, antialiased), as float."""
    from semhinet_tf.data.decode import resize_square

    return resize_square(img, vis).astype(np.float32)


class _NullField:
    """The twin against the same twin with independent noise, at the model's resolution: per matched-filter
    scale the filtered noise sigma of one frame, and the null statistic (max over positions and scales)."""

    def __init__(self, twin: np.ndarray, twin2: np.ndarray, vis: int) -> None:
        self.twin = _to_model(twin, vis)
        d = self.twin - _to_model(twin2, vis)
        d -= d.mean(axis=1, keepdims=True)  # scan-line offsets: one per row, an observer subtracts them
        self.sigma, null = [], 0.0
        for s in CNR_SCALES:
            f = ndimage.gaussian_filter(d, s)
            sd = max(float(f.std()), 1e-6)
            self.sigma.append(sd / math.sqrt(2.0))  # d holds two frames' noise
            null = max(null, float(np.abs(f).max()) / sd)
        self.null = null

    def cnr(self, img: np.ndarray, vis: int) -> float:
        """Max over positions and scales of the smoothed defect-minus-twin difference over the noise sigma."""
        delta = _to_model(img, vis) - self.twin
        ys, xs = np.nonzero(delta)
        if ys.size == 0:
            return 0.0
        # Only around the change: with a margin of the widest kernel's radius the filtered values are the
        # whole frame's, bit for bit (zeros beyond), at a fraction of the cost for a local defect.
        m = int(4.0 * max(CNR_SCALES) + 0.5)
        delta = delta[max(ys.min() - m, 0):ys.max() + m + 1, max(xs.min() - m, 0):xs.max() + m + 1]
        return max(float(np.abs(ndimage.gaussian_filter(delta, s)).max()) / sd
                   for s, sd in zip(CNR_SCALES, self.sigma, strict=True))


def _twin2(height: np.ndarray, yield_map: np.ndarray, scene: Scene, noise_seed: int) -> np.ndarray:
    """The clean twin under an independent noise draw (its own stream, never the frame's)."""
    return _to_uint8(_image(height, yield_map, scene, np.random.default_rng([noise_seed, 1])))


@lru_cache(maxsize=16)
def _cnr_threshold(size: int, difficulty: float, vis: int) -> float:
    """The 99.5th percentile of the null statistic over normal frames of this imaging: a defect that cannot beat
    what noise alone reaches somewhere in one frame in 200 is not labelled (the search over positions and scales
    is in the statistic, so no Bonferroni factor is guessed). Same scenes whatever the data set's seed."""
    nulls = []
    for k in range(CALIBRATION_FRAMES):
        scene_seed, _, noise_seed = _streams(np.random.default_rng(np.random.SeedSequence(CALIBRATION_SEED,
                                                                                          spawn_key=(k,))))
        scene_rng = np.random.default_rng(scene_seed)
        scene = _sample_scene(scene_rng, size, difficulty)
        pat = _make_pattern(scene, scene_rng)
        twin = _to_uint8(_image(pat.height, pat.yield_map, scene, np.random.default_rng(noise_seed)))
        nulls.append(_NullField(twin, _twin2(pat.height, pat.yield_map, scene, noise_seed), vis).null)
    return _gumbel_quantile(np.asarray(nulls), VISIBILITY_QUANTILE)


def _gumbel_quantile(maxima: np.ndarray, q: float) -> float:
    """Quantile of a Gumbel law fitted by moments: the maximum of a noise field over many positions follows it,
    and the fit reads a 99.5th percentile off a few hundred frames far more steadily than the sample does."""
    beta = float(maxima.std()) * math.sqrt(6.0) / math.pi
    loc = float(maxima.mean()) - 0.5772156649 * beta
    return loc - beta * math.log(-math.log(q))


def _edge_imaging(scene: Scene) -> tuple[float, float]:
    """(blur along an edge, ideal edge locator's position noise per px of edge), both in frame px.

    The Cramer-Rao bound for locating a blurred step plus the bright edge line in shot noise, as in
    experiments/roughness_oracle.py: Fisher information per px of edge = sum of profile'(x)^2 / noise variance.
    """
    blur = math.sqrt(scene.topo_sigma ** 2 + (0.5 * (scene.blur[0] + scene.blur[1])) ** 2)
    step_height = abs(scene.line_level - scene.space_level)
    peak = scene.edge_gain * scene.topo_sigma / blur
    mean_signal = 0.5 * (scene.line_level + scene.space_level) + 0.3 * scene.edge_gain
    information = (step_height ** 2 / (2 * math.sqrt(math.pi)) + peak ** 2 * math.sqrt(math.pi) / 2) / (
        blur * max(mean_signal, 1e-3) / scene.dose)
    return blur, 1.0 / math.sqrt(information)


def _imaged(edges: np.ndarray, scene: Scene, step: float, rng: np.random.Generator, wrap: bool = False) -> np.ndarray:
    """Edge displacements (rows, frame px samples) as the model sees them, in model px: smoothed by the imaging
    blur and the resize's box (step = frame px per model px), plus the locator's noise averaged over the box."""
    blur, noise = _edge_imaging(scene)
    box = max(step, 1.0)
    smooth = math.sqrt(blur ** 2 + box ** 2 / 12.0)
    out = ndimage.gaussian_filter1d(edges.astype(np.float32), smooth, axis=-1, mode="wrap" if wrap else "nearest")
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise / math.sqrt(box))
    return out / np.float32(step)


def _window_rms(x: np.ndarray, w: int) -> np.ndarray:
    """RMS about the window mean of consecutive windows of w samples along the last axis: (rows, windows)."""
    m = x.shape[-1] // w
    if m == 0:
        return np.zeros(x.shape[:-1] + (0,))
    win = x[..., :m * w].reshape(*x.shape[:-1], m, w)
    return win.std(axis=-1)


def _natural_roughness(rng: np.random.Generator, rows: int, length: int, size: int,
                       per_row: np.ndarray | None = None) -> np.ndarray:
    """Normal line edges with natural roughness drawn as `_sample_scene` draws it: one (sigma, correlation)
    per group of rows (`per_row` gives each row's group; default one per row)."""
    sc = size / 256.0
    group = np.arange(rows) if per_row is None else np.asarray(per_row)
    groups = int(group.max()) + 1
    sigma = rng.uniform(0.15, 0.6, groups) * sc
    corr = np.maximum(rng.uniform(3.0, 14.0, groups) * sc, 0.5)
    spec = np.fft.rfft(rng.standard_normal((rows, length), dtype=np.float32), axis=1)
    f2 = np.fft.rfftfreq(length)[None, :] ** 2
    transfer = np.zeros((groups, f2.shape[1]))
    for c, wgt in ((corr, 0.75 * sigma), (np.maximum(corr / 4, 0.5), 0.45 * sigma)):
        transfer += (wgt * np.sqrt(2.0 * math.sqrt(math.pi) * c))[:, None] * np.exp(
            -2.0 * math.pi ** 2 * f2 * (c ** 2)[:, None])
    spec *= transfer.astype(np.float32)[group]
    return np.fft.irfft(spec, n=length, axis=1)


def _hole_deviation(coef: np.ndarray, samples: int) -> np.ndarray:
    """Radius minus mean radius around each hole (rows of coef: harmonics k = 2, 3, ...), `samples` angles."""
    phi = np.arange(samples) * (2 * math.pi / samples)
    k = np.arange(2, 2 + coef.shape[1])
    return coef.real @ np.cos(np.outer(k, phi)) + coef.imag @ np.sin(np.outer(k, phi))


def _kth_largest(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value along the last axis (k >= 1; 0 where there are fewer than k values)."""
    if x.shape[-1] < k:
        return np.zeros(x.shape[:-1])
    return np.partition(x, x.shape[-1] - k, axis=-1)[..., x.shape[-1] - k]


def _ler_visibility(pat: Pattern, noise_seed: int, vis: int, cache: dict | None = None) -> float:
    """Imaged roughness of the edges the ler draw roughened over at least ROUGH_MIN_LENGTH px of edge, against the
    99.5th percentile of the same statistic on normal frames under the same imaging (score 1 = the rule).

    The statistic is the k-th roughest of the affected edge windows (lines) or holes, k the number that covers
    ROUGH_MIN_LENGTH model px. Its null: the same windows (or holes) with only natural roughness, each null frame
    with its own roughness drawn as `_sample_scene` draws it, imaged with this frame's blur and noise. `cache`
    keeps the null (it depends on the scene only) across the draws of one scene.
    """
    cache = {} if cache is None else cache
    scene, g = pat.scene, pat.geo
    size = scene.size
    step = size / vis
    rng = np.random.default_rng([noise_seed, 2])
    null_rng = np.random.default_rng([noise_seed, 3])
    m = ROUGH_NULL_EDGES
    if "ler_holes" in g:
        coef, weight = g["ler_holes"]
        r0 = float(np.median(g["r0"]))
        samples = max(8, int(round(2 * math.pi * r0)))
        centres = np.array([pat.to_xy(*_hole_center(pat, h)) for h in range(len(weight))])
        affected = np.all((centres >= 0) & (centres < size), axis=1) & (weight >= 0.5)
        n = int(affected.sum())
        k = max(1, math.ceil(ROUGH_MIN_LENGTH / (samples / step)))
        if n < k:
            return 0.0
        seen = _imaged(_hole_deviation(coef[affected], samples), scene, step, rng, wrap=True).std(axis=1)
        if "holes" not in cache:  # null frames with as many holes as the frame shows
            n_all = int(np.all((centres >= 0) & (centres < size), axis=1).sum())
            kk = np.arange(2, 6)
            rough = null_rng.uniform(0.15, 0.6, (m, 1, 1)) * (size / 256.0)  # one natural roughness per null frame
            amp = rough * 0.6 / np.sqrt(kk - 1)
            shape = (m, n_all, kk.size)
            null_coef = (null_rng.normal(0, 1, shape) + 1j * null_rng.normal(0, 1, shape)) * amp / math.sqrt(2)
            cache["holes"] = _imaged(_hole_deviation(null_coef.reshape(m * n_all, -1), samples), scene, step,
                                     null_rng, wrap=True).std(axis=1).reshape(m, n_all)
        null = cache["holes"][:, :n]
        threshold = float(np.quantile(_kth_largest(null, k), VISIBILITY_QUANTILE))
        return float(_kth_largest(seen, k)) / max(threshold, 1e-9)
    rl, rr, w = g["ler_lines"]
    n, nv = rl.shape
    win = max(2, int(round(ROUGH_WINDOW * step)))  # frame px samples per window
    k = max(1, math.ceil(ROUGH_MIN_LENGTH / ROUGH_WINDOW))
    hw = g["hw"][:, None]
    out_lim = np.maximum(0.5 * (scene.pitch / 2 - hw), 0.3)
    in_lim = np.maximum(0.34 * hw, 0.3)
    edges = np.concatenate([_soft_limit(rl, out_lim, in_lim), _soft_limit(rr, out_lim, in_lim)])
    weights = np.concatenate([w, w])
    if "spans" not in cache:  # each line's stretch inside the frame
        lines, pos = np.divmod(np.unique(g["flat"]), nv)
        cache["spans"] = [(int(i), int(pos[lines == i].min()), int(pos[lines == i].max()) + 1)
                          for i in np.unique(lines)]
    rms = []
    seen_edges = _imaged(edges, scene, step, rng)  # whole profiles: the blur at a span's ends sees real edge
    for i, a, b in cache["spans"]:
        for row in (i, n + i):
            if b - a < win or weights[row, a:b].max() < 0.5:
                continue
            r = _window_rms(seen_edges[row:row + 1, a:b], win)[0]
            affected = weights[row, a:a + r.size * win].reshape(r.size, win).mean(axis=1) >= 0.5
            rms.append(r[affected])
    seen = np.concatenate(rms) if rms else np.zeros(0)
    if seen.size < k:
        return 0.0
    if "lines" not in cache:  # null frames with as many windows as the frame shows, one natural roughness each
        windows = sum(2 * ((b - a) // win) for _, a, b in cache["spans"])
        per_edge = max(1, size // win)
        pieces = math.ceil(windows / per_edge)
        natural = _natural_roughness(null_rng, m * pieces, per_edge * win + 2 * win, size,
                                     per_row=np.repeat(np.arange(m), pieces))
        cache["lines"] = _window_rms(_imaged(natural, scene, step, null_rng)[:, win:-win], win).reshape(m, -1)
    null = cache["lines"][:, :seen.size]
    threshold = float(np.quantile(_kth_largest(null, k), VISIBILITY_QUANTILE))
    return float(_kth_largest(seen, k)) / max(threshold, 1e-9)


def _severity_floor(draw: int) -> float:
    """0 for the first MAX_DRAWS draws; then rising to 1 over ESCALATION_STEPS draws (the loop is bounded)."""
    return 0.0 if draw < MAX_DRAWS else min(1.0, (draw - MAX_DRAWS + 1) / ESCALATION_STEPS)


def _defect_rng(defect_seed: int, draw: int) -> np.random.Generator:
    """Draw 0 is the old generator's defect stream (so a first draw that passes is the `cause` frame)."""
    return np.random.default_rng(defect_seed if draw == 0 else [defect_seed, draw])


@dataclass
class Frame:
    """One rendered frame and what the generator knows about it."""

    image: np.ndarray
    twin: np.ndarray | None = None
    bbox: tuple[int, int, int, int] | None = None
    severity: float | None = None  # the defect's s (after any escalation); None for normal and bogus
    visibility: float | None = None  # 1 = the label rule's threshold; None for normal and bogus
    draw: int = 0  # index of the defect draw kept (0: the first, as the cause rule draws it)
    scenes: int = 1  # scenes tried (more than one only if no draw was visible in the first)
    rejected: tuple[float, float, int] | None = None  # (severity, visibility, draw) of the last draw turned down
    kind: str | None = None  # a bogus frame's kind (BOGUS_KINDS); None for SEM frames
    pattern: str | None = None  # an SEM frame's pattern ("lines" or "holes", Scene.kind); None for bogus



# ====================================================================== public rendering API
def _streams(rng: np.random.Generator) -> tuple[int, int, int]:
    """Seeds of the scene, defect and noise streams: a defect never shifts the pattern or noise of its twin."""
    a, b, c = (int(x) for x in rng.integers(0, 2 ** 63 - 1, size=3, dtype=np.int64))
    return a, b, c


def _check_leaf(leaf: str) -> None:
    if leaf not in LEAVES:
        raise ValueError(f"unknown class {leaf!r}: synth renders {', '.join(LEAVES)}")


def _render(leaf: str, rng: np.random.Generator, size: int, difficulty: float, twin: bool = False,
            locate: bool = False, rule: LabelRule | None = None, draw: int | None = None, scene_no: int = 1) -> Frame:
    """Render one frame; with a rule, score each defect draw and (rule `visible`) redraw those below 1.

    Only the defect stream is redrawn: the scene (pattern and imaging) and the noise stay, so the twin is still
    the normal frame of the same seed and the imaging difficulty is untouched. `draw` renders that one draw as
    drawn, whatever its score, in the frame's `scene_no`-th scene (the contact sheet's frames just below the rule).
    """
    _check_leaf(leaf)
    if size < 16:
        raise ValueError(f"image size {size} is too small: use at least 16 px")
    best: Frame | None = None
    scenes = scene_no if draw is not None else (MAX_SCENES if rule is not None and rule.labels == "visible" else 1)
    for scene_try in range(scenes):
        scene_seed, defect_seed, noise_seed = _streams(rng)  # a further scene continues the image's stream
        if scene_try + 1 < scenes and draw is not None:
            continue
        rejected = None
        scene_rng = np.random.default_rng(scene_seed)
        scene = _sample_scene(scene_rng, size, difficulty)
        if leaf == "bogus":
            fns, probs = zip(*_BOGUS, strict=True)
            defect_rng = _defect_rng(defect_seed, 0)
            fn = fns[int(defect_rng.choice(len(fns), p=np.asarray(probs) / sum(probs)))]
            img = _to_uint8(fn(defect_rng, size, scene))
            return Frame(img, img.copy() if twin else None, kind=fn.__name__.removeprefix("_bogus_"))
        base = _make_pattern(scene, scene_rng)
        if leaf == "normal":
            img = _to_uint8(_image(base.height, base.yield_map, scene, np.random.default_rng(noise_seed)))
            return Frame(img, img.copy() if twin else None, pattern=scene.kind)
        clean, null, ler_cache = None, None, {}
        if twin or (rule is not None and leaf != "ler"):
            clean = _to_uint8(_image(base.height, base.yield_map, scene, np.random.default_rng(noise_seed)))
        draws = [draw] if draw is not None else range(MAX_DRAWS + ESCALATION_STEPS if rule is not None
                                                      and rule.labels == "visible" else 1)
        for d in draws:
            pat = Pattern(scene, base.u, base.v, base.height.copy(), base.yield_map.copy(), base.cell, dict(base.geo))
            defect_rng = _defect_rng(defect_seed, d)
            severity = max(_severity(defect_rng, difficulty), _severity_floor(d))
            DEFECT_FUNCS[leaf](pat, defect_rng, severity)
            np.clip(pat.height, 0.0, 1.3, out=pat.height)
            img = _to_uint8(_image(pat.height, pat.yield_map, scene, np.random.default_rng(noise_seed)))
            visibility = None
            if rule is not None:
                vis = min(rule.size, size)  # a frame smaller than the model's input holds no more when enlarged
                if leaf == "ler":
                    visibility = _ler_visibility(pat, noise_seed, vis, ler_cache)
                else:
                    if null is None:
                        null = _NullField(clean, _twin2(base.height, base.yield_map, scene, noise_seed), vis)
                    visibility = null.cnr(img, vis) / rule.cnr_threshold
            bbox = None
            if locate:
                bbox = _changed_bbox(np.abs(pat.height - base.height) + np.abs(pat.yield_map - base.yield_map))
            frame = Frame(img, clean if twin else None, bbox, severity, visibility, d, scene_try + 1, rejected,
                          pattern=scene.kind)
            if rule is None or rule.labels == "cause" or draw is not None or visibility >= 1.0:
                return frame
            if best is None or visibility > best.visibility:
                best = frame
            rejected = (severity, visibility, d)
    # Bounded: no draw of any scene was visible (tiny frames, thin defects). The most visible one is written and
    # its score below 1 says so: dataset.json and the stats count these, rather than loop or fail the data set.
    return best


def _changed_bbox(delta: np.ndarray, thresh: float = 0.08) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(delta > thresh)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _rule_for(labels: str, size: int, difficulty: float, visibility_size: int | None) -> LabelRule | None:
    """None for `cause` (nothing to score when only the pixels are asked for), else the calibrated rule."""
    _check_labels(labels)
    return None if labels == "cause" else label_rule(labels, size, difficulty, visibility_size)


def render(leaf: str, rng: np.random.Generator, size: int, difficulty: float = DEFAULT_DIFFICULTY,
           labels: str = DEFAULT_LABELS, visibility_size: int | None = None) -> np.ndarray:
    """One synthetic SEM frame of class `leaf`: uint8 grey array of shape (size, size).

    `labels="visible"` (default) redraws defects an expert could not see at the model's input size
    (`visibility_size`, default the decoder's); `labels="cause"` is the old generator, frame for frame.
    """
    return _render(leaf, rng, size, difficulty, rule=_rule_for(labels, size, difficulty, visibility_size)).image


def render_pair(leaf: str, rng: np.random.Generator, size: int, difficulty: float = DEFAULT_DIFFICULTY,
                labels: str = DEFAULT_LABELS, visibility_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(defect image, its clean twin): same pattern, imaging and noise, no defect.

    The first element equals `render(leaf, rng, size)` for the same rng state and label rule. For normal and
    bogus the twin is the image itself. Used by the tests and by experiments that need the defect's footprint.
    """
    f = _render(leaf, rng, size, difficulty, twin=True, rule=_rule_for(labels, size, difficulty, visibility_size))
    return f.image, f.twin


def render_frame(leaf: str, seed: int, k: int, size: int, difficulty: float = DEFAULT_DIFFICULTY,
                 labels: str = DEFAULT_LABELS, visibility_size: int | None = None,
                 draw: int | None = None, scene: int = 1) -> Frame:
    """Image k of `leaf` with what the generator knows (twin, severity, visibility score, draws).

    `draw` renders that defect draw of the frame's `scene`-th scene as drawn, scored but never redrawn: the draws
    a `visible` data set turned down (dataset.json lists each frame's last one) can be looked at.
    """
    rule = label_rule(labels, size, difficulty, visibility_size)
    return _render(leaf, np.random.default_rng(image_seed(seed, leaf, k)), size, difficulty, twin=True, rule=rule,
                   draw=draw, scene_no=scene)


def image_seed(seed: int, leaf: str, k: int) -> np.random.SeedSequence:
    """The seed of image k of class `leaf`: independent of workers, chunking and which classes are made."""
    _check_leaf(leaf)
    return np.random.SeedSequence(int(seed), spawn_key=(LEAVES.index(leaf), int(k)))


# ====================================================================== file variants (mixed formats)
_FORMATS = (("png", 0.3), ("jpeg", 0.2), ("bmp", 0.1), ("tiff8", 0.15), ("tiff16", 0.15), ("tiff12", 0.1))
_EXT = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff8": ".tif", "tiff16": ".tiff", "tiff12": ".tif"}


@dataclass
class _Variant:
    fmt: str = "png"
    rgb: bool = False
    info_bar: bool = False
    nested: str = ""
    aspect: float = 1.0
    quality: int = 90


def _sample_variant(rng: np.random.Generator) -> _Variant:
    names, probs = zip(*_FORMATS, strict=True)
    fmt = str(names[int(rng.choice(len(names), p=np.asarray(probs)))])
    nested = f"lot{int(rng.integers(1, 4)):02d}/wafer{int(rng.integers(1, 9)):02d}" if rng.random() < 0.25 else ""
    aspect = float(rng.choice([1.333, 1.25, 1.5, 1.333, 0.75, 0.8])) if rng.random() < 0.2 else 1.0  # mostly landscape
    return _Variant(fmt=fmt, rgb=fmt in ("png", "jpeg", "bmp", "tiff8") and rng.random() < 0.15,
                    info_bar=rng.random() < 0.2, nested=nested, aspect=aspect, quality=int(rng.integers(70, 96)))


def _crop_to_aspect(img: np.ndarray, aspect: float, bbox: tuple[int, int, int, int] | None,
                    rng: np.random.Generator) -> np.ndarray:
    """Non-square frame (width / height = aspect) cut from the square one, keeping the defect inside."""
    size = img.shape[0]
    if aspect == 1.0:
        return img
    w, h = (size, int(round(size / aspect))) if aspect > 1 else (int(round(size * aspect)), size)
    cx, cy = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2) if bbox else rng.uniform(0, size, 2)
    x0 = int(np.clip(cx - w / 2 + rng.uniform(-0.2, 0.2) * w, 0, size - w))
    y0 = int(np.clip(cy - h / 2 + rng.uniform(-0.2, 0.2) * h, 0, size - h))
    return img[y0:y0 + h, x0:x0 + w]


def _add_info_bar(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Append a microscope data bar (dark band: kV, magnification, WD and a scale bar) below the frame."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = img.shape
    bar_h = max(10, int(h * rng.uniform(0.07, 0.12)))
    bar = Image.new("L", (w, bar_h), int(rng.integers(0, 40)))
    draw = ImageDraw.Draw(bar)
    font = ImageFont.load_default(size=max(7, int(bar_h * 0.55)))
    kv = float(rng.choice([0.5, 0.8, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0]))
    parts = [f"{kv:.1f}kV", f"x{rng.uniform(5, 300):.1f}k", f"WD {rng.uniform(2, 12):.1f}mm", "SE"]
    bx1 = w - 4
    bx0 = bx1 - int(w * rng.uniform(0.12, 0.25))
    while len(parts) > 1 and draw.textlength("  ".join(parts), font=font) > bx0 - 8:
        parts.pop()  # a narrow frame shows fewer marks rather than overlapping the scale bar
    draw.text((3, bar_h * 0.2), "  ".join(parts), fill=255, font=font)
    y = int(bar_h * 0.45)
    draw.rectangle([bx0, y, bx1, y + max(1, bar_h // 8)], fill=255)
    for x in (bx0, bx1):
        draw.line([x, y - bar_h // 5, x, y + bar_h // 5], fill=255)
    return np.vstack([img, np.asarray(bar)])


def _encode(img: np.ndarray, variant: _Variant, path: Path) -> None:
    """Write atomically (temp file + os.replace): an interrupted run never leaves a truncated image."""
    from PIL import Image

    if variant.fmt == "tiff16":
        pil, fmt, kw = Image.fromarray(img.astype(np.uint16) * 257), "TIFF", {}
    elif variant.fmt == "tiff12":
        pil, fmt, kw = Image.fromarray(((img.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)), "TIFF", {}
    else:
        pil = Image.fromarray(img)
        if variant.rgb:
            pil = pil.convert("RGB")
        fmt = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff8": "TIFF"}[variant.fmt]
        # PNG with run-length zlib: as small as level 6 on noisy frames, at a third of the time
        kw = {"quality": variant.quality} if fmt == "JPEG" else ({"compress_type": zlib.Z_RLE} if fmt == "PNG" else {})
    atomic_write(path, lambda f: pil.save(f, format=fmt, **kw), "wb", durable=False)


def _make_one(leaf: str, k: int, seed: int, size: int, difficulty: float, mixed: bool, out_dir: Path,
              rule: LabelRule) -> dict[str, Any]:
    """Render and write image k of `leaf`; returns its dataset.json record (path, format, severity, score)."""
    variant, vrng = _Variant(), None
    if mixed:  # its own stream: the frame's content is the same with or without mixed formats
        vrng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(LEAVES.index(leaf), int(k), 1)))
        variant = _sample_variant(vrng)
    frame = _render(leaf, np.random.default_rng(image_seed(seed, leaf, k)), size, difficulty,
                    locate=variant.aspect != 1.0, rule=rule)
    img = frame.image
    if vrng is not None:
        img = _crop_to_aspect(img, variant.aspect, frame.bbox, vrng)
        if variant.info_bar:
            img = _add_info_bar(img, vrng)
    folder = out_dir / leaf / variant.nested if variant.nested else out_dir / leaf
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{leaf}_{k:05d}{_EXT[variant.fmt]}"
    _encode(img, variant, path)
    record: dict[str, Any] = {"path": path.relative_to(out_dir).as_posix(), "class": leaf, "index": int(k),
                              "format": variant.fmt + ("+rgb" if variant.rgb else "")}
    if frame.kind is not None:
        record["kind"] = frame.kind
    if frame.pattern is not None:
        record["pattern"] = frame.pattern
    if frame.severity is not None:
        record.update(severity=round(frame.severity, 4), visibility=round(float(frame.visibility), 4),
                      draw=frame.draw, scenes=frame.scenes)
        if frame.rejected is not None:
            record["rejected"] = {"severity": round(frame.rejected[0], 4),
                                  "visibility": round(float(frame.rejected[1]), 4), "draw": frame.rejected[2]}
    return record


def _work(jobs: Sequence[tuple[str, int]], seed: int, size: int, difficulty: float, mixed: bool,
          out_dir: str, rule: LabelRule) -> tuple[list[dict[str, Any]], float]:
    """One worker chunk (top-level so it pickles): each image's record, and the CPU seconds used."""
    t0 = time.process_time()
    done = [_make_one(leaf, k, seed, size, difficulty, mixed, Path(out_dir), rule) for leaf, k in jobs]
    return done, time.process_time() - t0


# ====================================================================== generate
def _check_classes(classes: Iterable[str] | None) -> list[str]:
    if classes is None:
        return list(LEAVES)
    wanted = [str(c) for c in classes]
    bad = [c for c in wanted if c not in LEAVES]
    if bad:
        raise ValueError(f"unknown class(es) {', '.join(bad)}: synth renders {', '.join(LEAVES)}")
    return [c for c in LEAVES if c in wanted]


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new data set into a non-empty folder; with overwrite, clear a previous synth run. The
    refusals are OutputError (a FileExistsError): the CLI exits 2 on them, as on every refused output."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / DATASET_RECORD).is_file():  # not ours: never write into (or clear) a user's folder
            raise OutputError(f"{out}: folder is not empty and is not a data set written by synth; choose "
                              f"another folder")
        if not overwrite:
            raise OutputError(f"{out}: holds a synthetic data set (use --overwrite to replace it)")
        foreign = _files_synth_did_not_write(out)
        if foreign:
            raise OutputError(f"{out}: its class folders hold {len(foreign)} file(s) synth did not write (e.g. "
                              f"{foreign[0]}); --overwrite replaces only a data set synth wrote: move them out "
                              f"or choose another folder")
        for leaf in LEAVES:  # a previous synth run: drop its class folders so no stale images remain
            if (out / leaf).is_dir():
                shutil.rmtree(out / leaf)
    out.mkdir(parents=True, exist_ok=True)


def _files_synth_did_not_write(out: Path) -> list[str]:
    """Files under `out`'s class folders that its dataset.json does not list (everything, when it cannot be read):
    what an --overwrite would delete that synth never made, such as real frames a user added."""
    try:
        listed = {str(f["path"]) for f in json.loads((out / DATASET_RECORD).read_text(encoding="utf-8"))["frames"]}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return sorted(p.relative_to(out).as_posix() for leaf in LEAVES if (out / leaf).is_dir()
                  for p in (out / leaf).rglob("*") if not p.is_dir() and p.relative_to(out).as_posix() not in listed)


def _pool_context():
    """fork is fastest, but unsafe once TensorFlow's threads exist in this process: then spawn."""
    import multiprocessing as mp

    if sys.platform.startswith("linux") and "tensorflow" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def generate(out_dir: str | os.PathLike, per_class: int = 150, size: int = 256, seed: int = 0,
             workers: int | None = None, mixed_formats: bool = False, classes: Sequence[str] | None = None,
             progress: bool = True, *, overwrite: bool = False, difficulty: float = DEFAULT_DIFFICULTY,
             labels: str = DEFAULT_LABELS, visibility_size: int | None = None) -> dict[str, Any]:
    """Write a synthetic data set: one folder per class, `per_class` images each, plus dataset.json.

    `labels` is the label rule: `visible` (a defect draw an expert could not see at the model's input size,
    `visibility_size`, is redrawn) or `cause` (every draw is labelled: the old generator, byte for byte, kept as
    a stress set). dataset.json records the generator version, the rule and its threshold, every SEM frame's
    pattern (lines or holes), every defect frame's severity and visibility score (1 = the rule's threshold) and
    every bogus frame's kind. Returns stats: counts per class, formats, seconds,
    images_per_s, workers, cpu_ms_per_image (render, score and write time inside the workers: the
    machine-load-independent cost), and per defect class the share of frames that needed a redraw and the
    share below the rule. The files are identical for a given (seed, size, per_class, mixed_formats,
    difficulty, labels, visibility_size) whatever `workers` is.
    """
    from tqdm import tqdm

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1 (got {per_class})")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be within 0..1 (got {difficulty})")
    leaves = _check_classes(classes)
    _check_labels(labels)
    if visibility_size is not None and visibility_size < 16:
        raise ValueError(f"visibility size {visibility_size} is too small: use at least 16 px")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)  # refusals first: the calibration below takes seconds
    rule = label_rule(labels, size, difficulty, visibility_size)
    workers = max(1, int(workers or os.cpu_count() or 1))
    jobs = [(leaf, k) for leaf in leaves for k in range(per_class)]
    chunk = max(1, min(32, len(jobs) // (workers * 6) or 1))
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    args = (int(seed), int(size), float(difficulty), bool(mixed_formats), str(out), rule)
    results: list[dict[str, Any]] = []
    cpu = 0.0
    t0 = time.perf_counter()
    with tqdm(total=len(jobs), disable=not progress, unit="img", desc=f"synth {out.name}") as bar:
        if workers == 1 or len(chunks) == 1:
            for ch in chunks:
                done, used = _work(ch, *args)
                results, cpu = results + done, cpu + used
                bar.update(len(ch))
        else:
            with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=_pool_context()) as ex:
                futures = {ex.submit(_work, ch, *args): len(ch) for ch in chunks}
                try:
                    for fut in as_completed(futures):
                        done, used = fut.result()
                        results, cpu = results + done, cpu + used
                        bar.update(futures[fut])
                except BaseException:
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: (LEAVES.index(r["class"]), r["index"]))
    counts = {leaf: sum(1 for r in results if r["class"] == leaf) for leaf in leaves}
    summary = label_summary(results)
    meta = {"generator": "semhinet_tf.data.synth", "version": GENERATOR_VERSION, "seed": int(seed),
            "size": int(size), "per_class": int(per_class), "mixed_formats": bool(mixed_formats),
            "difficulty": float(difficulty), "classes": leaves, "counts": counts,
            "label_rule": {**rule.to_json(), "judged_at_px": min(rule.size, int(size))},
            "labels_summary": summary,
            "frames": results}
    _write_json(out / DATASET_RECORD, meta)
    return {"out_dir": str(out), "counts": counts, "total": len(results),
            "formats": dict(sorted(Counter(r["format"] for r in results).items())), "seconds": round(seconds, 3),
            "images_per_s": round(len(results) / max(seconds, 1e-9), 1), "workers": workers,
            "images_per_second": round(len(results) / max(seconds, 1e-9), 1),  # alias the CLI reads
            "cpu_ms_per_image": round(1000 * cpu / max(len(results), 1), 2), "labels": rule.labels,
            "labels_summary": summary}


def label_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per defect class: frames, share redrawn, share written below the rule (every faint draw under `cause`; under
    `visible` only a frame none of whose draws in MAX_SCENES scenes passed, which tiny frames make common), the
    median visibility score and the share that needed a new scene."""
    out = {}
    for leaf in DEFECTS:
        rows = [r for r in records if r["class"] == leaf and "visibility" in r]
        if rows:
            vis = np.asarray([r["visibility"] for r in rows])
            redrawn = np.mean([r["draw"] > 0 or r["scenes"] > 1 for r in rows])
            out[leaf] = {"frames": len(rows), "redrawn": round(float(redrawn), 4),
                         "below_rule": round(float(np.mean(vis < 1.0)), 4),
                         "median_visibility": round(float(np.median(vis)), 3),
                         "new_scene": round(float(np.mean([r["scenes"] > 1 for r in rows])), 4)}
    return out


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
