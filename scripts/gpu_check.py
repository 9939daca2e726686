#!/usr/bin/env python
"""One prepared GPU run: what no CPU can measure, in under 8 minutes on one CUDA GPU.

Every part uses the Wan2.1-T2V-1.3B transformer configuration with random weights in
bfloat16 (``supergen.models.build_random_pipeline``, built directly on the GPU; nothing
is downloaded), with Wan2.1's VAE in its released configuration, also random:

a. overhead: one 720p denoising step (81 frames, 75,600 tokens, CFG) of the plain
   Diffusers ``WanPipeline`` against SuperGen's single-tile step on the same tokens
   (overhead %, goal <= 2%), and the achieved fraction of the device's measured bf16
   matmul rate (the step's FLOPs counted by ``scripts/bench_tiling.py``);
b. tiled vs direct: one tiled step at 2K (720p tiles of ``TilingConfig()``: 2x2) and one
   direct full-attention step at 2K if it fits (out of memory is a result), the measured
   ratio next to the FLOPs prediction (3.53x);
c. memory: peak GPU memory of a whole 2K run (sketch, up-scale, refinement, tiled decode;
   one step per stage) and of the tiled decode alone at 4K;
d. streaming at 480x832, blocks of 3 latent frames, 4 steps, VAE decode included: FPS,
   time to first frame, per-block latency over 60 blocks, KV-cache bytes;
e. cache: time per refinement step at 2K through ``SuperGenPipeline.__call__`` with the
   default tiled configuration (whatever ``TilingConfig()`` holds), without and with
   ``CacheConfig(mode="region")``.

Parts b and e run without CFG (guidance 1: one forward per tile per step) to fit the
time: CFG doubles every step of both sides, so the ratios do not change. Each part runs
guarded (an error is recorded with its traceback and the next part runs) under its own
time budget: loops stop early when the next step would not fit (the part is then
``partial``), and a watchdog stops a part that overruns its budget and carries on with
the next in a fresh worker process. Timings synchronise the device (CUDA events for the
matmul rate, ``torch.cuda.synchronize`` at every step); memory is
``torch.cuda.max_memory_allocated`` after a reset of the peak. Writes
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (rewritten after every part, so a run cut
short keeps what finished), ``DIR/gpu_check.log`` (the worker's log), and prints the
Markdown report at the end.

    python scripts/gpu_check.py --output gpu-check              # on one CUDA GPU
    python scripts/gpu_check.py --dry-run --output /tmp/check   # same code paths on CPU, tiny sizes, seconds
    python scripts/gpu_check.py --output gpu-check --parts b,e  # some parts only
    python scripts/gpu_check.py --output gpu-check --parts c --budget c=400  # one part, more time

``--dry-run`` replaces the 1.3B transformer with a 2-layer one of the same class and the
VAE with a small one, shrinks every size (64x96 tiles, 5 frames) and runs in float32 on the
CPU; ``tests/test_gpu_check.py`` runs it, so the script cannot rot while no GPU is around.

The GPU host (Python 3.12, torch 2.11 with CUDA 13, transformers, accelerate, safetensors,
tokenizers, einops, imageio, tqdm; no network) lacks Diffusers. Where the package registry
is reachable, fetch the wheels into the git-ignored ``.whl/`` (6.5 MB):

    bash scripts/gpu_wheels.sh
    # which runs:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.7.0

(diffusers' other requirements, filelock, huggingface-hub, numpy, Pillow, regex, requests and
safetensors, are in that image; imageio-ffmpeg is not needed, nothing here writes a video).
Take ``.whl/`` along with the checkout (through this workplace's device tool: ``carry:
[".whl"]``; the tree plus the wheels stay far under its 64 MiB), then on the GPU host, from
the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 scripts/gpu_check.py --output "$OUT"
    # or both in one:  bash scripts/gpu_check.sh "$OUT"
    # or into the image's own environment (--no-deps: pip would look for importlib_metadata,
    # which diffusers lists but does not import on Python >= 3.8):
    python3 -m pip install --no-index --no-deps --find-links .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.7.0

Exit status: 0 when every part ran to the end, 1 when one failed, was cut or timed out
(the report says which), 2 for a bad command line or a host that cannot run the check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
EVENT_TAG = "GPU_CHECK_EVENT "
REPORT_JSON, REPORT_MD, REPORT_LOG = "gpu_check.json", "gpu_check.md", "gpu_check.log"
REAL_NAME = "wan2.1-1.3b"
PROMPT = "a fox running through snow"
# What users compare a stream against: published figures for Wan2.1-1.3B on one H100.
STREAM_ANCHORS = "Self-Forcing 17 FPS, LongLive 20.7 FPS (one H100, Wan2.1-1.3B)"
OVERHEAD_GOAL_PCT = 2.0


@dataclass(frozen=True)
class Part:
    """One part of the check: its letter, its name in the report and what it measures."""

    key: str
    name: str
    title: str


PARTS = {
    p.key: p
    for p in (
        Part("a", "overhead_720p", "720p step: plain Diffusers vs SuperGen single tile, and the device's bf16 limit"),
        Part("b", "tiled_vs_direct_2k", "2K step: tiled (TilingConfig() tiles) vs direct full attention"),
        Part("c", "memory_2k_run_4k_decode", "peak GPU memory: whole 2K run, and the tiled decode alone at 4K"),
        Part("d", "stream_480p", "streaming 480x832: FPS with VAE decode, first frame, per-block latency, KV bytes"),
        Part("e", "cache_2k", "2K refinement step with the default tiled configuration, without and with the region cache"),
    )
}
# Cheap and central parts first, so a run cut short still has them.
RUN_ORDER = ("a", "d", "b", "e", "c")


@dataclass(frozen=True)
class Profile:
    """Sizes, steps and time budgets of one kind of run (the GPU check or its CPU dry run).

    Sizes are pixels (height, width, frames). ``tile`` is the native size given to
    SuperGen (720p for the real check, as SuperGen's 2K = 2x2 and 4K = 3x3 tiles).
    """

    name: str
    device: str
    dtype: str
    tile: tuple[int, int, int]
    stream_size: tuple[int, int]
    stream_blocks: int
    matmul_size: int
    budgets_s: dict
    time_limit_s: float
    setup_budget_s: float
    grace_s: float
    transformer_overrides: dict | None = None
    released_vae: bool = True
    overhead_steps: int = 3  # the first is a warm-up
    tiled_steps: int = 2  # the first is a warm-up
    stream_warmup_blocks: int = 1
    full_run_steps: int = 1
    cheap_guidance: float = 1.0
    threads: int | None = None

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        for name in ("tile", "stream_size"):
            data[name] = tuple(data[name])
        return cls(**data)

    @property
    def size_2k(self) -> tuple[int, int, int]:
        h, w, f = self.tile
        return 2 * h, 2 * w, f

    @property
    def size_4k(self) -> tuple[int, int, int]:
        h, w, f = self.tile
        return 3 * h, 3 * w, f


GPU_PROFILE = Profile(
    name="gpu",
    device="cuda",
    dtype="bfloat16",
    tile=(720, 1280, 81),
    stream_size=(480, 832),
    stream_blocks=60,
    matmul_size=8192,
    # Expected on an H100-class GPU from counted FLOPs: a ~40 s, d ~40 s, b ~70 s, e ~100 s, c ~140 s.
    budgets_s={"a": 90, "b": 90, "c": 130, "d": 60, "e": 110},
    time_limit_s=445,
    setup_budget_s=150,
    grace_s=30,
)
PROFILES = {
    "gpu": GPU_PROFILE,
    # The same code at sizes one CPU thread runs in seconds: the transformer class and build path
    # stay (2 layers of width 32), the VAE is the small stand-in, float32.
    "dry-run": dataclasses.replace(
        GPU_PROFILE,
        name="dry-run",
        device="cpu",
        dtype="float32",
        tile=(64, 96, 5),
        stream_size=(32, 48),
        stream_blocks=6,
        matmul_size=256,
        budgets_s={key: 60 for key in GPU_PROFILE.budgets_s},
        time_limit_s=240,
        setup_budget_s=120,
        transformer_overrides=dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64),
        released_vae=False,
        threads=1,
    ),
}


# --- the worker: runs the parts in this process ------------------------------------------------
class OutOfTime(Exception):
    """The next piece of work would not fit the part's remaining time budget."""


class Budget:
    """A part's time budget, checked before each piece of work whose cost can be predicted."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def require(self, what: str, predicted_s: float) -> None:
        if predicted_s > self.left():
            raise OutOfTime(
                f"{what} not run: predicted {predicted_s:.1f} s, {max(0.0, self.left()):.1f} s left of the "
                f"part's {self.seconds:.0f} s budget"
            )


def _emit(event: str, **payload) -> None:
    print(EVENT_TAG + json.dumps({"event": event, **payload}, default=str), flush=True)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Check:
    """Everything the parts share: the device, the random-weight pipeline, FLOP counts, clocks."""

    def __init__(self, profile: Profile):
        import torch

        from supergen.backbones import ModelConfigs, adapter_class_for
        from supergen.models import REAL_CONFIGS, build_random_pipeline

        self.profile = profile
        self.torch = torch
        self.device = torch.device(profile.device)
        self.dtype = getattr(torch, profile.dtype)
        self.transformer_config = {**REAL_CONFIGS[REAL_NAME]["transformer"], **(profile.transformer_overrides or {})}
        self.pipe = build_random_pipeline(
            REAL_NAME, self.device, self.dtype, transformer_overrides=profile.transformer_overrides,
            released_vae=profile.released_vae,
        )
        self.pipe.set_progress_bar_config(disable=True)
        # From the configs alone: an adapter would put its hooks on the transformer.
        adapter_cls = adapter_class_for(type(self.pipe).__name__, type(self.pipe.transformer).__name__)
        self.geometry = adapter_cls.spec_from_configs(ModelConfigs.of(self.pipe), profile.tile).geometry
        self._flops: dict[tuple[int, int, int], dict] = {}
        self.matmul: dict = {}
        self.part: str | None = None

    def progress(self, results: dict) -> None:
        """Report the running part's results so far: they survive the watchdog stopping the part."""
        _emit("partial", part=self.part, results=results)

    # --- clocks and memory -----------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """Seconds, after every queued kernel has finished."""
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the bytes allocated at its start (the weights, mostly)."""
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return int(self.torch.cuda.memory_allocated(self.device))
        return 0

    def peak(self) -> dict:
        """Peak memory since :meth:`reset_peak` (CUDA), or the process's peak RSS (CPU: not per part)."""
        if self.device.type == "cuda":
            return {
                "peak_allocated_bytes": int(self.torch.cuda.max_memory_allocated(self.device)),
                "peak_reserved_bytes": int(self.torch.cuda.max_memory_reserved(self.device)),
                "measure": "torch.cuda.max_memory_allocated / max_memory_reserved",
            }
        import resource

        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return {"peak_allocated_bytes": rss, "peak_reserved_bytes": rss, "measure": "process peak RSS (CPU)"}

    def measure_matmul(self) -> dict:
        """The device's dense matmul rate in the check's dtype (n x n x n products, CUDA events)."""
        torch = self.torch
        n, warmup, repeats = self.profile.matmul_size, 3, 10
        generator = torch.Generator(self.device).manual_seed(0)
        a = torch.randn(n, n, device=self.device, dtype=self.dtype, generator=generator)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype, generator=generator)
        for _ in range(warmup):
            a @ b
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds = time.perf_counter() - t0
        rate = 2 * n**3 * repeats / seconds
        self.matmul = {"size": n, "dtype": self.profile.dtype, "repeats": repeats, "warmup": warmup,
                       "flops_per_s": rate, "tflops": rate / 1e12}
        return self.matmul

    # --- model helpers ---------------------------------------------------------------------
    def flops(self, latent: tuple[int, int, int]) -> dict:
        """FLOPs of one transformer forward (batch 1) on a latent, counted by bench_tiling.count_flops."""
        from bench_tiling import count_flops

        key = tuple(latent)
        if key not in self._flops:
            self._flops[key] = count_flops(self.transformer_config, key)
        return self._flops[key]

    @contextlib.contextmanager
    def supergen(self):
        """A ``SuperGenPipeline`` around the shared pipeline, tiles of the profile's size; its hooks go on exit."""
        from supergen import SuperGenPipeline

        sg = SuperGenPipeline.from_pipe(self.pipe, native_size=self.profile.tile)
        try:
            yield sg
        finally:
            sg.adapter.remove_hooks()

    def latent(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (F, H, W) of a video of ``size`` (height, width, frames) pixels."""
        h, w, f = size
        return self.geometry.latent_shape(h, w, f)


def _environment(profile: Profile) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for name in ("diffusers", "transformers", "accelerate"):
        with contextlib.suppress(Exception):
            env[name] = __import__(name).__version__
    if profile.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_memory_bytes=int(props.total_memory),
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    else:
        from bench_tiling import _hardware

        env["device"] = _hardware(torch.device("cpu")) + f", {torch.get_num_threads()} torch thread(s)"
    return env


# --- the parts ------------------------------------------------------------------------------------
def part_overhead(check: Check, budget: Budget) -> dict:
    """(a) one 720p step: plain Diffusers WanPipeline vs SuperGen's single-tile TiledSampler, same tokens."""
    from bench_tiling import GUIDANCE_SCALE, run_direct_steps, run_tiled_steps

    from supergen import TilingConfig

    profile = check.profile
    h, w, f = profile.tile
    steps = profile.overhead_steps
    latent = check.latent(profile.tile)
    base = check.reset_peak()
    # Before any SuperGen hook is on the transformer: this is Diffusers alone.
    diffusers_s = run_direct_steps(check.pipe, h, w, f, steps, guidance_scale=GUIDANCE_SCALE).step_seconds()
    diffusers_peak = check.peak()
    if sum(diffusers_s) > budget.left():
        return {"size": list(profile.tile), "diffusers_step_s": diffusers_s, "diffusers_memory": diffusers_peak,
                "cut_for_time": f"SuperGen's steps not run: as long as Diffusers' ({sum(diffusers_s):.1f} s), "
                                f"{budget.left():.1f} s left of the part's budget"}
    with check.supergen() as sg:
        planner = sg.plan(h, w, f, TilingConfig())
        if planner.num_tiles != 1:
            raise RuntimeError(f"expected one tile at the native size, the plan has {planner.num_tiles}")
        check.reset_peak()
        supergen_s = run_tiled_steps(sg, planner, steps, guidance_scale=GUIDANCE_SCALE).step_seconds()
        supergen_peak = check.peak()
        tokens = sg.adapter.tokens(latent)
    d, s = _median(diffusers_s[1:]), _median(supergen_s[1:])
    step_flops = 2 * check.flops(latent)["total"]  # CFG: two forwards per step
    rate = check.matmul["flops_per_s"]
    overhead = 100 * (s / d - 1)
    return {
        "size": list(profile.tile), "latent": list(latent), "tokens": tokens, "guidance_scale": GUIDANCE_SCALE,
        "steps": steps, "warmup_steps": 1,
        "diffusers_step_s": diffusers_s, "supergen_step_s": supergen_s,
        "diffusers_s_per_step": d, "supergen_s_per_step": s,
        "overhead_pct": overhead, "overhead_goal_pct": OVERHEAD_GOAL_PCT, "meets_goal": overhead <= OVERHEAD_GOAL_PCT,
        "step_tflop": step_flops / 1e12,
        "matmul_tflops": rate / 1e12,
        "diffusers_tflops": step_flops / d / 1e12, "supergen_tflops": step_flops / s / 1e12,
        "diffusers_fraction_of_matmul": step_flops / d / rate, "supergen_fraction_of_matmul": step_flops / s / rate,
        "weights_bytes": base,
        "diffusers_memory": diffusers_peak, "supergen_memory": supergen_peak,
    }


def _out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def part_tiled_vs_direct(check: Check, budget: Budget) -> dict:
    """(b) one tiled step at 2K against one direct full-attention step (if it fits), next to the FLOPs ratio."""
    from bench_tiling import run_direct_steps, run_tiled_steps

    from supergen import TilingConfig

    profile = check.profile
    h, w, f = profile.size_2k
    guidance = profile.cheap_guidance
    with check.supergen() as sg:
        planner = sg.plan(h, w, f, TilingConfig())
        check.reset_peak()
        tiled_s = run_tiled_steps(sg, planner, profile.tiled_steps, guidance_scale=guidance).step_seconds()
        tiled_memory = check.peak()
        canvas, tile = tuple(planner.canvas), tuple(planner.tile)
        tokens, tile_tokens = sg.adapter.tokens(canvas), sg.adapter.tokens(tile)
    tiled = tiled_s[-1]
    predicted_ratio = check.flops(canvas)["total"] / (planner.num_tiles * check.flops(tile)["total"])
    result = {
        "size": [h, w, f], "latent": list(canvas), "tokens": tokens, "tiles": planner.num_tiles,
        "grid": list(planner.grid), "tile_latent": list(tile), "tokens_per_tile": tile_tokens,
        "guidance_scale": guidance, "tiled_step_s": tiled_s, "tiled_s_per_step": tiled,
        "tiled_memory": tiled_memory, "flops_ratio": predicted_ratio,
        "note": "the tiled step is the second (the first warmed up); the direct step follows the tiled ones "
                "on the same weights and kernels, without a warm-up step of its own (one costs as much as the step)",
    }
    check.progress(result)
    out_of_memory = None
    try:
        budget.require("the direct step", tiled * predicted_ratio * 1.2)
        check.reset_peak()
        direct = run_direct_steps(check.pipe, h, w, f, 1, guidance_scale=guidance).step_seconds()[0]
    except OutOfTime as err:
        result["cut_for_time"] = str(err)
        return result
    except Exception as err:
        if not _out_of_memory(err):
            raise
        out_of_memory = str(err).splitlines()[0]
    if out_of_memory is not None:
        # Out here, not in the except clause: there the traceback still holds the failed step's tensors.
        check.reset_peak()
        result.update(direct_fits=False, direct_error=out_of_memory)
        return result
    result.update(direct_fits=True, direct_s_per_step=direct, direct_memory=check.peak(),
                  measured_ratio=direct / tiled)
    return result


def part_memory(check: Check, budget: Budget) -> dict:
    """(c) peak memory of a whole 2K run (default tiling, CFG, few steps) and of the 4K tiled decode alone."""
    import torch

    from supergen import TilingConfig

    profile = check.profile
    h, w, f = profile.size_2k
    tiling = TilingConfig()
    with check.supergen() as sg:
        base = check.reset_peak()
        t0 = check.now()
        out = sg(PROMPT, height=h, width=w, num_frames=f, num_inference_steps=profile.full_run_steps,
                 tiling=tiling, progress=False)
        run_s = check.now() - t0
        run = {
            "size": [h, w, f], "steps": profile.full_run_steps, "strength": tiling.strength,
            "guidance_scale": sg.default_guidance_scale, "tiling": dataclasses.asdict(tiling),
            "tiles": out.metrics["tiles"]["count"], "frames_shape": list(out.frames.shape), "wall_s": run_s,
            "start_allocated_bytes": base, **check.peak(),
        }
        del out
        vae = "released Wan2.1 configuration" if profile.released_vae else "small stand-in VAE"
        result = {"full_run_2k": run, "vae": vae}
        check.progress(result)
        if budget.left() <= 0:
            result["cut_for_time"] = "the 4K decode not run: the whole 2K run used up the part's budget"
            return result
        h4, w4, f4 = profile.size_4k
        latent = check.latent(profile.size_4k)
        noise = torch.randn(1, check.geometry.channels, *latent, generator=torch.Generator().manual_seed(0))
        latents = noise.to(check.device, sg.adapter.dtype)
        base = check.reset_peak()
        t0 = check.now()
        video = sg.adapter.decode(latents, tiled=True)
        decode_s = check.now() - t0
        result["decode_4k"] = {
            "size": [h4, w4, f4], "latent": list(latent), "video_shape": list(video.shape),
            "video_dtype": str(video.dtype), "wall_s": decode_s, "start_allocated_bytes": base, **check.peak(),
        }
        del video, latents
    return result


def part_stream(check: Check, budget: Budget) -> dict:
    """(d) KV-cached streaming at 480x832: blocks of 3 latent frames, 4 steps, VAE decode in every block."""
    from bench_stream import summary

    from supergen import StreamConfig

    profile = check.profile
    height, width = profile.stream_size
    config = StreamConfig(block_frames=3, steps=4)
    rows: list[dict] = []
    cut = None
    with check.supergen() as sg:
        # Warm-up stream (kernels, allocator, cuDNN plans of the decoder), then the measured one.
        with sg.stream(PROMPT, num_blocks=profile.stream_warmup_blocks, stream=config, height=height,
                       width=width) as warm:
            for _ in warm:
                pass
        base = check.reset_peak()
        t_call = check.now()
        stream = sg.stream(PROMPT, num_blocks=profile.stream_blocks, stream=config, height=height, width=width)
        first_block_at = None
        with stream:
            for block in stream:
                check.sync()
                first_block_at = first_block_at or time.perf_counter()
                rows.append(block.metrics)
                if len(rows) < profile.stream_blocks and budget.left() < 2 * block.metrics["latency_s"]:
                    cut = f"stopped after {len(rows)} of {profile.stream_blocks} blocks: the part's time budget"
                    break
            metrics = stream.metrics
    latencies = [r["latency_s"] for r in rows]
    kv = [r["kv_cache_bytes"] for r in rows]
    result = {
        "size": [height, width], "stream_config": dataclasses.asdict(config), "blocks": len(rows),
        "blocks_planned": profile.stream_blocks, "warmup_blocks": profile.stream_warmup_blocks,
        "guidance_scale": sg.default_stream_guidance_scale,
        "fps": metrics["fps"], "time_to_first_frame_s": metrics["time_to_first_frame_s"],
        "first_frame_from_call_s": first_block_at - t_call,
        "frames": metrics["num_frames"],
        "latency_s_mean": statistics.fmean(latencies), "latency_s_median": _median(latencies),
        "latency_s_p90": sorted(latencies)[min(len(latencies) - 1, math.ceil(0.9 * len(latencies)) - 1)],
        "latency_s_max": max(latencies), "latency_s_min": min(latencies),
        "summary": summary("KV-cached", rows, metrics),
        "kv_cache_bytes_max": max(kv), "kv_cache_bytes_last": kv[-1],
        "kv_cache_allocated_bytes": rows[-1]["kv_cache_allocated_bytes"],
        "per_block": [{k: r[k] for k in ("latency_s", "denoise_s", "decode_s", "frames", "kv_cache_bytes",
                                          "context_frames")} for r in rows],
        "start_allocated_bytes": base, **check.peak(),
        "anchors": STREAM_ANCHORS,
    }
    if cut:
        result["cut_for_time"] = cut
    return result


class _BudgetClock:
    """A scheduler wrapper that times every step (device synchronised) and refuses steps past the budget.

    Wraps bench_tiling's ``StepClock``; it also ticks when the timesteps are
    set, just before the loop, so the first step is timed too (with what the
    pipeline does before it: drawing the canvas noise, setting up the cache).
    """

    def __init__(self, scheduler, device, budget: Budget):
        from bench_tiling import StepClock

        self._clock = StepClock(scheduler, device)
        self._budget = budget

    def set_timesteps(self, *args, **kwargs):
        self._clock.set_timesteps(*args, **kwargs)
        self._clock.tick()

    def step(self, *args, **kwargs):
        seconds = self._clock.step_seconds()
        self._budget.require("the next step", seconds[-1] if seconds else 0.0)
        return self._clock.step(*args, **kwargs)

    def __getattr__(self, name):
        # Only reached for what this wrapper does not define: the clock's, then the scheduler's.
        return getattr(self.__dict__["_clock"], name)


@contextlib.contextmanager
def _clocked_schedulers(adapter, device, budget: Budget):
    """Time the steps of every scheduler the pipeline makes while the block runs (sketch first, then refinement).

    ``SuperGenPipeline``'s own stage timers do not synchronise the device, so
    they cannot time GPU steps; this wraps the adapter's ``make_scheduler`` on
    this one instance and restores it on exit.
    """
    made: list = []
    original = adapter.make_scheduler

    def make_scheduler(*args, **kwargs):
        made.append(_BudgetClock(original(*args, **kwargs), device, budget))
        return made[-1]

    adapter.make_scheduler = make_scheduler
    try:
        yield made
    finally:
        del adapter.make_scheduler


def _steps_for(refine_steps: int, strength: float) -> int:
    """The fewest inference steps whose refinement at ``strength`` runs at least ``refine_steps``."""
    from supergen.samplers.schedule import refinement_steps

    n = refine_steps
    while refinement_steps(n, strength) < refine_steps:
        n += 1
    return n


def part_cache(check: Check, budget: Budget) -> dict:
    """(e) time per refinement step at 2K with ``TilingConfig()``, cache off and ``CacheConfig(mode="region")``."""
    from supergen import CacheConfig, TilingConfig

    profile = check.profile
    h, w, f = profile.size_2k
    # Every field at its default but how the sketch is made: it is not part of the timed refinement steps.
    tiling = dataclasses.replace(TilingConfig(), upscale="latent", sketch_steps=1)
    region = CacheConfig(mode="region")
    # The cache computes its warm-up and cool-down steps: one step more is the first it may reuse.
    runs = [("off", CacheConfig(), _steps_for(2, tiling.strength)),
            ("region", region, _steps_for(region.warmup + region.cooldown + 1, tiling.strength))]
    result = {
        "size": [h, w, f], "guidance_scale": profile.cheap_guidance,
        "tiling": dataclasses.asdict(tiling), "tiling_defaults": dataclasses.asdict(TilingConfig()),
        "region_cache": dataclasses.asdict(region),
        "note": "random weights: how often the cache reuses a tile says nothing about a trained model; "
                "the times of computed and reused steps do",
    }
    with check.supergen() as sg:
        for name, cache, steps in runs:
            entry = result[name] = {"inference_steps": steps}
            with _clocked_schedulers(sg.adapter, check.device, budget) as clocks:
                try:
                    out = sg(PROMPT, height=h, width=w, num_frames=f, num_inference_steps=steps,
                             guidance_scale=profile.cheap_guidance, tiling=tiling, cache=cache,
                             output_type="latent", progress=False)
                except OutOfTime as err:
                    entry["step_s_per_stage"] = [c.step_seconds() for c in clocks]
                    result["cut_for_time"] = f"{name}: {err}"
                    break
            # The last scheduler that stepped is the refinement's (the sketch's comes first; the coherence
            # guide's noiser, made after it, never steps).
            step_s = next((c.step_seconds() for c in reversed(clocks) if c.step_seconds()), [])
            tiles = out.metrics["tiles"]
            skips = [sum(row) for row in tiles["skip_map"]]
            # Step 0 also draws the canvas noise and sets up the cache: listed, not averaged (unless alone).
            timed = list(zip(step_s, skips))[1:] or list(zip(step_s, skips))
            entry.update(
                refine_steps=len(step_s), step_s=step_s, skipped_tiles_per_step=skips,
                s_per_step=statistics.fmean(s for s, _ in timed),
                computed_step_s=_median([s for s, k in timed if k == 0]),
                tiles=tiles["count"], tile_steps_total=tiles["tile_steps_total"],
                tile_steps_skipped=tiles["tile_steps_skipped"],
            )
            if any(k for _, k in timed):
                entry["reuse_step_s"] = _median([s for s, k in timed if k > 0])
            del out
    if "s_per_step" in result["off"] and "s_per_step" in result.get("region", {}):
        off, on = result["off"], result["region"]
        result["speedup"] = off["s_per_step"] / on["s_per_step"]
        if on["computed_step_s"] is not None:
            result["computed_step_overhead_pct"] = 100 * (on["computed_step_s"] / off["s_per_step"] - 1)
    return result


PART_FUNCTIONS = {"a": part_overhead, "b": part_tiled_vs_direct, "c": part_memory, "d": part_stream, "e": part_cache}


def _traceback_summary(err: BaseException, limit: int = 12) -> list[str]:
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    text = "".join(lines).rstrip().splitlines()
    return text[-limit:]


def worker_main(profile: Profile, parts: list[str], run_deadline: float) -> int:
    """Set up once, then run ``parts`` in order, reporting each as an event line on stdout."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    sys.path.insert(0, str(_REPO / "scripts"))
    import torch

    if profile.threads is not None:
        torch.set_num_threads(profile.threads)
    try:
        _emit("environment", environment=_environment(profile))
        check = Check(profile)
        _emit("ready", matmul=check.measure_matmul())
    except Exception as err:
        _emit("setup_failed", error=f"{type(err).__name__}: {err}".splitlines()[0], traceback=_traceback_summary(err))
        return 1
    for key in parts:
        seconds = max(0.0, min(profile.budgets_s[key], run_deadline - time.time()))
        _emit("start", part=key, budget_s=seconds)
        check.part = key
        budget = Budget(seconds)
        t0 = time.perf_counter()
        status, payload = "ok", {}
        try:
            if seconds <= 0:
                status, payload["error"] = "skipped", "not started: the run's time limit was reached"
            else:
                payload["results"] = PART_FUNCTIONS[key](check, budget)
                if "cut_for_time" in payload["results"]:
                    status = "partial"
        except OutOfTime as err:
            status, payload["error"] = "partial", str(err)
        except Exception as err:
            status = "failed"
            payload.update(error=f"{type(err).__name__}: {err}".splitlines()[0], traceback=_traceback_summary(err))
        finally:
            gc.collect()
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
        _emit("done", part=key, status=status, wall_s=time.perf_counter() - t0, **payload)
    return 0


# --- the report -------------------------------------------------------------------------------------
def _bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**shift:
            return f"{n / 2**shift:,.2f} {unit}"
    return f"{n} B"


def _num(x, fmt=".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def headline(key: str, r: dict) -> str:
    """One line of a part's results (Markdown)."""
    try:
        return _headline(key, r)
    except (KeyError, TypeError):
        return "incomplete results (see the JSON)"


def _headline(key: str, r: dict) -> str:
    if key == "a":
        verdict = "yes" if r["meets_goal"] else "NO"
        return (f"{r['tokens']:,} tokens, CFG: Diffusers {_num(r['diffusers_s_per_step'])} s/step, SuperGen "
                f"{_num(r['supergen_s_per_step'])} s/step: overhead {_num(r['overhead_pct'], '+.2f')}% (goal <= "
                f"{OVERHEAD_GOAL_PCT:g}%: {verdict}); {_num(r['step_tflop'], ',.4g')} TFLOP/step = "
                f"{_num(r['supergen_tflops'], ',.4g')} TFLOP/s, {_num(100 * r['supergen_fraction_of_matmul'], '.0f')}% "
                f"of the measured matmul rate ({_num(r['matmul_tflops'], ',.4g')} TFLOP/s)")
    if key == "b":
        direct = (f"direct {_num(r['direct_s_per_step'])} s/step: measured {_num(r['measured_ratio'], '.2f')}x"
                  if r.get("direct_fits") else
                  f"direct: does not fit ({r.get('direct_error')})" if "direct_fits" in r else "direct: not run")
        return (f"{r['tokens']:,} tokens, no CFG: tiled {_num(r['tiled_s_per_step'])} s/step ({r['tiles']} tiles, "
                f"{r['tokens_per_tile']:,} tokens each), {direct}; FLOPs predict {_num(r['flops_ratio'], '.2f')}x")
    if key == "c":
        run, dec = r["full_run_2k"], r.get("decode_4k", {})
        return (f"whole 2K run ({run['steps']} step per stage, CFG {run['guidance_scale']:g}): peak "
                f"{_bytes(run['peak_allocated_bytes'])} allocated ({_bytes(run['peak_reserved_bytes'])} reserved) in "
                f"{_num(run['wall_s'], '.1f')} s; 4K tiled decode alone: peak {_bytes(dec.get('peak_allocated_bytes'))}"
                f" in {_num(dec.get('wall_s'), '.1f')} s ({r['vae']})")
    if key == "d":
        return (f"{r['blocks']} blocks: {_num(r['fps'], '.1f')} FPS with VAE decode, first frame "
                f"{_num(r['time_to_first_frame_s'])} s, block latency median {_num(1000 * r['latency_s_median'], '.0f')}"
                f" ms (p90 {_num(1000 * r['latency_s_p90'], '.0f')}, max {_num(1000 * r['latency_s_max'], '.0f')}), "
                f"KV cache {_bytes(r['kv_cache_bytes_max'])}; anchors: {r['anchors']}")
    if key == "e":
        off, on = r.get("off", {}), r.get("region", {})
        return (f"no CFG, {off.get('tiles', '-')} tiles: cache off {_num(off.get('s_per_step'))} s/step, region "
                f"cache {_num(on.get('s_per_step'))} s/step ({on.get('tile_steps_skipped', '-')} of "
                f"{on.get('tile_steps_total', '-')} tile-steps reused): {_num(r.get('speedup'), '.2f')}x")
    return ""


def render_markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        "# SuperGen GPU check" + (" (dry run on CPU: tiny sizes, timings mean nothing)" if report["dry_run"] else ""),
        "",
        f"- date: {report['date']} (wall {_num(report.get('wall_s'), '.1f')} s of a {report['time_limit_s']:.0f} s limit)",
        f"- command: `{report['command']}`",
        f"- device: {env.get('device', '-')}",
        f"- torch {env.get('torch', '-')}, CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}, "
        f"diffusers {env.get('diffusers', '-')}, transformers {env.get('transformers', '-')}, "
        f"Python {env.get('python', '-')}",
        f"- commit: {report.get('commit') or '-'}",
    ]
    if report.get("matmul"):
        m = report["matmul"]
        lines.append(f"- measured matmul rate: {m['tflops']:,.4g} TFLOP/s ({m['size']}^3 {m['dtype']}, "
                     f"mean of {m['repeats']} after {m['warmup']} warm-ups)")
    if report.get("setup_error"):
        lines.append(f"- setup failed: {report['setup_error']}")
    lines += ["", "| part | status | s | result |", "|---|---|---:|---|"]
    for key in sorted(report["parts"]):
        p = report["parts"][key]
        text = headline(key, p["results"]) if "results" in p else ""
        if p.get("error") or p.get("results", {}).get("cut_for_time"):
            text = "; ".join(t for t in (text, p.get("error") or p["results"]["cut_for_time"]) if t)
        lines.append(f"| {key}. {p['name']} | {p['status']} | {_num(p.get('wall_s'), '.1f')} | {text} |")
    lines += ["", "Parts:", ""]
    lines += [f"- {k}. {PARTS[k].title}" for k in sorted(report["parts"])]
    lines += ["", f"Everything measured, per step and per block: `{REPORT_JSON}`; the worker's log: `{REPORT_LOG}`.", ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_safe(value):
    """``value`` with NaN and infinities as ``None``: strict JSON readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(out_dir: Path, report: dict) -> None:
    _write_atomic(out_dir / REPORT_JSON, json.dumps(_json_safe(report), indent=2, default=str) + "\n")
    _write_atomic(out_dir / REPORT_MD, render_markdown(report))


# --- the parent: runs workers under the budgets ----------------------------------------------------
class Worker:
    """A worker process running some parts; its event lines arrive on :attr:`events`."""

    def __init__(self, profile: Profile, parts: list[str], run_deadline: float, log):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--profile-json",
               json.dumps(dataclasses.asdict(profile)), "--parts", ",".join(parts), "--deadline", repr(run_deadline)]
        self.events: queue.Queue = queue.Queue()
        # Same process group as this one: whatever stops the check (Ctrl-C, a job's timeout) stops the worker too.
        self.proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._log = log
        self._threads = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_log, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_events(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(EVENT_TAG):
                self.events.put(json.loads(line[len(EVENT_TAG):]))
            else:
                self._log.write(line)
        self.events.put(None)  # end of output: the process is gone

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()

    def next_event(self, timeout: float) -> dict | None:
        """The next event; ``None`` when the worker has exited; raises ``queue.Empty`` on timeout."""
        return self.events.get(timeout=max(0.0, timeout))

    def stop(self, wait_s: float = 0.0) -> None:
        """End the worker: let it exit by itself for ``wait_s`` seconds, then kill it."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=wait_s)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def exit_summary(self) -> str:
        code = self.proc.wait()
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    return None


def run_check(profile: Profile, parts: list[str], out_dir: Path, command: str) -> int:
    started = time.time()
    run_deadline = started + profile.time_limit_s
    report = {
        "tool": "scripts/gpu_check.py",
        "command": command,
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": profile.name == "dry-run",
        "profile": dataclasses.asdict(profile),
        "time_limit_s": profile.time_limit_s,
        "commit": _commit(),
        "environment": {},
        "parts": {k: {"name": PARTS[k].name, "title": PARTS[k].title, "status": "not run"} for k in parts},
    }

    def say(text: str) -> None:
        print(f"[{time.time() - started:5.0f} s] {text}", flush=True)

    def finish_part(key: str, status: str, **fields) -> None:
        remaining.remove(key)
        report["parts"][key].update(status=status, **fields)
        report["wall_s"] = time.time() - started
        write_report(out_dir, report)
        entry = report["parts"][key]
        text = headline(key, entry["results"]) if "results" in entry else ""
        say(f"{key}. {PARTS[key].name}: {status} ({entry.get('wall_s', 0.0):.1f} s) {text} {entry.get('error', '')}")

    write_report(out_dir, report)
    remaining = list(parts)
    with open(out_dir / REPORT_LOG, "w") as log:
        while remaining:
            if run_deadline - time.time() < profile.grace_s:
                for key in list(remaining):
                    finish_part(key, "skipped", error="not started: the run's time limit was reached")
                break
            say(f"worker starting for parts {','.join(remaining)}")
            worker = Worker(profile, remaining, run_deadline, log)
            current, ready = None, False
            limit = part_started = time.time() + profile.setup_budget_s
            try:
                while remaining:
                    try:
                        event = worker.next_event(limit - time.time())
                    except queue.Empty:
                        if current:
                            why = f"part {current} ran {profile.grace_s:g} s past its budget"
                        else:
                            why = "the worker's set-up took longer than " + (
                                f"{profile.setup_budget_s:.0f} s" if not ready else "expected")
                        raise TimeoutError(why + ": worker stopped") from None
                    if event is None:
                        raise ChildProcessError(f"the worker ended ({worker.exit_summary()}); see {REPORT_LOG}")
                    kind = event["event"]
                    if kind == "environment":
                        report["environment"] = event["environment"]
                    elif kind == "setup_failed":
                        report["setup_error"] = event["error"]
                        for key in list(remaining):
                            finish_part(key, "failed", error=f"set-up failed: {event['error']}",
                                        traceback=event["traceback"])
                    elif kind == "ready":
                        ready, report["matmul"] = True, event["matmul"]
                        say(f"worker ready on {report['environment'].get('device')}: matmul "
                            f"{event['matmul']['tflops']:,.4g} TFLOP/s")
                    elif kind == "partial":
                        report["parts"][event["part"]]["results"] = event["results"]
                        write_report(out_dir, report)
                    elif kind == "start":
                        current, part_started = event["part"], time.time()
                        limit = part_started + event["budget_s"] + profile.grace_s
                        report["parts"][current]["budget_s"] = event["budget_s"]
                        say(f"{current}. {PARTS[current].name}: started, budget {event['budget_s']:.0f} s")
                    elif kind == "done":
                        finish_part(event["part"], event["status"],
                                    **{k: v for k, v in event.items() if k not in ("event", "part", "status")})
                        current = None
                worker.stop(wait_s=30)
            except (TimeoutError, ChildProcessError) as err:
                worker.stop()
                status = "timed_out" if isinstance(err, TimeoutError) else "failed"
                if not ready:
                    for key in list(remaining):
                        finish_part(key, "failed", error=f"set-up: {err}")
                else:
                    # A worker that dies between parts is charged to the part it was about to start.
                    finish_part(current or remaining[0], status, error=str(err), wall_s=time.time() - part_started)
            finally:
                worker.stop()
    report["wall_s"] = time.time() - started
    write_report(out_dir, report)
    print()
    print(render_markdown(report))
    print(f"report: {out_dir / REPORT_JSON}, {out_dir / REPORT_MD}")
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


# --- command line ------------------------------------------------------------------------------------
def _parse_parts(text: str) -> list[str]:
    names = {p.name: k for k, p in PARTS.items()}
    chosen = []
    for item in (t.strip() for t in text.split(",")):
        key = names.get(item, item)
        if key not in PARTS:
            raise argparse.ArgumentTypeError(
                f"unknown part {item!r}; parts are " + ", ".join(f"{k} ({p.name})" for k, p in PARTS.items()))
        if key not in chosen:
            chosen.append(key)
    return chosen


def _parse_budgets(text: str) -> dict[str, float]:
    budgets = {}
    for item in (t.strip() for t in text.split(",")):
        key, _, seconds = item.partition("=")
        key = {p.name: k for k, p in PARTS.items()}.get(key, key)
        try:
            value = float(seconds)
        except ValueError:
            value = float("nan")
        if key not in PARTS or not value > 0:
            raise argparse.ArgumentTypeError(f"{item!r} is not PART=SECONDS with a part of {','.join(PARTS)} and "
                                             "a positive number of seconds")
        budgets[key] = value
    return budgets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, float32: the same code paths in seconds")
    p.add_argument("--parts", type=_parse_parts, default=list(RUN_ORDER),
                   help="comma-separated parts to run in that order, by letter or name (default: all, as "
                        + ",".join(RUN_ORDER) + ")")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run (default: 445 on a GPU, 240 for a dry run)")
    p.add_argument("--budget", type=_parse_budgets, default={},
                   help="seconds for some parts instead of their defaults, e.g. c=300,e=60 (still capped by --time-limit)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-json", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def _fail(message: str) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return 2


def _check_output(path: Path) -> str | None:
    """Why ``path`` cannot take the report, or ``None`` when it can (it is created if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gpu_check_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"--output {path}: cannot write there ({err.strerror or err})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(Profile.from_json(args.profile_json), args.parts, args.deadline)
    if args.output is None:
        return _fail("--output DIR is required (the folder for the JSON and Markdown reports)")
    problem = _check_output(args.output)
    if problem:
        return _fail(problem)
    profile = PROFILES["dry-run" if args.dry_run else "gpu"]
    if args.time_limit is not None:
        if not args.time_limit > 0:
            return _fail(f"--time-limit {args.time_limit} must be a positive number of seconds")
        profile = dataclasses.replace(profile, time_limit_s=args.time_limit)
    if args.budget:
        profile = dataclasses.replace(profile, budgets_s={**profile.budgets_s, **args.budget})
    for module in ("torch", "diffusers", "transformers", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return _fail(f"{module} is not installed for {sys.executable}; the wheels to bring and how to install "
                         "them are in the docstring of scripts/gpu_check.py")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            return _fail(f"no CUDA device is visible to torch {torch.__version__} (CUDA build: "
                         f"{torch.version.cuda or 'none'}); run on a GPU host, or pass --dry-run for the CPU check")
    argv_text = sys.argv[1:] if argv is None else argv
    command = "python scripts/gpu_check.py " + " ".join(shlex.quote(a) for a in argv_text)
    return run_check(profile, args.parts, args.output, command)


if __name__ == "__main__":
    sys.exit(main())
