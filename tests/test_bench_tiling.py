"""scripts/bench_tiling.py must keep running: FLOPs accounting, argument checks, and a --quick smoke run.

These check structure and arithmetic, never speed: timings on a shared CI
machine prove nothing.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_tiling.py"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_tiling")


def _linear_flops(cfg: dict, tokens: int, text_tokens: int) -> int:
    """Every projection of a Wan forward (batch 1), written out by hand from the module layout."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    patch_in = cfg["in_channels"] * math.prod(cfg["patch_size"])
    patch_out = cfg["out_channels"] * math.prod(cfg["patch_size"])
    per_block = (
        4 * tokens * d * d  # self-attention q, k, v, out
        + 2 * tokens * d * d  # cross-attention q, out
        + 2 * text_tokens * d * d  # cross-attention k, v over the text
        + 2 * tokens * d * cfg["ffn_dim"]  # FFN up and down
    )
    embed = tokens * patch_in * d + tokens * d * patch_out
    conditioning = cfg["freq_dim"] * d + d * d + 6 * d * d + text_tokens * (cfg["text_dim"] * d + d * d)
    return 2 * (embed + conditioning + cfg["num_layers"] * per_block)


def test_count_flops_matches_the_module_layout_exactly(bench):
    cfg = bench.MODELS["mid"].transformer
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers, text = cfg["num_layers"], bench.TEXT_TOKENS
    counts = {}
    for latent in [(1, 4, 6), (2, 8, 12)]:
        tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
        got = bench.count_flops(cfg, latent)
        assert got["self_attn"] == layers * 4 * tokens * tokens * d
        assert got["cross_attn"] == layers * 4 * tokens * text * d
        assert got["linear"] == _linear_flops(cfg, tokens, text)
        assert got["total"] == got["self_attn"] + got["cross_attn"] + got["linear"]
        counts[tokens] = got
    # 8x the tokens: self-attention 64x (quadratic), cross-attention 8x (linear).
    assert counts[48]["self_attn"] == 64 * counts[6]["self_attn"]
    assert counts[48]["cross_attn"] == 8 * counts[6]["cross_attn"]


def test_predicted_rows_for_wan_1_3b_at_2k_and_4k(bench):
    targets = [("720p", 720, 1280), ("2K", 1440, 2560), ("4K", 2160, 3840)]
    rows = bench.predicted_rows("wan2.1-1.3b", (720, 1280, 81), targets, overlaps=[0, 128])
    by_key = {(r.label, r.overlap): r for r in rows}
    assert set(by_key) == {("720p", 0), ("2K", 0), ("2K", 128), ("4K", 0), ("4K", 128)}
    native = by_key[("720p", 0)]
    assert native.latent == (21, 90, 160) and native.tokens == 75_600 and native.tiles == 1
    assert native.direct_step == native.tiled_step
    # SuperGen's grids: 2K is 2x2 and 4K is 3x3 native tiles without overlap; 128 px of overlap adds a row and column.
    assert [by_key[k].grid for k in [("2K", 0), ("4K", 0), ("2K", 128), ("4K", 128)]] == [
        (1, 2, 2), (1, 3, 3), (1, 3, 3), (1, 4, 4),
    ]  # fmt: skip
    assert by_key[("4K", 0)].tokens == 680_400
    for row in rows:
        # CFG: two forwards per step; tiles are all native-size.
        assert row.tiled_step == 2 * row.tiles * native.direct["total"]
        assert row.direct_step == 2 * row.direct["total"]
    speedups = [by_key[(label, 0)].direct_step / by_key[(label, 0)].tiled_step for label in ("720p", "2K", "4K")]
    assert speedups[0] == 1.0 and 1.0 < speedups[1] < speedups[2] < 9.0
    # A whole run adds a native-size sketch to the refinement, so it gains less than one step does.
    assert by_key[("4K", 0)].run_ratio(50, 0.9) < speedups[2]


def test_bad_arguments_are_refused_before_any_work(bench):
    with pytest.raises(argparse.ArgumentTypeError, match="not a square"):
        bench._parse_areas("1,2")
    with pytest.raises(argparse.ArgumentTypeError, match="must include 1"):
        bench._parse_areas("4,9")
    assert bench._parse_areas("9,1,4,4") == [1, 2, 3]
    for kwargs, field in [
        (dict(model="nope"), "model"),
        (dict(mode="fast"), "mode"),
        (dict(scale=0), "scale"),
        (dict(warmup=0), "warmup"),
        (dict(repeats=0), "repeats"),
        (dict(dtype="int8"), "dtype"),
        (dict(overlap=-16), "overlap"),
    ]:
        with pytest.raises(ValueError, match=field):
            bench.RowSpec(**{"model": "tiny", "mode": "tiled", "scale": 1, **kwargs})
    # The command line refuses the same before building anything.
    with pytest.raises(SystemExit, match="warmup=0"):
        bench.main(["--quick", "--warmup", "0"])
    with pytest.raises(SystemExit, match="--clock cpu"):
        bench.main(["--quick", "--clock", "cpu", "--device", "cuda"])
    with pytest.raises(SystemExit, match="does not exist"):
        bench.main(["--quick", "--json", str(REPO / "no-such-dir" / "out.json")])


@pytest.mark.slow
def test_quick_run_prints_both_tables(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "## Measured: tiny" in text and "## Predicted from FLOPs" in text
    assert "| 1x | 64x96x9 | 72 | 1 |" in text
    assert "| 4x | 128x192x9 | 288 | 4 |" in text
    report = json.loads(out.read_text())
    rows = report["measured"]["rows"]
    assert sorted((r["mode"], r["scale"]) for r in rows) == [("direct", 1), ("direct", 2), ("tiled", 1), ("tiled", 2)]
    for row in rows:
        assert row["error"] is None
        assert len(row["step_s"]) == 1 and row["step_s"][0] > 0 and row["step_cpu_s"][0] > 0
        assert row["peak_bytes"] > 0 and row["base_bytes"] > 0
        assert row["tiles"] == (4 if (row["mode"], row["scale"]) == ("tiled", 2) else 1)
    assert len(report["predicted"]) == 10
    assert {r["model"] for r in report["predicted"]} == {"wan2.1-1.3b", "wan2.1-14b"}


def test_backbone_column_times_a_tiled_step_through_each_adapter(bench):
    """The per-backbone table's core, on the smallest backbone: structure, not speed."""
    import torch

    row = bench.measure_backbone("tiny-ltx", torch.device("cpu"), torch.float32, warmup=1, repeats=1)
    assert row["pipeline"] == "LTXPipeline" and row["tiles"] == 4
    assert row["target"] == "256x384x9" and row["tiled_s_per_step"] > 0
