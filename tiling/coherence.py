"""Global-coherence math for the tiled refinement (pure tensor functions, no models).

Native-size tiles see only their own part of an up-scaled canvas, so each one
is free to draw the whole prompt again: at 4x the area a tiled run draws one
subject per tile. Two training-free remedies keep the sketch's layout while
the tiles add detail, both scheduled by :func:`cosine_decay` over the
refinement (strong early, when layout forms; gone late, when detail forms):

* guidance from the up-scaled sketch: the canvas is pulled towards the sketch
  noised to the current step, either in every frequency (DemoFusion's *skip
  residual*) or only in the band the sketch actually resolves
  (:func:`lowpass`, FreeScale / HiFlow style), leaving the high frequencies to
  the tiles;
* global views (:class:`DilatedViews`, DemoFusion's *dilated sampling*):
  strided sub-canvases of about native size, each covering the whole picture
  at a coarser grid, whose model outputs are blended with the tiles'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Shape3 = tuple[int, int, int]


def cosine_decay(progress: float, exponent: float) -> float:
    """``((1 + cos(pi * progress)) / 2) ** exponent``: 1 at ``progress`` 0, 0 at 1.

    ``progress`` is the fraction of the refinement done (step / steps);
    larger exponents make the weight fall off sooner.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress} must be in [0, 1]")
    return ((1.0 + math.cos(math.pi * progress)) / 2.0) ** exponent


def lowpass(x_BCFHW: torch.Tensor, size_HW: tuple[int, int]) -> torch.Tensor:
    """The band of ``x`` a ``size_HW`` canvas can hold: area down-sampling there, bilinear back up.

    Time is left alone. Idempotent up to the interpolation's smoothing, and the
    identity when ``size_HW`` is the canvas's own size.
    """
    b, c, f, h, w = x_BCFHW.shape
    if tuple(size_HW) == (h, w):
        return x_BCFHW
    frames = x_BCFHW.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float()
    low = F.adaptive_avg_pool2d(frames, size_HW)
    low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return low.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).to(x_BCFHW.dtype)


class DilatedViews:
    """Strided sub-canvases that together cover every cell of a canvas.

    On each spatial axis the canvas of length ``L`` is read with stride
    ``s = ceil(L / view)``: view ``i`` takes cells ``i, i + s, i + 2s, ...``,
    so each view spans the whole picture at ``1/s`` of its resolution. A
    view's length is ``ceil(L / s)`` rounded up to ``align`` (the patch
    size), and indices past the canvas wrap around, so some cells appear in
    two views; :meth:`scatter` averages them. With ``s = 1`` on both axes there
    is one view, the canvas itself.
    """

    def __init__(self, canvas: Shape3, view_HW: tuple[int, int], align_HW: tuple[int, int] = (1, 1)):
        self.canvas = tuple(canvas)
        self.strides = tuple(max(1, math.ceil(length / view)) for length, view in zip(canvas[1:], view_HW))
        self.index = []
        for length, stride, align in zip(canvas[1:], self.strides, align_HW):
            size = math.ceil(math.ceil(length / stride) / align) * align
            self.index.append([(offset + stride * torch.arange(size)) % length for offset in range(stride)])
        self.views = [(rows, cols) for rows in self.index[0] for cols in self.index[1]]
        count = torch.zeros(canvas[1:], dtype=torch.float32)
        for rows, cols in self.views:
            count.index_put_((rows[:, None], cols[None, :]), torch.ones(len(rows), len(cols)), accumulate=True)
        if bool((count == 0).any()):
            raise RuntimeError("dilated views leave cells uncovered; this is a bug")
        self.count = count

    def __len__(self) -> int:
        return len(self.views)

    @property
    def view_size(self) -> tuple[int, int]:
        return len(self.index[0][0]), len(self.index[1][0])

    def gather(self, canvas_BCFHW: torch.Tensor) -> list[torch.Tensor]:
        """Every view's cells, each ``(B, C, F, h, w)``, in view order."""
        device = canvas_BCFHW.device
        return [
            canvas_BCFHW.index_select(3, rows.to(device)).index_select(4, cols.to(device)) for rows, cols in self.views
        ]

    def scatter(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Put per-view outputs back on the canvas, averaging cells that two views share."""
        first = outputs[0]
        out = torch.zeros((*first.shape[:3], *self.canvas[1:]), dtype=torch.float32, device=first.device)
        out_HWBCF = out.permute(3, 4, 0, 1, 2)  # a view: spatial indices first, so index_put_ can accumulate
        for (rows, cols), value in zip(self.views, outputs):
            rows, cols = rows.to(first.device), cols.to(first.device)
            out_HWBCF.index_put_((rows[:, None], cols[None, :]), value.float().permute(3, 4, 0, 1, 2), accumulate=True)
        return out / self.count.to(first.device)
