"""One rank of a multi-process test job (started by tests/test_parallel.py with torchrun's variables).

Usage: python tests/parallel_worker.py SCENARIO OUTDIR
  equal     run the region and all-gather schemes; rank 0 saves frames and metrics
  mismatch  every rank asks for a different seed (must be refused on every rank)
  fault     rank 1 raises in its second refinement model call (every rank must exit non-zero fast)
  stall     rank 1 stops itself (SIGSTOP) there instead; $SUPERGEN_TEST_TIMEOUT sets the job's timeout
  cache     the region cache on the region and all-gather schemes; rank 0 saves latents and metrics
  coherence sketch guidance and global views (all-gather scheme, views spread over ranks); rank 0 saves latents
  hybrid    tile x CFG x Ulysses plans from $SUPERGEN_TEST_PLANS (see there); rank 0 saves latents and metrics
  backbones every non-Wan backbone of tests/test_backbones.py at twice its native area; rank 0 saves latents
  cp-state  Ulysses 2 (Diffusers' context parallelism); every rank saves the pipeline's hooks during and after
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from supergen import CoherenceConfig, ParallelConfig, SuperGenPipeline, TilingConfig
from supergen.io import write_video
from supergen.parallel import distributed_session

PROMPT = "a red circle moving left over a blue sky"
# 9 overlapping tiles (3x3 with 2-cell overlaps, wrap-shifted): blending with
# up to four tiles per cell, tiles crossing region borders every step.
TILING = TilingConfig(overlap=16)
KW = dict(height=128, width=192, num_inference_steps=3, progress=False)
# The exchange scenarios test the region scheme, which global coherence (all-gather only) would replace.
NO_COHERENCE = CoherenceConfig(guide="none")
COHERENCE = CoherenceConfig(guide="lowpass", views="dilated", view_until=1.0)


def _cache_config(grid: str = "held"):
    from supergen import CacheConfig

    # The default reuse (output) and exchange (region); a threshold loose enough that the tiny random
    # model reuses tiles within 8 steps, on the default tiling (no overlap, wrap-shifted grid).
    return CacheConfig(mode="region", threshold=1.0, warmup=2, max_skips=2, grid=grid)


CACHE = _cache_config()
CACHE_TILING = TilingConfig()


def main(scenario: str, out: Path) -> None:
    torch.set_num_threads(1)
    timeout_s = float(os.environ.get("SUPERGEN_TEST_TIMEOUT", "120"))
    with distributed_session(ParallelConfig(timeout_s=timeout_s)) as ctx:
        pipe = SuperGenPipeline.from_pretrained("tiny")
        if scenario == "equal":
            # Frames (through the distributed decode) for one scheme, latents for the other: decodes are slow on CPU.
            for exchange, output_type in (("region", "float"), ("allgather", "latent")):
                res = pipe(PROMPT, tiling=TILING, output_type=output_type, parallel=ParallelConfig(exchange=exchange, parallel="tile"),
                           coherence=NO_COHERENCE, context=ctx, **KW)
                if ctx.is_main:
                    np.save(out / f"{exchange}.npy", np.asarray(res.frames))
                    (out / f"{exchange}.json").write_text(json.dumps(res.metrics))
                else:
                    assert (res.frames is None) == (output_type != "latent")
        elif scenario == "mismatch":
            try:
                pipe(PROMPT, tiling=TILING, seed=ctx.rank, context=ctx, **KW)
            except ValueError as err:
                (out / f"refused-{ctx.rank}.txt").write_text(str(err))
                raise
        elif scenario in ("fault", "stall"):
            calls = []

            def fail_in_refinement(*_):
                calls.append(1)
                # The 3-step sketch makes calls 1-3 on every rank; call 5 is mid-refinement.
                if ctx.rank == 1 and len(calls) == 5:
                    (out / f"{scenario}-time.txt").write_text(repr(time.time()))
                    if scenario == "stall":
                        os.kill(os.getpid(), signal.SIGSTOP)  # hangs without raising: only heartbeats can tell
                    raise RuntimeError("injected fault on rank 1")

            pipe.pipe.transformer.register_forward_hook(fail_in_refinement)
            # $SUPERGEN_TEST_CFG_PARALLEL=2: the peer is then blocked in the CFG combine, not the tile exchange.
            cfg = int(os.environ.get("SUPERGEN_TEST_CFG_PARALLEL", "0")) or None
            res = pipe(PROMPT, tiling=TILING, context=ctx, parallel=ParallelConfig(cfg_parallel=cfg), **KW)
        elif scenario == "cache":
            # $SUPERGEN_TEST_CACHE_GRID: the cache's grid schedule (CacheConfig.grid).
            cache = _cache_config(os.environ.get("SUPERGEN_TEST_CACHE_GRID", "held"))
            for exchange in ("region", "allgather"):
                res = pipe(PROMPT, tiling=CACHE_TILING, output_type="latent", cache=cache, context=ctx,
                           coherence=NO_COHERENCE, parallel=ParallelConfig(exchange=exchange, parallel="tile"),
                           **dict(KW, num_inference_steps=8))
                if ctx.is_main:
                    np.save(out / f"cache-{exchange}.npy", res.frames.numpy())
                    (out / f"cache-{exchange}.json").write_text(json.dumps(res.metrics))
        elif scenario == "coherence":
            # Global views on the all-gather scheme; the default sketch guidance on the region scheme.
            for name, coherence, exchange in (("coherence", COHERENCE, "allgather"),
                                              ("guide-region", CoherenceConfig(), "region")):
                res = pipe(PROMPT, tiling=TILING, output_type="latent", coherence=coherence, context=ctx,
                           parallel=ParallelConfig(exchange=exchange, parallel="tile"), **KW)
                if ctx.is_main:
                    np.save(out / f"{name}.npy", res.frames.numpy())
                    (out / f"{name}.json").write_text(json.dumps(res.metrics))
        elif scenario == "hybrid":
            # $SUPERGEN_TEST_PLANS: ";"-separated runs "NAME:cfg,ulysses[:float|cache]" (0: left to auto);
            # branches run one after the other in one process too, so CFG parallel is the same arithmetic.
            pipe.adapter.batch_cfg = False
            for run in os.environ["SUPERGEN_TEST_PLANS"].split(";"):
                name, degrees, *how = run.split(":")
                cfg, uly = (int(v) or None for v in degrees.split(","))
                kw = dict(KW, tiling=CACHE_TILING, coherence=NO_COHERENCE, context=ctx, output_type="latent",
                          parallel=ParallelConfig(cfg_parallel=cfg, ulysses=uly))
                if "float" in how:
                    kw.update(output_type="float")
                if "cache" in how:
                    kw.update(cache=CACHE, num_inference_steps=8)
                try:
                    res = pipe(PROMPT, **kw)
                except ValueError as err:  # refused before model work, on every rank alike: go on
                    (out / f"{name}-refused-{ctx.rank}.txt").write_text(str(err))
                    continue
                if ctx.is_main:
                    np.save(out / f"{name}.npy", np.asarray(res.frames))
                    (out / f"{name}.json").write_text(json.dumps(res.metrics))
        elif scenario == "backbones":
            from test_backbones import BACKBONES

            from supergen.models import TINY_NATIVE_SIZES

            for case in BACKBONES:
                if case.name == "tiny-wan":
                    continue
                sg = SuperGenPipeline.from_pretrained(case.name)
                height, width, _ = TINY_NATIVE_SIZES[case.name]
                res = sg(PROMPT, height=2 * height, width=2 * width, num_inference_steps=2, progress=False,
                         output_type="latent", tiling=TilingConfig(upscale="latent"), context=ctx, **case.inputs())
                if ctx.is_main:
                    np.save(out / f"{case.name}.npy", res.frames.numpy())
        elif scenario == "cp-state":
            _context_parallel_state(pipe, ctx, out)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    if scenario in ("fault", "stall") and ctx.is_main:
        write_video(out / "fault.mp4", res.frames)


def _context_parallel_state(pipe, ctx, out: Path) -> None:
    """Every module's hooks and parallel configs before, during and after a Ulysses-2 run, as JSON per rank."""
    from supergen.backbones.hooks import state_of

    def state() -> dict:
        return {name: {k: repr(v) for k, v in state_of(module).items()}
                for name, module in pipe.pipe.components.items() if isinstance(module, torch.nn.Module)}

    # Transformers puts its own output-capture hooks on an encoder's layers at its first use, for good.
    with torch.no_grad():
        pipe.adapter.encode_prompt(PROMPT, None, 5.0)
    before = state()
    during = []
    probe = pipe.pipe.transformer.register_forward_pre_hook(  # the sketch runs before CP is installed
        lambda module, args: during.extend(getattr(getattr(module, "_diffusers_hook", None), "_hook_order", ())))
    try:
        res = pipe(PROMPT, tiling=CACHE_TILING, coherence=NO_COHERENCE, context=ctx, output_type="latent",
                   parallel=ParallelConfig(ulysses=2), **KW)
    finally:
        probe.remove()
    after = state()
    changed = sorted(f"{component}.{name}: {before[component].get(name)} -> {after[component].get(name)}"
                     for component in before for name in set(before[component]) | set(after[component])
                     if before[component].get(name) != after[component].get(name))
    report = dict(changed=changed, during=sorted(set(during)), plan=res.metrics["parallel_plan"]["describe"])
    (out / f"cp-state-{ctx.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
