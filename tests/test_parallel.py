"""Tile parallelism: geometry and assignment in-process; N ranks vs one with real gloo processes.

Multi-process tests start every rank as its own ``python`` process with the
variables torchrun sets (so each rank's exit status and stderr are its own,
with no launcher killing the others for us), or run the CLI under torchrun;
every process has a timeout so a hang fails the test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from supergen import CoherenceConfig, ParallelConfig, TilingConfig
from supergen.parallel import DistributedContext, RegionExecutor, RegionLayout, StepExchange, assign_tiles
from supergen.parallel.layout import SKIP_COST, allgather_bytes, tile_costs
from supergen.tiling import TilePlanner

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
PROMPT = "a red circle moving left over a blue sky"
CHANNELS = 16


# --- geometry and assignment (no processes) -----------------------------------------------------

def _planner(canvas=(3, 16, 24), tile=(3, 8, 12), overlap=(0, 2, 2)):
    return TilePlanner(canvas, tile, overlap, align=(1, 2, 2), blend="cosine", shift="wrap")


def _brute_force_bytes(plan, owners, layout, world):
    """Per rank: 2 x (cells its tiles cover in other regions + cells others' tiles cover in its region) x C x 4."""
    owner_of_cell = torch.empty(plan.canvas, dtype=torch.int64)
    for r in range(world):
        owner_of_cell[layout.slices(r)[2:]] = r
    covered = []
    for r in range(world):
        mask = torch.zeros((1, 1, *plan.canvas), dtype=torch.int64)
        for tile, o in zip(plan.tiles, owners):
            if o == r:
                tile.add_into(mask, torch.ones((1, 1, *tile.size), dtype=torch.int64))
        covered.append(mask[0, 0] > 0)
    out = []
    for r in range(world):
        fetched = int((covered[r] & (owner_of_cell != r)).sum())
        served = sum(int((covered[q] & (owner_of_cell == r)).sum()) for q in range(world) if q != r)
        out.append(2 * (fetched + served) * CHANNELS * 4)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_regions_partition_the_canvas(world):
    layout = RegionLayout.choose(_planner(), world, steps=4)
    cover = torch.zeros((3, 16, 24), dtype=torch.int64)
    for r in range(world):
        cover[layout.slices(r)[2:]] += 1
    assert torch.equal(cover, torch.ones_like(cover))
    if world == 2:
        assert layout.splits == (1, 1, 2)  # the cheaper cut on this canvas: 3x16 cells, not 3x24


def test_assignment_balances_and_keeps_tiles_near_their_owner():
    planner = _planner()
    plan = planner.plan(0)  # 3x3 = 9 tiles
    layout = RegionLayout.choose(planner, 3, steps=1)
    owners = assign_tiles(tile_costs(plan), layout.affinity(plan), 3)
    assert sorted(owners.count(r) for r in range(3)) == [3, 3, 3]
    # Every tile went to the rank holding the most of it whenever that rank had room.
    aff = layout.affinity(plan)
    held = sum(aff[k][owners[k]] for k in range(len(plan)))
    assert held == sum(max(a) for a in aff)
    # 4 tiles on 3 ranks: loads 2/1/1, never 3/1/0.
    four = _planner(overlap=(0, 0, 0)).plan(1)
    owners = assign_tiles(tile_costs(four), [[0, 0, 0]] * 4, 3)
    assert sorted(owners.count(r) for r in range(3)) == [1, 1, 2]


def test_tiles_predicted_to_be_reused_count_as_nearly_free():
    plan = _planner().plan(0)
    skips = [k < 3 for k in range(9)]  # the cache would reuse tiles 0-2
    costs = tile_costs(plan, skips)
    assert costs[0] == pytest.approx(SKIP_COST * costs[5])
    owners = assign_tiles(costs, [[0, 0, 0]] * 9, 3)
    computed = [sum(1 for k in range(9) if owners[k] == r and not skips[k]) for r in range(3)]
    assert computed == [2, 2, 2]  # the 6 tiles that run are spread evenly; the reused ones fill in


@pytest.mark.parametrize("world", [2, 3, 4])
def test_exchange_bytes_match_brute_force_and_beat_allgather(world):
    planner = _planner()
    layout = RegionLayout.choose(planner, world, steps=6)
    for step in range(6):
        plan = planner.plan(step)
        owners = assign_tiles(tile_costs(plan), layout.affinity(plan), world)
        ex = StepExchange(layout, plan, owners)
        predicted = ex.bytes_per_rank(CHANNELS)
        assert predicted == _brute_force_bytes(plan, owners, layout, world)
        tile_numel = CHANNELS * plan.tiles[0].num_cells
        assert max(predicted) < min(allgather_bytes(owners, world, tile_numel, 4))


def test_more_ranks_than_tiles_warns_and_names_idle_ranks(caplog):
    planner = TilePlanner((3, 8, 24), (3, 8, 12), align=(1, 2, 2), shift="wrap")  # 2 tiles
    executor = RegionExecutor(DistributedContext(rank=0, world_size=3), planner, steps=2)
    with caplog.at_level("WARNING"):
        ex = executor.exchange_for(0)
    assert sorted(set(ex.owners)) != [0, 1, 2]
    assert "2 tiles for 3 ranks" in caplog.text and "run no tiles" in caplog.text


def test_too_many_ranks_for_the_canvas_is_refused():
    with pytest.raises(ValueError, match="cut into a grid of 97 regions; use at most 96 processes"):
        RegionLayout.choose(_planner(), 97, steps=1)


def test_exchange_setting_is_validated():
    with pytest.raises(ValueError, match="exchange='ring' is not one of region, allgather"):
        ParallelConfig(exchange="ring")
    with pytest.raises(ValueError, match="timeout_s"):
        ParallelConfig(timeout_s=0)


def test_decode_bands_stack_to_the_single_decode(tiny):
    z = torch.randn(1, 16, 2, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny.adapter.decode(z, tiled=True)
        bands = tiny.adapter.decode_bands((2, 16, 24), 2, tiled=True)
        stacked = torch.cat([tiny.adapter.decode_band(z, b, tiled=True) for b in bands], dim=3)
    assert [b.pixel_rows for b in bands] == [(0, 96), (96, 128)]  # VAE tile rows start every 48 px
    # Same tiles decoded from the same latents, blended the same way: bit for bit.
    assert torch.equal(stacked, whole)


# --- real processes ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, world: int, out: Path, timeout: float = 240, **extra_env):
    """Start ``world`` ranks of tests/parallel_worker.py; returns (exit codes, stderr per rank, end times)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   **extra_env)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + timeout
    ended = [None] * world
    while any(e is None for e in ended) and time.time() < deadline:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.1)
    errs = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        errs.append(p.communicate()[1])
    assert all(e is not None for e in ended), f"ranks hung past {timeout}s:\n" + "\n".join(errs)
    return [p.returncode for p in procs], errs, ended


@pytest.fixture(scope="module")
def single_process(tiny):
    """The reference: the same request in this process alone, as latents and as the frames __call__ would give."""
    from parallel_worker import NO_COHERENCE

    res = tiny(PROMPT, tiling=TilingConfig(overlap=16), output_type="latent", height=128, width=192,
               num_inference_steps=3, progress=False, coherence=NO_COHERENCE)
    with torch.no_grad():
        frames = tiny.adapter.postprocess(tiny.adapter.decode(res.frames, tiled=True))
    return res.frames.numpy(), frames, res.metrics


@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_make_the_same_frames_as_one(tmp_path, single_process, world):
    ref_latents, ref_frames, ref_metrics = single_process
    codes, errs, _ = _launch("equal", world, tmp_path)
    assert codes == [0] * world, "\n".join(errs)
    # Region scheme, frames through the distributed decode. Tolerance: every tile sees the same inputs and
    # runs the same model call as in one process, and the decode bands are bit-exact; what differs is the
    # order in which float32 tile outputs are summed where up to four tiles overlap, so frames agree to
    # float32 rounding (measured max |diff| ~1e-7 on [0, 1] frames), not bit for bit.
    np.testing.assert_allclose(np.load(tmp_path / "region.npy"), ref_frames, rtol=0, atol=1e-5)
    # All-gather: every tile output reaches every rank and is blended in plan order, as in one process.
    np.testing.assert_array_equal(np.load(tmp_path / "allgather.npy"), ref_latents)
    for exchange in ("region", "allgather"):
        m = json.loads((tmp_path / f"{exchange}.json").read_text())
        assert m["world_size"] == world and m["comm_scheme"] == exchange
        assert m["tiles"]["tile_steps_computed"] == ref_metrics["tiles"]["tile_steps_computed"] == 27
        per_rank = m["tiles"]["tile_steps_per_rank"]
        # 9 tiles a step, balanced every step (the busiest rank varies from step to step).
        assert sum(per_rank) == 27 and 3 * (9 // world) <= min(per_rank) <= max(per_rank) <= 3 * -(-9 // world)

    region = json.loads((tmp_path / "region.json").read_text())
    allgather = json.loads((tmp_path / "allgather.json").read_text())
    planner = _planner()
    layout = RegionLayout.choose(planner, world, steps=3)
    for step in range(3):
        plan = planner.plan(step)
        owners = assign_tiles(tile_costs(plan), layout.affinity(plan), world)
        expected = _brute_force_bytes(plan, owners, layout, world)
        assert [region["comm_bytes_steps"][r][step] for r in range(world)] == expected
        ring = allgather_bytes(owners, world, CHANNELS * plan.tiles[0].num_cells, 4)
        assert [allgather["comm_bytes_steps"][r][step] for r in range(world)] == ring
        assert max(expected) < min(ring)


@pytest.mark.parametrize("grid", ["held", "shifting"])
@pytest.mark.parametrize("world", [2, 3])
def test_region_cache_across_ranks_matches_one_process(tmp_path, tiny, world, grid):
    from parallel_worker import CACHE_TILING, KW, NO_COHERENCE, _cache_config

    # Coherence off: these are the cache's own decisions and bytes (the guide's all-reduce is tested below).
    # grid="shifting": tiles are reused across grid moves, so a rank serves cells another rank's tile computed.
    cache = _cache_config(grid)
    ref = tiny(PROMPT, tiling=CACHE_TILING, output_type="latent", cache=cache, coherence=NO_COHERENCE,
               **dict(KW, num_inference_steps=8))
    assert ref.metrics["cache"]["reuse"] == "output"
    codes, errs, _ = _launch("cache", world, tmp_path, SUPERGEN_TEST_CACHE_GRID=grid)
    assert codes == [0] * world, "\n".join(errs)
    runs = {ex: json.loads((tmp_path / f"cache-{ex}.json").read_text()) for ex in ("region", "allgather")}
    for exchange, m in runs.items():
        # Same reuse mode as one process, and the same decisions: each rank's cache holds its own cells and
        # the statistics behind a decision are integer sums over the ranks, so they are bit-identical.
        # Without overlaps every cell's prediction is one tile's output or its reused value, whichever
        # rank computes it, so the latents are bit-identical too.
        assert m["comm_scheme"] == exchange and m["cache"]["reuse"] == "output"
        assert m["tiles"]["skip_map"] == ref.metrics["tiles"]["skip_map"]
        assert m["tiles"]["tile_steps_skipped"] == ref.metrics["tiles"]["tile_steps_skipped"] > 0
        assert sum(m["tiles"]["tile_steps_per_rank"]) == ref.metrics["tiles"]["tile_steps_computed"]
        assert m["cache"]["region_skip_map"] == ref.metrics["cache"]["region_skip_map"]
        np.testing.assert_array_equal(np.load(tmp_path / f"cache-{exchange}.npy"), ref.frames.numpy())
    # The cache no longer needs the all-gather: the region exchange moves less, and a reused tile moves nothing.
    region_bytes, allgather_bytes_ = (sum(runs[ex]["comm_bytes_per_step"]) for ex in ("region", "allgather"))
    assert region_bytes < allgather_bytes_


@pytest.mark.parametrize("world", [2, 3])
def test_global_coherence_across_ranks_matches_one_process(tmp_path, tiny, world):
    from parallel_worker import COHERENCE, KW, TILING

    ref = tiny(PROMPT, tiling=TILING, output_type="latent", coherence=COHERENCE, **KW)
    codes, errs, _ = _launch("coherence", world, tmp_path)
    assert codes == [0] * world, "\n".join(errs)
    # The guide acts on the whole canvas identically on every rank; each view is computed by one rank in
    # its own model call, as one process computes it, and all-gathered: bit for bit.
    np.testing.assert_array_equal(np.load(tmp_path / "coherence.npy"), ref.frames.numpy())
    m = json.loads((tmp_path / "coherence.json").read_text())
    assert m["comm_scheme"] == "allgather"
    # 2x the native height and width: 2x2 views on each of the 3 steps, each run once over all ranks.
    assert m["tiles"]["view_forwards"] == ref.metrics["tiles"]["view_forwards"] == 4 * 3
    # The default guide on the region scheme: each rank filters its region from pooled sums all-reduced
    # over the ranks (float64), so only summation order differs from one process: float32 rounding.
    ref_guide = tiny(PROMPT, tiling=TILING, output_type="latent", **KW)
    guided = np.load(tmp_path / "guide-region.npy")
    np.testing.assert_allclose(guided, ref_guide.frames.numpy(), rtol=0, atol=1e-4)
    assert not np.allclose(guided, tiny(PROMPT, tiling=TILING, output_type="latent",
                                        coherence=CoherenceConfig(guide="none"), **KW).frames.numpy(), atol=1e-3)
    assert json.loads((tmp_path / "guide-region.json").read_text())["comm_scheme"] == "region"


def test_mismatched_requests_are_refused_on_every_rank(tmp_path):
    codes, errs, _ = _launch("mismatch", 2, tmp_path)
    assert all(c != 0 for c in codes)
    for rank in range(2):
        text = (tmp_path / f"refused-{rank}.txt").read_text()
        assert "generation requests differ across ranks (ranks [1] do not match rank 0)" in text


@pytest.mark.parametrize("cfg_parallel", [0, 2], ids=["tiles", "cfg-branches"])
def test_a_failing_rank_fails_every_rank_fast(tmp_path, cfg_parallel):
    codes, errs, ended = _launch("fault", 2, tmp_path, SUPERGEN_TEST_CFG_PARALLEL=str(cfg_parallel))
    assert codes[1] != 0 and "injected fault on rank 1" in errs[1]
    assert codes[0] != 0, errs[0]
    assert "stopping because rank 1: RuntimeError: injected fault on rank 1" in errs[0]
    fault_at = float((tmp_path / "fault-time.txt").read_text())
    # The collective timeout is 120 s; the error board ends rank 0 within the watchdog's poll.
    assert ended[0] - fault_at < 15
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


def test_a_stalled_rank_fails_the_job_within_the_timeout_naming_it(tmp_path):
    """Rank 1 stops itself (SIGSTOP) mid-refinement: no error to post, only its silence tells."""
    timeout_s = 6
    codes, errs, ended = _launch("stall", 2, tmp_path, timeout=150, SUPERGEN_TEST_TIMEOUT=str(timeout_s))
    stalled_at = float((tmp_path / "stall-time.txt").read_text())
    assert codes[0] == 1, errs[0]
    assert "stopping because rank 1 stopped responding: no heartbeat for" in errs[0], errs[0]
    assert "Traceback" not in errs[0]
    # Silence is timed from the last heartbeat the watcher saw, which can precede the stall by up to an
    # interval (0.3 s here; measured 5.7 s after the stall at a 6 s timeout); at most the timeout plus an
    # interval and a poll after it, with slack for a loaded 2-core machine.
    assert timeout_s - 1 <= ended[0] - stalled_at < timeout_s + 5
    # The stopped rank, on this host, was killed rather than left for the launcher to wait on.
    assert codes[1] == -signal.SIGKILL
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


def test_a_request_too_big_is_refused_by_every_rank_together(tmp_path):
    """Ranks agree on the smallest free memory, so each refuses alike: exit 2 and one line, no rank kills another."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "supergen", "generate", "--prompt", PROMPT, "--height", "100000", "--width",
             "100000", "--timeout", "60", "--output", str(tmp_path / "o.mp4")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    for err in errs:
        assert "supergen generate: error: needs about" in err and "smallest of all ranks" in err, err
        assert "stopping because" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_torchrun_cli_three_ranks_writes_what_one_process_writes(tmp_path, tiny):
    from supergen.io import write_video

    out, metrics = tmp_path / "three.mp4", tmp_path / "m.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(_free_port()),
           "-m", "supergen", "generate", "--prompt", PROMPT, "--steps", "3", "--output", str(out),
           "--metrics-json", str(metrics)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("wrote ") == 1  # only rank 0 prints the summary
    m = json.loads(metrics.read_text())
    assert m["world_size"] == 3 and len(m["comm_bytes"]) == 3 and m["tiles"]["count"] == 4
    assert sorted(m["tiles"]["tile_steps_per_rank"]) == [3, 3, 6]  # 4 tiles on 3 ranks, 3 steps
    reference = tiny(PROMPT, num_inference_steps=3, progress=False)
    write_video(tmp_path / "one.mp4", reference.frames)
    np.testing.assert_array_equal(iio.imread(out), iio.imread(tmp_path / "one.mp4"))


# --- hybrid plans: tiles x CFG branches x sequence (Ulysses) -------------------------------------

def _workload(**kw):
    from supergen.parallel.plan import Workload

    # Wan2.1-14B at 4K: 9 tiles of 90x160 latents, 21 frames (75,600 tokens), 40 heads.
    args = dict(tiles=9, tile_tokens=75600, tile_numel=16 * 21 * 90 * 160, layers=40, dim=5120, heads=40, ffn=13824,
                model="WanTransformer3DModel", exchange_bytes=lambda n: 50e6)
    return Workload(**{**args, **kw})


def test_plan_coordinates_follow_the_mesh_order():
    from supergen.parallel.plan import ParallelPlan

    plan = ParallelPlan(tile=2, cfg=2, ring=1, ulysses=2)
    assert plan.world_size == 8 and plan.context == 2
    # Ulysses innermost (neighbouring ranks share a tile's sequence), tiles outermost.
    assert plan.coords(0) == dict(tile=0, cfg=0, ring=0, ulysses=0)
    assert plan.coords(1) == dict(tile=0, cfg=0, ring=0, ulysses=1)
    assert plan.coords(2) == dict(tile=0, cfg=1, ring=0, ulysses=0)
    assert plan.coords(5) == dict(tile=1, cfg=0, ring=0, ulysses=1)


@pytest.mark.parametrize("degrees, why", [
    (dict(cfg=2, ulysses=3), "cfg x ring x ulysses = 6 does not divide the world size 8"),
    (dict(ulysses=16), "ulysses 16 does not divide the 40 attention heads of WanTransformer3DModel"),
    (dict(ring=2), "ring > 1 needs an attention backend that returns the log-sum-exp"),
])
def test_bad_plans_are_refused_naming_every_factor_and_a_plan_that_works(degrees, why):
    from supergen.parallel.plan import resolve_plan

    with pytest.raises(ValueError) as err:
        resolve_plan(8, _workload(), cfg=degrees.get("cfg"), ulysses=degrees.get("ulysses"), ring=degrees.get("ring"))
    text = str(err.value)
    assert "\n" not in text and why in text
    assert "x cfg " in text and "x ring " in text and "x ulysses " in text and "world size 8" in text
    # The plan it proposes is itself accepted.
    proposed = text.split("a plan that works: ")[1]
    assert proposed == "tile 1 x cfg 2 x ring 1 x ulysses 4 = 8 ranks (--cfg-parallel 2 --ulysses 4)"
    resolve_plan(8, _workload(), cfg=2, ulysses=4)


def test_plans_a_backbone_cannot_run_are_refused():
    from supergen.parallel.plan import resolve_plan

    with pytest.raises(ValueError, match="has no Diffusers context-parallel plan"):
        resolve_plan(2, _workload(cp_plan=False), ulysses=2)
    with pytest.raises(ValueError, match="cfg 2 needs classifier-free guidance"):
        resolve_plan(2, _workload(guidance=False), cfg=2)
    with pytest.raises(ValueError, match="does not divide the 75601 tokens of a tile"):
        resolve_plan(2, _workload(tile_tokens=75601), ulysses=2)
    # Without guidance or a CP plan only tiles can move: auto says so by choosing them.
    assert resolve_plan(4, _workload(guidance=False, cp_plan=False)).tile == 4


def test_auto_picks_the_lowest_modelled_step_time():
    from supergen.parallel.plan import ParallelPlan, choose_plan, resolve_plan, step_time, valid_plans

    w = _workload()
    for world in (2, 8):
        best = choose_plan(world, w)
        assert all(step_time(best, w)["step_s"] <= step_time(p, w)["step_s"] for p in valid_plans(world, w))
    # 9 tiles on 8 ranks tile-only leave ranks idle (56% at best); the hybrid plan keeps every rank busy.
    assert step_time(ParallelPlan(tile=8), w)["efficiency"] < 0.6
    assert step_time(choose_plan(8, w), w)["efficiency"] > 0.9
    assert resolve_plan(8, w, mode="tile") == ParallelPlan(tile=8)


@pytest.fixture(scope="module")
def hybrid_reference(tiny):
    """One process, guidance branches run one after the other (WanPipeline's order, what CFG parallel computes):
    latents of the plain request and of the cached one, and the frames of the plain one."""
    from parallel_worker import CACHE, CACHE_TILING, KW, NO_COHERENCE

    tiny.adapter.batch_cfg = False
    try:
        kw = dict(KW, tiling=CACHE_TILING, coherence=NO_COHERENCE, output_type="latent")
        plain = tiny(PROMPT, **kw)
        cached = tiny(PROMPT, **dict(kw, cache=CACHE, num_inference_steps=8))
        with torch.no_grad():
            frames = tiny.adapter.postprocess(tiny.adapter.decode(plain.frames, tiled=True))
    finally:
        tiny.adapter.batch_cfg = True
    return plain, cached, frames


def _ulp_close(actual, expected, ulps=4):
    """Attention split over ranks (Ulysses: heads in attention, token slices in the linear layers) runs the same
    operations on smaller matrices, which a BLAS may block differently: a few float32 ulp of the output's
    scale per value (measured: 0 on this CPU, the kernels happen to agree)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ulps * np.finfo(np.float32).eps * np.abs(expected).max())


@pytest.mark.parametrize("world, runs", [
    (2, "cfg:2,1;uly:1,2;cache:2,1:cache"),
    (3, "tile:0,0;bad:1,3"),
    (4, "mixed:2,1;both:2,2:float"),
])
def test_hybrid_plans_make_the_same_frames_as_one_process(tmp_path, hybrid_reference, world, runs):
    plain, cached, frames = hybrid_reference
    codes, errs, _ = _launch("hybrid", world, tmp_path, SUPERGEN_TEST_PLANS=runs)
    assert codes == [0] * world, "\n".join(errs)
    expected_plans = {"cfg": (1, 2, 1), "uly": (1, 1, 2), "cache": (1, 2, 1), "tile": (3, 1, 1), "mixed": (2, 2, 1),
                      "both": (1, 2, 2)}
    for run in runs.split(";"):
        name = run.split(":")[0]
        if name == "bad":
            # Ulysses 3 on 3 ranks: the tiny Wan has 2 heads. Refused on every rank before model work.
            for rank in range(world):
                text = (tmp_path / f"bad-refused-{rank}.txt").read_text()
                assert "ulysses 3 does not divide the 2 attention heads of WanTransformer3DModel" in text
                assert "a plan that works: tile 3 x cfg 1 x ring 1 x ulysses 1 = 3 ranks" in text
            assert not (tmp_path / "bad.npy").exists()
            continue
        m = json.loads((tmp_path / f"{name}.json").read_text())
        plan = m["parallel_plan"]
        assert (plan["tile"], plan["cfg"], plan["ulysses"]) == expected_plans[name] and plan["world_size"] == world
        out = np.load(tmp_path / f"{name}.npy")
        ref = cached if name == "cache" else plain
        # Every tile-step counted once, whichever ranks shared it.
        assert m["tiles"]["tile_steps_computed"] == ref.metrics["tiles"]["tile_steps_computed"]
        if name == "cache":
            # Each tile group's cache totals its statistics over its own ranks: the same decisions as one process.
            assert m["tiles"]["skip_map"] == ref.metrics["tiles"]["skip_map"]
            assert m["tiles"]["tile_steps_skipped"] == ref.metrics["tiles"]["tile_steps_skipped"] > 0
        if name == "both":
            _ulp_close(out, frames)  # through the distributed decode
        elif plan["ulysses"] > 1:
            _ulp_close(out, ref.frames.numpy())
        else:
            # Tiles and CFG branches move, the arithmetic does not: bit for bit.
            np.testing.assert_array_equal(out, ref.frames.numpy())


def test_context_parallel_leaves_the_pipeline_as_it_was(tmp_path, tiny):
    """Diffusers' CP hooks sit on the transformer while a Ulysses run refines, and nothing of them is left after:
    no hook, no empty hook registry, no wrapped forward, no parallel config, on any module of the pipeline
    (``tiny``: the model is built before the ranks load it)."""
    codes, errs, _ = _launch("cp-state", 2, tmp_path)
    assert codes == [0, 0], "\n".join(errs)
    for rank in range(2):
        report = json.loads((tmp_path / f"cp-state-{rank}.json").read_text())
        assert "ulysses 2" in report["plan"]
        assert any(name.startswith("cp_") for name in report["during"]), report["during"]  # the probe saw them
        assert report["changed"] == []
