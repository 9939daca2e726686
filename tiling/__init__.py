"""Tile geometry: plans over a latent canvas, blend weights, shifted grids, up-scaling."""

from supergen.tiling.plan import Tile, TilePlan, TilePlanner
from supergen.tiling.upscale import resize_latents, resize_video

__all__ = ["Tile", "TilePlan", "TilePlanner", "resize_latents", "resize_video"]
