"""Helpers of the tiny built-in models (every adapter's ``build_tiny_*``): an offline tokenizer and a small T5.

Real Diffusers/transformers classes at tiny sizes, deterministic from a seed,
so the whole engine runs and is tested without any download.
"""

from __future__ import annotations

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


def build_tokenizer(vocab_size: int = 512, extra_corpus: str = "", extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained offline on a small word list.

    ``extra_corpus`` adds text that must tokenize into few tokens (HunyuanVideo's
    prompt template); ``extra_special`` adds tokens kept whole (its chat markers).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in (_TOKENIZER_CORPUS + extra_corpus).split("\n") if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    # T5-style: every sequence ends with </s>, padding is id 0.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_t5(tokenizer, d_model: int = 32, umt5: bool = False):
    """A tiny T5 encoder (UMT5's with ``umt5``, as Wan uses), random weights from the current RNG."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    model, config = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return model(
        config(
            vocab_size=len(tokenizer),
            d_model=d_model,
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
