"""The command line, as a user runs it (in a subprocess, like a shell would)."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest

PROMPT = "a red circle moving left over a blue sky"


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "supergen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def test_generate_writes_video_and_metrics(tmp_path):
    out, metrics = tmp_path / "out.mp4", tmp_path / "m.json"
    res = run_cli("generate", "--prompt", PROMPT, "--steps", "3", "--output", str(out), "--metrics-json", str(metrics))
    assert res.returncode == 0, res.stderr
    assert "tile-steps computed" in res.stdout
    frames = iio.imread(out)
    # Default size: twice the native 64x96, native 9 frames.
    assert frames.shape == (9, 128, 192, 3)
    m = json.loads(metrics.read_text())
    assert m["height"] == 128 and m["width"] == 192 and m["tiles"]["count"] == 4
    assert "tiles (1x2x2 over F,H,W)" in res.stderr  # the tile plan is logged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "100"], "height 100 is not a multiple of 16"),
        (["--model", "no-such-model"], "unknown model"),
        (["--output", "/no/such/dir/out.mp4"], "does not exist"),
        (["--strength", "0"], "strength"),
        (["--tile-overlap", "96", "--tile-width", "96"], "overlap=96 must be smaller"),
    ],
)
def test_generate_bad_input_exits_2_with_message(tmp_path, args, message):
    res = run_cli("generate", "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "o.mp4"), *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_unknown_choice_is_rejected_by_argparse(tmp_path):
    res = run_cli("generate", "--prompt", PROMPT, "--blend", "gauss")
    assert res.returncode == 2 and "invalid choice" in res.stderr
