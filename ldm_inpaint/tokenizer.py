"""The CLIP byte-level BPE tokenizer (Radford et al. 2021, after GPT-2's byte-level BPE) as the pipelines call it.

Tokenizing is left to transformers' `CLIPTokenizer` (a runtime dependency for this file only): diffusers uses it,
so using it too keeps every id equal. This file provides
- the vocabulary files: `write_vocab_files` derives `vocab.json` + `merges.txt`, in the format of the official
  Stable Diffusion repos, from the BPE list bundled with open_clip (`data/bpe_simple_vocab_16e6.txt.gz`);
  `write_tokenizer_folder` adds the two config files, so complete tokenizer folders can be built offline;
- `load_tokenizer(folder)` for a diffusers `tokenizer/` or `tokenizer_2/` folder;
- `tokenize(tokenizer, prompts)`: the exact call of diffusers' `encode_prompt`, (B, 77) ids.

The two SDXL tokenizers differ only in the pad token: `<|endoftext|>` (49407) for CLIP ViT-L/14 and `!` (0) for
OpenCLIP ViT-bigG, reproducing open_clip's zero padding. Pad positions are not masked in the UNet's
cross-attention, so the pad id changes the conditioning.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

VOCAB_GZ = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"  # id 49406
EOS_TOKEN = "<|endoftext|>"  # id 49407
MAX_LENGTH = 77  # model_max_length of every official SD tokenizer: BOS + 75 tokens + EOS
# CLIP keeps the first 49152 - 256 - 2 merges of the list: 256 byte tokens (each also with '</w>') plus the
# merges plus the two special tokens make the 49408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 (control characters, space, ...) are shifted to chr(256 + n) so that BPE never sees whitespace.
    The order matters: it is the order of the first 256 vocabulary ids (printable bytes first, '!' = 0)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _merges() -> list[str]:
    """The merges ("a b" lines) CLIP uses; the first line of the file is a version header."""
    with gzip.open(VOCAB_GZ, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[1:1 + NUM_MERGES]


def write_vocab_files(dst_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` into `dst_dir` (created if needed) and return their paths.

    vocab: the 256 byte characters, the same with '</w>' (end of word), one token per merge, then
    `<|startoftext|>` 49406 and `<|endoftext|>` 49407. Written like the official files: one line of JSON with
    sorted keys and raw (not \\u-escaped) characters; merges.txt is `#version: 0.2` then one merge a line."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    merges = _merges()
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, "the BPE list does not give CLIP's 49408 distinct tokens"
    vocab_path, merges_path = dst / "vocab.json", dst / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges), encoding="utf-8")
    return vocab_path, merges_path


def _special_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer_folder(dst_dir: str | os.PathLike, pad_token: str = EOS_TOKEN) -> Path:
    """Write a complete tokenizer folder as in the official SD repos: vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json (the SDXL-base files). `pad_token`: `"<|endoftext|>"` for
    SD 1.5 and SDXL `tokenizer/`, `"!"` for SDXL `tokenizer_2/`. Returns the folder."""
    dst = Path(dst_dir)
    write_vocab_files(dst)
    tokens = {"bos_token": _special_token(BOS_TOKEN), "eos_token": _special_token(EOS_TOKEN),
              "pad_token": pad_token, "unk_token": _special_token(EOS_TOKEN)}
    added = lambda t: {"__type": "AddedToken", **t} if isinstance(t, dict) else t  # noqa: E731
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer",
              **{k: added(v) for k, v in tokens.items()}}
    (dst / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    return dst


def load_tokenizer(folder: str | os.PathLike):
    """transformers' `CLIPTokenizer` from a tokenizer folder holding `vocab.json` + `merges.txt` or
    `tokenizer.json`, and `tokenizer_config.json` (it sets the pad token and model_max_length). Raises
    ValueError naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder not found: {folder}")
    has_vocab = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_vocab and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer vocabulary (needs vocab.json + merges.txt, or tokenizer.json); "
                         f"ldm_inpaint.tokenizer.write_tokenizer_folder writes the CLIP files")
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder}: tokenizer_config.json is missing (it sets the pad token and "
                         f"model_max_length 77)")
    from transformers import CLIPTokenizer  # imported here: only the tokenizer needs transformers

    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.model_max_length > MAX_LENGTH:
        raise ValueError(f"{folder}/tokenizer_config.json: model_max_length {tokenizer.model_max_length} exceeds "
                         f"CLIP's {MAX_LENGTH} positions (is model_max_length missing?)")
    return tokenizer


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, model_max_length) int64 ids of `prompts`: [BOS, tokens..., EOS, pad...], cut to 75 tokens, as
    diffusers' `encode_prompt` tokenizes. Logs a warning naming the part cut off from a longer prompt."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    # diffusers tokenizes again without truncation and decodes what the truncation dropped (excluding EOS)
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= ids.shape[-1] and not torch.equal(ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, tokenizer.model_max_length - 1: -1])
        logger.warning("The following part of your input was truncated because CLIP can only handle sequences "
                       "up to %d tokens: %s", tokenizer.model_max_length, removed)
    return ids
