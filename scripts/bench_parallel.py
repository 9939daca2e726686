"""Tile parallelism benchmark: measured on this CPU, modelled for 1..64 GPUs.

Part 1 (measured): the tiny Wan model at 3x its native size (9 tiles), one
process against two gloo processes, for the region and all-gather exchanges:
seconds per denoising step and bytes per rank per step (the counts the
engine reports in ``comm_bytes_steps``). One torch thread per process: on a
CPU shared with other jobs, a process with several threads spends its time in
OpenMP barriers, which would flatter the multi-process runs.

Part 2 (modelled): Wan2.1-1.3B and 14B at 2K (1088x1920) and 4K (2160x3840),
81 frames. Bytes per rank per step come from the engine's own geometry code
(``RegionLayout``, ``assign_tiles``, ``StepExchange``) on the real canvases
and tiles, averaged over sampled steps of a 45-step refinement; the all-gather
bytes are those of a ring all-gather of bf16 tile outputs. Per-tile compute
comes from the transformer's FLOPs (configs in docs/design.md) at an assumed
sustained throughput, since no GPU was measured here. Step time on N ranks =
busiest rank's tiles x tile time + its bytes / link bandwidth (no overlap of
communication with compute assumed: a lower bound on efficiency).

Usage: python scripts/bench_parallel.py [--skip-measure] [--out docs/bench_parallel.png]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# --- part 2 assumptions ---------------------------------------------------------------------------
MODELS = {
    # layers, dim, ffn, native latent (H, W) at the native pixel size
    "Wan2.1-1.3B": dict(layers=30, dim=1536, ffn=8960, native=(60, 104)),
    "Wan2.1-14B": dict(layers=40, dim=5120, ffn=13824, native=(90, 160)),
}
RESOLUTIONS = {"2K": (1088, 1920), "4K": (2160, 3840)}
LATENT_FRAMES = 21  # 81 frames
CHANNELS = 16
TEXT_TOKENS = 512
#: H100 SXM dense bf16 peak 989 TFLOP/s at an assumed 40% sustained utilisation.
GPU_FLOPS = 0.40 * 989e12
#: Effective per-GPU, per-direction bandwidths (links are full duplex, so a rank's
#: sent and received bytes move at the same time).
LINKS = {
    "NVLink": 300e9,  # H100 NVLink 4: 450 GB/s per direction nominal, ~300 GB/s achieved
    "PCIe": 25e9,  # PCIe Gen5 x16 P2P through the host bridge
    "400Gb/s": 50e9,  # one 400 Gb/s NIC per GPU (InfiniBand NDR)
    "100Gb/s": 12.5e9,  # one 100 Gb/s NIC per GPU
}
WORLDS = (1, 2, 4, 8, 16, 32, 64)
REFINE_STEPS = 45  # SuperGen: 45 of 50 steps refined
SAMPLED_STEPS = range(0, REFINE_STEPS, 5)  # the geometry's cost is in building plans; every 5th step


def tile_flops(layers: int, dim: int, ffn: int, tokens: int) -> float:
    """Forward FLOPs of one tile with classifier-free guidance (two branches)."""
    per_layer = (
        4 * 2 * tokens * dim * dim  # self-attention q, k, v, o projections
        + 2 * 2 * tokens * tokens * dim  # QK^T and attention x V
        + 2 * 2 * tokens * dim * dim  # cross-attention q, o projections
        + 2 * 2 * TEXT_TOKENS * dim * dim  # cross-attention k, v of the text
        + 2 * 2 * tokens * TEXT_TOKENS * dim  # cross-attention scores and values
        + 2 * 2 * tokens * dim * ffn  # feed-forward
    )
    return 2 * layers * per_layer


def balanced_overlap(canvas, tile, multiple: int = 8) -> tuple[int, int, int]:
    """The smallest (H, W) overlap, in cells, that makes the tile count a multiple of ``multiple``.

    Native tilings (4, 9, 25 tiles) leave ranks idle on 8 GPUs; overlapping
    tiles a little more gives 8, 16 or 40 tiles that spread evenly.
    """
    from supergen.tiling import TilePlanner

    best = None
    for oh in range(0, tile[1], 2):
        for ow in range(0, tile[2], 2):
            n = TilePlanner(canvas, tile, (0, oh, ow), align=(1, 2, 2), shift="wrap").num_tiles
            if n % multiple == 0 and (best is None or (n, oh + ow) < best[0]):
                best = ((n, oh + ow), (0, oh, ow))
    return best[1]


def model_geometry(native: tuple[int, int], size: tuple[int, int], balanced: bool):
    """Bytes per rank per step (region: max over ranks; all-gather) and tiles, for each world size."""
    from supergen.parallel.layout import RegionLayout, StepExchange, allgather_bytes, assign_tiles, tile_costs
    from supergen.tiling import TilePlanner

    canvas = (LATENT_FRAMES, size[0] // 8, size[1] // 8)
    tile = (LATENT_FRAMES, *native)
    overlap = balanced_overlap(canvas, tile) if balanced else (0, 0, 0)
    planner = TilePlanner(canvas, tile, overlap, align=(1, 2, 2), blend="cosine", shift="wrap")
    rows = {}
    for world in WORLDS:
        if world == 1:
            rows[world] = dict(tiles=planner.num_tiles, busiest=planner.num_tiles, region=0.0, allgather=0.0, splits=(1, 1, 1))
            continue
        layout = RegionLayout.choose(planner, world, steps=len(SAMPLED_STEPS))
        region, ring, busiest = [], [], 0
        for step in SAMPLED_STEPS:
            plan = planner.plan(step)
            owners = assign_tiles(tile_costs(plan), layout.affinity(plan), world)
            region.append(max(StepExchange(layout, plan, owners).bytes_per_rank(CHANNELS, itemsize=4)))
            ring.append(allgather_bytes(owners, world, CHANNELS * plan.tiles[0].num_cells, itemsize=2)[0])
            busiest = max(busiest, max(owners.count(r) for r in range(world)))
        rows[world] = dict(tiles=planner.num_tiles, busiest=busiest, region=sum(region) / len(region),
                           allgather=sum(ring) / len(ring), splits=layout.splits)
    return rows, overlap


def modelled_tables() -> tuple[str, dict]:
    lines, curves = [], {}
    lines.append(
        f"Modelled: per-tile compute from FLOPs at {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained (40% of H100 bf16 peak); "
        "bytes from the engine's geometry code; links per GPU and direction: "
        + ", ".join(f"{k} {v / 1e9:g} GB/s" for k, v in LINKS.items())
        + ". Region bytes: float32 halos, busiest rank; all-gather: bf16 tile outputs, ring. No comm/compute overlap assumed.\n"
    )
    for name, cfg in MODELS.items():
        tokens = LATENT_FRAMES * cfg["native"][0] * cfg["native"][1] // 4
        t_tile = tile_flops(cfg["layers"], cfg["dim"], cfg["ffn"], tokens) / GPU_FLOPS
        for (res, size), balanced in [(r, b) for r in RESOLUTIONS.items() for b in (False, True)]:
            started = time.perf_counter()
            geo, overlap = model_geometry(cfg["native"], size, balanced)
            tiling = f"overlap {overlap[1] * 8}x{overlap[2] * 8} px (tile count a multiple of 8)" if balanced else "no overlap"
            lines.append(
                f"\n{name} {res} ({size[1]}x{size[0]}, 81 frames): {geo[1]['tiles']} tiles of "
                f"{cfg['native'][0] * 8}x{cfg['native'][1] * 8} px, {tiling}, {t_tile:.2f} s per tile-step "
                f"(modelled); geometry {time.perf_counter() - started:.0f}s\n"
            )
            head = "| GPUs | regions FxHxW | busiest rank tiles | region MB/step/rank | all-gather MB/step/rank | ratio |"
            head += "".join(f" eff {k} region / all-gather |" for k in LINKS)
            lines.append(head)
            lines.append("|" + "---|" * (6 + len(LINKS)))
            for world, g in geo.items():
                serial = g["tiles"] * t_tile
                cells = []
                for link, bw in LINKS.items():
                    eff = []
                    for scheme in ("region", "allgather"):
                        step = g["busiest"] * t_tile + g[scheme] / 2 / bw
                        eff.append(serial / (world * step))
                        if not balanced:
                            curves.setdefault((name, res, link, scheme), []).append((world, eff[-1]))
                    cells.append(f" {eff[0]:.0%} / {eff[1]:.0%} |")
                ratio = f"{g['allgather'] / g['region']:.1f}x" if g["region"] else "-"
                lines.append(
                    f"| {world} | {'x'.join(map(str, g['splits']))} | {g['busiest']} | {g['region'] / 1e6:.1f} | "
                    f"{g['allgather'] / 1e6:.1f} | {ratio} |" + "".join(cells)
                )
    return "\n".join(lines), curves


# --- part 1: measured on this machine ----------------------------------------------------------------
PROMPT = "a red circle moving left over a blue sky"
MEASURE = dict(height=192, width=288, num_inference_steps=6)


def worker(exchange: str, threads: int, cfg: int = 0, ulysses: int = 0, save: str = "") -> None:
    import numpy as np
    import torch

    from supergen import ParallelConfig, SuperGenPipeline, TilingConfig
    from supergen.parallel import distributed_session

    torch.set_num_threads(threads)
    parallel = ParallelConfig(exchange=exchange, parallel="tile", cfg_parallel=cfg or None, ulysses=ulysses or None)
    with distributed_session(ParallelConfig(timeout_s=600)) as ctx:
        pipe = SuperGenPipeline.from_pretrained("tiny")
        # Branches one after the other in every run, so that CFG parallel does the same arithmetic as one process.
        pipe.adapter.batch_cfg = not save
        kw = dict(MEASURE, tiling=TilingConfig(strength=1.0), output_type="latent", progress=False)
        pipe(PROMPT, context=ctx, parallel=parallel, **dict(kw, num_inference_steps=1))  # warm-up
        res = pipe(PROMPT, context=ctx, parallel=parallel, **kw)
    if ctx.is_main:
        m = res.metrics
        if save:
            np.save(save, res.frames.numpy())
        print("RESULT " + json.dumps(dict(
            world=ctx.world_size, exchange=exchange, s_per_step=m["denoise_s_per_step"],
            bytes_per_step=max(m["comm_bytes_per_step"]) if ctx.enabled else 0,
            plan=m.get("parallel_plan", {}).get("describe", "one process"),
        )))


def _launch(world: int, exchange: str, cfg: int = 0, ulysses: int = 0, save: str = "") -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "--worker", exchange, "1", str(cfg), str(ulysses), save]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"worker failed:\n{err}")
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measured_table(repeats: int) -> str:
    runs = [(1, "region"), (2, "region"), (2, "allgather")]
    results = []
    # Interleaved repeats, best of each: other jobs on a shared CPU only ever slow a run down.
    for _ in range(repeats):
        results.append([_launch(w, x) for w, x in runs])
    results = [min(col, key=lambda r: r["s_per_step"]) for col in zip(*results)]
    base = results[0]["s_per_step"]
    lines = [
        f"Measured: tiny Wan model, {MEASURE['width']}x{MEASURE['height']} px (9 tiles of 96x64), "
        f"{MEASURE['num_inference_steps']} steps, gloo, one torch thread per process, best of {repeats} "
        "interleaved runs.\n",
        "| processes | exchange | s/step | speed-up | bytes/step/rank |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['world']} | {r['exchange'] if r['world'] > 1 else '-'} | {r['s_per_step']:.3f} | "
            f"{base / r['s_per_step']:.2f}x | {r['bytes_per_step'] / 1e3:.1f} kB |"
        )
    return "\n".join(lines)


# --- hybrid plans (tile x CFG x Ring x Ulysses) --------------------------------------------------------
HEADS = {"Wan2.1-1.3B": 12, "Wan2.1-14B": 40}
GOAL = 0.90


def _hybrid_workload(name: str, size: tuple[int, int]):
    from functools import lru_cache

    from supergen.parallel.layout import exchange_bytes
    from supergen.parallel.plan import Workload
    from supergen.tiling import TilePlanner

    cfg = MODELS[name]
    canvas = (LATENT_FRAMES, size[0] // 8, size[1] // 8)
    tile = (LATENT_FRAMES, *cfg["native"])
    planner = TilePlanner(canvas, tile, (0, 0, 0), align=(1, 2, 2), blend="cosine", shift="wrap")

    @lru_cache(maxsize=None)
    def moved(world: int) -> float:
        return exchange_bytes(planner, world, 3, CHANNELS)

    tokens = LATENT_FRAMES * cfg["native"][0] * cfg["native"][1] // 4
    # On H100 the attention runs on flash or cuDNN, which return the log-sum-exp that ring attention needs.
    return Workload(tiles=planner.num_tiles, tile_tokens=tokens, tile_numel=CHANNELS * LATENT_FRAMES * cfg["native"][0]
                    * cfg["native"][1], layers=cfg["layers"], dim=cfg["dim"], heads=HEADS[name], ffn=cfg["ffn"],
                    ring_ok=True, model=name, exchange_bytes=moved)


def _why_short(plan, w, eff: float) -> str:
    """Why a count misses the goal, from the plan's own limits."""
    from supergen.parallel.plan import _divisors

    if eff >= GOAL:
        return ""
    ctx_max = max(d for d in _divisors(plan.world_size) if w.tile_tokens % d == 0 and any(
        (d % u == 0 and w.heads % u == 0) for u in _divisors(d)))
    loaded = w.tiles / (plan.tile * -(-w.tiles // plan.tile))
    return (f"{w.tiles} tiles on {plan.tile} tile groups load {loaded:.0%}; sequence split capped at {ctx_max} ranks "
            f"(tokens {w.tile_tokens}, heads {w.heads}), CFG at 2")


def hybrid_modelled_table() -> str:
    from supergen.parallel.plan import NVLINK_BYTES_S, choose_plan, step_time

    lines = [
        f"Modelled hybrid plans (H100 SXM, {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained bf16 = 40% of peak; NVLink "
        f"{NVLINK_BYTES_S / 1e9:g} GB/s per GPU and direction; no comm/compute overlap; 81 frames, native tiling "
        f"without overlap, CFG on; ring attention assumed available, flash/cuDNN). Efficiency = one GPU's step time "
        f"/ (GPUs x step time); bytes = busiest rank's tile exchange + CFG combine + Ulysses/Ring all-to-alls, per step.\n",
    ]
    for name in MODELS:
        for res, size in RESOLUTIONS.items():
            w = _hybrid_workload(name, size)
            lines += [f"\n{name} {res} ({size[1]}x{size[0]}): {w.tiles} tiles of {w.tile_tokens} tokens, "
                      f"{w.heads} heads\n",
                      "| GPUs | chosen plan (tile x cfg x ring x ulysses) | step s | efficiency | GB/rank/step | "
                      "tile-only efficiency | below 90% because |",
                      "|---|---|---|---|---|---|---|"]
            for world in WORLDS:
                plan = choose_plan(world, w)
                t = step_time(plan, w)
                from supergen.parallel.plan import ParallelPlan

                tile_only = step_time(ParallelPlan(tile=world), w)["efficiency"]
                lines.append(f"| {world} | {plan.tile} x {plan.cfg} x {plan.ring} x {plan.ulysses} | {t['step_s']:.2f} | "
                             f"{t['efficiency']:.1%} | {t['bytes'] / 1e9:.2f} | {tile_only:.0%} | "
                             f"{_why_short(plan, w, t['efficiency'])} |")
    return "\n".join(lines)


HYBRID_RUNS = [(1, 0, 0), (2, 0, 0), (2, 2, 0), (2, 1, 2), (4, 2, 0), (4, 2, 2)]


def hybrid_measured_table() -> str:
    import tempfile

    import numpy as np

    lines = [
        f"Measured on this machine (gloo, one torch thread per process, tiny Wan, {MEASURE['width']}x"
        f"{MEASURE['height']} px = 9 tiles, {MEASURE['num_inference_steps']} steps, CFG branches run one after the "
        "other in every run): correctness and overhead, not speed (2 shared cores for up to 4 processes).\n",
        "| processes | plan | s/step | time vs 1 process | tile-exchange bytes/step/rank | max abs diff vs 1 process |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for world, cfg, uly in HYBRID_RUNS:
            save = str(Path(tmp) / f"{world}-{cfg}-{uly}.npy")
            r = _launch(world, "region", cfg=cfg, ulysses=uly, save=save)
            r["latents"] = np.load(save)
            results.append(r)
        ref = results[0]
        for r in results:
            diff = float(np.abs(r["latents"] - ref["latents"]).max())
            lines.append(f"| {r['world']} | {r['plan']} | {r['s_per_step']:.3f} | {r['s_per_step'] / ref['s_per_step']:.2f}x | "
                         f"{r['bytes_per_step'] / 1e3:.1f} kB | {diff:.1e} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS) * len(RESOLUTIONS), figsize=(16, 4), sharey=True)
    for ax, (name, res) in zip(axes, [(m, r) for m in MODELS for r in RESOLUTIONS]):
        for link in LINKS:
            for scheme, style in (("region", "-"), ("allgather", ":")):
                pts = curves[(name, res, link, scheme)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{link} {scheme}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} {res}")
        ax.set_xlabel("GPUs")
    axes[0].set_ylabel("parallel efficiency (modelled, no overlap tiling)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] if len(sys.argv) > 6 else "")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-measure", action="store_true", help="only the modelled tables")
    parser.add_argument("--skip-model", action="store_true", help="only the measured table")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the measured runs (best kept)")
    parser.add_argument("--out", default=None, help="save an efficiency plot here (png)")
    parser.add_argument("--hybrid", action="store_true",
                        help="only the hybrid-plan tables (tile x CFG x Ulysses): modelled, and measured on gloo")
    args = parser.parse_args()
    if args.hybrid:
        print(hybrid_modelled_table())
        if not args.skip_measure:
            print()
            print(hybrid_measured_table())
        return
    if not args.skip_measure:
        print(measured_table(args.repeats))
        print()
    if args.skip_model:
        return
    text, curves = modelled_tables()
    print(text)
    if args.out:
        plot(curves, Path(args.out))
        print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
