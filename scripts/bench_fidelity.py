"""Fidelity of the tiled path on the shipped toy model: one subject, no seams, real detail.

For each canvas (2.25x, 4x and 9x the native area by default) and each
setting (the up-scaled sketch alone, plain tiling, each coherence mechanism),
generates the same prompts and seeds and prints one Markdown row:

- objects per frame (blobs of any shape colour; the truth is 1): mean, and the
  share of frames with exactly one, with a 95% bootstrap interval over clips;
- colour / shape / direction adherence, each relative to native-size runs of
  the same prompts and seeds;
- seam score at the tile boundaries of the last refinement step (about 1:
  seamless);
- detail: mean absolute Laplacian of the luminance (grey levels), against the
  up-scaled sketch's (refinement must add what bicubic up-scaling lacks) and
  ground-truth clips rendered at the canvas size;
- temporal flicker; transformer forwards per refinement step relative to
  plain tiling.

    python scripts/bench_fidelity.py --clips 16 --json docs/bench_fidelity.json --sheet docs/fidelity_sheet.png
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_toy_model import last_step_boundaries, parse_size, pick_prompts  # noqa: E402

from supergen import CacheConfig, CoherenceConfig, SuperGenPipeline, TilingConfig  # noqa: E402
from supergen.metrics import adherence, object_counts, seam_score, temporal_flicker  # noqa: E402
from supergen.tiling import resize_video  # noqa: E402
from supergen.toyworld import render_batch  # noqa: E402

OFF = CoherenceConfig(guide="none")


@dataclass(frozen=True)
class Setting:
    tiling: dict = field(default_factory=dict)
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)  # the defaults; rows that differ say so
    upscale_only: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)  # off


def _coherent(**kw) -> Setting:
    return Setting(tiling=dict(strength=0.9), coherence=CoherenceConfig(**{"guide": "none", **kw}))


SETTINGS: dict[str, Setting] = {
    "up-scaled sketch (no refinement)": Setting(upscale_only=True),
    "plain tiling, strength 0.9 (wave 1 defaults)": _coherent(),
    "plain tiling, strength 0.5": Setting(tiling=dict(strength=0.5), coherence=OFF),
    "plain, rope absolute": Setting(tiling=dict(strength=0.9, rope="absolute"), coherence=OFF),
    "skip residual ^1": _coherent(guide="skip", guide_exponent=1),
    "lowpass latents ^0.5": _coherent(guide="lowpass", guide_exponent=0.5),
    "dilated views, all steps": _coherent(views="dilated", view_until=1.0),
    "lowpass ^1 + dilated views 50%": _coherent(guide="lowpass", guide_exponent=1, views="dilated", view_until=0.5),
    "x0 low band ^1": _coherent(guide="x0", guide_exponent=1),
    "x0 low band ^0.5": _coherent(guide="x0", guide_exponent=0.5),
    "x0 low band ^0.1": _coherent(guide="x0", guide_exponent=0.1),
    "defaults": Setting(),
}


TILING_KEYS = {"strength": float, "rope": str, "overlap": int, "shift": str, "upscale": str, "shift_every": int}
COHERENCE_KEYS = {"guide": str, "guide_exponent": float, "views": str, "view_exponent": float, "view_until": float}
#: ``cache=region`` turns the step cache on; ``cache_threshold=0.3``, ``cache_sketch=0`` set its fields.
CACHE_KEYS = {"cache": ("mode", str), "cache_threshold": ("threshold", float),
              "cache_sketch": ("sketch", lambda v: v not in ("0", "false", "off"))}


def parse_setting(text: str) -> tuple[str, Setting]:
    """``key=value,...`` over TilingConfig, CoherenceConfig and (``cache*``) CacheConfig fields (unnamed ones keep
    the defaults)."""
    tiling, coherence, cache = {}, {}, {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key in TILING_KEYS:
            tiling[key] = TILING_KEYS[key](value)
        elif key in COHERENCE_KEYS:
            coherence[key] = COHERENCE_KEYS[key](value)
        elif key in CACHE_KEYS:
            name, kind = CACHE_KEYS[key]
            cache[name] = kind(value)
        else:
            keys = {**TILING_KEYS, **COHERENCE_KEYS, **CACHE_KEYS}
            raise argparse.ArgumentTypeError(f"{key!r} is not one of {', '.join(keys)}")
    return text, Setting(tiling=tiling, coherence=CoherenceConfig(**coherence), cache=CacheConfig(**cache))


def luminance(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def detail(frames: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the luminance, in grey levels (edges and texture)."""
    y = luminance(frames)
    lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def bootstrap(values: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over clips (rows of ``values``)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (rounds, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def upscaled_sketch(pipe: SuperGenPipeline, prompt: str, seed: int, size, steps: int, guidance: float) -> np.ndarray:
    """The native-area sketch decoded and resized bicubically to ``size``: what refinement must beat."""
    request = pipe.check_request(height=size[0], width=size[1])
    out = pipe(prompt, height=request.sketch_height, width=request.sketch_width, num_inference_steps=steps,
               guidance_scale=guidance, seed=seed, tiling=TilingConfig(strength=1.0), output_type="float",
               progress=False)
    video = torch.from_numpy(np.asarray(out.frames)).permute(3, 0, 1, 2)[None] * 2 - 1  # (1, 3, F, H, W)
    big = resize_video(video, (video.shape[2], size[0], size[1]))
    return ((big[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def run_setting(pipe, setting: Setting, prompts, size, steps, guidance):
    videos, forwards, seconds = [], [], []
    for seed, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        if setting.upscale_only:
            videos.append(upscaled_sketch(pipe, prompt, seed, size, steps, guidance))
            forwards.append(0.0)
        else:
            out = pipe(prompt, height=size[0], width=size[1], num_inference_steps=steps, guidance_scale=guidance,
                       seed=seed, tiling=TilingConfig(**setting.tiling), coherence=setting.coherence,
                       cache=setting.cache, progress=False)
            tiles = out.metrics["tiles"]
            forwards.append((tiles["tile_steps_computed"] + tiles["view_forwards"]) / max(1, tiles["tile_steps_total"]))
            videos.append(out.frames)
        seconds.append(time.perf_counter() - t0)
    return videos, float(np.mean(forwards)), float(np.mean(seconds))


def summarise(videos, prompts, native_facts, boundaries) -> dict:
    counts = np.stack([object_counts(v) for v in videos])  # (clips, frames)
    one = (counts == 1).mean(axis=1)
    facts = np.array([[a.colour_ok, a.shape_ok, a.direction_ok] for a in (adherence(v, p) for v, p in zip(videos, prompts))],
                     dtype=np.float64)
    rows, cols = boundaries
    seam = float(np.mean([seam_score(v, rows=rows, cols=cols) for v in videos])) if rows or cols else None
    native = native_facts.mean(axis=0)
    relative = [float(facts[:, i].mean() / native[i]) if native[i] > 0 else float("nan") for i in range(3)]
    return {
        "objects_mean": float(counts.mean()),
        "exactly_one": float(one.mean()),
        "exactly_one_ci": bootstrap(one),
        "colour": float(facts[:, 0].mean()),
        "shape": float(facts[:, 1].mean()),
        "direction": float(facts[:, 2].mean()),
        "colour_rel": relative[0],
        "shape_rel": relative[1],
        "direction_rel": relative[2],
        "seam": seam,
        "detail": float(np.mean([detail(v) for v in videos])),
        "flicker": float(np.mean([temporal_flicker(v) for v in videos])),
    }


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.3 * len(rows)), squeeze=False)
    for (name, videos), ax in zip(rows, axes[:, 0]):
        # Per clip: frames 0 and 8 side by side; clips left to right.
        strip = np.concatenate([np.concatenate([v[0], v[-1]], axis=1) for v in videos], axis=1)
        ax.imshow(strip, interpolation="nearest")
        ax.set_title(name, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--clips", type=int, default=16, help="prompts per row (seed = index)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(48, 48), (64, 64), (96, 96)])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                        help="rows to run, from: " + "; ".join(SETTINGS).replace("%", "%%"))
    parser.add_argument("--custom", type=parse_setting, nargs="+", default=[], metavar="K=V,...",
                        help="extra rows, e.g. strength=0.7,guide=lowpass,guide_exponent=1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every row's numbers here")
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG (one per canvas: NAME-HxW.png)")
    parser.add_argument("--sheet-clips", type=int, default=6)
    args = parser.parse_args(argv)
    if args.custom:
        SETTINGS.update(dict(args.custom))
        args.settings = [name for name in args.settings if name in SETTINGS] if "--settings" in (argv or sys.argv) else []
        args.settings += [name for name, _ in args.custom]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    pipe = SuperGenPipeline.from_pretrained(args.model, device="cpu")
    guidance = args.guidance if args.guidance is not None else pipe.default_guidance_scale
    prompts = pick_prompts(args.clips, seed=0)
    native_hw = (pipe.adapter.native_height, pipe.adapter.native_width)
    print(f"hardware: {platform.processor() or platform.machine()}, torch threads {args.threads}; model {args.model}; "
          f"{args.clips} prompts x 1 seed, {args.steps} steps, guidance {guidance:g}; defaults: {TilingConfig()} "
          f"{CoherenceConfig()}")
    native_videos, _, native_s = run_setting(pipe, Setting(tiling=dict(strength=1.0)), prompts, native_hw, args.steps,
                                             guidance)
    native_facts = np.array([[a.colour_ok, a.shape_ok, a.direction_ok]
                             for a in (adherence(v, p) for v, p in zip(native_videos, prompts))], dtype=np.float64)
    native = summarise(native_videos, prompts, native_facts, ([], [native_hw[1] // 2]))
    results = {"clips": args.clips, "steps": args.steps, "guidance": guidance, "native": native, "rows": []}
    print(f"\nnative {native_hw[0]}x{native_hw[1]}: exactly one object {native['exactly_one']:.0%}, objects "
          f"{native['objects_mean']:.2f}, colour {native['colour']:.2f} shape {native['shape']:.2f} direction "
          f"{native['direction']:.2f}, detail {native['detail']:.2f} ({native_s:.1f} s/clip)")
    print("\n| canvas (area) | setting | objects/frame | exactly one [95% CI] | colour | shape | direction | seam | "
          "detail (sketch / truth) | flicker | forwards/step | s/clip |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    area = native_hw[0] * native_hw[1]
    for size in args.sizes:
        truth, truth_prompts = render_batch(12345, args.clips, size[0], size[1], pipe.adapter.native_num_frames)
        truth_row = summarise(list(truth), truth_prompts, native_facts, ([], []))
        truth_detail = truth_row["detail"]
        results.setdefault("truth", []).append(dict(truth_row, height=size[0], width=size[1]))
        print(f"| {size[0]}x{size[1]} | ground truth (toy world rendered at this size) | "
              f"{truth_row['objects_mean']:.2f} | {truth_row['exactly_one']:.0%} | - | - | - | - | "
              f"{truth_detail:.2f} | {truth_row['flicker']:.4f} | - | - |", flush=True)
        sketch_detail = None
        sheet_rows = []
        for name in args.settings:
            setting = SETTINGS[name]
            tiling = TilingConfig(**setting.tiling)
            videos, forwards, sec = run_setting(pipe, setting, prompts, size, args.steps, guidance)
            boundaries = last_step_boundaries(pipe, size, args.steps, tiling, setting.cache)
            row = summarise(videos, prompts, native_facts, boundaries)
            if setting.upscale_only:
                sketch_detail = row["detail"]
                row["seam"] = None
            row.update(height=size[0], width=size[1], setting=name, forwards_per_step=forwards, seconds=sec,
                       truth_detail=truth_detail)
            results["rows"].append(row)
            sheet_rows.append((name, videos[: args.sheet_clips]))
            lo, hi = row["exactly_one_ci"]
            seam = "n/a" if row["seam"] is None else f"{row['seam']:.2f}"
            ratio = "" if sketch_detail is None else f" ({row['detail'] / sketch_detail:.2f}x / "
            ratio += "" if sketch_detail is None else f"{row['detail'] / truth_detail:.2f}x)"
            print(f"| {size[0]}x{size[1]} ({size[0] * size[1] / area:.2f}x) | {name} | {row['objects_mean']:.2f} | "
                  f"{row['exactly_one']:.0%} [{lo:.0%}, {hi:.0%}] | {row['colour_rel']:.2f} | {row['shape_rel']:.2f} | "
                  f"{row['direction_rel']:.2f} | {seam} | {row['detail']:.2f}{ratio} | {row['flicker']:.4f} | "
                  f"{forwards:.2f} | {sec:.1f} |", flush=True)
        if args.sheet:
            path = args.sheet.with_name(f"{args.sheet.stem}-{size[0]}x{size[1]}{args.sheet.suffix}")
            contact_sheet(sheet_rows, path, f"toy model, {size[0]}x{size[1]}: frames 0 and 8 of the first "
                          f"{args.sheet_clips} prompts per setting")
            print(f"\nsaved {path}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
