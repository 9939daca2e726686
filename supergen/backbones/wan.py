"""Adapter for the Wan family: Wan2.1 / Wan2.2 (two experts) / SkyReels-V2 T2V, and Wan I2V.

All use ``WanTransformer3DModel`` (B,C,F,H,W latents, patch 1x2x2) and
``AutoencoderKLWan``. Wan2.2 A14B carries a second transformer for the
low-noise part of the schedule; the switch happens at
``boundary_ratio * num_train_timesteps`` exactly as in ``WanPipeline``.
``WanImageToVideoPipeline`` adds a latent condition (first-frame mask +
VAE-encoded first frame, concatenated on channels, cropped per tile) and,
for Wan2.1 I2V, CLIP image tokens shared by every tile.
"""

from __future__ import annotations

import torch

from supergen.backbones.base import (
    BackboneAdapter,
    BackboneProfile,
    Conditioning,
    DecodeBand,
    LatentGeometry,
    ModelConfigs,
    cfg_combine,
)
from supergen.backbones.tiny import build_tokenizer, tiny_t5


class WanAdapter(BackboneAdapter):
    transformer_classes = ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel")
    pipeline_classes = ("WanPipeline", "SkyReelsV2Pipeline", "WanImageToVideoPipeline")
    supports_absolute_rope = True
    supports_cfg_parallel = True
    supports_block_reuse = True
    required_transformer_config = ("in_channels", "patch_size")
    required_vae_config = ("z_dim", "scale_factor_temporal", "scale_factor_spatial", "latents_mean", "latents_std")
    profile = BackboneProfile(native_sizes={
        "wan2.1-1.3b": (480, 832, 81),  # and SkyReels-V2-1.3B
        "wan2.1-14b": (720, 1280, 81),  # the 14B family (Wan2.1, Wan2.2 A14B, SkyReels-V2-14B)
        "wan2.2-ti2v-5b": (704, 1280, 121),
    })
    #: Widest transformer of the 480p models (Wan2.1-1.3B: 12 heads x 128); wider ones are the 720p 14B family.
    small_inner_dim = 1536

    def __init__(self, pipeline, native_size=None):
        if pipeline.transformer is None:
            raise ValueError("this Wan pipeline has no `transformer`; the engine needs the high-noise expert")
        super().__init__(pipeline, native_size)
        from supergen.backbones.hooks import WanBlockResidual, WanRopePositions

        self._rope_hooks = {
            id(model): self.hooks.add(model.rope, "rope_positions", WanRopePositions())
            for model in self._experts() if hasattr(model, "rope")
        }
        self._block_hooks = {id(model): WanBlockResidual(model, self.hooks) for model in self._experts()}

    def context_parallel_models(self):
        return self._experts()

    def _experts(self):
        return [m for m in (self.pipeline.transformer, getattr(self.pipeline, "transformer_2", None)) if m is not None]

    @classmethod
    def geometry_from_config(cls, configs: ModelConfigs) -> LatentGeometry:
        vae_cfg, tr_cfg = configs.vae, configs.transformer
        return LatentGeometry(
            # The VAE's channels: image-to-video transformers take more (the condition).
            channels=int(vae_cfg["z_dim"]),
            scale_temporal=int(vae_cfg["scale_factor_temporal"]),
            scale_spatial=int(vae_cfg["scale_factor_spatial"]),
            patch=tuple(int(p) for p in tr_cfg["patch_size"]),
        )

    @classmethod
    def native_size_from_config(cls, configs: ModelConfigs, geometry: LatentGeometry) -> tuple[int, int, int]:
        cfg = configs.transformer
        inner_dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        # Only WanPipeline and WanImageToVideoPipeline have the option.
        sizes = cls.profile.native_sizes
        if configs.pipeline.get("expand_timesteps", False):
            return sizes["wan2.2-ti2v-5b"]
        return sizes["wan2.1-1.3b"] if inner_dim <= cls.small_inner_dim else sizes["wan2.1-14b"]

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def rope_positions(self, model):
        """The :class:`~supergen.backbones.hooks.WanRopePositions` of ``model`` (an expert); None without ``rope``."""
        return self._rope_hooks.get(id(model))

    # --- conditioning -------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length=None, image=None):
        do_cfg = guidance_scale > 1.0
        positive, negative = self.pipeline.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg,
            num_videos_per_prompt=1,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
            device=self.device,
        )
        positive = positive.to(self.dtype)
        negative = negative.to(self.dtype) if negative is not None else None
        extra = {}
        if image is not None and getattr(self.pipeline, "image_encoder", None) is not None:
            extra["image_embeds"] = self.pipeline.encode_image(image, self.device).to(self.dtype)
        return Conditioning(prompt=prompt, positive=positive, negative=negative, extra=extra)

    # --- image-to-video -------------------------------------------------------
    @property
    def image_to_video(self) -> bool:
        return type(self.pipeline).__name__ == "WanImageToVideoPipeline"

    def encode_image(self, image, height, width, num_frames, generator):
        """Mask + VAE-encoded first frame at this size, built by the pipeline's own ``prepare_latents``."""
        if not self.image_to_video:
            return super().encode_image(image, height, width, num_frames, generator)
        pipe = self.pipeline
        if pipe.config.expand_timesteps:
            raise ValueError("Wan2.2 TI2V image conditioning (expand_timesteps) is not supported by SuperGen yet")
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        # Passing latents skips the pipeline's noise draw: the engine draws the canvas noise itself.
        placeholder = torch.zeros(1, self.geometry.channels, *self.geometry.latent_shape(height, width, num_frames))
        self._set_vae_tiling((height, width) != (self.native_height, self.native_width))
        try:
            _, condition = pipe.prepare_latents(
                pixels, 1, self.geometry.channels, height, width, num_frames, torch.float32, self.device, generator,
                placeholder,
            )
        finally:
            self._set_vae_tiling(False)
        return condition

    def expert_for(self, timestep: torch.Tensor, guidance_scale: float, guidance_scale_2: float | None):
        """Wan2.2's switch: ``transformer`` for t >= boundary, ``transformer_2`` below it."""
        boundary_ratio = getattr(self.pipeline.config, "boundary_ratio", None)
        if boundary_ratio is None or self.pipeline.transformer_2 is None:
            return self.pipeline.transformer, guidance_scale
        boundary = boundary_ratio * self.scheduler.config.num_train_timesteps
        if timestep >= boundary:
            return self.pipeline.transformer, guidance_scale
        return self.pipeline.transformer_2, guidance_scale if guidance_scale_2 is None else guidance_scale_2

    def predict(
        self,
        latents,
        timestep,
        cond,
        guidance_scale,
        positions=None,
        guidance_scale_2=None,
        condition=None,
        block_residual=None,
        return_block_residual=False,
    ):
        if (condition is None) == self.image_to_video:
            raise ValueError(
                f"{type(self.pipeline).__name__} needs an image condition" if condition is None
                else "Wan text-to-video takes no image condition"
            )
        model, scale = self.expert_for(timestep, guidance_scale, guidance_scale_2)
        n = latents.shape[0]
        do_cfg = scale > 1.0 and cond.negative is not None
        x, text, t = self._model_inputs(model, latents, timestep, cond, condition, do_cfg)
        hook = self._rope_hooks.get(id(model))
        if positions is not None and hook is None:
            raise ValueError(f"{type(model).__name__} exposes no `rope` module, so tile positions cannot be set")
        # Residuals travel tile-major (N, branches, tokens, dim); the model batch is branch-major.
        residual = None if block_residual is None else block_residual.transpose(0, 1).flatten(0, 1)
        split = self.cfg_split if do_cfg else None
        batches = self._model_batches(x, text, t, residual, do_cfg, split)
        outs, residuals = self._forward(model, batches, n, positions, cond.extra.get("image_embeds"),
                                        return_block_residual)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if split is not None:
            uncond, cond_out = split.combine(out)
            out = cfg_combine(uncond, cond_out, scale)
        elif do_cfg:
            uncond, cond_out = out.chunk(2)
            out = cfg_combine(uncond, cond_out, scale)
        if return_block_residual:
            branches = 2 if do_cfg else 1
            return out, torch.cat(residuals).unflatten(0, (branches, n)).transpose(0, 1)
        return out

    def _model_inputs(self, model, latents, timestep, cond, condition, do_cfg: bool):
        """The transformer's hidden states, text and timesteps for ``latents`` (with CFG: negative branch first)."""
        n = latents.shape[0]
        x = latents if condition is None else torch.cat([latents, condition], dim=1)
        x = x.to(model.dtype)
        text = cond.positive.expand(n, -1, -1)
        if do_cfg:
            x = torch.cat([x, x])
            text = torch.cat([cond.negative.expand(n, -1, -1), text])
        if getattr(self.pipeline.config, "expand_timesteps", False):
            _, ph, pw = self.geometry.patch
            tokens = x.shape[2] * (x.shape[3] // ph) * (x.shape[4] // pw)
            t = timestep.reshape(1, 1).expand(x.shape[0], tokens)
        else:
            t = timestep.expand(x.shape[0])
        return x, text, t

    def _model_batches(self, x, text, t, residual, do_cfg: bool, split) -> list[tuple]:
        """The forwards to run, as (hidden states, text, timesteps, block residual): both branches in one batch,
        one batch per branch (``batch_cfg=False``), or this rank's branch alone (CFG parallel, ``split``)."""
        if split is not None:
            # CFG parallel: this rank's branch alone (branch-major batch: negative first), as batch_cfg=False runs it.
            if residual is not None:
                raise ValueError("block reuse cannot run with CFG parallel; use cache reuse='output'")
            return [(x.chunk(2)[split.branch], text.chunk(2)[split.branch], t.chunk(2)[split.branch], None)]
        if do_cfg and not self.batch_cfg:
            parts = (residual.chunk(2) if residual is not None else (None, None),)
            return list(zip(x.chunk(2), text.chunk(2), t.chunk(2), *parts))
        return [(x, text, t, residual)]

    def _forward(self, model, batches: list[tuple], n: int, positions, image_embeds, record: bool):
        """Each batch through ``model`` with its tile positions and block-residual mode set (and cleared after);
        returns the outputs and, per batch, what the blocks recorded."""
        hook = self._rope_hooks.get(id(model))
        blocks = self._block_hooks[id(model)]
        outs, residuals = [], []
        for part_x, part_text, part_t, part_residual in batches:
            if hook is not None:
                hook.positions = positions
                hook.repeat = part_x.shape[0] // n
            blocks.mode = "inject" if part_residual is not None else "record" if record else None
            blocks.value = part_residual
            try:
                with self.hooks.attached():
                    outs.append(
                        model(
                            hidden_states=part_x,
                            timestep=part_t,
                            encoder_hidden_states=part_text,
                            encoder_hidden_states_image=None
                            if image_embeds is None
                            else image_embeds.expand(part_x.shape[0], -1, -1),
                            return_dict=False,
                        )[0]
                    )
                residuals.append(blocks.value)
            finally:
                blocks.mode = blocks.value = None
                if hook is not None:
                    hook.positions = None
        return outs, residuals

    # --- streaming ------------------------------------------------------------
    def check_streaming(self) -> None:
        from supergen.backbones.wan_stream import check_streamable

        check_streamable(self.pipeline)

    def install_streaming(self, latent_hw, sink, window, max_segment_frames, guidance_scale=1.0, cached=True):
        from supergen.backbones.wan_stream import WanStreamModel, WanUncachedStreamModel

        if cached:
            return WanStreamModel(self, latent_hw, sink, window, max_segment_frames, guidance_scale)
        return WanUncachedStreamModel(self, latent_hw, sink, window, guidance_scale)

    def stream_decoder(self):
        from supergen.backbones.wan_stream import WanStreamDecoder

        vae = self.pipeline.vae
        mean, std = self._latent_stats(torch.zeros(1, device=vae.device, dtype=vae.dtype))
        return WanStreamDecoder(vae, mean, std)

    # --- VAE ------------------------------------------------------------------
    def _latent_stats(self, latents: torch.Tensor):
        cfg = self.pipeline.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return mean, std

    def _vae_tile_stride(self) -> tuple[int, int]:
        # Tiles of the native size keep decode memory at the native level; a
        # quarter of overlap is what Diffusers' own defaults use (256/192).
        stride_h = max(self.geometry.scale_spatial, (self.native_height * 3 // 4) // 8 * 8)
        stride_w = max(self.geometry.scale_spatial, (self.native_width * 3 // 4) // 8 * 8)
        return stride_h, stride_w

    def _set_vae_tiling(self, tiled: bool) -> None:
        vae = self.pipeline.vae
        if not tiled:
            vae.disable_tiling()
            return
        stride_h, stride_w = self._vae_tile_stride()
        vae.enable_tiling(
            tile_sample_min_height=self.native_height,
            tile_sample_min_width=self.native_width,
            tile_sample_stride_height=stride_h,
            tile_sample_stride_width=stride_w,
        )

    def decode_bands(self, latent_shape, parts, tiled):
        """Bands of whole tile rows of ``AutoencoderKLWan.tiled_decode``.

        That decoder cuts the latent into tile rows starting every ``stride``
        latent rows, decodes each tile alone and blends a tile's top into the
        bottom of the tile above. A band of tile rows [a, b) decoded from a
        crop that starts one tile row earlier (a - 1, for that blend) and ends
        where tile row b - 1 ends therefore reproduces those rows exactly.
        """
        vae = self.pipeline.vae
        scale = self.geometry.scale_spatial
        height = latent_shape[1]
        tile_px = self.native_height
        stride_px = self._vae_tile_stride()[0]
        whole = super().decode_bands(latent_shape, 1, tiled)
        separable = (
            tiled
            and getattr(vae.config, "patch_size", None) is None
            and tile_px % scale == 0
            and stride_px % scale == 0
            and 2 * (tile_px - stride_px) <= tile_px  # a tile's blended top never reaches its bottom
            # Crops are full-width: wider than a VAE tile, they always take the tiled path too.
            and latent_shape[2] > self.native_width // scale
        )
        if not separable or parts < 2:
            return whole
        tile, stride = tile_px // scale, stride_px // scale
        rows = len(range(0, height, stride))
        parts = min(parts, rows)
        edges = [round(k * rows / parts) for k in range(parts + 1)]
        bands = []
        for a, b in zip(edges, edges[1:]):
            first = max(a - 1, 0)
            end_px = b * stride_px if b < rows else height * scale
            keep_lo = (a - first) * stride_px
            keep_hi = None if b == rows else keep_lo + (b - a) * stride_px
            bands.append(DecodeBand((first * stride, min(height, (b - 1) * stride + tile)), (keep_lo, keep_hi), (a * stride_px, end_px)))
        return bands

    def decode(self, latents, tiled=False):
        vae = self.pipeline.vae
        z = latents.to(vae.device, vae.dtype)
        mean, std = self._latent_stats(z)
        self._set_vae_tiling(tiled)
        try:
            # Same arithmetic as WanPipeline (divide by 1/std), so native-size output matches it bit for bit.
            return vae.decode(z / (1.0 / std) + mean, return_dict=False)[0]
        finally:
            self._set_vae_tiling(False)

    def encode(self, video, tiled=False):
        vae = self.pipeline.vae
        self._set_vae_tiling(tiled)
        try:
            dist = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
        finally:
            self._set_vae_tiling(False)
        z = dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).float()


# --- the tiny built-in model(s) of this family (``--model tiny-...``; see supergen.models) ---------------


def build_tiny_wan(seed: int = 0, image_to_video: bool = False):
    """Build the tiny ``WanPipeline`` (random weights, deterministic from ``seed``).

    Native size 64x96 pixels, 9 frames (3 latent frames of 8x12 cells,
    patch 1x2x2: 72 tokens). Small enough that a 3x-area tiled run takes seconds
    on a laptop CPU, while every class is the real Diffusers/transformers one.
    ``image_to_video`` builds ``WanImageToVideoPipeline`` instead (Wan2.1 I2V
    layout: a tiny CLIP vision encoder, 16 + 4 mask + 16 condition input channels).
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_t5(tokenizer, umt5=True)
        z_dim = 16
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        ).eval()
        image_kwargs = {}
        if image_to_video:
            image_encoder = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8, projection_dim=16,
                )
            ).eval()
            # Image tokens enter cross-attention through added K/V projections, as in Wan2.1 I2V.
            image_kwargs = dict(image_dim=16, added_kv_proj_dim=24)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=z_dim + 4 + z_dim if image_to_video else z_dim,
            out_channels=z_dim,
            text_dim=32,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=256,
            **image_kwargs,
        ).eval()
    # Wan's released Diffusers checkpoints use UniPC with flow sigmas.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    if image_to_video:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
        )
        return WanImageToVideoPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler,
            image_processor=image_processor, image_encoder=image_encoder,
        )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def build_tiny_wan_i2v(seed: int = 0):
    """Build a tiny ``WanImageToVideoPipeline`` (see :func:`build_tiny_wan`)."""
    return build_tiny_wan(seed=seed, image_to_video=True)


def build_toy_wan(seed: int = 0):
    """Build the *untrained* toy ``WanPipeline`` that ``scripts/train_toy_model.py`` trains.

    Native size 32x32 pixels, 9 frames: a VAE with 2x spatial and 2x temporal
    compression and 8 latent channels gives a 5x16x16 latent, and a 1x2x2
    patch makes that 320 tokens: small enough to train on a CPU in about an
    hour. A VAE with 4x spatial compression learned far too slowly for that
    budget (after 250 steps it still drew blurred blobs), and a 1x4x4 patch
    (80 tokens, each 8x8 pixels) trained 3x faster per step but drew blobs
    instead of shapes: its output layer has to paint a shape's outline inside
    a token from one 96-wide vector. The text
    encoder is the tiny model's UMT5 and stays frozen (random): the toy world
    has only a few dozen distinct words, and their embeddings are distinct.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tiny = build_tiny_wan(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        z_dim = 8
        vae = AutoencoderKLWan(
            base_dim=16,
            z_dim=z_dim,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
            scale_factor_spatial=2,
            scale_factor_temporal=2,
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=24,
            in_channels=z_dim,
            out_channels=z_dim,
            text_dim=tiny.text_encoder.config.d_model,
            freq_dim=32,
            ffn_dim=256,
            num_layers=4,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=256,
        )
    # Small latents need less shift towards high noise than Wan's 480p default of 3-5.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=2.0
    )
    return WanPipeline(
        tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
