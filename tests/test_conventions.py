"""conventions="original": the numbers of the code the checkpoints were released with (CompVis/runwayml `ldm`
for SD 1.x, Stability's `sgm` for SDXL) where ldm_inpaint otherwise follows diffusers (docs/parity.md, "The
original code's conventions"). Each expected value is computed here from the original's definition, not with
our code; "diffusers" stays covered by the parity tests (test_tokenizer.py, test_schedulers.py)."""

import pytest
import torch

from ldm_inpaint.tokenizer import CLIPTokenizer, _clip_vocab, tokenize

VOCAB = _clip_vocab()[0]
BOS, EOS = 49406, 49407


def ids(*tokens, pad=0, length=77):
    """[BOS, the vocabulary ids of whole `tokens`, EOS] padded to `length`: what a tokenizer that keeps each
    of these words whole gives."""
    row = [BOS, *(VOCAB[t] for t in tokens), EOS]
    return row + [pad] * (length - len(row))


@pytest.fixture(scope="module")
def tokenizer_2():  # SDXL's second tokenizer (OpenCLIP ViT-bigG/14), pad "!"
    return CLIPTokenizer.from_packaged(pad_token="!")


@pytest.fixture(scope="module")
def tokenizer():  # SD 1.x / SDXL's first tokenizer (CLIP ViT-L/14), pad "<|endoftext|>"
    return CLIPTokenizer.from_packaged()


# --- 1. SDXL's second tokenizer: open_clip's SimpleTokenizer ---------------------------------------------------


def test_tokenizer_2_keeps_bang_in_words_under_original(tokenizer_2):
    # open_clip BPE-merges "!" like any character: "!!" is the single token "!!</w>", a lone "!" is "!</w>"
    # (256); transformers, with "!" as tokenizer_2's pad (a special token), cuts each "!" out as id 0
    prompt = ["hello!! world!"]
    assert tokenize(tokenizer_2, prompt, "original")[0].tolist() == ids("hello</w>", "!!</w>", "world</w>", "!</w>")
    assert tokenize(tokenizer_2, prompt)[0].tolist() == ids("hello</w>", "!", "!", "world</w>", "!")
    assert VOCAB["!"] == 0 and VOCAB["!</w>"] == 256


def test_original_cleans_text_as_open_clip(tokenizer_2):
    # HTML entities unescaped twice, white space collapsed and stripped, then lower case
    assert tokenize(tokenizer_2, ["  A &amp;amp; B\t\n"], "original")[0].tolist() == ids("a</w>", "&</w>", "b</w>")
    assert tokenize(tokenizer_2, ["A &amp; B"])[0].tolist() != ids("a</w>", "&</w>", "b</w>")


def test_open_clip_names_its_own_special_tokens(tokenizer_2):
    # open_clip's special words are <start_of_text> / <end_of_text> (any case); transformers' <|endoftext|>
    # is plain text there
    original = tokenize(tokenizer_2, ["a <End_Of_Text> b", "a <|endoftext|> b"], "original")
    assert original[0].tolist() == [BOS, VOCAB["a</w>"], EOS, VOCAB["b</w>"], EOS] + [0] * 72
    assert original[1].tolist().count(EOS) == 1  # only the final one


def test_original_cuts_long_prompts_as_open_clip(tokenizer_2):
    # open_clip: tokens[:77] with the last replaced by EOT, then zeros — BOS + 75 tokens + EOS
    row = tokenize(tokenizer_2, ["go! " * 50], "original")[0].tolist()
    assert row == [BOS] + [VOCAB["go</w>"], VOCAB["!</w>"]] * 37 + [VOCAB["go</w>"], EOS]


def test_first_tokenizer_is_unchanged_under_original(tokenizer):
    # the original code tokenizes CLIP ViT-L/14 with transformers' CLIPTokenizer too
    prompts = ["hello!! world!", "A &amp; B", "a <|endoftext|> b", "go! " * 50]
    assert torch.equal(tokenize(tokenizer, prompts, "original"), tokenize(tokenizer, prompts))


def test_unknown_convention_is_refused(tokenizer_2):
    with pytest.raises(ValueError, match="conventions must be one of"):
        tokenize(tokenizer_2, ["a"], "sgm")
