"""Prompt tokenization and text encoding for Wan2.2 (umT5), no network access.

Mirrors the official ``T5EncoderModel.__call__`` / ``HuggingfaceTokenizer(seq_len=512, clean='whitespace')`` and
diffusers ``_get_t5_prompt_embeds``:

1. clean each prompt (``ftfy.fix_text`` when ftfy is installed, HTML unescape twice, strip, collapse whitespace);
2. tokenize with special tokens (EOS appended), truncate to ``text_len`` and pad to ``text_len`` with the pad id;
3. run the encoder on the padded ids with the padding mask;
4. keep each prompt's first ``length`` vectors (``u[:len]``); the rest are zeros.

The DiT side zero-pads the context to ``text_len`` (512); `encode_prompts` can do it with ``pad_to``.

Public API: `clean_prompt`, `PromptTokenizer`, `TokenizedPrompts`, `find_tokenizer_dir`, `encode_prompts`.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import re

# Whitespace as the `regex` module's \s (which the official/diffusers cleaners use): Python's `re` also counts the
# information separators U+001C..U+001F, which `regex` does not.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")

log = logging.getLogger(__name__)
_warned_ftfy = False

_TOKENIZER_SUBDIRS = ("", "tokenizer", os.path.join("google", "umt5-xxl"), "umt5-xxl")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def clean_prompt(text: str, mode: str | None = "whitespace") -> str:
    """Clean a prompt as the official tokenizer wrapper (``clean='whitespace'``) and diffusers ``prompt_clean``.

    ``mode`` is ``'whitespace'`` (the Wan default), ``'lower'`` (same, lower-cased) or None (no cleaning).
    ``ftfy.fix_text`` is applied when ftfy is installed; otherwise a warning is logged once (prompts with mojibake
    may then tokenize differently from the reference).
    """
    global _warned_ftfy
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    if mode is None:
        return text
    if mode not in ("whitespace", "lower"):
        raise ValueError(f"clean_prompt: mode must be 'whitespace', 'lower' or None, got {mode!r}")
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        if not _warned_ftfy:
            log.warning(
                "ftfy is not installed: prompts are cleaned without ftfy.fix_text (the official code "
                "applies it); install ftfy for exact parity on broken unicode"
            )
            _warned_ftfy = True
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if mode == "lower" else text


def find_tokenizer_dir(path: str | os.PathLike) -> str:
    """Locate the tokenizer folder under a checkpoint folder.

    Accepts the tokenizer folder itself, a diffusers model folder (``tokenizer/``) or the official Wan folder
    (``google/umt5-xxl/``). Raises ``FileNotFoundError`` listing the places searched.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".json"):
        return os.path.dirname(path) or "."
    tried = []
    for sub in _TOKENIZER_SUBDIRS:
        d = os.path.join(path, sub) if sub else path
        tried.append(d)
        if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f)) for f in _TOKENIZER_FILES):
            return d
    raise FileNotFoundError(f"{path}: no tokenizer found; looked for {list(_TOKENIZER_FILES)} in {tried}")


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids and padding mask [B, text_len] (int32), per-prompt lengths [B] and truncation flags [B]."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray


class PromptTokenizer:
    """umT5 tokenizer wrapper: clean -> tokenize (+EOS) -> truncate/pad to ``text_len``. No network.

    Loads ``tokenizer.json`` with the ``tokenizers`` library when present; otherwise falls back to
    ``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)`` (e.g. only ``spiece.model``).
    """

    def __init__(self, path: str | os.PathLike, text_len: int = 512, clean: str | None = "whitespace"):
        if text_len < 1:
            raise ValueError(f"PromptTokenizer: text_len must be >= 1, got {text_len}")
        self.text_len = text_len
        self.clean = clean
        path = os.fspath(path)
        folder = find_tokenizer_dir(path)
        tj = path if (os.path.isfile(path) and path.endswith(".json")) else os.path.join(folder, "tokenizer.json")
        self.source = tj if os.path.isfile(tj) else folder
        self._hf = None
        if os.path.isfile(tj):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(tj)
            pad_id = tok.padding["pad_id"] if tok.padding else tok.token_to_id("<pad>")
            if pad_id is None:
                raise ValueError(f"{tj}: tokenizer has no padding config and no '<pad>' token; cannot pad")
            pad_token = tok.id_to_token(pad_id)
            tok.enable_truncation(max_length=text_len)
            tok.enable_padding(length=text_len, pad_id=pad_id, pad_token=pad_token)
            self._tok = tok
            self.pad_id = int(pad_id)
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ImportError(
                    f"{folder}: has no tokenizer.json, and reading spiece.model needs transformers (not installed)"
                ) from None
            self._hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self._tok = None
            self.pad_id = int(self._hf.pad_token_id)

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        """Tokenize one prompt or a list. Prompts longer than ``text_len`` tokens are truncated with a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("PromptTokenizer: got an empty list of prompts")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(
                f"PromptTokenizer: prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}"
            )
        texts = [clean_prompt(p, self.clean) for p in prompts]
        if self._tok is not None:
            encs = self._tok.encode_batch(texts, add_special_tokens=True)
            ids = np.array([e.ids for e in encs], dtype=np.int32)
            mask = np.array([e.attention_mask for e in encs], dtype=np.int32)
            truncated = np.array([len(e.overflowing) > 0 for e in encs])
        else:
            out = self._hf(
                texts,
                padding="max_length",
                truncation=True,
                max_length=self.text_len,
                add_special_tokens=True,
                return_attention_mask=True,
                return_overflowing_tokens=False,
                return_length=False,
            )
            ids = np.asarray(out["input_ids"], dtype=np.int32)
            mask = np.asarray(out["attention_mask"], dtype=np.int32)
            full = self._hf(texts, add_special_tokens=True, truncation=False)["input_ids"]
            truncated = np.array([len(f) > self.text_len for f in full])
        if ids.shape != (len(texts), self.text_len):
            raise RuntimeError(
                f"PromptTokenizer: tokenizer returned ids of shape {ids.shape}, expected {(len(texts), self.text_len)}"
            )
        for i in np.flatnonzero(truncated):
            log.warning(
                "prompt %d is longer than %d tokens and was truncated (as the reference does)", i, self.text_len
            )
        return TokenizedPrompts(ids=ids, mask=mask, lengths=mask.sum(axis=1).astype(np.int32), truncated=truncated)


@nnx.jit
def _run_encoder(model, ids, mask):
    return model(ids, mask)


def encode_prompts(
    encoder, tokenizer: PromptTokenizer, prompts: str | Sequence[str], *, pad_to: int | None = None
) -> tuple[jax.Array, np.ndarray]:
    """Encode prompts -> (context [B, L, dim], lengths [B]).

    The encoder runs on ids padded to ``tokenizer.text_len`` (fixed shape, one compilation). Row ``b`` of the
    result holds the first ``lengths[b]`` output vectors and zeros after them, as the reference trims each output
    to its length and pads with zeros. ``L`` is ``max(lengths)`` unless ``pad_to`` is given (e.g. 512, the DiT's
    ``text_len``), in which case the context is zero-padded to exactly ``pad_to``.
    """
    tok = tokenizer(prompts)
    out = _run_encoder(encoder, jnp.asarray(tok.ids), jnp.asarray(tok.mask))
    lmax = int(tok.lengths.max())
    length = lmax if pad_to is None else int(pad_to)
    if length < lmax:
        raise ValueError(f"encode_prompts: pad_to={pad_to} is shorter than the longest prompt ({lmax} tokens)")
    keep = np.arange(out.shape[1])[None, :] < tok.lengths[:, None]
    ctx = jnp.where(jnp.asarray(keep)[:, :, None], out, jnp.zeros((), out.dtype))
    if length <= ctx.shape[1]:
        ctx = ctx[:, :length]
    else:
        ctx = jnp.pad(ctx, ((0, 0), (0, length - ctx.shape[1]), (0, 0)))
    return ctx, tok.lengths
