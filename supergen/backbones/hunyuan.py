"""Adapter for HunyuanVideo text-to-video (``HunyuanVideoPipeline``).

What differs from the engine's canonical view, and is handled here:
- two text encoders: Llama hidden states (sequence + attention mask) and a
  CLIP pooled vector, both from the pipeline's own ``encode_prompt``; the mask
  and the pooled vector travel in ``Conditioning.extra``;
- the released model is guidance-distilled: ``guidance_scale`` is not
  classifier-free guidance but a number embedded by the transformer
  (x 1000, as the pipeline does), so there is one model call per tile and no
  negative branch;
- the schedule is flow-matching Euler on the pipeline's custom sigmas
  ``linspace(1, 0, n + 1)[:-1]``, set through :class:`PipelineScheduler`;
- the VAE latents are scaled by ``scaling_factor`` only;
- canvas-absolute RoPE: :class:`HunyuanRopePositions` replaces the tables of
  ``transformer.rope`` for one tile at a time (the model's tables carry no
  batch dimension, so tiles with positions run one per call).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from supergen.backbones.base import (
    BackboneAdapter,
    BackboneProfile,
    Conditioning,
    LatentGeometry,
    ModelConfigs,
    PipelineScheduler,
)
from supergen.backbones.tiny import build_tokenizer

logger = logging.getLogger(__name__)


def _hunyuan_sigmas(num_inference_steps: int) -> np.ndarray:
    return np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]


class HunyuanVideoAdapter(BackboneAdapter):
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    # The configs do not record it; HunyuanVideo was trained (and its pipeline defaults) at 720p, 129 frames.
    # Guidance-distilled: the scale goes in as an input, times 1000 (HunyuanVideoPipeline).
    profile = BackboneProfile(native_sizes={"hunyuanvideo": (720, 1280, 129)}, max_sequence_length=256,
                              guidance="embedded", guidance_embed_scale=1000.0)
    pipeline_classes = ("HunyuanVideoPipeline",)
    supports_absolute_rope = True
    required_transformer_config = ("in_channels", "patch_size", "patch_size_t")
    required_vae_config = ("scaling_factor", "spatial_compression_ratio", "temporal_compression_ratio")

    def __init__(self, pipeline, native_size=None):
        super().__init__(pipeline, native_size)
        from supergen.backbones.hooks import HunyuanRopePositions

        self._rope_hook = self.hooks.add(pipeline.transformer.rope, "rope_positions", HunyuanRopePositions())

    @classmethod
    def geometry_from_config(cls, configs: ModelConfigs) -> LatentGeometry:
        cfg = configs.transformer
        return LatentGeometry(
            channels=int(cfg["in_channels"]),
            # HunyuanVideoPipeline.__init__ takes them from the VAE, which keeps its config's values.
            scale_temporal=int(configs.vae["temporal_compression_ratio"]),
            scale_spatial=int(configs.vae["spatial_compression_ratio"]),
            patch=(int(cfg["patch_size_t"]), int(cfg["patch_size"]), int(cfg["patch_size"])),
        )

    @classmethod
    def native_size_from_config(cls, configs: ModelConfigs, geometry: LatentGeometry) -> tuple[int, int, int]:
        return cls.profile.native_sizes["hunyuanvideo"]

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def make_scheduler(self, latent_shape, generator=None):
        return PipelineScheduler(super().make_scheduler(latent_shape, generator), {"sigmas": _hunyuan_sigmas})

    # --- conditioning -------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length=None, image=None):
        if negative_prompt:
            logger.warning(
                "HunyuanVideo is guidance-distilled: guidance_scale %.2f is embedded in the model and the "
                "negative prompt is not used",
                guidance_scale,
            )
        embeds, pooled, mask = self.pipeline.encode_prompt(
            prompt=prompt, num_videos_per_prompt=1, device=self.device,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        dtype = self.dtype
        return Conditioning(
            prompt=prompt,
            positive=embeds.to(dtype),
            negative=None,
            extra={"attention_mask": mask.to(dtype), "pooled": pooled.to(dtype)},
        )

    def predict(self, latents, timestep, cond, guidance_scale, positions=None, guidance_scale_2=None,
                condition=None):
        if condition is not None:
            raise ValueError("HunyuanVideo takes no image condition")
        if positions is not None:
            return torch.cat([
                self._predict(latents[k : k + 1], timestep, cond, guidance_scale,
                              (positions.frames[k], positions.rows[k], positions.cols[k]))
                for k in range(latents.shape[0])
            ])
        return self._predict(latents, timestep, cond, guidance_scale, None)

    def _predict(self, latents, timestep, cond, guidance_scale, positions):
        model = self.pipeline.transformer
        n = latents.shape[0]
        guidance = torch.tensor([guidance_scale] * n, dtype=model.dtype, device=latents.device) \
            * self.profile.guidance_embed_scale
        self._rope_hook.positions = positions
        try:
            with self.hooks.attached():
                out = model(
                    hidden_states=latents.to(model.dtype),
                    timestep=timestep.expand(n).to(latents.dtype),
                    encoder_hidden_states=cond.positive.expand(n, -1, -1),
                    encoder_attention_mask=cond.extra["attention_mask"].expand(n, -1),
                    pooled_projections=cond.extra["pooled"].expand(n, -1),
                    guidance=guidance,
                    return_dict=False,
                )[0]
        finally:
            self._rope_hook.positions = None
        return out.float()

    # --- VAE ------------------------------------------------------------------
    def decode(self, latents, tiled=False):
        vae = self.pipeline.vae
        # Same arithmetic as HunyuanVideoPipeline, for bit-equal native output.
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        with self.vae_tiling(tiled):
            return vae.decode(z, return_dict=False)[0]

    def encode(self, video, tiled=False):
        vae = self.pipeline.vae
        with self.vae_tiling(tiled):
            z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        return (z * vae.config.scaling_factor).float()


# --- the tiny built-in model(s) of this family (``--model tiny-...``; see supergen.models) ---------------


def build_tiny_hunyuanvideo(seed: int = 0):
    """Build a tiny ``HunyuanVideoPipeline`` (Llama + CLIP text encoders, guidance-distilled transformer).

    Native 64x96 pixels, 9 frames: latent 3x8x12 with 4 channels, patch 1x2x2.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    markers = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    for marker in markers:
        template = template.replace(marker, " ")
    # The template is tokenized in front of every prompt; training on it keeps it near the
    # real tokenizer's 95 tokens (crop_start), so the prompt is not truncated away.
    tokenizer = build_tokenizer(vocab_size=1024, extra_corpus="\n" + template.replace("{}", ""), extra_special=markers)
    tokenizer_2 = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=512,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=1,
            )
        ).eval()
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2),
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=8,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=1,
            )
        ).eval()
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        ).eval()
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        ).eval()
    # HunyuanVideo's released scheduler: flow-matching Euler with shift 7.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
