"""The models can be inspected and changed from outside: a forward hook fires on every block during one forward,
and assigning `ldm_inpaint.models.attention.attention` once swaps the attention of the UNet, the VAE and both
text encoders."""

import pytest
import torch
from torch import nn

from ldm_inpaint.models import attention as attn
from ldm_inpaint.models.clip import CLIPTextConfig, CLIPTextModel
from ldm_inpaint.models.unet import Attention, UNet, UNetConfig
from ldm_inpaint.models.vae import AutoencoderKL, VAEConfig

# SDXL-shaped (no attention at level 0, depth 2 at level 1, linear projections, added conditioning) and odd-sized,
# so that every block kind and the upsample-to-the-skip's-size path run.
UNET = UNetConfig(block_out_channels=(32, 64), num_heads=(2, 4), cross_attention_levels=(False, True),
                  transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=32,
                  in_channels=9, add_time_embed_dim=8, add_embed_in_dim=16 + 6 * 8)
VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
CLIP = CLIPTextConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=24)
CLIP_2 = CLIPTextConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, hidden_act="gelu", projection_dim=16)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"unet": UNet(UNET).eval(), "vae": AutoencoderKL(VAE).eval(),
            "text_encoder": CLIPTextModel(CLIP).eval(), "text_encoder_2": CLIPTextModel(CLIP_2).eval()}


def _run(models) -> dict[str, torch.Tensor]:
    """One forward of each model on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    x = torch.randn(2, 9, 7, 5, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    added = dict(text_embeds=torch.randn(2, 16, generator=g), time_ids=torch.tensor([[56.0, 40, 0, 0, 56, 40]] * 2))
    image = torch.randn(1, 3, 14, 10, generator=g)
    with torch.no_grad():
        return {"unet": models["unet"](x, 500, context, **added),
                "vae": models["vae"].decode(models["vae"].encode(image).mean),
                "text_encoder": models["text_encoder"](ids).hidden,
                "text_encoder_2": models["text_encoder_2"](ids, pooled=True).pooled}


def _hookable(models):
    """(model, name, module) of every module with a forward: all but the ModuleList containers and the
    autoencoder itself, which is called through encode/decode."""
    return [(m, n, module) for m, model in models.items() for n, module in model.named_modules()
            if not isinstance(module, nn.ModuleList) and (m, n) != ("vae", "")]


def test_a_forward_hook_fires_on_every_block(models):
    fired = set()
    handles = [module.register_forward_hook(lambda *_, key=(m, n): fired.add(key))
               for m, n, module in _hookable(models)]
    try:
        _run(models)
    finally:
        for handle in handles:
            handle.remove()

    silent = [(m, n) for m, n, _ in _hookable(models) if (m, n) not in fired]
    assert not silent, f"modules whose forward hook did not fire: {silent}"
    kinds = {type(module).__name__ for model in models.values() for module in model.modules()}
    assert {"DownBlock", "UpBlock", "MidBlock", "SpatialTransformer", "TransformerBlock", "Attention", "ResBlock",
            "Level", "AttentionBlock", "CLIPEncoderLayer", "CLIPAttention"} <= kinds


def test_block_hooks_see_the_skips_and_can_replace_outputs(models):
    unet = models["unet"]
    pushed = []
    handle = unet.down_blocks[0].register_forward_hook(lambda module, args, out: pushed.append(out[1]))
    try:
        _run(models)
    finally:
        handle.remove()
    # level 0: one skip per ResBlock, then the downsampled output (7×5 → 4×3)
    assert [tuple(s.shape[-2:]) for s in pushed[0]] == [(7, 5), (7, 5), (4, 3)]

    before = _run(models)["unet"]
    handle = unet.mid_block.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        changed = _run(models)["unet"]
    finally:
        handle.remove()
    assert (changed - before).abs().max() > 1e-3
    assert torch.equal(_run(models)["unet"], before)


def test_one_assignment_swaps_attention_in_every_model(models, monkeypatch):
    expected = _run(models)
    calls = {}

    def counting(q, k, v, heads, causal=False):
        calls[q.shape[-1], heads, causal] = calls.get((q.shape[-1], heads, causal), 0) + 1
        return attn.fused_attention(q, k, v, heads, causal)

    monkeypatch.setattr(attn, "attention", counting)
    out = _run(models)
    n_unet = sum(isinstance(m, Attention) for m in models["unet"].modules())  # 24: self and cross, 12 blocks
    assert calls == {(64, 4, False): n_unet,  # UNet: every attention of level 1 and the mid block, once
                     (32, 1, False): 2,  # VAE: the encoder's and the decoder's mid-block attention
                     (16, 4, True): 2,  # text_encoder: one per layer, causal
                     (16, 2, True): 2}  # text_encoder_2
    for name in expected:
        assert torch.equal(out[name], expected[name]), name

    def wrong(q, k, v, heads, causal=False):  # twice the softmax temperature: a plausible scaling bug
        return attn.fused_attention(2 * q, k, v, heads, causal)

    monkeypatch.setattr(attn, "attention", wrong)
    out = _run(models)
    for name in expected:
        assert (out[name] - expected[name]).abs().max() > 1e-4, f"{name} did not use the replaced attention"

    monkeypatch.setattr(attn, "attention", attn.fused_attention)
    out = _run(models)
    for name in expected:
        assert torch.equal(out[name], expected[name]), name


def test_use_attention_swaps_inside_the_block_only(models):
    """An explicit-softmax attention gives the fused result (so the swap point passes heads and the causal
    flag right), and leaving the block restores the fused one, also after an exception."""
    expected = _run(models)

    def explicit(q, k, v, heads, causal=False):
        B, Lq, D = q.shape
        q, k, v = (t.view(B, -1, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
        scores = q @ k.transpose(-1, -2) / (D // heads) ** 0.5  # (B, heads, Lq, Lk)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, D)

    with attn.use_attention(explicit):
        assert attn.attention is explicit
        out = _run(models)
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], atol=1e-5, rtol=1e-5)
    assert attn.attention is attn.fused_attention

    with pytest.raises(KeyError), attn.use_attention(explicit):
        raise KeyError
    assert attn.attention is attn.fused_attention
