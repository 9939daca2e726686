"""What a long stream shows: adherence, motion continuity, drift and flicker over 120+ blocks, and prompt switches.

For each stream setting (``StreamConfig``: sink, window, schedule, KV write)
it streams ``--blocks`` blocks of a few toy-world prompts and measures, with
the detectors of :mod:`supergen.metrics` (no learned parts):

- per block: colour / shape / direction adherence (on the block rolled so its
  wrapped shape sits mid-frame), and the objects per frame (``wrap=True``);
- motion continuity: the shape's centre step across each block boundary
  (last frame of a block to the first of the next) must go the prompted way
  by at least 0.5 px (world shapes move 1.4..1.9 px a frame) and be no longer
  than 3x the median step inside blocks (+1 px); the toy
  model trained on 9-frame clips jumps back at every boundary;
- drift, LV-Bench-style: the stream cut into chunks of ``--chunk`` blocks,
  each chunk's mean adherence, shape area and frame brightness compared with
  the first chunk's, ``mean_i |m_i - m_0| / m_0``;
- flicker: mean absolute frame difference, and its ratio across boundaries
  to inside blocks (1 = a boundary is as smooth as any frame step).

``--switch-trials N`` measures prompt switches with each ``on_prompt_change``
mode: after ``--switch-after`` blocks the prompt changes colour and direction;
the result is the number of blocks until the new colour and direction hold
(and keep holding for 3 blocks). ``--long N`` streams N blocks of the default
setting and reports latency and KV-cache bytes (flat or not).
``--teacher-forced N`` samples one block after a ground-truth context of N
world clips (the continuation alone), ``--teacher-forced-switch N`` the same
with the clip's direction changed at that block under the new prompt (does
the text turn the shape, or does the context's motion carry on?), and
``--per-prompt`` prints each setting's scores per prompt as well. ``--vocab N`` streams every
world prompt for N blocks and scores each colour, shape, direction and
background; ``--vocab-weights FILE`` turns those scores into
``train_toy_causal.py --prompt-weights`` (more views of what fails;
``--vocab-factors`` says which scores' shortfall counts).

    OMP_NUM_THREADS=1 python scripts/bench_stream_quality.py --model toy-causal --blocks 120 --json runs/bsq.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.train_toy_model import non_negative_int  # noqa: E402
from supergen import StreamConfig, SuperGenPipeline  # noqa: E402
from supergen.config import PROMPT_CHANGE_MODES  # noqa: E402
from supergen.io import atomic_path  # noqa: E402
from supergen.metrics import (  # noqa: E402
    adherence,
    centred_on_shape,
    colour_centre,
    object_counts,
    shape_track,
    temporal_flicker,
    tracked_colour,
    wrapped_steps,
)
from supergen.toyworld import COLOURS, DIRECTIONS, all_prompts, parse_prompt  # noqa: E402

PROMPTS = (
    "a red circle moving left over a blue sky",
    "a yellow square moving down over a green field",
    "a white triangle moving right over a dark night",
    "a purple circle moving up over a green field",
)
MIN_BOUNDARY_STEP_PX = 0.5
_UNIT = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)


def stream_blocks(pipe, prompt, config, blocks, seed=0, switches=None, guidance=None):
    """Frames of each block (uint8), the prompt each block was made under, and per-block metrics."""
    switches = switches or {}
    frames, prompts = [], []
    with pipe.stream(prompt, num_blocks=blocks, stream=config, seed=seed, guidance_scale=guidance) as stream:
        for block in stream:
            frames.append(block.frames)
            prompts.append(block.metrics["prompt"])
            if block.index + 1 in switches:
                stream.set_prompt(switches[block.index + 1])
        rows = stream.blocks
    return frames, prompts, rows


def analyse(frames, prompts, chunk=10):
    """Per-block rows and stream-level scores (see the module docstring)."""
    height, width = frames[0].shape[1:3]
    per_block, all_counts = [], []
    tracks = []
    for f, p in zip(frames, prompts):
        a = adherence(centred_on_shape(f, p), p)
        colour = tracked_colour(f, p)
        per_block.append({"score": a.score, "colour": a.colour_ok, "shape": a.shape_ok, "direction": a.direction_ok,
                          "area": float(np.linalg.norm(f.astype(float) - np.asarray(COLOURS[colour]), axis=-1).__lt__(70).mean()),
                          "brightness": float(f.mean() / 255)})
        all_counts.append(object_counts(f, wrap=True))
        tracks.append(shape_track(f, colour))
    # Motion continuity across boundaries, judged against the steps inside blocks.
    within, boundary = [], []
    for k, (tr, p) in enumerate(zip(tracks, prompts)):
        unit = np.array(_UNIT[parse_prompt(p).direction])
        steps = wrapped_steps(tr, height, width)
        within += [float(s @ unit) for s in steps if not np.isnan(s).any()]
        if k + 1 < len(tracks):
            nxt_unit = np.array(_UNIT[parse_prompt(prompts[k + 1]).direction])
            step = wrapped_steps(np.stack([tr[-1], tracks[k + 1][0]]), height, width)[0]
            boundary.append(float(step @ nxt_unit) if not np.isnan(step).any() else float("nan"))
    med = float(np.median(within)) if within else 0.0
    # Forward by at least MIN_BOUNDARY_STEP_PX (world shapes move 1.4..1.9 px a frame), and no jump.
    limit = 3 * max(med, MIN_BOUNDARY_STEP_PX) + 1.0
    ok = [(not np.isnan(b)) and MIN_BOUNDARY_STEP_PX <= b <= limit for b in boundary]
    counts = np.concatenate(all_counts)
    # Flicker inside blocks vs across boundaries.
    inside = [np.abs(np.diff(f.astype(float), axis=0)).mean() for f in frames if len(f) > 1]
    across = [np.abs(frames[k + 1][0].astype(float) - frames[k][-1].astype(float)).mean() for k in range(len(frames) - 1)]
    chunks = [per_block[i : i + chunk] for i in range(0, len(per_block) - chunk + 1, chunk)]

    def drift(key):
        m = [np.mean([r[key] for r in c]) for c in chunks]
        if len(m) < 2:
            return 0.0
        # Relative to the first chunk; undefined (nan, left out of the means) where that chunk scores 0.
        return float(np.mean([abs(v - m[0]) / m[0] for v in m[1:]])) if m[0] > 1e-6 else float("nan")

    scores = [r["score"] for r in per_block]
    return {
        "per_block": per_block,
        "adherence_first": scores[0],
        "adherence_block100": scores[99] if len(scores) >= 100 else float("nan"),
        "adherence_first10": float(np.mean(scores[:10])),
        "adherence_last10": float(np.mean(scores[-10:])),
        "adherence_mean": float(np.mean(scores)),
        "colour": float(np.mean([r["colour"] for r in per_block])),
        "shape": float(np.mean([r["shape"] for r in per_block])),
        "direction": float(np.mean([r["direction"] for r in per_block])),
        "continuity": float(np.mean(ok)) if ok else float("nan"),
        "step_within_px": med,
        "step_boundary_px": float(np.nanmedian(boundary)) if boundary else float("nan"),
        "one_object": float(np.mean(counts == 1)),
        "drift_adherence": drift("score"),
        "drift_area": drift("area"),
        "drift_brightness": drift("brightness"),
        "flicker": temporal_flicker(np.concatenate(frames)),
        "flicker_boundary_ratio": float(np.mean(across) / max(np.mean(inside), 1e-9)),
    }


SUMMARY_KEYS = ("adherence_first", "adherence_block100", "adherence_first10", "adherence_last10", "colour", "shape",
                "direction", "continuity", "step_within_px", "step_boundary_px", "one_object", "drift_adherence",
                "drift_area", "drift_brightness", "flicker", "flicker_boundary_ratio", "ms_per_block")


def bench_setting(pipe, config, prompts, blocks, seeds, chunk, guidance=None):
    """Scores averaged over every prompt and seed, and per prompt (over seeds) under ``per_prompt``."""
    results = {prompt: [] for prompt in prompts}
    for prompt in prompts:
        for seed in seeds:
            t0 = time.perf_counter()
            frames, block_prompts, _ = stream_blocks(pipe, prompt, config, blocks, seed=seed, guidance=guidance)
            ms = 1000 * (time.perf_counter() - t0) / blocks
            r = analyse(frames, block_prompts, chunk)
            r["ms_per_block"] = ms
            results[prompt].append(r)

    def mean(rows):
        return {k: float(np.nanmean([r[k] for r in rows])) for k in SUMMARY_KEYS}

    return {**mean([r for rows in results.values() for r in rows]),
            "per_prompt": {prompt: mean(rows) for prompt, rows in results.items()}}


def switch_prompt(prompt: str, rng: np.random.Generator) -> str:
    facts = parse_prompt(prompt)
    colour = [c for c in COLOURS if c != facts.colour][rng.integers(len(COLOURS) - 1)]
    direction = [d for d in DIRECTIONS if d != facts.direction][rng.integers(len(DIRECTIONS) - 1)]
    return f"a {colour} {facts.shape} moving {direction} over a {facts.background}"


@torch.no_grad()
def world_reference(model, prompts, blocks, seeds, block, chunk=10, vae=True):
    """What a perfect model would score: the world's own stream clips, cut into the stream's blocks.

    For each prompt and seed a world clip of that prompt (``sample_stream_params``
    for the rest, seeded) as long as ``blocks`` stream blocks, optionally sent
    through the model's VAE and back (encode, decode), scored by
    :func:`analyse` exactly as streams are. With ``vae`` this is the ceiling
    the VAE leaves the transformer; without, it checks the detectors (1.00).
    """
    from scripts.train_toy_model import clips_to_video
    from supergen.models import load_diffusers_pipeline, read_native_size, resolve_model
    from supergen.toyworld import render_stream_clip, sample_stream_params

    pipe = load_diffusers_pipeline(model)
    height, width, _ = read_native_size(resolve_model(model))
    t_scale = pipe.vae.config.scale_factor_temporal
    sizes = [1 + (block - 1) * t_scale] + [block * t_scale] * (blocks - 1)
    rows = []
    for prompt in prompts:
        facts = parse_prompt(prompt)
        for seed in seeds:
            params = dataclasses.replace(sample_stream_params(np.random.default_rng(seed)), colour=facts.colour,
                                         shape=facts.shape, direction=facts.direction, background=facts.background)
            # A few frames more: the VAE encodes whole temporal chunks and drops a remainder.
            video = render_stream_clip(params, height, width, sum(sizes) + 4 * t_scale)
            if vae:
                z = pipe.vae.encode(clips_to_video(video[None])).latent_dist.mode()
                x = pipe.vae.decode(z).sample[0]
                video = ((x.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            video = video[: sum(sizes)]
            cuts = np.cumsum(sizes)[:-1]
            frames = np.split(video, cuts)
            rows.append(analyse(frames, [prompt] * blocks, chunk))
    return {k: float(np.nanmean([r[k] for r in rows])) for k in SUMMARY_KEYS if k != "ms_per_block"}


def bench_switches(pipe, base, trials, after, hold=3, horizon=8, seed=0, guidance=None, modes=PROMPT_CHANGE_MODES):
    """Per mode: blocks until the new colour and direction hold (for ``hold`` blocks), over ``trials`` switches."""
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(trials):
        prompt = PROMPTS[i % len(PROMPTS)]
        plan.append((prompt, switch_prompt(prompt, rng), i))
    out = {}
    for mode in modes:
        config = dataclasses.replace(base, on_prompt_change=mode)
        latencies, colour_latencies, adherences, jumps = [], [], [], []

        def first_hold(flags):
            return next((k for k in range(len(flags) - hold + 1) if all(flags[k : k + hold])), None)

        for prompt, new, s in plan:
            frames, prompts, _ = stream_blocks(pipe, prompt, config, after + horizon, seed=s, switches={after: new},
                                               guidance=guidance)
            checks = [adherence(centred_on_shape(f, new), new) for f in frames[after:]]
            adherences.append(np.mean([a.score for a in checks]))
            # How far the shape moves across the switch's boundary (the world's carries on 1.4..1.9 px).
            height, width = frames[after].shape[1:3]
            ends = [colour_centre(frames[after - 1][-1], tracked_colour(frames[after - 1], prompt)),
                    colour_centre(frames[after][0], tracked_colour(frames[after], new))]
            step = wrapped_steps(np.array(ends), height, width)[0] if None not in ends else (np.nan, np.nan)
            jumps.append(float(np.hypot(*step)))
            latencies.append(first_hold([a.colour_ok and a.direction_ok for a in checks]))
            colour_latencies.append(first_hold([a.colour_ok for a in checks]))
        ok = [k is not None and k <= 1 for k in latencies]
        finite = [k for k in latencies if k is not None]
        out[mode] = {"within_2_blocks": float(np.mean(ok)), "never": int(sum(k is None for k in latencies)),
                     "median_blocks": float(np.median(finite)) + 1 if finite else float("nan"),
                     "colour_within_2_blocks": float(np.mean([k is not None and k <= 1 for k in colour_latencies])),
                     "adherence_after": float(np.mean(adherences)), "latencies": latencies,
                     "switch_jump_px": float(np.nanmedian(jumps)) if not np.isnan(jumps).all() else float("nan"),
                     "colour_latencies": colour_latencies}
    return out


def bench_long(pipe, config, blocks):
    """Per-block latency and KV bytes over a long stream, and the process's peak RSS growth."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pipe.stream(PROMPTS[0], num_blocks=blocks, stream=config, seed=0) as stream:
        rows = [b.metrics for b in stream]
    lat = np.array([r["latency_s"] for r in rows]) * 1000
    kv = [r["kv_cache_bytes"] for r in rows]
    tenth = max(1, blocks // 10)
    return {"blocks": blocks, "first_tenth_ms": float(np.median(lat[10 : 10 + tenth])),
            "last_tenth_ms": float(np.median(lat[-tenth:])), "kv_bytes_after_fill": sorted(set(kv[10:])),
            "rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0}


@torch.no_grad()
def teacher_forced(model: str, clips: int, block: int = 3, context_blocks: int = 2, steps: int = 4, seed: int = 0,
                   guidance: float = 1.0, switch: bool = False) -> dict:
    """The model's continuation on its own: a ground-truth context, one block sampled after it.

    A stream's motion needs two things, a first block that moves and a
    continuation that carries the context's motion on; this measures the
    second alone. Each world clip (``sample_stream_params``) gives
    ``context_blocks`` clean latent blocks, the next block is sampled from pure
    noise in ``steps`` steps of the stream's schedule with the block-causal
    attention the stream uses (``scripts/train_toy_causal.py``'s mask and RoPE
    packing), and the decoded block is tracked: the shape's step per frame
    along the prompt (the world's is 1.4..1.9 px). It also reports the
    x0 error at sigma 1 with each clip's own context and with another clip's,
    so the gap says how much the model reads its context.

    ``guidance`` other than 1 samples with classifier-free guidance. With
    ``switch`` each clip's direction changes (a prompt switch, the colour
    kept) at the block that is sampled, under the new prompt: the step is
    then measured along the new direction, and along the old one too
    (``old_px_per_frame``), which says whether the text turns the shape or
    the context's motion carries on.
    """
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from scripts.train_toy_causal import _MaskedSelfAttn, few_step_sigmas, rope_tables, teacher_forcing_mask
    from scripts.train_toy_model import clips_to_video, encode_prompts, latent_stats
    from supergen.models import load_diffusers_pipeline, read_native_size, resolve_model
    from supergen.backbones.base import cfg_combine
    from supergen.toyworld import PromptSwitch, render_stream_clip, sample_stream_params, switched_prompt

    pipe = load_diffusers_pipeline(model)
    height, width, _ = read_native_size(resolve_model(model))
    net = pipe.transformer.eval()
    procs = []
    for blk in net.blocks:
        procs.append(_MaskedSelfAttn())
        blk.attn1.set_processor(procs[-1])
    b = block
    mean, std = latent_stats(pipe.vae)
    rng = np.random.default_rng(seed)
    params = [sample_stream_params(rng) for _ in range(clips)]
    t_scale = pipe.vae.config.scale_factor_temporal
    switches = [None] * clips
    if switch:  # at the sampled block's first video frame (latent frame context_blocks * b)
        frame = t_scale * (context_blocks * b - 1) + 1
        switches = [PromptSwitch(frame=frame, colour=p.colour,
                                 direction=[d for d in _UNIT if d != p.direction][rng.integers(len(_UNIT) - 1)])
                    for p in params]
    videos = np.stack([render_stream_clip(p, height, width, t_scale * b * (context_blocks + 1) - 1, sw)
                       for p, sw in zip(params, switches)])
    z = (pipe.vae.encode(clips_to_video(videos)).latent_dist.mode() - mean) / std
    prompts = [switched_prompt(p, sw) if sw else p.prompt for p, sw in zip(params, switches)]
    text = encode_prompts(pipe, sorted(set(prompts)))
    cond = torch.stack([text[q] for q in prompts])
    gh, gw = z.shape[-2] // net.config.patch_size[1], z.shape[-1] // net.config.patch_size[2]
    tpf, n_ctx = gh * gw, context_blocks * b
    mask = teacher_forcing_mask(context_blocks + 1, 1, b).repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
    positions = torch.cat([torch.arange(n_ctx + b), torch.arange(n_ctx, n_ctx + b)])
    for proc in procs:
        proc.mask, proc.rope = mask[None, None], rope_tables(net.rope, positions, (gh, gw))

    def velocity(context, x, sigma):
        t_F = torch.cat([torch.zeros(clips, n_ctx + b), torch.full((clips, b), float(sigma) * 1000)], dim=1)
        seq, t = torch.cat([context, x], dim=2), t_F.repeat_interleave(tpf, 1)
        v = net(hidden_states=seq, timestep=t, encoder_hidden_states=cond, return_dict=False)[0][:, :, -b:]
        if guidance == 1.0:
            return v
        empty = text[""][None].expand_as(cond)
        return cfg_combine(net(hidden_states=seq, timestep=t, encoder_hidden_states=empty, return_dict=False)[0][:, :, -b:],
                           v, guidance)

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z[:, :, :b].shape, generator=gen)
    x0 = z[:, :, n_ctx:]
    errors = {name: float(((noise - velocity(ctx, noise, 1.0) - x0) ** 2).mean())
              for name, ctx in (("own", z), ("other", z.roll(1, 0)))}
    sig = torch.cat([few_step_sigmas(pipe, steps), torch.zeros(1)])
    x = noise
    for i in range(steps):
        x = x + (sig[i + 1] - sig[i]) * velocity(z, x, sig[i])
    video = pipe.vae.decode(torch.cat([z[:, :, :n_ctx], x], dim=2) * std + mean).sample
    frames = ((video.permute(0, 2, 3, 4, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    first = t_scale * (n_ctx - 1)  # the last context frame; the generated block follows it
    moved, truth, old = [], [], []
    for p, sw, f, v in zip(params, switches, frames, videos):
        unit = np.array(_UNIT[sw.direction if sw else p.direction])
        for clip, out, u in ((f, moved, unit), (v, truth, unit), (f, old, np.array(_UNIT[p.direction]))):
            steps_px = wrapped_steps(shape_track(clip[first:], p.colour), height, width)
            along = [float(s @ u) for s in steps_px if not np.isnan(s).any()]
            out.append(float(np.mean(along)) if along else float("nan"))
    for blk in net.blocks:
        blk.attn1.set_processor(WanAttnProcessor())
    return {"clips": clips, "guidance": guidance, "switch": switch, "px_per_frame": float(np.nanmean(moved)),
            "truth_px_per_frame": float(np.nanmean(truth)), "old_px_per_frame": float(np.nanmean(old)),
            "moving_share": float(np.mean([m >= MIN_BOUNDARY_STEP_PX for m in moved])),
            "x0_mse_own_context": errors["own"], "x0_mse_other_context": errors["other"]}


VOCAB_KEYS = ("colour", "direction", "one_object", "continuity")
#: Floor of a prompt's training weight from --vocab-weights (every prompt keeps some views).
VOCAB_WEIGHT_FLOOR = 0.25
#: The scores whose shortfall --vocab-weights weighs by default.
VOCAB_WEIGHT_FACTORS = ("colour", "direction", "one_object")


def vocab_weights(rows: dict, power: float = 1.0, factors=VOCAB_WEIGHT_FACTORS) -> dict:
    """``--prompt-weights`` from per-prompt vocabulary scores: the floor plus the prompt's shortfall,
    ``1 - mean(factors)``, raised to ``power`` and never under the floor."""
    return {p: max((VOCAB_WEIGHT_FLOOR + 1.0 - float(np.nanmean([r[f] for f in factors]))) ** power,
                   VOCAB_WEIGHT_FLOOR) for p, r in rows.items()}


def bench_vocab(pipe, config, blocks, guidance=None, prompts=None, power=1.0, factors=VOCAB_WEIGHT_FACTORS):
    """Every world prompt streamed for ``blocks`` blocks (seed = its index): scores per prompt and per factor.

    Short streams over the whole vocabulary say where the model fails (which
    colour, shape, direction or background), which the few long streams of
    the main table cannot. ``weights`` is a ``--prompt-weights`` file for
    ``scripts/train_toy_causal.py``: the floor plus the prompt's shortfall,
    ``1 - mean(factors)`` (default colour, direction, one object), raised to
    ``power`` (> 1 leans harder on the failing prompts) and never under the floor, so failing
    prompts get more views. ``prompts`` limits it to those (default: every prompt of the world).
    """
    rows = {}
    for i, prompt in enumerate(prompts or all_prompts()):
        frames, block_prompts, _ = stream_blocks(pipe, prompt, config, blocks, seed=i, guidance=guidance)
        r = analyse(frames, block_prompts)
        rows[prompt] = {k: r[k] for k in VOCAB_KEYS}
    by_factor = {}
    for name in ("colour", "shape", "direction", "background"):
        for prompt, r in rows.items():
            value = getattr(parse_prompt(prompt), name)
            by_factor.setdefault(f"{name} {value}", []).append(r)
    table = {k: {m: float(np.nanmean([r[m] for r in v])) for m in VOCAB_KEYS} for k, v in by_factor.items()}
    table["all"] = {m: float(np.nanmean([r[m] for r in rows.values()])) for m in VOCAB_KEYS}
    weights = vocab_weights(rows, power, factors)
    return {"blocks": blocks, "per_prompt": rows, "per_factor": table, "weights": weights}


def write_json_atomically(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


CONTEXT_NOISES = (0.0, 0.05, 0.15)


def sweep(default: StreamConfig):
    b = default.block_frames
    half = max(b, round(default.window / 2 / b) * b)
    settings = [("default", default),
                ("sink 0", dataclasses.replace(default, sink=0)),
                ("sink 1 block", dataclasses.replace(default, sink=b)),
                (f"deep sink {half}", dataclasses.replace(default, sink=half)),
                ("window 2 blocks", dataclasses.replace(default, window=2 * b, sink=min(default.sink, 2 * b))),
                ("window 4 blocks", dataclasses.replace(default, window=4 * b)),
                ("rolling schedule", dataclasses.replace(default, schedule="rolling")),
                ("kv write last_step", dataclasses.replace(default, kv_write="last_step", context_noise=0.0))]
    if default.kv_write == "rerun":  # none, a third of what stages 4-6 trained with, all of it (0.15)
        settings += [(f"context noise {c:g}", dataclasses.replace(default, context_noise=c)) for c in CONTEXT_NOISES]
    seen, out = set(), []
    for name, cfg in settings:
        key = dataclasses.astuple(cfg)
        if key not in seen:
            seen.add(key)
            out.append((name, cfg))
    return out


def stream_overrides(items) -> dict:
    """``FIELD=VALUE`` strings as StreamConfig overrides, each value parsed as its field's type and checked."""
    fields = {f.name: f for f in dataclasses.fields(StreamConfig)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"{item!r} is not FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = type(fields[name].default)
        try:
            out[name] = kind(text)
        except ValueError:
            noun = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ValueError(f"{item!r}: {name} takes {noun}") from None
    StreamConfig(**out)  # each value's own check, before any model loads
    return out


def describe(cfg: StreamConfig) -> str:
    noise = f" + context noise {cfg.context_noise:g}" if cfg.context_noise else ""
    return f"sink {cfg.sink}, window {cfg.window}, {cfg.schedule}, {cfg.kv_write}, {cfg.steps} steps{noise}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-causal")
    parser.add_argument("--blocks", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=10, help="blocks per drift chunk")
    parser.add_argument("--settings", default="all", help="'all' (the sweep), 'default', or comma-separated names")
    parser.add_argument("--switch-trials", type=int, default=0)
    parser.add_argument("--switch-after", type=int, default=12)
    parser.add_argument("--switch-modes", default=",".join(PROMPT_CHANGE_MODES),
                        help="comma-separated on_prompt_change modes the switch trials compare")
    parser.add_argument("--long", type=int, default=0, help="also stream this many blocks for latency/memory")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--teacher-forced", type=non_negative_int, default=0,
                        help="also sample one block after a ground-truth context for this many world clips")
    parser.add_argument("--teacher-forced-switch", type=non_negative_int, default=0,
                        help="also sample one block after a ground-truth context whose direction then changes "
                             "(under the new prompt, at the stream's guidance), for this many world clips")
    parser.add_argument("--per-prompt", action="store_true", help="also print each setting's scores per prompt")
    parser.add_argument("--reference", action="store_true",
                        help="also score the world's own clips through the model's VAE (the ceiling) and without")
    parser.add_argument("--vocab", type=non_negative_int, default=0,
                        help="also stream every world prompt for this many blocks and score each factor")
    parser.add_argument("--vocab-weights", default=None,
                        help="with --vocab: write train_toy_causal.py --prompt-weights from those scores here")
    parser.add_argument("--vocab-power", type=float, default=1.0,
                        help="those weights raised to this power (2: lean harder on the failing prompts)")
    parser.add_argument("--vocab-factors", default=",".join(VOCAB_WEIGHT_FACTORS),
                        help=f"the scores whose mean shortfall --vocab-weights weighs, comma-separated, of {', '.join(VOCAB_KEYS)}")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a StreamConfig field of the default setting (e.g. context_noise=0.05, "
                             "steps=6; repeatable); the sweep, switch, vocabulary and long runs start from it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not args.vocab_power > 0:
        parser.error(f"--vocab-power {args.vocab_power} must be > 0")
    factors = tuple(f for f in args.vocab_factors.split(",") if f)
    bad = [f for f in factors if f not in VOCAB_KEYS]
    if bad or not factors:
        parser.error(f"--vocab-factors {args.vocab_factors!r}: give one or more of {', '.join(VOCAB_KEYS)}, comma-separated")
    if factors == ("continuity",) and args.vocab == 1:
        parser.error("--vocab-factors continuity needs block boundaries; give --vocab 2 or more")
    switch_modes = tuple(m for m in args.switch_modes.split(",") if m)
    unknown = sorted(set(switch_modes) - set(PROMPT_CHANGE_MODES))
    if unknown or not switch_modes:
        parser.error(f"--switch-modes {args.switch_modes!r}: give one or more of {', '.join(PROMPT_CHANGE_MODES)}")
    try:
        overrides = stream_overrides(args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    if args.vocab_weights and not args.vocab:
        parser.error("--vocab-weights comes from the --vocab scores; give --vocab N (blocks per prompt) too")
    torch.set_num_threads(args.threads)
    pipe = SuperGenPipeline.from_pretrained(args.model, device="cpu")
    base = pipe.default_stream_config
    try:
        base = dataclasses.replace(base, **overrides)
    except ValueError as err:
        parser.error(f"--set: {err}")
    report = {"model": args.model, "blocks": args.blocks, "guidance": args.guidance, "default": dataclasses.asdict(base), "settings": {}}
    print(f"model {args.model}, {args.blocks} blocks x {args.prompts} prompts x {args.seeds} seeds; default: {describe(base)}")
    chosen = sweep(base)
    if args.settings == "default":
        chosen = chosen[:1]
    elif args.settings != "all":
        names = set(args.settings.split(","))
        chosen = [(n, c) for n, c in chosen if n in names]
    header = ("| setting | adh. block 1 | adh. block 100 | colour | shape | direction | continuity | step in/across px "
              "| one object | drift adh./area/bright. | flicker | boundary/inside | ms/block |")
    print(header + "\n|---|" + "---:|" * 12)
    if args.reference:
        for name, vae in (("world through the VAE (ceiling)", True), ("world (detector check)", False)):
            s = world_reference(args.model, PROMPTS[: args.prompts], args.blocks, range(args.seeds),
                                base.block_frames, args.chunk, vae=vae)
            report.setdefault("reference", {})[name] = s
            print(f"| {name} | {s['adherence_first']:.2f} | {s['adherence_block100']:.2f} | {s['colour']:.2f} | "
                  f"{s['shape']:.2f} | {s['direction']:.2f} | {s['continuity']:.2f} | {s['step_within_px']:.2f} / "
                  f"{s['step_boundary_px']:.2f} | {s['one_object']:.2f} | {s['drift_adherence']:.2f} / "
                  f"{s['drift_area']:.2f} / {s['drift_brightness']:.2f} | {s['flicker']:.3f} | "
                  f"{s['flicker_boundary_ratio']:.2f} | - |", flush=True)
    for name, cfg in chosen:
        s = bench_setting(pipe, cfg, PROMPTS[: args.prompts], args.blocks, range(args.seeds), args.chunk, args.guidance)
        report["settings"][name] = {"config": dataclasses.asdict(cfg), **s}
        print(f"| {name} ({describe(cfg)}) | {s['adherence_first']:.2f} | {s['adherence_block100']:.2f} | "
              f"{s['colour']:.2f} | {s['shape']:.2f} | {s['direction']:.2f} | {s['continuity']:.2f} | "
              f"{s['step_within_px']:.2f} / {s['step_boundary_px']:.2f} | {s['one_object']:.2f} | "
              f"{s['drift_adherence']:.2f} / {s['drift_area']:.2f} / {s['drift_brightness']:.2f} | {s['flicker']:.3f} | "
              f"{s['flicker_boundary_ratio']:.2f} | {s['ms_per_block']:.0f} |", flush=True)
        if args.per_prompt:
            for prompt, r in s["per_prompt"].items():
                print(f"|   {prompt} | {r['adherence_first']:.2f} | {r['adherence_block100']:.2f} | {r['colour']:.2f} | "
                      f"{r['shape']:.2f} | {r['direction']:.2f} | {r['continuity']:.2f} | {r['step_within_px']:.2f} / "
                      f"{r['step_boundary_px']:.2f} | {r['one_object']:.2f} | {r['drift_adherence']:.2f} / "
                      f"{r['drift_area']:.2f} / {r['drift_brightness']:.2f} | {r['flicker']:.3f} | "
                      f"{r['flicker_boundary_ratio']:.2f} | {r['ms_per_block']:.0f} |", flush=True)
    if args.switch_trials:
        sw = bench_switches(pipe, base, args.switch_trials, args.switch_after, guidance=args.guidance,
                            modes=switch_modes)
        report["switches"] = sw
        print("\n| on_prompt_change | new colour + direction hold within 2 blocks | never hold | median blocks to hold "
              "| new colour holds within 2 blocks | adherence after switch | shape's step across the switch px "
              "|\n|---|---:|---:|---:|---:|---:|---:|")
        for mode, r in sw.items():
            print(f"| {mode} | {r['within_2_blocks']:.2f} | {r['never']} | {r['median_blocks']:.1f} | "
                  f"{r['colour_within_2_blocks']:.2f} | {r['adherence_after']:.2f} | {r['switch_jump_px']:.1f} |",
                  flush=True)
    if args.teacher_forced:
        tf = teacher_forced(args.model, args.teacher_forced, block=base.block_frames, steps=base.steps)
        report["teacher_forced"] = tf
        print("\n| clips | px/frame along the prompt (truth) | clips moving >= 0.5 px/frame | x0 MSE at sigma 1, own / "
              "another clip's context |\n|---:|---:|---:|---:|")
        print(f"| {tf['clips']} | {tf['px_per_frame']:.2f} ({tf['truth_px_per_frame']:.2f}) | {tf['moving_share']:.2f} | "
              f"{tf['x0_mse_own_context']:.3f} / {tf['x0_mse_other_context']:.3f} |", flush=True)
    if args.teacher_forced_switch:
        g = args.guidance if args.guidance is not None else pipe.default_stream_guidance_scale
        tf = teacher_forced(args.model, args.teacher_forced_switch, block=base.block_frames, steps=base.steps,
                            guidance=g, switch=True)
        report["teacher_forced_switch"] = tf
        print(f"\n| clips (direction switched at the sampled block, CFG {g:g}) | px/frame along the new direction "
              "(truth) | along the old direction | clips moving the new way >= 0.5 px/frame |\n|---:|---:|---:|---:|")
        print(f"| {tf['clips']} | {tf['px_per_frame']:.2f} ({tf['truth_px_per_frame']:.2f}) | {tf['old_px_per_frame']:.2f} | "
              f"{tf['moving_share']:.2f} |", flush=True)
    if args.vocab:
        vocab = bench_vocab(pipe, base, args.vocab, guidance=args.guidance, power=args.vocab_power,
                            factors=factors)
        report["vocab"] = vocab
        print(f"\n| every world prompt, {args.vocab} blocks each | colour | direction | one object | continuity |"
              "\n|---|---:|---:|---:|---:|")
        for name, r in vocab["per_factor"].items():
            print(f"| {name} | {r['colour']:.2f} | {r['direction']:.2f} | {r['one_object']:.2f} | "
                  f"{r['continuity']:.2f} |", flush=True)
        if args.vocab_weights:
            write_json_atomically(args.vocab_weights, vocab["weights"])
    if args.long:
        report["long"] = bench_long(pipe, base, args.long)
        print("\nlong stream:", json.dumps(report["long"]))
    if args.json:
        write_json_atomically(args.json, report)


if __name__ == "__main__":
    main()
