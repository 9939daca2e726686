"""``supergen`` command line: ``generate`` (tiled ultra-high resolution) and ``stream`` (block-wise streaming).

Every flag maps one to one onto a config field (see :mod:`supergen.config`).
Inputs are validated before any model is loaded where possible, and always
before any denoising.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time

from supergen.config import CacheConfig, CoherenceConfig, ParallelConfig, StreamConfig, TilingConfig

logger = logging.getLogger("supergen")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every flag's default, except where the help already says it (or there is none to show)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "default" in help_text or action.default in (None, argparse.SUPPRESS) or action.required or flag:
            return help_text
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    from supergen.models import SHIPPED_MODELS, TINY_BUILDERS

    p.add_argument("--model", default="tiny", help=(
        f"built-in name ({', '.join(sorted(TINY_BUILDERS))}; tiny = tiny-wan; the -i2v ones are image-to-video and "
        f"need --image; {', '.join(SHIPPED_MODELS)}: the shipped model trained on the toy world), a local pipeline "
        "folder, or a hub id"))
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: the CPUs this process may use, divided by the processes "
                        "torchrun starts on this host; 1 for the built-in tiny and toy models, whose operations "
                        "are too small to split)")
    p.add_argument("--max-memory", default=None,
                   help="refuse requests whose estimated peak memory (weights included) is above this, e.g. 16G; "
                        "requests over the device's free memory are refused anyway")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="DEBUG also prints tracebacks of refused requests")


def _add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the config ``cls`` that names one (``supergen.config.cli``): default, type,
    choices and help come from the field. A ``model_default`` flag defaults to ``None`` (the model's
    recommendation, else the field's default; :func:`_config_from_args` fills it in) and its help says so."""
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata.get("cli", {}))
        if not spec:
            continue
        flag = spec.pop("flag")
        if spec.pop("model_default"):
            spec["help"] += f" (default: the model's recommended value (supergen.json 'stream'), else {f.default})"
            spec.setdefault("type", type(f.default))
            parser.add_argument(flag, default=None, **spec)
        elif spec.get("action") == "boolean_optional":  # --name / --no-name
            spec["action"] = argparse.BooleanOptionalAction
            parser.add_argument(flag, default=f.default, **spec)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action="store_false" if f.default else "store_true", **spec)
        else:
            spec.setdefault("type", type(f.default))
            parser.add_argument(flag, default=f.default, **spec)


def _config_from_args(cls, args: argparse.Namespace, base=None):
    """The config ``cls`` from the flags :func:`_add_config_flags` added; a ``model_default`` flag left out keeps
    ``base``'s value (the model's recommended config; default: ``cls()``)."""
    values = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("cli")
        if spec:
            value = getattr(args, spec.get("dest") or spec["flag"].lstrip("-").replace("-", "_"))
            if not (spec["model_default"] and value is None):
                values[f.name] = value
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supergen", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)
    _add_stream_parser(sub)
    _add_demo_parser(sub)
    return parser


def _add_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (with guidance above 1)")


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate a video above the model's native resolution by tiled refinement",
                       formatter_class=_HelpFormatter)
    _add_common(g)
    _add_prompts(g)
    g.add_argument("--image", default=None, help="first frame (picture file) for image-to-video models")
    g.add_argument("--height", type=int, default=None, help="pixels (default: 2x the model's native height)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: 2x the model's native width)")
    g.add_argument("--num-frames", type=int, default=None, help="frames (default: the model's native count)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps of the full schedule")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's, 5 unless its supergen.json says "
                   "otherwise; HunyuanVideo: its embedded, distilled guidance)")
    g.add_argument("--guidance-2", type=float, default=None, help="guidance of Wan2.2's low-noise expert")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (same seed, same video, any world size)")
    for cls in (TilingConfig, CoherenceConfig, ParallelConfig, CacheConfig):
        _add_config_flags(g, cls)
    g.add_argument("--skip-map", default=None, help="write a PNG heat map of where the cache reused outputs")
    g.add_argument("--output", default="out.mp4", help="mp4 path (written atomically, by rank 0)")
    g.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    g.add_argument("--metrics-json", default=None, help="write run metrics to this JSON file")


def _add_stream_parser(sub) -> None:
    st = sub.add_parser("stream", help="stream video block by block with a rolling KV cache (frames written as they come)",
                        formatter_class=_HelpFormatter)
    _add_common(st)
    _add_prompts(st)
    st.add_argument("--blocks", type=int, default=None, help="blocks to make (default: endless, stop with Ctrl-C)")
    _add_config_flags(st, StreamConfig)
    st.add_argument("--height", type=int, default=None, help="pixels (default: the model's native height)")
    st.add_argument("--width", type=int, default=None, help="pixels (default: the model's native width)")
    st.add_argument("--guidance", type=float, default=None,
                    help="CFG scale (default: 1, no guidance, as causal few-step checkpoints run; or the scale the "
                    "checkpoint's supergen.json recommends)")
    st.add_argument("--seed", type=int, default=0, help="seed of the noise")
    st.add_argument("--transformer-weights", default=None,
                    help="original-layout Wan checkpoint to load into the transformer (Self-Forcing, CausVid, Rolling Forcing)")
    st.add_argument("--output", required=True, help="mp4 path; frames are appended as blocks finish")
    st.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    st.add_argument("--metrics-json", default=None, help="write run metrics (with per-block entries) to this JSON file")


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="serve the Gradio demo (needs the [demo] extra)", formatter_class=_HelpFormatter)
    _add_common(d)
    # The demo is for people: default to the model that draws something (tiny draws noise).
    d.set_defaults(model="toy")
    d.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    d.add_argument("--port", type=int, default=7860, help="TCP port to listen on")
    d.add_argument("--concurrency", type=int, default=1, help="generations run at once; other visitors queue")


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


@contextlib.contextmanager
def _discarded_on_failure(writer):
    """Remove the writer's partial file when the block fails (a success is published by the caller)."""
    try:
        yield writer
    except BaseException:
        writer.close(keep=False)
        raise


def cmd_generate(args: argparse.Namespace) -> int:
    from supergen.config import GenerationConfig
    from supergen.io import VideoWriter, write_json
    from supergen.parallel import distributed_session
    from supergen.request import check_request_for

    tiling = _config_from_args(TilingConfig, args)
    coherence = _config_from_args(CoherenceConfig, args)
    cache = _config_from_args(CacheConfig, args)
    _check_generate_args(args, cache)
    # Unknown names and sizes the model cannot take fail before any weights load (a folder's
    # configs are enough); a hub id is checked after loading, by check_request.
    planned = check_request_for(args.model, args.height, args.width, args.num_frames, tiling)
    image = None if args.image is None else _load_image(args.image)

    parallel = _config_from_args(ParallelConfig, args)
    # The same request the Python API and the demo run.
    config = GenerationConfig(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance,
        guidance_scale_2=args.guidance_2, seed=args.seed, tiling=tiling, coherence=coherence, cache=cache,
        parallel=parallel,
    )

    writer = VideoWriter(args.output, fps=args.fps, lazy=True)
    with distributed_session(parallel) as ctx, _discarded_on_failure(writer):
        request, result = _generate_in(ctx, args, config, planned, image, writer)
    # One process writes after generation; under torchrun rank 0 streams the decoded frames into the
    # (lazily opened) writer, and the file appears only here, after every rank has finished: a failure
    # anywhere before this point leaves no file behind.
    if not ctx.is_main:
        return 0
    if result.frames is not None:
        writer.append(result.frames)
    writer.close(keep=True)
    metrics = dict(result.metrics, output=args.output, prompt=args.prompt, seed=args.seed)
    if args.metrics_json:
        write_json(args.metrics_json, metrics)
    _report(args, request, metrics, cache)
    return 0


def _check_generate_args(args: argparse.Namespace, cache) -> None:
    """The output paths, the skip map's needs, the step count and the cache's schedule, before anything loads."""
    from supergen.io import check_output_path
    from supergen.samplers.schedule import refinement_steps

    check_output_path(args.output)
    if args.skip_map:
        check_output_path(args.skip_map, suffixes=(".png",))
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--skip-map draws with matplotlib: pip install 'supergen[bench]'") from None
        if not cache.enabled:
            raise ValueError("--skip-map needs the cache on: add --cache region and a --cache-threshold above 0")
    if args.metrics_json:
        check_output_path(args.metrics_json, suffixes=(".json",))
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    _check_run_args(args)
    cache.check_schedule(refinement_steps(args.steps, args.strength))


def _generate_in(ctx, args: argparse.Namespace, config, planned, image, writer):
    """Load the model on this rank's device and run ``config``; returns (the checked request, the result)."""
    from supergen.pipeline import SuperGenPipeline

    if ctx.enabled:
        _log_per_rank(args, ctx)
        ctx.ensure_same("command-line arguments", {k: v for k, v in vars(args).items() if k != "device"})
    started = time.perf_counter()
    device = args.device if args.device is not None or not ctx.enabled else ctx.device
    if planned is not None:
        _check_resources_before_loading(args, planned, config.tiling, device, ctx)
    pipe = SuperGenPipeline.from_pretrained(args.model, torch_dtype=_dtype(args.dtype), device=device)
    request = pipe.check_request(args.height, args.width, args.num_frames, config.tiling)
    logger.info("model %s loaded in %.1fs: %s", args.model, time.perf_counter() - started, pipe.adapter.describe())
    result = pipe.generate(config, image=image, context=ctx, max_memory=args.max_memory,
                           writer=writer if ctx.enabled else None)
    return request, result


def _report(args: argparse.Namespace, request, metrics: dict, cache) -> None:
    """The run's summary lines (and the skip map) on rank 0."""
    from supergen.io import write_skip_map
    from supergen.samplers.schedule import refinement_steps

    tiles = metrics["tiles"]
    refined = refinement_steps(args.steps, args.strength)
    ranks = ""
    if metrics["world_size"] > 1:
        ranks = (
            f"; {metrics['world_size']} ranks ({metrics['parallel_plan']['describe']}, {metrics['comm_scheme']}), "
            f"{max(metrics['comm_bytes_per_step']) / 1e6:.2f} MB/step/rank exchanged"
        )
    print(
        f"wrote {args.output}: {request.width}x{request.height}, {request.num_frames} frames; "
        f"{tiles['count']} tiles x {refined} refine steps (of {args.steps}), "
        f"{tiles['tile_steps_computed']}/{tiles['tile_steps_total']} "
        f"tile-steps computed; denoise {metrics['denoise_s']:.1f}s, decode {metrics['decode_s']:.1f}s, "
        f"total {metrics['wall_s']:.1f}s{ranks}"
    )
    if cache.enabled:
        print(
            f"cache {cache.mode} (threshold {cache.threshold:g}): {tiles['tile_steps_skipped']} of "
            f"{tiles['tile_steps_total']} tile-steps reused ({tiles['tile_steps_skipped'] / tiles['tile_steps_total']:.0%}), "
            f"{tiles['model_calls']} model calls"
        )
    if args.skip_map:
        write_skip_map(args.skip_map, metrics["cache"]["region_skip_map"],
                       title=f"{args.prompt[:40]}: cache {cache.mode}, threshold {cache.threshold:g}")


def _check_run_args(args: argparse.Namespace) -> None:
    """Flags the model is not needed for, checked before anything loads (the API checks them again)."""
    from supergen.resources import parse_memory
    from supergen.validation import check_seed, resolve_device

    if getattr(args, "fps", 1) < 1:
        raise ValueError(f"--fps {args.fps} must be >= 1")
    check_seed(getattr(args, "seed", 0))
    if getattr(args, "guidance", None) is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(f"--guidance {args.guidance} must be a finite number >= 0")
    if args.device is not None:
        resolve_device(args.device)
    if args.max_memory is not None:
        parse_memory(args.max_memory)


def _load_image(path: str):
    """The first frame for image-to-video models, or a one-line ``ValueError`` saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"--image {path!r} is not a file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path!r} is not a picture this install can read (PNG, JPEG, ...): {err}") from None


def _check_resources_before_loading(args: argparse.Namespace, request, tiling, device, ctx) -> None:
    """Refuse a request too big for this device (or for --max-memory) from the folder's files, before loading."""
    from supergen.resources import (
        agreed_budget,
        check_tiled_request,
        dtype_bytes_for,
        model_footprint_for,
        parse_memory,
        refused_together,
    )
    from supergen.pipeline import SuperGenPipeline
    from supergen.validation import resolve_device

    spec, footprint, hints = model_footprint_for(args.model)
    device = resolve_device(device) if device is not None else ctx.device
    guidance = args.guidance if args.guidance is not None else hints.get(
        "guidance_scale", SuperGenPipeline.DEFAULT_GUIDANCE_SCALE)
    budget = agreed_budget(device, ctx)
    try:
        check_tiled_request(
            spec, request, tiling, footprint, device=device, dtype_bytes=dtype_bytes_for(_dtype(args.dtype), device),
            max_memory=None if args.max_memory is None else parse_memory(args.max_memory), guidance=guidance > 1.0,
            budget=budget,
        )
    except ValueError as err:
        raise refused_together(ctx, err) from None


def _check_stream_before_loading(args: argparse.Namespace, config) -> None:
    """Frame size and memory of a stream from the model folder's files (a hub id is checked after loading)."""
    from supergen.resources import check_stream_request, dtype_bytes_for, model_footprint_for, parse_memory
    from supergen.validation import check_frame_size, default_device, resolve_device

    found = model_footprint_for(args.model)
    if found is None:
        return
    spec, footprint, hints = found
    native_h, native_w, _ = spec.native_size
    height = native_h if args.height is None else args.height
    width = native_w if args.width is None else args.width
    check_frame_size(spec.geometry, height, width)
    device = resolve_device(args.device) if args.device is not None else default_device()
    guidance = args.guidance if args.guidance is not None else hints.get("guidance_scale", 1.0)
    check_stream_request(
        spec, config, height, width, footprint, device=device, dtype_bytes=dtype_bytes_for(_dtype(args.dtype), device),
        guidance=guidance > 1.0, max_memory=None if args.max_memory is None else parse_memory(args.max_memory),
    )


def _log_per_rank(args: argparse.Namespace, ctx) -> None:
    """Rank-tagged log lines; ranks other than 0 keep to warnings unless DEBUG was asked for."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"%(levelname)s [rank {ctx.rank}] %(name)s: %(message)s"))
    if not ctx.is_main and args.log_level != "DEBUG":
        logging.getLogger("supergen").setLevel(logging.WARNING)


def stream_config_for(args: argparse.Namespace):
    """The stream flags given, over the model's recommended settings (supergen.json), over StreamConfig's."""
    from pathlib import Path

    from supergen.models import read_model_hints, resolve_model

    source = Path(resolve_model(args.model))
    hints = read_model_hints(source).get("stream", {}) if source.is_dir() else {}
    return _config_from_args(StreamConfig, args, base=StreamConfig(**hints))


def cmd_stream(args: argparse.Namespace) -> int:
    from supergen.io import VideoWriter, write_json

    config = stream_config_for(args)
    _check_stream_args(args, config)
    pipe = _load_stream_pipeline(args)
    stream = pipe.stream(
        args.prompt, num_blocks=args.blocks, stream=config, height=args.height, width=args.width,
        guidance_scale=args.guidance, negative_prompt=args.negative_prompt, seed=args.seed,
        max_memory=args.max_memory,
    )
    logger.info("streaming %s to %s", "until Ctrl-C" if args.blocks is None else f"{args.blocks} blocks", args.output)
    writer = VideoWriter(args.output, fps=args.fps)
    exit_code = _write_stream(stream, writer)
    # A stopped stream keeps what was made: the file is finalised and renamed into place.
    writer.close(keep=True)
    interrupted = exit_code != 0
    metrics = dict(stream.metrics, output=args.output, prompt=args.prompt, seed=args.seed, interrupted=interrupted)
    if args.metrics_json:
        write_json(args.metrics_json, metrics)
    print(
        f"wrote {args.output}: {writer.frames} frames in {len(metrics['blocks'])} blocks; "
        f"first frame after {metrics['time_to_first_frame_s'] or 0:.2f}s, {metrics['fps']:.1f} frames/s"
        + (" (interrupted)" if interrupted else "")
    )
    return exit_code


def _check_stream_args(args: argparse.Namespace, config) -> None:
    """What a stream can be refused for before its model loads (a hub id's sizes are checked after loading)."""
    from supergen.io import check_output_path
    from supergen.models import resolve_model

    check_output_path(args.output)
    if args.metrics_json:
        check_output_path(args.metrics_json, suffixes=(".json",))
    if args.blocks is not None and args.blocks < 1:
        raise ValueError(f"--blocks {args.blocks} must be >= 1 (leave it out for an endless stream)")
    _check_run_args(args)
    resolve_model(args.model)
    _check_stream_before_loading(args, config)


def _load_stream_pipeline(args: argparse.Namespace):
    """The model to stream with, and ``--transformer-weights`` in its transformer (read before the model loads)."""
    from supergen.pipeline import SuperGenPipeline

    if args.transformer_weights:
        from supergen.backbones.wan_convert import read_checkpoint

        checkpoint = read_checkpoint(args.transformer_weights)
    pipe = SuperGenPipeline.from_pretrained(args.model, torch_dtype=_dtype(args.dtype), device=args.device)
    if args.transformer_weights:
        from supergen.backbones.wan_convert import load_original_wan_checkpoint

        load_original_wan_checkpoint(pipe.pipe.transformer, checkpoint)
        logger.info("loaded transformer weights from %s", args.transformer_weights)
    return pipe


def _write_stream(stream, writer) -> int:
    """Append every block to ``writer`` until the stream ends (0) or is interrupted (the shell's 130 / 143).

    On any other error the partial file is discarded.
    """
    # `kill`, a job scheduler's timeout or a container stop send SIGTERM: treat it
    # like Ctrl-C, so the frames made so far are finalised instead of lost.
    restore = _sigterm_as_interrupt()
    try:
        with stream:
            for block in stream:
                writer.append(block.frames)
                m = block.metrics
                logger.info(
                    "block %d: %d frames in %.2fs (KV cache %.1f KiB)", block.index, m["frames"], m["latency_s"],
                    m["kv_cache_bytes"] / 1024,
                )
    except KeyboardInterrupt as exc:
        logger.warning("interrupted: keeping the %d frames made so far", writer.frames)
        # The shell's convention: 128 + the signal's number (SIGINT 2, SIGTERM 15).
        return 143 if isinstance(exc, Terminated) else 130
    except BaseException:
        writer.close(keep=False)
        raise
    finally:
        restore()
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that ``except KeyboardInterrupt`` cleanup runs."""


def _sigterm_as_interrupt():
    """Raise :class:`Terminated` on SIGTERM until the returned function restores the old handler.

    Only the main thread can install handlers; elsewhere (an embedding
    application's worker thread) this does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the demo needs Gradio: pip install 'supergen[demo]'") from None
    from supergen.demo import serve
    from supergen.models import resolve_model

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency} must be >= 1")
    _check_run_args(args)
    resolve_model(args.model)
    serve(args.model, host=args.host, port=args.port, device=args.device, concurrency=args.concurrency,
          dtype=_dtype(args.dtype), max_memory=args.max_memory)
    return 0


COMMANDS = {"generate": cmd_generate, "stream": cmd_stream, "demo": cmd_demo}


def _version() -> str:
    from supergen import __version__

    return f"supergen {__version__}"


# Built-in models whose operations take microseconds: extra intra-op threads only spin and wait
# (a 3-block toy stream: 1.0 frames/s with default threads on a shared 2-core host, 29.5 with one).
_SMALL_MODELS = ("tiny", "tiny-", "toy")


def configure_threads(threads: int | None, model: str = "") -> int:
    """Set torch's CPU threads: ``threads``, else this process's share of the CPUs it may use.

    Under torchrun the share is the usable CPUs divided by the processes on this
    host (``LOCAL_WORLD_SIZE``), so N processes do not start N x cores threads. An
    explicit ``OMP_NUM_THREADS`` outside torchrun is respected (torchrun sets it
    to 1 itself, which is too few on a large host).
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be >= 1")
    elif "OMP_NUM_THREADS" in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        return torch.get_num_threads()
    elif str(model).startswith(_SMALL_MODELS):
        threads = 1
    else:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, usable // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(threads)
    return threads


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "allocate" in str(err) and "memory" in str(err).lower()
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes end with one ``error:`` line and exit status 2, Ctrl-C with 130.

    Tracebacks are for bugs: a refused request prints one line unless
    ``--log-level DEBUG`` is given, which prints its traceback as well.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    # Diffusers and transformers are chatty at INFO; keep their warnings only.
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    debug = args.log_level == "DEBUG"
    prefix = f"supergen {args.command}"
    try:
        logger.debug("torch threads: %d", configure_threads(args.threads, args.model))
        return COMMANDS[args.command](args)
    except ValueError as err:
        if debug:
            logger.exception("refused")
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            logger.exception("interrupted")
        print(f"{prefix}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_out_of_memory(err):
            raise
        if debug:
            logger.exception("out of memory")
        print(f"{prefix}: error: out of memory ({str(err).strip().splitlines()[0][:200]}); the estimate before the "
              "run was too low for this device: use a smaller size, or pass --max-memory below what is free",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
