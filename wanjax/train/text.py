"""The mini text side: a WordLevel tokenizer over the caption vocabulary and a small random-init UMT5 encoder.

The mini UMT5 is **random-init and frozen**: it is the real `wanjax.model.t5.UMT5Encoder` architecture (relative
position buckets, gated-GELU FFN, RMSNorm) with a small config and weights drawn from a fixed seed, acting as a
fixed text feature map; the DiT learns to read it through its text embedding and cross-attention. Both ship in the
official layout (``google/umt5-xxl/tokenizer.json`` and ``models_t5_umt5-xxl-enc-bf16.pth``) and load through
`wanjax.text.PromptTokenizer` and `wanjax.io.t5_loader.load_t5_encoder` like the real ones.

Token ids: ``<pad>`` 0, ``</s>`` 1 (appended to every prompt, as umT5), ``<unk>`` 2, then the caption words
(lower-cased, sentence punctuation dropped, split on whitespace). Words outside the vocabulary (e.g. the official Chinese
negative prompt) become ``<unk>``.
"""

from __future__ import annotations

import json
import os

from flax import nnx

from wanjax.data.procedural import vocabulary
from wanjax.model.t5 import T5Config, UMT5Encoder, small_t5_config

SPECIALS = ("<pad>", "</s>", "<unk>")

#: The mini UMT5 (vocab rounded up to a multiple of 8; max_distance/eps are the umT5 values the loader assumes).
MINI_T5 = small_t5_config(
    vocab_size=64,
    dim=256,
    dim_ffn=512,
    num_heads=4,
    num_layers=2,
    num_buckets=32,
    max_distance=128,
    eps=1e-6,
    text_len=32,
)
T5_SEED = 1234


def build_tokenizer(words: list[str] | None = None):
    """A `tokenizers.Tokenizer` (WordLevel): lower-case, split on whitespace/punctuation, append ``</s>``,
    pad with ``<pad>``. ``words`` defaults to the procedural caption vocabulary."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = vocabulary() if words is None else list(words)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    # sentence punctuation and English-style commas (followed by a space) become spaces; other text (e.g. the
    # Chinese default negative prompt, whose commas ftfy turns into ASCII ones without spaces) stays one word per
    # whitespace-separated run, so it costs a single <unk> instead of filling text_len
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[.!?;:]|,(?= |$)"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.enable_padding(pad_id=0, pad_token="<pad>")
    return tok


def save_tokenizer(folder: str | os.PathLike, words: list[str] | None = None) -> str:
    """Write ``tokenizer.json`` (+ a small ``tokenizer_config.json``) into ``folder``; returns the json path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer(words)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "<pad>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 512,
            },
            f,
            indent=2,
        )
    return path


def mini_t5(cfg: T5Config = MINI_T5, seed: int = T5_SEED) -> UMT5Encoder:
    """The random-init mini UMT5 encoder (deterministic from ``seed``)."""
    if cfg.vocab_size < len(SPECIALS) + len(vocabulary()):
        raise ValueError(f"mini_t5: vocab_size {cfg.vocab_size} < {len(SPECIALS) + len(vocabulary())} tokens")
    return UMT5Encoder(cfg, rngs=nnx.Rngs(seed))
