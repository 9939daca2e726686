"""A procedural video world with prompts that describe it exactly.

Every clip is one coloured shape (circle, square, triangle) moving left,
right, up or down over a textured gradient background while the camera pans
slowly. The prompt is written from the clip's parameters
("a red circle moving left over a blue sky"), so every clip has a known
ground truth: the toy model (``--model toy``) is trained on this world and
:mod:`supergen.metrics` checks generated videos against their prompts.

Colours were chosen far apart in RGB from each other and from every
background, so a colour-distance detector can find the shape honestly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# RGB 0..255; every pair is at least ~110 apart, and each is >= ~120 from every background pixel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "purple": (165, 55, 215),
}
# (top colour, bottom colour, texture amplitude): slow vertical gradients with a
# faint diagonal texture, so a camera pan is visible without hiding the shape.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], float]] = {
    "blue sky": ((60, 115, 205), (125, 175, 230), 10.0),
    "green field": ((95, 160, 65), (35, 100, 35), 12.0),
    "dark night": ((12, 12, 40), (45, 45, 90), 8.0),
}
# Pixel motion per frame, in image coordinates (y grows downwards).
_DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

_PROMPT_RE = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>\w+) over an? (?P<background>\w+ \w+)$"
)


@dataclass(frozen=True, kw_only=True)
class ClipParams:
    """Everything that determines one clip. Sizes are fractions of the frame, speeds per frame.

    ``start_x``/``start_y`` place the shape centre at frame 0 (fractions of the
    width/height); ``speed`` is the shape's motion per frame as a fraction of
    the shorter side; ``pan_x``/``pan_y`` move the background (camera pan) in
    the same units; ``radius`` is the shape's circumradius over the shorter side.
    """

    shape: str
    colour: str
    direction: str
    background: str
    start_x: float = 0.5
    start_y: float = 0.5
    radius: float = 0.17
    speed: float = 0.045
    pan_x: float = 0.0
    pan_y: float = 0.0
    texture_phase: float = 0.0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("direction", self.direction, DIRECTIONS),
            ("background", self.background, tuple(BACKGROUNDS)),
        ):
            if value not in allowed:
                raise ValueError(f"ClipParams.{name}={value!r} is not one of {', '.join(allowed)}")
        if not 0.0 < self.radius <= 0.5:
            raise ValueError(f"ClipParams.radius={self.radius} must be in (0, 0.5] (fraction of the shorter side)")

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} over a {self.background}"


@dataclass(frozen=True)
class PromptFacts:
    """What a toy-world prompt asks for."""

    colour: str
    shape: str
    direction: str
    background: str


def parse_prompt(prompt: str) -> PromptFacts:
    """Read colour, shape, direction and background back from a toy-world prompt.

    Raises ``ValueError`` for text that is not a toy-world prompt, so metrics
    are never computed against a guess.
    """
    match = _PROMPT_RE.match(prompt.strip().lower())
    facts = PromptFacts(**match.groupdict()) if match else None
    if (
        facts is None
        or facts.colour not in COLOURS
        or facts.shape not in SHAPES
        or facts.direction not in DIRECTIONS
        or facts.background not in BACKGROUNDS
    ):
        raise ValueError(
            f"{prompt!r} is not a toy-world prompt; expected 'a <colour> <shape> moving <direction> over a "
            f"<background>' with colour in {sorted(COLOURS)}, shape in {list(SHAPES)}, direction in "
            f"{list(DIRECTIONS)}, background in {sorted(BACKGROUNDS)}"
        )
    return facts


def all_prompts() -> list[str]:
    """Every prompt the world can produce (the toy model's training vocabulary)."""
    return [
        ClipParams(shape=s, colour=c, direction=d, background=b).prompt
        for c in COLOURS
        for s in SHAPES
        for d in DIRECTIONS
        for b in BACKGROUNDS
    ]


def sample_params(rng: np.random.Generator) -> ClipParams:
    """Draw one clip's parameters; the start point keeps the shape in frame for a 9..17-frame clip."""
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    dx, dy = _DIRECTION_VECTORS[direction]
    speed = float(rng.uniform(0.035, 0.045))
    # Start on the side the shape leaves from, so its path crosses the middle.
    along = float(rng.uniform(0.66, 0.72))
    across = float(rng.uniform(0.3, 0.7))
    start_x = 1.0 - along if dx > 0 else along if dx < 0 else across
    start_y = 1.0 - along if dy > 0 else along if dy < 0 else across
    pan_angle = float(rng.uniform(0, 2 * math.pi))
    pan_speed = float(rng.uniform(0.0, 0.012))
    return ClipParams(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        direction=direction,
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        start_x=start_x,
        start_y=start_y,
        radius=float(rng.uniform(0.19, 0.24)),
        speed=speed,
        pan_x=pan_speed * math.cos(pan_angle),
        pan_y=pan_speed * math.sin(pan_angle),
        texture_phase=float(rng.uniform(0, 2 * math.pi)),
    )


# A square's half side over its circumradius: slightly smaller than the circumscribed
# square so all three shapes have similar areas.
SQUARE_HALF_SIDE = 0.8


def shape_area(shape: str, radius: float) -> float:
    """Area of a shape of circumradius ``radius``, as :func:`shape_coverage` draws it."""
    if shape == "circle":
        return math.pi * radius**2
    if shape == "square":
        return (2 * SQUARE_HALF_SIDE * radius) ** 2
    return 3 * math.sqrt(3) / 4 * radius**2


def shape_coverage(shape: str, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (pixels, positive inside)."""
    if shape == "circle":
        inside = radius - np.hypot(px, py)
    elif shape == "square":
        half = SQUARE_HALF_SIDE * radius
        inside = half - np.maximum(np.abs(px), np.abs(py))
    else:
        # Upward equilateral triangle with circumradius `radius`: the minimum of
        # the three edges' inside distances; edge normals point at 270, 30 and
        # 150 degrees (y up) and each edge lies radius/2 from the centre.
        d = [
            radius / 2 - (px * math.cos(math.radians(a)) - py * math.sin(math.radians(a)))
            for a in (270.0, 30.0, 150.0)
        ]
        inside = np.minimum(np.minimum(d[0], d[1]), d[2])
    return np.clip(inside + 0.5, 0.0, 1.0)


def _background(params: ClipParams, xx: np.ndarray, yy: np.ndarray, t: int) -> np.ndarray:
    """Frame ``t``'s background (H, W, 3) float: a vertical gradient with a faint diagonal texture, sampled
    at coordinates the camera pan moves over time."""
    height, width = xx.shape
    short = min(height, width)
    top, bottom, amplitude = BACKGROUNDS[params.background]
    top_a, bottom_a = np.asarray(top, np.float64), np.asarray(bottom, np.float64)
    bx = xx + params.pan_x * short * t
    by = yy + params.pan_y * short * t
    mix = np.clip(by / max(height - 1, 1), -0.5, 1.5)[..., None]
    texture = amplitude * (
        np.sin(2 * math.pi * (bx + 0.6 * by) / (0.45 * short) + params.texture_phase)
        * np.sin(2 * math.pi * (0.7 * bx - by) / (0.6 * short) + 0.5 * params.texture_phase)
    )
    return top_a + (bottom_a - top_a) * mix + texture[..., None]


def render_clip(params: ClipParams, height: int, width: int, num_frames: int, return_alpha: bool = False):
    """Render a clip as uint8 frames ``(F, H, W, 3)``; with ``return_alpha`` also the shape's coverage ``(F, H, W)``."""
    short = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = _DIRECTION_VECTORS[params.direction]
    colour = np.asarray(COLOURS[params.colour], np.float64)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    coverage = np.empty((num_frames, height, width), dtype=np.float32)
    for t in range(num_frames):
        background = _background(params, xx, yy, t)
        cx = (params.start_x * width) + dx * params.speed * short * t
        cy = (params.start_y * height) + dy * params.speed * short * t
        alpha = shape_coverage(params.shape, xx + 0.5 - cx, yy + 0.5 - cy, params.radius * short)[..., None]
        frames[t] = np.clip(np.rint(background * (1 - alpha) + colour * alpha), 0, 255).astype(np.uint8)
        coverage[t] = alpha[..., 0]
    return (frames, coverage) if return_alpha else frames


def render_batch(seed: int, count: int, height: int, width: int, num_frames: int, return_alpha: bool = False):
    """``count`` clips ``(N, F, H, W, 3)`` uint8 and their prompts, fully determined by ``seed``.

    With ``return_alpha`` a third item holds the shapes' coverage ``(N, F, H, W)``.
    """
    rng = np.random.default_rng(seed)
    params = [sample_params(rng) for _ in range(count)]
    rendered = [render_clip(p, height, width, num_frames, return_alpha=True) for p in params]
    clips = np.stack([frames for frames, _ in rendered])
    prompts = [p.prompt for p in params]
    if return_alpha:
        return clips, prompts, np.stack([alpha for _, alpha in rendered])
    return clips, prompts


# --- endless streams: shapes that wrap around the frame edges ---------------------------------


@dataclass(frozen=True, kw_only=True)
class PromptSwitch:
    """From video frame ``frame`` on, the shape has ``colour`` and moves ``direction`` (same shape, same place)."""

    frame: int
    colour: str
    direction: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.direction not in DIRECTIONS:
            raise ValueError(f"PromptSwitch({self.colour!r}, {self.direction!r}): colour must be one of "
                             f"{', '.join(COLOURS)} and direction one of {', '.join(DIRECTIONS)}")


def sample_stream_params(rng: np.random.Generator) -> ClipParams:
    """One endless-stream clip: anywhere in the frame, a clear speed, the camera panning sideways only.

    A vertical pan would slide the background's gradient out of its range
    over a long stream; a horizontal one only moves the periodic texture.
    """
    pan_speed = float(rng.uniform(-0.01, 0.01))
    return ClipParams(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        direction=DIRECTIONS[rng.integers(len(DIRECTIONS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        start_x=float(rng.uniform(0, 1)),
        start_y=float(rng.uniform(0, 1)),
        radius=float(rng.uniform(0.19, 0.24)),
        speed=float(rng.uniform(0.045, 0.06)),
        pan_x=pan_speed,
        pan_y=0.0,
        texture_phase=float(rng.uniform(0, 2 * math.pi)),
    )


def render_stream_clip(params: ClipParams, height: int, width: int, num_frames: int,
                       switch: PromptSwitch | None = None) -> np.ndarray:
    """Render ``num_frames`` uint8 frames ``(F, H, W, 3)`` of a shape that wraps around the frame edges.

    The world is a torus: a shape leaving on the right comes back on the left,
    drawn in both places while it crosses, so a stream never runs out of
    motion. ``switch`` changes colour and direction mid-clip (a prompt switch);
    the position carries on from where the shape was.
    """
    short = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    cx, cy = params.start_x * width, params.start_y * height
    for t in range(num_frames):
        switched = switch is not None and t >= switch.frame
        colour = np.asarray(COLOURS[switch.colour if switched else params.colour], np.float64)
        if t > 0:
            # The step into frame t uses the direction that holds at frame t.
            dx, dy = _DIRECTION_VECTORS[switch.direction if switched else params.direction]
            cx = (cx + dx * params.speed * short) % width
            cy = (cy + dy * params.speed * short) % height
        background = _background(params, xx, yy, t)
        alpha = np.zeros((height, width))
        for ox in (-width, 0, width):
            for oy in (-height, 0, height):
                alpha = np.maximum(alpha, shape_coverage(params.shape, xx + 0.5 - cx - ox, yy + 0.5 - cy - oy,
                                                         params.radius * short))
        frames[t] = np.clip(np.rint(background * (1 - alpha[..., None]) + colour * alpha[..., None]), 0, 255)
    return frames


def switched_prompt(params: ClipParams, switch: PromptSwitch) -> str:
    """The prompt that holds after ``switch``."""
    return ClipParams(shape=params.shape, colour=switch.colour, direction=switch.direction,
                      background=params.background).prompt
