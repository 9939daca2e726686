#!/usr/bin/env python
"""Tiled refinement vs direct full-attention generation: cost of one denoising step.

For target areas of 1x, 4x, 9x (16x) the native size, the script times one
denoising step two ways, each in a fresh process so peak memory is per row:

* ``direct``: the plain Diffusers ``WanPipeline`` at the target size (full
  attention over every token of the canvas; its own CFG and scheduler step).
* ``tiled``: SuperGen's ``TiledSampler`` on the same transformer: native-size
  tiles (grid shifted every step, no overlap by default), CFG batched, tile
  outputs blended into the canvas, the same scheduler stepping the canvas.

Only the denoising loop is timed (model calls, blending, scheduler step), not
the sketch, prompt encoding or decoding: the first ``--warmup`` steps are run
and discarded, then the median of ``--repeats`` steps is reported.

It then prints the same comparison predicted from FLOPs for the real
Wan2.1-T2V-1.3B and 14B transformers at 720p -> 2K -> 4K, counted by
``torch.utils.flop_counter`` on the real Diffusers class built on the meta
device (no weights, no memory).

    python scripts/bench_tiling.py                 # mid-size model on CPU (about 10 min on 2 shared cores)
    python scripts/bench_tiling.py --quick         # smoke test on the built-in tiny model
    python scripts/bench_tiling.py --model wan2.1-1.3b --device cuda --dtype bfloat16 --areas 1,4,9

The mid-size model (the default) is a real ``WanTransformer3DModel`` with
random weights, small enough that 16x its native size runs in minutes on a
CPU. Self-attention is 52% of its native-size step (FLOPs), as in Wan2.1-14B at
480p and less than in Wan2.1-1.3B (70% at 480p, 84% at 720p) or 14B at 720p
(72%): the real models gain more from tiling than this stand-in shows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run from a checkout, the script benchmarks that checkout's code rather than
# whatever copy of supergen happens to be installed.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from supergen.models import REAL_CONFIGS  # noqa: E402

logger = logging.getLogger("bench_tiling")

# Every Wan text encoder pads prompts to 512 tokens, so cross-attention always sees 512 keys.
TEXT_TOKENS = 512
GUIDANCE_SCALE = 5.0
RESULT_TAG = "BENCH_ROW "

_WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


@dataclass(frozen=True)
class BenchModel:
    """A transformer configuration to benchmark and the size it was made for.

    ``transformer`` holds ``WanTransformer3DModel`` keyword arguments; ``None``
    means the built-in tiny pipeline (``SuperGenPipeline.from_pretrained("tiny")``).
    ``native`` is (height, width, frames) in pixels.
    """

    name: str
    native: tuple[int, int, int]
    transformer: dict | None
    note: str


MODELS: dict[str, BenchModel] = {
    "tiny": BenchModel("tiny", (64, 96, 9), None, "built-in tiny Wan (smoke test only: 72 tokens, overheads dominate)"),
    "mid": BenchModel(
        "mid",
        (256, 480, 13),
        dict(_WAN_COMMON, num_attention_heads=2, attention_head_dim=64, ffn_dim=768, num_layers=2, text_dim=256),
        "2 layers, dim 128 (2 heads x 64), ffn 768; native 256x480x13 = latent 4x32x60 = 1920 tokens",
    ),
    # The released configuration, shared with supergen.models.build_random_pipeline.
    "wan2.1-1.3b": BenchModel(
        "wan2.1-1.3b",
        REAL_CONFIGS["wan2.1-1.3b"]["native"],
        dict(REAL_CONFIGS["wan2.1-1.3b"]["transformer"]),
        "Wan2.1-T2V-1.3B: 30 layers, dim 1536, 12 heads, ffn 8960",
    ),
    "wan2.1-14b": BenchModel(
        "wan2.1-14b",
        (720, 1280, 81),
        dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096),
        "Wan2.1-T2V-14B: 40 layers, dim 5120, 40 heads, ffn 13824",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RowSpec:
    """One measured row: a model, a mode and a target size (k times the native height and width)."""

    model: str
    mode: str
    scale: int
    warmup: int = 1
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    overlap: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is not one of {', '.join(MODELS)}")
        if self.mode not in ("direct", "tiled"):
            raise ValueError(f"mode={self.mode!r} must be direct or tiled")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name, low in (("scale", 1), ("warmup", 1), ("repeats", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                # The first step is never timed: it includes the pipeline's set-up and first-call costs.
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} must be >= 1")
        if self.overlap < 0:
            raise ValueError(f"overlap={self.overlap!r} must be >= 0 pixels")

    @property
    def size(self) -> tuple[int, int, int]:
        """Target (height, width, frames) in pixels."""
        h, w, f = MODELS[self.model].native
        return self.scale * h, self.scale * w, f


@dataclass
class RowResult:
    """What one row measured; ``error`` is set instead of times when the row failed."""

    spec: RowSpec
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    base_bytes: int = 0
    tiles: int = 0
    grid: tuple[int, int, int] = (1, 1, 1)
    latent: tuple[int, int, int] = (0, 0, 0)
    tokens: int = 0
    error: str | None = None

    @property
    def median_s(self) -> float:
        """Median wall-clock seconds per step."""
        return statistics.median(self.step_s)

    @property
    def median_cpu_s(self) -> float:
        """Median process CPU seconds per step (all threads of the process)."""
        return statistics.median(self.step_cpu_s)

    def seconds(self, clock: str) -> float:
        return self.median_cpu_s if clock == "cpu" else self.median_s

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.step_s)


# --- building the model -----------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(model: BenchModel, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``WanPipeline`` around the benchmark transformer, random weights, on ``device``.

    Weights are initialised directly on the device in ``dtype``, so a 14B
    model never needs a float32 copy in host memory. The pipeline gets no text
    encoder (prompt embeddings are passed in) and a small real
    ``AutoencoderKLWan`` that only supplies the VAE factors (4, 8): latents are
    never decoded here.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    if model.transformer is None:
        from supergen import SuperGenPipeline

        return SuperGenPipeline.from_pretrained("tiny", torch_dtype=dtype, device=device).pipe
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        transformer = WanTransformer3DModel(**model.transformer).eval()
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    return pipe.to(device)


def prompt_embeddings(text_dim: int, device, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive and negative prompt embeddings of the length every Wan prompt is padded to."""
    generator = torch.Generator("cpu").manual_seed(seed)
    pos, neg = torch.randn(2, 1, TEXT_TOKENS, text_dim, generator=generator).unbind(0)
    return pos.to(device, dtype), neg.to(device, dtype)


# --- measuring one row ----------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wraps a scheduler and records when each ``step`` returns; everything else is delegated."""

    def __init__(self, scheduler, device: torch.device):
        self._scheduler = scheduler
        self._device = device
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def step(self, *args, **kwargs):
        out = self._scheduler.step(*args, **kwargs)
        self.tick()
        return out

    def tick(self) -> None:
        _sync(self._device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def step_seconds(self) -> list[float]:
        """Wall-clock seconds between consecutive ticks."""
        return [b - a for a, b in zip(self.ends, self.ends[1:])]

    def step_cpu_seconds(self) -> list[float]:
        """Process CPU seconds between consecutive ticks."""
        return [b - a for a, b in zip(self.cpu_ends, self.cpu_ends[1:])]

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_mark(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return _rss_bytes()


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss (KiB on Linux) is the whole process's peak: rows run in fresh processes for this reason.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_direct_steps(pipe, height: int, width: int, frames: int, steps: int,
                     guidance_scale: float = GUIDANCE_SCALE, seed: int = 0) -> StepClock:
    """``steps`` denoising steps of the plain Diffusers pipeline at the full size; returns the step clock.

    Random prompt embeddings of the padded length; latents only (no decode).
    The clock's first tick is taken just before the call, so step 0 includes
    the pipeline's own set-up (prompt checks, noise, timesteps).
    """
    device = pipe._execution_device
    pos, neg = prompt_embeddings(pipe.transformer.config.text_dim, device, pipe.transformer.dtype, seed)
    clock = StepClock(pipe.scheduler, device)
    clock.tick()
    with torch.no_grad():
        pipe(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            callback_on_step_end=lambda *_: clock.tick() or {},
        )
    return clock


def run_tiled_steps(sg, planner, steps: int, guidance_scale: float = GUIDANCE_SCALE, seed: int = 0) -> StepClock:
    """``steps`` steps of SuperGen's ``TiledSampler`` over ``planner``'s canvas from noise; returns the step clock.

    The clock's first tick is taken just before the loop.
    """
    from supergen.backbones.base import Conditioning
    from supergen.samplers.schedule import fresh_scheduler, refinement_timesteps
    from supergen.samplers.tiled import TiledSampler

    adapter = sg.adapter
    pos, neg = prompt_embeddings(sg.pipe.transformer.config.text_dim, adapter.device, adapter.dtype, seed)
    cond = Conditioning(prompt="", positive=pos, negative=neg)
    sampler = TiledSampler(adapter=adapter, cond=cond, planner=planner, guidance_scale=guidance_scale, progress=False)
    scheduler = fresh_scheduler(adapter.scheduler)
    timesteps, _ = refinement_timesteps(scheduler, steps, 1.0, device=adapter.device)
    latents = adapter.prepare_noise(planner.canvas, torch.Generator("cpu").manual_seed(seed))
    clock = StepClock(scheduler, adapter.device)
    clock.tick()
    with torch.no_grad():
        sampler(latents, clock, timesteps)
    return clock


def measure_row(spec: RowSpec) -> RowResult:
    """Build the model and time ``warmup + repeats`` denoising steps of one row (in this process)."""
    from supergen import SuperGenPipeline, TilingConfig

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    model = MODELS[spec.model]
    pipe = build_pipeline(model, device, dtype, spec.seed)
    pipe.set_progress_bar_config(disable=True)
    sg = SuperGenPipeline.from_pipe(pipe, native_size=model.native)
    height, width, frames = spec.size
    planner = sg.plan(height, width, frames, TilingConfig(overlap=spec.overlap))
    steps = spec.warmup + spec.repeats
    result = RowResult(
        spec=spec,
        latent=tuple(planner.canvas),
        tokens=sg.adapter.tokens(tuple(planner.canvas)),
        tiles=planner.num_tiles if spec.mode == "tiled" else 1,
        grid=tuple(planner.grid) if spec.mode == "tiled" else (1, 1, 1),
    )
    result.base_bytes = _memory_mark(device)
    if spec.mode == "direct":
        clock = run_direct_steps(pipe, height, width, frames, steps, seed=spec.seed)
    else:
        clock = run_tiled_steps(sg, planner, steps, seed=spec.seed)
    result.peak_bytes = _memory_peak(device)
    # The tick before the first step plus one per step.
    if len(clock.ends) != steps + 1:
        raise RuntimeError(f"expected {steps} step ends, recorded {len(clock.ends) - 1}")
    result.step_s = clock.step_seconds()[spec.warmup :]
    result.step_cpu_s = clock.step_cpu_seconds()[spec.warmup :]
    return result


def run_row_isolated(spec: RowSpec, timeout_s: float) -> RowResult:
    """:func:`measure_row` in a fresh Python process (clean peak memory); failures become ``error``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=_REPO)
    except subprocess.TimeoutExpired:
        return RowResult(spec=spec, error=f"timed out after {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            data = json.loads(line[len(RESULT_TAG) :])
            data["spec"] = spec
            for key in ("grid", "latent"):
                data[key] = tuple(data[key])
            return RowResult(**data)
    if proc.returncode < 0:
        error = f"killed by signal {-proc.returncode} (out of memory?)"
    else:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        error = f"exit code {proc.returncode}: {last}"
    return RowResult(spec=spec, error=error)


def _worker(payload: str) -> None:
    result = measure_row(RowSpec(**json.loads(payload)))
    out = asdict(result)
    out.pop("spec")
    print(RESULT_TAG + json.dumps(out), flush=True)


# --- FLOPs ----------------------------------------------------------------------------
def native_latent(model: BenchModel, native: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Latent (F, H, W) of a Wan video of ``native`` (default: the model's native) pixel size (VAE 4x8x8)."""
    h, w, f = native or model.native
    return (f - 1) // 4 + 1, h // 8, w // 8


def count_flops(transformer_kwargs: dict, latent: tuple[int, int, int], text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one transformer forward (batch 1) on a latent (F, H, W), by kind.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` while the real
    ``WanTransformer3DModel`` runs on the meta device. Returns ``self_attn``
    (the attention products of ``attn1``: quadratic in tokens), ``cross_attn``
    (those of ``attn2`` against ``text_tokens`` keys), ``linear`` (every
    projection, FFN and patch embedding) and ``total``.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    with init_empty_weights(include_buffers=True):
        model = WanTransformer3DModel(**transformer_kwargs)
    meta = torch.device("meta")
    x = torch.empty(1, model.config.in_channels, *latent, device=meta)
    t = torch.empty(1, device=meta)
    text = torch.empty(1, text_tokens, model.config.text_dim, device=meta)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
    total = counter.get_total_flops()
    projections = {"aten.mm", "aten.addmm", "aten.convolution", "aten.linear"}
    self_attn = cross_attn = 0
    # Attention products are the non-projection ops counted inside each attention module itself
    # (the module's own entry minus its child projections' entries).
    for name, ops in counter.get_flop_counts().items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in ("attn1", "attn2"):
            continue
        products = sum(v for op, v in ops.items() if str(op) not in projections)
        if kind == "attn1":
            self_attn += products
        else:
            cross_attn += products
    return {"self_attn": self_attn, "cross_attn": cross_attn, "linear": total - self_attn - cross_attn, "total": total}


@functools.lru_cache(maxsize=None)
def model_flops(model_name: str, latent: tuple[int, int, int]) -> dict:
    """:func:`count_flops` of a benchmark model, remembered (each count builds the model on meta)."""
    return count_flops(MODELS[model_name].transformer, latent)


@dataclass(frozen=True)
class FlopsRow:
    """Predicted cost of one denoising step (CFG: two forwards) at one target size."""

    model: str
    label: str
    height: int
    width: int
    latent: tuple[int, int, int]
    tokens: int
    overlap: int
    grid: tuple[int, int, int]
    direct: dict
    tile: dict

    @property
    def tiles(self) -> int:
        return math.prod(self.grid)

    @property
    def direct_step(self) -> float:
        return 2 * self.direct["total"]

    @property
    def tiled_step(self) -> float:
        return 2 * self.tiles * self.tile["total"]

    def run_ratio(self, steps: int, strength: float) -> float:
        """Direct / SuperGen FLOPs of a whole run: native sketch of ``steps`` + ``strength`` of them tiled."""
        refine = min(max(round(steps * strength), 1), steps)
        supergen = steps * 2 * self.tile["total"] + refine * self.tiled_step
        return steps * self.direct_step / supergen


def predicted_rows(
    model_name: str,
    native: tuple[int, int, int],
    targets: list[tuple[str, int, int]],
    overlaps: list[int],
) -> list[FlopsRow]:
    """FLOPs rows for ``targets`` (label, height, width) tiled with native-size tiles at each overlap (pixels)."""
    from supergen.tiling import TilePlanner

    model = MODELS[model_name]
    patch = tuple(model.transformer["patch_size"])
    tile = native_latent(model, native)
    rows = []
    for label, height, width in targets:
        latent = (tile[0], height // 8, width // 8)
        tokens = math.prod(c // p for c, p in zip(latent, patch))
        for overlap in overlaps if latent != tile else [0]:
            cells = math.ceil(math.ceil(overlap / 8) / patch[1]) * patch[1]
            planner = TilePlanner(latent, tile, overlap=(0, cells, cells), align=patch, shift="wrap")
            rows.append(
                FlopsRow(
                    model_name, label, height, width, latent, tokens, overlap, planner.grid,
                    model_flops(model_name, latent), model_flops(model_name, tile),
                )  # fmt: skip
            )
    return rows


# --- tables ------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def measured_table(
    results: list[RowResult], clock: str = "wall", predicted: dict[tuple[str, int], float] | None = None
) -> str:
    """Markdown table of measured rows, one line per area with direct and tiled side by side.

    ``clock`` picks wall-clock or process CPU seconds; ``predicted`` maps
    (mode, scale) to the FLOPs-predicted cost relative to 1x, shown beside the
    measured ratio.
    """
    by_key = {(r.spec.mode, r.spec.scale): r for r in results}
    unit = "CPU s/step" if clock == "cpu" else "s/step"
    header = [
        "area", "size (HxWxF px)", "tokens", "tiles",
        f"direct {unit}", "direct peak MiB", "direct vs 1x",
        f"tiled {unit}", "tiled peak MiB", "tiled vs 1x", "tiled vs 1x / area", "direct / tiled",
    ]  # fmt: skip
    rows = []
    for scale in sorted({r.spec.scale for r in results}):
        area = scale * scale
        first = by_key.get(("tiled", scale)) or by_key.get(("direct", scale))
        tiled = by_key.get(("tiled", scale))
        h, w, f = first.spec.size
        cells = [f"{area}x", f"{h}x{w}x{f}", f"{first.tokens:,}" if first.ok else "-", str(tiled.tiles) if tiled and tiled.ok else "-"]
        seconds = {}
        for mode in ("direct", "tiled"):
            r, base = by_key.get((mode, scale)), by_key.get((mode, 1))
            if r is None or not r.ok:
                cells += ["-" if r is None else r.error, "-", "-"] + (["-"] if mode == "tiled" else [])
                continue
            seconds[mode] = r.seconds(clock)
            ratio = seconds[mode] / base.seconds(clock) if base is not None and base.ok else float("nan")
            pred = (predicted or {}).get((mode, scale))
            cells += [f"{seconds[mode]:.3f}", _mib(r.peak_bytes), f"{ratio:.2f}x" + (f" (FLOPs {pred:.2f}x)" if pred else "")]
            if mode == "tiled":
                cells.append(f"{ratio / area:.2f}")
        cells.append(f"{seconds['direct'] / seconds['tiled']:.2f}x" if len(seconds) == 2 else "-")
        rows.append(cells)
    return _table(header, rows)


def goal_lines(results: list[RowResult], clock: str = "wall") -> list[str]:
    """The issue's goals, checked against the measured rows."""
    by_key = {(r.spec.mode, r.spec.scale): r.seconds(clock) for r in results if r.ok}
    lines = []
    tiled1, direct1 = by_key.get(("tiled", 1)), by_key.get(("direct", 1))
    for scale in sorted({s for _, s in by_key if s > 1}):
        area = scale * scale
        tiled, direct = by_key.get(("tiled", scale)), by_key.get(("direct", scale))
        if tiled and tiled1:
            growth = tiled / tiled1
            verdict = "yes" if growth <= 1.3 * area else "NO"
            lines.append(f"{area}x: tiled step grows {growth:.2f}x for {area}x the area (goal <= {1.3 * area:.1f}x): {verdict}")
            if direct and direct1:
                d_growth = direct / direct1
                verdict = "yes" if d_growth > growth else "NO"
                lines.append(f"{area}x: direct step grows {d_growth:.2f}x (goal: faster than tiled): {verdict}")
        if scale == 3 and direct and tiled:
            verdict = "yes" if direct / tiled >= 3 else "NO"
            lines.append(f"9x: tiled step {direct / tiled:.2f}x faster than direct (goal >= 3x): {verdict}")
    return lines


def flops_table(rows: list[FlopsRow], steps: int, strength: float) -> str:
    """Markdown table of FLOPs-predicted direct vs tiled steps."""
    header = [
        "model", "target", "latent FxHxW", "tokens", "overlap px", "tiles",
        "direct TFLOP/step", "self-attn share", "tiled TFLOP/step", "direct / tiled",
        f"run: direct / SuperGen ({steps} steps, {round(steps * strength)} tiled)",
    ]  # fmt: skip
    body = []
    for r in rows:
        share = r.direct["self_attn"] / r.direct["total"]
        body.append(
            [
                r.model, f"{r.label} {r.height}x{r.width}", "x".join(map(str, r.latent)), f"{r.tokens:,}",
                str(r.overlap), f"{r.tiles} ({r.grid[1]}x{r.grid[2]})",
                f"{r.direct_step / 1e12:,.0f}", f"{share:.0%}", f"{r.tiled_step / 1e12:,.0f}",
                f"{r.direct_step / r.tiled_step:.2f}x", f"{r.run_ratio(steps, strength):.2f}x",
            ]  # fmt: skip
        )
    return _table(header, body)


def save_plot(
    results: list[RowResult], clock: str, predicted: dict[tuple[str, int], float] | None, path: Path, title: str
) -> None:
    """Log-log plot of seconds per step against area, measured and (dashed) FLOPs-predicted from the 1x row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("direct", "o"), ("tiled", "s")):
        rows = sorted((r for r in results if r.ok and r.spec.mode == mode), key=lambda r: r.spec.scale)
        if not rows:
            continue
        areas = [r.spec.scale**2 for r in rows]
        line = ax.plot(areas, [r.seconds(clock) for r in rows], marker=marker, label=f"{mode}, measured")[0]
        if predicted and rows[0].spec.scale == 1:
            base = rows[0].seconds(clock)
            ax.plot(areas, [base * predicted[(mode, r.spec.scale)] for r in rows], linestyle="--", color=line.get_color(),
                    label=f"{mode}, FLOPs from 1x")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r.spec.scale**2 for r in results})
    ax.set_xticks(ticks, [f"{a}x" for a in ticks])
    ax.set_xlabel("target area / native area")
    ax.set_ylabel("CPU seconds per step" if clock == "cpu" else "seconds per step")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------
BACKBONE_PROMPT = "a red circle moving left over a blue sky"


def measure_backbone(name: str, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
                     scale: int = 2) -> dict:
    """Seconds per tiled refinement step at ``scale`` x the native height and width, for any backbone.

    ``name`` is a built-in tiny model (``tiny-cogvideox``...) or a real configuration of
    :data:`supergen.models.REAL_CONFIGS` (random weights built on ``device``; meant for a GPU).
    The step goes through the backbone's own adapter: prompt encoding, scheduler, CFG, layout.
    """
    from supergen import SuperGenPipeline, TilingConfig
    from supergen.models import REAL_CONFIGS, build_random_pipeline
    from supergen.samplers.schedule import refinement_timesteps
    from supergen.samplers.tiled import TiledSampler

    if name in REAL_CONFIGS:
        sg = SuperGenPipeline.from_pipe(build_random_pipeline(name, device, dtype), native_size=REAL_CONFIGS[name]["native"])
    else:
        sg = SuperGenPipeline.from_pretrained(name, torch_dtype=dtype, device=device)
    adapter = sg.adapter
    height, width, frames = adapter.native_height, adapter.native_width, adapter.native_num_frames
    planner = sg.plan(scale * height, scale * width, frames, TilingConfig())
    generator = torch.Generator("cpu").manual_seed(0)
    steps = warmup + repeats
    with torch.no_grad():
        cond = adapter.encode_prompt(BACKBONE_PROMPT, None, GUIDANCE_SCALE)
        scheduler = adapter.make_scheduler(planner.tile, generator)
        timesteps, _ = refinement_timesteps(scheduler, steps, 1.0, device=device)
        latents = adapter.prepare_noise(planner.canvas, generator)
        clock = StepClock(scheduler, device)
        sampler = TiledSampler(adapter=adapter, cond=cond, planner=planner, guidance_scale=GUIDANCE_SCALE,
                               progress=False)
        sampler(latents, clock, timesteps)
    step_s = clock.step_seconds()[warmup - 1 :]
    return {
        "backbone": name,
        "pipeline": type(sg.pipe).__name__,
        "native": f"{height}x{width}x{frames}",
        "target": f"{scale * height}x{scale * width}x{frames}",
        "latent": "x".join(map(str, planner.canvas)),
        "tiles": planner.num_tiles,
        "tokens_per_tile": adapter.tokens(tuple(planner.tile)),
        "tiled_s_per_step": statistics.median(step_s),
    }


def _parse_areas(text: str) -> list[int]:
    scales = []
    for part in text.split(","):
        area = int(part)
        scale = math.isqrt(area)
        if area < 1 or scale * scale != area:
            raise argparse.ArgumentTypeError(
                f"area {part} is not a square (1, 4, 9, 16...): native-size tiles cover k x k native areas"
            )
        scales.append(scale)
    if 1 not in scales:
        raise argparse.ArgumentTypeError("areas must include 1: the native size is the baseline of every ratio")
    return sorted(set(scales))


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} CPUs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, areas 1,4, one timed step")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="benchmark model (default mid; tiny with --quick)")
    p.add_argument("--areas", type=_parse_areas, default=None, help="target areas, squares (default 1,4,9,16)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported")
    p.add_argument("--overlap", type=int, default=0, help="tile overlap in pixels for the tiled rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per row (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="seconds reported: wall clock, or process CPU time (CPU only; steadier on a shared machine with --threads 1)",
    )
    p.add_argument("--row-timeout", type=float, default=900.0, help="seconds before a row is given up")
    p.add_argument("--skip-measure", action="store_true", help="print only the FLOPs tables")
    p.add_argument("--flops-steps", type=int, default=50, help="steps of a whole run in the FLOPs table")
    p.add_argument("--flops-strength", type=float, default=0.9, help="refined fraction of a run in the FLOPs table")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="save a plot of step cost vs area (needs matplotlib)")
    p.add_argument(
        "--backbones",
        default=None,
        help="comma-separated backbones for the per-backbone table instead of the area table: built-in tiny "
        "models (tiny-wan,tiny-cogvideox,tiny-hunyuanvideo,tiny-ltx) or real configurations on a GPU "
        "(wan2.1-1.3b,cogvideox-5b,hunyuanvideo,ltx-video)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    model_name = args.model or ("tiny" if args.quick else "mid")
    scales = args.areas or ([1, 2] if args.quick else [1, 2, 3, 4])
    repeats = 1 if args.quick else args.repeats
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            raise SystemExit(f"{flag} {path}: directory {path.parent} does not exist")
    if args.plot is not None and args.skip_measure:
        raise SystemExit("--plot draws the measured rows; it cannot be combined with --skip-measure")
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time; it means nothing for GPU work: use --clock wall")
    if not 0 < args.flops_strength <= 1:
        raise SystemExit(f"--flops-strength {args.flops_strength} must be in (0, 1]")
    if args.flops_steps < 1 or args.row_timeout <= 0:
        raise SystemExit(f"--flops-steps {args.flops_steps} must be >= 1 and --row-timeout {args.row_timeout} > 0")
    try:
        specs = [
            RowSpec(model=model_name, mode=mode, scale=scale, warmup=args.warmup, repeats=repeats,
                    device=str(device), dtype=dtype, threads=args.threads, overlap=args.overlap)
            for scale in scales
            for mode in ("tiled", "direct")
        ]  # fmt: skip
    except ValueError as err:
        raise SystemExit(f"bad benchmark setting: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_tiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": _hardware(device),
        "torch": torch.__version__,
    }
    print(f"# bench_tiling  {report['date']}\n{report['command']}\nhardware: {report['hardware']}, torch {torch.__version__}")

    if args.backbones:
        names = [n.strip() for n in args.backbones.split(",") if n.strip()]
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        print(f"\n## One tiled refinement step at 2x the native height and width, per backbone ({device} {dtype}, "
              f"warm-up {args.warmup}, median of {repeats})")
        rows = []
        for name in names:
            logger.info("backbone %s...", name)
            rows.append(measure_backbone(name, device, DTYPES[dtype], args.warmup, repeats))
        keys = ["backbone", "pipeline", "native", "target", "latent", "tiles", "tokens_per_tile", "tiled_s_per_step"]
        print(_table(keys, [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]))
        report["backbones"] = rows
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        return 0

    if not args.skip_measure:
        model = MODELS[model_name]
        print(f"\n## Measured: {model_name} ({model.note}), {device} {dtype}, threads {args.threads or torch.get_num_threads()}")
        print(f"warm-up {args.warmup} step(s), median of {repeats}; tiles overlap {args.overlap} px, grid shifted every step")
        load_start = os.getloadavg()
        results = []
        for spec in specs:
            h, w, f = spec.size
            logger.info("%s %dx area (%dx%dx%d) in a fresh process...", spec.mode, spec.scale**2, h, w, f)
            started = time.perf_counter()
            result = run_row_isolated(spec, args.row_timeout)
            if result.ok:
                logger.info("  %.3f s/step (%d tiles), %.1f s with start-up", result.median_s, result.tiles, time.perf_counter() - started)
            else:
                logger.info("  failed: %s", result.error)
            results.append(result)
        predicted = None
        if model.transformer is not None:
            native = model_flops(model_name, native_latent(model))
            predicted = {
                (r.spec.mode, r.spec.scale): (
                    model_flops(model_name, r.latent)["total"] if r.spec.mode == "direct" else r.tiles * native["total"]
                )
                / native["total"]
                for r in results
                if r.ok
            }
            print(f"self-attention share of a native-size step's FLOPs: {native['self_attn'] / native['total']:.0%}")
        print(f"load average (1 min) {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
        print(measured_table(results, args.clock, predicted))
        if args.clock == "cpu":
            walls = ", ".join(f"{r.spec.mode} {r.spec.scale**2}x {r.median_s:.3f}" for r in results if r.ok)
            print(f"\nwall-clock s/step, for reference: {walls}")
        print()
        for line in goal_lines(results, args.clock):
            print(line)
        if args.plot is not None:
            save_plot(results, args.clock, predicted, args.plot, title=f"{model_name} on {report['hardware']}")
            logger.info("plot written to %s", args.plot)
        report["measured"] = {
            "model": model_name,
            "note": model.note,
            "device": str(device),
            "dtype": dtype,
            "rows": [
                {**asdict(r.spec), "median_s": r.median_s if r.ok else None, **{k: v for k, v in asdict(r).items() if k != "spec"}}
                for r in results
            ],
        }

    print("\n## Predicted from FLOPs: Wan2.1 at 720p tiles (21x90x160 latent), CFG = 2 forwards per step")
    targets = [("720p", 720, 1280), ("2K", 1440, 2560), ("4K", 2160, 3840)]
    flops_rows = []
    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        flops_rows += predicted_rows(name, (720, 1280, 81), targets, overlaps=[0, 128])
    print(flops_table(flops_rows, args.flops_steps, args.flops_strength))
    report["predicted"] = [
        {**asdict(r), "tiles": r.tiles, "direct_step_flops": r.direct_step, "tiled_step_flops": r.tiled_step,
         "run_ratio": r.run_ratio(args.flops_steps, args.flops_strength)}
        for r in flops_rows
    ]  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
