"""Train the toy reference model (``--model toy``) on the procedural world of ``supergen.toyworld``.

Two phases, one background job, resumable from its checkpoints:

1. ``vae``: an ``AutoencoderKLWan`` (2x spatial, 2x temporal compression, 8
   latent channels) learns to reconstruct toy-world clips (MSE + a small KL
   term). Its latent mean/std are then measured on training clips and written
   into the VAE config (``latents_mean``/``latents_std``), as Wan checkpoints do.
2. ``dit``: a small ``WanTransformer3DModel`` learns flow matching on the
   VAE latents of a fixed, seeded set of clips, conditioned on a frozen random
   tiny UMT5 encoder (the prompt vocabulary is tiny and each prompt's embedding
   is distinct), with 10% empty prompts so classifier-free guidance works. An
   EMA of the weights is what ships.

Everything is determined by ``--seed``: initial weights, the clip of every
step, the noise and timesteps of every step (each drawn from a generator
seeded by (seed, phase, step)), so a resumed run follows the same path as an
uninterrupted one, bit for bit at the same ``--threads`` (tests/test_train_toy.py;
another thread count changes the order of float reductions). The loss curve
goes to ``<work>/loss.csv`` (rewound to the checkpoint on resume; a PNG too when
matplotlib is present); the final pipeline is written with ``save_pretrained``
to ``--output`` (default ``supergen/assets/toy``). The defaults are the shipped
model's settings (about 70 minutes on 2 CPU cores):

    nohup python scripts/train_toy_model.py --work runs/toy > runs/toy.log 2>&1 &
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Run this checkout's supergen, not whatever copy happens to be installed.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from supergen.io import normal_modes  # noqa: E402
from supergen.models import TOY_NATIVE_SIZE, build_toy_wan, write_native_size  # noqa: E402
from supergen.toyworld import all_prompts, render_batch  # noqa: E402

logger = logging.getLogger("train_toy_model")


def clips_to_video(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, F, H, W, 3) -> float video (N, 3, F, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def step_seed(seed: int, phase: int, step: int) -> int:
    return (seed * 1_000_003 + phase * 100_003 + step) % (2**63)


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume(ckpt: Path, log: "LossLog", phase: str, **parts) -> tuple[int, float]:
    """Load ``parts`` (name -> module or optimizer) from ``ckpt`` if it exists; returns (step, seconds so far)."""
    if not ckpt.exists():
        return 0, 0.0
    state = torch.load(ckpt, weights_only=False)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    logger.info("%s: resumed at step %d (%.0f s so far)", phase, state["step"], state["elapsed"])
    log.rewind(phase, state["step"])
    return state["step"], state["elapsed"]


def cosine_lr(base: float, step: int, steps: int, warmup: int | None = None) -> float:
    """``base`` decayed on a cosine to 10% over ``steps`` (the last steps do not undo what was learned), after
    a linear warm-up of ``warmup`` steps."""
    warm = 1.0 if warmup is None else min(1.0, (step + 1) / warmup)
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def optimizer_step(model: torch.nn.Module, opt, loss: torch.Tensor, lr: float, ema=None) -> None:
    """One update of ``model`` at learning rate ``lr``, gradients clipped to norm 1; ``ema`` follows it."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if ema is not None:
        ema.update_parameters(model)


def budget_spent(args) -> bool:
    """Count one optimizer step against ``--max-steps``; True once this invocation has used them all."""
    args.steps_done += 1
    return args.max_steps is not None and args.steps_done >= args.max_steps


def stop_run(step: int) -> None:
    logger.info("stopping after --max-steps at phase step %d; run the same command again to resume", step)
    sys.exit(0)


class LossLog:
    """Append-only CSV of (phase, step, loss, seconds) that survives resumes."""

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            path.write_text("phase,step,loss,elapsed_s\n")

    def rewind(self, phase: str, step: int) -> None:
        """Forget ``phase`` rows after ``step``: a resumed run logs them again from its checkpoint."""
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines[1:] if not (ln.split(",")[0] == phase and int(ln.split(",")[1]) > step)]
        if len(kept) != len(lines) - 1:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(lines[0] + "".join(kept))
            tmp.replace(self.path)

    def add(self, phase: str, step: int, loss: float, elapsed: float) -> None:
        with self.path.open("a") as f:
            f.write(f"{phase},{step},{loss:.6f},{elapsed:.1f}\n")


def start_run(args) -> LossLog:
    """A training invocation's setup: logging, torch threads, the work folder with its args.json, the loss log."""
    args.steps_done = 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    return LossLog(args.work / "loss.csv")


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, shaped (1, C, 1, 1, 1): ``(z - mean) / std`` is what the
    transformer sees, as in WanPipeline."""
    cfg = vae.config
    return torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (a guidance scale)."""
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def train_vae(pipe, args, work: Path, log: LossLog) -> None:
    vae = pipe.vae
    height, width, frames = TOY_NATIVE_SIZE
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start, elapsed = resume(ckpt, log, "vae", model=vae, opt=opt)
    vae.train()
    t0 = time.perf_counter() - elapsed
    running = None
    for step in range(start, args.vae_steps):
        seed = step_seed(args.seed, 1, step)
        clips, _, alpha = render_batch(seed, args.vae_batch, height, width, frames, return_alpha=True)
        video = clips_to_video(clips)
        gen = torch.Generator().manual_seed(seed)
        dist = vae.encode(video).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec_loss = F.mse_loss(recon, video)
        # The shape covers ~5% of the pixels but is what the clip is about: weight
        # its pixels up so the VAE learns it early instead of after the background.
        weight = 1.0 + args.vae_shape_weight * torch.from_numpy(alpha)[:, None]
        fit_loss = (weight * (recon - video) ** 2).mean() / weight.mean()
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = fit_loss + args.vae_kl * kl
        lr = cosine_lr(args.vae_lr, step, args.vae_steps)
        optimizer_step(vae, opt, loss, lr)
        running = rec_loss.item() if running is None else 0.95 * running + 0.05 * rec_loss.item()
        if (step + 1) % args.log_every == 0:
            now = time.perf_counter() - t0
            log.add("vae", step + 1, rec_loss.item(), now)
            psnr = 10 * math.log10(4.0 / max(running, 1e-12))
            logger.info("vae step %d/%d mse %.5f (~%.1f dB) kl %.3f lr %.2e %.0f s", step + 1, args.vae_steps, running, psnr, kl.item(), lr, now)
        stop = budget_spent(args)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.vae_steps or stop:
            save_checkpoint(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1, elapsed=time.perf_counter() - t0)
        if stop:
            stop_run(step + 1)
    vae.eval()


@torch.no_grad()
def encode_dataset(pipe, args, work: Path) -> tuple[torch.Tensor, list[str]]:
    """Fixed training set: clips rendered from the seed, encoded once (distribution mode, unnormalised)."""
    cache = work / "latents.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=False)
        return data["latents"], data["prompts"]
    height, width, frames = TOY_NATIVE_SIZE
    latents, prompts = [], []
    chunk = 64
    for i in range(0, args.dataset, chunk):
        n = min(chunk, args.dataset - i)
        clips, texts = render_batch(step_seed(args.seed, 2, i), n, height, width, frames)
        latents.append(pipe.vae.encode(clips_to_video(clips)).latent_dist.mode())
        prompts.extend(texts)
    latents = torch.cat(latents)
    torch.save({"latents": latents, "prompts": prompts}, cache)
    return latents, prompts


@torch.no_grad()
def set_latent_stats(pipe, latents: torch.Tensor) -> None:
    """Record per-channel latent mean/std in the VAE config so normalised latents have unit scale."""
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    pipe.vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std])
    logger.info("latent stats: mean %s std %s", [round(float(v), 3) for v in mean], [round(float(v), 3) for v in std])


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Frozen text embeddings for every prompt, padded exactly as WanPipeline pads them at inference."""
    table = {}
    for text in [*prompts, ""]:
        emb, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
        table[text] = emb[0]
    return table


def train_dit(pipe, args, work: Path, log: LossLog, latents_raw: torch.Tensor, prompts: list[str]) -> torch.nn.Module:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = pipe.transformer
    mean, std = latent_stats(pipe.vae)
    latents = (latents_raw - mean) / std
    text = encode_prompts(pipe, sorted(set(prompts)))
    empty = text[""]
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.01)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
    ckpt = work / "dit.pt"
    start, elapsed = resume(ckpt, log, "dit", model=model, ema=ema, opt=opt)
    model.train()
    shift = pipe.scheduler.config.flow_shift
    t0 = time.perf_counter() - elapsed
    running = None
    for step in range(start, args.dit_steps):
        gen = torch.Generator().manual_seed(step_seed(args.seed, 3, step))
        idx = torch.randint(len(latents), (args.dit_batch,), generator=gen)
        x0 = latents[idx]
        cond = torch.stack(
            [empty if torch.rand((), generator=gen) < args.cfg_drop else text[prompts[i]] for i in idx.tolist()]
        )
        # The same shifted sigmas the flow UniPC scheduler visits at inference, drawn uniformly.
        u = torch.rand(args.dit_batch, generator=gen)
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        lr = cosine_lr(args.dit_lr, step, args.dit_steps, warmup=200)
        optimizer_step(model, opt, loss, lr, ema=ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0:
            now = time.perf_counter() - t0
            log.add("dit", step + 1, loss.item(), now)
            logger.info("dit step %d/%d loss %.4f lr %.2e %.0f s", step + 1, args.dit_steps, running, lr, now)
        stop = budget_spent(args)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.dit_steps or stop:
            save_checkpoint(
                ckpt, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step + 1,
                elapsed=time.perf_counter() - t0,
            )
            if args.export_every and (step + 1) % args.export_every == 0:
                export(pipe, ema, args.output, args.guidance)
        if stop and step + 1 < args.dit_steps:
            stop_run(step + 1)
    return ema


def export(pipe, ema, output: Path, guidance: float, hints: dict | None = None) -> None:
    """Write the pipeline (EMA transformer weights) in the Diffusers layout, atomically, with its
    supergen.json: native size, CFG scale and any further ``hints`` (e.g. stream settings)."""
    live = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.transformer.load_state_dict(ema.module.state_dict())
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    write_native_size(tmp, *TOY_NATIVE_SIZE, guidance_scale=guidance)
    if hints:
        merged = {**json.loads((tmp / "supergen.json").read_text()), **hints}
        (tmp / "supergen.json").write_text(json.dumps(merged, indent=2) + "\n")
    normal_modes(tmp)
    shutil.rmtree(output, ignore_errors=True)
    tmp.replace(output)
    pipe.transformer.load_state_dict(live)
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    logger.info("exported %s (%.1f MB)", output, size / 1e6)


def plot_loss(work: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader((work / "loss.csv").open()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, phase, label in ((axes[0], "vae", "VAE reconstruction MSE"), (axes[1], "dit", "flow-matching loss")):
        pts = [(int(r["step"]), float(r["loss"])) for r in rows if r["phase"] == phase]
        if pts:
            ax.plot(*zip(*pts), lw=0.8)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(work / "loss.png", dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoints, loss.csv, latents cache")
    parser.add_argument("--output", type=Path, default=REPO / "supergen" / "assets" / "toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a CPU shared with other jobs: a 2-thread run slowed 20x when another process took a core)")
    parser.add_argument("--vae-steps", type=int, default=5000)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--vae-shape-weight", type=float, default=9.0, help="extra loss weight on shape pixels")
    parser.add_argument("--dataset", type=int, default=4096, help="clips in the fixed transformer training set")
    parser.add_argument("--dit-steps", type=int, default=7000)
    parser.add_argument("--dit-batch", type=int, default=16)
    parser.add_argument("--dit-lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of empty prompts")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="CFG scale written to supergen.json as the model's default (chosen with "
                        "bench_toy_model.py's --guidance-sweep)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--export-every", type=int, default=500, help="also export the EMA pipeline this often (0: only at the end)")
    parser.add_argument("--max-steps", type=int, help="stop (checkpointed) after this many optimizer steps in this invocation")
    args = parser.parse_args(argv)
    log = start_run(args)

    pipe = build_toy_wan(seed=args.seed)
    train_vae(pipe, args, args.work, log)
    latents, prompts = encode_dataset(pipe, args, args.work)
    set_latent_stats(pipe, latents)
    logger.info("dataset: %d clips, %d distinct prompts of %d", len(prompts), len(set(prompts)), len(all_prompts()))
    ema = train_dit(pipe, args, args.work, log, latents, prompts)
    export(pipe, ema, args.output, args.guidance)
    plot_loss(args.work)


if __name__ == "__main__":
    main()
