"""Original single-file Stable Diffusion checkpoints: the CompVis `ldm` layout (SD 1.x, SD 1.x inpainting) and the
Stability `sgm` layout (SDXL base, SDXL inpainting), read into, and written from, the diffusers layout.

Layouts: every key and shape of the official files is in `tests/data/keys/<family>.single-file.json`; the
diffusers loader doing the same is `diffusers/loaders/single_file_utils.py` (v0.42.1). Renaming goes through the
native names: for each component the file's key is `<layout>_keys(cfg)[native]` and the diffusers key is
`diffusers_keys(cfg)[native]`, both tables built from the same config, so every tensor is renamed exactly once
and nothing is guessed:

    sf = read("v1-5-pruned-emaonly.safetensors")          # family, configs, tensors under diffusers keys
    cfg = UNetConfig.from_diffusers(sf.configs["unet"])
    with torch.device("meta"):
        unet = UNet(cfg)
    load_into(unet, sf.tensors["unet"], weights_convert.unet.diffusers_keys(cfg), what="UNet")

Tensors are not copied (a `.safetensors` file stays memory-mapped); the three layout transforms are views or one
small copy: the VAE's 1×1-conv attention weights are reshaped to Linear weights, OpenCLIP's fused q/k/v in_proj is
split in thirds and its `x @ P` text projection is transposed into a Linear weight.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import torch

import weights_convert.clip as clip_keys
import weights_convert.unet as unet_keys
import weights_convert.vae as vae_keys
from ldm_inpaint.checks import InputError, number
from ldm_inpaint.family import SD15, SDXL, family_of_config
from ldm_inpaint.models.clip import CLIPTextConfig, CLIPTextModel
from ldm_inpaint.models.unet import UNet, UNetConfig
from ldm_inpaint.models.vae import AutoencoderKL, VAEConfig
from ldm_inpaint.tokenizer import EOS_TOKEN
from weights_convert.common import CheckpointError, load_into, read_component, read_json, read_tensors

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python ≥ 3.11; annotations only

CONFIGS = files("ldm_inpaint") / "configs"  # the official diffusers configs, package data of ldm_inpaint
SUPPORTED = "SD 1.x, SD 1.x inpainting, SDXL base 1.0, SDXL inpainting"
COMPONENTS = {False: ("unet", "vae", "text_encoder"), True: ("unet", "vae", "text_encoder", "text_encoder_2")}

# Tensors the files hold that no model uses.
SCHEDULE_BUFFERS = (  # ldm DDPM.register_schedule; the scheduler config recomputes the schedule
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
IGNORE = (
    *SCHEDULE_BUFFERS,
    "denoiser.sigmas",  # sgm DiscreteDenoiser's schedule, possibly stored in SDXL files
    "model_ema.decay", "model_ema.num_updates",  # the EMA's bookkeeping scalars
    clip_keys.LDM_PREFIX + clip_keys.DIFFUSERS_IGNORE[0],  # position_ids = arange(77), saved by old transformers
    clip_keys.SGM_CLIP_L_PREFIX + clip_keys.DIFFUSERS_IGNORE[0],
    *(clip_keys.OPENCLIP_PREFIX + k for k in clip_keys.OPENCLIP_IGNORE),  # logit_scale
)
EMA_PREFIX = "model_ema."
# pad token of each tokenizer folder: CLIP ViT-L/14 pads with <|endoftext|>, OpenCLIP bigG with "!" (id 0)
TOKENIZER_PADS = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}



@dataclass
class SingleFile:
    """A single-file checkpoint split into diffusers-layout components."""
    family: str  # its official configs folder, a key of ldm_inpaint.family.VARIANTS ("sd15-inpainting", …)
    configs: dict[str, dict]  # diffusers config dicts: unet, vae, text_encoder[, text_encoder_2], scheduler
    tensors: dict[str, dict[str, torch.Tensor]]  # per component: {diffusers key: tensor}
    ema: bool = False  # the UNet weights are the EMA shadows (`model_ema.*`)
    model_index: dict = field(default_factory=dict)  # the config folder's model_index.json, or the official one


# --- detection ---

_LORA = re.compile(r"(^|[._])lora([._]|$)|lora_(up|down|A|B)\b", re.IGNORECASE)


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect(tensors: Mapping[str, torch.Tensor], name: str = "checkpoint") -> str:
    """The family of a single-file checkpoint, from its keys and the UNet's input channels; a CheckpointError
    saying what the file looks like for anything else."""
    keys = list(tensors)
    if not keys:
        raise CheckpointError(f"{name}: holds no tensors")

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{name}: {what}; supported single files: {SUPPORTED} "
                               f"(CompVis ldm / Stability sgm layout)")

    lora = [k for k in keys if _LORA.search(k)]
    if lora:
        raise refuse(f"looks like a LoRA ({len(lora)} LoRA keys such as {lora[0]}), not a full checkpoint")
    unet = unet_keys.LDM_PREFIX
    has_unet = _has(keys, unet)
    has_vae = _has(keys, vae_keys.LDM_PREFIX)
    if _has(keys, "cond_stage_model.model."):
        raise refuse("is an SD 2.x checkpoint (OpenCLIP ViT-H text encoder `cond_stage_model.model.*`, "
                     "1024-wide context; the 768-px models predict v)")
    if _has(keys, "conditioner.embedders.0.model."):
        raise refuse("is an SDXL refiner (OpenCLIP ViT-bigG as its only text encoder)")
    if not has_unet:
        if has_vae or {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= set(keys):
            raise refuse("is a VAE-only file (no UNet `model.diffusion_model.*`)")
        if "input_blocks.0.0.weight" in tensors:
            raise refuse("is a UNet-only file without its `model.diffusion_model.` prefix")
        if "conv_in.weight" in tensors or _has(keys, "down_blocks.") or _has(keys, "text_model."):
            raise refuse("is a single diffusers-layout component (point at its diffusers folder instead)")
        raise refuse(f"has no Stable Diffusion UNet (`{unet}*`); first keys: {sorted(keys)[:3]}")

    xl = _has(keys, clip_keys.OPENCLIP_PREFIX)
    # other widths than SD 1.x's 768 and SDXL's 2048 are left to the config's shape check (tiny test models)
    context = {tuple(t.shape)[1] for k, t in tensors.items()
               if k.startswith(unet) and k.endswith("attn2.to_k.weight") and t.dim() == 2}
    if not xl and context == {1024}:
        raise refuse("is an SD 2.x checkpoint (1024-wide cross-attention context)")
    clip_l = clip_keys.SGM_CLIP_L_PREFIX if xl else clip_keys.LDM_PREFIX
    missing = [what for what, present in (("VAE `first_stage_model.*`", has_vae),
                                          (f"CLIP text encoder `{clip_l}*`", _has(keys, clip_l))) if not present]
    if missing:
        only = "a UNet-only file" if len(missing) == 2 else "incomplete"
        raise refuse(f"is {only}: no {' and no '.join(missing)}")

    conv_in = tensors.get(f"{unet}input_blocks.0.0.weight")
    channels = tuple(conv_in.shape)[1] if conv_in is not None and conv_in.dim() == 4 else None
    if channels not in (4, 9):
        raise refuse(f"has a UNet conv_in taking {channels} channels (4: text-to-image, 9: inpainting)")
    return (SDXL if xl else SD15).variants["inpainting" if channels == 9 else "base"].config


# --- configs ---

# Config fields checked before any model is built (a negative width would fail deep inside torch, or build a
# model no file fits): sizes and counts are positive ints (per level: a list of them), epsilons and scales positive
# numbers, block types lists of names. The models' `from_diffusers` check the rest: supported types, divisibility.
_CHECKED = {  # model: (positive ints, positive reals)
    "unet": (("in_channels", "out_channels", "block_out_channels", "layers_per_block", "attention_head_dim",
              "transformer_layers_per_block", "cross_attention_dim", "norm_num_groups", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim", "sample_size"), ("norm_eps",)),
    "vae": (("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups", "sample_size"), ("scaling_factor",)),
    "text_encoder": (("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "projection_dim"), ("layer_norm_eps",)),
}
_BLOCK_TYPES = ("down_block_types", "up_block_types")


def model_config(component: str, config: Mapping, source: str | os.PathLike | Traversable | None = None):
    """The model config (UNetConfig, VAEConfig, CLIPTextConfig) of a component ("unet", "vae", "text_encoder",
    "text_encoder_2") from its diffusers config dict. The one check of model configs: a value no model can be
    built from is a CheckpointError naming `source` (the file; default "<component> config") and the key."""
    kind = "text_encoder" if component.startswith("text_encoder") else component
    ints, reals = _CHECKED[kind]

    def values(key: str):  # (name, value) of a field: one, or one per level
        value = config.get(key)
        if isinstance(value, (list, tuple)):
            return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return [(key, value)] if value is not None else []

    try:
        for key in ints:
            for name, v in values(key):
                number(v, name, integer=True, low=1)
        for key in reals:
            for name, v in values(key):
                number(v, name, low=0, low_open=True)
        for key in _BLOCK_TYPES if kind != "text_encoder" else ():
            value = config.get(key)
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(b, str) for b in value)):
                raise InputError(f"{key} must be a list of block type names, got {value!r}")
        if kind == "unet":
            return UNetConfig.from_diffusers(config)
        if kind == "vae":
            return VAEConfig.from_diffusers(config)
        return CLIPTextConfig.from_diffusers(config, with_projection=component == "text_encoder_2")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source or f'{component} config'}: {e}") from None


def _checked_configs(files: Mapping[str, Path | Traversable]) -> dict[str, dict]:
    """The config dicts of `files` ({component: its config file}), every model's checked by `model_config`."""
    configs = {}
    for name, path in files.items():
        configs[name] = read_json(path)
        if name == "scheduler":
            if not isinstance(configs[name].get("_class_name"), str):
                raise CheckpointError(f"{path}: no \"_class_name\" (the diffusers scheduler class, e.g. "
                                      f"\"DDIMScheduler\")")
        else:
            model_config(name, configs[name], path)
    return configs


def official_configs(family: str) -> tuple[dict[str, dict], dict]:
    """The official diffusers configs of a family (`ldm_inpaint/configs/<family>/`) and its model_index."""
    d = CONFIGS / family
    names = COMPONENTS[family_of_config(family).text_encoders == 2] + ("scheduler",)
    return _checked_configs({n: d / f"{n}.json" for n in names}), read_model_index(d / "model_index.json")


def read_model_index(path: Path | Traversable) -> dict:
    """A model_index.json, with the entries read from it checked: `text_encoder_2` (SDXL has one) and
    `force_zeros_for_empty_prompt`."""
    index = read_json(path)
    entry = index.get("text_encoder_2")
    if entry is not None and not (isinstance(entry, list) and len(entry) == 2):
        raise CheckpointError(f"{path}: \"text_encoder_2\" must be [library, class] (or [null, null]), "
                              f"got {entry!r}")
    if not isinstance(index.get("force_zeros_for_empty_prompt", True), bool):
        raise CheckpointError(f"{path}: \"force_zeros_for_empty_prompt\" must be true or false, got "
                              f"{index['force_zeros_for_empty_prompt']!r}")
    return index


def folder_configs(folder: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """The configs of a diffusers-layout folder, as diffusers' `from_single_file(config=folder)` reads them, and
    its model_index.json; SDXL's when that lists a second text encoder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"folder not found: {folder}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{folder}: no model_index.json, so not a diffusers-layout pipeline folder")
    index = read_model_index(index_file)
    xl = (index.get("text_encoder_2") or [None])[0] is not None
    files = {n: folder / n / "config.json" for n in COMPONENTS[xl]}
    return _checked_configs({**files, "scheduler": folder / "scheduler" / "scheduler_config.json"}), index


def read_folder(folder: str | os.PathLike, variant: str | None = None
                ) -> tuple[dict[str, dict], dict[str, dict[str, torch.Tensor]]]:
    """The configs and per-component tensors of a diffusers-layout SD 1.x / SDXL folder."""
    configs, _ = folder_configs(folder)
    return configs, {c: read_component(folder, c, variant) for c in COMPONENTS["text_encoder_2" in configs]}


def packaged_tokenizer_warning(folder: str | os.PathLike, name: str) -> None:
    """One line on stderr: `folder` has no tokenizer folder `name`, the packaged CLIP vocabulary stands in."""
    print(f"warning: {folder} has no {name}/; using the CLIP ViT-L/14 BPE vocabulary packaged with ldm_inpaint "
          f"(49408 tokens) with pad token {TOKENIZER_PADS[name]!r}, as the official repos' {name}/",
          file=sys.stderr)


# --- key tables ---

def _model_configs(configs: Mapping[str, dict]) -> dict:
    return {n: model_config(n, configs[n]) for n in COMPONENTS["text_encoder_2" in configs]}


def key_tables(configs: Mapping[str, dict]) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """Per component: ({native key: single-file key}, {native key: diffusers key})."""
    cfg = _model_configs(configs)
    xl = "text_encoder_2" in cfg
    tables = {
        "unet": (unet_keys.ldm_keys(cfg["unet"]), unet_keys.diffusers_keys(cfg["unet"])),
        "vae": (vae_keys.ldm_keys(cfg["vae"]), vae_keys.diffusers_keys(cfg["vae"])),
        "text_encoder": (clip_keys.ldm_keys(cfg["text_encoder"],
                                            clip_keys.SGM_CLIP_L_PREFIX if xl else clip_keys.LDM_PREFIX),
                         clip_keys.diffusers_keys(cfg["text_encoder"])),
    }
    if xl:
        tables["text_encoder_2"] = (clip_keys.openclip_keys(cfg["text_encoder_2"]),
                                    clip_keys.diffusers_keys(cfg["text_encoder_2"]))
    return tables


# the tensor transforms, single-file → native: VAE attention 1×1 convs → Linear, OpenCLIP's fused in_proj → q, k, v
# and its `x @ P` projection → Linear weight (the way back: `join`)
_TO_NATIVE: dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {
    "vae": vae_keys.ldm_to_native, "text_encoder_2": clip_keys.openclip_to_native}


def _diffusers_table(component: str, cfg, given: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{native key: diffusers key} for one component's diffusers tensors `given` (text encoders with or without
    transformers' `text_model.` prefix)."""
    if component == "unet":
        return unet_keys.diffusers_keys(cfg)
    if component == "vae":
        return vae_keys.diffusers_keys(cfg)
    return clip_keys.diffusers_keys(cfg, clip_keys.diffusers_prefix(given))


def check_shapes(configs: Mapping[str, dict], tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Load every diffusers-layout component strictly into a meta-device model (no memory, no copies): raises
    CheckpointError naming missing, unexpected or misshapen tensors."""
    cfg = _model_configs(configs)
    build = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModel}
    for name, given in tensors.items():
        with torch.device("meta"):
            model = build[name](cfg[name])
        if name == "vae":
            given = vae_keys.rename_legacy_attention(given)
        ignore = clip_keys.DIFFUSERS_IGNORE if name.startswith("text_encoder") else ()
        load_into(model, given, _diffusers_table(name, cfg[name], given), what=name, ignore=ignore, device="meta")


# --- single file → diffusers components ---

def split(tensors: Mapping[str, torch.Tensor], configs: Mapping[str, dict], ema: bool = False,
          name: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors per component under diffusers keys. Every file tensor must be used or in `IGNORE`;
    with `model_ema.*` shadows present the UNet takes them when `ema`, else the `model.diffusion_model.*` ones."""
    tables = key_tables(configs)
    unet_file_keys = list(tables["unet"][0].values())
    shadows = {k for k in tensors if k.startswith(EMA_PREFIX) and k not in IGNORE}
    if shadows:
        expected = {unet_keys.ldm_ema_key(k) for k in unet_file_keys}
        if shadows != expected:
            odd = sorted(shadows - expected)[:3] or sorted(expected - shadows)[:3]
            raise CheckpointError(f"{name}: its {len(shadows)} EMA weights `{EMA_PREFIX}*` do not shadow the "
                                  f"{len(expected)} UNet parameters (e.g. {odd})")
    elif ema:
        raise CheckpointError(f"{name}: has no EMA weights (`{EMA_PREFIX}<name>`); its UNet weights are used "
                              f"without --ema (\"emaonly\" files already hold the EMA weights there)")
    ema_of = unet_keys.ldm_ema_key if ema else (lambda k: k)

    out: dict[str, dict[str, torch.Tensor]] = {}
    used = set()
    missing = []
    for component, (file_table, diffusers_table) in tables.items():
        to_native = _TO_NATIVE.get(component, lambda _, t: t)
        out[component] = {}
        for native, file_key in file_table.items():
            if component == "unet":
                file_key = ema_of(file_key)
            if file_key not in tensors:
                missing.append(file_key)
                continue
            used.add(file_key)
            out[component][diffusers_table[native]] = to_native(native, tensors[file_key])
    if missing:
        raise CheckpointError(f"{name}: {len(missing)} tensor(s) of the config's models are missing, e.g. "
                              f"{missing[:4]} (does the config fit this file?)")
    skipped = set(IGNORE) | shadows | (set(unet_file_keys) if ema else set())
    unexpected = sorted(k for k in tensors if k not in used and k not in skipped)
    if unexpected:
        raise CheckpointError(f"{name}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:4]} "
                              f"(not part of a {SUPPORTED} checkpoint)")
    return out


def read(path: str | os.PathLike, config: str | os.PathLike | None = None, ema: bool = False) -> SingleFile:
    """Read a single-file checkpoint (`.safetensors`, or a weights-only `.ckpt`) into diffusers-layout components.

    Args:
        path: the file; `.ckpt` files are unpickled with `weights_only=True`, a nested "state_dict" is entered.
        config: a diffusers-layout folder whose configs to use (as diffusers' `from_single_file(config=...)`);
            default: the official configs of the detected family. Its UNet `in_channels` must equal the file's
            (4 or 9): a mismatch is a CheckpointError, never silently adapted, since the folder's pipeline class
            and scheduler belong to the other kind of model.
        ema: take the UNet's EMA shadow weights (`model_ema.*`, in non-pruned SD 1.x files).
    Raises CheckpointError for unsupported or damaged files, naming what was found.
    """
    name = os.path.basename(os.fspath(path))
    tensors = read_tensors(path)
    family = detect(tensors, name)
    xl = family_of_config(family).text_encoders == 2
    if config is None:
        configs, model_index = official_configs(family)
    else:
        configs, model_index = folder_configs(config)
        folder_xl = "text_encoder_2" in configs
        if folder_xl != xl:
            raise CheckpointError(f"{name} is {'an SDXL' if xl else 'an SD 1.x'} checkpoint but config folder "
                                  f"{config} holds {'an SDXL' if folder_xl else 'an SD 1.x'} pipeline")
        file_ch = tensors[unet_keys.LDM_PREFIX + "input_blocks.0.0.weight"].shape[1]
        cfg_ch = configs["unet"].get("in_channels", 4)
        if cfg_ch != file_ch:
            kind = lambda c: "inpainting" if c == 9 else "text-to-image"  # noqa: E731
            raise CheckpointError(f"{name}: its UNet takes {file_ch} input channels ({kind(file_ch)}) but "
                                  f"{config}/unet/config.json says in_channels {cfg_ch} ({kind(cfg_ch)}); "
                                  f"give the config folder of {'an' if file_ch == 9 else 'a'} {kind(file_ch)} model")
    components = split(tensors, configs, ema=ema, name=name)
    try:
        check_shapes(configs, components)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    return SingleFile(family=family, configs=configs, tensors=components, ema=ema, model_index=model_index)


# --- diffusers components → single file ---

def join(configs: Mapping[str, dict], tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The single-file (ldm / sgm) tensors of diffusers-layout components, the inverse of `split`. Text
    encoders may come with or without transformers' `text_model.` prefix; legacy VAE attention names are
    accepted. Strict (`check_shapes`): every model tensor present with its shape, every given tensor used
    (position_ids aside)."""
    cfgs = _model_configs(configs)
    # SD 2.x folders look like SD 1.x ones, but their ldm files keep OpenCLIP ViT-H (exact GELU) in its own layout
    if "text_encoder_2" not in cfgs and cfgs["text_encoder"].hidden_act != "quick_gelu":
        raise CheckpointError(f"text encoder with hidden_act {cfgs['text_encoder'].hidden_act!r} is not OpenAI CLIP "
                              f"(an SD 2.x pipeline?); supported: {SUPPORTED}")
    if configs["scheduler"].get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"prediction_type {configs['scheduler']['prediction_type']!r} (an SD 2.x pipeline?); "
                              f"supported: {SUPPORTED}")
    check_shapes(configs, tensors)
    out: dict[str, torch.Tensor] = {}
    for component, (file_table, _) in key_tables(configs).items():
        given = tensors[component]
        if component == "vae":
            given = vae_keys.rename_legacy_attention(given)
        native = {k: given[v] for k, v in _diffusers_table(component, cfgs[component], given).items()}
        if component == "text_encoder_2":
            out |= clip_keys.native_to_openclip(file_table, native)
        elif component == "vae":
            out |= {file_table[k]: vae_keys.native_to_ldm(k, t) for k, t in native.items()}
        else:
            out |= {file_table[k]: t for k, t in native.items()}
    return out
