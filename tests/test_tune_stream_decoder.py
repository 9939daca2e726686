"""scripts/tune_stream_decoder.py: the decoder alone moves, reproducibly and resumably; the rest ships unchanged."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from supergen import SuperGenPipeline
from supergen.models import SHIPPED_MODELS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# 13-frame clips at 16x16, one clip a step: seconds per step on one thread.
TINY = ["--model", "toy-causal", "--size", "16", "16", "--clip-frames", "13", "--batch", "1", "--steps", "4",
        "--log-every", "1", "--ckpt-every", "100", "--threads", "1", "--seed", "5"]


def _tune(work: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "tune_stream_decoder.py"), "--work", str(work),
                           "--output", str(output), *TINY, *extra], capture_output=True, text=True, timeout=300)


def _vae(folder: Path) -> dict:
    return load_file(next((folder / "vae").glob("*.safetensors")))


def test_decoder_tuning_moves_only_the_decoder_and_resumes_to_the_same_weights(tmp_path):
    straight = _tune(tmp_path / "w1", tmp_path / "out1")
    assert straight.returncode == 0, straight.stderr[-2000:]
    for _ in range(2):
        piece = _tune(tmp_path / "w2", tmp_path / "out2", "--max-steps", "2")
        assert piece.returncode == 0, piece.stderr[-2000:]
    rows = [[(r["phase"], r["step"], r["loss"]) for r in csv.DictReader((tmp_path / w / "loss.csv").open())]
            for w in ("w1", "w2")]
    assert rows[0] == rows[1] and len(rows[0]) == 4 and all(float(r[2]) > 0 for r in rows[0])
    a, b = _vae(tmp_path / "out1"), _vae(tmp_path / "out2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    shipped = _vae(SHIPPED_MODELS["toy-causal"])
    moved = {k for k in a if not torch.equal(a[k], shipped[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved), sorted(moved)[:5]
    assert len(moved) > len([k for k in a if k.startswith("decoder.")]) // 2
    # Everything else is the source model's, byte for byte.
    for part in ("transformer", "text_encoder"):
        src = load_file(next((SHIPPED_MODELS["toy-causal"] / part).glob("*.safetensors")))
        out = load_file(next((tmp_path / "out1" / part).glob("*.safetensors")))
        assert all(torch.equal(src[k], out[k]) for k in src)
    assert (tmp_path / "out1" / "supergen.json").read_text() == (SHIPPED_MODELS["toy-causal"] / "supergen.json").read_text()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))

    # The tuned model loads by folder and streams.
    pipe = SuperGenPipeline.from_pretrained(str(tmp_path / "out1"), device="cpu")
    with pipe.stream("a red circle moving left over a blue sky", num_blocks=2) as stream:
        frames = [blk.frames for blk in stream]
    assert [f.shape for f in frames] == [(5, 32, 32, 3), (6, 32, 32, 3)]
    assert all(np.isfinite(f.astype(float)).all() for f in frames)


def test_shape_weight_marks_the_shapes_pixels_of_each_frame():
    from scripts.tune_stream_decoder import shape_weight, stream_clips

    clips, colours = stream_clips(3, 4, 16, 16, 9, switch_fraction=1.0)
    assert clips.shape == (4, 9, 16, 16, 3) and colours.shape == (4, 9, 3)
    assert any(len({tuple(c) for c in clip}) == 2 for clip in colours)  # a switch changes the colour mid-clip
    w = shape_weight(clips, colours, 9.0)
    share = (w > 1).float().mean(dim=(0, 1, 3, 4))
    # World shapes cover ~10-20% of a frame (radius 0.19-0.24 of the side): every frame has some, none is all shape.
    assert torch.all(share > 0.03) and torch.all(share < 0.4), share
    assert set(torch.unique(w).tolist()) == {1.0, 10.0}


@pytest.mark.parametrize("extra,message", [
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--switch-fraction", "2"], "argument --switch-fraction: 2 is not a fraction in [0, 1]"),
    (["--latent-noise", "-1"], "argument --latent-noise: -1 must be a number >= 0"),
    (["--model", "toy", "--output", "NOTES"], "exists and is not a model folder; give a new path or a model folder"),
    (["--own-streams", "-1"], "argument --own-streams: -1 must be an integer >= 0"),
    (["--own-blocks", "0", "--own-streams", "2"], "argument --own-blocks: 0 must be an integer >= 1"),
    (["--painted-weight", "9"], "--painted-weight act on own streams only; give --own-streams N > 0 too"),
    (["--own-batch", "3", "--own-blocks", "4"],
     "--own-blocks, --own-batch act on own streams only; give --own-streams N > 0 too"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, extra, message):
    from scripts.tune_stream_decoder import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    argv = [*TINY, "--work", str(tmp_path / "w"), "--output", str(tmp_path / "out"), *extra]
    argv = [str(tmp_path / "notes") if a == "NOTES" else a for a in argv]
    with pytest.raises(SystemExit) as err:
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and last.endswith(message), last
    assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def _world_clip(seed: int, colour: str, shape: str, frames: int = 6):
    import dataclasses

    from supergen.toyworld import render_stream_clip, sample_stream_params

    params = dataclasses.replace(sample_stream_params(np.random.default_rng(seed)), colour=colour, shape=shape,
                                 background="dark night", start_x=0.5, start_y=0.5)
    return render_stream_clip(params, 32, 32, frames), params.prompt


def test_world_label_keeps_a_world_clip_and_cleans_what_a_model_gets_wrong():
    from scripts.tune_stream_decoder import world_label
    from supergen.metrics import object_counts, shape_track

    clip, prompt = _world_clip(1, "white", "triangle")
    label, found, painted = world_label(clip, prompt)
    assert label.shape == clip.shape and label.dtype == np.uint8 and found.all()
    # The world's own clip comes back: the shape where it was, one object, only the texture near it smoothed.
    assert np.abs(shape_track(label, "white") - shape_track(clip, "white")).max() < 0.5
    assert (object_counts(label, wrap=True) == 1).all()
    assert np.abs(label.astype(int) - clip.astype(int)).mean() < 3

    # What a stream gets wrong: the white shape drawn lavender-purple in frame 1, a stray red speck in frame 2,
    # nothing at all in frame 3.
    bad = clip.copy()
    shape = np.linalg.norm(clip.astype(float) - [245, 245, 245], axis=-1) < 70
    bad[1][shape[1]] = (165, 70, 210)
    bad[2, 2:6, 2:6] = (225, 35, 35)
    bad[3] = clip[3, 0, 0]
    label, found, painted = world_label(bad, prompt)
    assert painted[2, 2:6, 2:6].all() and not painted[3].any()
    assert found.tolist() == [True, True, True, False, True, True]
    counts = object_counts(label, wrap=True)
    assert counts.tolist() == [1, 1, 1, 0, 1, 1]
    track = shape_track(label, "white")
    assert np.abs(track[1] - shape_track(clip, "white")[1]).max() < 0.5  # white again, where the purple was
    assert np.array_equal(label[3], bad[3])  # no shape: kept as the stream drew it
    assert np.linalg.norm(label[2, 2:6, 2:6].astype(float) - [225, 35, 35], axis=-1).min() > 100  # speck gone


def test_own_streams_train_resumably_and_a_work_folder_keeps_its_set(tmp_path):
    own = ["--own-streams", "2", "--own-blocks", "2", "--own-batch", "1", "--steps", "2"]
    straight = _tune(tmp_path / "w1", tmp_path / "out1", *own)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "own streams 2/2" in straight.stderr
    for _ in range(2):
        piece = _tune(tmp_path / "w2", tmp_path / "out2", *own, "--max-steps", "1")
        assert piece.returncode == 0, piece.stderr[-2000:]
        assert "own streams" not in piece.stderr or _ == 0  # made once, then read back
    a, b = _vae(tmp_path / "out1"), _vae(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = _tune(tmp_path / "w3", tmp_path / "out3", "--steps", "2")
    c = _vae(tmp_path / "out3")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the own streams changed what was learned
    (tmp_path / "w4").mkdir()
    (tmp_path / "w4" / "own_streams.pt").write_bytes((tmp_path / "w1" / "own_streams.pt").read_bytes())
    painted = _tune(tmp_path / "w4", tmp_path / "out4", *own, "--painted-weight", "9")
    assert painted.returncode == 0 and "own streams 2/2" not in painted.stderr  # the same set, read back
    d = _vae(tmp_path / "out4")
    assert any(not torch.equal(a[k], d[k]) for k in a)  # the repainted pixels' weight changed the step
    data = torch.load(tmp_path / "w1" / "own_streams.pt", weights_only=False)
    assert data["latents"].shape[:3] == (2, 8, 6) and data["targets"].shape[1:] == (11, 32, 32, 3)
    other = _tune(tmp_path / "w1", tmp_path / "out1", *own[:2], "--own-blocks", "3", *own[4:])
    assert other.returncode != 0 and "use a new --work" in other.stderr.strip().splitlines()[-1]
