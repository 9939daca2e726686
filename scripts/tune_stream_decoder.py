"""Fine-tune a toy model's VAE decoder for long streams (the encoder, and so the latent space, stay as they are).

The toy VAE was trained on 9-frame clips (5 latent frames) whose shapes never
cross the frame edges. A stream decodes one unbroken latent sequence with the
causal cache carried from block to block (``WanStreamDecoder``), and its shapes
wrap around the edges. Past the first ~8 latent frames the decoder is out of
its training range: on green-field clips the world's own stream clips, encoded
and decoded, turn into a bright mottled field with halos and the one-object
share falls to ~0.5 (``scripts/bench_stream_quality.py --reference``), a
ceiling no transformer could pass.

This trains the decoder (and ``post_quant_conv``) alone on long wrapped
stream clips (``sample_stream_params``, a prompt switch in some), their latents
from the frozen encoder over the whole clip as ``train_toy_causal.py`` encodes
its training set (the posterior's mode; ``--latents posterior`` samples it as
the VAE was trained), plus a little Gaussian noise (``--latent-noise``, in
units of the latent std) so the decoder also takes a transformer's slightly-off
latents, decoded whole (the stream's block-by-block decode equals that), with
the shape's pixels weighted up as ``train_toy_model.py`` does.
The transformer needs nothing new: its latents mean what they meant.

``--own-streams N`` adds DAgger for the decoder. The world's latents are not
what a decoder sees in a stream: the transformer's own latents blur a small
white shape on a dark night into something the decoder draws lavender-purple,
and a red shape's soft rim on blue sky into a magenta fringe, both counted as
a second object. So N streams of the model itself (``--own-blocks`` blocks each,
every world prompt in turn, made once before tuning and kept in ``--work``) are
labelled by :func:`world_label`: the world's shape, in the prompt's colour, drawn
where the stream put its blob, strays and fringes painted over with the
background. Each step then also decodes ``--own-batch`` of them towards their
labels (the two losses averaged). The decoder sees no prompt, so it can only
learn what the latents themselves say.

Seeded and resumable like the other trainers (a step's clips and noise come
from (seed, step)); ``--output`` gets the whole model folder with the new
decoder, written atomically (also after a ``--max-steps`` stop, so a
long run can be looked at as it goes):

    OMP_NUM_THREADS=1 python scripts/tune_stream_decoder.py --model toy-causal --work runs/dec \\
        --output runs/toy-causal-dec
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.train_toy_model import (  # noqa: E402
    budget_spent,
    clips_to_video,
    cosine_lr,
    fraction,
    latent_stats,
    non_negative_float,
    non_negative_int,
    optimizer_step,
    positive_int,
    resume,
    save_checkpoint,
    start_run,
    step_seed,
)
from supergen.io import normal_modes  # noqa: E402
from supergen.models import load_diffusers_pipeline, resolve_model  # noqa: E402
from supergen.toyworld import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    PromptSwitch,
    all_prompts,
    parse_prompt,
    render_stream_clip,
    sample_stream_params,
    shape_area,
    shape_coverage,
)

logger = logging.getLogger("tune_stream_decoder")


def stream_clips(seed: int, count: int, height: int, width: int, frames: int, switch_fraction: float) -> tuple:
    """``count`` wrapped stream clips (uint8 ``(N,F,H,W,3)``) and each frame's shape colour (RGB, ``(N,F,3)``)."""
    rng = np.random.default_rng(seed)
    clips, colours = [], []
    for _ in range(count):
        params = sample_stream_params(rng)
        switch = None
        if rng.uniform() < switch_fraction:
            switch = PromptSwitch(frame=int(rng.integers(2, frames - 1)),
                                  colour=list(COLOURS)[rng.integers(len(COLOURS))],
                                  direction=DIRECTIONS[rng.integers(len(DIRECTIONS))])
        clips.append(render_stream_clip(params, height, width, frames, switch))
        per_frame = [COLOURS[switch.colour if switch is not None and t >= switch.frame else params.colour]
                     for t in range(frames)]
        colours.append(per_frame)
    return np.stack(clips), np.asarray(colours, dtype=np.float64)


def shape_weight(clips: np.ndarray, colours: np.ndarray, extra: float) -> torch.Tensor:
    """Per-pixel loss weight ``(N,1,F,H,W)``: 1, plus ``extra`` where the pixel is (close to) the shape's colour."""
    dist = np.linalg.norm(clips.astype(np.float64) - colours[:, :, None, None, :], axis=-1)
    return 1.0 + extra * torch.from_numpy(dist < 60.0).float()[:, None]


def world_label(frames: np.ndarray, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stream's frames as the toy world draws them where the stream put its shape: the decoder's DAgger label.

    Per frame, the stream's shape is its largest blob of the prompt's colour,
    else of any world colour (a white shape the model drew lavender), big
    enough to count (``object_counts``' threshold). Every shape-coloured
    pixel (the shape, rims, stray blobs) and 2 px around them are painted
    over with the prompt's background gradient, and the prompt's shape is
    drawn in its colour at the blob's centre (on the torus), at one radius
    for the clip (from the blobs' median area, clipped to the world's 0.19-0.24
    of the side). The rest of the frame is the stream's own. A frame with no
    blob is kept as it is. Returns the uint8 frames ``(F, H, W, 3)``, which
    frames had a shape ``(F,)`` and which pixels were painted ``(F, H, W)``.
    """
    from supergen.metrics import MIN_AREA_FRACTION, _circular_centre, _colour_mask, _components

    facts = parse_prompt(prompt)
    f = np.asarray(frames, dtype=np.float64)
    num, height, width = f.shape[:3]
    short = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    top, bottom = (np.asarray(c, dtype=np.float64) for c in BACKGROUNDS[facts.background][:2])
    gradient = top + (bottom - top) * (yy / max(height - 1, 1))[..., None]
    near = {c: _colour_mask(f, c) for c in COLOURS}
    order = [facts.colour] + [c for c in COLOURS if c != facts.colour]
    centres, sizes = [], []
    for t in range(num):
        blob = next((comps[0] for c in order if (comps := _components(near[c][t], wrap=True))
                     and len(comps[0]) >= MIN_AREA_FRACTION * height * width), None)
        if blob is None:
            centres.append(None)
            continue
        mask = np.zeros((height, width), dtype=bool)
        ys, xs = zip(*blob)
        mask[list(ys), list(xs)] = True
        centres.append(_circular_centre(mask))
        sizes.append(len(blob))
    radius = short * float(np.clip(math.sqrt(np.median(sizes) / shape_area(facts.shape, 1.0)) / short, 0.19, 0.24)
                           if sizes else 0.215)
    colour = np.asarray(COLOURS[facts.colour], dtype=np.float64)
    out = f.copy()
    repainted = np.zeros((num, height, width), dtype=bool)
    for t, centre in enumerate(centres):
        if centre is None:
            continue
        painted = np.logical_or.reduce([near[c][t] for c in COLOURS])
        for _ in range(2):  # grow by 2 px, on the torus
            painted = (painted | np.roll(painted, 1, 0) | np.roll(painted, -1, 0)
                       | np.roll(painted, 1, 1) | np.roll(painted, -1, 1))
        cy, cx = centre
        alpha = np.zeros((height, width))
        for ox in (-width, 0, width):  # pixel-centre coordinates, as render_stream_clip places shapes
            for oy in (-height, 0, height):
                alpha = np.maximum(alpha, shape_coverage(facts.shape, xx - cx - ox, yy - cy - oy, radius))
        repainted[t] = painted | (alpha > 0)
        base = np.where(repainted[t][..., None], gradient, f[t])
        out[t] = base * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), np.array([c is not None for c in centres]), repainted


@torch.no_grad()
def own_streams(source: Path, count: int, blocks: int, seed: int) -> dict:
    """``count`` streams of ``blocks`` blocks from the model itself (its transformer and decoder as they are now).

    The prompts go through the world's vocabulary in a seeded order and each
    stream has its own seed (from ``seed``, apart from the benchmarks' small
    ones). Returns the streams' normalised latents ``(N, C, F, h, w)``, their
    :func:`world_label` frames ``(N, F', H, W, 3)`` with the pixels it
    painted ``(N, F', H, W)``, and prompts.
    """
    from supergen import SuperGenPipeline

    pipe = SuperGenPipeline.from_pretrained(str(source), device="cpu")
    prompts = all_prompts()
    order = np.random.default_rng(step_seed(seed, 22, 0)).permutation(len(prompts))
    latents, targets, painted, used, found = [], [], [], [], []
    for k in range(count):
        prompt = prompts[order[k % len(prompts)]]
        with pipe.stream(prompt, num_blocks=blocks, seed=step_seed(seed, 23, k)) as stream:
            out = list(stream)
        target, has_shape, repainted = world_label(np.concatenate([b.frames for b in out]), prompt)
        latents.append(torch.cat([b.latents for b in out], dim=2)[0].float())
        targets.append(torch.from_numpy(target))
        painted.append(torch.from_numpy(repainted))
        used.append(prompt)
        found.append(has_shape.mean())
        if (k + 1) % 16 == 0 or k + 1 == count:
            logger.info("own streams %d/%d (a shape found in %.0f%% of frames)", k + 1, count, 100 * np.mean(found))
    return {"latents": torch.stack(latents), "targets": torch.stack(targets), "painted": torch.stack(painted),
            "prompts": used}


def own_data(args, work: Path) -> dict:
    """The ``--own-streams`` set: made once from ``--model`` before any tuning and kept in ``--work``.

    A resumed run must see the same set (the decoder has moved since), so it
    is read back; a ``--work`` whose set was made with other options is refused.
    """
    path = work / "own_streams.pt"
    made_with = {"model": str(args.source), "streams": args.own_streams, "blocks": args.own_blocks, "seed": args.seed}
    if path.exists():
        data = torch.load(path, weights_only=False)
        if data["made_with"] != made_with:
            raise SystemExit(f"--work {work} holds own streams made with {data['made_with']}, not {made_with}; "
                             "use a new --work")
        return data
    logger.info("own streams: %d streams of %d blocks from %s, labelled by the world", args.own_streams,
                args.own_blocks, args.source)
    data = {**own_streams(args.source, args.own_streams, args.own_blocks, args.seed), "made_with": made_with}
    save_checkpoint(path, **data)
    return data


def tune(pipe, args, work: Path, log) -> None:
    vae = pipe.vae
    vae.requires_grad_(False)
    trained = [vae.decoder, vae.post_quant_conv]
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt = work / "decoder.pt"
    start, elapsed = resume(ckpt, log, "decoder", decoder=vae.decoder, post_quant_conv=vae.post_quant_conv, opt=opt)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    height, width = args.size
    own = own_data(args, work) if args.own_streams else None
    if own is not None:
        own_mean, own_std = latent_stats(vae)
        own_rgb = torch.tensor([COLOURS[parse_prompt(p).colour] for p in own["prompts"]], dtype=torch.float64)
    t0 = time.perf_counter() - elapsed
    running = None
    for step in range(start, args.steps):
        seed = step_seed(args.seed, 21, step)
        clips, colours = stream_clips(seed, args.batch, height, width, args.clip_frames, args.switch_fraction)
        video = clips_to_video(clips)
        gen = torch.Generator().manual_seed(seed)
        vae.eval()
        with torch.no_grad():
            dist = vae.encode(video).latent_dist
        # The latents the causal trainer trains on (the mode), or a posterior sample as the VAE was trained;
        # then the extra noise.
        z = dist.mode() if args.latents == "mode" else dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        z = z + args.latent_noise * std * torch.randn(z.shape, generator=gen)
        vae.decoder.train()
        recon = vae.decode(z).sample
        n = min(recon.shape[2], video.shape[2])  # the encoder drops a remainder of whole temporal chunks
        weight = shape_weight(clips[:, :n], colours[:, :n], args.shape_weight)
        err = (recon[:, :, :n] - video[:, :, :n]) ** 2
        loss = (weight * err).mean() / weight.mean()
        if own is not None:
            # Half the step on the model's own latents, labelled by the world (world_label).
            pick = torch.randint(len(own["latents"]), (args.own_batch,), generator=gen)
            target = own["targets"][pick].numpy()
            recon_own = vae.decode(own["latents"][pick] * own_std + own_mean).sample
            n_own = min(recon_own.shape[2], target.shape[1])
            rgb = own_rgb[pick][:, None, :].expand(-1, n_own, -1).numpy()
            # What the label repainted (the shape, fringes, strays) weighs at least 1 + --painted-weight.
            weight_own = torch.maximum(shape_weight(target[:, :n_own], rgb, args.shape_weight),
                                       1.0 + args.painted_weight * own["painted"][pick][:, None, :n_own].float())
            err_own = (recon_own[:, :, :n_own] - clips_to_video(target)[:, :, :n_own]) ** 2
            loss = 0.5 * (loss + (weight_own * err_own).mean() / weight_own.mean())
        lr = cosine_lr(args.lr, step, args.steps, warmup=args.warmup)
        optimizer_step(torch.nn.ModuleList(trained), opt, loss, lr)
        mse = err.mean().item()
        running = mse if running is None else 0.95 * running + 0.05 * mse
        if (step + 1) % args.log_every == 0:
            now = time.perf_counter() - t0
            log.add("decoder", step + 1, mse, now)
            logger.info("decoder step %d/%d mse %.5f (~%.1f dB) lr %.2e %.0f s", step + 1, args.steps, running,
                        10 * math.log10(4.0 / max(running, 1e-12)), lr, now)
        stop = budget_spent(args)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stop:
            save_checkpoint(ckpt, decoder=vae.decoder.state_dict(), post_quant_conv=vae.post_quant_conv.state_dict(),
                            opt=opt.state_dict(), step=step + 1, elapsed=time.perf_counter() - t0)
        if stop and step + 1 < args.steps:
            logger.info("stopping after --max-steps at step %d; run the same command again to resume (exporting "
                        "the decoder as it is now)", step + 1)
            break
    vae.eval()
    vae.requires_grad_(False)


def export(pipe, source: Path, output: Path) -> None:
    """``source``'s model folder with this VAE, written beside ``output`` and renamed into place."""
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(tmp / "vae")
    pipe.vae.save_pretrained(tmp / "vae")
    normal_modes(tmp)
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        output.replace(old)
        tmp.replace(output)
        shutil.rmtree(old)
    else:
        tmp.replace(output)
    logger.info("exported %s with the tuned decoder", output)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-causal", help="model whose VAE decoder is tuned (name or folder)")
    parser.add_argument("--work", type=Path, required=True, help="checkpoint and loss.csv")
    parser.add_argument("--output", type=Path, required=True, help="model folder to write (may be --model's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=positive_int, nargs=2, default=(32, 32), metavar=("H", "W"))
    parser.add_argument("--clip-frames", type=positive_int, default=61,
                        help="video frames per clip (61: 31 latent frames, as the causal trainer's clips)")
    parser.add_argument("--switch-fraction", type=fraction, default=0.3, help="clips with a prompt switch")
    parser.add_argument("--latents", choices=("mode", "posterior"), default="mode",
                        help="decode the encoder's mode (what the transformer learned) or a posterior sample")
    parser.add_argument("--latent-noise", type=non_negative_float, default=0.1,
                        help="Gaussian noise on those latents, in units of the latent std")
    parser.add_argument("--shape-weight", type=non_negative_float, default=9.0,
                        help="extra loss weight on shape pixels")
    parser.add_argument("--own-streams", type=non_negative_int, default=0,
                        help="also train on this many of the model's own streams, labelled by the world drawn where "
                        "the model put its shape (DAgger for the decoder; 0: world clips only)")
    parser.add_argument("--own-blocks", type=positive_int, help="blocks per own stream (default 10)")
    parser.add_argument("--own-batch", type=positive_int, help="own streams per step (default 2)")
    parser.add_argument("--painted-weight", type=non_negative_float,
                        help="the pixels an own stream's label repainted (fringes, strays) weigh at least 1 + this "
                             "(as --shape-weight does for the shape; default 0)")
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=positive_int, default=10)
    parser.add_argument("--ckpt-every", type=positive_int, default=50)
    parser.add_argument("--max-steps", type=positive_int, help="stop (checkpointed) after this many steps here")
    args = parser.parse_args(argv)
    if not args.lr > 0:
        parser.error(f"--lr {args.lr} must be > 0")
    own_options = {"--own-blocks": args.own_blocks, "--own-batch": args.own_batch,
                   "--painted-weight": args.painted_weight}
    given = [name for name, value in own_options.items() if value is not None]
    if given and not args.own_streams:
        parser.error(f"{', '.join(given)} act on own streams only; give --own-streams N > 0 too")
    args.own_blocks = 10 if args.own_blocks is None else args.own_blocks
    args.own_batch = 2 if args.own_batch is None else args.own_batch
    args.painted_weight = 0.0 if args.painted_weight is None else args.painted_weight
    source = Path(resolve_model(args.model))
    if not (source / "vae").is_dir():
        parser.error(f"--model {args.model}: {source} has no vae/ folder; give a local Diffusers model folder")
    if args.output.exists() and not (args.output / "model_index.json").exists():
        parser.error(f"--output {args.output} exists and is not a model folder; give a new path or a model folder")
    args.source = source
    log = start_run(args)
    pipe = load_diffusers_pipeline(str(source))
    tune(pipe, args, args.work, log)
    export(pipe, source, args.output)


if __name__ == "__main__":
    main()
