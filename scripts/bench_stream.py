"""Streaming benchmark: per-block latency and KV-cache bytes against block index, KV-cached vs no cache.

Runs ``SuperGenPipeline.stream`` for ``--blocks`` blocks with the rolling KV
cache, then (in the same process, same settings otherwise) the no-cache
baseline that re-runs the whole history every forward and attends to all of
it, and prints:

- per-block rows (every ``--every`` blocks): latency (denoise + VAE decode),
  denoise only, KV-cache bytes in use, context frames;
- a summary: time to first frame, frames per second with and without decode,
  latency of the first and last ten blocks, and the cached/baseline ratio.

``--plot PATH`` saves latency and cache bytes against block index.

The tiny model (default) shows the machinery on a CPU. ``--config wan2.1-1.3b``
builds the real Wan2.1-T2V-1.3B transformer and VAE with random weights
(meant for a GPU: 480x832, 4 steps, blocks of 3 latent frames).

    python scripts/bench_stream.py --blocks 120 --baseline-blocks 48 --plot docs/bench_stream_cpu.png
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supergen import StreamConfig, SuperGenPipeline  # noqa: E402


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def build_wan13b(device: torch.device, dtype: torch.dtype):
    """Wan2.1-T2V-1.3B transformer + Wan VAE in their real configurations, random weights.

    The text encoder is a one-layer UMT5 of the real width (4096): it runs once
    per prompt, so its size does not change per-block timings.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from supergen.backbones.tiny import build_tokenizer as _build_tokenizer

    tokenizer = _build_tokenizer()
    with torch.device(device):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )
        rope_tables = (transformer.rope.freqs_cos.clone(), transformer.rope.freqs_sin.clone())
        transformer.to(dtype)
        transformer.rope.freqs_cos, transformer.rope.freqs_sin = rope_tables
        vae = AutoencoderKLWan().to(dtype)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=8,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        ).to(dtype)
    # As from_pretrained(torch_dtype=...) does: RoPE tables, time embedder and norms stay in float32.
    keep = transformer._keep_in_fp32_modules
    for name, module in transformer.named_modules():
        if any(name == k or name.endswith("." + k) for k in keep):
            module.float()
    for name, param in transformer.named_parameters():
        if any(name == k or name.endswith("." + k) for k in keep):
            param.data = param.data.float()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    return SuperGenPipeline.from_pipe(pipe.to(device), native_size=(480, 832, 81))


def run(pipe, blocks: int, config: StreamConfig, cached: bool, height, width, sync) -> tuple[list[dict], dict]:
    stream = pipe.stream("a fox running through snow", num_blocks=blocks, stream=config, cached=cached,
                         height=height, width=width, seed=0)
    rows = []
    with stream:
        for block in stream:
            sync()
            rows.append(block.metrics)
        metrics = stream.metrics
    return rows, metrics


def summary(name: str, rows: list[dict], metrics: dict) -> dict:
    frames = sum(r["frames"] for r in rows)
    denoise = sum(r["denoise_s"] for r in rows)
    first = rows[: min(10, len(rows))]
    last = rows[-min(10, len(rows)) :]
    return {
        "name": name,
        "blocks": len(rows),
        "ttff_s": metrics["time_to_first_frame_s"],
        "fps": metrics["fps"],
        "fps_denoise_only": frames / denoise if denoise else 0.0,
        "first10_ms": 1000 * sum(r["latency_s"] for r in first) / len(first),
        "last10_ms": 1000 * sum(r["latency_s"] for r in last) / len(last),
        "last10_denoise_ms": 1000 * sum(r["denoise_s"] for r in last) / len(last),
        "kv_last_bytes": rows[-1]["kv_cache_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "wan2.1-1.3b"), default="tiny")
    parser.add_argument("--blocks", type=int, default=120)
    parser.add_argument("--baseline-blocks", type=int, default=48, help="blocks of the no-cache baseline (0: skip)")
    parser.add_argument("--block-frames", type=int, default=3)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--sink", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--schedule", choices=("block", "rolling"), default="block")
    parser.add_argument("--kv-write", choices=("rerun", "last_step"), default="rerun")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--every", type=int, default=10, help="print every N-th block")
    parser.add_argument("--plot", default=None, help="save latency / cache plots to this PNG")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.config == "tiny":
        pipe = SuperGenPipeline.from_pretrained("tiny")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipe = build_wan13b(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    config = StreamConfig(block_frames=args.block_frames, window=args.window, sink=args.sink, steps=args.steps,
                          schedule=args.schedule, kv_write=args.kv_write)
    height = args.height or pipe.adapter.native_height
    width = args.width or pipe.adapter.native_width
    print(f"hardware: {hardware()}; torch {torch.__version__}")
    print(f"model: {args.config}, {width}x{height}, blocks of {config.block_frames} latent frames, "
          f"{config.steps} steps, {config.schedule} schedule, kv write {config.kv_write}, "
          f"sink {config.sink} + window {config.window} latent frames")

    # Warm-up (allocator, kernels) so block 0 of the measured run is not a cold start.
    run(pipe, 1, config, True, height, width, sync)

    t0 = time.perf_counter()
    cached_rows, cached_metrics = run(pipe, args.blocks, config, True, height, width, sync)
    print(f"\ncached stream: {args.blocks} blocks in {time.perf_counter() - t0:.1f}s")
    base_rows, base_metrics = [], None
    if args.baseline_blocks:
        t0 = time.perf_counter()
        # The baseline attends to the whole history (no window, no sink), as a
        # stream without a rolling cache would; its cost grows with every block.
        full_history = dataclasses.replace(config, window=args.baseline_blocks * config.block_frames, sink=0)
        base_rows, base_metrics = run(pipe, args.baseline_blocks, full_history, False, height, width, sync)
        print(f"no-cache baseline: {args.baseline_blocks} blocks in {time.perf_counter() - t0:.1f}s")

    print("\n| block | cached latency ms | cached denoise ms | KV cache KiB | context frames "
          "| no-cache latency ms | no-cache denoise ms | no-cache context frames |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    indices = sorted({*range(0, args.blocks, args.every), args.blocks - 1, *range(0, len(base_rows), args.every),
                      max(0, len(base_rows) - 1)})
    for i in indices:
        c = cached_rows[i] if i < len(cached_rows) else None
        b = base_rows[i] if i < len(base_rows) else None
        cells = [str(i)]
        cells += ([f"{1000 * c['latency_s']:.1f}", f"{1000 * c['denoise_s']:.1f}", f"{c['kv_cache_bytes'] / 1024:.1f}",
                   str(c["context_frames"])] if c else ["", "", "", ""])
        cells += ([f"{1000 * b['latency_s']:.1f}", f"{1000 * b['denoise_s']:.1f}", str(b["context_frames"])]
                  if b else ["", "", ""])
        print("| " + " | ".join(cells) + " |")

    sums = [summary("KV-cached", cached_rows, cached_metrics)]
    if base_rows:
        sums.append(summary("no cache (full history)", base_rows, base_metrics))
    print("\n| run | blocks | time to first frame s | FPS (with decode) | FPS (denoise only) "
          "| first 10 blocks ms/block | last 10 blocks ms/block | last 10 denoise ms/block |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in sums:
        print(f"| {s['name']} | {s['blocks']} | {s['ttff_s']:.3f} | {s['fps']:.1f} | {s['fps_denoise_only']:.1f} "
              f"| {s['first10_ms']:.1f} | {s['last10_ms']:.1f} | {s['last10_denoise_ms']:.1f} |")
    if base_rows:
        n = min(len(base_rows), len(cached_rows))
        k = min(10, n)
        c_tail = sum(r["denoise_s"] for r in cached_rows[n - k : n]) / k
        b_tail = sum(r["denoise_s"] for r in base_rows[n - k : n]) / k
        print(f"\ndenoise time per block at blocks {n - k}..{n - 1}: no-cache / cached = {b_tail / c_tail:.2f}x")
    kv = [r["kv_cache_bytes"] for r in cached_rows]
    fill = next(i for i, v in enumerate(kv) if v == max(kv))
    print(f"KV cache in use: grows until block {fill}, then flat at {max(kv) / 1024:.1f} KiB "
          f"(allocated {cached_rows[-1]['kv_cache_allocated_bytes'] / 1024:.1f} KiB) for the remaining "
          f"{len(kv) - fill - 1} blocks; min/max after fill: {min(kv[fill:])}/{max(kv[fill:])} bytes")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot([1000 * r["denoise_s"] for r in cached_rows], label="KV-cached: denoise")
        ax1.plot([1000 * r["latency_s"] for r in cached_rows], label="KV-cached: denoise + decode", alpha=0.6)
        if base_rows:
            ax1.plot([1000 * r["denoise_s"] for r in base_rows], label="no cache: denoise")
        ax1.set_xlabel("block")
        ax1.set_ylabel("ms per block")
        ax1.legend()
        ax2.plot([r["kv_cache_bytes"] / 1024 for r in cached_rows], label="KV cache in use")
        ax2.plot([r["kv_cache_allocated_bytes"] / 1024 for r in cached_rows], "--", label="allocated")
        ax2.set_xlabel("block")
        ax2.set_ylabel("KiB")
        ax2.legend()
        fig.suptitle(f"stream, {args.config} {width}x{height}, {hardware()}", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
