"""Model names, the built-in tiny backbones and the one loading path.

``tiny`` (alias ``tiny-wan``) is a small ``WanPipeline`` built from real
Diffusers/transformers classes with seeded random weights and a tokenizer made
offline with the ``tokenizers`` library. It is written once to a cache folder
in the Diffusers layout and then loaded with ``DiffusionPipeline.from_pretrained``,
the same code path as a real checkpoint in a local folder or on the hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Bump when a builder changes, so stale caches are rebuilt rather than reused.
TINY_FORMAT_VERSION = 1

# Words the offline BPE tokenizer is trained on: enough to give everyday prompts
# short token sequences; any other text still tokenizes (byte-level fallback).
_TOKENIZER_CORPUS = """
a an the of in on at over under with and or to from by into through above below near far
red green blue yellow orange purple pink white black gray grey brown golden silver dark bright
circle square triangle ball cube box star shape shapes line lines dot dots stripe stripes
moving moves move left right up down slowly quickly fast slow rotating spinning floating falling rising
sky sea ocean river lake forest mountain mountains city street road field desert snow rain sun moon
cat dog bird fish horse car train boat plane person people man woman child robot dragon
sunset sunrise night day morning evening cloud clouds water fire smoke light shadow wind
camera pan zoom view aerial close wide shot scene video cinematic detailed high quality 4k
background foreground texture gradient pattern painting photo realistic animation cartoon
"""


def cache_root() -> Path:
    """Folder where built-in models are written (``$SUPERGEN_CACHE`` or ``~/.cache/supergen``)."""
    return Path(os.environ.get("SUPERGEN_CACHE", Path.home() / ".cache" / "supergen"))


def _build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _TOKENIZER_CORPUS.split("\n") if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    # T5-style: every sequence ends with </s>, padding is id 0.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_wan(seed: int = 0):
    """Build the tiny ``WanPipeline`` (random weights, deterministic from ``seed``).

    Native size 64x96 pixels, 9 frames (3 latent frames of 8x12 cells,
    patch 1x2x2: 72 tokens). Small enough that a 3x-area tiled run takes seconds
    on a laptop CPU, while every class is the real Diffusers/transformers one.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ).eval()
        z_dim = 16
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        ).eval()
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=z_dim,
            out_channels=z_dim,
            text_dim=32,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=256,
        ).eval()
    # Wan's released Diffusers checkpoints use UniPC with flow sigmas.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return pipe


def build_toy_wan(seed: int = 0):
    """Build the *untrained* toy ``WanPipeline`` that ``scripts/train_toy_model.py`` trains.

    Native size 32x32 pixels, 9 frames: a VAE with 2x spatial and 2x temporal
    compression and 8 latent channels gives a 5x16x16 latent, and a 1x4x4
    patch makes that 80 tokens: small enough to train on a CPU in under an
    hour. A VAE with 4x spatial compression learned far too slowly for that
    budget (after 250 steps it still drew blurred blobs). The text
    encoder is the tiny model's UMT5 and stays frozen (random): the toy world
    has only a few dozen distinct words, and their embeddings are distinct.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tiny = build_tiny_wan(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        z_dim = 8
        vae = AutoencoderKLWan(
            base_dim=16,
            z_dim=z_dim,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
            scale_factor_spatial=2,
            scale_factor_temporal=2,
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 4, 4),
            num_attention_heads=4,
            attention_head_dim=24,
            in_channels=z_dim,
            out_channels=z_dim,
            text_dim=tiny.text_encoder.config.d_model,
            freq_dim=32,
            ffn_dim=256,
            num_layers=4,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=256,
        )
    # Small latents need less shift towards high noise than Wan's 480p default of 3-5.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=2.0
    )
    return WanPipeline(
        tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


TOY_NATIVE_SIZE = (32, 32, 9)


# Native (height, width, frames) of each built-in model, written beside the
# weights as supergen.json so the loader finds it like any checkpoint's hint.
TINY_NATIVE_SIZES = {"tiny-wan": (64, 96, 9)}


TINY_BUILDERS = {"tiny-wan": build_tiny_wan}
MODEL_ALIASES = {"tiny": "tiny-wan"}


# Trained models shipped inside the package (Diffusers folders written by
# scripts/train_toy_model.py); they load from their folder as they are.
SHIPPED_MODELS = {"toy": Path(__file__).resolve().parent / "assets" / "toy"}


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


def write_native_size(folder: str | os.PathLike, height: int, width: int, num_frames: int) -> None:
    """Record the size a checkpoint was trained at, for checkpoints that do not say it."""
    payload = {"native_height": height, "native_width": width, "native_num_frames": num_frames}
    (Path(folder) / NATIVE_SIZE_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def read_native_size(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    path = Path(folder) / NATIVE_SIZE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
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
