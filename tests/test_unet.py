"""The native UNet against diffusers' UNet2DConditionModel on tiny random weights (fp32), and the key table
against the official full-size key lists (on the meta device)."""

import json
from pathlib import Path

import pytest
import torch

from ldm_inpaint.family import VARIANTS
from ldm_inpaint.loading import build_unet
from ldm_inpaint.models.unet import UNetConfig
from weights_convert.common import read_tensors
from weights_convert.unet import diffusers_keys
from parity import record

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = tuple(VARIANTS)
TOL = 1e-5
CONTEXT_DIM, CONTEXT_LEN, POOLED_DIM, TIME_EMBED_DIM = 32, 7, 32, 8

# SD 1.5-shaped: attention at the high level only, 1×1-conv projections.
TINY_SD = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32, cross_attention_dim=CONTEXT_DIM,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, sample_size=8)
# SDXL-shaped: no attention at level 0, per-level heads and depths, linear projections, text_time conditioning.
TINY_XL = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32,
               cross_attention_dim=CONTEXT_DIM,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
               projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM, sample_size=8)


def _pair(tmp_path, **config):
    """A seeded random diffusers UNet saved in the official layout, and ours loaded from those files."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # move every parameter (norm weights and biases too) off its initial value
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    return ref, build_unet(saved, read_tensors(tmp_path / "diffusion_pytorch_model.safetensors"), torch.float32, "cpu")


def _max_diff(ref, ours, x, t, sdxl=False):
    B = x.shape[0]
    context = torch.randn(B, CONTEXT_LEN, CONTEXT_DIM)
    added = {}
    if sdxl:
        added = {"text_embeds": torch.randn(B, POOLED_DIM),
                 "time_ids": torch.tensor([[64.0, 96.0, 0.0, 8.0, 72.0, 104.0]]).repeat(B, 1)}
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added or None, return_dict=False)[0]
        got = ours(x, t, context, **added)
    assert expected.abs().max() > 0.1, "reference output is trivially small; the comparison could not fail"
    assert got.shape == expected.shape
    return record((got - expected).abs().max().item())


@pytest.fixture(scope="module")
def tiny_sd_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("tiny_sd"), **TINY_SD)


def test_unet4_matches_diffusers_tiny(tiny_sd_pair):
    ref, ours = tiny_sd_pair  # in_channels 4 is diffusers' default
    assert ours.cfg.in_channels == 4
    torch.manual_seed(1)
    assert _max_diff(ref, ours, torch.randn(2, 4, 8, 8), 500) <= TOL


def test_unet9_matches_diffusers_tiny(tmp_path):
    ref, ours = _pair(tmp_path, **TINY_SD, in_channels=9)
    torch.manual_seed(1)
    assert _max_diff(ref, ours, torch.randn(2, 9, 8, 8), 500) <= TOL


@pytest.mark.parametrize("attention_head_dim", [1, 8, (2, 4), (4, 16)])
def test_unet_head_counts_match_diffusers_tiny(tmp_path, attention_head_dim):
    config = {**TINY_SD, "attention_head_dim": attention_head_dim,
              "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    ref, ours = _pair(tmp_path, **config)
    torch.manual_seed(1)
    assert _max_diff(ref, ours, torch.randn(1, 4, 8, 8), 250) <= TOL


@pytest.mark.parametrize("size", [(8, 8), (9, 13)])
def test_sdxl_shaped_unet_matches_diffusers_tiny(tmp_path, size):
    ref, ours = _pair(tmp_path, **TINY_XL, in_channels=9)
    torch.manual_seed(1)
    assert _max_diff(ref, ours, torch.randn(2, 9, *size), torch.tensor([961.0, 21.5]), sdxl=True) <= TOL


@pytest.mark.parametrize("size", [(9, 13), (6, 10)])
def test_unet_latent_not_multiple_of_upsampling_matches_diffusers_tiny(tmp_path, size):
    config = {**TINY_SD, "block_out_channels": (32, 32, 64),
              "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    ref, ours = _pair(tmp_path, **config)
    torch.manual_seed(1)
    assert _max_diff(ref, ours, torch.randn(1, 4, *size), 999) <= TOL


@pytest.mark.parametrize("t", [981, 480.75, torch.tensor(1), torch.tensor([10, 980]),
                               torch.tensor([10.5, 980.25]), torch.tensor([7.0])],
                         ids=["int", "float", "0-dim", "per-item-int", "per-item-float", "one-float"])
def test_unet_timestep_forms_match_diffusers_tiny(tiny_sd_pair, t):
    ref, ours = tiny_sd_pair
    torch.manual_seed(1)
    assert _max_diff(ref, ours, torch.randn(2, 4, 8, 8), t) <= TOL


def _unet_json(family):
    return json.loads((ROOT / "ldm_inpaint" / "configs" / family / "unet.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_key_table_covers_official_diffusers_keys(family):
    official = json.loads((ROOT / "tests" / "data" / "keys" / f"{family}.diffusers.json").read_text())["unet"]
    # the loader itself, on the meta device: strict, so every official key is read and every parameter filled
    tensors = {k: torch.empty(s, device="meta") for k, s in official.items()}
    model = build_unet(_unet_json(family), tensors, None, "meta")
    native = {k: list(v.shape) for k, v in model.state_dict().items()}
    table = diffusers_keys(UNetConfig.from_diffusers(_unet_json(family)))
    assert set(table) == set(native)
    assert len(set(table.values())) == len(table), "two native parameters read the same checkpoint key"
    assert set(table.values()) == set(official)
    wrong = {k: (native[k], official[v]) for k, v in table.items() if native[k] != official[v]}
    assert not wrong


def test_unet_config_reads_official_values():
    assert UNetConfig.from_diffusers(_unet_json("sd15")) == UNetConfig()
    assert UNetConfig.from_diffusers(_unet_json("sd15-inpainting")).in_channels == 9
    xl = UNetConfig.from_diffusers(_unet_json("sdxl-inpainting"))
    assert xl.num_heads == (5, 10, 20)  # diffusers' attention_head_dim is the head count
    assert xl.transformer_layers_per_block == (1, 2, 10)
    assert xl.cross_attention_levels == (False, True, True)
    assert (xl.add_time_embed_dim, xl.add_embed_in_dim, xl.sample_size) == (256, 2816, 128)
    assert xl.use_linear_projection and xl.in_channels == 9


@pytest.mark.parametrize("field, value", [
    ("act_fn", "gelu"), ("time_cond_proj_dim", 256), ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"), ("upcast_attention", True), ("down_block_types", ["SimpleDownBlock2D"] * 4),
    ("attention_head_dim", [8, 8]), ("transformer_layers_per_block", [[1, 2]] * 4), ("no_such_field", 1),
])
def test_unet_config_rejects_unsupported_value(field, value):
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_diffusers({**_unet_json("sd15"), field: value})
