"""Endless video, block by block: the object :meth:`SuperGenPipeline.stream` returns.

A :class:`VideoStream` is a plain Python iterator of :class:`StreamBlock`
(uint8 frames of one block plus that block's metrics). Nothing runs until the
first ``next()``; each ``next()`` denoises one more block (KV-cached, see
:mod:`supergen.backbones.wan_stream`), decodes it with the VAE's causal state
carried over from the previous block, and returns its frames at once.

The prompt can change between blocks with :meth:`VideoStream.set_prompt`: the
blocks that start after the call use it (with ``schedule="rolling"`` the
blocks already in the joint window finish under the new prompt), and
``StreamConfig.on_prompt_change`` says what happens to the cached context
(kept, re-cached under the new prompt, flushed to the sink, or dropped for a
fresh start). ``close()`` (or leaving a ``with`` block, or breaking out of a
``for`` loop over a ``with``-managed stream) restores the transformer's
attention processors and frees the caches at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from supergen.config import StreamConfig
from supergen.io import to_uint8
from supergen.samplers.schedule import fresh_scheduler
from supergen.samplers.stream import block_stream, rolling_stream

logger = logging.getLogger(__name__)


@dataclass
class StreamBlock:
    """One finished block: ``frames`` (F, H, W, 3) uint8 (float in [0, 1] with ``output_type='float'``)."""

    index: int
    frames: np.ndarray
    latents: torch.Tensor
    metrics: dict = field(default_factory=dict)


class VideoStream:
    """Iterator of :class:`StreamBlock`; build it with :meth:`SuperGenPipeline.stream`."""

    def __init__(
        self,
        pipe,
        prompt: str,
        negative_prompt: str | None,
        num_blocks: int | None,
        config: StreamConfig,
        height: int,
        width: int,
        guidance_scale: float,
        generator: torch.Generator,
        scheduler=None,
        output_type: str = "uint8",
        cached: bool = True,
        max_sequence_length: int | None = None,
    ):
        self.pipe = pipe
        self.adapter = pipe.adapter
        self.config = config
        self.num_blocks = num_blocks
        self.height, self.width = height, width
        self.guidance_scale = guidance_scale
        self.output_type = output_type
        self._generator = generator
        self._scheduler_template = scheduler if scheduler is not None else self.adapter.scheduler
        self._max_sequence_length = max_sequence_length
        self._negative_prompt = negative_prompt
        self.prompt = prompt
        _, lh, lw = self.adapter.geometry.latent_shape(height, width, 1)
        self.latent_hw = (lh, lw)
        self.blocks: list[dict] = []
        self.decode_s = 0.0
        self.denoise_s = 0.0
        self._started: float | None = None
        self._first_frame_s: float | None = None
        self._frames_out = 0
        self._blocks_started = 0
        self._closed = False
        # The block a `restart` prompt change decodes with a fresh VAE state (it starts the stream afresh).
        self._decoder_reset_at: int | None = None
        # Clean latents of the frames in the KV cache (sink, then window), for a KV re-cache.
        self._sink_latents: list[torch.Tensor] = []
        self._window_latents: list[torch.Tensor] = []
        self.prompt_changes: list[dict] = []
        self.model, self.decoder = self._install(cached)
        self._log_start(cached)
        self._gen = self._run()

    def _install(self, cached: bool):
        """The adapter's block-causal streaming model, conditioned on the prompt, and the causal VAE decoder;
        the model is removed again if either fails."""
        config = self.config
        model = self.adapter.install_streaming(
            self.latent_hw,
            sink=config.sink,
            window=config.window,
            max_segment_frames=config.segment_frames,
            guidance_scale=self.guidance_scale,
            cached=cached,
        )
        try:
            model.set_conditioning(self._encode(self.prompt, self._negative_prompt))
            return model, self.adapter.stream_decoder()
        except BaseException:
            model.remove()
            raise

    def _log_start(self, cached: bool) -> None:
        config = self.config
        logger.info(
            "stream %dx%d, blocks of %d latent frames, %s schedule with %d steps, sink %d + window %d latent frames, "
            "kv write %s (context noise %g), %s",
            self.width, self.height, config.block_frames, config.schedule, config.steps, config.sink, config.window,
            config.kv_write, config.context_noise, "KV-cached" if cached else "uncached (full history re-run)",
        )

    # --- control ------------------------------------------------------------------
    def _encode(self, prompt: str, negative_prompt: str | None):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.adapter.encode_prompt(prompt, negative_prompt, self.guidance_scale, self._max_sequence_length)

    def set_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """Use ``prompt`` for every block that starts after this call."""
        if self._closed:
            raise RuntimeError("the stream is closed")
        with torch.no_grad():
            cond = self._encode(prompt, negative_prompt if negative_prompt is not None else self._negative_prompt)
        self.model.set_conditioning(cond)
        self.prompt = prompt
        t0 = time.perf_counter()
        mode = self.config.on_prompt_change
        cache = getattr(self.model, "cache", None)
        if cache is not None and mode == "recache":
            self._recache()
        elif cache is not None and mode == "flush":
            cache.flush(keep_frames=1)
            del self._window_latents[:-1]
        elif cache is not None and mode == "restart":
            cache.reset()
            self._sink_latents.clear()
            self._window_latents.clear()
            # The next block is a first block again: decode it with a fresh causal VAE state too.
            self._decoder_reset_at = self._blocks_started
        self.prompt_changes.append({"before_block": self._blocks_started, "prompt": prompt, "mode": mode,
                                    "seconds": time.perf_counter() - t0})
        logger.info("prompt changed before block %d (%s the cached context): %r", self._blocks_started,
                    {"keep": "keeping", "recache": "re-caching", "flush": "flushing", "restart": "dropping"}[mode], prompt)

    def _recache(self) -> None:
        """Re-run the cached clean frames under the current prompt, block by block, as they were first written."""
        cache = self.model.cache
        cache.reset()
        step = self.config.block_frames
        with torch.no_grad():
            for frames in (self._sink_latents, self._window_latents):
                for i in range(0, len(frames), step):
                    x = torch.cat(frames[i : i + step], dim=2)
                    self.model.predict(x, torch.zeros(x.shape[2]), write_frames=x.shape[2])

    def _remember(self, clean: torch.Tensor) -> None:
        """Track the clean latent frames the KV cache now holds (same sink/window rule as the cache)."""
        for i in range(clean.shape[2]):
            frame = clean[:, :, i : i + 1]
            if len(self._sink_latents) < self.config.sink:
                self._sink_latents.append(frame)
            else:
                self._window_latents.append(frame)
        del self._window_latents[: max(0, len(self._window_latents) - self.config.window)]

    def close(self) -> None:
        """Stop the stream and free its caches (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._gen.close()
        self.model.remove()
        self.decoder.reset()

    def __iter__(self) -> Iterator[StreamBlock]:
        return self

    def __next__(self) -> StreamBlock:
        if self._closed:
            raise StopIteration
        try:
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "VideoStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the loop -----------------------------------------------------------------
    def _next_noise(self) -> torch.Tensor | None:
        if self.num_blocks is not None and self._blocks_started >= self.num_blocks:
            return None
        self._blocks_started += 1
        shape = (self.config.block_frames, *self.latent_hw)
        return self.adapter.prepare_noise(shape, self._generator)

    def _make_scheduler(self):
        scheduler = fresh_scheduler(self._scheduler_template)
        scheduler.set_timesteps(self.config.steps, device=self.adapter.device)
        return scheduler

    def _run(self) -> Iterator[StreamBlock]:
        loop = rolling_stream if self.config.schedule == "rolling" else block_stream
        with torch.no_grad():
            self._started = time.perf_counter()
            block_start = self._started
            latents = loop(self.model, self._next_noise, self._make_scheduler, self.config.kv_write, self._generator,
                           context_noise=self.config.context_noise)
            for index, clean in enumerate(latents):
                self._remember(clean)
                t_denoised = time.perf_counter()
                if index == self._decoder_reset_at:
                    self.decoder.reset()
                video = self.decoder.decode(clean)
                frames = self.adapter.postprocess(video)
                if self.output_type == "uint8":
                    frames = to_uint8(frames)
                now = time.perf_counter()
                denoise_s, decode_s = t_denoised - block_start, now - t_denoised
                self.denoise_s += denoise_s
                self.decode_s += decode_s
                self._frames_out += len(frames)
                if self._first_frame_s is None:
                    self._first_frame_s = now - self._started
                metrics = {
                    "index": index,
                    "latency_s": now - block_start,
                    "denoise_s": denoise_s,
                    "decode_s": decode_s,
                    "frames": len(frames),
                    "kv_cache_bytes": self._kv_used_bytes(),
                    "kv_cache_allocated_bytes": self._kv_allocated_bytes(),
                    "context_frames": self._context_frames(),
                    "prompt": self.prompt,
                }
                self.blocks.append(metrics)
                logger.debug("block %d: %d frames in %.3fs", index, len(frames), metrics["latency_s"])
                yield StreamBlock(index=index, frames=frames, latents=clean, metrics=metrics)
                block_start = time.perf_counter()

    def _kv_used_bytes(self) -> int:
        cache = getattr(self.model, "cache", None)
        return cache.used_bytes if cache is not None else 0

    def _kv_allocated_bytes(self) -> int:
        cache = getattr(self.model, "cache", None)
        return cache.nbytes if cache is not None else 0

    def _context_frames(self) -> int:
        cache = getattr(self.model, "cache", None)
        return cache.context_frames if cache is not None else self.model.context_frames

    # --- metrics ------------------------------------------------------------------
    @property
    def metrics(self) -> dict:
        """Run metrics in the design's schema, with the per-block ``blocks`` list."""
        from supergen.run_metrics import peak_memory_bytes

        wall = (time.perf_counter() - self._started) if self._started is not None else 0.0
        n_blocks = len(self.blocks)
        # Steady state: a joint window makes one forward per block, the block schedule one per step.
        forwards_per_block = (1 if self.config.schedule == "rolling" else self.config.steps) + (
            1 if self.config.kv_write == "rerun" else 0
        )
        return {
            "model": type(self.pipe.pipe).__name__,
            "mode": "stream",
            "world_size": 1,
            "height": self.height,
            "width": self.width,
            "num_frames": self._frames_out,
            "steps": self.config.steps,
            "stream": {
                "block_frames": self.config.block_frames,
                "window": self.config.window,
                "sink": self.config.sink,
                "schedule": self.config.schedule,
                "kv_write": self.config.kv_write,
                "context_noise": self.config.context_noise,
                "on_prompt_change": self.config.on_prompt_change,
                "prompt_changes": list(self.prompt_changes),
            },
            "wall_s": wall,
            "denoise_s": self.denoise_s,
            "decode_s": self.decode_s,
            "time_to_first_frame_s": self._first_frame_s,
            "fps": self._frames_out / wall if wall > 0 else 0.0,
            "peak_mem_bytes": peak_memory_bytes(self.adapter.device),
            "tiles": {
                "count": 1,
                "tile_steps_total": n_blocks * self.config.steps,
                "tile_steps_computed": n_blocks * self.config.steps,
                "tile_steps_skipped": 0,
                "model_calls_per_block": forwards_per_block,
            },
            "comm_bytes": [0],
            "blocks": list(self.blocks),
        }
