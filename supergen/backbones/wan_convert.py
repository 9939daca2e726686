"""Load streaming (causal) Wan checkpoints published in the original Wan key layout.

Self-Forcing, CausVid and Rolling Forcing fine-tune Wan2.1-T2V-1.3B and ship
the generator's weights as a ``.pt`` (or ``.safetensors``) in the original
Wan layout (``blocks.0.self_attn.q.weight``...), usually nested under a
training wrapper: ``{"generator_ema": {"model.blocks.0...": ...}}``. Their
architecture is the plain Wan transformer; causality lives in the attention
mask, which :mod:`supergen.backbones.wan_stream` provides. So the weights load
into Diffusers' own ``WanTransformer3DModel`` once the keys are renamed, and
the renaming is Diffusers' own ``convert_wan_transformer_to_diffusers``; this
module only unwraps the training containers and prefixes around it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

#: Sub-dicts training code nests the weights under, in order of preference (EMA weights first).
CONTAINER_KEYS = ("generator_ema", "generator", "model_ema", "state_dict", "model", "module")
#: Prefixes wrappers add in front of the Wan keys (DDP, FSDP, torch.compile, the diffusion wrapper's `.model`).
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "model.")
#: Keys every original-layout Wan transformer has; used to tell weights from containers.
_WAN_MARKERS = ("patch_embedding.weight", "head.head.weight")


def _is_wan_layout(state_dict: dict) -> bool:
    return all(marker in state_dict for marker in _WAN_MARKERS)


def _strip_prefixes(state_dict: dict) -> dict:
    if any("model.diffusion_model." in k for k in state_dict):
        return state_dict  # Diffusers' converter strips this prefix itself
    while not _is_wan_layout(state_dict):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def unwrap_checkpoint(checkpoint: dict) -> dict:
    """The flat original-layout state dict inside a training checkpoint."""
    current = checkpoint
    while not any(isinstance(v, torch.Tensor) for v in current.values()):
        for key in CONTAINER_KEYS:
            if isinstance(current.get(key), dict):
                current = current[key]
                break
        else:
            raise ValueError(
                f"no weights found in the checkpoint: top-level keys {sorted(current)[:8]}; expected tensors or one of "
                f"{', '.join(CONTAINER_KEYS)}"
            )
    tensors = {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}
    return _strip_prefixes(tensors)


def convert_original_wan_state_dict(checkpoint: dict) -> dict:
    """Original-layout Wan transformer weights (possibly wrapped) -> Diffusers ``WanTransformer3DModel`` keys."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state_dict = unwrap_checkpoint(checkpoint)
    if not _is_wan_layout(state_dict) and not any("model.diffusion_model." in k for k in state_dict):
        raise ValueError(
            "this does not look like an original-layout Wan transformer: keys "
            f"{', '.join(_WAN_MARKERS)} are missing (first keys: {', '.join(list(state_dict)[:4])})"
        )
    # The converter pops from the dict it is given: hand it a copy.
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a ``.safetensors`` or torch ``.pt``/``.pth``/``.bin`` file (tensors only, no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError on a damaged header
            raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file: {err}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as err:
        # torch's own message suggests weights_only=False, i.e. running the file's code: never pass that on.
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
            reason = "it holds Python objects besides tensors"
        else:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} is not a plain tensor file ({reason[:160]}); SuperGen reads checkpoints "
            "without running code from them: convert it to .safetensors where it came from, or use one that "
            "holds only tensors"
        ) from None


def load_original_wan_checkpoint(transformer: torch.nn.Module, checkpoint: dict | str | os.PathLike) -> None:
    """Load an original-layout (e.g. Self-Forcing / CausVid / Rolling Forcing) checkpoint into ``transformer``.

    Every transformer weight must be present and of the right shape; a
    mismatch (a checkpoint for another model size) fails with the offending keys.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    converted = convert_original_wan_state_dict(checkpoint)
    own = transformer.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    wrong = sorted(k for k in set(own) & set(converted) if own[k].shape != converted[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ValueError(
            f"checkpoint does not fit {type(transformer).__name__} "
            f"({transformer.config.num_layers} layers, dim {transformer.config.num_attention_heads * transformer.config.attention_head_dim}): "
            + "; ".join(parts)
        )
    transformer.load_state_dict({k: v.to(own[k].dtype) for k, v in converted.items()}, strict=True)
