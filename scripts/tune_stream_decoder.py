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
    non_negative_float,
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
    COLOURS,
    DIRECTIONS,
    PromptSwitch,
    render_stream_clip,
    sample_stream_params,
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
    source = Path(resolve_model(args.model))
    if not (source / "vae").is_dir():
        parser.error(f"--model {args.model}: {source} has no vae/ folder; give a local Diffusers model folder")
    if args.output.exists() and not (args.output / "model_index.json").exists():
        parser.error(f"--output {args.output} exists and is not a model folder; give a new path or a model folder")
    log = start_run(args)
    pipe = load_diffusers_pipeline(str(source))
    tune(pipe, args, args.work, log)
    export(pipe, source, args.output)


if __name__ == "__main__":
    main()
