"""The CLIP vocabulary files written from the bundled BPE list, loaded by transformers' CLIPTokenizer, give the
ids of the official SD tokenizers (ids in ldm_inpaint/configs/tokenizers.json), with diffusers' truncation."""

import json
import logging

import pytest
import torch

from ldm_inpaint.tokenizer import (MAX_LENGTH, NUM_MERGES, load_tokenizer, tokenize, write_tokenizer_folder,
                                   write_vocab_files)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", checked against open_clip


@pytest.fixture(scope="module")
def sd15_tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def sdxl_tokenizer_2(tmp_path_factory):
    return load_tokenizer(write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer_2"), pad_token="!"))


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


def test_tokenizer_json_folder_loads(sd15_tokenizer, tmp_path):
    sd15_tokenizer.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json, no vocab.json
    assert not (tmp_path / "vocab.json").exists()
    ids = tokenize(load_tokenizer(tmp_path), ["a photo of a cat"])
    assert ids[0, :8].tolist() == CAT_IDS + [49407]


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab.json"):
        load_tokenizer(tmp_path)
    write_vocab_files(tmp_path)
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "nope")
