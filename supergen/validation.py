"""Argument checks of the Python API, shared by the CLI and the demo; they run before any model work.

A wrong *type* raises ``TypeError``, a wrong *value* ``ValueError``; both
name the argument, the value given and what is accepted, so that a mistake
surfaces as one readable line instead of an ``IndexError`` deep in a sampler.
The CLI turns ``ValueError`` into ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)

# What torch.Generator.manual_seed accepts (a 64-bit seed, negative ones wrap around).
SEED_RANGE = (-(2**63), 2**64 - 1)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) or len(value) < 40 else "a str"


def check_int(name: str, value: Any, minimum: int | None = None, hint: str = "", optional: bool = False) -> None:
    """``value`` must be an ``int`` (not a bool, float or str) and at least ``minimum``."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {_kind(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}{hint}")


def check_number(name: str, value: Any, minimum: float | None = None, optional: bool = False) -> None:
    """``value`` must be a finite real number (int or float, not a bool or str), at least ``minimum``."""
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got {_kind(value)}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ValueError(f"{name}={value!r} must be a finite number{f' >= {minimum:g}' if minimum is not None else ''}")


def check_prompt(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be one string, got a {type(value).__name__} of {len(value)}: batches of prompts are not "
            "supported; call once per prompt"
        )
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string{' or None' if optional else ''}, got {_kind(value)}")


def check_seed(seed: Any) -> None:
    check_int("seed", seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(f"seed={seed} is out of range: torch seeds are 64-bit integers ({low}..{high})")


def check_instance(name: str, value: Any, cls: type, optional: bool = True) -> None:
    """Configs are typed objects: a dict gets a hint to build the config from it."""
    if value is None and optional:
        return
    if not isinstance(value, cls):
        hint = f"; build one with {cls.__name__}(**{{...}})" if isinstance(value, dict) else ""
        raise TypeError(f"{name} must be a {cls.__name__}{' or None' if optional else ''}, got {type(value).__name__}{hint}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_kind(value)}")


def check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_target_size(height: Any, width: Any, num_frames: Any, frames_hint: str = "") -> None:
    """Types and signs of a requested size (``None``: the model's default); the geometry is checked later."""
    for name, value in (("height", height), ("width", width)):
        check_int(name, value, minimum=1, hint=" (pixels)", optional=True)
    check_int("num_frames", num_frames, minimum=1, hint=frames_hint, optional=True)


def check_frame_size(geometry, height: Any, width: Any) -> None:
    """A stream's frame size: positive multiples of VAE x patch (any size at or above one patch works)."""
    mult_h, mult_w = geometry.pixel_multiple
    for name, value, mult in (("height", height, mult_h), ("width", width, mult_w)):
        if not isinstance(value, int) or value < mult or value % mult:
            raise ValueError(
                f"{name} {value} is not a positive multiple of {mult} (VAE {geometry.scale_spatial} x patch "
                f"{mult // geometry.scale_spatial})"
            )


def check_call_arguments(
    *,
    prompt,
    negative_prompt,
    num_inference_steps,
    guidance_scale,
    guidance_scale_2,
    seed,
    generator,
    tiling,
    cache,
    parallel,
    max_sequence_length,
    progress,
    coherence=None,
) -> None:
    """The arguments of :meth:`SuperGenPipeline.__call__` that need no model to check."""
    from supergen.config import CacheConfig, CoherenceConfig, ParallelConfig, TilingConfig

    check_prompt("prompt", prompt)
    check_prompt("negative_prompt", negative_prompt, optional=True)
    check_int("num_inference_steps", num_inference_steps, minimum=1)
    check_number("guidance_scale", guidance_scale, minimum=0, optional=True)
    check_number("guidance_scale_2", guidance_scale_2, minimum=0, optional=True)
    check_seed(seed)
    check_generator(generator)
    check_instance("tiling", tiling, TilingConfig)
    check_instance("coherence", coherence, CoherenceConfig)
    check_instance("cache", cache, CacheConfig)
    check_instance("parallel", parallel, ParallelConfig)
    check_int("max_sequence_length", max_sequence_length, minimum=1, optional=True)
    check_bool("progress", progress)


def check_stream_arguments(*, prompt, negative_prompt, num_blocks, stream, height, width, guidance_scale, seed,
                           generator, max_sequence_length) -> None:
    """The arguments of :meth:`SuperGenPipeline.stream` that need no model to check."""
    from supergen.config import StreamConfig

    check_prompt("prompt", prompt)
    check_prompt("negative_prompt", negative_prompt, optional=True)
    check_int("num_blocks", num_blocks, minimum=1, hint=" (None: an endless stream)", optional=True)
    check_instance("stream", stream, StreamConfig)
    check_int("height", height, minimum=1, hint=" (pixels)", optional=True)
    check_int("width", width, minimum=1, hint=" (pixels)", optional=True)
    check_number("guidance_scale", guidance_scale, minimum=0, optional=True)
    check_seed(seed)
    check_generator(generator)
    check_int("max_sequence_length", max_sequence_length, minimum=1, optional=True)


def default_device() -> torch.device:
    """Where a run goes when no device is named: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: Any) -> torch.device:
    """A ``torch.device`` this process can use, or a ``ValueError`` saying why not (before any weights load)."""
    if isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device
    else:
        raise TypeError(f"device must be a str or torch.device, got {_kind(device)}")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {text!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {text!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, or install "
                "a CUDA build of torch on a GPU host"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible (cuda:0..)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {text!r}: Apple's MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device {text!r}: SuperGen runs on cpu, cuda or mps, not {dev.type}")
    return dev


def warn_long_prompt(pipeline, prompt: str, limit: int) -> None:
    """Say so when the text encoder will cut the prompt (Diffusers truncates silently)."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is None or not prompt:
        return
    count = len(tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])
    if count > limit:
        logger.warning(
            "the prompt is %d tokens long; the text encoder reads only the first %d, the rest (%d characters in all) "
            "is dropped: shorten it or raise max_sequence_length where the model allows", count, limit, len(prompt),
        )


def warn_small_tiles(tile_hw: tuple[int, int], native_hw: tuple[int, int]) -> None:
    """Tiles below the native size show the model less than it was trained on: allowed, but rarely wanted."""
    small = [f"{name} {t} < native {n}" for name, t, n in zip(("tile_height", "tile_width"), tile_hw, native_hw) if t < n]
    if small:
        logger.warning(
            "tiles smaller than the model's native size (%s): each tile is generated as a whole video of that small "
            "size, which defeats tiled refinement (more tiles, repeated content); leave the tile size at its default",
            ", ".join(small),
        )
