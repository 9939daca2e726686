"""Up-scaling of the native-size sketch to the target canvas (pure tensor math).

The pixel path (decode -> :func:`resize_video` -> re-encode) is driven by the
pipeline, which owns the VAE; :func:`resize_latents` is the latent path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _resize_frames(x_BCFHW: torch.Tensor, size_FHW: tuple[int, int, int], mode: str) -> torch.Tensor:
    b, c, f, h, w = x_BCFHW.shape
    tf, th, tw = size_FHW
    out = x_BCFHW
    if (h, w) != (th, tw):
        frames = out.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        frames = F.interpolate(frames.float(), size=(th, tw), mode=mode, align_corners=False, antialias=False)
        out = frames.reshape(b, f, c, th, tw).permute(0, 2, 1, 3, 4)
    if f != tf:
        # Time is resampled linearly, frame by frame, never with a spatial kernel.
        out = F.interpolate(out.float(), size=(tf, th, tw), mode="trilinear", align_corners=True)
    return out.to(x_BCFHW.dtype).contiguous()


def resize_video(video_BCFHW: torch.Tensor, size_FHW: tuple[int, int, int]) -> torch.Tensor:
    """Bicubic spatial resize of a video in [-1, 1], clamped back into range."""
    return _resize_frames(video_BCFHW, size_FHW, "bicubic").clamp(-1.0, 1.0)


def resize_latents(latents_BCFHW: torch.Tensor, size_FHW: tuple[int, int, int]) -> torch.Tensor:
    """Bilinear spatial resize of normalised latents (HunyuanVideo-style latent up-scaling).

    Bilinear rather than bicubic: bicubic overshoots, and latent values
    outside the VAE's training range decode to colour artefacts.
    """
    return _resize_frames(latents_BCFHW, size_FHW, "bilinear")
