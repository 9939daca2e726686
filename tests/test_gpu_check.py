"""scripts/gpu_check.py must be ready the moment a GPU appears: its dry run exercises every part on CPU.

The dry run is the same code as the GPU check at tiny sizes (2-layer transformer
of the real class, small VAE, float32). These tests check that every part runs
and reports numbers, that the watchdog stops a part that overruns its budget,
and that bad command lines fail with one clear line. Timings on a shared CPU prove nothing and are not checked.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def gpu_check(load_script):
    return load_script("gpu_check")


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _run("--dry-run", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_dry_run_reports_every_part_with_numbers(dry_run):
    from supergen import CacheConfig, TilingConfig

    out, report, stdout = dry_run
    parts = report["parts"]
    assert sorted(parts) == ["a", "b", "c", "d", "e"]
    for key, part in parts.items():
        assert part["status"] == "ok", (key, part.get("error"), part.get("traceback"))
        assert _positive(part["wall_s"]) and _positive(part["budget_s"])
    assert report["dry_run"] is True and report["command"].endswith(f"--dry-run --output {out}")
    assert report["date"] and report["environment"]["torch"] == torch.__version__
    assert report["environment"]["device"] and _positive(report["matmul"]["tflops"])

    a = parts["a"]["results"]
    for name in ("diffusers_s_per_step", "supergen_s_per_step", "step_tflop", "matmul_tflops",
                 "supergen_fraction_of_matmul", "diffusers_fraction_of_matmul"):
        assert _positive(a[name]), name
    assert math.isfinite(a["overhead_pct"]) and a["tokens"] == 2 * 4 * 6  # 64x96x5 -> latent 2x8x12, patch 1x2x2

    b = parts["b"]["results"]
    assert b["tiles"] == 4 and b["direct_fits"] is True
    assert all(_positive(b[k]) for k in ("tiled_s_per_step", "direct_s_per_step", "measured_ratio", "flops_ratio"))

    c = parts["c"]["results"]
    h, w, f = report["profile"]["tile"]
    assert c["full_run_2k"]["frames_shape"] == [f, 2 * h, 2 * w, 3]
    assert c["decode_4k"]["video_shape"] == [1, 3, f, 3 * h, 3 * w]
    for run in (c["full_run_2k"], c["decode_4k"]):
        assert _positive(run["peak_allocated_bytes"]) and _positive(run["wall_s"])

    d = parts["d"]["results"]
    assert d["blocks"] == d["blocks_planned"] == len(d["per_block"]) == report["profile"]["stream_blocks"]
    assert d["stream_config"]["block_frames"] == 3 and d["stream_config"]["steps"] == 4
    for name in ("fps", "time_to_first_frame_s", "latency_s_median", "latency_s_p90", "kv_cache_bytes_max"):
        assert _positive(d[name]), name

    e = parts["e"]["results"]
    # The defaults are read from the configs at run time, never written into the script.
    assert e["tiling_defaults"] == json.loads(json.dumps(dataclasses.asdict(TilingConfig())))
    assert e["region_cache"] == dataclasses.asdict(CacheConfig(mode="region"))
    assert e["region"]["refine_steps"] >= CacheConfig().warmup + CacheConfig().cooldown + 1
    assert all(_positive(x) for x in (e["off"]["s_per_step"], e["region"]["s_per_step"], e["speedup"]))

    markdown = (out / "gpu_check.md").read_text()
    assert "dry run" in markdown and report["command"] in markdown
    for key, part in parts.items():
        assert f"| {key}. {part['name']} | ok |" in markdown
    assert markdown.strip() in stdout  # the report is printed too: a device run's output tail carries it


def test_watchdog_stops_a_part_that_overruns_its_budget(gpu_check, tmp_path):
    dry = gpu_check.PROFILES["dry-run"]
    # Part c's budget is gone at once and its first call cannot be cut short: the watchdog must stop it.
    # (Going on with the next part in a fresh worker costs another worker start-up: not repeated here.)
    profile = dataclasses.replace(dry, budgets_s={**dry.budgets_s, "c": 0.01}, grace_s=0.5)
    assert gpu_check.run_check(profile, ["c"], tmp_path, "test") == 1
    part = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["c"]
    assert part["status"] == "timed_out" and "worker stopped" in part["error"]
    assert "| c. memory_2k_run_4k_decode | timed_out |" in (tmp_path / "gpu_check.md").read_text()


def test_no_time_left_skips_parts_and_still_writes_the_report(tmp_path):
    proc = _run("--dry-run", "--output", str(tmp_path), "--time-limit", "1", "--parts", "a,e")
    assert proc.returncode == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert {k: p["status"] for k, p in parts.items()} == {"a": "skipped", "e": "skipped"}


def test_bad_command_lines_fail_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run("--dry-run", "--output", str(blocker / "sub"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--output" in proc.stderr
    proc = _run("--dry-run")
    assert proc.returncode == 2 and "--output DIR is required" in proc.stderr
    proc = _run("--dry-run", "--output", str(tmp_path), "--parts", "a,z")
    assert proc.returncode == 2 and "unknown part 'z'" in proc.stderr
    proc = _run("--dry-run", "--output", str(tmp_path), "--budget", "c=-5")
    assert proc.returncode == 2 and "'c=-5' is not PART=SECONDS" in proc.stderr
    if not torch.cuda.is_available():
        proc = _run("--output", str(tmp_path / "gpu"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no CUDA device" in proc.stderr
