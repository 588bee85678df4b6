"""The CLIP byte-level BPE tokenizer (Radford et al. 2021, after GPT-2's byte-level BPE) as the pipelines call it.

`CLIPTokenizer` is a plain-Python tokenizer that gives the ids of transformers' (5.23) `CLIPTokenizer`, the one
diffusers uses, without importing transformers (over a second of load time). It encodes a text as the
`tokenizers` pipeline behind transformers' class does:
1. added tokens (the special tokens) are cut out of the text first: those a folder marks `normalized` are
   looked for in the normalised text (so `<|STARTOFTEXT|>` counts), the others verbatim only;
2. the rest is normalised: NFC, each run of Unicode white space → one space, lower case (character by
   character, so no final sigma). Nothing else: no ftfy, no HTML unescaping, no stripping;
3. pre-tokenised: CLIP's pattern picks the words — letter runs, single digits, runs of other non-space
   characters, English contractions — and drops the spaces; then GPT-2's pattern, which the byte-level step
   applies to each word, splits a `<|endoftext|>` that step 1 left in the text into `<|`, `endoftext`, `|>`;
4. each word's UTF-8 bytes are mapped to characters (`bytes_to_unicode`), '</w>' is glued to the last one
   and BPE merges adjacent symbols, lowest merge rank first;
5. the ids are framed as [BOS, ..., EOS].

This file also provides
- the vocabulary files: `write_vocab_files` derives `vocab.json` + `merges.txt`, in the format of the official
  Stable Diffusion repos, from the BPE list bundled with open_clip (`data/bpe_simple_vocab_16e6.txt.gz`);
  `write_tokenizer_folder` adds the two config files, so complete tokenizer folders can be built offline;
  `CLIPTokenizer.from_packaged` builds the same tokenizer from that list directly;
- `load_tokenizer(folder)` for a diffusers `tokenizer/` or `tokenizer_2/` folder;
- `tokenize(tokenizer, prompts, conventions)`: the exact call of diffusers' `encode_prompt`, (B, 77) ids; with
  conventions="original", OpenCLIP's tokenizer gives open_clip's ids instead (below).

The two SDXL tokenizers differ in the pad token: `<|endoftext|>` (49407) for CLIP ViT-L/14 and `!` (0) for
OpenCLIP ViT-bigG, reproducing open_clip's zero padding. Pad positions are not masked in the UNet's
cross-attention, so the pad id changes the conditioning. `!` being a special token there, transformers also
cuts every `!` of a prompt out as a lone id 0 instead of BPE-merging it (`!!!` → 0 0 0, not `!!!</w>`): kept by
default, as diffusers does. The code SDXL was released with (Stability's sgm, `FrozenOpenCLIPEmbedder2.forward`)
calls `open_clip.tokenize`, whose `SimpleTokenizer` treats `!` as any other character; `encode_open_clip`
reproduces it (see its doc for the other, rarer, differences).
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import logging
import os
import unicodedata
from pathlib import Path

import regex  # the `re` module has no \p{L} / \p{N}
import torch

from .family import check_conventions

logger = logging.getLogger(__name__)

VOCAB_GZ = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"  # id 49406
EOS_TOKEN = "<|endoftext|>"  # id 49407
MAX_LENGTH = 77  # model_max_length of every official SD tokenizer: BOS + 75 tokens + EOS
# CLIP keeps the first 49152 - 256 - 2 merges of the list: 256 byte tokens (each also with '</w>') plus the
# merges plus the two special tokens make the 49408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
UNLIMITED = int(1e30)  # transformers' model_max_length when the config has none

# `regex`'s \s is Unicode White_Space, the same set as Oniguruma's \s in `tokenizers` (str.isspace adds \x1c-\x1f)
_WHITESPACE = regex.compile(r"\s+")
_CLIP_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
_GPT2_WORDS = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# open_clip's words (src/open_clip/tokenizer.py, `SimpleTokenizer.__init__`): CLIP's pattern led by open_clip's own
# names for the special tokens, case-insensitive
_OPEN_CLIP_SPECIAL = ("<start_of_text>", "<end_of_text>")
_OPEN_CLIP_WORDS = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
# the config keys of transformers' named special tokens, in the order it adds them (a later one wins)
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' CLIPTokenizer defaults, for a config that names none
_DEFAULT_TOKENS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
_CACHE_SIZE = 10_000  # words whose ids are kept; bounded so that a long-running process cannot grow without end


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


@functools.lru_cache(maxsize=1)  # SDXL builds two tokenizers from it
def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges: the 256 byte characters, the same with '</w>' (end of word), one token per
    merge, then `<|startoftext|>` 49406 and `<|endoftext|>` 49407. Shared: do not modify."""
    merges = _merges()
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + [m.replace(" ", "") for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, "the BPE list does not give CLIP's 49408 distinct tokens"
    return vocab, merges


def write_vocab_files(dst_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` into `dst_dir` (created if needed) and return their paths.
    Written like the official files: one line of JSON with sorted keys and raw (not \\u-escaped) characters;
    merges.txt is `#version: 0.2` then one merge a line."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab()
    vocab_path, merges_path = dst / "vocab.json", dst / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges), encoding="utf-8")
    return vocab_path, merges_path


def _special_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _special_tokens_map(pad_token: str) -> dict:
    """special_tokens_map.json of the official SD repos (the SDXL-base files); pad_token is a plain string."""
    return {"bos_token": _special_token(BOS_TOKEN), "eos_token": _special_token(EOS_TOKEN), "pad_token": pad_token,
            "unk_token": _special_token(EOS_TOKEN)}


def _tokenizer_config(pad_token: str) -> dict:
    """tokenizer_config.json of the official SD repos."""
    added = lambda t: {"__type": "AddedToken", **t} if isinstance(t, dict) else t  # noqa: E731
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer",
              **{k: added(v) for k, v in _special_tokens_map(pad_token).items()}}
    return dict(sorted(config.items()))


def write_tokenizer_folder(dst_dir: str | os.PathLike, pad_token: str = EOS_TOKEN) -> Path:
    """Write a complete tokenizer folder as in the official SD repos: vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json (the SDXL-base files). `pad_token`: `"<|endoftext|>"` for
    SD 1.5 and SDXL `tokenizer/`, `"!"` for SDXL `tokenizer_2/`. Returns the folder."""
    dst = Path(dst_dir)
    write_vocab_files(dst)
    (dst / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(pad_token), indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map(pad_token), indent=2) + "\n")
    return dst


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _added_token(value: str | dict, known: dict[str, dict]) -> tuple[str, bool]:
    """(content, normalized) of a special token as a config gives it: a string, or an AddedToken dict. As in
    transformers, a token the folder already declares (`known`, by content) keeps that declaration, and a bare
    string is matched verbatim."""
    token = value if isinstance(value, dict) else {"content": value}
    token = known.get(token["content"], token)
    if any(token.get(k) for k in ("lstrip", "rstrip", "single_word")):
        raise ValueError(f"special token {token['content']!r}: lstrip/rstrip/single_word are not supported")
    return token["content"], token.get("normalized", False)


def _special_tokens(config: dict, special_map: dict, known: dict[str, dict]) -> tuple[dict, dict[str, bool]]:
    """({config key: token} of the named special tokens, {added token: normalized}), as transformers 5.23
    derives them: the `added_tokens_decoder` of tokenizer_config.json, if any, declares the added tokens;
    otherwise special_tokens_map.json overrides tokenizer_config.json and tokenizer.json's `added_tokens` are
    `known`. Named tokens are added after the declared ones, in `_NAMED_TOKENS` order, a later one replacing
    an earlier one of the same content (SD's pad string `<|endoftext|>` makes the EOS token verbatim)."""
    if "added_tokens_decoder" in config:
        known, special_map = {t["content"]: t for t in config["added_tokens_decoder"].values()}, {}
    values = {**_DEFAULT_TOKENS, **{k: v for k, v in {**config, **special_map}.items() if v is not None}}
    named = {k: values[k] for k in _NAMED_TOKENS if values.get(k) is not None}
    extra = values.get("extra_special_tokens") or values.get("additional_special_tokens") or []
    added = dict(_added_token(t, known) for t in known.values())
    for token in [*named.values(), *extra]:
        content, normalized = _added_token(token, known)
        added.pop(content, None)
        added[content] = normalized
    return {k: _added_token(v, known)[0] for k, v in named.items()}, added


def _split(pattern: regex.Pattern | None, text: str):
    """(piece, is a match) for the pieces of `text` around and at the matches of `pattern` (one group)."""
    parts = pattern.split(text) if pattern is not None else [text]
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


def _alternation(tokens) -> regex.Pattern | None:
    """A pattern matching any of `tokens`, the longest at a position first (as tokenizers' leftmost-longest)."""
    tokens = sorted(tokens, key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, tokens)) + ")") if tokens else None


def _normalize(text: str) -> str:
    # Σ → σ first: str.lower() would give a word-final ς, tokenizers lower-cases each character alone
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).replace("Σ", "σ").lower()


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, with the ids of transformers' `CLIPTokenizer` (see the module doc).

    vocab: {token: id}; merges: the BPE merges as "a b" lines (tokens hold no space), highest priority first;
    added_tokens: {token: normalized} cut out of the text before BPE — normalized ones looked for in the
    normalised text, the others verbatim — by default the four special tokens, verbatim (transformers' default
    for tokens given as strings). Tokens missing from `vocab` get the next ids."""

    def __init__(self, vocab: dict[str, int], merges: list[str], pad_token: str = EOS_TOKEN,
                 model_max_length: int = MAX_LENGTH, added_tokens: dict[str, bool] | None = None,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN):
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.model_max_length = model_max_length
        if added_tokens is None:
            added_tokens = dict.fromkeys([bos_token, eos_token, unk_token, pad_token], False)
        self._ids = dict(vocab)
        for token in added_tokens:
            self._ids.setdefault(token, len(self._ids))
        self._tokens = {i: t for t, i in self._ids.items()}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}  # keyed by the line: no split
        self._byte_chars = bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        self._verbatim = _alternation(t for t, normalized in added_tokens.items() if not normalized)
        # normalized tokens are matched in their normalised form
        self._normalized_ids = {_normalize(t): self._ids[t] for t, normalized in added_tokens.items() if normalized}
        self._normalized = _alternation(self._normalized_ids)
        self._cache: dict[str, list[int]] = {}

    bos_token_id = property(lambda self: self._ids[self.bos_token])
    eos_token_id = property(lambda self: self._ids[self.eos_token])
    unk_token_id = property(lambda self: self._ids[self.unk_token])
    pad_token_id = property(lambda self: self._ids[self.pad_token])

    @classmethod
    def from_config(cls, vocab: dict[str, int], merges: list[str], config: dict,
                    special_map: dict | None = None, known: dict[str, dict] | None = None) -> CLIPTokenizer:
        """The tokenizer transformers builds from a tokenizer_config.json (`config`), special_tokens_map.json
        (`special_map`) and the AddedToken dicts of tokenizer.json (`known`, by content)."""
        named, added = _special_tokens(config, special_map or {}, known or {})
        return cls(vocab, merges, named["pad_token"], config.get("model_max_length", UNLIMITED), added,
                   named["bos_token"], named["eos_token"], named["unk_token"])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """The tokenizer of a diffusers tokenizer folder, read as transformers reads it: the vocabulary from
        tokenizer.json (`model.vocab`, `model.merges`) if there is one, else vocab.json + merges.txt; the
        special tokens and model_max_length from tokenizer_config.json, special_tokens_map.json and
        tokenizer.json's `added_tokens`."""
        folder = Path(folder)
        known = {}
        if (folder / "tokenizer.json").is_file():  # as in transformers, it wins over vocab.json + merges.txt
            spec = _read_json(folder / "tokenizer.json")
            vocab = spec["model"]["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
            known = {t["content"]: t for t in spec.get("added_tokens", [])}
        else:
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [line for line in lines if line and not line.startswith("#version")]
        return cls.from_config(vocab, merges, _read_json(folder / "tokenizer_config.json"),
                               _read_json(folder / "special_tokens_map.json"), known)

    @classmethod
    def from_packaged(cls, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """The tokenizer of a folder `write_tokenizer_folder(..., pad_token)` writes, without writing it:
        `"<|endoftext|>"` for SD 1.5 and SDXL `tokenizer/`, `"!"` for SDXL `tokenizer_2/`."""
        vocab, merges = _clip_vocab()
        return cls.from_config(vocab, merges, _tokenizer_config(pad_token), _special_tokens_map(pad_token))

    def encode(self, text: str) -> list[int]:
        """[BOS, ids of `text`..., EOS], not cut to model_max_length."""
        ids = [self.bos_token_id]
        for part, is_token in _split(self._verbatim, text):
            if is_token:
                ids.append(self._ids[part])
                continue
            for piece, is_token in _split(self._normalized, _normalize(part)):
                if is_token:
                    ids.append(self._normalized_ids[piece])
                else:
                    ids += [i for word in _CLIP_WORDS.findall(piece) for w in _GPT2_WORDS.findall(word)
                            for i in self._bpe(w)]
        return ids + [self.eos_token_id]

    @property
    def is_open_clip(self) -> bool:
        """Whether this is an OpenCLIP encoder's tokenizer (SDXL's tokenizer_2, SD 2.x's): diffusers marks them by
        the pad token `!` (id 0), its stand-in for open_clip's zero padding."""
        return self.pad_token == "!"

    def encode_open_clip(self, text: str) -> list[int]:
        """[BOS, ids of `text`..., EOS] as open_clip's `SimpleTokenizer.encode` gives them (src/open_clip/tokenizer.py,
        the open_clip 2.x that sgm's `FrozenOpenCLIPEmbedder2` calls), on this tokenizer's vocabulary:
        1. the text is cleaned: HTML entities unescaped twice (`&amp;amp;` → `&`), stripped, each run of white
           space → one space, stripped again, lower-cased by Python's `str.lower` (word-final Σ → ς);
        2. CLIP's pattern picks the words, `<start_of_text>` and `<end_of_text>` (any case) first: those two are
           BOS and EOS; `<|startoftext|>`, `<|endoftext|>` and `!` are plain text;
        3. each word is BPE-merged whole (`!!` → `!!</w>`, `world!` → `world</w>` `!</w>`).
        Not reproduced: open_clip first runs `ftfy.fix_text`, which changes only text that needs fixing (mojibake,
        curly quotes → straight, ligatures, full-width forms, control characters)."""
        text = html.unescape(html.unescape(text)).strip()
        text = _WHITESPACE.sub(" ", text).strip().lower()
        special = dict(zip(_OPEN_CLIP_SPECIAL, (self.bos_token_id, self.eos_token_id), strict=True))
        ids = [self.bos_token_id]
        for word in _OPEN_CLIP_WORDS.findall(text):
            ids += [special[word]] if word in special else self._bpe(word)
        return ids + [self.eos_token_id]

    def _bpe(self, word: str) -> list[int]:
        """The ids of one word: its byte characters, '</w>' glued to the last, merged pair by pair."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        chars = [self._byte_chars[b] for b in word.encode("utf-8")]
        symbols = [s if s in self._ids else self.unk_token for s in [*chars[:-1], chars[-1] + END_OF_WORD]]
        rank = lambda pair: self._ranks.get(" ".join(pair), float("inf"))  # noqa: E731
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=rank)
            if rank(pair) == float("inf"):
                break
            # Every occurrence of the best pair, left to right, in one pass. tokenizers merges the leftmost
            # one at a time, which is the same as long as no merge makes a pair ranked before it: true of a
            # trained merge list (a merge comes after those that make its parts; tested for CLIP's).
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self._ids[s] for s in symbols]
        if len(self._cache) < _CACHE_SIZE:
            self._cache[word] = ids
        return ids

    def decode(self, ids) -> str:
        """The text of `ids` as transformers' `decode` gives it: the tokens' bytes decoded as UTF-8 (invalid
        bytes → U+FFFD), each '</w>' a space, stripped; special tokens are kept. transformers skips its
        `clean_up_tokenization_spaces` for BPE tokenizers, so there is none here."""
        data = bytearray()
        for i in ids:
            token = self._tokens.get(int(i), "")
            if all(c in self._char_bytes for c in token):
                data += bytes(self._char_bytes[c] for c in token)
            else:  # an added token outside the byte alphabet stands for itself
                data += token.encode("utf-8")
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """The `CLIPTokenizer` of a tokenizer folder holding `vocab.json` + `merges.txt` or `tokenizer.json`, and
    `tokenizer_config.json` (it sets the pad token and model_max_length). Raises ValueError naming what is
    missing."""
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
    tokenizer = CLIPTokenizer.from_folder(folder)
    if tokenizer.model_max_length > MAX_LENGTH:
        raise ValueError(f"{folder}/tokenizer_config.json: model_max_length {tokenizer.model_max_length} exceeds "
                         f"CLIP's {MAX_LENGTH} positions (is model_max_length missing?)")
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], conventions: str = "diffusers") -> torch.Tensor:
    """(B, model_max_length) int64 ids of `prompts`: [BOS, tokens..., EOS, pad...], cut to 75 tokens, as
    diffusers' `encode_prompt` tokenizes. Logs a warning naming the part cut off from a longer prompt.

    conventions="original": the ids of the code the checkpoints were released with. For an OpenCLIP tokenizer
    (`is_open_clip`) that is open_clip's `SimpleTokenizer` (`encode_open_clip`), whose cut (`tokens[:77]`, last
    → EOS) and zero padding are diffusers'; CLIP ViT-L's was transformers' own there too, so its ids do not
    change."""
    check_conventions(conventions)
    n, pad = tokenizer.model_max_length, tokenizer.pad_token_id
    open_clip = conventions == "original" and tokenizer.is_open_clip
    encoded = [tokenizer.encode_open_clip(p) if open_clip else tokenizer.encode(p) for p in prompts]
    if any(len(e) > n for e in encoded):
        # diffusers decodes positions n-1 to the last but one of the uncut batch padded to its longest: what
        # the cut dropped, without EOS (for a shorter prompt, its pad tokens)
        longest = max(map(len, encoded))
        removed = [tokenizer.decode((e + [pad] * (longest - len(e)))[n - 1:-1]) for e in encoded]
        logger.warning("The following part of your input was truncated because CLIP can only handle sequences "
                       "up to %d tokens: %s", n, removed)
    cut = [e if len(e) <= n else e[:n - 1] + e[-1:] for e in encoded]  # BOS + the first n - 2 tokens + EOS
    return torch.tensor([e + [pad] * (n - len(e)) for e in cut], dtype=torch.int64)
