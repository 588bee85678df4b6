"""Tiny random-weight Stable Diffusion folders in the official diffusers layout, built offline by diffusers and
transformers (seeded), shared by the pipeline and CLI tests. Nothing here touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# No test may download anything: set before huggingface_hub is imported (it reads these once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: tiny models gain nothing from two
    torch.set_num_threads(1)

from ldm_inpaint.family import family_of_config  # noqa: E402
from ldm_inpaint.tokenizer import write_tokenizer_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ldm_inpaint" / "configs"
TEXT_DIM, TEXT_DIM_2 = 32, 48


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its initial value, so zero-initialised ones cannot hide a wrong wiring."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def tiny_components(in_channels: int):
    """diffusers/transformers components of a tiny SD 1.5-shaped model: 8× VAE, 2-level UNet, 2-layer CLIP.
    The VAE's GroupNorms hold two channels per group: with one, a flat input (a fully masked image is all
    zeros) has zero variance per group and rounding noise gets amplified 1000× by eps = 1e-6."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
    for m in (unet, vae, text_encoder):
        _perturb(m)
        m.eval()
    return unet, vae, text_encoder


def tiny_sdxl_components(in_channels: int):
    """diffusers/transformers components of a tiny SDXL-shaped model: two text encoders of different kinds
    (CLIP quick-GELU, OpenCLIP-style GELU + projection), per-level transformer depth, linear projections, no
    attention at the first level, text_time conditioning."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    pooled_dim, time_dim = 32, 8
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
        scaling_factor=0.13025, force_upcast=True)
    common = dict(vocab_size=49408, num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=TEXT_DIM, num_hidden_layers=3, intermediate_size=37, hidden_act="quick_gelu", **common))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=TEXT_DIM_2, num_hidden_layers=3, intermediate_size=43, hidden_act="gelu",
        projection_dim=pooled_dim, **common))
    for m in (unet, vae, text_encoder, text_encoder_2):
        _perturb(m)
        m.eval()
    return unet, vae, text_encoder, text_encoder_2


def build_folder(folder: Path, in_channels: int, family: str) -> Path:
    """Save a tiny pipeline as diffusers does, with the official scheduler config and tokenizer files."""
    import diffusers
    import transformers

    sdxl = family_of_config(family).text_encoders == 2
    scheduler_config = json.loads((CONFIGS / family / "scheduler.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    # diffusers needs transformers' tokenizer (ours is not one of its loadable classes)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_tokenizer_folder(folder / "tokenizer"))
    if sdxl:
        unet, vae, text_encoder, text_encoder_2 = tiny_sdxl_components(in_channels)
        tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(write_tokenizer_folder(folder / "tokenizer_2",
                                                                                        pad_token="!"))
        cls = diffusers.StableDiffusionXLInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionXLPipeline
        pipe = cls(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                   tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        unet, vae, text_encoder = tiny_components(in_channels)
        cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
        pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # the official repos ship vocab.json + merges.txt
    write_tokenizer_folder(folder / "tokenizer")
    if sdxl:
        write_tokenizer_folder(folder / "tokenizer_2", pad_token="!")
    return folder


@pytest.fixture(scope="session")
def sd_inpaint_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.5-inpainting folder: 9-channel UNet, DDIM scheduler config."""
    return build_folder(tmp_path_factory.mktemp("tiny-sd15-inpainting"), 9, "sd15-inpainting")


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny plain SD 1.5 folder: 4-channel UNet, PNDM scheduler config."""
    return build_folder(tmp_path_factory.mktemp("tiny-sd15"), 4, "sd15")


@pytest.fixture(scope="session")
def sdxl_inpaint_dir(tmp_path_factory) -> Path:
    """A tiny SDXL-inpainting folder: 9-channel UNet with text_time conditioning, Euler scheduler config."""
    return build_folder(tmp_path_factory.mktemp("tiny-sdxl-inpainting"), 9, "sdxl-inpainting")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL base folder: 4-channel UNet."""
    return build_folder(tmp_path_factory.mktemp("tiny-sdxl"), 4, "sdxl-base")


def diffusers_pipeline(cls_name: str, folder: Path):
    import diffusers

    extra = dict(add_watermarker=False) if "XL" in cls_name else dict(safety_checker=None,
                                                                       requires_safety_checker=False)
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colourful test picture (smooth so resizing is meaningful)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    phase = rng.uniform(0, 6.28, size=3)
    rgb = np.stack([0.5 + 0.5 * np.sin(6 * xx + 3 * yy + p) for p in phase], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def make_mask(width: int = 64, height: int = 48, box=(16, 8, 48, 32)) -> Image.Image:
    """White (repaint) rectangle on black (keep), mode L."""
    m = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)
