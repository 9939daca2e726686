"""scripts/train_toy_causal.py: a few steps end to end, reproducible from the seed, resumable to the same weights."""

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from supergen import SuperGenPipeline

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.train_toy_causal import teacher_forcing_mask  # noqa: E402

# 4 clips of 13 video frames (7 latent frames, two blocks of 3): views of 2 blocks, sink or not.
TINY_RUN = ["--clips", "4", "--clip-frames", "13", "--max-context-blocks", "1", "--max-sink-blocks", "1",
            "--steps", "4", "--batch", "2", "--log-every", "1", "--ckpt-every", "100", "--export-every", "0",
            "--threads", "1", "--seed", "3"]


def _train(work: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_toy_causal.py"), "--work", str(work), "--output",
         str(work / "export"), *TINY_RUN, *extra],
        check=True, capture_output=True, text=True, timeout=300,
    )


def _rows(work: Path) -> list[tuple[str, str, str]]:
    return [(r["phase"], r["step"], r["loss"]) for r in csv.DictReader((work / "loss.csv").open())]


def test_teacher_forcing_mask_is_block_causal_over_clean_context():
    # Frames: clean blocks 0,1,2 (one frame each), then noisy copies of blocks 1 and 2.
    mask = teacher_forcing_mask(3, 2, 1).int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],  # clean block 0 sees itself
        [1, 1, 0, 0, 0],  # clean block 1 sees clean 0..1
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],  # noisy block 1 sees clean block 0 and itself, never its clean copy
        [1, 1, 0, 0, 1],  # noisy block 2 sees clean blocks 0..1 and itself
    ]


def test_causal_training_is_reproducible_and_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    _train(straight)
    rows = _rows(straight)
    assert [(p, s) for p, s, _ in rows] == [("causal", str(i)) for i in range(1, 5)]

    pieces = tmp_path / "pieces"
    for _ in range(2):
        _train(pieces, "--max-steps", "2")
    assert _rows(pieces) == rows

    a = load_file(next((straight / "export" / "transformer").glob("*.safetensors")))
    b = load_file(next((pieces / "export" / "transformer").glob("*.safetensors")))
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # Fine-tuned from the toy: weights moved, VAE untouched; the stream settings ship in supergen.json.
    toy = SuperGenPipeline.from_pretrained("toy", device="cpu")
    moved = [n for n, v in toy.pipe.transformer.state_dict().items() if not torch.equal(v, a[n])]
    assert len(moved) > len(a) // 2
    vae = load_file(next((straight / "export" / "vae").glob("*.safetensors")))
    assert all(torch.equal(v, vae[n]) for n, v in toy.pipe.vae.state_dict().items())
    hints = json.loads((straight / "export" / "supergen.json").read_text())
    assert hints["native_height"] == 32 and hints["stream"]["block_frames"] == 3

    pipe = SuperGenPipeline.from_pretrained(str(straight / "export"), device="cpu")
    assert pipe.default_stream_config.on_prompt_change == hints["stream"]["on_prompt_change"]
    with pipe.stream("a red circle moving left over a blue sky", num_blocks=2) as stream:
        frames = [b.frames for b in stream]
    assert [f.shape for f in frames] == [(5, 32, 32, 3), (6, 32, 32, 3)]


def test_rollout_with_the_exact_velocity_lands_on_the_noised_ground_truth():
    # On a straight flow path the velocity noise - x0 is constant, so the few-step sampler run with it
    # must reach (1 - s) x0 + s noise at every exit level s, and the target there is that same velocity.
    from scripts.train_toy_causal import roll_out

    gen = torch.Generator().manual_seed(0)
    context, x0, noise = (torch.randn(2, 8, f, 4, 4, generator=gen) for f in (6, 3, 3))
    sigmas = torch.tensor([1.0, 0.857, 0.667, 0.4])
    calls = []

    def exact(x, t_F):
        calls.append(t_F[:, -3:].clone())
        assert torch.equal(x[:, :, :6], context)
        return noise - x0

    for exit_step in range(len(sigmas)):
        calls.clear()
        batch = {"x": torch.cat([context, noise], dim=2), "t_F": torch.zeros(2, 9), "x0": x0, "noise": noise}
        roll_out(exact, batch, sigmas, exit_step)
        s = sigmas[exit_step]
        assert len(calls) == exit_step
        assert [float(c[0, 0]) for c in calls] == [float(v * 1000) for v in sigmas[:exit_step]]
        torch.testing.assert_close(batch["x"][:, :, 6:], (1 - s) * x0 + s * noise, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch["target"], noise - x0, rtol=0, atol=1e-4)
        assert torch.all(batch["t_F"][:, -3:] == s * 1000) and torch.all(batch["t_F"][:, :6] == 0)


# Rollout on half the steps, and first-block regression onto 4 teacher trajectories (4 Euler steps) on half.
# Dagger views (own context sampled at CFG 2, the world's continuation as target) on half of the rest.
# The dagger views' sink is the model's own first block too; half the views end right after a prompt switch.
SELF_FORCING = ["--rollout-fraction", "0.5", "--first-blocks", "4", "--first-block-fraction", "0.5",
                "--teacher-steps", "4", "--dagger-fraction", "0.5", "--dagger-guidance", "2", "--dagger-sink",
                "--switch-view-fraction", "0.5", "--first-dagger-fraction", "0.3"]


def test_rollout_and_first_block_training_resume_to_the_same_weights(tmp_path):
    from supergen.toyworld import all_prompts

    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    # Clips drawn by their prompt's weight too (--prompt-weights): a resumed run draws the same clips.
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({p: 1.0 + k % 4 for k, p in enumerate(all_prompts())}))
    options = [*SELF_FORCING, "--prompt-weights", str(weights), "--steps", "6"]
    _train(straight, *options)
    for _ in range(2):
        _train(pieces, *options, "--max-steps", "3")
    assert _rows(pieces) == _rows(straight)
    rows = _rows(straight)
    assert len(rows) == 6 and all(float(loss) > 0 for _, _, loss in rows)
    pairs = torch.load(straight / "first_blocks.pt", weights_only=False)
    assert pairs["states"].shape[:2] == (4, 4) and pairs["x0"].shape[2] == 3
    assert len(pairs["prompts"]) == 4 and torch.equal(pairs["levels"], pairs["levels"].sort(descending=True).values)
    a = load_file(next((straight / "export" / "transformer").glob("*.safetensors")))
    b = load_file(next((pieces / "export" / "transformer").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The exported model reads like one written by open/mkdir (save_pretrained writes safetensors 0600).
    mask = os.umask(0)
    os.umask(mask)
    for p in [straight / "export", *(straight / "export").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~mask, p


def test_first_block_batch_targets_the_velocity_to_the_teachers_clip():
    from types import SimpleNamespace

    from scripts.train_toy_causal import first_block_batch

    gen = torch.Generator().manual_seed(1)
    levels = torch.tensor([1.0, 0.857, 0.667, 0.4])
    pairs = {"states": torch.randn(5, 4, 8, 3, 4, 4, generator=gen).half(), "x0": torch.randn(5, 8, 3, 4, 4, generator=gen).half(),
             "prompts": [f"p{i}" for i in range(5)], "levels": levels}
    text = {f"p{i}": torch.full((2, 32), float(i)) for i in range(5)}
    batch = first_block_batch(pairs, text, torch.Generator().manual_seed(0), SimpleNamespace(batch=6, block=3))
    s = batch["t_F"][:, 0] / 1000
    assert torch.all(batch["t_F"] == batch["t_F"][:, :1]) and all(any(abs(v - l) < 1e-6 for l in levels) for v in s)
    # x_t - sigma * v lands on the teacher's clip of the same pair (the prompt tells which pair it was).
    for k in range(6):
        i = int(batch["cond"][k, 0, 0])
        torch.testing.assert_close(batch["x"][k] - s[k] * batch["target"][k], pairs["x0"][i].float(), rtol=0, atol=1e-3)


def test_switch_views_end_on_the_first_blocks_after_a_prompt_switch():
    from types import SimpleNamespace

    from scripts.train_toy_causal import make_batch

    # 12 clips of 31 latent frames whose values are their frame index; clips 0..5 switch at a block boundary.
    n, frames, b = 12, 31, 3
    latents = torch.arange(frames).float().view(1, 1, frames, 1, 1).expand(n, 2, frames, 2, 2).contiguous()
    switch_at = torch.tensor([6, 9, 12, 15, 18, 21] + [frames] * 6)
    data = {"latents": latents, "pre": [f"pre{i}" for i in range(n)], "post": [f"post{i}" for i in range(n)],
            "switch_at": switch_at}
    text = {"": torch.zeros(1, 4), **{f"{w}{i}": torch.full((1, 4), (i + 1) * (1 if w == "pre" else -1.0))
                                      for i in range(n) for w in ("pre", "post")}}
    args = SimpleNamespace(block=b, max_context_blocks=4, max_sink_blocks=1, start_fraction=0.0, noisy_blocks=1,
                           start_blocks=2, batch=8, cfg_drop=0.0, schedule_fraction=0.5, context_noise=0.0)
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.4])

    def after_switch(switch_view: bool) -> list[int]:
        blocks_after = []
        for step in range(20):
            gen = torch.Generator().manual_seed(step)
            batch = make_batch(data, text, gen, args, sigmas, 3.0, rollout=True, switch_view=switch_view)
            for k, (clip, start) in enumerate(zip(batch["clips"], batch["starts"])):
                assert batch["x0"][k, 0, 0, 0, 0] == start  # the trained block is the clip's frames from start
                if switch_view:
                    assert clip < 6  # only clips that switch
                    post = bool(start >= switch_at[clip])
                    assert float(batch["cond"][k, 0, 0]) == (clip + 1) * (-1 if post else 1)
                blocks_after.append((start - int(switch_at[clip])) // b if clip < 6 else -1)
        return blocks_after

    focused, plain = after_switch(True), after_switch(False)
    share = sum(k in (0, 1) for k in focused) / len(focused)
    assert share > 0.75, share  # where the view's length allows it (not a long view on an early switch)
    assert sum(k in (0, 1) for k in plain) / len(plain) < 0.2


@pytest.mark.parametrize("flag,value,message", [
    ("--rollout-fraction", "1.5", "1.5 is not a fraction in [0, 1]"),
    ("--first-block-fraction", "-0.1", "-0.1 is not a fraction in [0, 1]"),
    ("--first-blocks", "-4", "-4 must be an integer >= 0"),
    ("--dagger-fraction", "2", "2 is not a fraction in [0, 1]"),
    ("--dagger-blocks", "0", "0 must be an integer >= 1"),
    ("--dagger-guidance", "-1", "-1 must be a number >= 0"),
    ("--switch-view-fraction", "1.2", "1.2 is not a fraction in [0, 1]"),
    ("--first-dagger-fraction", "-1", "-1 is not a fraction in [0, 1]"),
    ("--lr-restart", "-1", "-1 must be an integer >= 0"),
])
def test_bad_training_options_are_refused_in_one_line(tmp_path, capsys, flag, value, message):
    # In-process: argparse refuses before any work (the script's own entry point is main()).
    from scripts.train_toy_causal import main

    with pytest.raises(SystemExit) as err:
        main(["--work", str(tmp_path / "w"), flag, value])
    assert err.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("options,message", [
    (["--dagger-sink"], "--dagger-sink acts in dagger views only; give --dagger-fraction > 0 too"),
    (["--switch-view-fraction", "0.5", "--switch-fraction", "0"],
     "--switch-view-fraction needs clips with a prompt switch; give --switch-fraction > 0"),
    (["--lr-restart", "400", "--steps", "400"], "--lr-restart 400 must be below --steps 400"),
])
def test_options_that_would_do_nothing_are_refused_in_one_line(tmp_path, capsys, options, message):
    from scripts.train_toy_causal import main

    with pytest.raises(SystemExit) as err:
        main(["--work", str(tmp_path / "w"), *options])
    assert err.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "w").exists()


def test_lr_restart_gives_a_resumed_stage_its_own_warm_up_and_cosine():
    from types import SimpleNamespace

    from scripts.train_toy_causal import stage_lr

    plain = SimpleNamespace(lr=2e-4, steps=1700, warmup=10, lr_restart=0)
    stage = SimpleNamespace(lr=2e-4, steps=1700, warmup=10, lr_restart=1400)
    # Without a restart, step 1400 of 1700 sits near the cosine's 10% floor.
    assert stage_lr(plain, 1400) < 0.3 * 2e-4
    assert [stage_lr(stage, 1400 + k) for k in (0, 9)] == pytest.approx([2e-5, 2e-4], rel=3e-3)  # warm-up
    assert stage_lr(stage, 1550) == pytest.approx(2e-4 * 0.55, rel=1e-3)  # half-way down
    assert stage_lr(stage, 1699) == pytest.approx(2e-5, rel=1e-2)  # floor
    assert stage_lr(SimpleNamespace(lr=2e-4, steps=300, warmup=10, lr_restart=0), 150) == stage_lr(stage, 1550)


def test_dagger_oracle_continues_from_where_the_context_left_the_shape():
    # A context whose shape sits 4 px right of the ground truth's: the oracle finds the 4 px and returns the
    # block of the clip re-rendered 4 px right (one clean shape moving on from there), not the ground truth's.
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from scripts.train_toy_causal import clip_specs, oracle_block
    from scripts.train_toy_model import clips_to_video, latent_stats
    from supergen.models import load_diffusers_pipeline
    from supergen.toyworld import render_stream_clip

    pipe = load_diffusers_pipeline("toy")
    args = SimpleNamespace(seed=5, clips=2, clip_frames=25, block=3, switch_fraction=0.0)
    specs = clip_specs(args, pipe.vae.config.scale_factor_temporal)
    mean, std = latent_stats(pipe.vae)

    def encode(params_list):
        videos = np.stack([render_stream_clip(p, 32, 32, args.clip_frames, None) for p in params_list])
        with torch.no_grad():
            return (pipe.vae.encode(clips_to_video(videos)).latent_dist.mode() - mean) / std

    params = [p for p, _, _ in specs]
    truth = encode(params)
    moved = encode([replace(p, start_x=(p.start_x + 4 / 32) % 1.0) for p in params])
    # View: no sink, context latent frames 3..8 (two blocks), the trained block 9..11.
    data = {"pre": [p.prompt for p in params], "post": [p.prompt for p in params], "switch_at": torch.tensor([13, 13])}
    view = {"sink": 0, "blocks": 3, "noisy": 1}
    batch = {"view": view, "clips": [0, 1], "starts": [9, 9], "x0": truth[:, :, 9:12]}
    stats = {"steps": 0, "lost": 0.0, "shift": 0.0}

    batch["x"] = truth[:, :, 3:12].clone()
    same = oracle_block(pipe, specs, batch, truth[:, :, 3:12], data, args, stats)
    assert stats["each"] == [(0.0, 0.0), (0.0, 0.0)]
    torch.testing.assert_close(same, truth[:, :, 9:12], rtol=0, atol=1e-4)

    batch["x"] = moved[:, :, 3:12].clone()
    out = oracle_block(pipe, specs, batch, truth[:, :, 3:12], data, args, stats)
    for dy, dx in stats["each"]:
        assert abs(dy) < 1.5 and abs(dx - 4) < 1.5, stats["each"]  # the colour detector is good to ~1 px
    assert (out - moved[:, :, 9:12]).abs().mean() < 0.25 * (truth[:, :, 9:12] - moved[:, :, 9:12]).abs().mean()
    assert stats["steps"] == 2 and stats["lost"] == 0


def test_first_block_target_draws_the_world_where_the_model_put_its_shape():
    # A first block whose shape starts 6 px left and 3 px below where the clip's spec starts it: the label is
    # the spec's world re-rendered from there (one clean shape, the prompted motion), not the spec's own block.
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from scripts.train_toy_causal import clip_specs, first_block_target
    from scripts.train_toy_model import clips_to_video, latent_stats
    from supergen.models import load_diffusers_pipeline
    from supergen.toyworld import render_stream_clip

    pipe = load_diffusers_pipeline("toy")
    args = SimpleNamespace(seed=2, clips=3, clip_frames=25, block=3, switch_fraction=0.0)
    specs = clip_specs(args, pipe.vae.config.scale_factor_temporal)
    mean, std = latent_stats(pipe.vae)
    frames = pipe.vae.config.scale_factor_temporal * (args.block - 1) + 1

    def encode(params_list):
        videos = np.stack([render_stream_clip(p, 32, 32, frames, None) for p in params_list])
        with torch.no_grad():
            return ((pipe.vae.encode(clips_to_video(videos)).latent_dist.mode() - mean) / std)[:, :, : args.block]

    params = [p for p, _, _ in specs]
    own = encode([replace(p, start_x=(p.start_x - 6 / 32) % 1.0, start_y=(p.start_y + 3 / 32) % 1.0) for p in params])
    stats = {"first_steps": 0, "first_lost": 0.0}
    target, weight = first_block_target(pipe, specs, [0, 1, 2], own, args, stats)
    assert target.shape == own.shape and weight.flatten().tolist() == [1.0, 1.0, 1.0]
    # The model's own clean shape comes back (the detector finds the centre to ~1 px) ...
    off = (target - own).abs().mean()
    assert off < 0.25 * (encode(params) - own).abs().mean(), off
    # ... and a block with no shape of the prompted colour is left out of the loss.
    blank = encode([replace(p, radius=0.01) for p in params])
    _, weight = first_block_target(pipe, specs, [0, 1, 2], blank, args, stats)
    assert weight.flatten().tolist() == [0.0, 0.0, 0.0] and stats["first_steps"] == 2


def test_prompt_weights_draw_clips_by_their_prompt():
    from types import SimpleNamespace

    from scripts.train_toy_causal import draw_clips, make_batch

    n, frames = 6, 13
    latents = torch.arange(n).float().view(n, 1, 1, 1, 1).expand(n, 2, frames, 2, 2).contiguous()
    data = {"latents": latents, "pre": [f"p{i}" for i in range(n)], "post": [f"p{i}" for i in range(n)],
            "switch_at": torch.full((n,), frames)}
    text = {"": torch.zeros(1, 4), **{f"p{i}": torch.full((1, 4), float(i)) for i in range(n)}}
    args = SimpleNamespace(block=3, max_context_blocks=1, max_sink_blocks=0, start_fraction=0.0, noisy_blocks=1,
                           start_blocks=2, batch=8, cfg_drop=0.0, schedule_fraction=0.5, context_noise=0.0)
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.4])
    uniform = [c for s in range(20) for c in make_batch(data, text, torch.Generator().manual_seed(s), args, sigmas,
                                                        3.0)["clips"]]
    assert set(uniform) == set(range(n))
    # Weight only on clips 1 and 4 (3:1): every view comes from them, in about that ratio, its latents too.
    data["clip_weights"] = torch.tensor([0, 3, 0, 0, 1, 0], dtype=torch.float64)
    drawn = []
    for s in range(20):
        batch = make_batch(data, text, torch.Generator().manual_seed(s), args, sigmas, 3.0)
        assert all(float(batch["x0"][k, 0, 0, 0, 0]) == c for k, c in enumerate(batch["clips"]))
        drawn += batch["clips"]
    assert set(drawn) == {1, 4} and 0.6 < drawn.count(1) / len(drawn) < 0.9
    first = draw_clips(data, n, 400, torch.Generator().manual_seed(0)).tolist()
    assert set(first) == {1, 4} and 0.65 < first.count(1) / 400 < 0.85


@pytest.mark.parametrize("content,message", [
    ("not json", "cannot read a JSON object from it (JSONDecodeError)"),
    ("[1, 2]", "expected a JSON object {prompt: weight}"),
    ("{}", "144 world prompts have no weight (e.g. 'a red circle moving left over a blue sky')"),
    ("ALL|a red circle moving up over the moon|1", "'a red circle moving up over the moon' is not a toy-world prompt"),
    ("ALL|a red circle moving left over a blue sky|-1",
     "the weight of 'a red circle moving left over a blue sky' is not a number >= 0"),
    ("ZERO", "every weight is 0"),
])
def test_bad_prompt_weights_are_refused_in_one_line(tmp_path, content, message):
    from scripts.train_toy_causal import read_prompt_weights
    from supergen.toyworld import all_prompts

    if content.startswith("ALL|"):
        _, prompt, weight = content.split("|")
        content = json.dumps({**{p: 1.0 for p in all_prompts()}, prompt: float(weight)})
    elif content == "ZERO":
        content = json.dumps({p: 0 for p in all_prompts()})
    weights = tmp_path / "weights.json"
    weights.write_text(content)
    with pytest.raises(SystemExit) as err:
        read_prompt_weights(weights)
    text = str(err.value)
    assert "\n" not in text and text == (f"--prompt-weights {weights}: {message}; write one weight >= 0 per prompt "
                                         "of the world (scripts/bench_stream_quality.py --vocab-weights writes such "
                                         "a file)")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({p: float(k % 3) for k, p in enumerate(all_prompts())}))
    assert read_prompt_weights(good)[all_prompts()[4]] == 1.0


def test_bad_prompt_weights_stop_the_trainer_before_it_starts(tmp_path):
    from scripts.train_toy_causal import main

    weights = tmp_path / "weights.json"
    weights.write_text("{}")
    with pytest.raises(SystemExit) as err:
        main(["--work", str(tmp_path / "w"), "--prompt-weights", str(weights)])
    assert "world prompts have no weight" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "w").exists()
