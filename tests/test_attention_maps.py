"""Cross-attention maps: the recorder leaves the UNet output alone, its maps are per-pixel distributions over the
text positions that equal an independent recomputation, and the per-token PNGs are written under the expected
names."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_inpaint.attention_maps import CrossAttentionMaps, save_token_maps, token_labels
from ldm_inpaint.models import attention as attn
from ldm_inpaint.models.unet import UNet, UNetConfig
from ldm_inpaint.tokenizer import CLIPTokenizer, tokenize

L = 77  # text positions
# cross-attention at both levels (so maps of two resolutions are resized and averaged), depth 2 at level 1
CFG = UNetConfig(block_out_channels=(32, 64), num_heads=(2, 4), cross_attention_levels=(True, True),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=16, in_channels=4)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(CFG).eval()


def _inputs(size, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *size, generator=g), torch.randn(batch, L, 16, generator=g)


def _hook_count(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def test_recording_leaves_the_unet_output_unchanged(unet):
    x, context = _inputs((8, 8))
    with torch.no_grad():
        expected = unet(x, 500, context)
        with CrossAttentionMaps(unet, (8, 8)):
            got = unet(x, 500, context)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("size", [(8, 8), (7, 5), (6, 10)])
def test_maps_are_distributions_over_the_text_at_every_pixel(unet, size):
    x, context = _inputs(size)
    with torch.no_grad(), CrossAttentionMaps(unet, size) as recorder:
        unet(x, 500, context)
        unet(x, 300, context)
    maps = recorder.maps()
    assert maps.shape == (2, L, *size) and maps.dtype == torch.float32
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, *size), atol=1e-5, rtol=0)
    assert maps.std(dim=1).min() > 1e-4, "maps are uniform over the text: the test could not see a wrong layout"


@pytest.mark.parametrize("size", [(7, 5), (6, 10)])
def test_maps_equal_an_explicit_softmax_recomputation(unet, size):
    """The reference takes the probabilities from an explicit-softmax attention put in through the swap point and
    unflattens each layer's tokens on the grid the test knows (level 1 of an odd side is ceil(side / 2)): a
    recorder that unflattened on a transposed or guessed grid would differ."""
    grids = {size[0] * size[1]: size, -(-size[0] // 2) * -(-size[1] // 2): (-(-size[0] // 2), -(-size[1] // 2))}
    layer_maps = []

    def explicit(q, k, v, heads, causal=False):
        B, Lq, D = q.shape
        q, k, v = (t.view(B, -1, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
        probs = (q @ k.transpose(-1, -2) / (D // heads) ** 0.5).softmax(-1)  # (B, heads, Lq, Lk)
        if k.shape[2] == L:  # a cross-attention
            h, w = grids[Lq]
            layer = probs.mean(1).transpose(1, 2).reshape(B, L, h, w)
            layer_maps.append(F.interpolate(layer, size=size, mode="bilinear", align_corners=False))
        return (probs @ v).transpose(1, 2).reshape(B, Lq, D)

    x, context = _inputs(size)
    with torch.no_grad(), CrossAttentionMaps(unet, size) as recorder, attn.use_attention(explicit):
        unet(x, 500, context)
    assert len(layer_maps) == 2 * 1 + 2 * 2 + 2 + 3 * 2 + 3 * 1  # transformers × depth: down 0, 1, mid, up 1, 0
    torch.testing.assert_close(recorder.maps(), torch.stack(layer_maps).mean(0), atol=1e-6, rtol=1e-5)


def test_maps_depend_on_the_context(unet):
    x, context = _inputs((8, 8))
    _, other = _inputs((8, 8), seed=2)
    maps = []
    for c in (context, other):
        with torch.no_grad(), CrossAttentionMaps(unet, (8, 8)) as recorder:
            unet(x, 500, c)
        maps.append(recorder.maps())
    assert (maps[0] - maps[1]).abs().max() > 1e-3


def test_the_recorder_removes_its_hooks_and_restarts_on_enter(unet):
    x, context = _inputs((8, 8))
    recorder = CrossAttentionMaps(unet, (8, 8))
    assert _hook_count(unet) == 0
    with torch.no_grad():
        with recorder:
            assert _hook_count(unet) > 0
            unet(x, 500, context)
        assert _hook_count(unet) == 0
        first = recorder.maps()
        unet(x, 300, context)  # not recorded
        assert torch.equal(recorder.maps(), first)
        with recorder:
            with pytest.raises(RuntimeError, match="no cross-attention ran"):
                recorder.maps()
            with pytest.raises(RuntimeError, match="already recording"):
                recorder.__enter__()
    assert _hook_count(unet) == 0


def test_a_changed_batch_or_a_bad_size_is_refused(unet):
    with pytest.raises(ValueError, match="latent"):
        CrossAttentionMaps(unet, (64,))
    x, context = _inputs((8, 8))
    x_1, context_1 = _inputs((8, 8), batch=1)
    with torch.no_grad(), CrossAttentionMaps(unet, (8, 8)):
        unet(x, 500, context)
        with pytest.raises(ValueError, match="batch"):
            unet(x_1, 500, context_1)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_packaged()


def test_token_labels_name_the_positions_the_unet_sees(tokenizer):
    prompt = "a red brick wall, photo"
    labels = token_labels(tokenizer, prompt)
    assert labels == ["a", "red", "brick", "wall", ",", "photo"]
    ids = tokenize(tokenizer, [prompt])[0]
    assert ids[0] == tokenizer.bos_token_id and ids[len(labels) + 1] == tokenizer.eos_token_id
    assert [tokenizer.decode([i]) for i in ids[1:len(labels) + 1]] == labels

    long = token_labels(tokenizer, " ".join(["cat"] * 100))
    assert long == ["cat"] * 75  # cut as tokenize cuts: BOS + 75 tokens + EOS


def test_save_token_maps_writes_one_overlay_per_token(tmp_path, tokenizer):
    labels = token_labels(tokenizer, "a red, wall")
    assert labels == ["a", "red", ",", "wall"]
    maps = torch.full((L, 4, 6), 1.0 / L)
    maps[2, 0, 0] = 0.5  # "red" is hot at the top-left latent pixel
    image = Image.new("RGB", (48, 32), (128, 128, 128))
    paths = save_token_maps(maps, image, labels, tmp_path / "maps")

    names = ["01_a.png", "02_red.png", "03_token.png", "04_wall.png"]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == names  # no temporary files left
    red = np.asarray(Image.open(paths[1]))
    assert red.shape == (32, 48, 3)
    assert red[0, 0, 0] > red[0, 0, 2] and red[-1, -1, 2] > red[-1, -1, 0]  # hot: red; cold: blue

    with pytest.raises(ValueError, match="one per label"):
        save_token_maps(maps[:3], image, labels, tmp_path)
