"""Video quality metrics for benchmarks: PSNR/SSIM, seam score, temporal flicker, prompt adherence.

Frames are ``(F, H, W, 3)`` arrays (uint8 0..255, or floats on the same
scale), as in ``SuperGenOutput.frames``. Adherence works on prompts of the
procedural world in :mod:`supergen.toyworld`, where the ground truth is known:
it finds the requested colour, classifies the blob's shape and measures its
motion, with no learned parts, so its verdict can be checked by eye.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from supergen.toyworld import COLOURS, SHAPES, parse_prompt, shape_area, shape_coverage


def _as_float(frames) -> np.ndarray:
    array = np.asarray(frames, dtype=np.float64)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {array.shape}")
    return array


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}; compare outputs of the same size")


def psnr(video, reference, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole video; ``inf`` when the videos are identical."""
    a, b = _as_float(video), _as_float(reference)
    _same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(video, reference, data_range: float = 255.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5), per frame and channel.

    The window shrinks (odd size, at most the frame's shorter side) for frames
    smaller than 11 pixels. Identical videos give exactly 1.
    """
    a, b = _as_float(video), _as_float(reference)
    _same_shape(a, b)
    size = min(11, a.shape[1], a.shape[2])
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    # (F*3, 1, H, W): every frame and channel is an independent image.
    x = torch.from_numpy(a).permute(0, 3, 1, 2).reshape(-1, 1, a.shape[1], a.shape[2])
    y = torch.from_numpy(b).permute(0, 3, 1, 2).reshape(-1, 1, a.shape[1], a.shape[2])
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def seam_score(frames, rows=(), cols=()) -> float:
    """Gradient energy across tile boundaries relative to the rest of the frame.

    ``rows``/``cols`` are pixel positions of boundaries: a boundary at column
    ``c`` lies between columns ``c-1`` and ``c``. The score is the mean absolute
    step across boundary lines divided by the mean absolute step across all
    other lines of the same orientation: about 1 for a seamless image, above 1
    when tiles show edges. Positions on the frame border (0 or the size) are
    ignored, since nothing is stitched there. Compare scores between settings
    of one canvas: the layout of the content moves it too.

    Args:
        frames: (F, H, W, 3) uint8 or float frames.
        rows, cols: pixel rows/columns where tiles meet, e.g. multiples of the
            tile size in pixels for a grid that does not shift.

    Example: a smooth diagonal ramp is seamless (1.0); brightening its right
    half, as a tile that came out differently would, makes a seam (16.0):

    >>> import numpy as np
    >>> y, x = np.mgrid[0:64, 0:64]
    >>> frames = np.repeat((x + y).astype(np.uint8)[None, :, :, None], 3, axis=3).repeat(2, axis=0)
    >>> round(seam_score(frames, rows=[32], cols=[32]), 2)
    1.0
    >>> frames[:, :, 32:] += 30
    >>> round(seam_score(frames, rows=[32], cols=[32]), 2)
    16.0
    """
    array = _as_float(frames)
    height, width = array.shape[1:3]
    rows = sorted({int(r) for r in rows if 0 < int(r) < height})
    cols = sorted({int(c) for c in cols if 0 < int(c) < width})
    if not rows and not cols:
        raise ValueError(f"seam_score needs at least one boundary inside the frame ({height}x{width}); got none")
    step_x = np.abs(np.diff(array, axis=2)).mean(axis=(0, 3))  # (H, W-1): step between column c-1 and c at c-1
    step_y = np.abs(np.diff(array, axis=1)).mean(axis=(0, 3))  # (H-1, W)
    col_is_seam = np.zeros(width - 1, dtype=bool)
    col_is_seam[[c - 1 for c in cols]] = True
    row_is_seam = np.zeros(height - 1, dtype=bool)
    row_is_seam[[r - 1 for r in rows]] = True
    seam = np.concatenate([step_x[:, col_is_seam].ravel(), step_y[row_is_seam, :].ravel()])
    interior = np.concatenate([step_x[:, ~col_is_seam].ravel(), step_y[~row_is_seam, :].ravel()])
    return float(seam.mean() / max(interior.mean(), 1e-12))


def temporal_flicker(frames) -> float:
    """Mean absolute change between consecutive frames, as a fraction of the 0..255 range.

    Moving content contributes too, so compare settings on the same prompt and
    seed rather than reading the value alone; a static video scores 0.
    """
    array = _as_float(frames)
    if array.shape[0] < 2:
        raise ValueError("temporal_flicker needs at least two frames")
    return float(np.abs(np.diff(array, axis=0)).mean() / 255.0)


# --- prompt adherence ------------------------------------------------------------

# A pixel "has" a colour when it lies within this RGB distance of it. Toy-world
# colours are >= ~110 apart and >= ~120 from any background pixel, so 70 keeps
# blurred edges in and backgrounds out.
COLOUR_TOLERANCE = 70.0
# A blob must cover this fraction of the frame (toy shapes cover 3..9%).
MIN_AREA_FRACTION = 0.008
# The blob must travel this fraction of the shorter side over the clip to count as moving.
MIN_TRAVEL_FRACTION = 0.1


def _components(mask: np.ndarray, wrap: bool = False) -> list[list[tuple[int, int]]]:
    """The 4-connected components of a boolean mask, as pixel lists, largest first.

    ``wrap`` connects pixels across opposite edges (a torus), as in the
    endless-stream world where a shape leaving one side re-enters the other.
    """
    height, width = mask.shape
    seen = np.zeros_like(mask)
    found: list[list[tuple[int, int]]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if wrap:
                    ny, nx = ny % height, nx % width
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return sorted(found, key=len, reverse=True)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty mask if none)."""
    out = np.zeros_like(mask)
    components = _components(mask)
    if components:
        ys, xs = zip(*components[0])
        out[list(ys), list(xs)] = True
    return out


def _blobs(array: np.ndarray, colour: str) -> list[np.ndarray]:
    target = np.asarray(COLOURS[colour], dtype=np.float64)
    near = np.linalg.norm(array - target, axis=-1) < COLOUR_TOLERANCE
    return [_largest_component(frame) for frame in near]


def _classify_shape(blob: np.ndarray) -> str:
    """The shape whose template best overlaps the blob (intersection over union).

    Each template (upright, as the world draws them) has the blob's area and is
    centred on its centroid; for the equilateral triangle the centroid is the
    circumcentre. Matching whole templates is robust to the blur of a small
    decoder: a blurred triangle loses its tips and its bounding-box fill ratio
    drifts towards a circle's, but it still overlaps a triangle best (measured
    on ground-truth clips blurred by a Gaussian of sigma 1.2 px: 0.99 correct
    against 0.70 for the fill ratio; ``tests/test_metrics.py``).
    """
    ys, xs = np.nonzero(blob)
    cy, cx = ys.mean(), xs.mean()
    yy, xx = np.mgrid[0 : blob.shape[0], 0 : blob.shape[1]]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        radius = math.sqrt(len(ys) / shape_area(shape, 1.0))
        template = shape_coverage(shape, xx - cx, yy - cy, radius) >= 0.5
        iou = np.logical_and(template, blob).sum() / np.logical_or(template, blob).sum()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


@dataclass(frozen=True)
class Adherence:
    """What the detector found in one clip, against what its prompt asked for."""

    colour: str | None
    shape: str | None
    direction: str | None
    colour_ok: bool
    shape_ok: bool
    direction_ok: bool

    @property
    def score(self) -> float:
        """Fraction of the three facts (colour, shape, direction) that match the prompt."""
        return (self.colour_ok + self.shape_ok + self.direction_ok) / 3.0


def adherence(frames, prompt: str) -> Adherence:
    """Check a clip against a toy-world prompt: colour present, shape, motion direction.

    Colour: among the world's shape colours, the one whose largest blob covers
    the most pixels, counted only if it is big enough in at least half the
    frames. Shape and direction are read from the blob of the requested colour
    when it is present (else from the detected colour): shape by the best
    matching template, majority over frames; direction from a least-squares fit of the
    blob's centroid over time, which must travel ``MIN_TRAVEL_FRACTION`` of
    the frame. Raises ``ValueError`` if ``prompt`` is not a toy-world prompt.
    """
    facts = parse_prompt(prompt)
    array = _as_float(frames)
    num_frames, height, width = array.shape[:3]
    min_area = MIN_AREA_FRACTION * height * width
    present: dict[str, list[np.ndarray]] = {}
    for colour in COLOURS:
        blobs = _blobs(array, colour)
        big = [b for b in blobs if b.sum() >= min_area]
        if 2 * len(big) >= num_frames:
            present[colour] = blobs
    detected_colour = max(present, key=lambda c: sum(int(b.sum()) for b in present[c]), default=None)
    source = facts.colour if facts.colour in present else detected_colour
    shape = direction = None
    if source is not None:
        frames_with_blob = [(t, b) for t, b in enumerate(present[source]) if b.sum() >= min_area]
        votes = [_classify_shape(b) for _, b in frames_with_blob]
        shape = max(SHAPES, key=votes.count)
        if len(frames_with_blob) >= 3:
            times = np.array([t for t, _ in frames_with_blob], dtype=np.float64)
            centroids = np.array([np.argwhere(b).mean(axis=0) for _, b in frames_with_blob])  # (n, [y, x])
            slope_y, slope_x = np.polyfit(times, centroids, 1)[0]
            travel_x, travel_y = slope_x * (num_frames - 1), slope_y * (num_frames - 1)
            if max(abs(travel_x), abs(travel_y)) >= MIN_TRAVEL_FRACTION * min(height, width):
                if abs(travel_x) >= abs(travel_y):
                    direction = "right" if travel_x > 0 else "left"
                else:
                    direction = "down" if travel_y > 0 else "up"
    return Adherence(
        colour=detected_colour,
        shape=shape,
        direction=direction,
        colour_ok=detected_colour == facts.colour,
        shape_ok=shape == facts.shape,
        direction_ok=direction == facts.direction,
    )


def mean_adherence(videos, prompts) -> dict[str, float]:
    """Average colour/shape/direction accuracy and overall score over several clips."""
    results = [adherence(v, p) for v, p in zip(videos, prompts, strict=True)]
    if not results:
        raise ValueError("mean_adherence needs at least one video")
    return {
        "colour": float(np.mean([r.colour_ok for r in results])),
        "shape": float(np.mean([r.shape_ok for r in results])),
        "direction": float(np.mean([r.direction_ok for r in results])),
        "score": float(np.mean([r.score for r in results])),
    }


def object_counts(frames, min_area_fraction: float = MIN_AREA_FRACTION, wrap: bool = False) -> np.ndarray:
    """Objects per frame: connected blobs of any toy-world shape colour, shape ``(F,)``.

    A blob counts when it covers at least ``min_area_fraction`` of the frame
    (the default keeps a shape drawn at a native tile's scale on a 3x canvas,
    about 1.4% of the frame, and drops anti-aliasing specks). Toy-world clips
    hold exactly one shape, so a tiled run that draws one subject per tile
    scores up to the tile count. ``wrap`` counts a shape split across the
    frame edges once (the endless-stream world wraps around).
    """
    array = _as_float(frames)
    min_area = min_area_fraction * array.shape[1] * array.shape[2]
    counts = np.zeros(array.shape[0], dtype=np.int64)
    for colour, rgb in COLOURS.items():
        near = np.linalg.norm(array - np.asarray(rgb, dtype=np.float64), axis=-1) < COLOUR_TOLERANCE
        for t, frame in enumerate(near):
            counts[t] += sum(len(c) >= min_area for c in _components(frame, wrap=wrap))
    return counts


# --- long streams (the wrap-around world of toyworld.render_stream_clip) --------------------------


def _colour_mask(array: np.ndarray, colour: str) -> np.ndarray:
    return np.linalg.norm(array - np.asarray(COLOURS[colour], dtype=np.float64), axis=-1) < COLOUR_TOLERANCE


def _circular_centre(mask: np.ndarray) -> tuple[float, float] | None:
    """Centre (y, x) of a mask (H, W), or of a stack of them, on the torus (circular mean); None if empty."""
    index = np.nonzero(mask)
    ys, xs = index[-2], index[-1]
    if not len(ys):
        return None
    centre = []
    for coords, size in ((ys, mask.shape[-2]), (xs, mask.shape[-1])):
        angle = 2 * math.pi * (coords + 0.5) / size
        mean = math.atan2(np.sin(angle).mean(), np.cos(angle).mean())
        centre.append((mean / (2 * math.pi) * size - 0.5) % size)
    return centre[0], centre[1]


def colour_centre(frame, colour: str) -> tuple[float, float] | None:
    """Centre (y, x) of all of ``colour`` in one frame (H, W, 3) on the torus, None if none is there.

    Unlike :func:`shape_track` it does not need the shape in one piece, so a
    shape split by a blurred edge still has its centre.
    """
    return _circular_centre(_colour_mask(_as_float(np.asarray(frame)[None])[0], colour))


def tracked_colour(frames, prompt: str) -> str:
    """The colour a stream's block is judged by: the prompt's if it is there, else the most present one."""
    facts = parse_prompt(prompt)
    array = _as_float(frames)
    min_pixels = MIN_AREA_FRACTION * array.shape[1] * array.shape[2] * array.shape[0] / 2
    pixels = {c: int(_colour_mask(array, c).sum()) for c in COLOURS}
    return facts.colour if pixels[facts.colour] >= min_pixels else max(pixels, key=pixels.get)


def centred_on_shape(frames, prompt: str) -> np.ndarray:
    """The block rolled (as a torus, one shift for all frames) so its tracked shape sits mid-frame.

    A wrapped shape split across the edges then reads as the one blob it is, so
    :func:`adherence` and :func:`object_counts` apply unchanged; the motion
    inside a block is a few pixels, so no frame of it crosses the edges again.
    """
    array = _as_float(frames)
    centre = _circular_centre(_colour_mask(array, tracked_colour(array, prompt)))
    if centre is None:
        return array
    height, width = array.shape[1:3]
    shift = (int(round(height / 2 - centre[0])), int(round(width / 2 - centre[1])))
    return np.roll(array, shift, axis=(1, 2))


def shape_track(frames, colour: str) -> np.ndarray:
    """Per-frame centre (y, x) of the largest blob of ``colour`` on the torus, NaN where it is too small: ``(F, 2)``."""
    array = _as_float(frames)
    min_area = MIN_AREA_FRACTION * array.shape[1] * array.shape[2]
    out = np.full((array.shape[0], 2), np.nan)
    for t, mask in enumerate(_colour_mask(array, colour)):
        components = _components(mask, wrap=True)
        if components and len(components[0]) >= min_area:
            blob = np.zeros_like(mask)
            ys, xs = zip(*components[0])
            blob[list(ys), list(xs)] = True
            out[t] = _circular_centre(blob)
    return out


def wrapped_steps(track: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frame-to-frame displacement (dy, dx) of a torus track, each the shortest way round: ``(F-1, 2)``."""
    size = np.array([height, width], dtype=np.float64)
    return (np.diff(track, axis=0) + size / 2) % size - size / 2
