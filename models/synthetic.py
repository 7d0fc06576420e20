"""Procedural pedestrian generator writing a Market-1501-layout dataset.

Pure numpy + PIL (no torch), so it can run anywhere the serving install runs (``reid make-synthetic``,
tests, ``make demo``).

Layout written under ``out_dir``::

    bounding_box_train/  PPPP_cCsS_FFFFFF_DD.jpg   training identities
    bounding_box_test/   gallery of the (disjoint) test identities, plus distractors (``0000_...``)
                         and junk (``-1_...``) exactly like Market-1501
    query/               one image per (test identity, camera that sees it); every test identity is
                         seen by at least two cameras, so each query has a cross-camera gallery match
    synthetic.json       the summary returned by :func:`make_synthetic` (parameters and counts)

Identities are a deterministic function of ``(seed, pid)``: clothing colours (top, bottom, shoes), top
pattern (plain, horizontal/vertical stripes, checks, chest logo), sleeves, trousers/shorts/skirt,
accessories (hat, shoulder bag, backpack), body shape (height, width, leg length) and hair (colour, long
or short). Cameras are a deterministic function of ``(seed, cam)``: preferred viewpoint (front / back /
side, which changes what is drawn: the backpack from behind, the face and chest logo from the front),
framing scale, background texture and colours, colour cast, brightness/contrast, noise, blur, low-res
capture, occlusion rate (poles, obstacles, passers-by) and JPEG quality. Each image further jitters pose,
position, scale, lighting and occlusion, so images of one identity differ a lot across cameras and
two identities with similar clothes can look alike, while the clothing/accessory signal a trained model
can learn stays there.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "SPLITS",
    "Identity",
    "Camera",
    "make_synthetic",
    "parse_market_name",
    "format_market_name",
    "make_identity",
    "make_camera",
    "render_person",
]

SPLITS = ("bounding_box_train", "bounding_box_test", "query")
SUMMARY_FILE = "synthetic.json"
GENERATOR_VERSION = 1

JUNK_PID = -1  # Market: junk detections (ignored by the evaluation protocol)
DISTRACTOR_PID = 0  # Market: distractors (background / false detections, count as negatives)

_NAME_RE = re.compile(r"^(-1|\d{4})_c(\d+)s(\d+)_(\d{6})_(\d{2})\.jpg$")

SS = 2  # supersampling factor for drawing (antialiasing)

# ---------------------------------------------------------------------------------------------- naming


def format_market_name(pid: int, cam: int, seq: int, frame: int, det: int = 0) -> str:
    """``0001_c1s1_000001_00.jpg``; ``pid=-1`` gives ``-1_c1s1_...`` (junk), ``pid=0`` gives ``0000_...``."""
    if pid < -1 or pid > 9999:
        raise ValueError(f"pid out of range for the Market naming: {pid}")
    pid_s = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_s}_c{cam}s{seq}_{frame:06d}_{det:02d}.jpg"


def parse_market_name(name: str | Path) -> tuple[int, int, int, int, int]:
    """Parse a Market-1501 file name into ``(pid, cam, seq, frame, det)``.

    Raises ``ValueError`` for names that do not follow the convention.
    """
    base = Path(name).name
    m = _NAME_RE.match(base)
    if not m:
        raise ValueError(f"not a Market-1501 image name: {base!r}")
    pid_s, cam, seq, frame, det = m.groups()
    return int(pid_s), int(cam), int(seq), int(frame), int(det)


# --------------------------------------------------------------------------------------------- palettes

_TOPS = np.array(
    [
        (200, 30, 35), (120, 22, 35), (230, 120, 30), (225, 195, 45), (45, 140, 60), (110, 120, 50),
        (30, 130, 130), (110, 160, 220), (30, 40, 100), (110, 50, 140), (230, 130, 170), (232, 232, 228),
        (128, 128, 128), (30, 30, 32), (110, 70, 40), (200, 180, 140),
    ],
    dtype=np.float32,
)
_BOTTOMS = np.array(
    [
        (25, 25, 28), (30, 40, 95), (60, 90, 140), (120, 120, 125), (180, 160, 110), (100, 65, 40),
        (225, 225, 220), (40, 80, 45), (170, 35, 40), (205, 190, 160),
    ],
    dtype=np.float32,
)
_BOTTOM_P = np.array([0.22, 0.14, 0.18, 0.1, 0.08, 0.07, 0.05, 0.06, 0.04, 0.06])
_SHOES = np.array(
    [(20, 20, 20), (235, 235, 235), (95, 60, 35), (120, 120, 120), (190, 40, 40), (40, 70, 160)],
    dtype=np.float32,
)
_SHOES_P = np.array([0.35, 0.3, 0.12, 0.1, 0.06, 0.07])
_HAIR = np.array(
    [(18, 16, 16), (58, 38, 24), (105, 72, 40), (205, 175, 110), (160, 160, 160), (135, 58, 30)],
    dtype=np.float32,
)
_HAIR_P = np.array([0.4, 0.22, 0.14, 0.1, 0.08, 0.06])
_SKIN = np.array(
    [(250, 215, 190), (230, 185, 150), (200, 150, 110), (160, 110, 75), (110, 75, 50)], dtype=np.float32
)
_ACCESSORY = np.array(
    [(25, 25, 25), (90, 60, 40), (170, 40, 40), (40, 60, 150), (200, 200, 200), (60, 110, 60), (220, 160, 40)],
    dtype=np.float32,
)

_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
_PATTERN_P = np.array([0.42, 0.2, 0.1, 0.12, 0.16])
_BOTTOM_TYPES = ("trousers", "shorts", "skirt")
_BOTTOM_TYPE_P = np.array([0.68, 0.18, 0.14])
_VIEWS = ("front", "back", "side")


def _col(rng: np.random.Generator, palette: np.ndarray, p: np.ndarray | None = None, jitter: float = 14.0):
    c = palette[rng.choice(len(palette), p=p)] + rng.normal(0.0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


# ------------------------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Identity:
    pid: int
    top: tuple[int, int, int]
    top2: tuple[int, int, int]  # pattern / logo colour
    pattern: str
    stripe: float  # pattern period as a fraction of torso height
    long_sleeves: bool
    bottom: tuple[int, int, int]
    bottom_type: str
    shoes: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool
    skin: tuple[int, int, int]
    hat: tuple[int, int, int] | None
    bag: tuple[int, int, int] | None
    bag_side: int  # -1 left, +1 right (person's own frame, seen from the front)
    backpack: tuple[int, int, int] | None
    height: float  # fraction of the frame height at scale 1
    width: float  # body width factor
    legs: float  # leg length factor


def make_identity(seed: int, pid: int) -> Identity:
    """The appearance of identity ``pid`` for generator ``seed`` (pure function of both)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1, int(pid) & 0xFFFFFFFF])
    top = _col(rng, _TOPS)
    top2 = _col(rng, _TOPS)
    while sum(abs(a - b) for a, b in zip(top, top2)) < 120:  # pattern must be visible
        top2 = _col(rng, _TOPS)
    pattern = _PATTERNS[rng.choice(len(_PATTERNS), p=_PATTERN_P)]
    return Identity(
        pid=int(pid),
        top=top,
        top2=top2,
        pattern=pattern,
        stripe=float(rng.uniform(0.12, 0.3)),
        long_sleeves=bool(rng.random() < 0.55),
        bottom=_col(rng, _BOTTOMS, _BOTTOM_P),
        bottom_type=_BOTTOM_TYPES[rng.choice(3, p=_BOTTOM_TYPE_P)],
        shoes=_col(rng, _SHOES, _SHOES_P, 10.0),
        hair=_col(rng, _HAIR, _HAIR_P, 8.0),
        long_hair=bool(rng.random() < 0.3),
        skin=_col(rng, _SKIN, None, 8.0),
        hat=_col(rng, _ACCESSORY) if rng.random() < 0.15 else None,
        bag=_col(rng, _ACCESSORY) if rng.random() < 0.3 else None,
        bag_side=int(rng.choice([-1, 1])),
        backpack=_col(rng, _ACCESSORY) if rng.random() < 0.3 else None,
        height=float(rng.uniform(0.8, 0.93)),
        width=float(rng.uniform(0.82, 1.2)),
        legs=float(rng.uniform(0.92, 1.08)),
    )


# ---------------------------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class Camera:
    cam: int
    view_p: tuple[float, float, float]  # front, back, side
    scale: float
    gain: tuple[float, float, float]
    brightness: float
    contrast: float
    noise: float
    blur: float
    lowres_p: float
    occlusion_p: float
    jpeg: tuple[int, int]
    background: np.ndarray  # uint8 (Hb, Wb, 3), supersampled, larger than the frame: cropped per image


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int], amp: float) -> np.ndarray:
    small = rng.normal(0.0, 1.0, cells).astype(np.float32)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) * amp


def _make_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    hb, wb = h + h // 4, w * 3
    kind = rng.choice(["wall_floor", "bricks", "shops", "foliage", "road"])
    wall = rng.uniform(60, 200, 3)
    floor = rng.uniform(50, 170, 3)
    horizon = int(hb * rng.uniform(0.5, 0.78))
    yy = np.linspace(0.0, 1.0, hb, dtype=np.float32)[:, None, None]
    bg = np.empty((hb, wb, 3), np.float32)
    bg[:] = wall * (0.85 + 0.3 * yy)
    bg[horizon:] = floor * (0.8 + 0.4 * yy[horizon:])
    if kind == "wall_floor":
        step = int(rng.integers(10, 24))
        bg[horizon::step, :, :] *= 0.75
        bg[horizon:, ::step, :] *= 0.8
    elif kind == "bricks":
        bh, bw = int(rng.integers(8, 14)), int(rng.integers(20, 34))
        bg[:horizon:bh, :, :] *= 0.7
        for r, y0 in enumerate(range(0, horizon, bh)):
            off = (bw // 2) * (r % 2)
            bg[y0 : y0 + bh, off::bw, :] *= 0.7
    elif kind == "shops":
        x = 0
        while x < wb:
            pw = int(rng.integers(wb // 10, wb // 4))
            c = rng.uniform(30, 235, 3)
            y1 = horizon - int(rng.integers(0, hb // 6))
            bg[hb // 8 : y1, x : x + pw - 3] = c
            x += pw
    elif kind == "foliage":
        green = np.array([50, 110, 45], np.float32) * rng.uniform(0.6, 1.3)
        bg[:horizon] = green + _smooth_noise(rng, horizon, wb, (12, 24), 35.0)[..., None]
    else:  # road
        bg[horizon:] = rng.uniform(70, 110)
        lane_y = horizon + int((hb - horizon) * rng.uniform(0.3, 0.7))
        for x0 in range(0, wb, 40):
            bg[lane_y : lane_y + 4, x0 : x0 + 22] = 225
    for _ in range(int(rng.integers(1, 5))):  # fixed clutter: signs, bins, windows
        cw, ch = int(rng.integers(8, 40)), int(rng.integers(8, 60))
        x0, y0 = int(rng.integers(0, wb - cw)), int(rng.integers(0, hb - ch))
        bg[y0 : y0 + ch, x0 : x0 + cw] = rng.uniform(20, 235, 3)
    bg += _smooth_noise(rng, hb, wb, (6, 12), 12.0)[..., None]
    return np.clip(bg, 0, 255).astype(np.uint8)


def make_camera(seed: int, cam: int, height: int = 128, width: int = 64) -> Camera:
    """Camera ``cam`` (1-based) for generator ``seed`` (pure function of the arguments)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 4, int(cam)])
    view_p = np.full(3, 0.12) + rng.dirichlet([1.0, 1.0, 1.0]) * 0.2
    view_p[(cam - 1) % 3] += 0.5
    view_p /= view_p.sum()
    gain = rng.uniform(0.8, 1.2, 3)
    gain /= gain.mean()
    q_lo = int(rng.integers(35, 75))
    return Camera(
        cam=int(cam),
        view_p=tuple(float(v) for v in view_p),
        scale=float(rng.uniform(0.86, 1.04)),
        gain=tuple(float(v) for v in gain),
        brightness=float(rng.uniform(-0.1, 0.1)),
        contrast=float(rng.uniform(0.75, 1.15)),
        noise=float(rng.uniform(1.0, 6.0)),
        blur=float(rng.uniform(0.0, 0.9)),
        lowres_p=float(rng.choice([0.0, 0.0, 0.3, 0.6])),
        occlusion_p=float(rng.uniform(0.1, 0.35)),
        jpeg=(q_lo, min(95, q_lo + 25)),
        background=_make_background(rng, height * SS, width * SS),
    )


# ---------------------------------------------------------------------------------------------- drawing


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)


def _draw_torso(d: ImageDraw.ImageDraw, ident: Identity, box: tuple[float, float, float, float], view: str):
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=ident.top)
    th = y1 - y0
    period = max(3.0, ident.stripe * th)
    if ident.pattern == "hstripes":
        y = y0 + period / 2
        while y < y1:
            d.rectangle((x0, y, x1, min(y1, y + period / 2)), fill=ident.top2)
            y += period
    elif ident.pattern == "vstripes" and view != "side":
        x = x0 + period / 4
        while x < x1:
            d.rectangle((x, y0, min(x1, x + period / 3), y1), fill=ident.top2)
            x += period * 0.7
    elif ident.pattern == "checks":
        y, r = y0, 0
        while y < y1:
            x = x0 + (period / 2) * (r % 2)
            while x < x1:
                d.rectangle((x, y, min(x1, x + period / 2), min(y1, y + period / 2)), fill=ident.top2)
                x += period
            y += period / 2
            r += 1
    elif ident.pattern == "logo" and view == "front":
        cx, w = (x0 + x1) / 2, (x1 - x0)
        d.rectangle((cx - w * 0.22, y0 + th * 0.2, cx + w * 0.22, y0 + th * 0.48), fill=ident.top2)


def render_person(
    img: Image.Image,
    ident: Identity,
    view: str,
    cx: float,
    foot_y: float,
    scale: float,
    rng: np.random.Generator,
    facing: int = 1,
) -> None:
    """Draw ``ident`` onto ``img`` (in place), feet centred at ``(cx, foot_y)``; ``scale`` is person height
    in pixels divided by the image height. ``facing`` (+1/-1) mirrors the side view."""
    d = ImageDraw.Draw(img)
    H = img.height
    ph = H * scale * ident.height
    top = foot_y - ph
    head_h = 0.14 * ph
    head_w = head_h * 0.78
    neck = 0.02 * ph
    torso_h = 0.31 * ph * (2.0 - ident.legs)
    shoe_h = 0.035 * ph
    leg_top = top + head_h + neck + torso_h
    sw = 0.25 * ph * ident.width  # shoulder width
    side = view == "side"
    if side:
        sw *= 0.62
    hip = sw * (0.92 if side else 0.84)
    arm_w = max(2.0, 0.2 * sw) if not side else max(2.0, 0.32 * sw)
    leg_w = hip * (0.44 if not side else 0.6)
    stride = float(rng.uniform(0.0, 0.22)) * ph * (1.0 if side else 0.35)
    swing = float(rng.uniform(-0.12, 0.12)) * ph
    sleeve = ident.top if ident.long_sleeves else ident.skin
    arm_top = top + head_h + neck + 0.02 * ph
    arm_len = 0.34 * ph
    # the bag hangs on the person's bag_side; seen from behind it appears mirrored
    bag_dir = ident.bag_side * (-1 if view == "back" else 1)
    if side:
        bag_dir = -facing if ident.bag_side < 0 else facing

    # backpack seen from the side: behind the body
    if ident.backpack is not None and side:
        bx = cx - facing * (sw / 2 + 0.06 * ph)
        d.rectangle(
            (min(bx, bx + facing * 0.09 * ph), arm_top, max(bx, bx + facing * 0.09 * ph), arm_top + 0.2 * ph),
            fill=ident.backpack,
        )
    # legs
    ly1 = foot_y - shoe_h
    for k, sgn in enumerate((-1, 1)):
        if side:
            lx = cx + sgn * stride / 2
            x0, x1 = lx - leg_w / 2, lx + leg_w / 2
        else:
            lx = cx + sgn * (hip / 2 - leg_w / 2) + sgn * stride / 2
            x0, x1 = lx - leg_w / 2, lx + leg_w / 2
        legc = ident.bottom if ident.bottom_type == "trousers" else ident.skin
        if side and k == 0:
            legc = _shade(legc, 0.8)
        d.rectangle((x0, leg_top, x1, ly1), fill=legc)
        if ident.bottom_type == "shorts":
            d.rectangle((x0, leg_top, x1, leg_top + (ly1 - leg_top) * 0.42), fill=ident.bottom)
        d.rectangle((x0 - (facing * 2 if side else 1), ly1, x1 + (facing * 3 if side else 1), foot_y), fill=ident.shoes)
    if ident.bottom_type == "skirt":
        sk_y1 = leg_top + (ly1 - leg_top) * 0.5
        d.polygon(
            [(cx - hip / 2, leg_top), (cx + hip / 2, leg_top), (cx + hip * 0.75, sk_y1), (cx - hip * 0.75, sk_y1)],
            fill=ident.bottom,
        )
    else:  # hips / crotch in the bottom colour
        d.rectangle((cx - hip / 2, leg_top - 1, cx + hip / 2, leg_top + 0.06 * ph), fill=ident.bottom)

    # arms (behind torso for front/back is fine since they are drawn outside it)
    def arm(ax: float, dx: float, shade: float = 1.0) -> None:
        hand_y = arm_top + arm_len
        pts = [(ax - arm_w / 2, arm_top), (ax + arm_w / 2, arm_top), (ax + arm_w / 2 + dx, hand_y), (ax - arm_w / 2 + dx, hand_y)]
        d.polygon(pts, fill=_shade(ident.skin, shade))
        sl = 1.0 if ident.long_sleeves else 0.35
        sy = arm_top + arm_len * sl
        spts = [(ax - arm_w / 2, arm_top), (ax + arm_w / 2, arm_top), (ax + arm_w / 2 + dx * sl, sy), (ax - arm_w / 2 + dx * sl, sy)]
        d.polygon(spts, fill=_shade(sleeve if ident.long_sleeves else ident.top, shade))
        d.ellipse((ax + dx - arm_w * 0.55, hand_y - arm_w * 0.3, ax + dx + arm_w * 0.55, hand_y + arm_w * 0.7), fill=ident.skin)

    # torso
    tx0, tx1 = cx - sw / 2, cx + sw / 2
    ty0, ty1 = top + head_h + neck, leg_top + 0.01 * ph
    if not side:
        arm(tx0 - arm_w / 2 + 1, -0.1 * swing - 0.02 * ph)
        arm(tx1 + arm_w / 2 - 1, 0.1 * swing + 0.02 * ph)
    else:
        arm(cx - facing * sw * 0.1, -swing * facing * 0.5, 0.8)  # far arm
    _draw_torso(d, ident, (tx0, ty0, tx1, ty1), view)
    # neck
    d.rectangle((cx - head_w * 0.22, top + head_h * 0.9, cx + head_w * 0.22, ty0 + 1), fill=ident.skin)

    # backpack: full from behind, straps from the front
    if ident.backpack is not None:
        if view == "back":
            d.rounded_rectangle(
                (cx - sw * 0.36, ty0 + 0.02 * ph, cx + sw * 0.36, ty0 + 0.24 * ph), radius=max(1.0, 0.02 * ph), fill=ident.backpack
            )
        elif view == "front":
            sw_ = max(1.5, 0.06 * sw)
            for sx in (cx - sw * 0.3, cx + sw * 0.3):
                d.rectangle((sx - sw_, ty0, sx + sw_, ty0 + 0.2 * ph), fill=ident.backpack)
    # shoulder bag: strap + bag at the hip
    if ident.bag is not None:
        bx = cx + bag_dir * (sw / 2 + 0.03 * ph)
        by = leg_top - 0.02 * ph
        d.line([(cx - bag_dir * sw * 0.4, ty0 + 1), (bx, by)], fill=_shade(ident.bag, 0.7), width=max(1, int(0.012 * ph)))
        bw, bh = 0.09 * ph, 0.08 * ph
        d.rectangle((bx - bw / 2, by - bh / 3, bx + bw / 2, by + bh * 2 / 3), fill=ident.bag)
    if side:
        arm(cx + facing * sw * 0.05, swing * facing * 0.5)  # near arm on top

    # head
    hx0, hx1 = cx - head_w / 2, cx + head_w / 2
    hy0, hy1 = top, top + head_h
    if view == "back":
        d.ellipse((hx0, hy0, hx1, hy1), fill=ident.hair)
        if ident.long_hair:
            d.rectangle((hx0 + 1, (hy0 + hy1) / 2, hx1 - 1, hy1 + 0.09 * ph), fill=ident.hair)
    else:
        if ident.long_hair:
            d.rectangle((hx0 - 1, (hy0 + hy1) / 2, hx1 + 1, hy1 + 0.07 * ph), fill=ident.hair)
        d.ellipse((hx0, hy0, hx1, hy1), fill=ident.skin)
        if view == "front":
            d.chord((hx0, hy0, hx1, hy0 + head_h * 0.8), 180, 360, fill=ident.hair)
            ey = hy0 + head_h * 0.52
            er = max(0.8, head_w * 0.06)
            for ex in (cx - head_w * 0.2, cx + head_w * 0.2):
                d.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(30, 25, 25))
        else:  # side: hair covers the back half of the head
            d.chord((hx0, hy0, hx1, hy1), 90 if facing > 0 else 270, 270 if facing > 0 else 450, fill=ident.hair)
            d.chord((hx0, hy0, hx1, hy0 + head_h * 0.75), 180, 360, fill=ident.hair)
    if ident.hat is not None:
        d.chord((hx0 - 1, hy0 - head_h * 0.08, hx1 + 1, hy0 + head_h * 0.7), 180, 360, fill=ident.hat)
        brim = head_w * 0.25
        if side:
            bx0, bx1 = (hx0, hx1 + brim) if facing > 0 else (hx0 - brim, hx1)
        else:
            bx0, bx1 = hx0 - 1, hx1 + 1
        d.rectangle((bx0, hy0 + head_h * 0.27, bx1, hy0 + head_h * 0.35), fill=_shade(ident.hat, 0.8))


def _occlude(img: Image.Image, rng: np.random.Generator) -> None:
    d = ImageDraw.Draw(img)
    W, H = img.size
    kind = rng.choice(["pole", "obstacle", "passerby"], p=[0.4, 0.35, 0.25])
    if kind == "pole":
        pw = W * rng.uniform(0.06, 0.15)
        x = rng.uniform(-pw / 2, W - pw / 2)
        c = rng.uniform(60, 200, 3)
        d.rectangle((x, 0, x + pw, H), fill=tuple(int(v) for v in c))
        d.rectangle((x + pw * 0.6, 0, x + pw, H), fill=tuple(int(v * 0.8) for v in c))
    elif kind == "obstacle":
        oh = H * rng.uniform(0.15, 0.35)
        x0 = rng.uniform(-0.5, 0.3) * W
        x1 = x0 + W * rng.uniform(0.6, 1.4)
        d.rounded_rectangle((x0, H - oh, x1, H + 4), radius=W * 0.05, fill=tuple(int(v) for v in rng.uniform(20, 235, 3)))
    else:
        w = W * rng.uniform(0.2, 0.38)
        left = rng.random() < 0.5
        x0, x1 = (-2, w) if left else (W - w, W + 2)
        y_split = H * rng.uniform(0.45, 0.6)
        d.rectangle((x0, H * rng.uniform(0.05, 0.2), x1, y_split), fill=tuple(int(v) for v in rng.uniform(20, 235, 3)))
        d.rectangle((x0, y_split, x1, H), fill=tuple(int(v) for v in _BOTTOMS[rng.integers(len(_BOTTOMS))]))


def _random_rect_clutter(img: Image.Image, rng: np.random.Generator, n: int) -> None:
    d = ImageDraw.Draw(img)
    W, H = img.size
    for _ in range(n):
        w, h = W * rng.uniform(0.05, 0.3), H * rng.uniform(0.03, 0.25)
        x, y = rng.uniform(-w / 2, W - w / 2), rng.uniform(0, H - h)
        d.rectangle((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.uniform(15, 240, 3)))


def _background_crop(camera: Camera, rng: np.random.Generator, h: int, w: int) -> Image.Image:
    bg = camera.background
    y = int(rng.integers(0, bg.shape[0] - h + 1))
    x = int(rng.integers(0, bg.shape[1] - w + 1))
    return Image.fromarray(bg[y : y + h, x : x + w])


def _finish(img: Image.Image, camera: Camera, rng: np.random.Generator, height: int, width: int) -> tuple[Image.Image, int]:
    """Downsample + camera effects. Returns the final image and its JPEG quality."""
    if rng.random() < camera.lowres_p:
        f = rng.uniform(2.2, 3.2)
        img = img.resize((max(8, int(width / f)), max(16, int(height / f))), Image.BILINEAR)
    img = img.resize((width, height), Image.BILINEAR if img.width < width else Image.BOX)
    radius = camera.blur + rng.uniform(0.0, 0.5)
    if radius > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    a = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    contrast = camera.contrast * rng.uniform(0.9, 1.1)
    bright = camera.brightness + rng.uniform(-0.09, 0.09)
    gain = np.asarray(camera.gain, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    a = ((a - 0.5) * contrast + 0.5 + bright) * gain
    if rng.random() < 0.35:  # shadow / light gradient across the crop
        g = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(1.0, 1.25), width if rng.random() < 0.5 else height, dtype=np.float32)
        a *= g[None, :, None] if g.shape[0] == width else g[:, None, None]
    a = a * 255.0 + rng.normal(0.0, camera.noise, a.shape).astype(np.float32)
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    q = int(rng.integers(camera.jpeg[0], camera.jpeg[1] + 1))
    return out, q


def _render_image(
    ident: Identity | None,
    camera: Camera,
    rng: np.random.Generator,
    height: int,
    width: int,
    junk: bool = False,
) -> tuple[Image.Image, int]:
    h, w = height * SS, width * SS
    img = _background_crop(camera, rng, h, w)
    if rng.random() < 0.3:
        _random_rect_clutter(img, rng, int(rng.integers(1, 3)))
    if ident is not None:
        view = _VIEWS[rng.choice(3, p=camera.view_p)]
        facing = int(rng.choice([-1, 1]))
        scale = camera.scale * rng.uniform(0.88, 1.06)
        cx = w * (0.5 + rng.uniform(-0.1, 0.1))
        foot_y = h * (0.985 - rng.uniform(0.0, 0.06)) + h * (scale * ident.height - 0.9) * rng.uniform(-0.2, 0.5)
        if junk:  # bad detection: only part of a person, badly framed
            scale *= rng.uniform(1.4, 2.4)
            cx = w * (0.5 + rng.choice([-1, 1]) * rng.uniform(0.25, 0.55))
            foot_y = h * rng.uniform(0.9, 1.8)
        render_person(img, ident, view, cx, foot_y, scale, rng, facing)
        if rng.random() < camera.occlusion_p:
            _occlude(img, rng)
    else:  # distractor: background false detection, often with a pole / obstacle in it
        _random_rect_clutter(img, rng, int(rng.integers(1, 4)))
        if rng.random() < 0.6:
            _occlude(img, rng)
    return _finish(img, camera, rng, height, width)


# --------------------------------------------------------------------------------------------- dataset


def _id_cameras(seed: int, pid: int, cameras: int, coverage: float) -> list[int]:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 2, int(pid)])
    cams = [c for c in range(1, cameras + 1) if rng.random() < coverage]
    while len(cams) < 2:  # Market: every identity is seen by at least two cameras
        c = int(rng.integers(1, cameras + 1))
        if c not in cams:
            cams.append(c)
    return sorted(cams)


def _params_key(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in sorted(params)}


def make_synthetic(
    out_dir: str | Path,
    n_train_ids: int = 60,
    n_test_ids: int = 40,
    cameras: int = 4,
    images_per_id_per_cam: int = 3,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    *,
    camera_coverage: float = 1.0,
    n_distractors: int | None = None,
    n_junk: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic Market-1501-layout dataset under ``out_dir`` and return a summary dict.

    - Train identities are ``0001..n_train_ids``, test identities follow (disjoint by construction).
    - Each identity is seen by each camera with probability ``camera_coverage`` (at least two cameras).
    - ``images_per_id_per_cam`` images per (identity, camera) go to ``bounding_box_train`` (train ids)
      or ``bounding_box_test`` (test ids); each (test id, camera) additionally gets one query image.
    - ``n_distractors`` ``0000_*`` and ``n_junk`` ``-1_*`` images are added to the gallery (default: 5 %
      of the gallery each, at least 1).
    - Deterministic for given arguments. If ``out_dir`` already holds a dataset generated with the same
      arguments it is reused (the summary is returned from ``synthetic.json``); if it holds anything else
      in the split folders a ``FileExistsError`` is raised unless ``overwrite=True``.
    """
    if cameras < 2:
        raise ValueError("cameras must be >= 2 (queries need a cross-camera gallery match)")
    if cameras > 9:
        raise ValueError("cameras must be <= 9 (Market naming uses one digit)")
    if n_train_ids < 1 or n_test_ids < 1 or images_per_id_per_cam < 1:
        raise ValueError("n_train_ids, n_test_ids and images_per_id_per_cam must be >= 1")
    if n_train_ids + n_test_ids > 9999:
        raise ValueError("at most 9999 identities (4-digit Market ids)")
    if height < 32 or width < 16:
        raise ValueError("height must be >= 32 and width >= 16")
    if not 0.0 < camera_coverage <= 1.0:
        raise ValueError("camera_coverage must be in (0, 1]")

    out = Path(out_dir)
    params = _params_key(
        dict(
            n_train_ids=int(n_train_ids),
            n_test_ids=int(n_test_ids),
            cameras=int(cameras),
            images_per_id_per_cam=int(images_per_id_per_cam),
            height=int(height),
            width=int(width),
            seed=int(seed),
            camera_coverage=float(camera_coverage),
            n_distractors=n_distractors,
            n_junk=n_junk,
            generator_version=GENERATOR_VERSION,
        )
    )
    summary_path = out / SUMMARY_FILE
    if summary_path.exists() and not overwrite:
        try:
            old = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("params") == params and all(
            len(list((out / s).glob("*.jpg"))) == old["counts"][s] for s in SPLITS
        ):
            old["reused"] = True
            return old
    existing = [s for s in SPLITS if (out / s).is_dir() and any((out / s).iterdir())]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already contains {existing} (not generated with these arguments); pass overwrite=True"
        )
    for s in SPLITS:
        if (out / s).exists():
            shutil.rmtree(out / s)
        (out / s).mkdir(parents=True, exist_ok=True)
    if summary_path.exists():
        summary_path.unlink()

    t0 = time.perf_counter()
    cams = {c: make_camera(seed, c, height, width) for c in range(1, cameras + 1)}
    frame = {c: 0 for c in cams}
    counts = {s: 0 for s in SPLITS}
    seed32 = int(seed) & 0xFFFFFFFF

    def write(split: str, pid: int, cam: int, img: Image.Image, q: int, rng: np.random.Generator, det: int = 0):
        frame[cam] += int(rng.integers(1, 60))
        seq = 1 + frame[cam] // 25000
        name = format_market_name(pid, cam, min(seq, 9), frame[cam], det)
        img.save(out / split / name, format="JPEG", quality=q)
        counts[split] += 1

    split_codes = {"bounding_box_train": 0, "bounding_box_test": 1, "query": 2}
    train_ids = list(range(1, n_train_ids + 1))
    test_ids = list(range(n_train_ids + 1, n_train_ids + n_test_ids + 1))
    n_queries_expected = 0
    for split, pids in (("bounding_box_train", train_ids), ("bounding_box_test", test_ids)):
        for pid in pids:
            ident = make_identity(seed, pid)
            for cam in _id_cameras(seed, pid, cameras, camera_coverage):
                for k in range(images_per_id_per_cam):
                    rng = np.random.default_rng([seed32, 3, split_codes[split], pid, cam, k])
                    img, q = _render_image(ident, cams[cam], rng, height, width)
                    write(split, pid, cam, img, q, rng)
                if split == "bounding_box_test":
                    rng = np.random.default_rng([seed32, 3, split_codes["query"], pid, cam, 0])
                    img, q = _render_image(ident, cams[cam], rng, height, width)
                    write("query", pid, cam, img, q, rng)
                    n_queries_expected += 1

    gallery_people = counts["bounding_box_test"]
    n_distractors = max(1, round(0.05 * gallery_people)) if n_distractors is None else int(n_distractors)
    n_junk = max(1, round(0.05 * gallery_people)) if n_junk is None else int(n_junk)
    for k in range(n_distractors):
        rng = np.random.default_rng([seed32, 5, k])
        cam = int(rng.integers(1, cameras + 1))
        img, q = _render_image(None, cams[cam], rng, height, width)
        write("bounding_box_test", DISTRACTOR_PID, cam, img, q, rng)
    for k in range(n_junk):
        rng = np.random.default_rng([seed32, 6, k])
        cam = int(rng.integers(1, cameras + 1))
        # junk shows people who are not among the test identities (ids beyond the 4-digit range)
        ident = make_identity(seed, 100_000 + k)
        img, q = _render_image(ident, cams[cam], rng, height, width, junk=True)
        write("bounding_box_test", JUNK_PID, cam, img, q, rng, det=int(rng.integers(1, 4)))

    summary: dict[str, Any] = {
        "format": "market1501",
        "generator": "reid synthetic pedestrians",
        "root": str(out.resolve()),
        "params": params,
        "train_ids": [train_ids[0], train_ids[-1]],
        "test_ids": [test_ids[0], test_ids[-1]],
        "counts": counts,
        "n_distractors": n_distractors,
        "n_junk": n_junk,
        "n_images": sum(counts.values()),
        "seconds": round(time.perf_counter() - t0, 3),
        "reused": False,
    }
    assert counts["query"] == n_queries_expected
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
