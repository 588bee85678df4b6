"""The KL autoencoder against diffusers' AutoencoderKL on tiny random models (fp32), and its key tables at
full size on the meta device."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from ldm_inpaint.loading import build_vae
from ldm_inpaint.models.vae import AutoencoderKL, VAEConfig
from weights_convert.common import read_tensors
from weights_convert.vae import LEGACY_ATTENTION_NAMES, diffusers_keys
from parity import record

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# name → (diffusers config, input H×W); together they cover 2 and 3 levels, 1 and 2 ResNets per level,
# 32 and 16 groups, square and non-square inputs, and the optional quant convs and mid-block attention.
TINY = {
    "2level": (dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32), (32, 32)),
    "2level-nonsquare": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16), (40, 24)),
    "3level": (dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16), (40, 24)),
    "no-quant-no-attn": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                              use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
                         (32, 32)),
}


def _tiny_diffusers(tmp_path: Path, name: str) -> tuple[DiffusersAutoencoderKL, Path]:
    """A seeded random diffusers VAE saved to tmp_path. Every weight gets seeded noise on top of its
    initialisation, so GroupNorm's ones/zeros cannot hide a swapped or misplaced tensor."""
    kwargs, _ = TINY[name]
    torch.manual_seed(0)
    ref = DiffusersAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(kwargs["block_out_channels"]),
                                 up_block_types=("UpDecoderBlock2D",) * len(kwargs["block_out_channels"]),
                                 latent_channels=4, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ref.eval().save_pretrained(tmp_path)
    return ref, tmp_path


def _load_native(folder: Path, tensors=None) -> AutoencoderKL:
    if tensors is None:
        tensors = read_tensors(folder / "diffusion_pytorch_model.safetensors")
    return build_vae(json.loads((folder / "config.json").read_text()), tensors, torch.float32, "cpu")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return record((a - b).abs().max().item())


def _generators(seeds: int | list[int]) -> torch.Generator | list[torch.Generator]:
    if isinstance(seeds, list):
        return [torch.Generator().manual_seed(s) for s in seeds]
    return torch.Generator().manual_seed(seeds)


def _image(name: str, batch: int = 2) -> torch.Tensor:
    H, W = TINY[name][1]
    return torch.rand(batch, 3, H, W, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_vae_encode_matches_diffusers_tiny(tmp_path, name):
    ref, folder = _tiny_diffusers(tmp_path, name)
    ours = _load_native(folder)
    x = _image(name)
    want, got = ref.encode(x).latent_dist, ours.encode(x)
    assert _max_diff(got.mean, want.mean) <= TOL
    assert _max_diff(got.logvar, want.logvar) <= TOL
    assert torch.equal(got.mode(), got.mean)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_vae_decode_matches_diffusers_tiny(tmp_path, name):
    ref, folder = _tiny_diffusers(tmp_path, name)
    ours = _load_native(folder)
    H, W = TINY[name][1]
    f = 2 ** (len(TINY[name][0]["block_out_channels"]) - 1)
    z = torch.randn(2, 4, H // f, W // f, generator=torch.Generator().manual_seed(3))
    got, want = ours.decode(z), ref.decode(z).sample
    assert got.shape == (2, 3, H, W)
    assert _max_diff(got, want) <= TOL


@pytest.mark.parametrize("name", ["2level", "2level-nonsquare"])
@torch.no_grad()
def test_vae_sample_draws_like_diffusers_tiny(tmp_path, name):
    ref, folder = _tiny_diffusers(tmp_path, name)
    ours = _load_native(folder)
    x = _image(name)
    want_dist, got_dist = ref.encode(x).latent_dist, ours.encode(x)
    for seeds in (0, [5, 6], [7]):  # one generator; one per batch item; a one-element list
        assert _max_diff(got_dist.sample(_generators(seeds)), want_dist.sample(_generators(seeds))) <= TOL


@torch.no_grad()
def test_vae_loads_legacy_attention_names(tmp_path):
    ref, folder = _tiny_diffusers(tmp_path, "2level")
    current = {v: k for k, v in LEGACY_ATTENTION_NAMES.items()}  # to_q → query, …, to_out.0 → proj_attn
    legacy = {}
    for key, t in read_tensors(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in current.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = t
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    assert _max_diff(_load_native(folder, legacy).decode(z), ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("family", ["sd15", "sdxl-base"])
def test_vae_diffusers_keys_cover_full_checkpoint(family):
    config = json.loads((ROOT / f"ldm_inpaint/configs/{family}/vae.json").read_text())
    shapes = json.loads((ROOT / f"tests/data/keys/{family}.diffusers.json").read_text())["vae"]
    # the loader itself, on the meta device: strict, so every official key is read and every parameter filled
    model = build_vae(config, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, None, "meta")
    native = model.state_dict()
    table = diffusers_keys(VAEConfig.from_diffusers(config))
    assert set(table) == set(native)
    assert sorted(table.values()) == sorted(shapes)  # one checkpoint key per parameter, none left over
    for ours, theirs in table.items():
        assert list(native[ours].shape) == shapes[theirs], ours


def test_vae_config_reads_official_configs():
    def read(family, file="vae.json"):
        return VAEConfig.from_diffusers(json.loads((ROOT / f"ldm_inpaint/configs/{family}/{file}").read_text()))
    assert read("sd15") == VAEConfig()  # class defaults fill scaling_factor and force_upcast
    sdxl = read("sdxl-base")
    assert (sdxl.scaling_factor, sdxl.force_upcast, sdxl.sample_size) == (0.13025, True, 1024)
    assert read("sdxl-inpainting").force_upcast is False


@pytest.mark.parametrize("field, value", [
    ("act_fn", "gelu"),
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0] * 4),
    ("norm_num_groups", 24),
    ("layers_per_block", 0),
    ("norm_type", "spatial"),
])
def test_vae_config_rejects_unsupported_value_naming_field(field, value):
    d = json.loads((ROOT / "ldm_inpaint/configs/sd15/vae.json").read_text())
    d[field] = value
    with pytest.raises(ValueError, match=field):
        VAEConfig.from_diffusers(d)
