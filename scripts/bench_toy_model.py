"""Benchmark the shipped toy model: adherence vs a random model, and tiling settings by seam score.

Prints Markdown tables and saves ``docs/toy_contact_sheet.png``:

1. training summary (from the training run's ``loss.csv``, when ``--train-work`` is given);
2. prompt adherence at the native size: the toy model against the same
   architecture with random weights, same prompts and seeds;
3. tiled generation at about 2x and 3x the native area (48x48 and 56x56 for
   the 32x32 model; square so the sketch stays at the native 32x32), for
   no overlap, overlap, and a shifted grid: seam score at the tile edges of
   the last refinement step, adherence, temporal flicker.

    python scripts/bench_toy_model.py --clips 12 --train-work runs/toy-seed0
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Run this checkout's supergen, not whatever copy happens to be installed.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from supergen import SuperGenPipeline, TilingConfig  # noqa: E402
from supergen.metrics import mean_adherence, seam_score, temporal_flicker  # noqa: E402
from supergen.models import build_toy_wan  # noqa: E402
from supergen.toyworld import all_prompts  # noqa: E402

SETTINGS = {
    "no overlap": dict(overlap=0, shift="none"),
    "overlap 8px": dict(overlap=8, shift="none"),
    "shifted grid": dict(overlap=0, shift="wrap"),
    "overlap 8px + shift": dict(overlap=8, shift="wrap"),
}


def pick_prompts(count: int, seed: int) -> list[str]:
    prompts = all_prompts()
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:count]]


def generate(pipe: SuperGenPipeline, prompts, size: tuple[int, int], steps: int, guidance: float,
             tiling: TilingConfig):
    videos, seconds = [], []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        out = pipe(prompt, height=size[0], width=size[1], num_inference_steps=steps, guidance_scale=guidance, seed=i,
                   tiling=tiling, progress=False)
        seconds.append(time.perf_counter() - t0)
        videos.append(out.frames)
    return videos, float(np.mean(seconds))


def last_step_boundaries(pipe: SuperGenPipeline, size: tuple[int, int], steps: int, tiling: TilingConfig,
                         cache=None) -> tuple[list, list]:
    """Pixel rows/cols where tiles start or end in the last refinement step's plan (``cache``: the run's
    CacheConfig, which sets the default grid schedule)."""
    refine_steps = max(1, round(steps * tiling.strength))
    planner = pipe.plan(height=size[0], width=size[1], tiling=tiling, cache=cache, steps=refine_steps)
    plan = planner.plan(refine_steps - 1)
    scale = pipe.adapter.geometry.scale_spatial
    rows, cols = set(), set()
    for tile in plan.tiles:
        for axis, out in ((1, rows), (2, cols)):
            length = planner.canvas[axis]
            for edge in (tile.start[axis], tile.start[axis] + tile.size[axis]):
                if edge % length:
                    out.add((edge % length) * scale)
    return sorted(rows), sorted(cols)


def training_table(work: Path) -> None:
    rows = list(csv.DictReader((work / "loss.csv").open()))
    print("\n### Training (from %s)\n" % (work / "loss.csv"))
    print("| phase | steps | wall time | loss at start | loss at end (mean of last 10 logs) |")
    print("|---|---|---|---|---|")
    for phase, label in (("vae", "VAE (reconstruction MSE, [-1,1] pixels)"), ("dit", "transformer (flow-matching MSE)")):
        pts = [r for r in rows if r["phase"] == phase]
        if not pts:
            continue
        tail = np.mean([float(r["loss"]) for r in pts[-10:]])
        print(f"| {label} | {pts[-1]['step']} | {float(pts[-1]['elapsed_s']) / 60:.1f} min | {float(pts[0]['loss']):.4f} | {tail:.4f} |")


def contact_sheet(pipe: SuperGenPipeline, path: Path, steps: int, guidance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = pick_prompts(6, seed=123)
    rows = []
    for i, prompt in enumerate(prompts):
        native = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=guidance, seed=i,
                      tiling=TilingConfig(strength=1.0), progress=False).frames
        tiled = pipe(prompt, height=56, width=56, num_inference_steps=steps, guidance_scale=guidance, seed=i,
                     tiling=TilingConfig(overlap=8, shift="wrap"), progress=False).frames
        rows.append((prompt, native, tiled))
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 1.5 * len(rows)), gridspec_kw={"width_ratios": [1, 1]})
    for (prompt, native, tiled), (ax_n, ax_t) in zip(rows, axes):
        ax_n.imshow(np.concatenate(list(native[::2]), axis=1), interpolation="nearest")
        ax_n.set_title(f"native 32x32: {prompt}", fontsize=8)
        ax_t.imshow(np.concatenate(list(tiled[::2]), axis=1), interpolation="nearest")
        ax_t.set_title("tiled 56x56 (overlap 8px + shift)", fontsize=8)
        for ax in (ax_n, ax_t):
            ax.axis("off")
    fig.suptitle("toy model (--model toy): frames 0, 2, 4, 6, 8", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nsaved {path}")


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 48x48") from None
    return height, width


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--clips", type=int, default=24, help="prompts per setting (one seed each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None,
                        help="CFG scale for the tiling rows and the contact sheet (default: the model's own default)")
    parser.add_argument("--guidance-sweep", default="1,3,5,7", help="CFG scales for the native adherence table")
    parser.add_argument("--sizes", type=parse_size, nargs="+",
                        default=[(48, 48), (56, 56), (32, 64), (32, 96)],
                        help="tiled canvases HxW; 32x64 and 32x96 are exact 2x and 3x grids of 32x32 tiles")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-work", type=Path, help="training work folder with loss.csv")
    parser.add_argument("--sheet", type=Path, default=REPO / "docs" / "toy_contact_sheet.png")
    parser.add_argument("--json", type=Path, help="also write every table's numbers here")
    parser.add_argument("--skip-tiling", action="store_true")
    parser.add_argument("--strengths", default="0.5,0.7,0.9",
                        help="refinement strengths for the strength table (empty: skip it)")
    parser.add_argument("--strength-size", type=parse_size, default=(64, 64))
    parser.add_argument("--only-strength", action="store_true", help="print only the strength table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    import platform

    toy = SuperGenPipeline.from_pretrained(args.model, device="cpu")
    guidance = args.guidance if args.guidance is not None else toy.default_guidance_scale
    sweep = [float(g) for g in args.guidance_sweep.split(",") if g]
    print(f"hardware: {platform.processor() or platform.machine()}, torch threads {args.threads}; "
          f"{args.clips} prompts x 1 seed, {args.steps} steps, guidance {guidance} (native table: {sweep})")
    results: dict = {"clips": args.clips, "steps": args.steps, "guidance": guidance, "native": [], "tiled": []}
    if args.train_work:
        training_table(args.train_work)

    native_size = (toy.adapter.native_height, toy.adapter.native_width, toy.adapter.native_num_frames)
    prompts = pick_prompts(args.clips, seed=0)
    strengths = [float(v) for v in args.strengths.split(",") if v]
    if strengths:
        h, w = args.strength_size
        print(f"\n### Refinement strength ({h}x{w}, guidance {guidance:g}, no overlap)\n")
        print("| strength | shift | adherence | colour | shape | direction | flicker | s / clip |")
        print("|---|---|---|---|---|---|---|---|")
        results["strength"] = []
        for shift in ("wrap", "none"):
            for strength in strengths:
                videos, sec = generate(toy, prompts, (h, w), args.steps, guidance,
                                       TilingConfig(strength=strength, shift=shift))
                acc = mean_adherence(videos, prompts)
                flicker = float(np.mean([temporal_flicker(v) for v in videos]))
                results["strength"].append(dict(height=h, width=w, strength=strength, shift=shift, flicker=flicker,
                                                seconds=sec, **acc))
                print(f"| {strength:g} | {shift} | {acc['score']:.2f} | {acc['colour']:.2f} | {acc['shape']:.2f} | "
                      f"{acc['direction']:.2f} | {flicker:.4f} | {sec:.2f} |", flush=True)
    if args.only_strength:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    random_pipe = SuperGenPipeline.from_pipe(build_toy_wan(seed=0), native_size=native_size)
    native = TilingConfig(strength=1.0)
    print(f"\n### Prompt adherence at the native size ({native_size[0]}x{native_size[1]}, {native_size[2]} frames)\n")
    print("| model | guidance | colour | shape | direction | score | s / clip |")
    print("|---|---|---|---|---|---|---|")
    for name, pipe in (("toy (trained)", toy), ("same architecture, random weights", random_pipe)):
        for g in sweep:
            videos, sec = generate(pipe, prompts, native_size[:2], args.steps, g, native)
            acc = mean_adherence(videos, prompts)
            results["native"].append(dict(model=name, guidance=g, seconds=sec, **acc))
            print(f"| {name} | {g:g} | {acc['colour']:.2f} | {acc['shape']:.2f} | {acc['direction']:.2f} | "
                  f"{acc['score']:.2f} | {sec:.2f} |", flush=True)

    if not args.skip_tiling:
        print(f"\n### Tiled generation (toy model; guidance {guidance:g}; sketch at the native area, strength 0.9)\n")
        print("| canvas (area) | setting | tiles/step | seam score | adherence | colour | shape | direction | flicker | s / clip |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        area = native_size[0] * native_size[1]
        for size in args.sizes:
            for name, kwargs in SETTINGS.items():
                tiling = TilingConfig(**kwargs)
                tiles = len(toy.plan(height=size[0], width=size[1], tiling=tiling).plan(0).tiles)
                rows, cols = last_step_boundaries(toy, size, args.steps, tiling)
                videos, sec = generate(toy, prompts, size, args.steps, guidance, tiling)
                seam = float(np.mean([seam_score(v, rows=rows, cols=cols) for v in videos])) if rows or cols else None
                flicker = float(np.mean([temporal_flicker(v) for v in videos]))
                acc = mean_adherence(videos, prompts)
                results["tiled"].append(dict(height=size[0], width=size[1], setting=name, tiles=tiles, seam=seam,
                                             flicker=flicker, seconds=sec, **acc))
                seam_text = "n/a" if seam is None else f"{seam:.3f}"
                print(f"| {size[0]}x{size[1]} ({size[0] * size[1] / area:.2f}x) | {name} | {tiles} | {seam_text} | "
                      f"{acc['score']:.2f} | {acc['colour']:.2f} | {acc['shape']:.2f} | {acc['direction']:.2f} | "
                      f"{flicker:.4f} | {sec:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.sheet:
        contact_sheet(toy, args.sheet, args.steps, guidance)


if __name__ == "__main__":
    main()
