"""Single-file checkpoints (CompVis ldm / Stability sgm layouts): full key coverage of every official release on
the meta device, `.ckpt` and EMA handling, and clear refusals of files that are not SD 1.x / SDXL checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_inpaint.family import VARIANTS, family_of_config
from weights_convert import single_file
from weights_convert.common import CheckpointError

KEYS = Path(__file__).parent / "data" / "keys"
FAMILIES = tuple(VARIANTS)


def meta_tensors(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _squeeze_1x1(shape: tuple) -> tuple:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_keys_map_onto_diffusers_keys_one_to_one(family):
    """Every tensor of the official single file is renamed to exactly one diffusers key of the same component with
    the diffusers shape (OpenCLIP's in_proj split in thirds, text_projection transposed, VAE attention 1×1 convs
    as Linear weights), or is one of the ignored tensors; every diffusers key is filled exactly once."""
    file_shapes = json.loads((KEYS / f"{family}.single-file.json").read_text())
    diffusers_shapes = json.loads((KEYS / f"{family}.diffusers.json").read_text())
    tensors = meta_tensors(file_shapes)
    assert single_file.detect(tensors) == family

    configs, _ = single_file.official_configs(family)
    components = single_file.split(tensors, configs)  # strict: raises on a missing or unexpected tensor
    assert components.keys() == diffusers_shapes.keys()
    for name, got in components.items():
        assert got.keys() == diffusers_shapes[name].keys(), name
        for key, t in got.items():
            assert tuple(t.shape) == tuple(diffusers_shapes[name][key]), (name, key)

    # each file tensor used once; the rest is exactly the ignore list
    file_keys_used = [v for f, _ in single_file.key_tables(configs).values() for v in f.values()]
    # in each of OpenCLIP's 32 layers q, k, v share one in_proj weight and one bias: 2 repeats of each
    assert len(file_keys_used) - len(set(file_keys_used)) == (32 * 2 * 2 if family_of_config(family).text_encoders == 2 else 0)
    ignored = set(file_shapes) - set(file_keys_used)
    assert ignored <= set(single_file.IGNORE)
    assert len(ignored) == (15 if family.startswith("sd15") else 1)  # 12 schedule + 2 EMA scalars + position_ids
    assert sum(len(c) for c in components.values()) == sum(len(c) for c in diffusers_shapes.values())

    # full-size shape check against the native models (built on the meta device)
    single_file.check_shapes(configs, components)
    # and back: the diffusers tensors give the file's tensors, ignored ones aside, with the file's shapes
    back = single_file.join(configs, components)
    assert back.keys() == set(file_shapes) - ignored
    assert all(tuple(t.shape) == tuple(file_shapes[k]) for k, t in back.items())


def test_openclip_in_proj_split_and_text_projection_transpose():
    """The fused in_proj rows are [q; k; v] and text_projection is stored for x @ P (a Linear weight is P.T)."""
    from ldm_inpaint.models.clip import CLIPTextConfig
    from weights_convert import clip

    cfg = CLIPTextConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         projection_dim=3, hidden_act="gelu")
    table = clip.openclip_keys(cfg, prefix="")
    in_proj = torch.arange(12 * 4.0).view(12, 4)
    proj = torch.arange(12.0).view(4, 3)
    assert torch.equal(clip.openclip_to_native("layers.0.self_attn.k_proj.weight", in_proj), in_proj[4:8])
    assert torch.equal(clip.openclip_to_native("text_projection.weight", proj), proj.T)
    in_bias = torch.arange(12.0)
    stored = {"transformer.resblocks.0.attn.in_proj_weight": in_proj,
              "transformer.resblocks.0.attn.in_proj_bias": in_bias, "text_projection": proj}
    native = {k: clip.openclip_to_native(k, stored.get(v, torch.zeros(1))) for k, v in table.items()}
    assert torch.equal(native["layers.0.self_attn.v_proj.bias"], in_bias[8:])
    back = clip.native_to_openclip(table, native)
    assert torch.equal(back["transformer.resblocks.0.attn.in_proj_weight"], in_proj)
    assert torch.equal(back["transformer.resblocks.0.attn.in_proj_bias"], in_bias)
    assert torch.equal(back["text_projection"], proj)


# --- tiny real files: .ckpt, EMA, refusals ---

@pytest.fixture(scope="module")
def tiny_file_tensors(sd_inpaint_dir):
    """The tiny SD 1.5-inpainting folder as single-file tensors, with the official extras."""
    from weights_convert.single_file import read_folder

    configs, components = read_folder(sd_inpaint_dir)
    tensors = single_file.join(configs, components)
    tensors |= {name: torch.linspace(0, 1, 1000) for name in single_file.SCHEDULE_BUFFERS}
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return tensors, components


def test_ckpt_with_nested_state_dict_and_ema_shadows(sd_inpaint_dir, tiny_file_tensors, tmp_path):
    """Non-pruned SD 1.x files: the UNet weights by default, the `model_ema.*` shadows with ema=True."""
    from weights_convert.unet import LDM_PREFIX, ldm_ema_key

    tensors, components = tiny_file_tensors
    shadows = {ldm_ema_key(k): t + 1 for k, t in tensors.items() if k.startswith(LDM_PREFIX)}
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {**tensors, **shadows}, "global_step": 470000, "epoch": 3}, path)

    sf = single_file.read(path, config=sd_inpaint_dir)
    assert sf.family == "sd15-inpainting" and not sf.ema
    assert sf.tensors["unet"].keys() == components["unet"].keys()
    assert all(torch.equal(sf.tensors["unet"][k], t) for k, t in components["unet"].items())
    assert all(torch.equal(sf.tensors["vae"][k], t) for k, t in components["vae"].items())

    sf = single_file.read(path, config=sd_inpaint_dir, ema=True)
    assert sf.ema and all(torch.equal(sf.tensors["unet"][k], t + 1) for k, t in components["unet"].items())

    # an incomplete set of shadows is refused
    partial = dict(list(shadows.items())[:-1])
    torch.save({"state_dict": {**tensors, **partial}}, path)
    with pytest.raises(CheckpointError, match="EMA weights"):
        single_file.read(path, config=sd_inpaint_dir)


def test_safetensors_file_loads_with_the_same_tensor_objects(sd_inpaint_dir, tiny_file_tensors, tmp_path):
    tensors, components = tiny_file_tensors
    path = tmp_path / "tiny.safetensors"
    save_file(tensors, path)
    sf = single_file.read(path, config=sd_inpaint_dir)
    assert all(torch.equal(sf.tensors["text_encoder"]["text_model." + k.removeprefix("text_model.")], t)
               for k, t in components["text_encoder"].items())
    with pytest.raises(CheckpointError, match="no EMA weights"):
        single_file.read(path, config=sd_inpaint_dir, ema=True)


def test_unexpected_tensor_is_refused(sd_inpaint_dir, tiny_file_tensors, tmp_path):
    tensors, _ = tiny_file_tensors
    path = tmp_path / "extra.safetensors"
    save_file({**tensors, "model.diffusion_model.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.diffusion_model.extra.weight"):
        single_file.read(path, config=sd_inpaint_dir)


def test_inpainting_file_with_text_to_image_config_folder_is_refused(sd_dir, tiny_file_tensors, tmp_path):
    tensors, _ = tiny_file_tensors
    path = tmp_path / "tiny9.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="takes 9 input channels.*in_channels 4"):
        single_file.read(path, config=sd_dir)


def test_pickle_with_an_object_is_refused_with_safetensors_advice(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": Path("x")}, path)
    with pytest.raises(CheckpointError, match="safetensors"):
        single_file.read(path)


def _unet_and_vae(context: int = 768) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, context),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}


UNSUPPORTED = {
    "sd2": ({**_unet_and_vae(1024), "cond_stage_model.model.positional_embedding": torch.zeros(77, 1024)},
            "SD 2.x.*cond_stage_model.model"),
    "vae_only": ({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, "VAE-only"),
    "vae_only_bare": ({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)},
                      "VAE-only"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(1),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.zeros(())}, "LoRA"),
    "lora_peft": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}, "LoRA"),
    "unet_only": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "UNet-only"),
    "no_text_encoder": (_unet_and_vae(), "incomplete: no CLIP"),
    "conv_in_8": ({**_unet_and_vae(), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 8, 3, 3),
                   "cond_stage_model.transformer.text_model.x": torch.zeros(1)}, "conv_in taking 8 channels"),
    "refiner": ({**_unet_and_vae(1280), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}, "refiner"),
    "diffusers_unet": ({"conv_in.weight": torch.zeros(1), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)},
                       "diffusers-layout"),
    "unknown": ({"foo.weight": torch.zeros(1)}, "no Stable Diffusion UNet"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_files_are_refused_naming_what_was_found(case, tmp_path):
    tensors, words = UNSUPPORTED[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=words) as e:
        single_file.read(path)
    assert f"{case}.safetensors" in str(e.value) and "supported" in str(e.value)
