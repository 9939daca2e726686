"""VAE decode of the final canvas split over the ranks, gathered on rank 0.

The adapter cuts its (tiled) decode into horizontal bands whose stacked
output is the single-process decode (:meth:`BackboneAdapter.decode_bands`);
rank k decodes band k and sends its pixels to rank 0. Wan's VAE is causal in
time, so splitting in time would need the causal cache handed from chunk to
chunk; whole tile rows in space need only one extra tile row of context.
"""

from __future__ import annotations

import logging

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
