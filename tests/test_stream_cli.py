"""`supergen stream` as a user runs it, and loading original-layout (causal) Wan checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import pytest
import torch

from supergen.backbones.wan_convert import convert_original_wan_state_dict, load_original_wan_checkpoint

PROMPT = "a red circle moving left over a blue sky"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    # One intra-op thread: the tiny model is too small to gain from more, and spins on a shared CPU.
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "supergen", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def test_stream_writes_video_and_per_block_metrics(tmp_path):
    out, metrics = tmp_path / "s.mp4", tmp_path / "m.json"
    res = run_cli("stream", "--prompt", PROMPT, "--blocks", "3", "--block-frames", "2", "--window", "4", "--sink", "2",
                  "--steps", "2", "--output", str(out), "--metrics-json", str(metrics))
    assert res.returncode == 0, res.stderr
    frames = iio.imread(out)
    assert frames.shape == (5 + 8 + 8, 64, 96, 3)
    m = json.loads(metrics.read_text())
    assert m["num_frames"] == 21 and m["interrupted"] is False
    assert [b["index"] for b in m["blocks"]] == [0, 1, 2]
    assert all(b["kv_cache_bytes"] > 0 and b["latency_s"] > 0 for b in m["blocks"])
    assert "sink 2 + window 4 latent frames" in res.stderr  # what the engine chose is logged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_kill_leaves_a_playable_file_of_what_was_made(tmp_path, sig, code):
    out, metrics = tmp_path / "s.mp4", tmp_path / "m.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supergen", "stream", "--prompt", PROMPT, "--block-frames", "1", "--window", "2",
         "--sink", "1", "--steps", "1", "--output", str(out), "--metrics-json", str(metrics)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
    )
    blocks = 0
    deadline = time.monotonic() + 240
    try:
        for line in proc.stderr:  # endless stream: wait until a few blocks were written
            if re.match(r"INFO supergen: block \d+:", line):
                blocks += 1
                if blocks == 3:
                    break
            assert time.monotonic() < deadline, "stream made no blocks in time"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "(interrupted)" in stdout
    m = json.loads(metrics.read_text())
    assert m["interrupted"] is True and len(m["blocks"]) >= 3
    frames = iio.imread(out)
    assert frames.shape[1:] == (64, 96, 3) and len(frames) == m["num_frames"] >= 1 + 4 + 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--window", "1", "--block-frames", "3"], "shorter than one block"),
        (["--sink", "5", "--window", "4"], "sink=5 must not exceed window=4"),
        (["--blocks", "0"], "--blocks 0 must be >= 1"),
        (["--height", "72"], "height 72 is not a positive multiple of 16"),
        (["--transformer-weights", "/no/such.pt"], "does not exist"),
    ],
)
def test_stream_bad_input_exits_2(tmp_path, args, message):
    res = run_cli("stream", "--prompt", PROMPT, "--output", str(tmp_path / "o.mp4"), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())


# --- original-layout checkpoints --------------------------------------------------------------------------

# Diffusers -> original Wan names, the inverse of Diffusers' conversion (written
# out here, so the test checks the converter against an independent statement).
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # Diffusers' cross-attention norm is norm3 in the original
    ("proj_out", "head.head"),
]


def _original_layout(transformer):
    out = {}
    for key, value in transformer.state_dict().items():
        new = key
        for a, b in _TO_ORIGINAL:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        new = new.replace(".scale_shift_table", ".modulation")
        out[new] = value.clone()
    return out


def test_original_layout_checkpoint_loads_into_diffusers_wan(tiny, tmp_path):
    from diffusers import WanTransformer3DModel

    source = tiny.pipe.transformer
    original = _original_layout(source)
    assert "blocks.0.self_attn.q.weight" in original and "head.modulation" in original
    # Self-Forcing's layout: EMA generator weights under the diffusion wrapper's `model.` prefix.
    checkpoint = {"generator_ema": {f"model.{k}": v for k, v in original.items()}, "step": 1000}
    path = tmp_path / "self_forcing.pt"
    torch.save(checkpoint, path)

    fresh = WanTransformer3DModel.from_config(source.config)
    assert not torch.equal(fresh.blocks[0].attn1.to_q.weight, source.blocks[0].attn1.to_q.weight)
    load_original_wan_checkpoint(fresh, path)
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(1, 16, 2, 8, 12, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 7, source.config.text_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        a, b = fresh(x, t, text, return_dict=False)[0], source(x, t, text, return_dict=False)[0]
    # Identical weights (checked bit for bit above); two module instances may still
    # pick different kernels/layouts, measured 4e-7 apart.
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_checkpoint_that_does_not_fit_is_refused(tiny):
    original = _original_layout(tiny.pipe.transformer)
    with pytest.raises(ValueError, match="no weights found"):
        convert_original_wan_state_dict({"optimizer": {"lr": 1}})
    broken = {k: v for k, v in original.items() if not k.startswith("blocks.1.")}
    from diffusers import WanTransformer3DModel

    with pytest.raises(ValueError, match="missing"):
        load_original_wan_checkpoint(WanTransformer3DModel.from_config(tiny.pipe.transformer.config), broken)
