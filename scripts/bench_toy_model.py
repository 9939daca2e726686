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


def generate(pipe: SuperGenPipeline, prompts, size: int, steps: int, guidance: float, tiling: TilingConfig):
    videos, seconds = [], []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        out = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, seed=i,
                   tiling=tiling, progress=False)
        seconds.append(time.perf_counter() - t0)
        videos.append(out.frames)
    return videos, float(np.mean(seconds))


def last_step_boundaries(pipe: SuperGenPipeline, size: int, steps: int, tiling: TilingConfig) -> tuple[list, list]:
    """Pixel rows/cols where tiles start or end in the last refinement step's plan."""
    planner = pipe.plan(height=size, width=size, tiling=tiling)
    refine_steps = max(1, round(steps * tiling.strength))
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--clips", type=int, default=12, help="prompts per setting (one seed each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-work", type=Path, help="training work folder with loss.csv")
    parser.add_argument("--sheet", type=Path, default=REPO / "docs" / "toy_contact_sheet.png")
    parser.add_argument("--skip-tiling", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    import platform

    print(f"hardware: {platform.processor() or platform.machine()}, torch threads {args.threads}; "
          f"{args.clips} prompts x 1 seed, {args.steps} steps, guidance {args.guidance}")
    if args.train_work:
        training_table(args.train_work)

    toy = SuperGenPipeline.from_pretrained(args.model, device="cpu")
    random_pipe = SuperGenPipeline.from_pipe(build_toy_wan(seed=0), native_size=(32, 32, 9))
    prompts = pick_prompts(args.clips, seed=0)
    native = TilingConfig(strength=1.0)
    print("\n### Prompt adherence at the native size (32x32, 9 frames)\n")
    print("| model | colour | shape | direction | score | s / clip |")
    print("|---|---|---|---|---|---|")
    for name, pipe in (("toy (trained)", toy), ("same architecture, random weights", random_pipe)):
        videos, sec = generate(pipe, prompts, 32, args.steps, args.guidance, native)
        acc = mean_adherence(videos, prompts)
        print(f"| {name} | {acc['colour']:.2f} | {acc['shape']:.2f} | {acc['direction']:.2f} | {acc['score']:.2f} | {sec:.2f} |")

    if not args.skip_tiling:
        print("\n### Tiled generation (toy model; sketch 32x32, strength 0.9, rope local)\n")
        print("| canvas (area) | setting | tiles/step | seam score | adherence | colour | shape | direction | flicker | s / clip |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for size in (48, 56):
            for name, kwargs in SETTINGS.items():
                tiling = TilingConfig(**kwargs)
                tiles = len(toy.plan(height=size, width=size, tiling=tiling).plan(0).tiles)
                rows, cols = last_step_boundaries(toy, size, args.steps, tiling)
                videos, sec = generate(toy, prompts, size, args.steps, args.guidance, tiling)
                seam = np.mean([seam_score(v, rows=rows, cols=cols) for v in videos])
                flicker = np.mean([temporal_flicker(v) for v in videos])
                acc = mean_adherence(videos, prompts)
                print(f"| {size}x{size} ({size * size / 1024:.2f}x) | {name} | {tiles} | {seam:.3f} | {acc['score']:.2f} | "
                      f"{acc['colour']:.2f} | {acc['shape']:.2f} | {acc['direction']:.2f} | {flicker:.4f} | {sec:.2f} |")
    if args.sheet:
        contact_sheet(toy, args.sheet, args.steps, args.guidance)


if __name__ == "__main__":
    main()
