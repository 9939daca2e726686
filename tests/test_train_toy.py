"""scripts/train_toy_model.py: a few steps end to end, reproducible from the seed, and resumable to the same result."""

import csv
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from supergen import SuperGenPipeline, TilingConfig

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["--vae-steps", "3", "--vae-batch", "1", "--dit-steps", "3", "--dit-batch", "2", "--dataset", "4",
            "--log-every", "1", "--ckpt-every", "100", "--export-every", "0", "--threads", "1", "--seed", "3"]


def _train(work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_toy_model.py"), "--work", str(work), "--output",
         str(work / "export"), *TINY_RUN, *extra],
        check=True, capture_output=True, text=True, timeout=600,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("transformer", "vae"):
        for f in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(f).items()})
    return out


def _rows(work: Path) -> list[tuple[str, str, str]]:
    return [(r["phase"], r["step"], r["loss"]) for r in csv.DictReader((work / "loss.csv").open())]


def test_training_is_reproducible_and_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    _train(straight)
    rows = _rows(straight)
    assert [(p, s) for p, s, _ in rows] == [("vae", "1"), ("vae", "2"), ("vae", "3"), ("dit", "1"), ("dit", "2"), ("dit", "3")]

    # The same run cut into pieces of 2 optimizer steps: each invocation resumes from the checkpoint.
    pieces = tmp_path / "pieces"
    _train(pieces, "--max-steps", "2")
    # A crash after logging a step that was never checkpointed leaves its row
    # behind; the resumed run must rewind the log rather than repeat the step.
    with (pieces / "loss.csv").open("a") as f:
        f.write("vae,3,9.999999,1.0\n")
    for _ in range(2):
        _train(pieces, "--max-steps", "2")
    assert _rows(pieces) == rows

    a, b = _weights(straight / "export"), _weights(pieces / "export")
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # The export is an ordinary Diffusers folder with the native-size hint, loadable by name-free path.
    pipe = SuperGenPipeline.from_pretrained(str(straight / "export"), device="cpu")
    assert (pipe.adapter.native_height, pipe.adapter.native_width, pipe.adapter.native_num_frames) == (32, 32, 9)
    frames = pipe("a red circle moving left over a blue sky", height=32, width=32, num_inference_steps=2,
                  tiling=TilingConfig(strength=1.0), progress=False).frames
    assert frames.shape == (9, 32, 32, 3)
    # Training moved the weights away from the seeded initialisation.
    from supergen.models import build_toy_wan

    init = build_toy_wan(seed=3).transformer.state_dict()
    moved = [n for n, v in init.items() if not torch.equal(v, a[f"transformer.{n}"])]
    assert len(moved) > len(init) // 2
