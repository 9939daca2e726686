"""Benchmark the region-aware step cache on the trained toy model against Diffusers' caches.

Parts (each one a separate ``--part`` so that one process runs at a time and
every part's rows are saved as soon as they are measured):

* ``untiled``: the native size (one tile). SuperGen's cache on the plain run
  (``strength=1``, one tile: the same video as the plain ``WanPipeline``)
  against Diffusers 0.42's hooks on the plain ``WanPipeline``:
  FirstBlockCache, TaylorSeer, MagCache (calibrated on a prompt outside the
  benchmark set), SeaCache, FasterCache, PyramidAttentionBroadcast. Both
  sides run the CFG branches as two calls, as the plain pipeline does.
* ``tiled``: 2x2 (64x64) or 3x3 (96x96) tiles, native-size sketch, up-scale,
  re-noise to ``--strength``, grid shifted every step (``--shift``); the
  region cache (per-tile decisions) against the same predictor with one
  whole-canvas decision, over thresholds and reuse modes.

Every row reports transformer-block compute actually run (hooks on leaf
modules inside every block count each executed block per batch item, so a
cache that skips inside a block is counted as what it runs; tiled rows count
the refinement, the sketch is the same uncached run in every row), the
fraction of tile-steps (untiled: steps) reused, the PSNR of the decoded
uint8 frames against the same method's uncached run of the same prompt and
seed (mean and minimum over the prompts), and the fidelity measures of the
tiled-path benchmark: objects per frame (:func:`supergen.metrics.object_counts`)
and prompt adherence (:func:`supergen.metrics.mean_adherence`). For the
region rows it also reports how much of the subject's regions and of the
background's regions was reused (subject: regions where the uncached video
shows the prompt's colour in any frame).

    python scripts/bench_cache.py --part untiled --out bench/untiled.json
    python scripts/bench_cache.py --part tiled --size 96 --strength 0.9 --out bench/t96.json
    python scripts/bench_cache.py --render bench/*.json        # markdown tables
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supergen import CacheConfig, SuperGenPipeline, TilingConfig  # noqa: E402
from supergen.io import to_uint8  # noqa: E402
from supergen.metrics import COLOUR_TOLERANCE, mean_adherence, object_counts, psnr  # noqa: E402
from supergen.toyworld import COLOURS, all_prompts, parse_prompt  # noqa: E402

DIFFUSERS = ["FirstBlockCache", "TaylorSeer", "MagCache (calibrated)", "SeaCache", "FasterCache",
             "PyramidAttentionBroadcast"]


@dataclass
class Row:
    part: str
    method: str
    setting: str
    blocks: int = 0
    base_blocks: int = 0
    attn: int = 0
    base_attn: int = 0
    sketch_blocks: int = 0
    base_sketch_blocks: int = 0
    reused: float = 0.0
    psnr: list[float] = field(default_factory=list)
    psnr_same_grid: list[float] = field(default_factory=list)
    objects: float = 0.0
    adherence: float = 0.0
    subject_reuse: float | None = None
    background_reuse: float | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def saved(self) -> float:
        """Fraction of the uncached run's block compute not run."""
        return 1.0 - self.blocks / max(self.base_blocks, 1)

    @property
    def psnr_mean(self) -> float:
        return mean_psnr(self.psnr)

    @property
    def psnr_same_grid_mean(self) -> float:
        return mean_psnr(self.psnr_same_grid)


def mean_psnr(values: list[float]) -> float:
    """PSNR of the mean MSE over prompts (a prompt whose cached run is bit-identical adds no error)."""
    if not values:
        return math.nan
    mse = np.mean([10 ** (-p / 10) if math.isfinite(p) else 0.0 for p in values])
    return math.inf if mse == 0 else -10 * math.log10(mse)


class Counter:
    """Counts transformer blocks really executed (per batch item), whatever cache hooks sit on top."""

    def __init__(self, transformer):
        self.blocks = self.attn = 0
        # Caches replace a block's (or its attention's / feed-forward's) forward without calling it, so a
        # hook on the block's last leaf module fires only when the block's work is really done; the same
        # holds for self-attention (what PyramidAttentionBroadcast and FasterCache skip inside a block).
        self._handles = [b.ffn.net[-1].register_forward_hook(self._block) for b in transformer.blocks]
        self._handles += [b.attn1.to_q.register_forward_hook(self._attn) for b in transformer.blocks]

    def _block(self, module, args, output):
        self.blocks += args[0].shape[0]

    def _attn(self, module, args, output):
        self.attn += args[0].shape[0]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def bench_prompts(count: int) -> tuple[list[str], str]:
    """``count`` toy-world prompts spread over the world (every colour, shape, direction), and one more
    (for calibration) that is not among them."""
    everything = all_prompts()
    stride = max(1, len(everything) // (count + 1))
    chosen = everything[::stride][: count + 1]
    return chosen[:count], chosen[count]


def subject_mask(frames: np.ndarray, prompt: str) -> np.ndarray:
    """Pixels (H, W) that show the prompt's colour in any frame."""
    rgb = np.asarray(COLOURS[parse_prompt(prompt).colour], dtype=np.float64)
    near = np.linalg.norm(frames.astype(np.float64) - rgb, axis=-1) < COLOUR_TOLERANCE
    return near.any(axis=0)


def region_split(metrics: dict, mask: np.ndarray) -> tuple[float, float]:
    """Mean reused fraction of the regions the subject covers and of the others (over all steps)."""
    maps = np.asarray(metrics["cache"]["region_skip_map"], dtype=np.float64)  # steps, Fr, Hr, Wr
    if maps.size == 0:
        return 0.0, 0.0
    _, _, hr, wr = maps.shape
    h, w = mask.shape
    cover = mask.reshape(hr, h // hr, wr, w // wr).mean(axis=(1, 3))
    subject = cover > 0.05
    per_region = maps.mean(axis=(0, 1))
    sub = float(per_region[subject].mean()) if subject.any() else math.nan
    back = float(per_region[~subject].mean()) if (~subject).any() else math.nan
    return sub, back


def fidelity(row: Row, videos: list[np.ndarray], prompts: list[str]) -> None:
    row.objects = float(np.mean([object_counts(v).mean() for v in videos]))
    row.adherence = mean_adherence(videos, prompts)["score"]


# --- untiled -------------------------------------------------------------------------------------

@contextlib.contextmanager
def diffusers_cache(transformer, config):
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


def calibrate_magcache(pipe, run, steps: int) -> list[float]:
    """MagCache's own calibration run (no skipping) on ``run``; returns the ratios averaged over the CFG branches."""
    from diffusers import MagCacheConfig

    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            if "Calibration Results" in record.getMessage():
                records.append(record.getMessage())

    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = Grab(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(sys.stderr), diffusers_cache(
            pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps)
        ):
            run()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    ratios = [json.loads(r.split(":", 1)[1].strip()) for r in records]
    return [float(np.mean(vals)) for vals in zip(*ratios)]


def untiled(sg: SuperGenPipeline, prompts: list[str], spare: str, steps: int,
            methods: list[str] | None = None) -> list[Row]:
    """Rows of the untiled part; ``methods``: only the rows whose method starts with one of these (the
    uncached rows always run)."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    pipe = sg.pipe
    h, w, f = sg.adapter.native_height, sg.adapter.native_width, sg.adapter.native_num_frames
    guidance = sg.default_guidance_scale
    sg.adapter.batch_cfg = False  # two calls per step, like the plain pipeline
    pipe.set_progress_bar_config(disable=True)

    def plain(prompt):
        frames = pipe(prompt, height=h, width=w, num_frames=f, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
        return to_uint8(frames), None

    def ours(cache):
        def run(prompt):
            out = sg(prompt, height=h, width=w, num_frames=f, num_inference_steps=steps, guidance_scale=guidance,
                     seed=0, tiling=TilingConfig(strength=1.0), cache=cache, progress=False)
            return out.frames, out.metrics
        return run

    def hooked(config):
        def run(prompt):
            with diffusers_cache(pipe.transformer, config() if callable(config) else config):
                return plain(prompt)
        return run

    counter = Counter(pipe.transformer)
    refs = {p: plain(p)[0] for p in prompts}

    def measure(method, setting, fn):
        row = Row("untiled 32x32", method, setting)
        videos, reused = [], []
        start = time.perf_counter()
        try:
            for prompt in prompts:
                before, before_attn = counter.blocks, counter.attn
                frames, metrics = fn(prompt)
                row.blocks += counter.blocks - before
                row.attn += counter.attn - before_attn
                row.psnr.append(psnr(frames, refs[prompt]))
                videos.append(frames)
                if metrics is not None:
                    tiles = metrics["tiles"]
                    reused.append(tiles["tile_steps_skipped"] / tiles["tile_steps_total"])
        except Exception as err:  # a Diffusers cache that does not run on Wan: reported, not hidden
            row.error = f"{type(err).__name__}: {err}"[:160]
            print(f"  untiled {method} {setting}: FAILED {row.error}", file=sys.stderr, flush=True)
            return row
        row.seconds = time.perf_counter() - start
        row.reused = float(np.mean(reused)) if reused else math.nan
        fidelity(row, videos, prompts)
        print(f"  untiled {method} {setting}: blocks {row.blocks}, PSNR {row.psnr_mean:.2f}", file=sys.stderr, flush=True)
        return row

    base = measure("none (Diffusers)", "-", plain)
    rows = [base, measure("none (SuperGen)", "-", ours(None))]
    mag_ratios = calibrate_magcache(pipe, lambda: plain(spare), steps)
    runs = [("SuperGen cache (defaults)", "output, thr 0.3", ours(CacheConfig(mode="region", threshold=0.3)))]
    for t, ms, wu in ((0.1, 3, 3), (0.2, 3, 3), (0.5, 4, 3), (0.6, 6, 2), (1.0, 8, 2)):
        runs.append(("SuperGen cache", f"output, thr {t:g}, max skips {ms}, warm-up {wu}",
                     ours(CacheConfig(mode="region", threshold=t, max_skips=ms, warmup=wu, cooldown=1))))
    for t, ms, wu in ((0.1, 3, 3), (0.2, 5, 3), (0.25, 4, 3), (0.4, 5, 2), (0.6, 6, 2)):
        runs.append(("SuperGen cache", f"taylor, thr {t:g}, max skips {ms}, warm-up {wu}",
                     ours(CacheConfig(mode="region", reuse="taylor", threshold=t, max_skips=ms, warmup=wu,
                                      cooldown=1))))
    for t in (0.05, 0.1, 0.2):
        runs.append(("FirstBlockCache", f"thr {t:g}", hooked(FirstBlockCacheConfig(threshold=t))))
    for interval in (2, 3, 4, 5):
        # Its default module patterns miss Wan's attn1/attn2, so name Wan's attention and feed-forward modules.
        runs.append(("TaylorSeer", f"interval {interval}", hooked(TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"]))))
    for t in (0.06, 0.12, 0.24, 0.5):
        runs.append(("MagCache (calibrated)", f"thr {t:g}", hooked(
            lambda t=t: MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios))))
    for t, mc in ((0.1, 2), (0.25, 2), (0.5, 2), (0.5, 4), (1.0, 4)):
        runs.append(("SeaCache", f"thr {t:g}, max consecutive {mc}", hooked(
            SeaCacheConfig(threshold=t, max_consecutive_cached=mc))))
    for skip in (2, 3):
        runs.append(("FasterCache", f"spatial skip {skip}", hooked(lambda skip=skip: FasterCacheConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True))))
    for skip in (2, 3):
        runs.append(("PyramidAttentionBroadcast", f"spatial skip {skip}", hooked(PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep))))
    if methods:
        runs = [run for run in runs if any(run[0].startswith(m) for m in methods)]
    rows += [measure(method, setting, fn) for method, setting, fn in runs]
    for row in rows:
        row.base_blocks, row.base_attn = base.blocks, base.attn
    counter.remove()
    sg.adapter.batch_cfg = True
    return rows


# --- tiled ---------------------------------------------------------------------------------------

def tiled(sg: SuperGenPipeline, prompts: list[str], steps: int, size: int, strength: float, shift: str,
          settings: list[tuple]) -> list[Row]:
    """Rows of the tiled part. ``settings``: (method, setting, cache, shift_every) with shift_every ``None``
    for the pipeline's default schedule. PSNR is taken against the uncached run at the tiling defaults (the
    grid moving every step: what the cache-off default makes) and, in ``psnr_same_grid``, against the
    uncached run with the row's own grid schedule (the error of the reuse alone)."""
    part = f"tiled {size}x{size}, strength {strength:g}, shift {shift}"
    layers = len(sg.pipe.transformer.blocks)

    def run(prompt, cache, every):
        tiling = TilingConfig(strength=strength, shift=shift, shift_every=every)
        return sg(prompt, height=size, width=size, num_inference_steps=steps, seed=0, tiling=tiling, cache=cache,
                  progress=False)

    refs = {}
    same_grid: dict[int, dict[str, np.ndarray]] = {1: refs}

    def reference(prompt, every):
        if every not in same_grid:
            same_grid[every] = {}
        if prompt not in same_grid[every]:
            same_grid[every][prompt] = run(prompt, None, every).frames
        return same_grid[every][prompt]

    def measure(method, setting, cache, every=None):
        row = Row(part, method, setting)
        videos, reused, split = [], [], []
        start = time.perf_counter()
        for prompt in prompts:
            out = run(prompt, cache, every)
            schedule = (cache or CacheConfig()).grid_shift_every(TilingConfig(shift_every=every))
            tiles = out.metrics["tiles"]
            # Refinement only: the sketch is the same uncached run in every row. CFG batched: 2 per tile-step.
            row.blocks += tiles["tile_steps_computed"] * 2 * layers
            row.sketch_blocks += out.metrics["sketch"]["steps_computed"] * 2 * layers
            reused.append(tiles["tile_steps_skipped"] / tiles["tile_steps_total"])
            if cache is None and schedule == 1:
                refs[prompt] = out.frames
            row.psnr.append(psnr(out.frames, refs[prompt]))
            row.psnr_same_grid.append(psnr(out.frames, out.frames if cache is None else reference(prompt, schedule)))
            videos.append(out.frames)
            if cache is not None:
                split.append(region_split(out.metrics, subject_mask(refs[prompt], prompt)))
        row.seconds = time.perf_counter() - start
        row.reused = float(np.mean(reused))
        if split:
            row.subject_reuse = float(np.nanmean([s for s, _ in split]))
            row.background_reuse = float(np.nanmean([b for _, b in split]))
        fidelity(row, videos, prompts)
        print(f"  {part} {method} {setting}: reused {row.reused:.1%}, PSNR {row.psnr_mean:.2f} "
              f"(same grid {row.psnr_same_grid_mean:.2f}), objects {row.objects:.2f}, adherence {row.adherence:.2f}",
              file=sys.stderr, flush=True)
        return row

    base = measure("none", "-", None)
    rows = [base] + [measure(*s) for s in settings]
    for row in rows:
        row.base_blocks, row.base_sketch_blocks = base.blocks, base.sketch_blocks
    return rows


def tiled_settings(thresholds: list[float], reuse: list[str], max_skips: int,
                   shift_every: list[int | None], sketch: bool = True, scopes=("region", "canvas"),
                   forced: bool = True, **cache_kwargs) -> list[tuple]:
    """Sweep rows: every scope x reuse x threshold, for every grid schedule; ``cache_kwargs`` go to every
    row's :class:`CacheConfig` (``grid``, ``warmup``, ``cooldown``)."""
    out = []
    names = {"region": "region cache", "canvas": "canvas decision"}
    extra = "".join(f", {k} {v}" for k, v in cache_kwargs.items())
    for every in shift_every:
        grid = ("" if every is None else f", grid moves every {every}") + ("" if sketch else ", sketch uncached")
        grid += extra + ("" if max_skips == 3 else f", max skips {max_skips}")
        if every not in (None, 1):
            out.append(("none", f"grid moves every {every}", None, every))
        for mode in scopes:
            for r in reuse:
                for t in thresholds:
                    out.append((names[mode], f"{r}, thr {t:g}{grid}",
                                CacheConfig(mode=mode, threshold=t, shift_threshold=t, reuse=r, max_skips=max_skips,
                                            sketch=sketch, **cache_kwargs), every))
        if forced:
            # No predictor: every step the cache may reuse (after the warm-up, within max skips; with the held
            # grid not across a move) is reused everywhere. What any predictor's skips at that budget would cost.
            out.append(("forced schedule", f"output, every reusable step{grid}",
                        CacheConfig(mode="canvas", threshold=1e6, shift_threshold=1e6, max_skips=max_skips,
                                    adaptive=False, sketch=sketch, **cache_kwargs), every))
    return out


# --- tables --------------------------------------------------------------------------------------

def _fmt_psnr(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| part | method | setting | block compute run | saved | self-attn saved | saved with sketch | reused "
        "| PSNR mean (dB) | PSNR min | PSNR vs same grid | objects/frame | adherence | subject / background reused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.part} | {r.method} | {r.setting} | failed: {r.error} | | | | | | | | | | |")
            continue
        split = ("" if r.subject_reuse is None else f"{r.subject_reuse:.0%} / {r.background_reuse:.0%}")
        reused = "" if math.isnan(r.reused) else f"{r.reused:.1%}"
        attn = f"{1 - r.attn / r.base_attn:.1%}" if r.base_attn else f"{r.saved:.1%}"
        total = r.base_blocks + r.base_sketch_blocks
        with_sketch = f"{1 - (r.blocks + r.sketch_blocks) / total:.1%}" if r.base_sketch_blocks else ""
        lines.append(
            f"| {r.part} | {r.method} | {r.setting} | {r.blocks}/{r.base_blocks} | {r.saved:.1%} | {attn} | "
            f"{with_sketch} | {reused} | "
            f"{_fmt_psnr(r.psnr_mean)} | {_fmt_psnr(min(r.psnr))} | "
            f"{'' if not r.psnr_same_grid else _fmt_psnr(r.psnr_same_grid_mean)} | {r.objects:.2f} | "
            f"{r.adherence:.2f} | {split} |"
        )
    return "\n".join(lines)


def best_at(rows: list[Row], methods: list[str], floor: float) -> Row | None:
    ok = [r for r in rows if not r.error and any(r.method.startswith(m) for m in methods) and r.psnr_mean >= floor]
    return max(ok, key=lambda r: r.saved) if ok else None


def comparisons(rows: list[Row], floors=(30.0, 35.0, 40.0)) -> str:
    """At each PSNR floor (mean over prompts): our best saving against the best competitor's."""
    lines = ["| part | PSNR floor (dB) | ours (best) | competitor (best) | ratio of compute saved |",
             "|---|---|---|---|---|"]
    for part in dict.fromkeys(r.part for r in rows):
        group = [r for r in rows if r.part == part]
        ours, theirs = (["SuperGen cache"], DIFFUSERS) if part.startswith("untiled") else (["region cache"], ["canvas decision"])
        for floor in floors:
            a, b = best_at(group, ours, floor), best_at(group, theirs, floor)
            name = lambda r: "none" if r is None else f"{r.saved:.1%} ({r.method}, {r.setting})"  # noqa: E731
            if a is None and b is None:
                continue
            ratio = (a.saved if a else 0.0) / b.saved if b and b.saved > 0 else math.inf
            lines.append(f"| {part} | {floor:g} | {name(a)} | {name(b)} | {ratio:.2f} |")
    return "\n".join(lines)


def load(paths: list[str]) -> tuple[list[Row], list[str]]:
    rows, headers = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        headers.append(data["header"])
        rows += [Row(**r) for r in data["rows"]]
    return rows, headers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--part", choices=("untiled", "tiled"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--strength", type=float, default=0.9)
    parser.add_argument("--shift", default="wrap", choices=("wrap", "none"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.6, 1.2])
    parser.add_argument("--reuse", nargs="+", default=["output"])
    parser.add_argument("--max-skips", type=int, default=3)
    parser.add_argument("--shift-every", nargs="+", default=["default"],
                        help="tiled: grid schedules to sweep (integers; 'default': the pipeline's choice)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sketch", choices=("on", "off"), default="on",
                        help="tiled sweep rows: cache the native-size sketch too (CacheConfig.sketch)")
    parser.add_argument("--methods", nargs="+", help="untiled: only these methods (prefixes of the method names)")
    parser.add_argument("--grid", choices=("shifting", "held"), help="tiled sweep rows: CacheConfig.grid")
    parser.add_argument("--warmup", type=int, help="tiled sweep rows: CacheConfig.warmup")
    parser.add_argument("--cooldown", type=int, help="tiled sweep rows: CacheConfig.cooldown")
    parser.add_argument("--scopes", nargs="+", default=["region", "canvas"], choices=("region", "canvas"))
    parser.add_argument("--no-forced", action="store_true", help="tiled: no forced-schedule row")
    parser.add_argument("--no-sweep", action="store_true", help="tiled: no threshold sweep rows (with --sketch-rows)")
    parser.add_argument("--sketch-rows", action="store_true",
                        help="add rows with the cache at its defaults on the sketch too (CacheConfig.sketch)")
    parser.add_argument("--out", help="write this part's rows (JSON)")
    parser.add_argument("--render", nargs="+", help="print the tables of saved parts")
    args = parser.parse_args()
    if args.render:
        rows, headers = load(args.render)
        print("\n".join(headers) + "\n")
        for part in dict.fromkeys(r.part for r in rows):
            print(table([r for r in rows if r.part == part]) + "\n")
        print(comparisons(rows))
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    sg = SuperGenPipeline.from_pretrained(args.model)
    prompts, spare = bench_prompts(args.prompts)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    header = (f"model {args.model} ({sg.adapter.describe()}); {cpu}, {torch.get_num_threads()} torch thread(s); "
              f"{args.steps} steps, guidance {sg.default_guidance_scale:g}, seed 0, {len(prompts)} prompts: "
              + "; ".join(prompts))
    print(header, file=sys.stderr)
    if args.part == "untiled":
        rows = untiled(sg, prompts, spare, args.steps, args.methods)
    else:
        every = [None if e == "default" else int(e) for e in args.shift_every]
        extra = {k: getattr(args, k) for k in ("grid", "warmup", "cooldown") if getattr(args, k) is not None}
        settings = [] if args.no_sweep else tiled_settings(args.thresholds, args.reuse, args.max_skips, every,
                                                         sketch=args.sketch == "on", scopes=args.scopes,
                                                         forced=not args.no_forced, **extra)
        if args.sketch_rows:
            defaults = CacheConfig(mode="region", sketch=True)
            settings += [("region cache + sketch cache", f"defaults (thr {defaults.threshold:g})", defaults)]
        rows = tiled(sg, prompts, args.steps, args.size, args.strength, args.shift, settings)
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
