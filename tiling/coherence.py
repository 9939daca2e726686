"""Global-coherence math for the tiled refinement (pure tensor functions, no models).

Native-size tiles see only their own part of an up-scaled canvas, so each one
is free to draw the whole prompt again: at 4x the area a tiled run draws one
subject per tile. The training-free remedies keep the sketch's layout while
the tiles add detail, scheduled by :func:`cosine_decay` over the refinement
(strong early, when layout forms; fading late, when detail forms):

* guidance from the up-scaled sketch, in the band the sketch resolves
  (:class:`Lowpass`, FreeScale / HiFlow style) or in every band (DemoFusion's
  *skip residual*), leaving the finer band to the tiles;
* global views (:class:`DilatedViews`, DemoFusion's *dilated sampling*):
  strided sub-canvases of about native size, each covering the whole picture
  at a coarser grid, whose model outputs are blended with the tiles'.

:mod:`supergen.samplers.coherence` applies them in the loop.
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


class Lowpass:
    """The band of a canvas that a ``size_HW`` canvas can hold, as separable linear maps.

    Area down-sampling to ``size_HW`` (``adaptive_avg_pool2d``'s windows) then
    bilinear up-sampling back (``interpolate(mode='bilinear',
    align_corners=False)``), each written as one matrix per axis. Being
    linear and separable, the filter of a whole canvas can be assembled from
    parts: :meth:`pooled` of each part (rows and columns of the canvas it
    holds) summed over the parts, then :meth:`expand` on any part, which is
    how ranks that each hold a region of the canvas filter it together.
    """

    def __init__(self, canvas_HW: tuple[int, int], size_HW: tuple[int, int]):
        self.canvas_HW = tuple(canvas_HW)
        self.size_HW = tuple(size_HW)
        eye = [torch.eye(n, dtype=torch.float64)[None] for n in canvas_HW]
        # (n, L): row k averages canvas cells of window k; (L, n): canvas cell i from the small canvas.
        self.pool = [F.adaptive_avg_pool1d(e, n)[0].T.contiguous() for e, n in zip(eye, size_HW)]
        self.up = [
            F.interpolate(torch.eye(n, dtype=torch.float64)[None], size=length, mode="linear", align_corners=False)[0]
            .T.contiguous()
            for length, n in zip(canvas_HW, size_HW)
        ]

    def to(self, device) -> "Lowpass":
        """Move the matrices to ``device`` once, so the per-step filter copies nothing."""
        self.pool = [m.to(device) for m in self.pool]
        self.up = [m.to(device) for m in self.up]
        return self

    def pooled(self, x_BCFhw: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """This part's contribution to the down-sampled canvas ``(B, C, F, *size_HW)``."""
        ph = self.pool[0][:, rows].to(x_BCFhw.device)
        pw = self.pool[1][:, cols].to(x_BCFhw.device)
        return torch.einsum("nh,bcfhw,mw->bcfnm", ph, x_BCFhw.double(), pw)

    def expand(self, pooled_BCFnm: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """The filtered canvas on ``rows`` x ``cols``, from the whole down-sampled canvas."""
        uh = self.up[0][rows].to(pooled_BCFnm.device)
        uw = self.up[1][cols].to(pooled_BCFnm.device)
        return torch.einsum("hn,bcfnm,wm->bcfhw", uh, pooled_BCFnm.double(), uw)

    def __call__(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        if self.size_HW == self.canvas_HW:
            return x_BCFHW
        return self.expand(self.pooled(x_BCFHW)).to(x_BCFHW.dtype)


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
