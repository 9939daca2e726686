"""Adapter for CogVideoX (1.0: 2B/5B; 1.5: patch_size_t=2), text- and image-to-video.

What differs from the engine's canonical view, and is converted here:
- the transformer takes latents as B,F,C,H,W;
- RoPE tables come from the pipeline's ``_prepare_rotary_positional_embeddings``
  for the tile's size (every tile is a native-size video: local RoPE);
- the VAE latents are scaled by ``scaling_factor`` only (no per-channel stats);
- the schedulers are v-prediction DDIM or CogVideoX's DPM, whose ``step``
  needs the previous step's x0 estimate and timestep: :class:`CogVideoXStepper`
  carries them so the loop can call ``step(pred, t, latents)`` like any scheduler;
- image-to-video: the first frame's latent (then zero frames) is concatenated
  to every tile's input channels, cropped from a canvas built at the tile
  grid's size (:meth:`CogVideoXAdapter.encode_image`).
"""

from __future__ import annotations

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


class CogVideoXStepper(PipelineScheduler):
    """CogVideoX's DDIM or DPM scheduler behind the common ``step(pred, t, latents)`` call.

    The scheduler sees latents in the pipeline's B,F,C,H,W layout, so stochastic
    steps (the DPM scheduler draws noise every step) draw the same noise for
    the same seed. The DPM scheduler also takes the previous x0 prediction and
    timestep; the first step of a run has neither and is first order, as in
    the pipeline.
    """

    def __init__(self, scheduler, step_kwargs: dict | None = None):
        from diffusers import CogVideoXDPMScheduler

        super().__init__(scheduler, step_kwargs=step_kwargs)
        self.multistep = isinstance(scheduler, CogVideoXDPMScheduler)
        self._previous_x0 = None
        self._previous_t = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device=device)
        self._previous_x0 = None
        self._previous_t = None

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        pred_BFCHW, sample_BFCHW = model_output.transpose(1, 2), sample.transpose(1, 2)
        if self.multistep:
            prev_BFCHW, self._previous_x0 = self.scheduler.step(
                pred_BFCHW, self._previous_x0, timestep, self._previous_t, sample_BFCHW, **self.step_kwargs,
                return_dict=False,
            )
            self._previous_t = timestep
        else:
            prev_BFCHW = self.scheduler.step(pred_BFCHW, timestep, sample_BFCHW, **self.step_kwargs, return_dict=False)[0]
        return (prev_BFCHW.transpose(1, 2).contiguous(),)


class CogVideoXAdapter(BackboneAdapter):
    transformer_classes = ("CogVideoXTransformer3DModel",)
    profile = BackboneProfile(native_sizes={
        "cogvideox-5b": (480, 720, 49),  # what its config's sample size gives
        # CogVideoX 1.5's sample_height/width (300x170) bound its RoPE table, they are not its training size;
        # 85 frames = 22 latent frames, the multiple of patch_size_t=2 that the pipeline pads 81 frames up to.
        "cogvideox1.5-5b": (768, 1360, 85),
    }, max_sequence_length=226)
    pipeline_classes = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")
    required_transformer_config = (
        "in_channels", "patch_size", "patch_size_t", "sample_height", "sample_width", "sample_frames",
        "attention_head_dim", "use_rotary_positional_embeddings",
    )
    required_vae_config = ("scaling_factor", "block_out_channels", "temporal_compression_ratio")

    @classmethod
    def geometry_from_config(cls, configs: ModelConfigs) -> LatentGeometry:
        cfg = configs.transformer
        return LatentGeometry(
            # Image-to-video transformers take the image latents as extra input channels.
            channels=int(cfg["out_channels"] or cfg["in_channels"]),
            # CogVideoXPipeline.__init__'s vae_scale_factor_temporal / _spatial.
            scale_temporal=int(configs.vae["temporal_compression_ratio"]),
            scale_spatial=2 ** (len(configs.vae["block_out_channels"]) - 1),
            patch=(int(cfg["patch_size_t"] or 1), int(cfg["patch_size"]), int(cfg["patch_size"])),
        )

    @classmethod
    def native_size_from_config(cls, configs: ModelConfigs, geometry: LatentGeometry) -> tuple[int, int, int]:
        cfg = configs.transformer
        if cfg["patch_size_t"] is not None:
            return cls.profile.native_sizes["cogvideox1.5-5b"]
        scale = geometry.scale_spatial
        return cfg["sample_height"] * scale, cfg["sample_width"] * scale, cfg["sample_frames"]

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def make_scheduler(self, latent_shape, generator=None):
        # The pipeline steps with eta=0 and its generator (the DPM scheduler's noise term uses it).
        fresh = super().make_scheduler(latent_shape, generator)
        return CogVideoXStepper(fresh, step_kwargs={"eta": 0.0, "generator": generator})

    # --- conditioning -------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length=None, image=None):
        positive, negative = self.pipeline.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guidance_scale > 1.0,
            num_videos_per_prompt=1,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
            device=self.device,
        )
        return Conditioning(prompt=prompt, positive=positive, negative=negative)

    def _rotary(self, latent_shape: tuple[int, int, int]):
        if not self.pipeline.transformer.config.use_rotary_positional_embeddings:
            return None
        f, h, w = latent_shape
        scale = self.geometry.scale_spatial
        return self.pipeline._prepare_rotary_positional_embeddings(h * scale, w * scale, f, self.device)

    def predict(self, latents, timestep, cond, guidance_scale, positions=None, guidance_scale_2=None,
                condition=None):
        if positions is not None:
            raise ValueError("CogVideoX tiles use local RoPE only (rope='local')")
        if (condition is None) == self.image_to_video:
            raise ValueError(
                f"{type(self.pipeline).__name__} needs an image condition" if condition is None
                else "CogVideoX text-to-video takes no image condition"
            )
        model = self.pipeline.transformer
        n = latents.shape[0]
        do_cfg = guidance_scale > 1.0 and cond.negative is not None
        x_BFCHW = latents.permute(0, 2, 1, 3, 4).to(model.dtype)
        text = cond.positive.expand(n, -1, -1)
        if do_cfg:
            x_BFCHW = torch.cat([x_BFCHW, x_BFCHW])
            text = torch.cat([cond.negative.expand(n, -1, -1), text])
        extra = {}
        if condition is not None:
            image_BFCHW = condition.permute(0, 2, 1, 3, 4).to(model.dtype)
            if do_cfg:
                image_BFCHW = torch.cat([image_BFCHW, image_BFCHW])
            x_BFCHW = torch.cat([x_BFCHW, image_BFCHW], dim=2)
            if model.config.ofs_embed_dim is not None:
                # CogVideoX 1.5 I2V's fixed ofs embedding input, as its pipeline passes it.
                extra["ofs"] = x_BFCHW.new_full((1,), fill_value=2.0)
        out = model(
            hidden_states=x_BFCHW,
            encoder_hidden_states=text,
            timestep=timestep.expand(x_BFCHW.shape[0]),
            image_rotary_emb=self._rotary(tuple(latents.shape[2:])),
            return_dict=False,
            **extra,
        )[0].float()
        if do_cfg:
            uncond, cond_out = out.chunk(2)
            out = cfg_combine(uncond, cond_out, guidance_scale)
        return out.permute(0, 2, 1, 3, 4)

    # --- image-to-video --------------------------------------------------------
    @property
    def image_to_video(self) -> bool:
        return type(self.pipeline).__name__ == "CogVideoXImageToVideoPipeline"

    def encode_image(self, image, height, width, num_frames, generator):
        """The first frame's latent followed by zero frames, as CogVideoXImageToVideoPipeline builds it.

        The image is resized to the stage's canvas (with the tiled VAE above
        the native size), so it is up-scaled with the video and every tile
        sees its own crop of it.
        """
        if not self.image_to_video:
            return super().encode_image(image, height, width, num_frames, generator)
        from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import retrieve_latents

        pipe, vae = self.pipeline, self.pipeline.vae
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, dtype=self.dtype)
        tiled = (height, width) != (self.native_height, self.native_width)
        with self.vae_tiling(tiled):
            image_latent = retrieve_latents(vae.encode(pixels.unsqueeze(2)), generator).to(self.dtype)
        # CogVideoX 1.5 was trained without the scaling factor on its image latents; its config says so.
        scale = 1 / pipe.vae_scaling_factor_image if vae.config.invert_scale_latents else pipe.vae_scaling_factor_image
        image_latent = scale * image_latent
        f = self.geometry.latent_frames(num_frames)
        padding = image_latent.new_zeros(image_latent.shape[0], image_latent.shape[1], f - 1, *image_latent.shape[3:])
        return torch.cat([image_latent, padding], dim=2).float()

    # --- noise and VAE --------------------------------------------------------
    def prepare_noise(self, latent_shape, generator):
        from diffusers.utils.torch_utils import randn_tensor

        f, h, w = latent_shape
        # Drawn in the pipeline's B,F,C,H,W order so the same seed gives the same noise.
        noise_BFCHW = randn_tensor((1, f, self.geometry.channels, h, w), generator=generator, device=self.device,
                                   dtype=self.dtype)
        noise_BFCHW = noise_BFCHW * self.scheduler.init_noise_sigma
        return noise_BFCHW.permute(0, 2, 1, 3, 4).float()

    def vae_tiling_kwargs(self) -> dict:
        """Native-size VAE tiles with an overlap factor the VAE's tiled code handles exactly.

        CogVideoX's VAE sets overlap as a fraction and derives the pixel stride
        and the latent blend width from it separately (``int(...)`` each); they
        only agree for some fractions (its defaults 1/6, 1/5 suit 240x360
        tiles), otherwise encoding returns a latent one cell too large. Pick the
        widest overlap up to a quarter of the tile for which they agree.
        """
        scale = self.geometry.scale_spatial
        kwargs = {}
        for axis, pixels in (("height", self.native_height), ("width", self.native_width)):
            cells = pixels // scale
            for blend in range(max(1, cells // 4), 0, -1):
                factor = blend / cells
                if int(pixels * (1 - factor)) == (cells - int(cells * factor)) * scale:
                    break
            else:
                raise ValueError(f"no VAE tile overlap fits a native {axis} of {pixels} pixels")
            kwargs[f"tile_sample_min_{axis}"] = pixels
            kwargs[f"tile_overlap_factor_{axis}"] = factor
        return kwargs

    def decode(self, latents, tiled=False):
        vae = self.pipeline.vae
        # Same arithmetic as CogVideoXPipeline.decode_latents, for bit-equal native output.
        z = 1 / self.pipeline.vae_scaling_factor_image * latents.to(vae.device, vae.dtype)
        with self.vae_tiling(tiled):
            return vae.decode(z).sample

    def encode(self, video, tiled=False):
        vae = self.pipeline.vae
        with self.vae_tiling(tiled):
            z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        return (self.pipeline.vae_scaling_factor_image * z).float()


# --- the tiny built-in model(s) of this family (``--model tiny-...``; see supergen.models) ---------------


def build_tiny_cogvideox(seed: int = 0, image_to_video: bool = False):
    """Build a tiny ``CogVideoXPipeline`` (CogVideoX-5B layout: RoPE, v-prediction DDIM).

    Native 64x96 pixels, 9 frames: latent 3x8x12 with 4 channels, patch 2x2.
    ``image_to_video`` builds ``CogVideoXImageToVideoPipeline`` instead, whose
    transformer takes the image latents as 4 more input channels.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_t5(tokenizer)
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=96,
        ).eval()
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=8 if image_to_video else 4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_height=8,
            sample_width=12,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=True,
        ).eval()
    # CogVideoX-2b's released scheduler config (v-prediction, zero-SNR, trailing spacing).
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    pipeline_cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    return pipeline_cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def build_tiny_cogvideox_i2v(seed: int = 0):
    """Build a tiny ``CogVideoXImageToVideoPipeline`` (see :func:`build_tiny_cogvideox`)."""
    return build_tiny_cogvideox(seed=seed, image_to_video=True)
