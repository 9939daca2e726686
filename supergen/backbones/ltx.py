"""Adapter for LTX-Video text-to-video (``LTXPipeline``).

What differs from the engine's canonical view, and is handled here:
- the transformer takes a packed token sequence (B, S, C) plus the latent
  grid size and ``rope_interpolation_scale`` (VAE factors over the frame
  rate); tiles are packed and unpacked with the pipeline's own
  ``_pack_latents``/``_unpack_latents``;
- canvas-absolute RoPE goes through the transformer's own ``video_coords``
  input (one coordinate grid per tile, so tiles batch together);
- the VAE compresses 32x in space and 8x in time, and its latents are
  normalised with per-channel mean/std and ``scaling_factor``;
- the schedule is flow-matching Euler on ``linspace(1, 1/n, n)`` sigmas with
  a shift ``mu`` computed from the sequence length the model sees (one tile),
  set through :class:`PipelineScheduler`.
"""

from __future__ import annotations

import numpy as np
import torch

from supergen.backbones.base import (
    BackboneAdapter,
    BackboneProfile,
    Conditioning,
    LatentGeometry,
    ModelConfigs,
    PipelineScheduler,
    cfg_combine,
)
from supergen.backbones.tiny import build_tokenizer, tiny_t5

#: LTXPipeline's default frame rate; it only enters RoPE's temporal scale.
FRAME_RATE = 25


def _ltx_sigmas(num_inference_steps: int) -> np.ndarray:
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


class LTXAdapter(BackboneAdapter):
    transformer_classes = ("LTXVideoTransformer3DModel",)
    # Not in the configs: LTXPipeline's defaults, the size LTX-Video was trained at.
    profile = BackboneProfile(native_sizes={"ltx-video": (512, 704, 161)}, max_sequence_length=128)
    pipeline_classes = ("LTXPipeline",)
    supports_absolute_rope = True
    required_transformer_config = ("in_channels", "patch_size", "patch_size_t")
    required_vae_config = ("scaling_factor", "patch_size", "spatio_temporal_scaling")

    @classmethod
    def geometry_from_config(cls, configs: ModelConfigs) -> LatentGeometry:
        cfg, vae = configs.transformer, configs.vae
        # AutoencoderKLLTXVideo.__init__'s compression ratios (LTXPipeline reads them off the VAE):
        # explicit in the config, or the VAE patch times 2 per scaling block.
        scaling = 2 ** sum(bool(s) for s in vae["spatio_temporal_scaling"])
        spatial = vae["spatial_compression_ratio"]
        temporal = vae["temporal_compression_ratio"]
        return LatentGeometry(
            channels=int(cfg["in_channels"]),
            scale_temporal=int(vae["patch_size_t"] * scaling if temporal is None else temporal),
            scale_spatial=int(vae["patch_size"] * scaling if spatial is None else spatial),
            patch=(int(cfg["patch_size_t"]), int(cfg["patch_size"]), int(cfg["patch_size"])),
        )

    @classmethod
    def native_size_from_config(cls, configs: ModelConfigs, geometry: LatentGeometry) -> tuple[int, int, int]:
        return cls.profile.native_sizes["ltx-video"]

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def make_scheduler(self, latent_shape, generator=None):
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        cfg = self.scheduler.config
        mu = calculate_shift(
            int(np.prod(latent_shape)),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        return PipelineScheduler(super().make_scheduler(latent_shape, generator), {"sigmas": _ltx_sigmas, "mu": mu})

    # --- conditioning -------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length=None, image=None):
        positive, mask, negative, negative_mask = self.pipeline.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guidance_scale > 1.0,
            num_videos_per_prompt=1,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
            device=self.device,
        )
        return Conditioning(
            prompt=prompt,
            positive=positive,
            negative=negative,
            extra={"attention_mask": mask, "negative_attention_mask": negative_mask},
        )

    @property
    def rope_interpolation_scale(self) -> tuple[float, float, float]:
        geo = self.geometry
        return geo.scale_temporal / FRAME_RATE, geo.scale_spatial, geo.scale_spatial

    def _video_coords(self, positions) -> torch.Tensor:
        """(N, 3, S) coordinates in the units LTX's ``_prepare_video_coords`` uses, for canvas-absolute tiles."""
        pt, ph, pw = self.geometry.patch
        scale_t, scale_h, scale_w = self.rope_interpolation_scale
        f = positions.frames.float() * scale_t * pt
        h = positions.rows.float() * scale_h * ph
        w = positions.cols.float() * scale_w * pw
        n, nf, nh, nw = f.shape[0], f.shape[1], h.shape[1], w.shape[1]
        grid = torch.stack(
            [
                f[:, :, None, None].expand(n, nf, nh, nw),
                h[:, None, :, None].expand(n, nf, nh, nw),
                w[:, None, None, :].expand(n, nf, nh, nw),
            ],
            dim=1,
        )
        return grid.flatten(2)

    def predict(self, latents, timestep, cond, guidance_scale, positions=None, guidance_scale_2=None,
                condition=None):
        if condition is not None:
            raise ValueError("LTX-Video takes no image condition")
        pipe = self.pipeline
        model = pipe.transformer
        n, _, f, h, w = latents.shape
        pt, p = pipe.transformer_temporal_patch_size, pipe.transformer_spatial_patch_size
        do_cfg = guidance_scale > 1.0 and cond.negative is not None
        tokens = pipe._pack_latents(latents, p, pt)
        text = cond.positive.expand(n, -1, -1)
        mask = cond.extra["attention_mask"].expand(n, -1)
        coords = None if positions is None else self._video_coords(positions).to(latents.device)
        if do_cfg:
            tokens = torch.cat([tokens, tokens])
            text = torch.cat([cond.negative.expand(n, -1, -1), text])
            mask = torch.cat([cond.extra["negative_attention_mask"].expand(n, -1), mask])
            coords = None if coords is None else torch.cat([coords, coords])
        tokens = tokens.to(text.dtype)
        out = model(
            hidden_states=tokens,
            encoder_hidden_states=text,
            timestep=timestep.expand(tokens.shape[0]),
            encoder_attention_mask=mask,
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=self.rope_interpolation_scale,
            video_coords=coords,
            return_dict=False,
        )[0].float()
        if do_cfg:
            uncond, cond_out = out.chunk(2)
            out = cfg_combine(uncond, cond_out, guidance_scale)
        return pipe._unpack_latents(out, f // pt, h // p, w // p, p, pt)

    # --- VAE ------------------------------------------------------------------
    def decode(self, latents, tiled=False):
        pipe, vae = self.pipeline, self.pipeline.vae
        z = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        z = z.to(vae.device, vae.dtype)
        # Timestep-conditioned decoders (LTX 0.9.1+) get the pipeline's default decode_timestep 0,
        # at which its noise blend leaves the latents unchanged.
        temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype) if vae.config.timestep_conditioning else None
        with self.vae_tiling(tiled):
            return vae.decode(z, temb, return_dict=False)[0]

    def encode(self, video, tiled=False):
        pipe, vae = self.pipeline, self.pipeline.vae
        with self.vae_tiling(tiled):
            z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        return pipe._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor).float()


# --- the tiny built-in model(s) of this family (``--model tiny-...``; see supergen.models) ---------------


def build_tiny_ltx(seed: int = 0):
    """Build a tiny ``LTXPipeline`` with LTX-Video's real VAE compression (32x spatial, 8x temporal).

    Native 128x192 pixels, 9 frames: latent 2x4x6 with 8 channels, packed into
    48 tokens (transformer patch 1x1x1).
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_t5(tokenizer)
        vae = AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            patch_size=4,
            patch_size_t=1,
        ).eval()
        transformer = LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=32,
        ).eval()
    # LTX-Video's released scheduler: resolution-dependent shift (mu from the sequence length).
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
