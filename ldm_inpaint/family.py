"""What differs between Stable Diffusion 1.x and SDXL, as data: one `Family` value per model family.

The pipeline, the loaders, the benchmark and the tests read these fields instead of testing `is_sdxl`, so a
difference between the families is stated once, here, with the source of each number.

    pipe.family                          # SD15 or SDXL, chosen by the loader
    SDXL.guidance_scale["img2img"]       # 5.0
    SDXL.variants["inpainting"].config   # "sdxl-inpainting": the official configs in ldm_inpaint/configs/
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TASKS = ("txt2img", "img2img", "inpaint")
CONVENTIONS = ("diffusers", "original")


def check_conventions(conventions: str) -> None:
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}")


@dataclass(frozen=True)
class Variant:
    """One official checkpoint layout of a family: its configs folder and diffusers' pipeline class for it."""
    config: str  # folder in ldm_inpaint/configs/
    pipeline: str  # diffusers' pipeline class (model_index.json's `_class_name`)
    in_channels: int  # the UNet's input channels: 4, or 9 for [latent, mask, masked-image latent]


@dataclass(frozen=True)
class Family:
    name: str  # "sd15" or "sdxl"
    title: str
    # diffusers' per-task defaults (StableDiffusion{,Img2Img,Inpaint}Pipeline and their XL forms)
    guidance_scale: dict[str, float]
    strength: dict[str, float]
    # which text-encoder layer conditions the UNet when clip_skip is None (negative index into the hidden
    # states), and whether it goes through the final LayerNorm: SD 1.x the last layer, normed; SDXL the
    # penultimate layer of both encoders, not normed (Podell et al. 2023 §2.1)
    text_layer: int
    text_final_norm: bool
    text_encoders: int  # 1: CLIP ViT-L/14; 2: + OpenCLIP ViT-bigG/14, whose pooled output also conditions
    # SDXL: with no negative prompt the unconditional text is zero embeddings, not the encoding of ""
    # (model_index.json's force_zeros_for_empty_prompt, true in the official SDXL repos)
    zero_negatives: bool
    time_ids: bool  # SDXL micro-conditioning: (original size, crop top-left, target size) per image
    vae_upcast: bool  # honour the VAE config's force_upcast in half precision (SDXL 1.0's VAE overflows in fp16)
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    variants: dict[str, Variant] = field(default_factory=dict)  # "base", "inpainting"
    # "diffusers" (default): diffusers' numerics; "original": the release code's (ldm / sgm) where they differ
    # (docs/parity.md lists the points)
    conventions: str = "diffusers"

    def __post_init__(self):
        check_conventions(self.conventions)

    def with_conventions(self, conventions: str | None) -> Family:
        return self if conventions is None else dataclasses.replace(self, conventions=conventions)


SD15 = Family(
    name="sd15", title="Stable Diffusion 1.x",
    guidance_scale={"txt2img": 7.5, "img2img": 7.5, "inpaint": 7.5},
    strength={"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0},
    text_layer=-1, text_final_norm=True, text_encoders=1,
    zero_negatives=False, time_ids=False, vae_upcast=False, latent_channels=4, vae_scale_factor=8,
    variants={"base": Variant("sd15", "StableDiffusionPipeline", 4),
              "inpainting": Variant("sd15-inpainting", "StableDiffusionInpaintPipeline", 9)},
)

SDXL = Family(
    name="sdxl", title="Stable Diffusion XL",
    guidance_scale={"txt2img": 5.0, "img2img": 5.0, "inpaint": 7.5},
    # inpainting 0.9999: diffusers' SDXL inpainting default, which skips the first (pure-noise) step
    strength={"txt2img": 1.0, "img2img": 0.3, "inpaint": 0.9999},
    text_layer=-2, text_final_norm=False, text_encoders=2,
    zero_negatives=True, time_ids=True, vae_upcast=True, latent_channels=4, vae_scale_factor=8,
    variants={"base": Variant("sdxl-base", "StableDiffusionXLPipeline", 4),
              "inpainting": Variant("sdxl-inpainting", "StableDiffusionXLInpaintPipeline", 9)},
)

FAMILIES = {f.name: f for f in (SD15, SDXL)}
# every official configs folder, e.g. "sd15-inpainting" → (SD15, its Variant)
VARIANTS = {v.config: (f, v) for f in FAMILIES.values() for v in f.variants.values()}


def variant(config: str) -> Variant:
    return VARIANTS[config][1]


def family_of_config(config: str) -> Family:
    """The family of an official configs folder name ("sdxl-base" → SDXL)."""
    return VARIANTS[config][0]
