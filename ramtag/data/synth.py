"""Seeded synthetic multi-label scenes: coloured shapes on varied backgrounds, with boxes and captions.

Every scene is a pure function of ``(seed, index, size)``: the same arguments give byte-identical
pixels on any machine, independent of how many other scenes are generated or in which order.

Labels are the shapes and the colours present. A fixed part of them is *unseen*, in the spirit of the
NUS-WIDE 925/81 split: adapter training must only ever see :data:`SEEN_LABELS`, while the words of
:data:`UNSEEN_LABELS` still occur in captions, so a CLIP pretrained on the captions knows them.

Boxes are ``[x0, y0, x1, y1]`` in pixels, end-exclusive: every pixel the object touches lies in
``x0 <= x < x1`` and ``y0 <= y < y1``.

This module draws scenes; :mod:`ramtag.data.synth_files` writes them in every format ramtag reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ramtag.errors import UsageError

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "ring", "cross",
    "diamond", "arrow", "bolt", "heart", "hexagon", "crescent",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 80, 220),
    "yellow": (240, 215, 30),
    "white": (246, 246, 246),
    "black": (18, 18, 18),
    "orange": (245, 135, 20),
    "purple": (140, 45, 185),
}
UNSEEN_SHAPES: tuple[str, ...] = ("heart", "hexagon", "crescent")
UNSEEN_COLOURS: tuple[str, ...] = ("orange", "purple")

SEEN_LABELS: tuple[str, ...] = tuple(
    [s for s in SHAPES if s not in UNSEEN_SHAPES] + [c for c in COLOURS if c not in UNSEEN_COLOURS]
)
UNSEEN_LABELS: tuple[str, ...] = UNSEEN_SHAPES + UNSEEN_COLOURS
# Seen first, then unseen: the order of the reference implementation's GZSL label list.
ALL_LABELS: tuple[str, ...] = SEEN_LABELS + UNSEEN_LABELS

TEXTURES: tuple[str, ...] = ("solid", "striped", "spotted")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "stripes", "checker")

MAX_OBJECTS = 4
_SUPERSAMPLE = 4
# Objects may overlap this much (fraction of the smaller box) so each stays mostly visible.
_MAX_OVERLAP = 0.15
_PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    ``mask`` marks the pixels the object covers at least half (before later objects are drawn on top);
    ``box`` bounds every pixel it touches at all.
    """

    shape: str
    colour: str
    texture: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False, compare=False)

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """A rendered scene, its multi-label ground truth (in :data:`ALL_LABELS` order) and a caption."""

    image: Image.Image
    labels: tuple[str, ...]
    objects: tuple[SceneObject, ...]
    caption: str
    background: Image.Image = field(repr=False, compare=False)

    @property
    def boxes(self) -> list[dict]:
        return [obj.to_json() for obj in self.objects]


# --------------------------------------------------------------------------- shapes


def _circle(points: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _regular(sides: int, phase: float) -> np.ndarray:
    t = phase + np.arange(sides) * 2 * np.pi / sides
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max() * 0.98


_POLYGONS: dict[str, list[tuple[np.ndarray, bool]]] = {
    # Each shape is a list of (polygon in the unit disc, filled); unfilled polygons are cut out.
    "circle": [(_circle() * 0.95, True)],
    "square": [(_regular(4, np.pi / 4) * 0.98, True)],
    "triangle": [(_regular(3, -np.pi / 2) + [0, 0.2], True)],
    "star": [(_star(), True)],
    "ring": [(_circle() * 0.95, True), (_circle() * 0.55, False)],
    "cross": [(np.array([[-0.3, -0.95], [0.3, -0.95], [0.3, -0.3], [0.95, -0.3], [0.95, 0.3], [0.3, 0.3],
                         [0.3, 0.95], [-0.3, 0.95], [-0.3, 0.3], [-0.95, 0.3], [-0.95, -0.3], [-0.3, -0.3]]), True)],
    "diamond": [(np.array([[0, -1.0], [0.62, 0], [0, 1.0], [-0.62, 0]]), True)],
    "arrow": [(np.array([[-0.95, -0.22], [0.15, -0.22], [0.15, -0.62], [0.95, 0], [0.15, 0.62], [0.15, 0.22],
                         [-0.95, 0.22]]), True)],
    "bolt": [(np.array([[0.15, -1.0], [-0.55, 0.12], [-0.05, 0.12], [-0.2, 1.0], [0.55, -0.18], [0.05, -0.18],
                        [0.3, -1.0]]) * 0.95, True)],
    "heart": [(_heart(), True)],
    "hexagon": [(_regular(6, 0.0) * 0.97, True)],
    "crescent": [(_circle() * 0.95, True), (_circle() * 0.8 + [0.42, -0.12], False)],
}
_ROTATION_DEG = 15.0
assert set(_POLYGONS) == set(SHAPES)


def _shape_alpha(shape: str, size: int, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage (0-255) of one shape, drawn 4x larger and box-filtered down."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for polygon, filled in _POLYGONS[shape]:
        pts = (polygon @ rot.T) * radius + np.asarray(centre)
        pts = pts * _SUPERSAMPLE
        draw.polygon([tuple(p) for p in pts.round(2).tolist()], fill=255 if filled else 0)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


# --------------------------------------------------------------------------- painting


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation, mid-luminance colour, so objects' colours (black and white included) stand out."""
    grey = rng.uniform(75, 185)
    tint = rng.normal(0, 1, 3)
    tint = tint / (np.linalg.norm(tint) + 1e-9) * rng.uniform(0, 28)
    return np.clip(grey + tint, 0, 255)


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    a, b = _muted_colour(rng), _muted_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    if kind == "plain":
        img = np.broadcast_to(a, (size, size, 3)).copy()
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = np.cos(theta) * xx + np.sin(theta) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "noise":
        coarse = rng.normal(0, 1, (max(size // 8, 2), max(size // 8, 2)))
        smooth = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((size, size),
                                                                                     Image.Resampling.BILINEAR))
        t = 1 / (1 + np.exp(-1.5 * smooth))
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.25)
        t = (np.cos(theta) * xx + np.sin(theta) * yy) / period
        img = np.where((np.floor(t) % 2 == 0)[..., None], a, a * 0.6 + b * 0.4)
    else:  # checker
        cells = rng.integers(3, 9)
        t = (np.floor(xx * cells * 0.999) + np.floor(yy * cells * 0.999)) % 2
        img = np.where((t == 0)[..., None], a, a * 0.6 + b * 0.4)
    return kind, img


def _object_paint(rng: np.random.Generator, colour: str, texture: str, size: int,
                  box: tuple[int, int, int, int]) -> np.ndarray:
    """The object's fill inside ``box``: its colour, jittered, with a same-hue texture."""
    base = np.clip(np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-14, 14, 3), 0, 255)
    # Texture shades keep the hue: darker for light colours, lighter for black.
    shade = base * 0.72 if base.mean() > 60 else base + 55
    yy, xx = np.mgrid[box[1]:box[3], box[0]:box[2]].astype(np.float64)
    if texture == "striped":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 6.0) * size / 64
        pattern = (np.floor((np.cos(theta) * xx + np.sin(theta) * yy) / period) % 2) == 1
    elif texture == "spotted":
        step = rng.uniform(4.0, 7.0) * size / 64
        ox, oy = rng.uniform(0, step, 2)
        dx = (xx + ox) % step - step / 2
        dy = (yy + oy) % step - step / 2
        pattern = dx**2 + dy**2 < (step * 0.28) ** 2
    else:
        pattern = np.zeros(xx.shape, dtype=bool)
    return np.where(pattern[..., None], shade, base)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _box_of(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --------------------------------------------------------------------------- scenes and captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(objects: Sequence[SceneObject] | Sequence[tuple[str, str]], style: str = "full",
             rng: np.random.Generator | None = None) -> str:
    """A caption in the style of the demo model's template ``"a photo of a {}."``.

    ``style``: ``"full"`` names each object's colour and shape, ``"shapes"`` and ``"colours"`` only one of
    them (each distinct value once), ``"label"`` a single present label chosen by ``rng``. With ``rng``
    the order of the mentions is shuffled; without it, it follows the objects' order.
    """
    pairs = [(o.colour, o.shape) if isinstance(o, SceneObject) else (o[0], o[1]) for o in objects]
    if not pairs:
        raise UsageError("a caption needs at least one object")
    if style == "full":
        phrases = [f"{colour} {shape}" for colour, shape in pairs]
    elif style == "shapes":
        phrases = list(dict.fromkeys(shape for _, shape in pairs))
    elif style == "colours":
        phrases = list(dict.fromkeys(colour for colour, _ in pairs))
    elif style == "label":
        present = sorted({v for pair in pairs for v in pair}, key=ALL_LABELS.index)
        if rng is None:
            raise UsageError("style 'label' needs an rng to choose the label")
        phrases = [present[int(rng.integers(len(present)))]]
    else:
        raise UsageError(f"unknown caption style {style!r}")
    if rng is not None and len(phrases) > 1:
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    return "a photo of " + _join([f"{_article(p)} {p}" for p in phrases]) + "."


def generate_scene(seed: int, index: int, size: int = 64, max_objects: int = MAX_OBJECTS,
                   palette: Sequence[str] | None = None) -> Scene:
    """Render scene ``index`` of the stream ``seed``: 1 to ``max_objects`` objects on a varied background.

    ``palette`` restricts the objects' colours (default: all of :data:`COLOURS`); the demo model's build
    uses it to make batches in which colour cannot tell images apart, so only shape can.
    """
    if size < 16:
        raise UsageError(f"image size must be at least 16 pixels, got {size}")
    if not 1 <= max_objects <= 8:
        raise UsageError(f"max_objects must be between 1 and 8, got {max_objects}")
    if seed < 0 or index < 0:
        raise UsageError("seed and index must be non-negative")
    colours = list(COLOURS) if palette is None else list(palette)
    if not colours or any(c not in COLOURS for c in colours):
        raise UsageError(f"palette must name colours from {', '.join(COLOURS)}")
    rng = np.random.default_rng([seed, index])
    _, background = _background(rng, size)
    canvas = background.copy()

    wanted = int(rng.integers(1, max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []
    used_pairs: set[tuple[str, str]] = set()
    objects: list[SceneObject] = []
    for _ in range(wanted):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        # Fewer objects may be larger; a shape always fits in the disc of its radius, rotated or not.
        radius = size * rng.uniform(0.15, 0.27 if wanted > 2 else 0.33)
        angle = math.radians(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG))
        spot = None
        for _ in range(_PLACEMENT_TRIES):
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            disc = (cx - radius, cy - radius, cx + radius, cy + radius)
            if all(_overlap(disc, other) <= _MAX_OVERLAP for other in placed):
                spot = (float(cx), float(cy))
                break
        if spot is None or (colour, shape) in used_pairs:
            continue
        alpha = _shape_alpha(shape, size, spot, radius, angle)
        if not alpha.any():
            continue
        box = _box_of(alpha)
        paint = _object_paint(rng, colour, texture, size, box)
        region = (slice(box[1], box[3]), slice(box[0], box[2]))
        a = alpha[region][..., None].astype(np.float64) / 255.0
        canvas[region] = canvas[region] * (1 - a) + paint * a
        placed.append((spot[0] - radius, spot[1] - radius, spot[0] + radius, spot[1] + radius))
        used_pairs.add((colour, shape))
        objects.append(SceneObject(shape, colour, texture, box, alpha >= 128))

    if not objects:  # unreachable in practice: the first object always fits; kept so labels are never empty
        raise RuntimeError(f"scene {seed}/{index} placed no object")
    canvas = canvas + rng.normal(0, 2.0, canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), mode="RGB")
    present = {o.shape for o in objects} | {o.colour for o in objects}
    labels = tuple(label for label in ALL_LABELS if label in present)
    bg_image = Image.fromarray(np.clip(background, 0, 255).round().astype(np.uint8), mode="RGB")
    return Scene(image, labels, tuple(objects), describe(objects), bg_image)
