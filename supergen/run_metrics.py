"""What a tiled run did, in the design's metrics schema (``--metrics-json``, ``SuperGenOutput.metrics``).

:func:`run_metrics` puts together the tiles' counts, the cache's settings and
reuse map, the sketch's counts, the parallel plan and the bytes every rank
moved (a collective: every rank calls it), the stage times and peak memory.
"""

from __future__ import annotations

import resource
import time

import torch

from supergen.cache import RegionCache
from supergen.config import CacheConfig
from supergen.samplers.tiled import TileStats
from supergen.stages import ResolvedRun, reuse_mode


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this process on ``device`` (CUDA: allocated by torch; CPU: resident set)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux: the process's peak resident set.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_metrics(adapter, run: ResolvedRun) -> dict:
    """What the run did: tiles, cache, sketch, parallel plan and bytes, stage times, peak memory."""
    request, stats, planner = run.request, run.sampler.stats, run.planner
    metrics = {
        "model": type(adapter.pipeline).__name__,
        "world_size": 1,
        "height": request.height,
        "width": request.width,
        "num_frames": request.num_frames,
        "steps": run.config.num_inference_steps,
        "strength": run.tiling.strength,
        "tiles": {**stats.as_dict(), "grid": list(planner.grid), "tile_latent": list(planner.tile)},
        "comm_bytes": [0],
        "cache": cache_metrics(run.config.cache, run.region_cache),
    }
    if run.sketch_stats is not None:
        metrics["sketch"] = {"steps_total": run.sketch_stats.tile_steps_total,
                             "steps_computed": run.sketch_stats.tile_steps_computed,
                             "model_calls": run.sketch_stats.model_calls}
    if run.context is not None:
        metrics.update(parallel_metrics(run.context, run.executor, stats, run.hybrid))
    timings = run.timings
    metrics.update(
        wall_s=time.perf_counter() - run.started,
        sketch_s=timings.get("sketch", 0.0),
        denoise_s=timings["refine"],
        denoise_s_per_step=timings["refine"] / max(1, run.refine_steps),
        decode_s=timings["decode"],
        peak_mem_bytes=peak_memory_bytes(adapter.device),
    )
    return metrics


def cache_metrics(cache: CacheConfig, region_cache: RegionCache | None) -> dict:
    """The cache settings and, when it ran, where it reused outputs: per step, the reused fraction of
    every region (F, H, W grid of regions) and the regions' final thresholds."""
    metrics = {
        "mode": cache.mode if cache.enabled else "off",
        "threshold": cache.threshold,
        "shift_threshold": cache.shift_threshold,
        "grid": cache.grid,
        "warmup": cache.warmup,
        "cooldown": cache.cooldown,
        "max_skips": cache.max_skips,
        "adaptive": cache.adaptive,
        "reuse": reuse_mode(cache),
    }
    if region_cache is not None:
        metrics.update(
            threshold_used=region_cache.threshold,
            region_grid=list(region_cache.grid),
            region_skip_map=[m.tolist() for m in region_cache.region_reuse],
            region_thresholds=region_cache.thresholds().tolist(),
        )
    return metrics


def parallel_metrics(context, executor, stats: TileStats, hybrid) -> dict:
    """Counts summed over tile groups and bytes per rank (collective: every rank calls it)."""
    comm = executor.comm_summary()
    steps = context.gather_ints(comm["per_step"])
    # A tile group's ranks (CFG branches, sequence shards) all take part in its tiles: count each once.
    lead = int(hybrid.leader)
    cfg_bytes = hybrid.cfg.bytes if hybrid.cfg is not None else 0
    totals = context.gather_ints([comm["total"] + cfg_bytes, lead * stats.tile_steps_computed,
                                  lead * stats.model_calls, lead * stats.view_forwards, stats.tile_steps_computed])
    return {
        "parallel_plan": dict(hybrid.plan.as_dict(), world_size=hybrid.plan.world_size,
                              describe=hybrid.plan.describe()),
        "world_size": context.world_size,
        "comm_scheme": comm["scheme"],
        "comm_bytes": [t[0] for t in totals],
        "comm_bytes_steps": steps,
        "comm_bytes_per_step": [sum(s) / max(1, len(s)) for s in steps],
        "tiles": {
            "count": stats.count,
            "tile_steps_total": stats.tile_steps_total,
            "tile_steps_computed": sum(t[1] for t in totals),
            "tile_steps_skipped": stats.tile_steps_total - sum(t[1] for t in totals),
            "model_calls": sum(t[2] for t in totals),
            "view_forwards": sum(t[3] for t in totals),
            "tile_steps_per_rank": [t[4] for t in totals],
            "skip_map": stats.skip_map,
            "grid": list(executor.planner.grid),
            "tile_latent": list(executor.planner.tile),
        },
    }
