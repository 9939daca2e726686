"""Benchmark the region-aware step cache against Diffusers' own caches.

Two parts, each measured side by side in one process with the same seed:

* untiled (native size, one tile): SuperGen's region cache on a one-tile plan
  against Diffusers' hooks on the plain ``WanPipeline`` (FirstBlockCache,
  MagCache calibrated on an uncached run of the same request, TaylorSeer,
  PyramidAttentionBroadcast). Both run the CFG branches as two calls, as the
  plain pipeline does, so model calls and times compare like for like.
* tiled (2x2 tiles, wrap-shifted grid): the region cache (per-tile decisions)
  against the same predictor with one whole-canvas decision; adaptive
  thresholds off / stricter (default) / looser where the region varies more;
  and what a skip reuses (blocks residual by default, output, residual).

Every row reports full model passes (executions of the last transformer block;
a cond and an uncond pass count as two), self-attention computations (the
unit PyramidAttentionBroadcast and TaylorSeer save), wall-clock speed-up over
the uncached run of the same part, and PSNR / SSIM of the final latents
against the uncached latents (latent space: the tiny model's VAE has random
weights, so decoded pixels add nothing but decode time). ``--model`` takes any
Wan checkpoint for a real run on a GPU.

    python scripts/bench_cache.py [--steps 20] [--tiled-steps 8] [--plot docs/bench_cache.png]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supergen import CacheConfig, SuperGenPipeline, TilingConfig  # noqa: E402
from supergen.cache import region as region_module  # noqa: E402

PROMPT = "a red circle moving left over a blue sky"


@dataclass
class Row:
    part: str
    method: str
    setting: str
    passes: int
    blocks: int
    attn: int
    seconds: float
    psnr: float = math.inf
    ssim: float = 1.0
    base_passes: int = 0
    base_blocks: int = 0
    base_attn: int = 0
    base_seconds: float = 0.0

    @property
    def calls_saved(self) -> float:
        """Model-call reduction factor (uncached passes / passes)."""
        return self.base_passes / max(self.passes, 1)

    @property
    def compute_saved(self) -> float:
        """Transformer-block work reduction (a cache that always runs the first block saves less than its calls)."""
        return self.base_blocks / max(self.blocks, 1)

    @property
    def attn_saved(self) -> float:
        return self.base_attn / max(self.attn, 1)

    @property
    def speedup(self) -> float:
        return self.base_seconds / self.seconds


class Counter:
    """Counts real computations inside the transformer, whatever cache hooks sit on top of it."""

    def __init__(self, transformer):
        self.passes = self.blocks = self.attn = 0
        self._last = transformer.blocks[-1].ffn.net[-1]
        # Caches replace a block's (attention's, feed-forward's) forward without calling
        # it, so hooks on leaf modules inside them only fire when the work is really done.
        self._handles = [b.ffn.net[-1].register_forward_hook(self._block) for b in transformer.blocks]
        self._handles += [b.attn1.to_q.register_forward_hook(self._attn) for b in transformer.blocks]

    def _block(self, module, args, output):
        self.blocks += args[0].shape[0]
        if module is self._last:
            self.passes += args[0].shape[0]

    def _attn(self, module, args, output):
        self.attn += args[0].shape[0]

    def reset(self):
        self.passes = self.blocks = self.attn = 0

    def remove(self):
        for handle in self._handles:
            handle.remove()


def psnr_ssim(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """PSNR (peak = the reference's value range) and mean SSIM over every (channel, frame) slice."""
    from skimage.metrics import structural_similarity

    x = x.float().cpu().numpy()[0]
    ref = ref.float().cpu().numpy()[0]
    peak = float(ref.max() - ref.min())
    mse = float(np.mean((x - ref) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
    scores = [
        structural_similarity(x[c, f], ref[c, f], data_range=peak) for c in range(x.shape[0]) for f in range(x.shape[1])
    ]
    return psnr, float(np.mean(scores))


@contextlib.contextmanager
def diffusers_cache(transformer, config):
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


def calibrate_magcache(pipe, run, steps: int) -> list[float]:
    """MagCache's own calibration run (no skipping); returns the cond branch's magnitude ratios."""
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
    # One list per CFG branch (cond first, as WanPipeline runs it); average them.
    ratios = [eval(r.split(":", 1)[1]) for r in records]  # noqa: S307 - a printed list of floats from Diffusers
    return [float(np.mean(vals)) for vals in zip(*ratios)]


def untiled(sg: SuperGenPipeline, steps: int, thresholds: list[float]) -> list[Row]:
    from diffusers import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    pipe = sg.pipe
    h, w, f = sg.adapter.native_height, sg.adapter.native_width, sg.adapter.native_num_frames
    counter = Counter(pipe.transformer)
    sg.adapter.batch_cfg = False  # two calls per step, like the plain pipeline

    def plain():
        return pipe(PROMPT, height=h, width=w, num_frames=f, num_inference_steps=steps, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    def ours(cache):
        return sg(PROMPT, height=h, width=w, num_frames=f, num_inference_steps=steps, guidance_scale=5.0, seed=0,
                  tiling=TilingConfig(strength=1.0), cache=cache, output_type="latent", progress=False).frames

    def measure(method, setting, fn):
        counter.reset()
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        return Row("untiled", method, setting, counter.passes, counter.blocks, counter.attn, seconds), out

    pipe.set_progress_bar_config(disable=True)
    plain()  # warm-up: first-call allocations are not part of any method's time
    base_row, ref = measure("none (Diffusers)", "-", plain)
    ours_base, ours_ref = measure("none (SuperGen)", "-", lambda: ours(None))
    assert torch.equal(ours_ref, ref), "uncached SuperGen at native size must equal the plain pipeline"
    mag_ratios = calibrate_magcache(pipe, plain, steps)

    runs = [("region cache", f"thr {t:g}", lambda t=t: ours(CacheConfig(mode="region", threshold=t))) for t in thresholds]
    # The default cap of 3 reuses in a row bounds the saving at 4x; a looser cap shows the rest of the curve.
    runs += [
        ("region cache", f"thr {t:g}, max skips 8",
         lambda t=t: ours(CacheConfig(mode="region", threshold=t, max_skips=8)))
        for t in (1.0, 2.0)
    ]
    for t in (0.1, 0.2, 0.4):
        runs.append(("FirstBlockCache", f"thr {t:g}", lambda t=t: _with(pipe, FirstBlockCacheConfig(threshold=t), plain)))
    for t in (0.06, 0.24):
        cfg = lambda t=t: MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios)  # noqa: E731
        runs.append(("MagCache (calibrated)", f"thr {t:g}", lambda cfg=cfg: _with(pipe, cfg(), plain)))
    for interval in (3, 5):
        # Its default module patterns ("^blocks.*attn", full match) miss Wan's attn1/attn2,
        # so name Wan's attention and feed-forward modules explicitly.
        cfg = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=3,
                                    taylor_factors_dtype=torch.float32,
                                    cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"])
        runs.append(("TaylorSeer", f"interval {interval}", lambda cfg=cfg: _with(pipe, cfg, plain)))
    for skip in (2, 3):
        cfg = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip,
                                              spatial_attention_timestep_skip_range=(100, 800),
                                              current_timestep_callback=lambda: pipe.current_timestep)
        runs.append(("PyramidAttentionBroadcast", f"spatial skip {skip}", lambda cfg=cfg: _with(pipe, cfg, plain)))

    rows = [base_row, ours_base]
    for method, setting, fn in runs:
        row, out = measure(method, setting, fn)
        row.psnr, row.ssim = psnr_ssim(out, ref)
        rows.append(row)
        print(f"  untiled {method} {setting}: {row.passes} passes, PSNR {row.psnr:.2f}", file=sys.stderr)
    for row in rows:
        row.base_passes, row.base_blocks, row.base_attn = base_row.passes, base_row.blocks, base_row.attn
        row.base_seconds = base_row.seconds
    counter.remove()
    sg.adapter.batch_cfg = True
    return rows


def _with(pipe, config, fn):
    with diffusers_cache(pipe.transformer, config):
        return fn()


def tiled(sg: SuperGenPipeline, steps: int, thresholds: list[float]) -> list[Row]:
    h, w = 2 * sg.adapter.native_height, 2 * sg.adapter.native_width

    def run(cache):
        return sg(PROMPT, height=h, width=w, num_inference_steps=steps, seed=0, cache=cache,
                  output_type="latent", progress=False)

    def measure(method, setting, cache):
        out = run(cache)
        # The native-size sketch is the same in every run (never cached): count and time refinement only.
        # Batched CFG runs both branches of a tile in one call: two passes per computed tile-step.
        passes = out.metrics["tiles"]["tile_steps_computed"] * 2
        blocks = passes * len(sg.pipe.transformer.blocks)
        return Row("tiled 2x2", method, setting, passes, blocks, blocks, out.metrics["denoise_s"]), out.frames

    base, ref = measure("none", "-", None)
    rows = [base]
    variants = [("region cache", f"thr {t:g}", CacheConfig(mode="region", threshold=t), None) for t in thresholds]
    variants += [("canvas decision", f"thr {t:g}", CacheConfig(mode="canvas", threshold=t), None) for t in thresholds]
    mid = thresholds[1]
    variants += [
        ("region, adaptive off", f"thr {mid:g}", CacheConfig(mode="region", threshold=mid, adaptive=False), None),
        ("region, looser where variable", f"thr {mid:g}", CacheConfig(mode="region", threshold=mid), 0.5),
        ("region, output reuse", f"thr {mid:g}", CacheConfig(mode="region", threshold=mid, reuse="output"), None),
        ("region, residual reuse", f"thr {mid:g}", CacheConfig(mode="region", threshold=mid, reuse="residual"), None),
    ]
    for method, setting, cache, exponent in variants:
        saved = region_module.ADAPT_EXPONENT
        if exponent is not None:
            region_module.ADAPT_EXPONENT = exponent
        try:
            row, out = measure(method, setting, cache)
        finally:
            region_module.ADAPT_EXPONENT = saved
        row.psnr, row.ssim = psnr_ssim(out, ref)
        rows.append(row)
        print(f"  tiled {method} {setting}: {row.passes} passes, PSNR {row.psnr:.2f}", file=sys.stderr)
    for row in rows:
        row.base_passes, row.base_blocks, row.base_attn, row.base_seconds = base.passes, base.blocks, base.attn, base.seconds
    return rows


class StaticLeftHalf:
    """Wraps an adapter so that its output on the left half of the canvas is a constant.

    A canvas with a static region by construction (like sky over a moving
    subject, taken to the limit): the right half is the real model. Needs
    canvas-absolute positions (``rope='absolute'``) to know where a tile sits.
    """

    def __init__(self, adapter, canvas_width: int):
        self._adapter = adapter
        self._half = canvas_width // 2

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def predict(self, latents, timestep, cond, guidance_scale, positions=None, **kwargs):
        result = self._adapter.predict(latents, timestep, cond, guidance_scale, positions=positions, **kwargs)
        out, residual = result if isinstance(result, tuple) else (result, None)
        pw = self._adapter.geometry.patch[2]
        cols = (positions.cols[:, :, None] * pw + torch.arange(pw)).reshape(len(out), -1)
        out = torch.where((cols < self._half)[:, None, None, None, :], torch.full_like(out, 0.25), out)
        return out if residual is None else (out, residual)


def half_static(sg: SuperGenPipeline, steps: int, thresholds: list[float]) -> list[Row]:
    h, w = 2 * sg.adapter.native_height, 2 * sg.adapter.native_width
    real = sg.adapter
    sg.adapter = StaticLeftHalf(real, canvas_width=sg.adapter.geometry.latent_shape(h, w, 1)[2])
    tiling = TilingConfig(strength=1.0, rope="absolute")

    def measure(method, setting, cache):
        out = sg(PROMPT, height=h, width=w, num_inference_steps=steps, seed=0, cache=cache, tiling=tiling,
                 output_type="latent", progress=False)
        passes = out.metrics["tiles"]["tile_steps_computed"] * 2
        blocks = passes * len(sg.pipe.transformer.blocks)
        return Row("tiled 2x2, left half static", method, setting, passes, blocks, blocks,
                   out.metrics["denoise_s"]), out.frames

    try:
        base, ref = measure("none", "-", None)
        rows = [base]
        for mode, method in (("region", "region cache"), ("canvas", "canvas decision")):
            for t in thresholds:
                row, out = measure(method, f"thr {t:g}", CacheConfig(mode=mode, threshold=t))
                row.psnr, row.ssim = psnr_ssim(out, ref)
                rows.append(row)
                print(f"  half-static {method} {t:g}: {row.passes} passes, PSNR {row.psnr:.2f}", file=sys.stderr)
    finally:
        sg.adapter = real
    for row in rows:
        row.base_passes, row.base_blocks, row.base_attn, row.base_seconds = base.passes, base.blocks, base.attn, base.seconds
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| part | method | setting | model passes | calls saved | block compute saved | self-attn saved | speed-up "
        "| PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "exact" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
        lines.append(
            f"| {r.part} | {r.method} | {r.setting} | {r.passes}/{r.base_passes} | {r.calls_saved:.2f}x | "
            f"{r.compute_saved:.2f}x | {r.attn_saved:.2f}x | {r.speedup:.2f}x | {psnr} | {r.ssim:.4f} |"
        )
    return "\n".join(lines)


def best_at(rows: list[Row], methods: list[str], floor: float, key: str) -> tuple[float, str]:
    """Largest saving (``key``: calls_saved or compute_saved) among rows of ``methods`` with PSNR >= ``floor``."""
    ok = [r for r in rows if r.method in methods and r.psnr >= floor]
    if not ok:
        return 1.0, "none"
    best = max(ok, key=lambda r: getattr(r, key))
    return getattr(best, key), f"{best.method} {best.setting}"


def comparisons(untiled_rows: list[Row], tiled_rows: list[Row], static_rows: list[Row]) -> str:
    """At every PSNR level one of our settings reached: our best saving against the best competitor's."""
    lines = [
        "| part | PSNR floor (dB) | saving | ours (best) | competitors (best) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    diffusers = ["FirstBlockCache", "MagCache (calibrated)", "TaylorSeer", "PyramidAttentionBroadcast"]
    for part, rows, ours, theirs in (
        ("untiled", untiled_rows, ["region cache"], diffusers),
        ("tiled 2x2", tiled_rows, ["region cache"], ["canvas decision"]),
        ("tiled, half static", static_rows, ["region cache"], ["canvas decision"]),
    ):
        floors = sorted({math.floor(r.psnr * 100) / 100 for r in rows if r.method in ours and math.isfinite(r.psnr)},
                        reverse=True)
        for floor in floors:
            for key, label in (("calls_saved", "model calls"), ("compute_saved", "block compute")):
                a, a_name = best_at(rows, ours, floor, key)
                b, b_name = best_at(rows, theirs, floor, key)
                lines.append(f"| {part} | {floor:.2f} | {label} | {a:.2f}x ({a_name}) | {b:.2f}x ({b_name}) | {a / b:.2f} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(dict.fromkeys(r.part for r in rows))
    metrics = (("speedup", "wall-clock speed-up (x)"), ("compute_saved", "block compute saved (x)"))
    fig, axes = plt.subplots(len(metrics), len(parts), figsize=(6 * len(parts), 4 * len(metrics)), squeeze=False)
    for row_axes, (key, label) in zip(axes, metrics):
        for ax, part in zip(row_axes, parts):
            for method in dict.fromkeys(r.method for r in rows if r.part == part):
                pts = [(r.psnr, getattr(r, key)) for r in rows
                       if r.part == part and r.method == method and math.isfinite(r.psnr)]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker="o", label=method)
            ax.set_xlabel("PSNR vs uncached latents (dB)")
            ax.set_ylabel(label)
            ax.set_title(f"{part}: {label.split(' (')[0]} vs PSNR", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"saved {path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="steps of the untiled head-to-head")
    parser.add_argument("--tiled-steps", type=int, default=8, help="steps of the tiled comparison")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 1.0],
                        help="region cache thresholds (untiled and tiled); the tiled variants use the second")
    parser.add_argument("--plot", default="docs/bench_cache.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    sg = SuperGenPipeline.from_pretrained(args.model)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"model {args.model} ({sg.adapter.describe()}); device {sg.device}; {cpu}, {torch.get_num_threads()} threads; "
          f"untiled {args.steps} steps, tiled {args.tiled_steps} steps (strength 0.9), guidance 5, seed 0\n")
    # Each part's table is printed as soon as it is measured.
    u = untiled(sg, args.steps, args.thresholds)
    print(table(u) + "\n", flush=True)
    t = tiled(sg, args.tiled_steps, args.thresholds)
    print(table(t) + "\n", flush=True)
    hs = half_static(sg, args.tiled_steps, args.thresholds[:2])
    print(table(hs) + "\n", flush=True)
    print(comparisons(u, t, hs))
    plot(u + t + hs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
