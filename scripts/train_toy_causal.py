"""Fine-tune the toy model (``--model toy``) into ``--model toy-causal``: block-causal, few-step, endless.

The shipped toy was trained on 9-frame clips with full attention, so in a
stream every block re-draws its clip from the middle of the frame: the shape
drifts inside a block and jumps back at the next one. This script teaches its
transformer to continue a video block by block, the way causal students are
trained (CausVid / Self-Forcing's teacher-forcing stage):

- Data: long toy-world clips (``--clip-frames`` video frames) whose shape
  keeps moving the prompted way and wraps around the frame edges
  (:func:`supergen.toyworld.render_stream_clip`), so the prompt stays true
  however long a stream runs; ``--switch-fraction`` of them change colour and
  direction at a block boundary (a prompt switch), encoded once by the toy's
  frozen VAE.
- Views: each training sequence is what the stream's KV cache shows the model:
  an optional attention sink (the first ``S`` latent frames of the clip) and a
  contiguous run of later blocks, RoPE positions packed 0..n-1 exactly as
  :class:`~supergen.cache.kv.RollingKVCache` packs them.
- Teacher forcing on clean context: the sequence holds the clean frames
  (timestep 0, as the stream's ``rerun`` KV write sees them) followed by noisy
  copies of its last ``--noisy-blocks`` blocks. A block-causal mask lets clean
  block ``b`` see clean blocks ``<= b``, and the noisy copy of block ``b`` see
  clean blocks ``< b`` and itself. Each noisy block draws its own noise level
  (diffusion forcing), half the time one of the few-step schedule's levels.
  Flow-matching loss on the noisy copies only.
- Prompt switches: a view whose last block follows a switch is conditioned on
  the new prompt while its context still shows the old one (what the stream's
  KV re-cache presents after ``set_prompt``); noisy blocks from before the
  switch get no loss in that view.

Only the transformer is trained (starting from the toy's weights); VAE, text
encoder, tokenizer and scheduler are the toy's. Everything is determined by
``--seed`` (data, views, noise of every step are drawn from generators seeded
by (seed, phase, step)), checkpoints every ``--ckpt-every`` steps, and a
rerun of the same command resumes from the last one to the same weights
(tests/test_train_toy.py). The EMA of the weights ships, with the stream
settings chosen by scripts/bench_stream_quality.py in its ``supergen.json``:

    OMP_NUM_THREADS=1 nohup python scripts/train_toy_causal.py --work runs/toy-causal > runs/toy-causal.log 2>&1 &

``--dagger-fraction`` attacks the exposure bias of a stream fed its own
output without a causal teacher, the way DAgger does with an expert: the toy
world itself labels the model's own contexts. In a dagger view the last
``--dagger-blocks`` context blocks are sampled by the model (the stream's
few-step schedule from pure noise, block by block, no gradient, at CFG
``--dagger-guidance``); the last context frame is decoded and its shape
found; the clip is re-rendered with the shape moved to where the model left
it; and the trained block, rolled out as in ``--rollout-fraction``, targets
that re-rendered continuation: one clean shape moving on the prompted way
from the model's own last position.

Three refinements of that, tried as a fifth stage and not shipped (the
numbers are in docs/benchmarks.md, "Stage 5 attempts"): ``--dagger-sink``
makes the dagger views' sink the model's own first block too, as in a
stream; ``--switch-view-fraction`` ends that share of views on the first or
second block after a prompt switch; ``--first-dagger-fraction`` does DAgger
on the first block itself (the model's own sample, labelled with the world's
block drawn where the model put the shape, trained on the model's rollout
from the same noise).

The other two modes: ``--rollout-fraction`` trains a block from the few-step
sampler's own state (Self-Forcing's rollout, one block after a context, the
target the velocity to the ground truth), and ``--first-blocks`` regresses
the context-free first block onto a bidirectional teacher's trajectories
(CausVid's ODE initialisation).

The shipped ``toy-causal`` is the fourth stage of one chain, each stage
starting from the previous one's exported EMA (docs/benchmarks.md,
"Streaming quality", has each stage's numbers and the exact commands):

1. teacher forcing from ``toy``, 900 steps (40 minutes);
2. ``--rollout-fraction 0.5``, then with ``--first-blocks 256``, 2,100 steps
   (70 minutes);
3. dagger views at CFG 1 over views as long as the stream's
   (``--max-context-blocks 4 --max-sink-blocks 1``), 200 steps (12 minutes);
4. dagger views at CFG 3 (``--dagger-guidance 3 --guidance 3``), 400 steps
   (32 minutes): 200 of a ``--steps 400`` schedule, then 200 more after
   resuming with ``--steps 650``.

About 2.5 hours on one thread in all, over several sessions. Guidance 3 at
inference (written to its supergen.json) made the biggest difference (stage
2's continuity over 60 blocks and 4 prompts: 0.16 at CFG 1, 0.45 at CFG 3);
the dagger stages took it to 0.58 and one object from 59% to 75% of frames.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from scripts.train_toy_model import (  # noqa: E402
    LossLog,
    budget_spent,
    clips_to_video,
    cosine_lr,
    encode_prompts,
    fraction,
    export as export_pipeline,
    latent_stats,
    non_negative_float,
    non_negative_int,
    positive_int,
    optimizer_step,
    resume,
    save_checkpoint,
    start_run,
    step_seed,
    stop_run,
)
from supergen.backbones.base import cfg_combine  # noqa: E402
from supergen.models import TOY_NATIVE_SIZE, load_diffusers_pipeline  # noqa: E402
from supergen.toyworld import (  # noqa: E402
    COLOURS,
    DIRECTIONS,
    PromptSwitch,
    all_prompts,
    render_stream_clip,
    sample_stream_params,
    switched_prompt,
)

logger = logging.getLogger("train_toy_causal")

#: Stream settings written to supergen.json (chosen with scripts/bench_stream_quality.py).
STREAM_DEFAULTS = {"block_frames": 3, "window": 9, "sink": 3, "steps": 4, "schedule": "block", "kv_write": "rerun",
                   "on_prompt_change": "restart"}


class _MaskedSelfAttn(WanAttnProcessor):
    """Diffusers' own Wan self-attention with a block-causal mask and RoPE tables set per step."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, None, self.mask, self.rope)


def rope_tables(rope, frame_positions: torch.Tensor, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (1, tokens, 1, head_dim) for whole latent frames at the given RoPE frame positions."""
    gh, gw = grid_hw
    n = len(frame_positions)
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t_tab, h_tab, w_tab = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        f = t_tab[frame_positions][:, None, None].expand(n, gh, gw, -1)
        h = h_tab[:gh][None, :, None].expand(n, gh, gw, -1)
        w = w_tab[:gw][None, None, :].expand(n, gh, gw, -1)
        out.append(torch.cat([f, h, w], dim=-1).reshape(1, n * gh * gw, 1, -1))
    return out[0], out[1]


def teacher_forcing_mask(clean_blocks: int, noisy_blocks: int, block: int) -> torch.Tensor:
    """Frame-level mask (queries, keys) over [clean blocks | noisy copies of the last ``noisy_blocks``]."""
    clean_b = torch.arange(clean_blocks).repeat_interleave(block)
    noisy_b = torch.arange(clean_blocks - noisy_blocks, clean_blocks).repeat_interleave(block)
    q_block = torch.cat([clean_b, noisy_b])
    q_noisy = torch.cat([torch.zeros_like(clean_b, dtype=torch.bool), torch.ones_like(noisy_b, dtype=torch.bool)])
    k_block, k_noisy = q_block, q_noisy
    clean_key = ~k_noisy[None]
    sees_clean = clean_key & ((k_block[None] <= q_block[:, None]) & ~q_noisy[:, None]
                              | (k_block[None] < q_block[:, None]) & q_noisy[:, None])
    sees_self_noisy = k_noisy[None] & q_noisy[:, None] & (k_block[None] == q_block[:, None])
    return sees_clean | sees_self_noisy


def clip_specs(args, t_scale: int) -> list[tuple]:
    """The training set's clips as (params, prompt switch or None, latent frame of the switch), from ``--seed``.

    The same list every call, so a run (or a resumed one) can re-render any
    clip of its cached latents, as the dagger views' oracle does.
    """
    rng = np.random.default_rng(step_seed(args.seed, 10, 0))
    latent_frames = (args.clip_frames - 1) // t_scale + 1
    blocks = latent_frames // args.block
    specs = []
    for _ in range(args.clips):
        params = sample_stream_params(rng)
        switch, j = None, latent_frames
        if rng.uniform() < args.switch_fraction:
            # At a block boundary (latent frame j starts video frame t_scale*(j-1)+1), after >= 2 blocks.
            j = args.block * int(rng.integers(min(2, blocks - 1), blocks))
            colours = [c for c in COLOURS if c != params.colour]
            directions = [d for d in DIRECTIONS if d != params.direction]
            switch = PromptSwitch(frame=t_scale * (j - 1) + 1, colour=colours[rng.integers(len(colours))],
                                  direction=directions[rng.integers(len(directions))])
        specs.append((params, switch, j))
    return specs


@torch.no_grad()
def build_dataset(pipe, args, work: Path) -> dict:
    """Long clips (some with a prompt switch), VAE-encoded once, normalised like the pipeline's latents."""
    cache = work / "latents.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    height, width, _ = TOY_NATIVE_SIZE
    mean, std = latent_stats(pipe.vae)
    t_scale = pipe.vae.config.scale_factor_temporal
    latents, pre, post, switch_at = [], [], [], []
    chunk = 16
    specs = clip_specs(args, t_scale)
    for start in range(0, args.clips, chunk):
        videos = []
        for params, switch, j in specs[start : start + chunk]:
            videos.append(render_stream_clip(params, height, width, args.clip_frames, switch))
            pre.append(params.prompt)
            post.append(switched_prompt(params, switch) if switch else params.prompt)
            switch_at.append(j)
        z = pipe.vae.encode(clips_to_video(np.stack(videos))).latent_dist.mode()
        latents.append(((z - mean) / std).to(torch.float16))
        logger.info("encoded %d/%d clips", start + len(videos), args.clips)
    data = {"latents": torch.cat(latents), "pre": pre, "post": post, "switch_at": torch.tensor(switch_at)}
    torch.save(data, cache)
    return data


def few_step_sigmas(pipe, steps: int) -> torch.Tensor:
    """The noise levels the stream's few-step schedule visits (sigma 1 .. the last step's)."""
    from supergen.samplers.schedule import fresh_scheduler

    scheduler = fresh_scheduler(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1].float()


@torch.no_grad()
def build_first_blocks(args, work: Path, sigma_table: torch.Tensor) -> dict | None:
    """Teacher trajectories for the stream's first block (CausVid's ODE initialisation), cached in ``work``.

    The first block has no context, so nothing in the data determines it and a
    regression onto real clips would only teach their mean. A teacher does
    determine it: ``--teacher`` (the bidirectional toy, at its native
    length, ``--teacher-steps`` Euler steps with CFG ``--teacher-guidance``)
    maps each noise to one clip. Its states at the few-step schedule's levels
    and its final clip, cut to the first block's latent frames, are the pairs
    the student regresses on: from the teacher's state at sigma_i, the
    velocity to the teacher's clip.
    """
    if not args.first_blocks:
        return None
    cache = work / "first_blocks.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    from supergen.toyworld import all_prompts

    teacher = load_diffusers_pipeline(args.teacher)
    net = teacher.transformer.eval()
    height, width, frames = TOY_NATIVE_SIZE
    t_scale, s_scale = teacher.vae.config.scale_factor_temporal, teacher.vae.config.scale_factor_spatial
    latent_frames = (frames - 1) // t_scale + 1
    prompts = all_prompts()
    rng = np.random.default_rng(step_seed(args.seed, 12, 0))
    picked = [prompts[i] for i in rng.integers(len(prompts), size=args.first_blocks)]
    text = encode_prompts(teacher, sorted(set(picked)))
    gen = torch.Generator().manual_seed(step_seed(args.seed, 12, 1))
    c = net.config.in_channels
    # The teacher's sigma grid: each interval of the student's schedule cut into equal sub-steps.
    levels = torch.cat([sigma_table, sigma_table.new_zeros(1)])
    sub = max(1, args.teacher_steps // len(sigma_table))
    grid = torch.cat([torch.linspace(float(levels[i]), float(levels[i + 1]), sub + 1)[:-1] for i in range(len(sigma_table))]
                     + [levels.new_zeros(1)])
    states, finals = [], []
    for start in range(0, args.first_blocks, 32):
        chunk = picked[start : start + 32]
        cond = torch.stack([text[q] for q in chunk])
        empty = text[""][None].expand_as(cond)
        x = torch.randn(len(chunk), c, latent_frames, height // s_scale, width // s_scale, generator=gen)
        at_levels = []
        for i in range(len(grid) - 1):
            if i % sub == 0:
                at_levels.append(x[:, :, : args.block].clone())
            t = grid[i].expand(len(chunk)) * 1000
            v_c = net(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
            v_u = net(hidden_states=x, timestep=t, encoder_hidden_states=empty, return_dict=False)[0]
            x = x + (grid[i + 1] - grid[i]) * cfg_combine(v_u, v_c, args.teacher_guidance)
        states.append(torch.stack(at_levels, dim=1).to(torch.float16))  # (B, levels, C, block, H, W)
        finals.append(x[:, :, : args.block].to(torch.float16))
        logger.info("teacher first blocks %d/%d", start + len(chunk), args.first_blocks)
    data = {"states": torch.cat(states), "x0": torch.cat(finals), "prompts": picked, "levels": sigma_table.clone()}
    torch.save(data, cache)
    return data


def first_block_batch(pairs: dict, text: dict, gen: torch.Generator, args) -> dict:
    """One step of first-block regression: the teacher's state at a schedule level, the velocity to its clip."""
    idx = torch.randint(len(pairs["prompts"]), (args.batch,), generator=gen)
    level = torch.randint(len(pairs["levels"]), (args.batch,), generator=gen)
    xt = pairs["states"][idx, level].float()
    x0 = pairs["x0"][idx].float()
    s = pairs["levels"][level].float()
    b = args.block
    return {"x": xt, "t_F": (s * 1000)[:, None].expand(args.batch, b).clone(),
            "target": (xt - x0) / s[:, None, None, None, None], "weight": torch.ones(args.batch, 1),
            "cond": torch.stack([text[pairs["prompts"][i]] for i in idx.tolist()])}


def draw_view(gen: torch.Generator, args, latent_frames: int, rollout: bool = False) -> dict:
    """The shape of one step's sequences: sink frames, clean blocks, noisy blocks, whether it starts the clip.

    A ``rollout`` view continues a clean context by one block (never the
    clip's first block, whose content the context does not determine).
    """
    b = args.block
    max_blocks = args.max_context_blocks + 1
    total_blocks = int(torch.randint(2, max_blocks + 1, (1,), generator=gen))
    from_start = bool(torch.rand((), generator=gen) < args.start_fraction) and not rollout
    sink_blocks = 0
    if not from_start:
        sink_blocks = int(torch.randint(0, args.max_sink_blocks + 1, (1,), generator=gen))
        sink_blocks = min(sink_blocks, total_blocks - 1)
    noisy = 1 if rollout else min(args.noisy_blocks, total_blocks - sink_blocks)
    if from_start and args.start_blocks:
        # The stream's first block has no context: its motion comes from the prompt alone, so
        # views from the start train every block, the first one included.
        total_blocks = noisy = min(total_blocks, args.start_blocks)
    run = (total_blocks - sink_blocks) * b
    # Offsets of the contiguous run: whole blocks, after the sink, inside the clip.
    first = sink_blocks * b + (0 if from_start else b)
    last = (latent_frames // b) * b - run
    offsets = list(range(first, last + 1, b)) or [sink_blocks * b]
    return {"sink": sink_blocks * b, "blocks": total_blocks, "noisy": noisy, "run": run, "offsets": offsets,
            "from_start": from_start}


def draw_clips(data: dict, n_clips: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` training clips: uniform, or by ``data["clip_weights"]`` (``--prompt-weights``) when set."""
    weights = data.get("clip_weights")
    if weights is None:
        return torch.randint(n_clips, (count,), generator=gen)
    return torch.multinomial(weights, count, replacement=True, generator=gen)


def read_prompt_weights(path: Path) -> dict[str, float]:
    """``--prompt-weights``: a JSON object weighing every toy-world prompt (>= 0, some > 0); one-line errors."""

    def refuse(what: str):
        raise SystemExit(f"--prompt-weights {path}: {what}; write one weight >= 0 per prompt of the world "
                         "(scripts/bench_stream_quality.py --vocab-weights writes such a file)")

    try:
        weights = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        refuse(f"cannot read a JSON object from it ({type(err).__name__})")
    if not isinstance(weights, dict):
        refuse("expected a JSON object {prompt: weight}")
    missing = [p for p in all_prompts() if p not in weights]
    unknown = sorted(set(weights) - set(all_prompts()))
    bad = [p for p, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0]
    if missing:
        refuse(f"{len(missing)} world prompts have no weight (e.g. {missing[0]!r})")
    if unknown:
        refuse(f"{unknown[0]!r} is not a toy-world prompt")
    if bad:
        refuse(f"the weight of {bad[0]!r} is not a number >= 0")
    if not any(w > 0 for w in weights.values()):
        refuse("every weight is 0")
    return {p: float(w) for p, w in weights.items()}


def make_batch(data: dict, text: dict, gen: torch.Generator, args, sigma_table: torch.Tensor, shift: float,
               rollout: bool = False, drop: bool = True, switch_view: bool = False):
    """One step's inputs: latents x (B,C,F,H,W), per-frame timesteps, targets, loss weights, text.

    ``drop=False`` keeps every prompt (no classifier-free-guidance drop), as
    the dagger views need the prompt to sample their own context.
    ``switch_view`` draws clips with a prompt switch and places the view's
    last block on the first or second block after it where the view allows,
    so the context holds the old prompt's motion and the block the new one
    (a stream after ``set_prompt``).
    """
    latents = data["latents"]
    n_clips, _, latent_frames = latents.shape[:3]
    view = draw_view(gen, args, latent_frames, rollout)
    b, nb = args.block, view["noisy"]
    switched = torch.nonzero(data["switch_at"] < latent_frames).flatten()
    switch_view = switch_view and len(switched) > 0 and not view["from_start"]
    if switch_view:
        clip_idx = switched[torch.randint(len(switched), (args.batch,), generator=gen)]
    else:
        clip_idx = draw_clips(data, n_clips, args.batch, gen)
    xs, conds, weights, starts = [], [], [], []
    for i in clip_idx.tolist():
        z = latents[i].float()
        off = view["offsets"][int(torch.randint(len(view["offsets"]), (1,), generator=gen))]
        if switch_view:
            # The last block starts `after` blocks past the switch (off + run - b = switch_at + after * b), 0 or 1
            # in random order, the first the view's length allows.
            first_after = int(torch.randint(2, (1,), generator=gen))
            wanted = [int(data["switch_at"][i]) + a * b - view["run"] + b for a in (first_after, 1 - first_after)]
            off = next((w for w in wanted if w in view["offsets"]), off)
        if view["from_start"]:
            off = 0
        frames = torch.cat([z[:, : view["sink"]], z[:, off : off + view["run"]]], dim=1)
        # Absolute latent frame where each noisy block starts, to place it before or after a switch.
        abs_start = [off + view["run"] - (nb - k) * b for k in range(nb)]
        switch = int(data["switch_at"][i])
        after = [s >= switch for s in abs_start]
        prompt = data["post"][i] if after[-1] else data["pre"][i]
        starts.append(off + view["run"] - nb * b)
        if drop and torch.rand((), generator=gen) < args.cfg_drop:
            conds.append(text[""])
            weights.append(torch.ones(nb))
        else:
            conds.append(text[prompt])
            weights.append(torch.tensor([float(a == after[-1]) for a in after]))
        xs.append(frames)
    clean = torch.stack(xs)  # (B, C, F, H, W)
    x0 = clean[:, :, -nb * b :]
    # Noise level per noisy block: half the draws at the few-step schedule's levels.
    u = torch.rand(args.batch, nb, generator=gen)
    sigma = shift * u / (1 + (shift - 1) * u)
    pick = torch.rand(args.batch, nb, generator=gen) < args.schedule_fraction
    table = sigma_table[torch.randint(len(sigma_table), (args.batch, nb), generator=gen)]
    sigma = torch.where(pick, table, sigma)
    s_F = sigma.repeat_interleave(b, dim=1)  # (B, nb*b)
    s = s_F[:, None, :, None, None]
    noise = torch.randn(x0.shape, generator=gen)
    xt = (1 - s) * x0 + s * noise
    # Context is the model's own output at inference: a little noise keeps it from trusting every pixel.
    ctx_noise = args.context_noise * torch.rand(args.batch, 1, 1, 1, 1, generator=gen)
    context = clean + ctx_noise * torch.randn(clean.shape, generator=gen)
    x = torch.cat([context, xt], dim=2)
    t_F = torch.cat([torch.zeros(args.batch, clean.shape[2]), s_F * 1000], dim=1)
    return {"x": x, "t_F": t_F, "target": noise - x0, "x0": x0, "noise": noise, "weight": torch.stack(weights),
            "cond": torch.stack(conds), "view": view, "clips": clip_idx.tolist(), "starts": starts}


def euler_steps(forward, context: torch.Tensor, xt: torch.Tensor, t_F: torch.Tensor, sig: torch.Tensor,
                steps: int) -> torch.Tensor:
    """The first ``steps`` Euler steps of the few-step schedule ``sig`` (ending in 0) for the block ``xt`` after
    ``context``; ``t_F`` holds every frame's timestep, the block's last ``n`` entries set here at each step."""
    n = xt.shape[2]
    for i in range(steps):
        t_F[:, -n:] = sig[i] * 1000
        xt = xt + (sig[i + 1] - sig[i]) * forward(torch.cat([context, xt], dim=2), t_F)
    return xt


@torch.no_grad()
def roll_out(forward, batch: dict, sigma_table: torch.Tensor, exit_step: int) -> None:
    """Self-Forcing's rollout on one block: the noisy block becomes the few-step sampler's own state.

    From pure noise, ``exit_step`` Euler steps of the schedule with the model
    itself (no gradient, as Self-Forcing does before its exit step) bring the
    block to ``sigma_table[exit_step]``; the step trained next starts there,
    from what inference would hold, not from a noised ground truth. Its
    target is the velocity that takes that state to the ground truth, which
    the clean context determines in this world (the shape keeps its speed).
    """
    sig = torch.cat([sigma_table, sigma_table.new_zeros(1)])
    x, t_F = batch["x"], batch["t_F"]
    n = batch["x0"].shape[2]
    xt = euler_steps(forward, x[:, :, :-n], batch["noise"], t_F, sig, exit_step)
    s = sig[exit_step]
    t_F[:, -n:] = s * 1000
    batch["x"] = torch.cat([x[:, :, :-n], xt], dim=2)
    batch["target"] = (xt - batch["x0"]) / s


def set_view(model, procs, blocks: int, noisy: int, block: int, grid_hw: tuple[int, int]) -> int:
    """Point the masked processors at a view of ``blocks`` clean blocks and noisy copies of the last ``noisy``.

    Returns the number of clean frames (where the noisy copies start).
    """
    tpf = grid_hw[0] * grid_hw[1]
    frame_mask = teacher_forcing_mask(blocks, noisy, block)
    token_mask = frame_mask.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)[None, None]
    clean_f = blocks * block
    positions = torch.cat([torch.arange(clean_f), torch.arange(clean_f - noisy * block, clean_f)])
    tables = rope_tables(model.rope, positions, grid_hw)
    for proc in procs:
        proc.mask, proc.rope = token_mask, tables
    return clean_f


def prompt_at(data: dict, clip: int, latent_frame: int) -> str:
    """The prompt that holds at ``latent_frame`` of training clip ``clip`` (the new one from its switch on)."""
    return data["post"][clip] if latent_frame >= int(data["switch_at"][clip]) else data["pre"][clip]


def guided_forward(model, cond: torch.Tensor, empty: torch.Tensor, guidance: float, tpf: int, clean_f: int):
    """The velocity of the frames after ``clean_f`` under ``cond``, with classifier-free guidance at ``guidance``
    unless it is 1 (conditional and unconditional in one batch, as the stream batches them)."""
    guided = guidance != 1.0
    if guided:
        cond = torch.cat([cond, empty[None].expand_as(cond)])

    def forward(seq, t_F):
        t = t_F.repeat_interleave(tpf, dim=1)
        if guided:
            seq, t = torch.cat([seq, seq]), torch.cat([t, t])
        v = model(hidden_states=seq, timestep=t, encoder_hidden_states=cond, return_dict=False)[0][:, :, clean_f:]
        if not guided:
            return v
        v_c, v_u = v.chunk(2)
        return cfg_combine(v_u, v_c, guidance)

    return forward


@torch.no_grad()
def first_block_target(pipe, specs: list, clips: list[int], x: torch.Tensor, args, stats: dict):
    """The world's first block drawn where the model put its shape (DAgger's label for the stream's first block).

    ``x`` holds the model's own first blocks (normalised latents) for training
    clips ``clips``. Each is decoded, the prompted colour found in its first
    frame, and the clip's world (its shape, colour, direction, speed,
    background) re-rendered with the shape starting there and encoded: one
    clean shape of the prompt where the model began to draw one, moving the
    prompted way. Returns the target latents and a (B, 1) weight, 0 where the
    model drew no shape of the prompted colour (nothing to follow).
    """
    from dataclasses import replace

    from supergen.metrics import colour_centre

    mean, std = latent_stats(pipe.vae)
    height, width, _ = TOY_NATIVE_SIZE
    first = ((pipe.vae.decode(x * std + mean).sample[:, :, 0].clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    frames = pipe.vae.config.scale_factor_temporal * (args.block - 1) + 1
    videos, weight = [], []
    for k, clip in enumerate(clips):
        params = specs[clip][0]
        centre = colour_centre(first[k], params.colour)
        weight.append(float(centre is not None))
        if centre is not None:  # pixel-centre coordinates of the found centre, as the renderer places shapes
            params = replace(params, start_x=(centre[1] + 0.5) / width % 1.0, start_y=(centre[0] + 0.5) / height % 1.0)
        videos.append(render_stream_clip(params, height, width, frames, None))
    zs = (pipe.vae.encode(clips_to_video(np.stack(videos))).latent_dist.mode() - mean) / std
    stats["first_steps"] += 1
    stats["first_lost"] += 1 - float(np.mean(weight))
    return zs[:, :, : args.block], torch.tensor(weight)[:, None]


@torch.no_grad()
def first_block_dagger(model, pipe, specs: list, data: dict, text: dict, args, sigma_table: torch.Tensor,
                       tpf: int, gen: torch.Generator, stats: dict) -> dict:
    """One step of DAgger on the stream's first block, Self-Forcing style.

    From one noise per training clip the model samples the first block as the
    stream does (the few-step schedule at ``--dagger-guidance``, no context),
    :func:`first_block_target` labels it, and the model's own rollout from the
    same noise (at a random exit step, conditional only, as ``roll_out``)
    is trained on the velocity to that label. The bidirectional teacher of
    ``--first-blocks`` can only show its own first blocks; this one shows the
    world's. The caller has set the processors to the first block's view.
    """
    b, lh, lw = args.block, *data["latents"].shape[-2:]
    clips = draw_clips(data, len(specs), args.batch, gen).tolist()
    cond = torch.stack([text[data["pre"][c]] for c in clips])
    noise = torch.randn(args.batch, model.config.in_channels, b, lh, lw, generator=gen)
    sig = torch.cat([sigma_table, sigma_table.new_zeros(1)])
    empty_context = noise[:, :, :0]
    sample = euler_steps(guided_forward(model, cond, text[""], args.dagger_guidance, tpf, 0), empty_context, noise,
                         torch.zeros(args.batch, b), sig, len(sigma_table))
    x0, weight = first_block_target(pipe, specs, clips, sample, args, stats)
    exit_step = int(torch.randint(len(sigma_table), (1,), generator=gen))
    t_F = torch.zeros(args.batch, b)
    xt = euler_steps(guided_forward(model, cond, text[""], 1.0, tpf, 0), empty_context, noise, t_F, sig, exit_step)
    s = sig[exit_step]
    return {"x": xt, "t_F": torch.full((args.batch, b), float(s) * 1000), "target": (xt - x0) / s, "weight": weight,
            "cond": cond}


@torch.no_grad()
def own_context(model, procs, batch: dict, data: dict, text: dict, args, sigma_table: torch.Tensor,
                grid_hw: tuple[int, int], own_blocks: int, gen: torch.Generator, own_sink: bool = False) -> None:
    """Replace the last ``own_blocks`` context blocks of a one-block view by the model's own stream output.

    Block by block, as the stream makes them: from pure noise, the few-step
    schedule with the model itself (no gradient), attending to the clean
    context before the block and itself, under the prompt that holds there;
    the sample then stands in for the ground truth as the clean context of
    what follows (the ``rerun`` KV write sees it at timestep 0). With
    ``--dagger-guidance`` other than 1 the samples use classifier-free
    guidance at that scale, as a stream at that guidance makes them.
    ``own_sink`` also replaces the sink blocks first (the clip's first
    blocks, made from no context as the stream's first block is), so the
    trained block sees the kind of sink a stream keeps: its own first block.
    """
    b, view = args.block, batch["view"]
    tpf = grid_hw[0] * grid_hw[1]
    sig = torch.cat([sigma_table, sigma_table.new_zeros(1)])
    x = batch["x"]
    blocks = view["blocks"]
    sink_blocks = view["sink"] // b if own_sink else 0
    for k in [*range(sink_blocks), *range(blocks - 1 - own_blocks, blocks - 1)]:
        clean_f = set_view(model, procs, k + 1, 1, b, grid_hw)
        # Absolute latent frame where view block k starts: a sink block is the clip's k-th, a run block sits
        # before the trained one (which starts at batch["starts"]).
        first_abs = [k * b if k < view["sink"] // b else start - (blocks - 1 - k) * b for start in batch["starts"]]
        cond = torch.stack([text[prompt_at(data, c, f)] for c, f in zip(batch["clips"], first_abs)])
        forward = guided_forward(model, cond, text[""], args.dagger_guidance, tpf, clean_f)
        t_F = torch.zeros(x.shape[0], clean_f + b)
        xt = euler_steps(forward, x[:, :, :clean_f], torch.randn(x[:, :, :b].shape, generator=gen), t_F, sig,
                         len(sigma_table))
        x[:, :, k * b : (k + 1) * b] = xt


@torch.no_grad()
def oracle_block(pipe, specs: list, batch: dict, truth_x: torch.Tensor, data: dict, args, stats: dict) -> torch.Tensor:
    """The trained block as the toy world draws it after the model's own context (DAgger's expert label).

    The last context frame is decoded and its shape found (the centre of the
    colour that holds there, on the torus), as is the ground truth's
    (``truth_x``, the view before the model's own blocks replaced it); the clip is re-rendered
    with the shape moved by how far the model's shape sits from the ground
    truth's, same speed, direction, background and switch, and encoded. Its
    block is where the world goes from where the model left the shape: one
    clean shape that keeps moving the prompted way. Where the context has no
    shape of that colour the ground truth stays the target.
    """
    from dataclasses import replace

    from supergen.metrics import colour_centre, tracked_colour, wrapped_steps

    b, view = args.block, batch["view"]
    mean, std = latent_stats(pipe.vae)
    height, width, _ = TOY_NATIVE_SIZE
    end = view["blocks"] * b - b  # the trained block's first frame in the view
    if end == view["sink"]:
        return batch["x0"]  # no context right before the block (only the sink): nothing to follow but the truth
    # Two context blocks decoded alone are enough for the last frame (the VAE's causal reach is short); the
    # ground truth's same blocks decoded the same way, so what the decoder adds is in both.
    window = slice(max(view["sink"], end - 2 * b), end)
    z = torch.cat([batch["x"][:, :, window], truth_x[:, :, window]]) * std + mean
    last = ((pipe.vae.decode(z).sample[:, :, -1].clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    own, truth = last[: len(z) // 2], last[len(z) // 2 :]
    videos, shifts, lost = [], [], 0
    for k, (clip, start) in enumerate(zip(batch["clips"], batch["starts"])):
        params, switch, _ = specs[clip]
        prompt = prompt_at(data, clip, start - 1)  # what holds at the context's last frame
        own_centre = colour_centre(own[k], tracked_colour(own[k][None], prompt))
        true_centre = colour_centre(truth[k], tracked_colour(truth[k][None], prompt))
        dy, dx = 0.0, 0.0
        if own_centre is None or true_centre is None:
            lost += 1
        else:
            dy, dx = wrapped_steps(np.array([true_centre, own_centre]), height, width)[0]
        shifts.append((dy, dx))
        moved = replace(params, start_x=(params.start_x + dx / width) % 1.0, start_y=(params.start_y + dy / height) % 1.0)
        videos.append(render_stream_clip(moved, height, width, args.clip_frames, switch))
    zs = (pipe.vae.encode(clips_to_video(np.stack(videos))).latent_dist.mode() - mean) / std
    stats["each"] = shifts
    stats["steps"] += 1
    stats["lost"] += lost / len(videos)
    stats["shift"] += float(np.hypot(*np.asarray(shifts).T).mean())
    return torch.stack([zs[k, :, start : start + b] for k, start in enumerate(batch["starts"])])


def stage_lr(args, step: int) -> float:
    """The learning rate of ``step``: warm-up, then cosine to ``--steps``, both counted from ``--lr-restart``
    (a stage resumed from an earlier run's checkpoint runs its own schedule)."""
    return cosine_lr(args.lr, step - args.lr_restart, args.steps - args.lr_restart, warmup=args.warmup)


def train(pipe, args, work: Path, log: LossLog, data: dict) -> torch.nn.Module:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = pipe.transformer
    procs = []
    for blk in model.blocks:
        proc = _MaskedSelfAttn()
        blk.attn1.set_processor(proc)
        procs.append(proc)
    shift = pipe.scheduler.config.flow_shift
    sigma_table = few_step_sigmas(pipe, args.steps_schedule)
    pairs = build_first_blocks(args, work, sigma_table)
    text = encode_prompts(pipe, sorted(set(data["pre"]) | set(data["post"]) | set(pairs["prompts"] if pairs else ())))
    dagger_on = args.dagger_fraction > 0 or args.first_dagger_fraction > 0
    specs = clip_specs(args, pipe.vae.config.scale_factor_temporal) if dagger_on else None
    if specs is not None and [p.prompt for p, _, _ in specs] != list(data["pre"]):
        raise SystemExit(f"{work / 'latents.pt'} was not made by these data settings (--seed, --clips, --clip-frames, "
                         "--block, --switch-fraction): the dagger oracle cannot re-render its clips; use a new --work")
    dagger_stats = {"steps": 0, "lost": 0.0, "shift": 0.0, "first_steps": 0, "first_lost": 0.0}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
    ckpt = work / "causal.pt"
    start, elapsed = resume(ckpt, log, "causal", model=model, ema=ema, opt=opt)
    model.train()
    _, ph, pw = model.config.patch_size
    lh, lw = data["latents"].shape[-2:]
    grid_hw = (lh // ph, lw // pw)
    tpf = grid_hw[0] * grid_hw[1]
    t0 = time.perf_counter() - elapsed
    running = None
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(step_seed(args.seed, 11, step))
        first = pairs is not None and bool(torch.rand((), generator=gen) < args.first_block_fraction)
        first_dagger = (not first and args.first_dagger_fraction > 0
                        and bool(torch.rand((), generator=gen) < args.first_dagger_fraction))
        first = first or first_dagger
        dagger = not first and args.dagger_fraction > 0 and bool(torch.rand((), generator=gen) < args.dagger_fraction)
        rollout = dagger or (not first and args.rollout_fraction > 0
                             and bool(torch.rand((), generator=gen) < args.rollout_fraction))
        switch_view = (not first and args.switch_view_fraction > 0
                       and bool(torch.rand((), generator=gen) < args.switch_view_fraction))
        if first:
            # The stream's first block alone: no context, full attention inside the block, positions 0..b-1.
            clean_f = 0
            tables = rope_tables(model.rope, torch.arange(args.block), grid_hw)
            for proc in procs:
                proc.mask, proc.rope = None, tables
            if first_dagger:
                batch = first_block_dagger(model, pipe, specs, data, text, args, sigma_table, tpf, gen, dagger_stats)
            else:
                batch = first_block_batch(pairs, text, gen, args)
        else:
            batch = make_batch(data, text, gen, args, sigma_table, shift, rollout, drop=not dagger,
                               switch_view=switch_view)
            view = batch["view"]
            if dagger:
                # The model's own last context blocks (as many as the view has after its sink, at most
                # --dagger-blocks), then the world's continuation of them as the target.
                free = view["blocks"] - 1 - view["sink"] // args.block
                truth_x = batch["x"].clone()
                own = int(torch.randint(1, min(free, args.dagger_blocks) + 1, (1,), generator=gen)) if free > 0 else 0
                if own or (args.dagger_sink and view["sink"]):
                    own_context(model, procs, batch, data, text, args, sigma_table, grid_hw, own, gen,
                                own_sink=args.dagger_sink)
                batch["x0"] = oracle_block(pipe, specs, batch, truth_x, data, args, dagger_stats)
            clean_f = set_view(model, procs, view["blocks"], view["noisy"], args.block, grid_hw)

        def forward(x, t_F):
            return model(hidden_states=x, timestep=t_F.repeat_interleave(tpf, dim=1),
                         encoder_hidden_states=batch["cond"], return_dict=False)[0][:, :, clean_f:]

        if rollout:
            roll_out(forward, batch, sigma_table, int(torch.randint(len(sigma_table), (1,), generator=gen)))
        pred = forward(batch["x"], batch["t_F"])
        per_frame = ((pred - batch["target"]) ** 2).mean(dim=(1, 3, 4))  # (B, nb*block)
        w = batch["weight"].repeat_interleave(args.block, dim=1)
        loss = (per_frame * w).sum() / w.sum().clamp_min(1.0)
        lr = stage_lr(args, step)
        optimizer_step(model, opt, loss, lr, ema=ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0:
            now = time.perf_counter() - t0
            log.add("causal", step + 1, loss.item(), now)
            logger.info("step %d/%d loss %.4f (running %.4f) lr %.2e %.0f s", step + 1, args.steps, loss.item(),
                        running, lr, now)
            if dagger_stats["steps"]:
                n = dagger_stats["steps"]
                logger.info("dagger views: the model's shape %.2f px from the world's, lost in %.0f%% (%d views)",
                            dagger_stats["shift"] / n, 100 * dagger_stats["lost"] / n, n)
                dagger_stats.update(steps=0, lost=0.0, shift=0.0)
            if dagger_stats["first_steps"]:
                logger.info("first-block dagger: no shape of the prompted colour in %.0f%% of first frames (%d steps)",
                            100 * dagger_stats["first_lost"] / dagger_stats["first_steps"], dagger_stats["first_steps"])
                dagger_stats.update(first_steps=0, first_lost=0.0)
        stop = budget_spent(args)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stop:
            save_checkpoint(ckpt, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            step=step + 1, elapsed=time.perf_counter() - t0)
            if args.export_every and (step + 1) % args.export_every == 0:
                export(pipe, ema, args.output, args.guidance)
        if stop and step + 1 < args.steps:
            stop_run(step + 1)
    for blk in model.blocks:
        blk.attn1.set_processor(WanAttnProcessor())
    return ema


def export(pipe, ema, output: Path, guidance: float) -> None:
    """Write the pipeline with the EMA transformer, its native size and stream settings, atomically.

    The training's masked processors are swapped out for Diffusers' own while it is saved.
    """
    processors = [blk.attn1.processor for blk in pipe.transformer.blocks]
    for blk in pipe.transformer.blocks:
        blk.attn1.set_processor(WanAttnProcessor())
    try:
        export_pipeline(pipe, ema, output, guidance, hints={"stream": dict(STREAM_DEFAULTS)})
    finally:
        for blk, proc in zip(pipe.transformer.blocks, processors):
            blk.attn1.set_processor(proc)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoints, loss.csv, latents cache")
    parser.add_argument("--base", default="toy", help="model to fine-tune (a shipped name or a folder)")
    parser.add_argument("--output", type=Path, default=REPO / "supergen" / "assets" / "toy-causal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a CPU shared with other jobs)")
    parser.add_argument("--clips", type=int, default=1024, help="long clips in the fixed training set")
    parser.add_argument("--clip-frames", type=int, default=61, help="video frames per clip (31 latent frames)")
    parser.add_argument("--block", type=int, default=3, help="latent frames per block")
    parser.add_argument("--switch-fraction", type=fraction, default=0.3, help="clips with a prompt switch")
    parser.add_argument("--max-context-blocks", type=int, default=4, help="most clean blocks before the last")
    parser.add_argument("--max-sink-blocks", type=int, default=2)
    parser.add_argument("--start-fraction", type=fraction, default=0.25, help="views that start at the clip's start")
    parser.add_argument("--noisy-blocks", type=int, default=2, help="last blocks trained per view")
    parser.add_argument("--start-blocks", type=int, default=2,
                        help="views from the clip's start have this many blocks, all trained (0: like other views)")
    parser.add_argument("--steps-schedule", type=int, default=4, help="few-step schedule whose levels are trained")
    parser.add_argument("--schedule-fraction", type=fraction, default=0.5, help="noise levels drawn from that schedule")
    parser.add_argument("--rollout-fraction", type=fraction, default=0.0,
                        help="steps trained on the few-step sampler's own state (Self-Forcing rollout, one block)")
    parser.add_argument("--first-blocks", type=non_negative_int, default=0,
                        help="teacher trajectories for the first block (CausVid's ODE initialisation; 0: none)")
    parser.add_argument("--first-block-fraction", type=fraction, default=0.25,
                        help="steps that regress the first block onto the teacher (with --first-blocks)")
    parser.add_argument("--teacher", default="toy", help="bidirectional model whose trajectories the first block learns")
    parser.add_argument("--teacher-steps", type=non_negative_int, default=20)
    parser.add_argument("--teacher-guidance", type=float, default=3.0)
    parser.add_argument("--dagger-fraction", type=fraction, default=0.0,
                        help="views whose last context blocks the model samples itself, the target re-rendered by "
                             "the toy world from where that context left the shape (DAgger)")
    parser.add_argument("--dagger-blocks", type=positive_int, default=2,
                        help="most context blocks the model samples itself in a dagger view")
    parser.add_argument("--dagger-guidance", type=non_negative_float, default=1.0,
                        help="CFG scale the dagger views sample their own context with (the stream's guidance)")
    parser.add_argument("--first-dagger-fraction", type=fraction, default=0.0,
                        help="steps of DAgger on the first block: its own sample, the world's block where it drew "
                             "the shape as the target (needs no --first-blocks)")
    parser.add_argument("--dagger-sink", action="store_true",
                        help="in dagger views, the sink is the model's own first block too (as in a stream)")
    parser.add_argument("--switch-view-fraction", type=fraction, default=0.0,
                        help="views whose last block is the first or second after a prompt switch")
    parser.add_argument("--prompt-weights", type=Path,
                        help="JSON {prompt: weight}: draw training clips by the weight of their prompt (more views "
                             "of the prompts the model fails; bench_stream_quality.py --vocab-weights writes one)")
    parser.add_argument("--context-noise", type=float, default=0.05, help="most noise std on the clean context")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr-restart", type=non_negative_int, default=0, metavar="STEP",
                        help="restart the learning-rate schedule (warm-up, then cosine to --steps) at this step: a "
                             "stage resumed from an earlier run's checkpoint trains at --lr, not at the tail of the "
                             "earlier run's cosine")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of empty prompts")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale written to supergen.json")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--export-every", type=int, default=500, help="also export the EMA pipeline this often (0: only at the end)")
    parser.add_argument("--max-steps", type=int, help="stop (checkpointed) after this many optimizer steps in this invocation")
    args = parser.parse_args(argv)
    if args.dagger_sink and not args.dagger_fraction > 0:
        parser.error("--dagger-sink acts in dagger views only; give --dagger-fraction > 0 too")
    if args.switch_view_fraction > 0 and not args.switch_fraction > 0:
        parser.error("--switch-view-fraction needs clips with a prompt switch; give --switch-fraction > 0")
    if args.lr_restart >= args.steps:
        parser.error(f"--lr-restart {args.lr_restart} must be below --steps {args.steps}")
    prompt_weights = read_prompt_weights(args.prompt_weights) if args.prompt_weights else None
    log = start_run(args)
    torch.manual_seed(args.seed)
    pipe = load_diffusers_pipeline(args.base)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    data = build_dataset(pipe, args, args.work)
    if prompt_weights is not None:
        data["clip_weights"] = torch.tensor([prompt_weights[p] for p in data["pre"]], dtype=torch.float64)
        if not data["clip_weights"].sum() > 0:
            raise SystemExit(f"--prompt-weights {args.prompt_weights}: every prompt of this dataset weighs 0")
        share = data["clip_weights"] / data["clip_weights"].sum()
        logger.info("prompt weights: clips drawn by their prompt's weight, the heaviest 10%% of clips get %.0f%% "
                    "of the draws", 100 * share.sort(descending=True).values[: max(1, len(share) // 10)].sum())
    logger.info("dataset: %d clips of %d latent frames, %d with a prompt switch", len(data["pre"]),
                data["latents"].shape[2], int((data["switch_at"] < data["latents"].shape[2]).sum()))
    ema = train(pipe, args, args.work, log, data)
    export(pipe, ema, args.output, args.guidance)


if __name__ == "__main__":
    main()
