"""The shipped toy model (``--model toy``): loads, generates at its native size, draws what it is asked."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from supergen import SuperGenPipeline, TilingConfig
from supergen.metrics import mean_adherence
from supergen.models import SHIPPED_MODELS, build_toy_wan, resolve_model
from supergen.toyworld import all_prompts

REPO = Path(__file__).resolve().parent.parent
QUALITY = json.loads((SHIPPED_MODELS["toy"].parent / "toy_quality.json").read_text())

# 12 prompts spread over the vocabulary (stride 13 touches every colour, shape and direction).
PROMPTS = all_prompts()[::13]
STEPS = 20


@pytest.fixture(scope="module")
def toy():
    return SuperGenPipeline.from_pretrained("toy", device="cpu")


def _native_videos(pipe):
    native = TilingConfig(strength=1.0)
    return [
        pipe(p, height=32, width=32, num_inference_steps=STEPS, seed=i, tiling=native, progress=False).frames
        for i, p in enumerate(PROMPTS)
    ]


def test_prompt_sample_covers_the_vocabulary():
    words = " ".join(PROMPTS)
    for word in ("red", "yellow", "white", "purple", "circle", "square", "triangle", "left", "right", "up", "down"):
        assert f" {word} " in f" {words} "


def test_toy_loads_and_generates_at_native_size(toy):
    assert (toy.adapter.native_height, toy.adapter.native_width, toy.adapter.native_num_frames) == (32, 32, 9)
    t0 = time.perf_counter()
    out = toy("a red circle moving left over a blue sky", height=32, width=32, num_inference_steps=STEPS,
              tiling=TilingConfig(strength=1.0), progress=False)
    seconds = time.perf_counter() - t0
    assert out.frames.shape == (9, 32, 32, 3) and out.frames.dtype == np.uint8
    # About 1 s on a shared 2-core CPU; the bound leaves room for a loaded machine.
    assert seconds < 20, f"native-size generation took {seconds:.1f} s"


def test_shipped_folder_is_small_and_complete():
    folder = Path(resolve_model("toy"))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6
    for part in ("model_index.json", "supergen.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).exists(), part


def test_missing_shipped_weights_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(SHIPPED_MODELS, "toy", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="shipped model 'toy' is missing"):
        resolve_model("toy")


def test_toy_adheres_to_prompts_far_better_than_random_weights(toy):
    # supergen/assets/toy_quality.json records the bench's verdict on the shipped checkpoint.
    assert QUALITY["recognisable"] is True
    videos = _native_videos(toy)
    trained = mean_adherence(videos, PROMPTS)
    random = mean_adherence(_native_videos(SuperGenPipeline.from_pipe(build_toy_wan(seed=0), native_size=(32, 32, 9))), PROMPTS)
    # Measured on these 12 prompts: trained 0.83 (colour 1.0, shape 0.5, direction 1.0),
    # random weights 0.22 (noise sometimes holds a patch near white or purple). A
    # detector reading real clips against wrong prompts scores about 0.29 (chance).
    # The trained model must beat random weights by 0.5 and clear chance widely.
    assert random["score"] < 0.3, random
    assert trained["score"] >= random["score"] + 0.5, (trained, random)
    assert trained["colour"] >= 0.75 and trained["direction"] >= 0.75, trained
    # The score is earned by following each prompt, not granted by the detector:
    # read against another prompt of the sample (rotated by 4, so colour, shape
    # and direction all differ), the same videos score far lower.
    rotated = mean_adherence(videos, PROMPTS[4:] + PROMPTS[:4])
    assert rotated["score"] <= trained["score"] - 0.5, (rotated, trained)


def test_cli_generates_with_toy(tmp_path):
    out = tmp_path / "toy.mp4"
    metrics = tmp_path / "m.json"
    subprocess.run(
        [sys.executable, "-m", "supergen", "generate", "--model", "toy", "--prompt",
         "a yellow square moving up over a green field", "--height", "48", "--width", "48", "--steps", "6",
         "--output", str(out), "--metrics-json", str(metrics)],
        cwd=REPO, check=True, timeout=300, capture_output=True,
    )
    data = json.loads(metrics.read_text())
    assert out.stat().st_size > 0
    assert (data["height"], data["width"], data["num_frames"]) == (48, 48, 9)
    assert data["tiles"]["count"] > 1
