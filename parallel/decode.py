"""VAE decode of the final canvas split over the ranks, gathered on rank 0 (or streamed there, frame by frame).

The adapter cuts its (tiled) decode into horizontal bands whose stacked
output is the single-process decode (:meth:`BackboneAdapter.decode_bands`);
rank k decodes band k and sends its pixels to rank 0. Wan's VAE is causal in
time, so splitting in time would need the causal cache handed from chunk to
chunk; whole tile rows in space need only one extra tile row of context.

:func:`decode_streamed` keeps rank 0 small at 4K: every rank turns its band
into uint8 frames itself and sends them one frame at a time, and rank 0 hands
each assembled frame to a sink (the mp4 writer) before asking for the next,
so it holds its own band and one frame of the others', not the float video
(81 frames at 2160x3840 are about 8 GB in float32, 2 GB in uint8).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from supergen.parallel.runtime import DistributedContext

logger = logging.getLogger(__name__)


def decode_distributed(adapter, latents: torch.Tensor, ctx: DistributedContext, tiled: bool) -> tuple[torch.Tensor | None, int]:
    """Decode ``latents`` (whole canvas, same on every rank) over the ranks.

    Returns ``(video, bytes)``: the video (B, 3, F, H, W) on rank 0 and
    ``None`` elsewhere, and the bytes this rank sent plus received.
    """
    if not ctx.enabled:
        return adapter.decode(latents, tiled=tiled), 0
    bands = adapter.decode_bands(tuple(latents.shape[2:]), ctx.world_size, tiled)
    if ctx.is_main:
        logger.info("decode: %d band(s) over %d ranks (rows %s)", len(bands), ctx.world_size, [b.pixel_rows for b in bands])
    mine = adapter.decode_band(latents, bands[ctx.rank], tiled) if ctx.rank < len(bands) else None
    if mine is not None and ctx.rank > 0:
        mine = mine.contiguous()
        # The shape travels first: frame count and width follow from the VAE, not from us.
        dist.send(torch.tensor(mine.shape, dtype=torch.int64, device=mine.device), dst=0)
        dist.send(mine, dst=0)
        return None, mine.numel() * mine.element_size() + 5 * 8
    if not ctx.is_main:
        return None, 0
    pieces, received = [mine], 0
    for src in range(1, len(bands)):
        shape = torch.empty(5, dtype=torch.int64, device=mine.device)
        dist.recv(shape, src=src)
        piece = torch.empty(tuple(shape.tolist()), dtype=mine.dtype, device=mine.device)
        dist.recv(piece, src=src)
        pieces.append(piece)
        received += piece.numel() * piece.element_size() + 5 * 8
    return torch.cat(pieces, dim=3), received


def decode_streamed(adapter, latents: torch.Tensor, ctx: DistributedContext, tiled: bool,
                    to_frames: Callable[[torch.Tensor], np.ndarray], sink: Callable[[np.ndarray], None]) -> int:
    """Decode ``latents`` over the ranks and feed rank 0's ``sink`` one uint8 frame (1, H, W, 3) at a time.

    ``to_frames`` turns a decoded band (B, 3, F, h, W) into uint8 frames (F, h, W, 3); it must act pixel
    by pixel (the video processor's denormalise and the rounding do), so that bands assembled on rank 0
    are the frames of the whole decode. Returns the bytes this rank sent plus received.
    """
    bands = adapter.decode_bands(tuple(latents.shape[2:]), ctx.world_size, tiled)
    if ctx.is_main:
        logger.info("decode: %d band(s) over %d ranks (rows %s), streamed to the writer frame by frame",
                    len(bands), ctx.world_size, [b.pixel_rows for b in bands])
    if ctx.rank >= len(bands):
        return 0
    mine = np.ascontiguousarray(to_frames(adapter.decode_band(latents, bands[ctx.rank], tiled)))
    if ctx.rank > 0:
        dist.send(torch.tensor(mine.shape, dtype=torch.int64, device=ctx.device), dst=0)
        for frame in mine:
            dist.send(torch.from_numpy(np.ascontiguousarray(frame)).to(ctx.device), dst=0)
        return mine.nbytes + 4 * 8
    shapes = []
    for src in range(1, len(bands)):
        shape = torch.empty(4, dtype=torch.int64, device=ctx.device)
        dist.recv(shape, src=src)
        shapes.append(tuple(shape.tolist()))
    received = 4 * 8 * len(shapes)
    for f in range(mine.shape[0]):
        rows = [mine[f]]
        for src, shape in enumerate(shapes, start=1):
            piece = torch.empty(shape[1:], dtype=torch.uint8, device=ctx.device)
            dist.recv(piece, src=src)
            rows.append(piece.cpu().numpy())
            received += piece.numel()
        sink(np.concatenate(rows, axis=0)[None])
    return received
