"""Building a pipeline from a diffusers-layout folder (or a hub repo id resolved to one).

Each component is created on the meta device from its `config.json`, then filled once from its weights file
through the explicit key table in `weights_convert/` — strictly: a missing, extra or misshapen tensor is an
error naming it, never a silently random weight.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

import weights_convert.clip as clip_keys
import weights_convert.unet as unet_keys
import weights_convert.vae as vae_keys
from weights_convert.common import load_into, read_tensors

from .hub import resolve
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.unet import UNet, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .pipeline import Pipeline
from .tokenizer import load_tokenizer

# weight file names of a component folder, in order of preference (safetensors before pickles)
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),
}


def read_config(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: is {folder} a diffusers-layout Stable Diffusion folder?")
    with open(path) as f:
        return json.load(f)


def read_component_tensors(folder: str, component: str) -> dict[str, torch.Tensor]:
    """All tensors of one component folder: a single file, or the shards listed in its `.index.json`."""
    for name in WEIGHT_FILES[component]:
        path = os.path.join(folder, component, name)
        if os.path.isfile(path):
            return read_tensors(path)
        index = path + ".index.json"
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(read_tensors(os.path.join(folder, component, shard)))
            return tensors
    raise FileNotFoundError(f"{os.path.join(folder, component)}: no weights file "
                            f"({' or '.join(WEIGHT_FILES[component])})")


def _build(model_cls, cfg, tensors, key_map, what, dtype, device, ignore=()) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(cfg)
    return load_into(model, tensors, key_map, what=what, ignore=ignore, dtype=dtype, device=device).eval()


def load_unet(folder: str, dtype=torch.float32, device="cpu") -> UNet:
    cfg = UNetConfig.from_diffusers(read_config(folder, "unet/config.json"))
    tensors = read_component_tensors(folder, "unet")
    return _build(UNet, cfg, tensors, unet_keys.diffusers_keys(cfg), "UNet", dtype, device)


def load_vae(folder: str, dtype=torch.float32, device="cpu") -> AutoencoderKL:
    cfg = VAEConfig.from_diffusers(read_config(folder, "vae/config.json"))
    tensors = vae_keys.rename_legacy_attention(read_component_tensors(folder, "vae"))
    return _build(AutoencoderKL, cfg, tensors, vae_keys.diffusers_keys(cfg), "VAE", dtype, device)


def load_text_encoder(folder: str, dtype=torch.float32, device="cpu", component: str = "text_encoder") -> CLIPTextModel:
    # SDXL's second encoder (OpenCLIP ViT-bigG) carries the projection that makes its pooled output
    cfg = CLIPTextConfig.from_diffusers(read_config(folder, f"{component}/config.json"),
                                        with_projection=component == "text_encoder_2")
    tensors = read_component_tensors(folder, component)
    key_map = clip_keys.diffusers_keys(cfg, clip_keys.diffusers_prefix(tensors))
    return _build(CLIPTextModel, cfg, tensors, key_map, component.replace("_", " "), dtype, device,
                  ignore=clip_keys.DIFFUSERS_IGNORE)


def load_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  revision: str | None = None, cache_dir: str | None = None,
                  local_files_only: bool = False) -> Pipeline:
    """A ready pipeline from a diffusers-layout folder or a hub repo id (`owner/name[@revision]`).

    Args:
        model: folder or repo id, e.g. "stable-diffusion-v1-5/stable-diffusion-inpainting".
        dtype: weights and compute dtype (torch.float32, torch.bfloat16, torch.float16).
        device: where the models run.
        revision, cache_dir, local_files_only: as in huggingface_hub, for repo ids.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    folder = resolve(model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    index = read_config(folder, "model_index.json")
    sdxl = bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None
    # the SDXL 1.0 VAE overflows in half precision (its config says force_upcast); diffusers upcasts it for
    # every encode and decode, here it is simply loaded in fp32 once
    force_upcast = VAEConfig.from_diffusers(read_config(folder, "vae/config.json")).force_upcast
    vae = load_vae(folder, torch.float32 if sdxl and force_upcast else dtype, device)
    return Pipeline(
        unet=load_unet(folder, dtype, device),
        vae=vae,
        text_encoder=load_text_encoder(folder, dtype, device),
        tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")),
        text_encoder_2=load_text_encoder(folder, dtype, device, "text_encoder_2") if sdxl else None,
        tokenizer_2=load_tokenizer(os.path.join(folder, "tokenizer_2")) if sdxl else None,
        force_zeros_for_empty_prompt=sdxl and index.get("force_zeros_for_empty_prompt", True),
        scheduler_config=read_config(folder, "scheduler/scheduler_config.json"),
        name=os.path.basename(os.path.normpath(os.fspath(model))),
    )
