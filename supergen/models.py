"""Model names, the built-in tiny backbones and the one loading path.

``tiny`` (alias ``tiny-wan``), ``tiny-cogvideox``, ``tiny-hunyuanvideo`` and
``tiny-ltx`` are small pipelines built from the real Diffusers/transformers
classes (the same transformer, VAE, text encoder and scheduler classes as the
released checkpoints, a few layers wide) with seeded random weights and
tokenizers made offline with the ``tokenizers`` library. Each is written once
to a cache folder in the Diffusers layout and then loaded with
``DiffusionPipeline.from_pretrained``, the same code path as a real checkpoint
in a local folder or on the hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from supergen.backbones import CogVideoXAdapter, HunyuanVideoAdapter, LTXAdapter, WanAdapter
from supergen.backbones.cogvideox import build_tiny_cogvideox, build_tiny_cogvideox_i2v
from supergen.backbones.hunyuan import build_tiny_hunyuanvideo
from supergen.backbones.ltx import build_tiny_ltx
from supergen.backbones.tiny import build_tokenizer
from supergen.backbones.wan import build_tiny_wan, build_tiny_wan_i2v, build_toy_wan
from supergen.io import normal_modes

logger = logging.getLogger(__name__)

# Bump when a builder changes, so stale caches are rebuilt rather than reused.
TINY_FORMAT_VERSION = 1


def cache_root() -> Path:
    """Folder where built-in models are written (``$SUPERGEN_CACHE`` or ``~/.cache/supergen``)."""
    return Path(os.environ.get("SUPERGEN_CACHE", Path.home() / ".cache" / "supergen"))


TOY_NATIVE_SIZE = (32, 32, 9)


# Native (height, width, frames) of each built-in model, written beside the
# weights as supergen.json so the loader finds it like any checkpoint's hint.
TINY_NATIVE_SIZES = {
    "tiny-wan": (64, 96, 9),
    "tiny-wan-i2v": (64, 96, 9),
    "tiny-cogvideox": (64, 96, 9),
    "tiny-cogvideox-i2v": (64, 96, 9),
    "tiny-hunyuanvideo": (64, 96, 9),
    "tiny-ltx": (128, 192, 9),
}


TINY_BUILDERS = {
    "tiny-wan": build_tiny_wan,
    "tiny-wan-i2v": build_tiny_wan_i2v,
    "tiny-cogvideox": build_tiny_cogvideox,
    "tiny-cogvideox-i2v": build_tiny_cogvideox_i2v,
    "tiny-hunyuanvideo": build_tiny_hunyuanvideo,
    "tiny-ltx": build_tiny_ltx,
}
MODEL_ALIASES = {"tiny": "tiny-wan"}


# Trained models shipped inside the package (Diffusers folders written by
# scripts/train_toy_model.py); they load from their folder as they are.
# ``toy-causal`` is ``toy`` fine-tuned for block-causal streaming (scripts/train_toy_causal.py).
SHIPPED_MODELS = {name: Path(__file__).resolve().parent / "assets" / name for name in ("toy", "toy-causal")}


def known_model_names() -> list[str]:
    return sorted([*TINY_BUILDERS, *MODEL_ALIASES, *SHIPPED_MODELS])


def shipped_model_path(name: str) -> Path:
    """Folder of a model shipped with the package, e.g. ``toy``."""
    folder = SHIPPED_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"the shipped model {name!r} is missing from {folder}: this install has no weights for it. "
            "Reinstall the package, or train it with scripts/train_toy_model.py --output " + str(folder)
        )
    return folder


def tiny_model_path(name: str, seed: int = 0) -> Path:
    """Return the folder of a built-in model, building it on first use.

    Concurrent callers (e.g. every rank of a ``torchrun`` job) each build into a
    private temporary folder and rename it into place; the first rename wins
    and the others discard their copy, so no reader ever sees a partial folder.
    """
    name = MODEL_ALIASES.get(name, name)
    if name not in TINY_BUILDERS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models are {', '.join(known_model_names())}")
    target = cache_root() / f"{name}-v{TINY_FORMAT_VERSION}-seed{seed}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building built-in model %s into %s", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        TINY_BUILDERS[name](seed=seed).save_pretrained(tmp)
        height, width, frames = TINY_NATIVE_SIZES[name]
        write_native_size(tmp, height, width, frames)
        normal_modes(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


NATIVE_SIZE_FILE = "supergen.json"


def write_native_size(folder: str | os.PathLike, height: int, width: int, num_frames: int,
                      guidance_scale: float | None = None) -> None:
    """Record the size a checkpoint was trained at (and, optionally, the CFG scale it works best with)."""
    payload = {"native_height": height, "native_width": width, "native_num_frames": num_frames}
    if guidance_scale is not None:
        payload["guidance_scale"] = float(guidance_scale)
    (Path(folder) / NATIVE_SIZE_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def read_model_hints(folder: str | os.PathLike) -> dict:
    """The checkpoint's ``supergen.json`` (empty when it has none)."""
    path = Path(folder) / NATIVE_SIZE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_native_size(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    data = read_model_hints(folder)
    if "native_height" not in data:
        return None
    return int(data["native_height"]), int(data["native_width"]), int(data["native_num_frames"])


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a ``--model`` value into something ``from_pretrained`` accepts.

    Built-in names map to their cache folder; an existing folder must hold a
    ``model_index.json``; anything else must look like a hub id (``org/name``).
    """
    text = str(name_or_path)
    if text in SHIPPED_MODELS:
        return str(shipped_model_path(text))
    if MODEL_ALIASES.get(text, text) in TINY_BUILDERS:
        return str(tiny_model_path(text))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ValueError(
                f"{text!r} is not a Diffusers pipeline folder: it has no model_index.json. "
                "Point --model at the folder that DiffusionPipeline.save_pretrained wrote."
            )
        return str(path)
    if text.count("/") == 1 and all(part and not part.startswith(".") for part in text.split("/")):
        return text
    raise ValueError(
        f"unknown model {text!r}: not a built-in name ({', '.join(known_model_names())}), "
        "not an existing folder, and not a hub id of the form org/name"
    )


def load_diffusers_pipeline(name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """Load any Diffusers pipeline by built-in name, local folder or hub id."""
    from diffusers import DiffusionPipeline

    source = resolve_model(name_or_path)
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    return DiffusionPipeline.from_pretrained(source, **kwargs)


# --- real-size transformers with random weights, for GPU timings ---------------------------------
# Each entry: the released checkpoint's transformer config (the Diffusers defaults where they
# are that config) and its native size. The text encoders and VAEs around it are tiny stand-ins
# with the real output widths and compression factors: a tiled step only times the transformer.
REAL_CONFIGS: dict[str, dict] = {
    "wan2.1-1.3b": dict(
        family="wan",
        native=WanAdapter.profile.native_sizes["wan2.1-1.3b"],
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                         out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                         cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    ),
    "cogvideox-5b": dict(
        family="cogvideox",
        native=CogVideoXAdapter.profile.native_sizes["cogvideox-5b"],
        transformer=dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                         time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_height=60, sample_width=90,
                         sample_frames=49, patch_size=2, use_rotary_positional_embeddings=True),
    ),
    "hunyuanvideo": dict(family="hunyuanvideo", native=HunyuanVideoAdapter.profile.native_sizes["hunyuanvideo"],
                         transformer=dict()),
    "ltx-video": dict(family="ltx", native=LTXAdapter.profile.native_sizes["ltx-video"], transformer=dict()),
}


def build_random_pipeline(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0, *, transformer_overrides: dict | None = None, released_vae: bool = False):
    """A Diffusers pipeline around a real-size transformer with random weights, built on ``device``.

    Weights are initialised directly on the device in ``dtype`` (no host copy
    of a 13B model). Text encoders are one-layer models with the real output
    width (T5 4096, Llama 4096 + CLIP 768) and the real sequence lengths; the
    VAE is a small one with the real latent channels and compression, so
    ``SuperGenPipeline.from_pipe`` tiles it exactly as the released model, but
    decoded pixels mean nothing. Use ``device="meta"`` to inspect shapes only.

    Args:
        transformer_overrides: transformer config fields that replace the
            released ones (e.g. fewer layers: the same build path at a size a
            CPU runs in seconds).
        released_vae: build the VAE in its released configuration (Wan only:
            ``AutoencoderKLWan``'s defaults are Wan2.1's VAE), so decode time
            and memory are those of the real model.
    """
    if name not in REAL_CONFIGS:
        raise ValueError(f"unknown real configuration {name!r}; known: {', '.join(REAL_CONFIGS)}")
    spec = REAL_CONFIGS[name]
    if released_vae and spec["family"] != "wan":
        raise ValueError(f"released_vae is only available for the Wan configurations, not {name!r}")
    make_scheduler, make_pipeline = _RANDOM_FAMILIES[spec["family"]]
    transformer_config = {**spec["transformer"], **(transformer_overrides or {})}
    tokenizer = build_tokenizer()
    # Schedulers hold small CPU tables: built outside the device context (they cannot live on "meta").
    scheduler = make_scheduler()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            return make_pipeline(transformer_config, tokenizer, scheduler, released_vae)
    finally:
        torch.set_default_dtype(previous)


# --- one builder per family: (scheduler, pipeline around a real-size transformer) -------------------------


def _real_t5(tokenizer):
    """One T5 layer with the real output width (4096), so text embeddings have the released shape."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=64, num_layers=1,
                                   num_heads=1, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _random_wan(transformer_config, tokenizer, scheduler, released_vae):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(**transformer_config).eval()
    small_vae = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae = AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True],
                           **({} if released_vae else small_vae)).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=_real_t5(tokenizer), vae=vae, transformer=transformer,
                       scheduler=scheduler)


def _cogvideox_scheduler():
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                 timestep_spacing="trailing", clip_sample=False)


def _random_cogvideox(transformer_config, tokenizer, scheduler, released_vae):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(**transformer_config).eval()
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1,
                                 norm_num_groups=4).eval()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_real_t5(tokenizer), vae=vae, transformer=transformer,
                             scheduler=scheduler)


def _hunyuan_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=7.0)


def _random_hunyuanvideo(transformer_config, tokenizer, scheduler, released_vae):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    transformer = HunyuanVideoTransformer3DModel(**transformer_config).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4).eval()
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=32, num_key_value_heads=1,
                                   max_position_embeddings=512, pad_token_id=0)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=12,
                                        max_position_embeddings=77, bos_token_id=1, eos_token_id=1)).eval()
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=clip, tokenizer_2=tokenizer)


def _ltx_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                           base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)


def _random_ltx(transformer_config, tokenizer, scheduler, released_vae):
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(**transformer_config).eval()
    vae = AutoencoderKLLTXVideo(latent_channels=128, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1)).eval()
    return LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=_real_t5(tokenizer), tokenizer=tokenizer,
                       transformer=transformer)


_RANDOM_FAMILIES = {
    "wan": (_wan_scheduler, _random_wan),
    "cogvideox": (_cogvideox_scheduler, _random_cogvideox),
    "hunyuanvideo": (_hunyuan_scheduler, _random_hunyuanvideo),
    "ltx": (_ltx_scheduler, _random_ltx),
}
