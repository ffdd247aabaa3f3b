"""A procedural try-on world: flat-style people, tops, bottoms, backgrounds and captioned motion.

Everything is deterministic per seed (numpy `default_rng`), drawn with PIL at 2x and box-filtered
down, in the flat style of `examples/person.png` (a head ellipse, a torso that is the top, arms
beside it, two legs that are the bottoms, a plain wall). Units: a person's body is laid out in
fractions of its height `h` (head top 0, feet 1); the frame is `height` x `width` pixels.

Layout of a person standing at centre x, feet at y (fractions of `h`, width fractions from centre):
    head  ellipse centre 0.092, radii 0.079 (x) / 0.092 (y)
    torso (the top) 0.197 .. 0.605, half width 0.105 * build
    arms  0.21 .. 0.55 beside the torso, width 0.074 * build; the top's sleeves cover 0/40/100%
    legs  (the bottoms) 0.61 .. 1.0, width 0.082 * build each, a gap of 0.013 between
    skirt bottoms: a trapezoid 0.605 .. 0.80, bare legs below

`render_clip` draws a clip of a person wearing a top; `render_garment` draws a top laid flat on
white (a T-shirt silhouette with the same pattern). Nothing here imports torch.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

MOTIONS = ("walk_left", "walk_right", "toward", "wave", "turn", "jump", "still")
SPEEDS = {"slowly": 0.6, "steadily": 1.0, "quickly": 1.6}
PATTERNS = ("solid", "halves", "stripes", "vsplit")
SLEEVES = ("none", "short", "long")
HAIR_STYLES = ("none", "short", "long", "bun")
BOTTOM_STYLES = ("pants", "shorts", "skirt")

_MOTION_TEXT = {
    "walk_left": "walks to the left",
    "walk_right": "walks to the right",
    "toward": "steps toward the camera",
    "wave": "waves with the right hand",
    "turn": "turns from side to side",
    "jump": "jumps in place",
    "still": "stands still",
}

# Held-out top colours: the test split draws its garments around these anchors, the training split
# never draws a colour within HOLDOUT_RADIUS of any of them (Euclidean RGB distance). The first two
# are the colours of examples/garment-red.png and examples/garment-green.png.
HOLDOUT_COLOURS: tuple[RGB, ...] = ((200, 40, 50), (40, 150, 80), (230, 170, 40), (120, 60, 170), (40, 170, 190))
HOLDOUT_RADIUS = 45.0

_SKIN = (
    (250, 215, 190),
    (235, 190, 160),
    (224, 180, 150),
    (200, 150, 115),
    (170, 120, 90),
    (130, 90, 65),
    (95, 65, 45),
)
_HAIR = ((30, 25, 20), (90, 60, 35), (160, 110, 60), (220, 190, 120), (150, 150, 150), (170, 60, 30))
_BOTTOMS = ((60, 60, 70), (40, 50, 90), (30, 30, 30), (150, 130, 95), (110, 110, 115), (95, 65, 45), (70, 90, 60))
_WALLS = ((214, 222, 230), (232, 226, 214), (220, 230, 220), (236, 222, 222), (200, 205, 215), (240, 238, 230))
_FLOORS = ((170, 160, 150), (150, 150, 160), (190, 175, 150), (140, 150, 140))

_NAMED = {
    "red": (200, 40, 50),
    "crimson": (160, 20, 40),
    "orange": (235, 120, 40),
    "amber": (230, 170, 40),
    "yellow": (235, 215, 60),
    "olive": (130, 130, 50),
    "lime": (150, 210, 60),
    "green": (40, 150, 80),
    "teal": (30, 130, 130),
    "cyan": (40, 170, 190),
    "sky blue": (110, 170, 230),
    "blue": (50, 80, 200),
    "navy": (35, 45, 100),
    "purple": (120, 60, 170),
    "violet": (170, 110, 210),
    "pink": (230, 130, 170),
    "magenta": (200, 50, 150),
    "brown": (120, 75, 45),
    "beige": (215, 195, 160),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (30, 30, 30),
    "slate": (90, 110, 150),
    "khaki": (150, 130, 95),
}


def colour_name(rgb: RGB) -> str:
    """The nearest name in a small palette (captions only; metrics never read names)."""
    return min(_NAMED, key=lambda n: sum((a - b) ** 2 for a, b in zip(_NAMED[n], rgb)))


@dataclass(frozen=True)
class Identity:
    skin: RGB
    hair: RGB
    hair_style: str
    height: float  # person height as a fraction of the frame height
    build: float  # width factor, ~0.85 .. 1.15


@dataclass(frozen=True)
class Top:
    colour: RGB
    colour2: RGB
    pattern: str
    sleeves: str

    @property
    def id(self) -> str:
        c1, c2 = "".join(f"{v:02x}" for v in self.colour), "".join(f"{v:02x}" for v in self.colour2)
        return f"{self.pattern}-{self.sleeves}-{c1}-{c2}"


@dataclass(frozen=True)
class Bottoms:
    colour: RGB
    style: str


@dataclass(frozen=True)
class Background:
    wall: RGB
    floor: RGB | None  # None: a plain wall
    floor_y: float  # floor line as a fraction of the frame height
    gradient: float  # wall brightness change from top to bottom, -0.1 .. 0.1


@dataclass(frozen=True)
class Motion:
    kind: str
    speed: str = "steadily"

    @property
    def caption(self) -> str:
        if self.kind == "still":
            return "The person stands still."
        return f"The person {_MOTION_TEXT[self.kind]} {self.speed}."


@dataclass(frozen=True)
class Scene:
    identity: Identity
    top: Top
    bottoms: Bottoms
    background: Background
    motion: Motion
    x: float = 0.5  # start centre x, fraction of the frame width
    feet: float = 0.94  # feet y, fraction of the frame height

    def with_top(self, top: Top) -> Scene:
        return replace(self, top=top)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Pose:
    x: float  # centre x in pixels
    feet: float  # feet y in pixels
    scale: float  # size factor (toward the camera > 1)
    lift: float  # jump height in pixels (up)
    arm: float  # right arm angle in degrees from hanging down (0) to up (180)
    squash: float  # body width factor while turning (1 = facing the camera)
    stride: float  # leg spread, -1 .. 1


# ---- sampling -------------------------------------------------------------------------------
def _dist(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def _hsv(rng: np.random.Generator) -> RGB:
    h, s, v = rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.35, 0.95)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def sample_top_colour(rng: np.random.Generator, split: str) -> RGB:
    """Training: any colour at least HOLDOUT_RADIUS from every anchor; test: an anchor +- 12."""
    if split == "test":
        anchor = HOLDOUT_COLOURS[int(rng.integers(len(HOLDOUT_COLOURS)))]
        return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in anchor)  # type: ignore[return-value]
    while True:
        c = _hsv(rng)
        if all(_dist(c, a) >= HOLDOUT_RADIUS for a in HOLDOUT_COLOURS):
            return c


def sample_top(rng: np.random.Generator, split: str = "train") -> Top:
    c1 = sample_top_colour(rng, split)
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=(0.4, 0.2, 0.2, 0.2)))]
    c2 = c1
    if pattern != "solid":
        while _dist(c2, c1) < 120:
            c2 = sample_top_colour(rng, "train") if split == "train" or rng.random() < 0.5 else _hsv(rng)
    return Top(c1, c2, pattern, SLEEVES[int(rng.integers(len(SLEEVES)))])


def identity_key(identity: Identity) -> int:
    """The held-out rule for identities: (skin tone, hair colour, style) combos with key % 5 == 0 are test."""
    s, h, st = _SKIN.index(identity.skin), _HAIR.index(identity.hair), HAIR_STYLES.index(identity.hair_style)
    return (s * 7 + h * 3 + st * 5) % 5


def sample_identity(rng: np.random.Generator, split: str = "train") -> Identity:
    while True:
        ident = Identity(
            skin=_SKIN[int(rng.integers(len(_SKIN)))],
            hair=_HAIR[int(rng.integers(len(_HAIR)))],
            hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
            height=float(rng.uniform(0.62, 0.9)),  # examples/person.png is ~0.89
            build=float(rng.uniform(0.88, 1.12)),
        )
        if (identity_key(ident) == 0) == (split == "test"):
            return ident


def sample_scene(rng: np.random.Generator, split: str = "train", motion: Motion | None = None) -> Scene:
    ident = sample_identity(rng, split)
    top = sample_top(rng, split)
    bottoms = Bottoms(_BOTTOMS[int(rng.integers(len(_BOTTOMS)))], BOTTOM_STYLES[int(rng.choice(3, p=(0.6, 0.2, 0.2)))])
    has_floor = rng.random() < 0.6
    bg = Background(
        wall=_WALLS[int(rng.integers(len(_WALLS)))],
        floor=_FLOORS[int(rng.integers(len(_FLOORS)))] if has_floor else None,
        floor_y=float(rng.uniform(0.72, 0.86)),
        gradient=float(rng.uniform(-0.08, 0.08)),
    )
    if motion is None:
        motion = Motion(MOTIONS[int(rng.integers(len(MOTIONS)))], list(SPEEDS)[int(rng.integers(len(SPEEDS)))])
    if motion.kind == "toward":  # room to grow
        ident = replace(ident, height=min(ident.height, 0.72))
    x = 0.5
    if motion.kind == "walk_left":
        x = float(rng.uniform(0.55, 0.68))
    elif motion.kind == "walk_right":
        x = float(rng.uniform(0.32, 0.45))
    elif motion.kind != "toward":
        x = float(rng.uniform(0.42, 0.58))
    feet = float(rng.uniform(0.9, 0.96)) if motion.kind != "toward" else float(rng.uniform(0.84, 0.88))
    return Scene(ident, top, bottoms, bg, motion, x=x, feet=feet)


# ---- motion ---------------------------------------------------------------------------------
WALK_PX_PER_FRAME = 0.0032  # x speed, fraction of the frame width per frame, at speed 1
GROW_PER_FRAME = 0.0045  # scale gain per frame toward the camera, at speed 1


def pose_at(scene: Scene, t: int, height: int, width: int, fps: int = 24) -> Pose:
    """The pose of frame `t` (0-based) of a clip; frame 0 is the reference image's pose."""
    m, s = scene.motion, SPEEDS[scene.motion.speed]
    x, feet, scale, lift, arm, squash, stride = scene.x * width, scene.feet * height, 1.0, 0.0, 0.0, 1.0, 0.0
    cycle = 2 * math.pi * t * s / fps  # one cycle a second at speed 1
    if m.kind in ("walk_left", "walk_right"):
        x += (-1 if m.kind == "walk_left" else 1) * WALK_PX_PER_FRAME * width * s * t
        stride = math.sin(2 * cycle)
    elif m.kind == "toward":
        scale = 1.0 + GROW_PER_FRAME * s * t
        feet += 0.0012 * height * s * t
        stride = 0.5 * math.sin(2 * cycle)
    elif m.kind == "wave":
        arm = 140.0 + 30.0 * math.sin(2 * cycle) if t > 0 else 140.0
    elif m.kind == "turn":
        squash = 0.6 + 0.4 * math.cos(cycle)
    elif m.kind == "jump":
        lift = 0.09 * scene.identity.height * height * abs(math.sin(cycle))
    return Pose(x, feet, scale, lift, arm, squash, stride)


# ---- drawing --------------------------------------------------------------------------------
SS = 2  # supersampling factor


def _background(bg: Background, height: int, width: int) -> np.ndarray:
    img = np.empty((height, width, 3), np.float32)
    ramp = 1.0 + bg.gradient * (np.arange(height, dtype=np.float32) / max(height - 1, 1) - 0.5)
    img[:] = np.asarray(bg.wall, np.float32)[None, None] * ramp[:, None, None]
    if bg.floor is not None:
        y = int(round(bg.floor_y * height))
        img[y:] = np.asarray(bg.floor, np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rect(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill: RGB) -> None:
    d.rectangle([x0 * SS, y0 * SS, x1 * SS - 1, y1 * SS - 1], fill=fill)


def _poly(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], fill: RGB) -> None:
    d.polygon([(px * SS, py * SS) for px, py in pts], fill=fill)


def _pattern_fill(d: ImageDraw.ImageDraw, top: Top, x0: float, y0: float, x1: float, y1: float) -> None:
    """The top's pattern over the box [x0, x1) x [y0, y1) (torso or flat garment body)."""
    if top.pattern == "solid":
        _rect(d, x0, y0, x1, y1, top.colour)
    elif top.pattern == "halves":
        ym = (y0 + y1) / 2
        _rect(d, x0, y0, x1, ym, top.colour)
        _rect(d, x0, ym, x1, y1, top.colour2)
    elif top.pattern == "vsplit":
        xm = (x0 + x1) / 2
        _rect(d, x0, y0, xm, y1, top.colour)
        _rect(d, xm, y0, x1, y1, top.colour2)
    elif top.pattern == "stripes":  # four wide horizontal bands, colour first
        band = (y1 - y0) / 4
        for i in range(4):
            _rect(d, x0, y0 + i * band, x1, y0 + (i + 1) * band, top.colour if i % 2 == 0 else top.colour2)
    else:
        raise ValueError(f"unknown pattern {top.pattern!r}")


def _arm(
    d: ImageDraw.ImageDraw,
    sx: float,
    sy: float,
    length: float,
    thick: float,
    angle: float,
    side: int,
    skin: RGB,
    sleeve: RGB | None,
    sleeve_frac: float,
) -> None:
    """An arm hanging from the shoulder (sx, sy), rotated `angle` degrees outward on `side` (+1 right)."""
    a = math.radians(angle)
    ux, uy = side * math.sin(a), math.cos(a)  # along the arm
    px, py = uy, -ux  # across it

    def quad(f0: float, f1: float) -> list[tuple[float, float]]:
        c0 = (sx + ux * length * f0, sy + uy * length * f0)
        c1 = (sx + ux * length * f1, sy + uy * length * f1)
        h = thick / 2
        return [
            (c0[0] - px * h, c0[1] - py * h),
            (c0[0] + px * h, c0[1] + py * h),
            (c1[0] + px * h, c1[1] + py * h),
            (c1[0] - px * h, c1[1] - py * h),
        ]

    _poly(d, quad(0.0, 1.0), skin)
    if sleeve is not None and sleeve_frac > 0:
        _poly(d, quad(0.0, sleeve_frac), sleeve)


def draw_person(img: Image.Image, scene: Scene, pose: Pose, height: int) -> None:
    """Draw the person of `scene` at `pose` onto `img` (a 2x supersampled canvas)."""
    d = ImageDraw.Draw(img)
    ident, top, bot = scene.identity, scene.top, scene.bottoms
    h = ident.height * height * pose.scale
    b = ident.build * pose.squash
    cx, feet = pose.x, pose.feet - pose.lift
    y = lambda f: feet - h + f * h
    sleeve_frac = {"none": 0.0, "short": 0.4, "long": 1.0}[top.sleeves]
    torso_hw, arm_w, leg_w, gap = 0.105 * h * b, 0.074 * h * b, 0.082 * h * b, 0.013 * h * b
    # legs / bottoms
    spread = pose.stride * 0.03 * h
    leg_top, leg_len = y(0.61), 0.39 * h
    for side in (-1, 1):
        lx = cx + side * (gap / 2 + leg_w / 2) + side * spread * (1 if side > 0 else -1) * 0.5
        x0, x1 = lx - leg_w / 2, lx + leg_w / 2
        if bot.style == "pants":
            _rect(d, x0, leg_top, x1, leg_top + leg_len, bot.colour)
        else:
            cover = 0.45 if bot.style == "shorts" else 0.0
            _rect(d, x0, leg_top, x1, leg_top + leg_len, ident.skin)
            if cover:
                _rect(d, x0, leg_top, x1, leg_top + cover * leg_len, bot.colour)
        _rect(d, x0 - 0.1 * leg_w, leg_top + leg_len - 0.035 * h, x1 + 0.1 * leg_w, leg_top + leg_len, (45, 40, 40))
    if bot.style == "skirt":
        hw0, hw1 = torso_hw, torso_hw * 1.35
        _poly(d, [(cx - hw0, y(0.6)), (cx + hw0, y(0.6)), (cx + hw1, y(0.8)), (cx - hw1, y(0.8))], bot.colour)
    elif bot.style == "shorts":
        _rect(d, cx - torso_hw * 0.95, y(0.6), cx + torso_hw * 0.95, y(0.66), bot.colour)
    else:
        _rect(d, cx - torso_hw * 0.9, y(0.6), cx + torso_hw * 0.9, y(0.63), bot.colour)
    # arms (the right arm waves), then the torso over the shoulders
    arm_top, arm_len = y(0.21), 0.34 * h
    for side in (-1, 1):
        sx = cx + side * (torso_hw + arm_w / 2)
        angle = pose.arm if side > 0 else 0.0
        _arm(
            d,
            sx,
            arm_top + arm_w / 2,
            arm_len - arm_w / 2,
            arm_w,
            angle,
            side,
            ident.skin,
            top.colour if sleeve_frac else None,
            sleeve_frac,
        )
        if sleeve_frac == 0 and angle == 0:  # the arm top is squared off like examples/person.png
            _rect(d, sx - arm_w / 2, arm_top, sx + arm_w / 2, arm_top + arm_w / 2, ident.skin)
        elif sleeve_frac:
            _rect(d, sx - arm_w / 2, arm_top, sx + arm_w / 2, arm_top + arm_w / 2 + 1, top.colour)
    _pattern_fill(d, top, cx - torso_hw, y(0.197), cx + torso_hw, y(0.605))
    # head and hair
    rx, ry, hy = 0.079 * h * max(b, 0.8), 0.092 * h, y(0.092)
    if ident.hair_style == "long":
        _rect(d, cx - rx * 1.1, hy - ry * 0.2, cx + rx * 1.1, y(0.28), ident.hair)
    d.ellipse([(cx - rx) * SS, (hy - ry) * SS, (cx + rx) * SS, (hy + ry) * SS], fill=ident.skin)
    if ident.hair_style in ("short", "long", "bun"):
        d.chord(
            [(cx - rx * 1.04) * SS, (hy - ry * 1.06) * SS, (cx + rx * 1.04) * SS, (hy + ry * 0.9) * SS],
            start=180,
            end=360,
            fill=ident.hair,
        )
    if ident.hair_style == "bun":
        br = 0.045 * h
        d.ellipse(
            [(cx - br) * SS, (hy - ry - 1.5 * br) * SS, (cx + br) * SS, (hy - ry + 0.4 * br) * SS], fill=ident.hair
        )


def render_frame(scene: Scene, t: int, height: int, width: int, fps: int = 24) -> np.ndarray:
    """uint8 [H, W, 3]: frame `t` of the clip of `scene`."""
    bg = _background(scene.background, height * SS, width * SS)
    img = Image.fromarray(bg)
    draw_person(img, scene, pose_at(scene, t, height, width, fps), height)
    return np.asarray(img.resize((width, height), Image.Resampling.BOX))


def render_clip(scene: Scene, frames: int, height: int, width: int, fps: int = 24, start: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: frames start .. start + frames - 1."""
    return np.stack([render_frame(scene, start + t, height, width, fps) for t in range(frames)])


def render_garment(top: Top, size: int = 240) -> np.ndarray:
    """uint8 [size, size, 3]: the top laid flat on white (a T-shirt silhouette like examples/garment-red.png)."""
    s = size
    img = Image.new("RGB", (s * SS, s * SS), (255, 255, 255))
    d = ImageDraw.Draw(img)
    bx0, bx1, by0, by1 = 0.25 * s, 0.75 * s, 0.12 * s, 0.92 * s
    if top.sleeves != "none":
        reach = 0.3 if top.sleeves == "short" else 0.62
        for side in (-1, 1):
            edge = bx1 if side > 0 else bx0
            out = edge + side * 0.2 * s
            pts = [
                (edge - side * 0.02 * s, by0),
                (edge + side * 0.1 * s, by0),
                (out, by0 + reach * 0.55 * s),
                (out - side * 0.1 * s, by0 + reach * 0.62 * s),
                (edge, by0 + 0.3 * s),
            ]
            _poly(d, pts, top.colour)
    _pattern_fill(d, top, bx0, by0, bx1, by1)
    # neckline
    d.chord(
        [(0.4 * s) * SS, (by0 - 0.06 * s) * SS, (0.6 * s) * SS, (by0 + 0.06 * s) * SS], 0, 180, fill=(255, 255, 255)
    )
    return np.asarray(img.resize((s, s), Image.Resampling.BOX))


def reference_top(scene: Scene, rng: np.random.Generator, split: str = "train") -> Top:
    """A top clearly different from the scene's (the reference image wears it, as in the paper's data)."""
    while True:
        other = sample_top(rng, split)
        if _dist(other.colour, scene.top.colour) >= 100:
            return other


def static_caption(scene: Scene) -> str:
    """The scene without the top (the garment image says what the top is)."""
    ident, bot, bg = scene.identity, scene.bottoms, scene.background
    hair = "no hair" if ident.hair_style == "none" else f"{ident.hair_style} {colour_name(ident.hair)} hair"
    room = f"a {colour_name(bg.wall)} room" + (" with a floor" if bg.floor is not None else "")
    return f"A person with {hair} in {colour_name(bot.colour)} {bot.style}, in {room}."
