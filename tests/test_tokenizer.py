"""Our CLIP tokenizer, on the vocabulary files written from the bundled BPE list, gives the ids of the official
SD tokenizers (ids in ldm_inpaint/configs/tokenizers.json) with diffusers' truncation, id for id and warning for
warning equal to transformers' (5.23) `CLIPTokenizer`, the one diffusers calls — which ldm_inpaint no longer
imports."""

import json
import logging
import random
import subprocess
import sys
import unicodedata

import pytest
import torch

from ldm_inpaint.tokenizer import (BOS_TOKEN, END_OF_WORD, EOS_TOKEN, MAX_LENGTH, NUM_MERGES, CLIPTokenizer,
                                   _clip_vocab, bytes_to_unicode, load_tokenizer, tokenize, write_tokenizer_folder,
                                   write_vocab_files)

transformers = pytest.importorskip("transformers")

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", checked against open_clip
WARNING = ("The following part of your input was truncated because CLIP can only handle sequences up to %d "
           "tokens: %s")

SPECIAL_TEXTS = [
    "a <|startoftext|> b", "a<|startoftext|>b", "<|startoftext|><|startoftext|>", "<|STARTOFTEXT|> caps",
    "<|endoftext|>", "x<|endoftext|>y", "<|endoftext|>!!!", "<|ENDOFTEXT|>", "<|EndOfText|>!!", "!<|endoftext|>",
    "<|startoftext", "endoftext|>", "<|start of text|>", "!!!", "hello! world!", "a!b", "!",
    "<|ENDOFTEXT|><|endoftext|>",
]
TEXTS = [
    # plain prompts and upper case
    "a photo of a cat", "A photograph of an astronaut riding a horse on the moon, 4k, trending on artstation",
    "A RED CAR IN THE RAIN", "mixed UPPER lower 123abc abc123 CamelCase",
    # punctuation runs and prompt syntax
    "wow!!! really?!?! ... ---- ___ ~~~", "((masterpiece)), [best quality]:1.2 {a|b} <lora:foo:0.8>",
    "@user #hashtag $9.99 50% a&b a+b=c a/b a\\b", "'''quoted''' \"double\" `back` «guillemets» „low“",
    # contractions, also upper-case ('S), inside punctuation and words
    "it's don't you're we've I'm they'll he'd", "IT'S DON'T YOU'RE WE'VE I'M THEY'LL HE'D", "'s 't 're 've 'm 'll 'd",
    "''s '''t ''re !'s 'sx 'SS", "rock'n'roll o'clock y'all ma'am", "it’s curly’s",
    # digits and numbers with separators; other number characters
    "1234567890", "3.14159 1,000,000 10:30pm 2024-01-01 #42 1e-5 0x1F", "①②③ ½ ²³ Ⅻ ٣٤٥ १२३ 一二三",
    # accented letters, NFD input, combining marks
    "café naïve résumé Ærøskøbing São Paulo Zürich Ångström", unicodedata.normalize("NFD", "café naïve résumé Å"),
    "e\u0301\u0302 a\u0308\u0323 \u0301start end\u0301 x\u20dd", "Ǆ ǅ ǆ ﬁ ﬀ Ⅸ",
    # casing that differs from Python's str.lower: final sigma, dotted capital I, sharp s
    "ΟΔΟΣ ΣΟΦΙΑΣ ΣΣ", "İSTANBUL ıi İ", "Straße STRASSE ß ẞ",
    # CJK, emoji and ZWJ sequences, other scripts
    "東京タワーの夜景、美しい", "한국어 텍스트", "中文：你好，世界！", "🐱🐶 cat 😀😃😄", "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵 ❤️",
    "مرحبا بالعالم", "नमस्ते दुनिया हिन्दी", "שלום עולם", "สวัสดีครับ", "Привет, МИР",
    # white space of every kind, empty and blank texts
    "a\tb\nc\r\nd", "  leading and trailing  ", "multiple     spaces", "\u00a0nbsp\u2009thin\u3000ideographic\u2028",
    "zero\u200bwidth\ufeff", "\x1cfile\x1fsep", "ctrl\x00null\x7fdel\x1b", "", "   ", "\t\n \r",
    # HTML-ish text (transformers 5 no longer unescapes it) and the end-of-word marker itself
    "<b>bold</b> &amp; &lt;tag&gt; <a href='x'>link</a>", "a</w>b </w>", "\ufffd replacement",
    *SPECIAL_TEXTS,
    # long: a single long word, long runs
    "supercalifragilisticexpialidocious" * 5, "!" * 100, "1234567890" * 20, "a photo of a cat " * 30,
]


def reference_tokenize(tokenizer, prompts):
    """What the transformers-based code gave (diffusers' encode_prompt): the ids and the decoded removed part."""
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    removed = None
    if untruncated.shape[-1] >= ids.shape[-1] and not torch.equal(ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, n - 1:-1])
    return ids, removed


def reference(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def fuzz_texts(count=300, seed=0):
    """Random texts from a mixed alphabet: letters of several scripts and cases, digits, punctuation, white
    space, combining marks, emoji, and whole special tokens and contractions as units."""
    units = [*"abcxyzABCXYZ", *"0123456789", *"!!!?.,;:'\"-_()[]{}<>|/\\@#$%^&*+=~`", *" \t\n\r  ",
             *"éüñçÅØßΣσςİıæ", "\u0301", "\u0308", "\u0323", *"東京語中文한국", *"مرحباनमस्ते", *"😀🐱👍🏽🇯🇵",
             "\u200d", "\ufe0f", "\u00a0", "\u2028", "\u200b", "\x1c", "\x00", "①", "½", "٣",
             BOS_TOKEN, EOS_TOKEN, "<|ENDOFTEXT|>", "'s", "'S", "'ll", "'D", "</w>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(units) for _ in range(rng.randrange(0, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def sd15_tokenizer(sd15_folder):
    return load_tokenizer(sd15_folder)


@pytest.fixture(scope="module")
def sdxl_tokenizer_2(tmp_path_factory):
    return load_tokenizer(write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer_2"), pad_token="!"))


@pytest.fixture(scope="module", params=[EOS_TOKEN, "!"], ids=["sd15", "sdxl-tokenizer_2"])
def pair(request, tmp_path_factory):
    """(ours, transformers') for an SD 1.5 folder (pad <|endoftext|>) and an SDXL tokenizer_2 folder (pad !)."""
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"), pad_token=request.param)
    return load_tokenizer(folder), reference(folder)


# -- the vocabulary files ------------------------------------------------------------------------------------
def test_vocab_files_have_clip_ids_and_official_format(tmp_path):
    vocab_path, merges_path = write_vocab_files(tmp_path)
    text = vocab_path.read_text(encoding="utf-8")
    vocab = json.loads(text)
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert (vocab["!"], vocab["!</w>"], vocab["a</w>"]) == (0, 256, 320)
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    # official vocab.json: one line, sorted keys, characters unescaped
    assert "\n" not in text and text.startswith('{"!": 0, "!!": 1443, ') and "âĢ¦" in text
    merges = merges_path.read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and merges[1:3] == ["i n", "t h"] and len(merges) == 1 + NUM_MERGES


def test_merges_come_after_the_merges_making_their_parts():
    """The BPE applies every occurrence of the best pair at once; that equals tokenizers' leftmost-first order
    because no merge creates a pair ranked before it, i.e. each merge's parts are bytes or earlier merges."""
    _, merges = _clip_vocab()
    made = {c for c in bytes_to_unicode().values()} | {c + END_OF_WORD for c in bytes_to_unicode().values()}
    for merge in merges:
        a, b = merge.split(" ")
        assert a in made and b in made, merge
        made.add(a + b)


# -- ids and padding -------------------------------------------------------------------------------------------
def test_sd15_tokenizer_pads_with_endoftext(sd15_tokenizer):
    assert sd15_tokenizer.model_max_length == MAX_LENGTH
    ids = tokenize(sd15_tokenizer, ["a photo of a cat"])
    assert ids.dtype == torch.int64 and ids.shape == (1, 77)
    assert ids[0].tolist() == CAT_IDS + [49407] * (77 - len(CAT_IDS))


def test_sdxl_tokenizer_2_pads_with_bang(sdxl_tokenizer_2):
    assert sdxl_tokenizer_2.pad_token == "!" and sdxl_tokenizer_2.pad_token_id == 0
    ids = tokenize(sdxl_tokenizer_2, ["a photo of a cat", "A  PHOTO of a cat"])  # lower-cased, spaces collapsed
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == ids[1].tolist() == CAT_IDS + [0] * (77 - len(CAT_IDS))


def test_bang_is_a_special_token_of_tokenizer_2(sd15_tokenizer, sdxl_tokenizer_2):
    """transformers adds the pad token `!` as a special token, so every `!` is cut out as id 0, unmerged."""
    assert sd15_tokenizer.encode("wow!!!") == [49406, 2781, 995, 49407]  # "wow</w>", "!!!</w>"
    assert sdxl_tokenizer_2.encode("wow!!!") == [49406, 2781, 0, 0, 0, 49407]


def test_encode_matches_transformers(pair):
    ours, ref = pair
    assert (ours.pad_token, ours.pad_token_id, ours.model_max_length) == (ref.pad_token, ref.pad_token_id,
                                                                          ref.model_max_length)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), repr(text)


def test_random_texts_match_transformers(pair):
    ours, ref = pair
    texts = fuzz_texts()
    assert [ours.encode(t) for t in texts] == ref(texts).input_ids


def test_every_assigned_character_matches_transformers(sd15_tokenizer, sd15_folder):
    """Every code point assigned in Python's Unicode database, 40 to a text in random order (so with varied
    neighbours). Characters assigned later can differ (see tokenizer.py)."""
    ours, ref = sd15_tokenizer, reference(sd15_folder)
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    random.Random(0).shuffle(chars)
    texts = ["".join(chars[i:i + 40]) for i in range(0, len(chars), 40)]
    mismatched = [t for t, ids in zip(texts, ref(texts).input_ids) if ours.encode(t) != ids]
    assert not mismatched, mismatched[:3]


def test_tokenize_matches_transformers(pair, caplog):
    ours, ref = pair
    batches = [["a photo of a cat"], ["a photo of a cat", "", "A  RED\tcar!!"], TEXTS[:8], SPECIAL_TEXTS]
    for prompts in batches:
        with caplog.at_level(logging.WARNING, logger="ldm_inpaint.tokenizer"):
            caplog.clear()
            ids = tokenize(ours, prompts)
        ref_ids, removed = reference_tokenize(ref, prompts)
        assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids), prompts
        assert removed is None and not caplog.records


@pytest.mark.parametrize("prompts", [
    ["a photo of a cat " * 20, "a photo of a cat"],  # the short prompt's removed part is its padding
    ["cat " * 75, "cat " * 76],  # exactly 77 ids (its EOS falls in the removed part) beside 78
    ["supercalifragilisticexpialidocious " * 10, "é" * 100, "!!! " * 40],
    ["東京タワー 👩‍👩‍👧‍👦 " * 12, "<|ENDOFTEXT|> " * 20, "don't stop " * 30],
    fuzz_texts(6, seed=1) + ["x " * 100],
], ids=["with-short", "77-and-78", "long-words", "unicode", "fuzz"])
def test_truncation_and_warning_match_transformers(pair, caplog, prompts):
    ours, ref = pair
    with caplog.at_level(logging.WARNING, logger="ldm_inpaint.tokenizer"):
        ids = tokenize(ours, prompts)
    ref_ids, removed = reference_tokenize(ref, prompts)
    assert torch.equal(ids, ref_ids)
    messages = [r.getMessage() for r in caplog.records if r.name == "ldm_inpaint.tokenizer"]
    assert removed is not None and messages == [WARNING % (77, removed)]


def test_long_prompt_is_cut_to_77_with_a_warning(sd15_tokenizer, caplog):
    long = "a photo of a cat " * 20  # 100 tokens
    with caplog.at_level(logging.WARNING, logger="ldm_inpaint.tokenizer"):
        ids = tokenize(sd15_tokenizer, [long, "a photo of a cat"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [49406] + (CAT_IDS[1:-1] * 20)[:75] + [49407]
    assert ids[1].tolist() == CAT_IDS + [49407] * 70
    messages = [r.getMessage() for r in caplog.records if r.name == "ldm_inpaint.tokenizer"]
    assert len(messages) == 1 and "truncated" in messages[0]
    assert "of a cat a photo of a cat" in messages[0]  # tokens 76..100 of the long prompt


def test_prompt_of_75_tokens_is_not_cut(sd15_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_inpaint.tokenizer"):
        ids = tokenize(sd15_tokenizer, ["cat " * 75])
    assert ids[0].tolist() == [49406] + [2368] * 75 + [49407]
    assert not [r for r in caplog.records if r.name == "ldm_inpaint.tokenizer"]


def test_decode_matches_transformers_batch_decode(pair):
    """Random ids, also lone byte tokens that make invalid UTF-8, special and pad tokens among them."""
    ours, ref = pair
    rng = random.Random(0)
    rows = [[rng.randrange(49408) for _ in range(rng.randrange(30))] for _ in range(500)]
    rows += [[rng.randrange(512) for _ in range(rng.randrange(30))] for _ in range(500)]
    rows += [[49406, 320, 49407, 0, 0, 256, 1125, 49407, 49407], [0] * 5, [49407] * 3, []]
    assert [ours.decode(r) for r in rows] == ref.batch_decode(rows)


# -- folders and configs -------------------------------------------------------------------------------------
def test_packaged_tokenizer_equals_the_written_folder(tmp_path):
    for pad in (EOS_TOKEN, "!"):
        packaged = CLIPTokenizer.from_packaged(pad)
        folder = load_tokenizer(write_tokenizer_folder(tmp_path / pad.strip("<|>"), pad_token=pad))
        assert (packaged.pad_token_id, packaged.model_max_length) == (folder.pad_token_id, folder.model_max_length)
        for text in TEXTS:
            assert packaged.encode(text) == folder.encode(text), repr(text)


def _added_tokens_decoder(normalized):
    return {"added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": normalized,
                                              "rstrip": False, "single_word": False, "special": True}
                                     for i, t in ((49406, BOS_TOKEN), (49407, EOS_TOKEN))}}


@pytest.mark.parametrize("config", [
    {"model_max_length": 77},  # every special token by default, matched verbatim
    {"model_max_length": 77, "pad_token": "!", "bos_token": "<|startoftext|>"},
    # as saved by transformers 4.34+ (the official SD 1.5 folders today): added_tokens_decoder wins
    {"model_max_length": 77, "pad_token": EOS_TOKEN, "eos_token": EOS_TOKEN, **_added_tokens_decoder(True)},
    {"model_max_length": 77, "pad_token": "!", "unk_token": {"__type": "AddedToken", "content": EOS_TOKEN,
                                                             "normalized": True}, **_added_tokens_decoder(False)},
    {"model_max_length": 77, "pad_token": {"__type": "AddedToken", "content": "!", "normalized": True}},
], ids=["bare", "strings", "decoder-normalized", "decoder-verbatim", "pad-normalized"])
def test_special_token_configs_match_transformers(tmp_path, config):
    write_vocab_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = load_tokenizer(tmp_path), reference(tmp_path)
    assert (ours.pad_token, ours.pad_token_id) == (ref.pad_token, ref.pad_token_id)
    for text in SPECIAL_TEXTS + ["a photo of a cat", "Mixed CASE!"]:
        assert ours.encode(text) == ref.encode(text), repr(text)


def test_tokenizer_json_folder_matches_transformers(tmp_path):
    """transformers 5 saves tokenizer.json (merges as [a, b] pairs) and no vocab.json; the merges may also be
    "a b" strings (tokenizers < 0.20)."""
    ref = reference(write_tokenizer_folder(tmp_path / "source", pad_token="!"))
    ref.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists()
    spec = json.loads((tmp_path / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "strings").mkdir()
    (tmp_path / "strings" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "strings" / "tokenizer_config.json").write_text(
        (tmp_path / "saved" / "tokenizer_config.json").read_text())
    for folder in (tmp_path / "saved", tmp_path / "strings"):
        ours, ref_saved = load_tokenizer(folder), reference(folder)
        assert ours.pad_token_id == ref_saved.pad_token_id == 0
        assert ours.encode("a photo of a cat") == CAT_IDS
        for text in TEXTS + fuzz_texts(50):
            assert ours.encode(text) == ref_saved.encode(text), repr(text)


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab.json"):
        load_tokenizer(tmp_path)
    write_vocab_files(tmp_path)
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("config", [{}, {"model_max_length": 1000}], ids=["missing", "too-long"])
def test_model_max_length_beyond_77_is_an_error(tmp_path, config):
    write_vocab_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_max_length"):
        load_tokenizer(tmp_path)


def test_stripped_special_tokens_are_refused(tmp_path):
    write_vocab_files(tmp_path)
    token = {"__type": "AddedToken", "content": "!", "lstrip": True, "normalized": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": token}))
    with pytest.raises(ValueError, match="lstrip"):
        load_tokenizer(tmp_path)


def test_loading_tokenizers_does_not_import_transformers(tmp_path):
    folder = write_tokenizer_folder(tmp_path / "tokenizer")
    code = ("import sys, ldm_inpaint\n"
            "from ldm_inpaint.loading import _tokenizers\n"
            "from ldm_inpaint.tokenizer import load_tokenizer, tokenize\n"
            "tokenize(load_tokenizer(sys.argv[1]), ['a photo of a cat ' * 30])\n"
            "_tokenizers(None, ('tokenizer', 'tokenizer_2'))\n"
            "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
