"""Exact metrics of the toy try-on world, computed from frames alone (numpy only).

Nothing here reads a `Scene`: every number comes from pixels, so the same code scores rendered
clips (known answers) and generated ones (blurry, noisy versions of them). The body layout of
`render.py` (fractions of the person height `h`, head top 0, feet 1) is the only prior used:

    hair cap ~ -0.005 .. 0.085, face 0.085 .. 0.184 (skin), torso = the top 0.197 .. 0.605,
    torso half width 0.105 h b, legs (the bottoms) 0.61 .. 1.0, the two legs 0.164 h b wide in all,
    where b (the "width factor") is build x turn squash, measured here from the legs' width.

How a frame is read: the background is estimated per row from the border columns, the
foreground is what differs from it (on a 3x3-smoothed copy), the person is the largest block of
foreground rows/columns; the feet are its bottom edge, the head top is the first row at least
80% as wide as the head (so a bun or a raised hand does not count), the centre x is the head's
centre, and b comes from the legs' width. Widths and edges use soft coverage (distance from the
background over the interior's), so they are sub-pixel and survive a blur. Colours are compared
by the dominant colour of each region or grid cell (a mode, not a mean, so a cell straddling two
bands or a blurred edge still reads as one of the real colours).

Calibration (rendered 160 x 96 frames; "degraded" = 3x3 box blur + gaussian noise sigma 6):
head-to-feet height within +-1.5% (within ~4% where the frame cuts the head off: then it comes
from the hanging hands), centre x within 0.7 px, width factor within ~5% (more when edge-on).
Garment pattern Delta-E, 400 frames of 80 samples, padded and square garments: the worn top
<= 0.1 clean, 99% <= 5.3 and all <= 12.3 degraded (the worst: vsplit tops nearly edge-on; tops
under NARROW_TORSO_PX are not scored), the reference's different top >= 32; hence
GARMENT_MATCH_DE = 18. Skin: same person <= 3 degraded, two palette tones apart >= 12 (adjacent
tones differ by 4 .. 14, so one tone apart is not always resolved); SKIN_MATCH_DE = 7. Hair: same
<= 3.7, palette hair colours differ by >= 27; HAIR_MATCH_DE = 15. Bottoms: same <= 4.7 degraded,
other palette colours >= 16; BOTTOMS_MATCH_DE = 10.
Motion thresholds sit at about half the slowest renderer motion (56 clips of 45 frames, all
kinds and speeds, clean and degraded: all classified right).

Units: positions and sizes in pixels of the frame (continuous coordinates: pixel i spans [i, i+1)),
colour differences in CIE76 Delta-E (Euclidean distance in CIE Lab, D65; ~2.3 is a just noticeable
difference), time in frames. Frames are uint8 [H, W, 3] (one) or [T, H, W, 3] (a clip); garment
images are a top laid flat on white, square or white-padded to any size.

Public API: `srgb_to_lab`, `delta_e`, `estimate_background`, `foreground_mask`, `locate_person`,
`body_regions`, `garment_body_box`, `pattern_kind`, `garment_fidelity`, `identity_score`, `bottoms_score`,
`trajectory`, `classify_motion`, `motion_kind_from_caption`, `motion_direction_correct`,
`smoothness`, `jump_at`, `switch_latency`, `drift`, `score_clip`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

MOTION_KINDS = ("walk_left", "walk_right", "toward", "wave", "turn", "jump", "still")  # == render.MOTIONS

# ---- layout priors (fractions of the person height h; see render.py) ------------------------
TORSO_TOP, TORSO_BOTTOM = 0.197, 0.605  # the top garment's box
TORSO_HALF_WIDTH = 0.105  # x h x b
LEGS_WIDTH = 0.164  # both legs (not the gap between them), x h x b
FACE_ROWS, FACE_HALF_WIDTH = (0.11, 0.17), 0.04  # skin, below the hair cap; half width x h
HAIR_ROWS, HAIR_HALF_WIDTH = (0.025, 0.065), 0.035  # the hair cap (or the bald scalp)
TORSO_ROWS = (0.31, 0.585)  # below long hair (to 0.28), above the waistband (0.60)
TORSO_COLS = 0.7  # inner fraction of the torso half width (avoids the arms and the edges)
LEG_ROWS, LEG_COLS = (0.64, 0.76), (0.02, 0.075)  # covered by pants, shorts and skirts; |x - cx| / (h b)
LEGS_MEASURE_ROWS = (0.84, 0.95)  # legs only (below a skirt, above the shoes): width factor
ARM_TOP, ARM_BOTTOM = 0.21, 0.55  # a hanging arm's rows
ARM_BAND = (0.76, 1.0)  # columns inside a hanging arm, |x - cx| in units of the legs' width
ARM_MIN_RUN = 0.6  # a hanging arm is a solid run of at least this fraction of its length
ARM_MAX_GAIN = 1.25  # the arms' height is trusted up to this factor above the cut-off head's

# ---- detection thresholds -------------------------------------------------------------------
FG_THRESHOLD = 22.0  # RGB distance from the row's background (3x3-smoothed frame) for foreground
BG_AGREE = 15.0  # left/right border colours closer than this (RGB) are both background
HEAD_WIDTH_FRAC = 0.8  # head top = first row at least this fraction of the head's widest row
HEAD_TOP_OFFSET = 0.035  # that row lies this far (x h) below the true head top (calibrated)
MIN_PERSON_FRAC = 0.12  # a person is at least this fraction of the frame height tall
MASK_DILATION = 1.0  # px the binary mask grows past a sharp edge (fallback where soft edges fail)

# ---- match thresholds (Delta-E; calibration in the module docstring) ----------------------------
GARMENT_MATCH_DE = 18.0  # mean per-cell Delta-E of the pattern grid
SKIN_MATCH_DE = 7.0  # adjacent skin tones of the palette differ by 4 .. 14
HAIR_MATCH_DE = 15.0  # hair colours differ by >= 27 (hair vs bald >= 4, see has_hair)
HAIR_PRESENT_DE = 10.0  # hair region this far from the face colour: the person has hair
BOTTOMS_MATCH_DE = 10.0  # bottoms colours of the palette differ by >= 16
PATTERN_SPLIT_DE = 20.0  # two parts of a top this different are different colours
MODE_RADIUS_DE = 10.0  # pixels this close to a region's densest pixel form its dominant colour
MODE_MAX_PIXELS = 64  # a region's pixels are subsampled evenly to at most this many

# ---- motion thresholds (relative to the median person height h) --------------------------------
WALK_SLOPE = 0.0007  # |d cx / dt| in h per frame (a slow walk is ~0.0016 h / frame)
WALK_MIN_PX = 2.0  # and at least this net displacement in pixels
TOWARD_LOG_SLOPE = 0.0012  # d log(height) / dt per frame (a slow approach is ~0.0026)
TOWARD_MIN_GROWTH = 0.03  # and at least this total log growth
JUMP_RANGE = 0.035  # detrended feet-y range in h (a jump lifts 0.09 h x identity height)
WAVE_ARM_AREA = 0.004  # median raised-arm area in h^2 (a raised arm is ~0.01 .. 0.02 h^2)
TURN_WIDTH_RANGE = 0.25  # relative range of the width factor (a turn squashes to 0.2)
JUMP_MIN_FRAC = 0.04  # a trajectory discontinuity of at least 0.04 h ...
JUMP_RATIO = 4.0  # ... and 4x the typical step deviation is a jump
MASK_JUMP_MIN = 0.35  # silhouette change (1 - IoU) of at least this ...
MASK_JUMP_RATIO = 3.0  # ... and 3x the typical change is a jump

GRID_ROWS = 8  # pattern grid: rows over the torso rows, two columns (left / right of centre)
GRID_COLS = ((-0.7, -0.16), (0.16, 0.7))  # in units of the torso half width
GRID_V = tuple((r - TORSO_TOP) / (TORSO_BOTTOM - TORSO_TOP) for r in TORSO_ROWS)  # the torso rows, as torso fractions
GRID_SHIFTS = np.linspace(-0.06, 0.06, 7)  # tolerated vertical misalignment (fraction of the torso height)
NARROW_TORSO_PX = 3.5  # a torso half width (px) below this (a turn seen edge-on) is not scored


# ---- colour ---------------------------------------------------------------------------------
_SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB [..., 3] in 0..255 -> CIE Lab [..., 3] (D65; L in 0..100), float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # [..., 3] linear RGB
    xyz = lin @ _SRGB_TO_XYZ.T / _D65  # [..., 3] white-normalised XYZ
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIE76 Delta-E between Lab colours [..., 3] -> [...]."""
    return np.linalg.norm(np.asarray(lab1, np.float64) - np.asarray(lab2, np.float64), axis=-1)


def _mode_lab(pixels: np.ndarray) -> np.ndarray:
    """[N, 3] RGB -> [3] Lab of the dominant colour: the mean of the pixels within MODE_RADIUS_DE of
    the pixel with the most such neighbours (a cell straddling two bands gets one band's colour,
    not their mixture). NaN for N == 0."""
    if len(pixels) == 0:
        return np.full(3, np.nan)
    if len(pixels) > MODE_MAX_PIXELS:
        pixels = pixels[np.linspace(0, len(pixels) - 1, MODE_MAX_PIXELS).round().astype(int)]
    lab = srgb_to_lab(pixels)  # [N, 3]
    near = delta_e(lab[:, None], lab[None, :]) < MODE_RADIUS_DE  # [N, N]
    centre = int(np.argmax(near.sum(1)))
    return lab[near[centre]].mean(0)


# ---- images ---------------------------------------------------------------------------------
def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean with edge replication: [H, W, C] or [H, W] float -> same shape."""
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (a.ndim - 2)
    p = np.pad(a, pad, mode="edge")
    s = p[:-2] + p[1:-1] + p[2:]  # [H, W + 2, ...]
    return (s[:, :-2] + s[:, 1:-1] + s[:, 2:]) / 9.0


def _as_frame(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame)
    if f.ndim != 3 or f.shape[2] != 3:
        raise ValueError(f"expected a frame [H, W, 3], got {f.shape}")
    return f


def _runs(on: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Runs [a, b] (inclusive) of True in a 1-D bool array, bridging gaps of <= max_gap."""
    idx = np.flatnonzero(on)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def estimate_background(frame: np.ndarray) -> np.ndarray:
    """Per-row background colour [H, 3] (float RGB) of a frame [H, W, 3].

    The wall is one colour per row (a vertical gradient, a floor band below the floor line), so
    each row's colour is read from its left and right border strips. Where the two disagree (the
    person touches one border) the one closer to the nearest agreeing rows wins. (The mask uses
    the same estimate on a 3x3-smoothed copy of the frame.)"""
    return _row_background(_as_frame(frame).astype(np.float32))


def _row_background(sm: np.ndarray) -> np.ndarray:
    h, w, _ = sm.shape
    k = max(2, w // 32)  # border strip width, px
    left, right = sm[:, :k].mean(1), sm[:, -k:].mean(1)  # [H, 3] each
    agree = np.linalg.norm(left - right, axis=1) < BG_AGREE  # [H]
    bg = (left + right) / 2
    if agree.all():
        return bg
    if not agree.any():  # no row agrees: the side that varies less along y
        tv = lambda c: float(np.abs(np.diff(c, axis=0)).sum())
        return left if tv(left) <= tv(right) else right
    rows = np.arange(h)
    above = np.maximum.accumulate(np.where(agree, rows, -1))  # nearest agreeing row above (or -1)
    below = np.minimum.accumulate(np.where(agree, rows, h)[::-1])[::-1]  # ... below (or h)

    def dist_to_neighbours(c: np.ndarray) -> np.ndarray:  # [H]: to the nearer agreeing neighbour
        d = np.full(h, np.inf)
        ok = above >= 0
        d[ok] = np.linalg.norm(c[ok] - bg[above[ok]], axis=1)
        ok = below < h
        d[ok] = np.minimum(d[ok], np.linalg.norm(c[ok] - bg[below[ok]], axis=1))
        return d

    pick_left = dist_to_neighbours(left) <= dist_to_neighbours(right)
    out = np.where(pick_left[:, None], left, right)
    return np.where(agree[:, None], bg, out)


def _foreground_dist(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dist, mask, bg): float [H, W] RGB distance of the 3x3-smoothed frame from its row's
    background, bool [H, W] foreground (dist > FG_THRESHOLD, isolated specks dropped) and the
    background [H, 3]."""
    sm = _box3(frame.astype(np.float32))
    bg = _row_background(sm)
    dist = np.linalg.norm(sm - bg[:, None, :], axis=2)
    mask = dist > FG_THRESHOLD
    neighbours = _box3(mask.astype(np.float32)) * 9  # [H, W] count in the 3x3 window
    return dist, mask & (neighbours >= 3.5), bg


def _foreground(frame: np.ndarray) -> np.ndarray:
    return _foreground_dist(frame)[1]


def _coverage(dist: np.ndarray, mask: np.ndarray, ref_rows: int | None = None) -> np.ndarray:
    """Soft coverage in 0..1 of a block [rows, cols]: each foreground pixel's distance over the
    block's interior distance (75th percentile over its first `ref_rows` rows, default all).
    Edge pixels are mixtures, so a row's coverage sum is a sub-pixel width, even after a blur."""
    ref_block, ref_mask = dist[:ref_rows], mask[:ref_rows]
    if not ref_mask.any():
        return mask.astype(np.float64)
    ref = max(float(np.percentile(ref_block[ref_mask], 75)), 1e-6)
    return np.where(mask, np.clip(dist / ref, 0.0, 1.0), 0.0)


def foreground_mask(frame: np.ndarray) -> np.ndarray:
    """bool [H, W]: everything that is not the wall/floor background."""
    return _foreground(_as_frame(frame))


# ---- the person -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Person:
    top: int  # first mask row (a raised hand or a bun included), px
    bottom: int  # last mask row, px
    left: int
    right: int
    cx: float  # body centre x (the head's centre), px
    feet: float  # bottom edge of the feet, px
    height: float  # head top to feet, px
    width_factor: float  # b: build x turn squash (1 = nominal width)
    legs_extent: float  # measured soft width of both legs together, px
    arm_up: float  # mask area beside the head above the shoulders, in h^2
    clipped_top: bool  # the head leaves the frame at the top (height is then estimated)
    clipped_side: bool  # the person touches the left or right border
    mask: np.ndarray  # bool [H, W]: the person's pixels
    dist: np.ndarray  # float [H, W]: distance from the background (RGB, smoothed frame)
    bg: np.ndarray  # float [H, 3]: the background colour of each row
    height_from: str = "head"  # what the height was read from: "head" | "arms" | "legs" (see _locate)

    @property
    def head_top(self) -> float:
        return self.feet - self.height

    def y(self, f: float) -> float:
        """Pixel y of the body fraction f (0 head top, 1 feet)."""
        return self.feet - self.height + f * self.height

    def as_dict(self) -> dict:
        return {
            "top": self.top,
            "bottom": self.bottom,
            "left": self.left,
            "right": self.right,
            "cx": float(self.cx),
            "feet": float(self.feet),
            "head_top": float(self.head_top),
            "height": float(self.height),
            "width_factor": float(self.width_factor),
            "torso_width": float(2 * TORSO_HALF_WIDTH * self.height * self.width_factor),
            "arm_up": float(self.arm_up),
            "clipped_top": bool(self.clipped_top),
            "clipped_side": bool(self.clipped_side),
            "height_from": self.height_from,
        }


def _centroid_x(mask: np.ndarray, y0: float, y1: float, cx: float, half: float) -> float | None:
    """Mean x (px, continuous) of mask pixels with centres in rows [y0, y1) and |x - cx| <= half."""
    h, w = mask.shape
    r0, r1 = max(0, int(math.ceil(y0 - 0.5))), min(h, int(math.ceil(y1 - 0.5)))
    c0, c1 = max(0, int(math.ceil(cx - half - 0.5))), min(w, int(math.floor(cx + half - 0.5)) + 1)
    if r1 <= r0 or c1 <= c0:
        return None
    _, xs = np.nonzero(mask[r0:r1, c0:c1])
    return float(xs.mean() + c0 + 0.5) if len(xs) else None


def _run_centre(dist: np.ndarray, mask: np.ndarray, y0: float, y1: float, cx: float) -> float | None:
    """Median over rows [y0, y1) of the soft centroid (px) of the mask run containing column cx
    (the run plus one pixel each side, each pixel weighted by its distance over the row's largest)."""
    h, w = mask.shape
    c = int(np.clip(math.floor(cx), 0, w - 1))
    centres = []
    for r in range(max(0, int(math.ceil(y0 - 0.5))), min(h, int(math.ceil(y1 - 0.5)))):
        row = mask[r]
        if not row[c]:
            continue
        off = np.flatnonzero(~row[c:])
        right = c + (int(off[0]) if len(off) else w - c)  # first background column right of the run
        off = np.flatnonzero(~row[: c + 1][::-1])
        left = c + 1 - (int(off[0]) if len(off) else c + 1)  # first column of the run
        a, b = max(0, left - 1), min(w, right + 1)
        d = dist[r, a:b]
        wts = np.clip(d / max(float(d.max()), 1e-6), 0.0, 1.0)
        centres.append(float((wts * (np.arange(a, b) + 0.5)).sum() / wts.sum()))
    return float(np.median(centres)) if centres else None


def _legs_extent(dist: np.ndarray, mask: np.ndarray, feet: float, height: float, cx: float) -> float | None:
    """Median soft width (px) of both legs together, gap excluded (rows LEGS_MEASURE_ROWS), or
    None if not visible."""
    hgt, w = mask.shape
    r0 = max(0, int(round(feet - height + LEGS_MEASURE_ROWS[0] * height)))
    r1 = min(hgt, int(round(feet - height + LEGS_MEASURE_ROWS[1] * height)))
    c0, c1 = max(0, int(cx - 0.25 * height)), min(w, int(cx + 0.25 * height) + 1)
    widths = [
        float(_coverage(dist[r : r + 1, c0:c1], mask[r : r + 1, c0:c1]).sum())
        for r in range(r0, r1)
        if mask[r, c0:c1].any()
    ]
    return max(1.0, float(np.median(widths))) if widths else None


def _feet_edge(dist: np.ndarray, mask: np.ndarray, r1: int, c0: int, c1: int) -> float:
    """Sub-pixel bottom edge (px) of the feet, the last foreground row being r1: the coverage
    summed down the columns that are solid 3 rows above it."""
    hgt = mask.shape[0]
    top = max(0, r1 - 3)
    row = np.where(mask[top, c0 : c1 + 1], dist[top, c0 : c1 + 1], 0.0)
    cols = np.flatnonzero(row >= 0.8 * row.max()) + c0 if row.max() > 0 else np.zeros(0, int)  # the shoes' insides
    if len(cols) == 0:
        return float(r1 + 1) - MASK_DILATION
    block = slice(top, min(hgt, r1 + 2))
    cov = _coverage(dist[block][:, cols], dist[block][:, cols] > FG_THRESHOLD / 2, ref_rows=2)
    return float(top + np.median(cov.sum(0)))


def _height_from_arms(mask: np.ndarray, feet: float, cx: float, legs: float) -> float | None:
    """Height (px) from the hanging arms' lower end (layout ARM_BOTTOM), for a head cut off by
    the frame: the topmost solid run in a column band beside the torso, ARM_BAND x the legs'
    width from the centre (so independent of the build), on either side; None if neither side
    shows a hanging arm (a run at least ARM_MIN_RUN of the arm's length, or cut at the top);
    with both, the lower hand (a raised arm crossing the band ends higher)."""
    _, w = mask.shape
    xs = np.arange(w) + 0.5
    found = []
    for side in (-1, 1):
        off = side * (xs - cx)
        cols = np.flatnonzero((off >= ARM_BAND[0] * legs) & (off <= ARM_BAND[1] * legs))
        if len(cols) == 0:
            continue
        occ = mask[: int(feet), cols].mean(1)  # [rows] fraction of the band that is foreground
        runs = _runs(occ >= 0.5, max_gap=1)
        if not runs:
            continue
        r0, r1 = runs[0]  # the topmost run is the arm (a skirt lies lower)
        h = (feet - (r1 + 1 - MASK_DILATION)) / (1 - ARM_BOTTOM)
        if r1 + 1 - r0 >= ARM_MIN_RUN * (ARM_BOTTOM - ARM_TOP) * h or (r0 == 0 and r1 + 1 >= 0.1 * h):
            found.append(h)
    return float(min(found)) if found else None  # a raised arm ends higher, so reads taller


def _head_top(dist: np.ndarray, mask: np.ndarray, r0: int, feet: float, cx: float) -> tuple[float, str]:
    """(head top y px, cut off: "no" | "maybe" | "sure") from the column band at the centre: the
    first row at least HEAD_WIDTH_FRAC as wide as the head (skips a bun and hands beside the head)."""
    h0 = feet - r0
    band = max(1.5, 0.05 * h0)
    c0, c1 = max(0, int(round(cx - band))), min(mask.shape[1], int(round(cx + band)) + 1)
    rows = np.flatnonzero(mask[r0 : int(feet), c0:c1].any(1))
    if len(rows) == 0:
        return float(r0), "no"
    top_c = r0 + int(rows[0])
    h0 = feet - top_c
    win = 0.1 * h0
    c0, c1 = max(0, int(round(cx - win))), min(mask.shape[1], int(round(cx + win)) + 1)
    r1 = min(int(feet), top_c + max(2, int(round(0.16 * h0))))
    ref_rows = max(2, int(round(0.06 * h0)))  # the hair cap (or the scalp) sets the contrast
    widths = _coverage(dist[top_c:r1, c0:c1], mask[top_c:r1, c0:c1], ref_rows).sum(1)  # [rows] head widths, px
    peak = np.maximum.accumulate(widths)
    neck = np.flatnonzero((widths[:-1] < 0.75 * peak[:-1]) & (widths[1:] > widths[:-1] + 1.0))
    if len(neck):  # a head cut off by the frame ends within the window: stop at the chin
        widths = widths[: neck[0] + 1]
    thr = HEAD_WIDTH_FRAC * widths.max()
    first = int(np.flatnonzero(widths >= thr)[0])
    y = top_c + first + 0.5  # the first wide row's centre, refined to where the width crosses thr
    if first > 0 and widths[first] > widths[first - 1]:
        y -= (widths[first] - thr) / (widths[first] - widths[first - 1])
    # cut off by the frame: surely if the top row is a wide one; maybe if it is already nearly as
    # wide as the head (a cut-off bun can be too; the caller checks against the arms)
    if top_c > 0:
        return float(y), "no"
    if first <= 1:
        return float(y), "sure"
    return float(y), "maybe" if widths[0] >= 0.6 * widths[first] else "no"


def _locate(frame: np.ndarray) -> _Person | None:
    """The person of a frame [H, W, 3], or None (see `locate_person`)."""
    hgt, _, _ = frame.shape
    dist, fg, bg = _foreground_dist(frame)
    runs = _runs(fg.sum(1) >= 2, max_gap=2)
    if not runs:
        return None
    counts = fg.sum(1)
    r0, r1 = max(runs, key=lambda r: counts[r[0] : r[1] + 1].sum())
    cols = fg[r0 : r1 + 1].sum(0)
    cruns = _runs(cols >= 1, max_gap=2)
    c0, c1 = max(cruns, key=lambda r: cols[r[0] : r[1] + 1].sum())
    mask = np.zeros_like(fg)
    mask[r0 : r1 + 1, c0 : c1 + 1] = fg[r0 : r1 + 1, c0 : c1 + 1]
    box_h = r1 + 1 - r0
    if box_h < max(8, MIN_PERSON_FRAC * hgt) or mask.sum() < max(30, 0.02 * box_h * box_h):
        return None
    feet = _feet_edge(dist, mask, r1, c0, c1)
    # centre: legs first (rows near the feet), then the head's centre
    cx = _centroid_x(mask, feet - 0.2 * box_h, feet - 0.06 * box_h, (c0 + c1 + 1) / 2, box_h)
    if cx is None:
        return None
    cut = "no"
    height = float(box_h)
    for _ in range(2):
        head_row, cut = _head_top(dist, mask, r0, feet, cx)
        height = (feet - head_row) / (1 - HEAD_TOP_OFFSET)
        hx = _run_centre(dist, mask, feet - height + 0.03 * height, feet - height + 0.15 * height, cx)
        if hx is not None and cut == "no":
            cx = hx
    legs = _legs_extent(dist, mask, feet, height, cx)
    source, clipped = "head", cut == "sure"
    if cut != "no":  # the head may be cut off: height from the hands, else a nominal width factor
        bound = height  # a lower bound if it is cut off
        for _ in range(2):
            arms = _height_from_arms(mask, feet, cx, legs) if legs else None
            if arms is not None and bound <= arms <= ARM_MAX_GAIN * bound:
                height, source, clipped = arms, "arms", True
            elif cut == "sure" and legs:
                height, source = max(bound, legs / LEGS_WIDTH), "legs"
            legs = _legs_extent(dist, mask, feet, height, cx)
        hx = _run_centre(dist, mask, feet - height + 0.03 * height, feet - height + 0.15 * height, cx)
        if hx is not None:  # what shows of the head still centres the body
            cx = hx
    b = legs / (LEGS_WIDTH * height) if legs else 1.0
    legs = legs or float("nan")
    return _finish(mask, dist, bg, r0, r1, c0, c1, cx, feet, height, b, legs, clipped, source)


def _finish(
    mask: np.ndarray,
    dist: np.ndarray,
    bg: np.ndarray,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    cx: float,
    feet: float,
    height: float,
    b: float,
    legs: float,
    clipped: bool,
    source: str = "head",
) -> _Person:
    """Assemble a person and its raised-arm area."""
    wid = mask.shape[1]
    ys, xs = np.nonzero(mask)
    shoulder = feet - height + 0.19 * height
    beside = np.abs(xs + 0.5 - cx) > 0.12 * height
    arm_up = float(np.count_nonzero(beside & (ys + 0.5 < shoulder))) / (height * height)
    side = c0 == 0 or c1 == wid - 1
    return _Person(r0, r1, c0, c1, cx, feet, height, b, legs, arm_up, clipped, side, mask, dist, bg, source)


def locate_person(frame: np.ndarray) -> dict | None:
    """Find the person in a frame [H, W, 3] uint8.

    Returns None when no person is found, else a dict (pixels unless said otherwise):
      top, bottom, left, right: the foreground box (inclusive rows/columns; a raised hand, a bun
        and a skirt included), cx: the body centre x (the head's centre), feet: the feet's bottom
        edge y, head_top: the top of the head (a bun and raised hands excluded), height: feet -
        head_top, width_factor: build x turn squash from the legs' width (1 = nominal),
        torso_width: the top's width, arm_up: foreground area beside the head above the
        shoulders (units of height^2; a raised arm is ~0.01), clipped_top / clipped_side (bools),
      height_from: "head" (the head top), or for a head cut off by the frame "arms" (the hanging
        hands' lower end, layout 0.55) or "legs" (the legs' width at a nominal build; clip
        functions replace it with the clip's own height / legs-width ratio).
    """
    p = _locate(_as_frame(frame))
    return None if p is None else p.as_dict()


# ---- regions --------------------------------------------------------------------------------
def _region_box(
    p: _Person, rows: tuple[float, float], x0: float, x1: float, shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Integer [r0, r1) x [c0, c1) of body rows `rows` (fractions of h) and x in [x0, x1) px, at least 1x1."""
    h, w = shape
    r0 = int(np.clip(round(p.y(rows[0])), 0, h - 1))
    r1 = int(np.clip(round(p.y(rows[1])), r0 + 1, h))
    c0 = int(np.clip(round(x0), 0, w - 1))
    c1 = int(np.clip(round(x1), c0 + 1, w))
    return r0, r1, c0, c1


def _region_pixels(frame: np.ndarray, p: _Person, name: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """RGB pixels [N, 3] of a body region ("face", "hair", "torso", "legs") and its box."""
    h, b, shape = p.height, p.width_factor, frame.shape[:2]
    if name == "face":
        box = _region_box(p, FACE_ROWS, p.cx - FACE_HALF_WIDTH * h, p.cx + FACE_HALF_WIDTH * h, shape)
    elif name == "hair":
        box = _region_box(p, HAIR_ROWS, p.cx - HAIR_HALF_WIDTH * h, p.cx + HAIR_HALF_WIDTH * h, shape)
    elif name == "torso":
        hw = TORSO_COLS * TORSO_HALF_WIDTH * h * b
        box = _region_box(p, TORSO_ROWS, p.cx - hw, p.cx + hw, shape)
    elif name == "legs":
        hw = LEG_COLS[1] * h * b
        box = _region_box(p, LEG_ROWS, p.cx - hw, p.cx + hw, shape)
    else:
        raise ValueError(f"unknown region {name!r}")
    r0, r1, c0, c1 = box
    pix = frame[r0:r1, c0:c1].reshape(-1, 3)
    keep = p.mask[r0:r1, c0:c1].reshape(-1)
    if name == "legs":  # not the gap between the legs, nor their blurred edges (mixed with the wall)
        xs = np.tile(np.arange(c0, c1) + 0.5, r1 - r0)
        keep = keep & (np.abs(xs - p.cx) >= LEG_COLS[0] * h * b)
        d = np.linalg.norm(frame[r0:r1, c0:c1].astype(np.float32) - p.bg[r0:r1, None], axis=2).reshape(-1)
        if keep.any():
            keep = keep & (d >= 0.9 * np.percentile(d[keep], 90))
    if name != "torso" and keep.sum() >= 3:
        pix = pix[keep]
    return pix, box


def _region_lab(frame: np.ndarray, p: _Person, name: str) -> np.ndarray:
    """[3] dominant Lab colour of a body region (robust to a few background or edge pixels)."""
    return _mode_lab(_region_pixels(frame, p, name)[0])


def body_regions(frame: np.ndarray) -> dict | None:
    """The body regions of the person in a frame, or None when there is no person.

    Returns {name: {"box": (row0, row1, col0, col1) half-open pixel box, "pixels": count used,
    "rgb": median colour (0..255), "lab": dominant colour in CIE Lab (what the scores compare)}}
    for name in "face" (skin), "hair" (the hair cap, or the bald scalp), "torso" (the inner part
    of the top) and "legs" (the bottoms; foreground pixels off the gap and the blurred edges)."""
    frame = _as_frame(frame)
    p = _locate(frame)
    if p is None:
        return None
    out = {}
    for name in ("face", "hair", "torso", "legs"):
        pix, box = _region_pixels(frame, p, name)
        out[name] = {
            "box": tuple(int(v) for v in box),
            "pixels": len(pix),
            "rgb": tuple(float(v) for v in np.median(pix, axis=0)),
            "lab": tuple(float(v) for v in _mode_lab(pix)),
        }
    return out


# ---- garments -------------------------------------------------------------------------------
def garment_body_box(garment_image: np.ndarray) -> tuple[float, float, float, float] | None:
    """(y0, y1, x0, x1) px of the garment's body (no sleeves) in an image of a top on white.

    The body spans the silhouette's full height; its width is read near the hem, below the
    sleeves. None if the image has no non-white silhouette."""
    g = _as_frame(garment_image).astype(np.float32)
    nonwhite = np.linalg.norm(g - 255.0, axis=2) > 40.0  # [H, W]
    runs = _runs(nonwhite.sum(1) >= 2, max_gap=2)
    if not runs:
        return None
    counts = nonwhite.sum(1)
    r0, r1 = max(runs, key=lambda r: counts[r[0] : r[1] + 1].sum())
    y0, y1 = float(r0), float(r1 + 1)
    lefts, rights = [], []
    for r in range(int(y0 + 0.75 * (y1 - y0)), int(y0 + 0.95 * (y1 - y0))):
        xs = np.flatnonzero(nonwhite[r])
        if len(xs):
            lefts.append(xs[0])
            rights.append(xs[-1] + 1)
    if not lefts:
        return None
    return y0, y1, float(np.median(lefts)), float(np.median(rights))


def _grid(frame: np.ndarray, top: float, bottom: float, cx: float, half: float, v_shift: float = 0.0) -> np.ndarray:
    """Pattern grid [GRID_ROWS, 2, 3] (dominant Lab colour per cell) of a garment body spanning
    rows top .. bottom (px) and cx +- half (px); cells cover GRID_V (+ v_shift) x GRID_COLS."""
    h, w, _ = frame.shape
    v = np.linspace(GRID_V[0], GRID_V[1], GRID_ROWS + 1) + v_shift
    ys = top + v * (bottom - top)
    out = np.full((GRID_ROWS, 2, 3), np.nan)
    for j, (u0, u1) in enumerate(GRID_COLS):
        c0 = int(np.clip(round(cx + u0 * half), 0, w - 1))
        c1 = int(np.clip(round(cx + u1 * half), c0 + 1, w))
        for i in range(GRID_ROWS):
            r0 = int(np.clip(round(ys[i]), 0, h - 1))
            r1 = int(np.clip(round(ys[i + 1]), r0 + 1, h))
            out[i, j] = _mode_lab(frame[r0:r1, c0:c1].reshape(-1, 3))
    return out


@dataclass(frozen=True)
class _GarmentRef:
    grids: np.ndarray  # [S, GRID_ROWS, 2, 3]: the body's pattern grid at each of GRID_SHIFTS
    kind: str  # estimated pattern


_GARMENT_CACHE: dict[tuple, _GarmentRef | None] = {}


def _garment_ref(garment_image: np.ndarray) -> _GarmentRef | None:
    """The garment's pattern grids (memoised on the image bytes: clips reuse a few garments)."""
    g = np.ascontiguousarray(_as_frame(garment_image))
    key = (g.shape, str(g.dtype), hash(g.tobytes()))
    if key not in _GARMENT_CACHE:
        if len(_GARMENT_CACHE) >= 32:
            _GARMENT_CACHE.pop(next(iter(_GARMENT_CACHE)))
        _GARMENT_CACHE[key] = _garment_ref_uncached(g)
    return _GARMENT_CACHE[key]


def _garment_ref_uncached(garment_image: np.ndarray) -> _GarmentRef | None:
    box = garment_body_box(garment_image)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    g = _as_frame(garment_image)
    grids = np.stack([_grid(g, y0, y1, (x0 + x1) / 2, (x1 - x0) / 2, s) for s in GRID_SHIFTS])
    return _GarmentRef(grids, pattern_kind(grids[len(GRID_SHIFTS) // 2]))


def pattern_kind(grid: np.ndarray) -> str:
    """ "solid" | "halves" | "stripes" | "vsplit" from a pattern grid [rows, 2, 3] (Lab): left vs
    right columns differ -> vsplit; else the rows' colours: one colour -> solid, one change
    between two colours -> halves, more -> stripes."""
    g = np.nan_to_num(grid, nan=0.0)
    if float(np.mean(delta_e(g[:, 0], g[:, 1]))) > PATTERN_SPLIT_DE:
        return "vsplit"
    prof = g.mean(1)  # [rows, 3]
    d = delta_e(prof[:, None], prof[None, :])  # [rows, rows]
    if d.max() <= PATTERN_SPLIT_DE:
        return "solid"
    a, b = np.unravel_index(int(np.argmax(d)), d.shape)
    label = d[:, a] > d[:, b]  # nearer to b
    return "halves" if int(np.count_nonzero(np.diff(label.astype(int)))) <= 1 else "stripes"


def _fidelity(frame: np.ndarray, p: _Person | None, ref: _GarmentRef | None) -> dict:
    nan = float("nan")
    out = {
        "pattern_delta_e": nan,
        "colour_delta_e": nan,
        "torso_pattern": "none",
        "garment_pattern": ref.kind if ref else "none",
        "pattern_agrees": False,
        "measurable": True,
        "matches": False,
    }
    if p is None or ref is None:
        return out
    half = TORSO_HALF_WIDTH * p.height * p.width_factor  # px
    if half < NARROW_TORSO_PX:  # a turn seen edge-on: the top is a sliver, not scored
        out["measurable"] = False
        return out
    t = _grid(frame, p.y(TORSO_TOP), p.y(TORSO_BOTTOM), p.cx, half)  # [rows, 2, 3]
    errs = delta_e(t[None], ref.grids)  # [S, rows, 2]: each cell against the garment at each shift
    pat = float(np.nanmean(np.min(errs, axis=0)))  # each cell at its best alignment
    centre = ref.grids[len(GRID_SHIFTS) // 2]
    col = float(delta_e(np.nanmean(t, axis=(0, 1)), np.nanmean(centre, axis=(0, 1))))
    kind = pattern_kind(t)
    out.update(
        pattern_delta_e=pat,
        colour_delta_e=col,
        torso_pattern=kind,
        pattern_agrees=kind == ref.kind,
        matches=bool(pat <= GARMENT_MATCH_DE),
    )
    return out


def garment_fidelity(frame: np.ndarray, garment_image: np.ndarray) -> dict:
    """How well the top worn in `frame` matches `garment_image` (square or white-padded).

    Both are read as a pattern grid: GRID_ROWS rows over the torso rows TORSO_ROWS x 2 columns
    (left / right of centre, within GRID_COLS of the half width), the dominant Lab colour per
    cell; the garment's body box (`garment_body_box`: no sleeves; the neckline lies above the
    grid) maps onto the torso box (layout 0.197 .. 0.605). Returns
      pattern_delta_e: mean over cells of the cell's Delta-E at its best vertical alignment
        (within +-6% of the torso height): low only if colours *and* layout agree, so solid /
        halves / stripes / vsplit in the same colours are told apart,
      colour_delta_e: Delta-E of the grids' mean colours (pattern-blind),
      torso_pattern / garment_pattern: the estimated pattern kinds (`pattern_kind`),
        pattern_agrees: they are equal,
      measurable: False when the torso is under NARROW_TORSO_PX half wide (a turn seen edge-on;
        then NaNs, matches False, and clip scores skip the frame),
      matches: pattern_delta_e <= GARMENT_MATCH_DE (18: the worn top scores <= 5.3 in 99% of
        blurred, noisy frames, a different top >= 32).
    No person or no garment silhouette: NaNs and matches False."""
    frame = _as_frame(frame)
    return _fidelity(frame, _locate(frame), _garment_ref(garment_image))


# ---- identity and bottoms -------------------------------------------------------------------
def _identity(frame: np.ndarray, p: _Person | None, ref: dict | None) -> dict:
    if p is None or ref is None:
        return {
            "skin_delta_e": float("nan"),
            "hair_delta_e": float("nan"),
            "has_hair": False,
            "reference_has_hair": bool(ref and ref["has_hair"]),
            "hair_agrees": False,
            "matches": False,
        }
    face, hair = _region_lab(frame, p, "face"), _region_lab(frame, p, "hair")
    has_hair = bool(delta_e(face, hair) > HAIR_PRESENT_DE)
    skin_de, hair_de = float(delta_e(face, ref["face"])), float(delta_e(hair, ref["hair"]))
    return {
        "skin_delta_e": skin_de,
        "hair_delta_e": hair_de,
        "has_hair": has_hair,
        "reference_has_hair": ref["has_hair"],
        "hair_agrees": has_hair == ref["has_hair"],
        "matches": bool(skin_de <= SKIN_MATCH_DE and hair_de <= HAIR_MATCH_DE),
    }


def _identity_ref(reference_image: np.ndarray) -> dict | None:
    ref = _as_frame(reference_image)
    p = _locate(ref)
    if p is None:
        return None
    face, hair = _region_lab(ref, p, "face"), _region_lab(ref, p, "hair")
    return {
        "face": face,
        "hair": hair,
        "legs": _region_lab(ref, p, "legs"),
        "has_hair": bool(delta_e(face, hair) > HAIR_PRESENT_DE),
    }


def identity_score(frame: np.ndarray, reference_image: np.ndarray) -> dict:
    """The person's identity in `frame` against the reference image (same person, any top).

    Returns skin_delta_e (face region), hair_delta_e (hair region; bald heads compare scalp
    skin), has_hair / reference_has_hair (hair region differs from the face by > HAIR_PRESENT_DE),
    hair_agrees, and matches: skin_delta_e <= SKIN_MATCH_DE (7) and hair_delta_e <= HAIR_MATCH_DE (15)."""
    frame = _as_frame(frame)
    return _identity(frame, _locate(frame), _identity_ref(reference_image))


def _bottoms(frame: np.ndarray, p: _Person | None, ref: dict | None) -> dict:
    if p is None or ref is None:
        return {"delta_e": float("nan"), "matches": False}
    d = float(delta_e(_region_lab(frame, p, "legs"), ref["legs"]))
    return {"delta_e": d, "matches": bool(d <= BOTTOMS_MATCH_DE)}


def bottoms_score(frame: np.ndarray, reference_image: np.ndarray) -> dict:
    """The bottoms in `frame` against the reference image: delta_e of the legs regions' dominant
    colours (rows LEG_ROWS, covered by pants, shorts and skirts) and matches: <= BOTTOMS_MATCH_DE (10)."""
    frame = _as_frame(frame)
    return _bottoms(frame, _locate(frame), _identity_ref(reference_image))


# ---- clips and motion -----------------------------------------------------------------------
def _as_clip(frames: np.ndarray) -> np.ndarray:
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[3] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {f.shape}")
    return f


def _locate_clip(frames: np.ndarray) -> list[_Person | None]:
    """`_locate` per frame; frames whose head is cut off and whose arms did not give the height
    get it from the legs' width at the clip's own height / legs-width ratio (measured where the
    head is visible) instead of a nominal build."""
    people = [_locate(f) for f in frames]
    ratios = [p.height / p.legs_extent for p in people if p and not p.clipped_top and p.legs_extent > 0]
    if not ratios:
        return people
    ratio = float(np.median(ratios))
    out: list[_Person | None] = []
    for p in people:
        if p is not None and p.height_from == "legs" and p.legs_extent > 0:
            height = max(p.feet, ratio * p.legs_extent)
            legs = _legs_extent(p.dist, p.mask, p.feet, height, p.cx) or p.legs_extent
            height = max(p.feet, ratio * legs)
            p = _finish(
                p.mask,
                p.dist,
                p.bg,
                p.top,
                p.bottom,
                p.left,
                p.right,
                p.cx,
                p.feet,
                height,
                legs / (LEGS_WIDTH * height),
                legs,
                True,
                "legs",
            )
        out.append(p)
    return out


def _trajectory(people: list[_Person | None]) -> dict[str, np.ndarray]:
    nan = float("nan")
    get = lambda f: np.array([f(p) if p is not None else nan for p in people], np.float64)
    return {
        "cx": get(lambda p: p.cx),
        "feet": get(lambda p: p.feet),
        "height": get(lambda p: p.height),
        "width_factor": get(lambda p: p.width_factor),
        "torso_width": get(lambda p: 2 * TORSO_HALF_WIDTH * p.height * p.width_factor),
        "arm_up": get(lambda p: p.arm_up),
        "found": np.array([p is not None for p in people]),
    }


def trajectory(frames: np.ndarray) -> dict[str, list]:
    """Per-frame track of the person in frames [T, H, W, 3]: lists of length T of
    cx (px), feet (px), height (px), width_factor (1 = nominal; a turn squashes it),
    torso_width (px), arm_up (raised-arm area, units of height^2), found (bool); NaN where not found."""
    tr = _trajectory(_locate_clip(_as_clip(frames)))
    return {k: [bool(x) if k == "found" else float(x) for x in v] for k, v in tr.items()}


def _theil_sen(t: np.ndarray, x: np.ndarray) -> float:
    """Median pairwise slope of x(t) (robust to outliers); 0 for < 2 points."""
    if len(t) < 2:
        return 0.0
    i, j = np.triu_indices(len(t), 1)
    if len(i) > 20000:  # long clips: a fixed subsample of pairs
        pick = np.random.default_rng(0).choice(len(i), 20000, replace=False)
        i, j = i[pick], j[pick]
    return float(np.median((x[j] - x[i]) / (t[j] - t[i])))


def _motion_features(tr: dict[str, np.ndarray]) -> dict[str, float] | None:
    ok = tr["found"]
    if ok.sum() < 3:
        return None
    t = np.flatnonzero(ok).astype(np.float64)
    cx, feet, hgt = tr["cx"][ok], tr["feet"][ok], tr["height"][ok]
    wf, arm = tr["width_factor"][ok], tr["arm_up"][ok]
    h = float(np.median(hgt))
    span = float(t[-1] - t[0])
    vx = _theil_sen(t, cx)
    growth = _theil_sen(t, np.log(hgt))
    vf = _theil_sen(t, feet)
    resid = feet - (feet[0] + vf * (t - t[0]))
    resid = resid - np.median(resid)
    return {
        "h": h,
        "frames": float(len(t)),
        "dx_per_frame": vx / h,
        "dx_px": vx * span,
        "log_growth_per_frame": growth,
        "log_growth": growth * span,
        "feet_range": float(np.percentile(resid, 97) - np.percentile(resid, 3)) / h,
        "arm_up": float(np.median(arm)),
        "width_range": float((np.percentile(wf, 95) - np.percentile(wf, 5)) / max(np.percentile(wf, 95), 1e-6)),
    }


def _classify(feat: dict[str, float] | None) -> str:
    if feat is None:
        return "unknown"
    if abs(feat["dx_per_frame"]) >= WALK_SLOPE and abs(feat["dx_px"]) >= WALK_MIN_PX:
        return "walk_right" if feat["dx_per_frame"] > 0 else "walk_left"
    if feat["log_growth_per_frame"] >= TOWARD_LOG_SLOPE and feat["log_growth"] >= TOWARD_MIN_GROWTH:
        return "toward"
    if feat["feet_range"] >= JUMP_RANGE:
        return "jump"
    if feat["arm_up"] >= WAVE_ARM_AREA:
        return "wave"
    if feat["width_range"] >= TURN_WIDTH_RANGE:
        return "turn"
    return "still"


def classify_motion(frames: np.ndarray) -> str:
    """The motion of the person in frames [T, H, W, 3], one of MOTION_KINDS ("unknown" when the
    person is found in fewer than 3 frames). Rules, in order (h = median height):
    walk_left / walk_right: centre x moves >= WALK_SLOPE h per frame and >= WALK_MIN_PX overall;
    toward: height grows >= TOWARD_LOG_SLOPE per frame (log) and >= TOWARD_MIN_GROWTH overall;
    jump: feet y, less its linear trend, spans >= JUMP_RANGE h; wave: median raised-arm area
    >= WAVE_ARM_AREA h^2; turn: the width factor's relative range >= TURN_WIDTH_RANGE; else still."""
    return _classify(_motion_features(_trajectory(_locate_clip(_as_clip(frames)))))


def motion_kind_from_caption(caption_or_kind: str) -> str:
    """A motion kind from a kind name or a dynamic caption ("The person walks to the left slowly.")."""
    text = caption_or_kind.strip().lower()
    if text in MOTION_KINDS:
        return text
    for word, kind in (
        ("wave", "wave"),
        ("jump", "jump"),
        ("turn", "turn"),
        ("toward", "toward"),
        ("still", "still"),
        ("left", "walk_left"),
        ("right", "walk_right"),
    ):
        if word in text:
            return kind
    raise ValueError(f"no motion kind in {caption_or_kind!r}")


def _direction_correct(feat: dict[str, float] | None, kind: str) -> bool:
    if feat is None:
        return False
    if kind in ("walk_left", "walk_right"):  # the direction (and enough of it)
        sign = 1 if kind == "walk_right" else -1
        return sign * feat["dx_per_frame"] >= WALK_SLOPE and sign * feat["dx_px"] >= WALK_MIN_PX
    if kind == "toward":
        return feat["log_growth_per_frame"] >= TOWARD_LOG_SLOPE and feat["log_growth"] >= TOWARD_MIN_GROWTH
    return _classify(feat) == kind


def motion_direction_correct(frames: np.ndarray, caption_or_kind: str) -> bool:
    """Whether the clip moves as the caption (or kind) says: walks in the named direction
    (regardless of anything else), grows toward the camera, or otherwise `classify_motion` equals the kind."""
    kind = motion_kind_from_caption(caption_or_kind)
    return _direction_correct(_motion_features(_trajectory(_locate_clip(_as_clip(frames)))), kind)


def _smoothness(tr: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for key in ("cx", "feet", "height"):
        d2 = np.diff(tr[key], 2)
        d2 = d2[np.isfinite(d2)]
        out[f"{key}_px"] = float(np.mean(np.abs(d2))) if len(d2) else float("nan")
    out["mean_px"] = float(np.mean([out["cx_px"], out["feet_px"], out["height_px"]]))
    return out


def smoothness(frames: np.ndarray) -> dict[str, float]:
    """Mean absolute second difference (px per frame^2) of the track: cx_px, feet_px, height_px
    and their mean mean_px (0 for constant velocity; jitter and jumps raise it)."""
    return _smoothness(_trajectory(_locate_clip(_as_clip(frames))))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 1.0


def _jump_at(frames: np.ndarray, people: list[_Person | None], index: int, window: int = 6) -> dict:
    t_len = len(frames)
    if not 1 <= index < t_len:
        raise ValueError(f"index must be in 1 .. {t_len - 1}, got {index}")
    tr = _trajectory(people)
    pos = np.stack([tr["cx"], tr["feet"], tr["height"]], 1)  # [T, 3] px
    steps = np.diff(pos, axis=0)  # [T-1, 3]; steps[i] = pos[i+1] - pos[i]
    k = index - 1  # the step into `index`
    nb = [i for i in range(max(0, k - window), min(t_len - 1, k + window + 1)) if i != k]
    nb_steps = steps[nb]
    nb_steps = nb_steps[np.isfinite(nb_steps).all(1)]
    h = float(np.nanmedian(tr["height"])) if np.isfinite(tr["height"]).any() else float("nan")
    if len(nb_steps) and np.isfinite(steps[k]).all():
        v = np.median(nb_steps, axis=0)  # [3] typical velocity
        dev = float(np.linalg.norm(steps[k] - v))
        typ = float(np.median(np.linalg.norm(nb_steps - v, axis=1)))
    else:
        dev, typ = float("nan"), float("nan")
    diffs = np.array([np.abs(frames[i + 1].astype(np.float32) - frames[i]).mean() for i in [k] + nb])
    changes = []
    for i in [k] + nb:
        a, b = people[i], people[i + 1]
        changes.append(1.0 - _iou(a.mask, b.mask) if a is not None and b is not None else 1.0)
    m_typ = float(np.median(changes[1:])) if len(changes) > 1 else 0.0
    traj_jump = bool(np.isfinite(dev) and dev > max(JUMP_MIN_FRAC * h, JUMP_RATIO * typ))
    mask_jump = bool(changes[0] > max(MASK_JUMP_MIN, MASK_JUMP_RATIO * m_typ))
    return {
        "traj_step_px": dev,
        "traj_typical_px": typ,
        "traj_ratio": dev / max(typ, 0.5),
        "mask_change": float(changes[0]),
        "mask_change_typical": m_typ,
        "mask_ratio": float(changes[0]) / max(m_typ, 0.02),
        "frame_diff": float(diffs[0]),
        "frame_diff_typical": float(np.median(diffs[1:])) if len(diffs) > 1 else 0.0,
        "frame_diff_ratio": float(diffs[0]) / max(float(np.median(diffs[1:])) if len(diffs) > 1 else 0.0, 0.5),
        "is_jump": traj_jump or mask_jump,
    }


def jump_at(frames: np.ndarray, index: int, window: int = 6) -> dict:
    """The discontinuity between frames index-1 and index of a clip [T, H, W, 3], against the
    steps within +-window frames. Returns
      traj_step_px: |step - typical velocity| of (cx, feet, height) at index (px),
      traj_typical_px: the median of that over the neighbouring steps, traj_ratio: their ratio,
      mask_change: 1 - IoU of the person masks at index-1 / index, mask_change_typical, mask_ratio,
      frame_diff: mean |pixel difference| (0..255) at index, frame_diff_typical, frame_diff_ratio
        (informational: a garment switch changes colours without any jump),
      is_jump: traj_step_px > max(JUMP_MIN_FRAC h, JUMP_RATIO x typical) or
        mask_change > max(MASK_JUMP_MIN, MASK_JUMP_RATIO x typical)."""
    frames = _as_clip(frames)
    return _jump_at(frames, _locate_clip(frames), index, window)


def _latency(fids: list[dict], start: int, hold: int) -> int | None:
    """Frames from `start` to the first frame from which `hold` scored frames in a row match
    (fewer at the clip's end), skipping unscored (edge-on) frames; None if never."""
    scored = [t for t in range(start, len(fids)) if fids[t]["measurable"]]
    for i, t in enumerate(scored):
        run = scored[i : i + hold]
        if all(fids[u]["matches"] for u in run):
            return t - start
    return None


def switch_latency(frames: np.ndarray, switch_frame: int, new_garment_image: np.ndarray, hold: int = 3) -> int | None:
    """Frames from `switch_frame` until the top first matches `new_garment_image` (see
    `garment_fidelity`) and stays matched for `hold` frames (or to the clip's end); None if never.
    Frames where the top is not measurable (a turn seen edge-on) neither count nor break a run."""
    frames = _as_clip(frames)
    if not 0 <= switch_frame < len(frames):
        raise ValueError(f"switch_frame must be in 0 .. {len(frames) - 1}, got {switch_frame}")
    people = _locate_clip(frames)
    ref = _garment_ref(new_garment_image)
    fids = [_fidelity(frames[t], people[t], ref) if t >= switch_frame else {} for t in range(len(frames))]
    return _latency(fids, switch_frame, hold)


def _mean(xs: list[float]) -> float:
    """Mean of the finite values; NaN if there are none."""
    a = np.asarray(xs, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def _match_rate(fids: list[dict]) -> float:
    """Fraction of the scored (measurable) frames whose top matches; NaN if none is scored."""
    return _mean([float(f["matches"]) for f in fids if f["measurable"]])


def _window_scores(
    frames: np.ndarray, people: list[_Person | None], idx: range, gref: _GarmentRef | None, iref: dict | None
) -> dict[str, float]:
    fid = [_fidelity(frames[t], people[t], gref) for t in idx]
    ide = [_identity(frames[t], people[t], iref) for t in idx]
    return {
        "garment_delta_e": _mean([f["pattern_delta_e"] for f in fid]),
        "garment_match_rate": _match_rate(fid),
        "skin_delta_e": _mean([d["skin_delta_e"] for d in ide]),
        "hair_delta_e": _mean([d["hair_delta_e"] for d in ide]),
        "identity_match_rate": _mean([float(d["matches"]) for d in ide]),
    }


def drift(
    frames: np.ndarray, reference_image: np.ndarray, garment_image: np.ndarray, window: int = 8
) -> dict[str, float]:
    """Garment fidelity and identity over the first vs the last `window` frames of a long run.

    Returns {name}_start, {name}_end and {name}_change (end - start) for name in garment_delta_e,
    garment_match_rate, skin_delta_e, hair_delta_e, identity_match_rate (Delta-E; rates in 0..1).
    A positive Delta-E change (negative rate change) is drift away from the conditioning."""
    frames = _as_clip(frames)
    people = _locate_clip(frames)
    gref, iref = _garment_ref(garment_image), _identity_ref(reference_image)
    w = max(1, min(window, len(frames)))
    start = _window_scores(frames, people, range(0, w), gref, iref)
    end = _window_scores(frames, people, range(len(frames) - w, len(frames)), gref, iref)
    out = {}
    for k in start:
        out[f"{k}_start"], out[f"{k}_end"], out[f"{k}_change"] = start[k], end[k], end[k] - start[k]
    return out


def score_clip(
    frames: np.ndarray,
    reference: np.ndarray,
    garments_schedule: list[np.ndarray],
    switch_frames: list[int],
    caption: str,
    hold: int = 3,
    window: int = 6,
) -> dict:
    """Everything for one clip, as a flat dict of plain values (for an evaluation runner).

    `garments_schedule[i]` is worn from `switch_frames[i - 1]` (0 for i = 0) up to the next switch;
    len(garments_schedule) == len(switch_frames) + 1, switch frames increasing in 1 .. T-1.
    `caption` is the dynamic caption (or a motion kind). Keys (Delta-E, px, frames, rates in 0..1;
    rates count only frames whose top is measurable):
      frames, found_rate, motion_expected, motion_detected, motion_direction_accuracy (0 / 1, see
        `motion_direction_correct`), smoothness_{cx,feet,height,mean}_px,
      identity_skin_delta_e, identity_hair_delta_e, identity_match_rate, bottoms_delta_e,
        bottoms_match_rate (every frame against the reference),
      seg{i}_garment_delta_e, seg{i}_garment_colour_delta_e, seg{i}_garment_match_rate (all frames
        of segment i against its garment),
      switch{j}_frame, switch{j}_latency_frames (NaN if the new top never shows),
        switch{j}_before_match_rate (old top, the `window` frames before the switch),
        switch{j}_after_match_rate (new top, the `window` frames from the switch),
        switch{j}_jump (bool, see `jump_at`), switch{j}_traj_ratio, switch{j}_mask_ratio,
      garment_delta_e, garment_match_rate: all frames once each switch's latency has passed."""
    frames = _as_clip(frames)
    t_len = len(frames)
    if len(garments_schedule) != len(switch_frames) + 1:
        raise ValueError("garments_schedule needs one garment per segment (len(switch_frames) + 1)")
    bounds = [0] + [int(k) for k in switch_frames] + [t_len]
    if any(b0 >= b1 for b0, b1 in itertools.pairwise(bounds)):
        raise ValueError(f"switch_frames must increase within 1 .. {t_len - 1}, got {switch_frames}")
    people = _locate_clip(frames)
    tr = _trajectory(people)
    feat = _motion_features(tr)
    kind = motion_kind_from_caption(caption)
    iref = _identity_ref(reference)
    grefs = [_garment_ref(g) for g in garments_schedule]
    fids: list[dict] = []  # per frame, against that frame's scheduled garment
    for i, gref in enumerate(grefs):
        fids += [_fidelity(frames[t], people[t], gref) for t in range(bounds[i], bounds[i + 1])]
    ids = [_identity(frames[t], people[t], iref) for t in range(t_len)]
    bots = [_bottoms(frames[t], people[t], iref) for t in range(t_len)]
    out: dict = {
        "frames": t_len,
        "found_rate": float(tr["found"].mean()),
        "motion_expected": kind,
        "motion_detected": _classify(feat),
        "motion_direction_accuracy": float(_direction_correct(feat, kind)),
    }
    out.update({f"smoothness_{k}": v for k, v in _smoothness(tr).items()})
    out.update(
        {
            "identity_skin_delta_e": _mean([d["skin_delta_e"] for d in ids]),
            "identity_hair_delta_e": _mean([d["hair_delta_e"] for d in ids]),
            "identity_match_rate": _mean([float(d["matches"]) for d in ids]),
            "bottoms_delta_e": _mean([d["delta_e"] for d in bots]),
            "bottoms_match_rate": _mean([float(d["matches"]) for d in bots]),
        }
    )
    for i in range(len(grefs)):
        seg = fids[bounds[i] : bounds[i + 1]]
        out[f"seg{i}_garment_delta_e"] = _mean([f["pattern_delta_e"] for f in seg])
        out[f"seg{i}_garment_colour_delta_e"] = _mean([f["colour_delta_e"] for f in seg])
        out[f"seg{i}_garment_match_rate"] = _match_rate(seg)
    settled = list(range(bounds[0], bounds[1]))  # frames once each switch's latency has passed
    for j, k in enumerate(switch_frames):
        end = bounds[j + 2]
        lat = _latency(fids[:end], k, hold)
        out[f"switch{j}_frame"] = k
        out[f"switch{j}_latency_frames"] = float("nan") if lat is None else float(lat)
        out[f"switch{j}_before_match_rate"] = _match_rate(fids[max(bounds[j], k - window) : k])
        out[f"switch{j}_after_match_rate"] = _match_rate(fids[k : min(end, k + window)])
        jmp = _jump_at(frames, people, k, window)
        out[f"switch{j}_jump"] = jmp["is_jump"]
        out[f"switch{j}_traj_ratio"] = jmp["traj_ratio"]
        out[f"switch{j}_mask_ratio"] = jmp["mask_ratio"]
        if lat is not None:
            settled += list(range(k + lat, end))
    out["garment_delta_e"] = _mean([fids[t]["pattern_delta_e"] for t in settled])
    out["garment_match_rate"] = _match_rate([fids[t] for t in settled])
    return out
