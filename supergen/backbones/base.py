"""The contract between the engine and one family of Diffusers video models.

Everything model-specific lives in an adapter: latent layout and scale
factors, the native size, prompt encoding (through the pipeline's own
``encode_prompt``), calling the transformer on a batch of latent tiles with
classifier-free guidance batched, RoPE positions, and VAE encode/decode. The
tiling, cache, parallel and sampler code only sees canonical ``B,C,F,H,W``
latents in the VAE's normalised space and these methods.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from supergen.samplers.protocol import TokenPositions  # noqa: F401 - re-exported: the adapters' positions type


@dataclass(frozen=True)
class LatentGeometry:
    """Pixel <-> latent arithmetic of one backbone.

    ``patch`` is the transformer's patch size in latent cells (t, h, w): tiles,
    overlaps and grid shifts are kept multiples of it so tokens never straddle
    a tile edge.
    """

    channels: int
    scale_temporal: int
    scale_spatial: int
    patch: tuple[int, int, int]

    @property
    def pixel_multiple(self) -> tuple[int, int]:
        """Height/width must be multiples of these (VAE scale x patch)."""
        return self.scale_spatial * self.patch[1], self.scale_spatial * self.patch[2]

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.scale_temporal + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.scale_temporal + 1

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """(F, H, W) of the latent for a video of this pixel size."""
        return self.latent_frames(num_frames), height // self.scale_spatial, width // self.scale_spatial


@dataclass(frozen=True)
class ModelConfigs:
    """The configs an adapter derives a model's sizes from.

    ``pipeline`` is the pipeline's own config (``model_index.json``),
    ``transformer`` and ``vae`` those of its components. A loaded pipeline
    gives its ``.config`` objects (:meth:`of`); a pipeline folder gives its
    JSON files (:func:`supergen.backbones.read_folder_configs`), so sizes can
    be checked before any weights load. Adapters index them (``cfg["name"]``)
    so that a folder's config falls back on the Diffusers class's defaults as
    a loaded one does.
    """

    pipeline_class: str
    pipeline: Mapping[str, Any]
    transformer: Mapping[str, Any]
    vae: Mapping[str, Any]

    @classmethod
    def of(cls, pipeline) -> "ModelConfigs":
        return cls(type(pipeline).__name__, pipeline.config, pipeline.transformer.config, pipeline.vae.config)


@dataclass(frozen=True)
class ModelSpec:
    """What request validation needs to know about a model; known before its weights load."""

    pipeline_class: str
    geometry: LatentGeometry
    #: (height, width, frames) the model was trained at.
    native_size: tuple[int, int, int]
    supports_absolute_rope: bool


@dataclass(frozen=True)
class DecodeBand:
    """A horizontal band of a decode that can run on its own.

    Decode latent rows ``latent_rows`` (half-open) the usual way, keep pixel
    rows ``keep_rows`` of the result (``None`` end: to the bottom); they are
    pixel rows ``pixel_rows`` of the whole decode.
    """

    latent_rows: tuple[int, int]
    keep_rows: tuple[int, int | None]
    pixel_rows: tuple[int, int]


@dataclass
class Conditioning:
    """Text (and other) conditioning for one prompt, ready for :meth:`BackboneAdapter.predict`.

    ``negative`` is ``None`` when guidance is off. ``extra`` carries what some
    backbones need besides the sequence embeddings (pooled text, masks...).
    """

    prompt: str
    positive: torch.Tensor
    negative: torch.Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneProfile:
    """One backbone family's facts that its checkpoints' configs do not hold, in one place.

    Read by the adapter (native size, prompt length, guidance), by the real-size
    configurations of :mod:`supergen.models` (``REAL_CONFIGS``) and so by the
    benchmarks and the GPU check.
    """

    #: Native (height, width, frames) of the released variants, by the names ``REAL_CONFIGS`` uses.
    native_sizes: Mapping[str, tuple[int, int, int]]
    #: Text tokens a prompt is cut to when the caller gives no ``max_sequence_length`` (the pipeline's default).
    max_sequence_length: int = 512
    #: ``cfg``: conditional and unconditional branches, combined by :func:`cfg_combine`; ``embedded``:
    #: guidance-distilled, the scale is a model input (times ``guidance_embed_scale``).
    guidance: str = "cfg"
    guidance_embed_scale: float = 1.0


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, as every Diffusers video pipeline combines the two branches."""
    return uncond + scale * (cond - uncond)


class BackboneAdapter(ABC):
    """Wraps one loaded Diffusers pipeline; see the module docstring."""

    #: Diffusers transformer classes (by name) this adapter serves.
    transformer_classes: tuple[str, ...] = ()
    #: Diffusers pipeline classes (by name) this adapter serves.
    pipeline_classes: tuple[str, ...] = ()
    #: Whether :meth:`predict` accepts ``positions`` (canvas-absolute RoPE).
    supports_absolute_rope: bool = False
    #: Whether :meth:`predict` can return the residual its transformer blocks add to the hidden
    #: states, and run with a given residual in place of the blocks (step caches reuse it).
    supports_block_reuse: bool = False
    #: Whether :meth:`predict` runs one guidance branch when :attr:`cfg_split` is set (CFG parallel).
    supports_cfg_parallel: bool = False
    #: Config fields the sizes are derived from: a checkpoint without them fails naming the field.
    required_transformer_config: tuple[str, ...] = ()
    required_vae_config: tuple[str, ...] = ()
    #: The family's facts (native sizes, prompt length, guidance kind); see :class:`BackboneProfile`.
    profile: BackboneProfile = BackboneProfile(native_sizes={})

    @property
    def default_max_sequence_length(self) -> int:
        """Text tokens the prompt is cut to when the caller gives no ``max_sequence_length``."""
        return self.profile.max_sequence_length

    def __init__(self, pipeline, native_size: tuple[int, int, int] | None = None):
        self.pipeline = pipeline
        #: Run the conditional and unconditional branches in one batch (faster);
        #: False runs them one after the other, exactly as WanPipeline does. The
        #: CogVideoX and LTX pipelines batch them themselves, so their adapters always do.
        self.batch_cfg = True
        #: Named model hooks, declared by the subclass and attached only while a call or a stream runs.
        from supergen.backbones.hooks import HookSet  # Diffusers' hooks: imported once a pipeline exists

        self.hooks = HookSet()
        #: Set by :class:`supergen.parallel.hybrid.HybridRun` while a CFG-parallel plan runs: this rank
        #: computes branch ``cfg_split.branch`` of every tile and ``cfg_split.combine`` brings the other.
        self.cfg_split = None
        spec = type(self).spec_from_configs(ModelConfigs.of(pipeline), native_size)
        self.geometry = spec.geometry
        self.native_height, self.native_width, self.native_num_frames = spec.native_size

    # --- description -----------------------------------------------------
    @classmethod
    def spec_from_configs(cls, configs: ModelConfigs, native_size: tuple[int, int, int] | None = None) -> ModelSpec:
        """The model's geometry and native size from its configs alone (no weights needed).

        The one place both a loaded adapter and the pre-load check get them
        from, so the two cannot disagree. ``native_size`` overrides the
        adapter's default (a checkpoint's ``supergen.json``, a caller's choice).
        """
        require_config(configs.transformer, cls.required_transformer_config, "transformer")
        require_config(configs.vae, cls.required_vae_config, "vae")
        geometry = cls.geometry_from_config(configs)
        native = tuple(native_size) if native_size else cls.native_size_from_config(configs, geometry)
        return ModelSpec(configs.pipeline_class, geometry, native, cls.supports_absolute_rope)

    @classmethod
    @abstractmethod
    def geometry_from_config(cls, configs: ModelConfigs) -> LatentGeometry:
        """Latent channels, VAE factors and transformer patch, as the Diffusers pipeline derives them."""

    @classmethod
    @abstractmethod
    def native_size_from_config(cls, configs: ModelConfigs, geometry: LatentGeometry) -> tuple[int, int, int]:
        """(height, width, frames) the checkpoint was trained at, from its configs (or the family's known size)."""

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            type(self.pipeline).__name__,
            self.geometry,
            (self.native_height, self.native_width, self.native_num_frames),
            self.supports_absolute_rope,
        )

    @property
    def native_latent_shape(self) -> tuple[int, int, int]:
        return self.geometry.latent_shape(self.native_height, self.native_width, self.native_num_frames)

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    def make_scheduler(self, latent_shape: tuple[int, int, int], generator: torch.Generator | None = None):
        """A fresh scheduler that behaves like the one the Diffusers pipeline drives.

        Loops only call ``set_timesteps(n, device=...)``, ``set_begin_index``,
        ``timesteps``, ``order``, ``step(pred, t, latents, return_dict=False)``
        and ``add_noise``/``scale_noise`` on it. Backbones whose pipeline passes
        extra arguments (custom sigmas, a resolution shift, stochastic steps)
        return a :class:`PipelineScheduler` that adds them. ``latent_shape`` is
        the (F, H, W) the model sees in one call (a tile), for schedules that
        depend on sequence length.
        """
        return type(self.scheduler).from_config(self.scheduler.config)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    def describe(self) -> str:
        f, h, w = self.native_latent_shape
        return (
            f"{type(self).__name__}({type(self.pipeline).__name__}, native {self.native_height}x{self.native_width}"
            f"x{self.native_num_frames}f = latent {f}x{h}x{w})"
        )

    # --- conditioning and the model ---------------------------------------
    @abstractmethod
    def encode_prompt(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance_scale: float,
        max_sequence_length: int | None = None,
        image=None,
    ) -> Conditioning:
        """Prompt conditioning through the pipeline's own ``encode_prompt``.

        ``image`` is the first frame of an image-to-video call, for models that
        also embed it globally (Wan2.1 I2V's CLIP image tokens); its per-pixel
        part goes through :meth:`encode_image` instead.
        """

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        positions: TokenPositions | None = None,
        guidance_scale_2: float | None = None,
        condition: torch.Tensor | None = None,
        block_residual: torch.Tensor | None = None,
        return_block_residual: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Model prediction for a batch of latent tiles ``(N, C, F, H, W)`` at one timestep.

        Classifier-free guidance runs the conditional and unconditional branch
        of every tile in one batch. ``positions`` overrides the RoPE positions
        (``None``: each tile gets the positions of a standalone video).
        ``condition`` is the same tiles cut from :meth:`encode_image`'s canvas
        (image-to-video pipelines only).

        Adapters with :attr:`supports_block_reuse` also take
        ``return_block_residual=True`` (returns ``(prediction, residual)``,
        the residual the transformer blocks added to the hidden states,
        shape (N, branches, tokens, dim), tokens in (F, H, W) order) and
        ``block_residual`` (skip the blocks and add this residual instead;
        embeddings and the timestep-modulated output head still run).
        """

    def context_parallel_models(self) -> list[torch.nn.Module]:
        """The transformers that Diffusers' context parallelism (their ``_cp_plan``) is applied to."""
        return [self.pipeline.transformer]

    # --- image-to-video -------------------------------------------------------
    @property
    def image_to_video(self) -> bool:
        """Whether the wrapped pipeline is image-to-video (its calls then need an ``image``)."""
        return False

    def encode_image(self, image, height: int, width: int, num_frames: int, generator: torch.Generator) -> torch.Tensor:
        """The conditioning image as a latent canvas ``(1, C', F, H, W)`` aligned with the video latents.

        The image is resized to ``height x width`` (the canvas being denoised),
        so every tile crops its own part of it exactly as it crops the latents.
        """
        raise ValueError(f"{type(self.pipeline).__name__} is not an image-to-video pipeline; it takes no image")

    def token_grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        pt, ph, pw = self.geometry.patch
        f, h, w = latent_shape
        return f // pt, h // ph, w // pw

    def tokens(self, latent_shape: tuple[int, int, int]) -> int:
        return int(np.prod(self.token_grid(latent_shape)))

    # --- noise and VAE ----------------------------------------------------
    def prepare_noise(self, latent_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise of shape (1, C, F, H, W), drawn as the Diffusers pipeline draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.geometry.channels, *latent_shape)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    @abstractmethod
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Normalised latents (B,C,F,H,W) -> video in [-1, 1] (B,3,F',H',W')."""

    @abstractmethod
    def encode(self, video: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Video in [-1, 1] (B,3,F,H,W) -> normalised latents (B,C,F',H',W')."""

    def decode_bands(self, latent_shape: tuple[int, int, int], parts: int, tiled: bool) -> list[DecodeBand]:
        """Split ``decode(latents, tiled)`` into at most ``parts`` bands whose stacked output equals it.

        The default cannot split (one band); adapters whose tiled VAE decode
        is row-separable override this.
        """
        rows = latent_shape[1] * self.geometry.scale_spatial
        return [DecodeBand((0, latent_shape[1]), (0, None), (0, rows))]

    def decode_band(self, latents: torch.Tensor, band: DecodeBand, tiled: bool) -> torch.Tensor:
        """The pixel rows ``band.pixel_rows`` of ``decode(latents, tiled)``."""
        lo, hi = band.latent_rows
        video = self.decode(latents[:, :, :, lo:hi], tiled=tiled)
        return video[:, :, :, band.keep_rows[0] : band.keep_rows[1]]

    def postprocess(self, video: torch.Tensor) -> np.ndarray:
        """Video in [-1, 1] -> float32 frames in [0, 1], (F, H, W, 3), as the pipeline's ``output_type='np'``."""
        return self.pipeline.video_processor.postprocess_video(video, output_type="np")[0]

    def vae_tiling_kwargs(self) -> dict:
        """Arguments for the VAE's ``enable_tiling``: native-size tiles, a quarter overlap.

        Native tiles keep decode memory at the native level; a quarter of
        overlap is what Diffusers' own defaults use (256 tiles, 192 stride).
        """
        scale = self.geometry.scale_spatial
        return dict(
            tile_sample_min_height=self.native_height,
            tile_sample_min_width=self.native_width,
            tile_sample_stride_height=max(scale, (self.native_height * 3 // 4) // scale * scale),
            tile_sample_stride_width=max(scale, (self.native_width * 3 // 4) // scale * scale),
        )

    @contextlib.contextmanager
    def vae_tiling(self, tiled: bool) -> Iterator[None]:
        """Diffusers' own tiled VAE (see :meth:`vae_tiling_kwargs`) while the block runs, when ``tiled``."""
        vae = self.pipeline.vae
        if tiled:
            vae.enable_tiling(**self.vae_tiling_kwargs())
        try:
            yield
        finally:
            vae.disable_tiling()

    # --- streaming (block-causal, KV-cached) -------------------------------
    def check_streaming(self) -> None:
        """Raise ``ValueError`` (cheaply, before any model work) if this backbone cannot stream."""
        raise ValueError(
            f"{type(self).__name__} ({type(self.pipeline).__name__}) has no streaming support: block-causal KV-cached "
            "attention is implemented for the Wan family (WanPipeline, SkyReelsV2Pipeline)"
        )

    def install_streaming(
        self,
        latent_hw: tuple[int, int],
        sink: int,
        window: int,
        max_segment_frames: int,
        guidance_scale: float = 1.0,
        cached: bool = True,
    ):
        """Install block-causal attention; returns a stream model with ``predict``/``set_conditioning``/``remove``.

        ``cached=False`` returns the uncached reference (full history re-run
        under the equivalent mask) instead.
        """
        self.check_streaming()

    def stream_decoder(self):
        """A decoder object whose ``decode(latent_block)`` carries the VAE's causal state across blocks."""
        raise ValueError(f"{type(self).__name__} has no streaming decoder")

    @contextlib.contextmanager
    def inference_context(self) -> Iterator[None]:
        with torch.no_grad():
            yield

    def attached(self):
        """Context manager: this adapter's hooks on the pipeline's modules while the block runs (re-entrant)."""
        return self.hooks.attached()

    def remove_hooks(self) -> None:
        """Detach every hook now, however many calls or streams still hold them (a stream left open)."""
        self.hooks.detach(all_levels=True)


class PipelineScheduler:
    """A Diffusers scheduler plus the arguments one pipeline always passes to it.

    ``timestep_kwargs`` go to every ``set_timesteps`` call (e.g. LTX's custom
    ``sigmas`` and resolution shift ``mu``; ``sigmas`` may be a function of the
    step count); ``step_kwargs`` to every ``step`` (e.g. ``eta``/``generator``).
    Everything else is the wrapped scheduler's.
    """

    def __init__(self, scheduler, timestep_kwargs: dict | None = None, step_kwargs: dict | None = None):
        self.scheduler = scheduler
        self.timestep_kwargs = dict(timestep_kwargs or {})
        self.step_kwargs = dict(step_kwargs or {})

    def __getattr__(self, name):
        # Only reached for attributes this wrapper does not define itself.
        return getattr(self.__dict__["scheduler"], name)

    def set_timesteps(self, num_inference_steps: int, device=None):
        kwargs = dict(self.timestep_kwargs)
        if "sigmas" in kwargs and callable(kwargs["sigmas"]):
            kwargs["sigmas"] = kwargs["sigmas"](num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        return self.scheduler.step(model_output, timestep, sample, **self.step_kwargs, return_dict=return_dict)


def require_config(config, fields: tuple[str, ...], where: str) -> None:
    """Fail naming the field when a checkpoint's config lacks what an adapter reads.

    Diffusers fills fields missing from ``config.json`` with the class defaults
    and lists them in ``_use_default_values``; for the fields an adapter
    derives sizes from, a silent default would tile at the wrong size. A model
    built in code (no ``_name_or_path``) chose its defaults on purpose.
    """
    loaded = config.get("_name_or_path") is not None
    defaulted = set(config.get("_use_default_values", ())) if loaded else set()
    for name in fields:
        if name not in config or name in defaulted:
            raise ValueError(
                f"the checkpoint's {where} config has no {name!r}, which SuperGen needs for this model; "
                f"add it to {where}/config.json or load a complete checkpoint"
            )
