"""LoRA: the training modules, files in kohya and diffusers (peft) layouts, and merging them into a pipeline with
the same images as diffusers' `load_lora_weights` (fp32, tiny random models, random non-zero LoRA weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline, make_image, make_mask
from PIL import Image
from safetensors import safe_open

import ldm_inpaint
from ldm_inpaint.checks import InputError
from ldm_inpaint.family import SD15, SDXL
from ldm_inpaint.lora import TEXT_TARGETS, UNET_TARGETS, LoRALinear, add_lora, lora_modules, save_lora
from ldm_inpaint.sample import main
from parity import record

TOL = 1e-4
STEPS = 2
W, H = 64, 48


def write_lora(folder, tmp_path, family, name="lora.safetensors", rank=4, alpha=None, seed=0, text=True, **kw):
    """Adapt a freshly loaded pipeline's UNet (and text encoders) with random non-zero weights and save them."""
    pipe = ldm_inpaint.load_pipeline(folder)
    torch.manual_seed(seed)
    models = dict(unet=pipe.unet)
    if text:
        models |= dict(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    for component, model in models.items():
        if model is not None:
            add_lora(model, rank, alpha, UNET_TARGETS if component == "unet" else TEXT_TARGETS)
            for m in lora_modules(model).values():
                m.up.data = 0.3 * torch.randn_like(m.up)  # trained-like: up is zero only at the start
    path = tmp_path / name
    save_lora(path, **{k: v for k, v in models.items() if v is not None}, family=family, **kw)
    return path


def inpaint(pipe, ours: bool, **kw):
    args = dict(prompt="a red brick wall", image=make_image(W, H), mask_image=make_mask(W, H), height=H, width=W,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    if ours:
        args["progress"] = False
    return pipe(**args, **kw).images


def assert_same_as_diffusers(folder, cls, path, scale=1.0):
    ours = ldm_inpaint.load_pipeline(folder)
    plain, plain_context = inpaint(ours, True), ours.encode_prompt(["a red brick wall"])[0]
    ours.load_lora(path, scale=scale)
    got, context = inpaint(ours, True), ours.encode_prompt(["a red brick wall"])[0]
    ref = diffusers_pipeline(cls, folder)
    ref.load_lora_weights(str(path.parent), weight_name=path.name)
    expected = inpaint(ref, False, cross_attention_kwargs={"scale": scale})  # scales UNet and text encoders
    diff = record(float(np.abs(got - expected).max()))
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL}"
    assert np.abs(got - plain).max() > 100 * TOL  # the LoRA changed the picture: the match is not vacuous
    # the text encoders' share, on its own: the prompt embeddings (SD 1.x: one encoder; SDXL: both, concatenated)
    expected_context = ref.encode_prompt("a red brick wall", device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False, lora_scale=scale)[0]
    assert record(float((context - expected_context).abs().max())) <= TOL
    assert (context - plain_context).abs().max() > 100 * TOL


# --- a. the training modules -------------------------------------------------------------------------------------

def test_add_lora_starts_at_the_base_model_and_trains_only_the_lora(sd_inpaint_dir):
    unet = ldm_inpaint.load_pipeline(sd_inpaint_dir).unet
    x, context = torch.randn(1, 9, 8, 8), torch.randn(1, 77, 32)
    before = unet(x, 10, context)
    unet.requires_grad_(False)
    params = add_lora(unet, rank=4, alpha=8)
    adapted = lora_modules(unet)
    assert len(adapted) == 4 * 2 * 6  # to_q/k/v/out of attn1 and attn2 in 6 transformer blocks (2 down, mid, 3 up)
    assert all(name.rsplit(".", 1)[-1] in UNET_TARGETS for name in adapted)
    assert torch.equal(unet(x, 10, context), before)  # up is zero
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}

    optimizer = torch.optim.SGD(params, lr=1.0)
    unet(x, 10, context).square().mean().backward()
    optimizer.step()
    assert all(m.up.abs().max() > 0 for m in adapted.values())
    assert (unet(x, 10, context) - before).abs().max() > 1e-4


def test_lora_linear_is_base_plus_scaled_update_in_the_input_dtype():
    base = torch.nn.Linear(6, 5).bfloat16()
    lora = LoRALinear(base, rank=2, alpha=1)
    lora.up.data = torch.randn(5, 2)
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    expected = base(x) + (x @ lora.down.bfloat16().T @ lora.up.bfloat16().T) * 0.5
    assert lora(x).dtype == torch.bfloat16 and torch.equal(lora(x), expected)
    assert lora.down.dtype == torch.float32  # trained in fp32 whatever the base's dtype


def test_add_lora_without_matching_modules_is_one_line(sd_inpaint_dir):
    text_encoder = ldm_inpaint.load_pipeline(sd_inpaint_dir).text_encoder
    with pytest.raises(InputError, match="TEXT_TARGETS") as e:
        add_lora(text_encoder, 4)  # UNET_TARGETS by default
    assert "\n" not in str(e.value)


# --- the files ---------------------------------------------------------------------------------------------------

def test_kohya_file_names_modules_as_kohya_does(sd_inpaint_dir, sdxl_dir, tmp_path):
    sd = safe_open(write_lora(sd_inpaint_dir, tmp_path, SD15, "sd.safetensors", alpha=2,
                              metadata={"ss_steps": 100, "note": "x"}), "pt")
    keys = set(sd.keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert sd.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 2
    meta = sd.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_steps"] == "100"
    assert meta["note"] == "x" and meta["ss_base_model_version"] == "sd_v1"

    xl = set(safe_open(write_lora(sdxl_dir, tmp_path, SDXL, "xl.safetensors"), "pt").keys())
    # tiny SDXL: attention at level 1 only, 2 layers per block, so input_blocks.4 is its first transformer
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in xl
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0.alpha" in xl
    assert "lora_te1_text_model_encoder_layers_2_self_attn_out_proj.lora_up.weight" in xl
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight" in xl


def test_peft_file_names_modules_as_diffusers_does(sd_inpaint_dir, tmp_path):
    f = safe_open(write_lora(sd_inpaint_dir, tmp_path, SD15, format="peft", alpha=8), "pt")
    keys = set(f.keys())
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"
    assert key in keys and "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_A.weight" in keys
    assert not any("alpha" in k for k in keys) and "lora_adapter_metadata" not in f.metadata()


def test_save_lora_is_atomic_and_checks_its_arguments(sd_inpaint_dir, tmp_path):
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    with pytest.raises(InputError, match="add_lora"):
        save_lora(tmp_path / "x.safetensors", unet=pipe.unet)
    add_lora(pipe.unet, 2)
    with pytest.raises(InputError, match="format"):
        save_lora(tmp_path / "x.safetensors", unet=pipe.unet, format="ckpt")
    assert list(tmp_path.iterdir()) == []


# --- b. the same images as diffusers' load_lora_weights -----------------------------------------------------------

@pytest.mark.parametrize("format", ["kohya", "peft"])
@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (8, 1.0), (2, 0.5)])
def test_sd15_inpaint_lora_matches_diffusers(sd_inpaint_dir, tmp_path, format, alpha, scale):
    path = write_lora(sd_inpaint_dir, tmp_path, SD15, alpha=alpha, format=format)
    assert_same_as_diffusers(sd_inpaint_dir, "StableDiffusionInpaintPipeline", path, scale)


@pytest.mark.parametrize("format", ["kohya", "peft"])
def test_sdxl_lora_matches_diffusers(sdxl_dir, tmp_path, format):
    path = write_lora(sdxl_dir, tmp_path, SDXL, alpha=2, format=format)
    assert_same_as_diffusers(sdxl_dir, "StableDiffusionXLInpaintPipeline", path, scale=0.5)


def test_reads_the_peft_file_diffusers_writes_with_alpha_in_its_header(sd_inpaint_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    kohya = write_lora(sd_inpaint_dir, tmp_path, SD15, alpha=8)
    ref = diffusers_pipeline("StableDiffusionInpaintPipeline", sd_inpaint_dir)
    ref.load_lora_weights(str(tmp_path), weight_name=kohya.name, adapter_name="a")
    # diffusers' training scripts save this way: unscaled weights, lora_alpha / r (8 / 4) in lora_adapter_metadata
    ref.save_lora_weights(tmp_path / "diffusers", weight_name="lora.safetensors",
                          unet_lora_layers=get_peft_model_state_dict(ref.unet, adapter_name="a"),
                          text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder, adapter_name="a"),
                          unet_lora_adapter_metadata=ref.unet.peft_config["a"].to_dict(),
                          text_encoder_lora_adapter_metadata=ref.text_encoder.peft_config["a"].to_dict())
    path = tmp_path / "diffusers" / "lora.safetensors"
    assert json.loads(safe_open(path, "pt").metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    ours = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    ours.load_lora(path)
    diff = record(float(np.abs(inpaint(ours, True) - inpaint(ref, False)).max()))
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL}"


# --- c. merging ----------------------------------------------------------------------------------------------------

def test_merge_survives_weight_release_and_loras_stack(sd_inpaint_dir, tmp_path):
    a = write_lora(sd_inpaint_dir, tmp_path, SD15, "a.safetensors", seed=1)
    b = write_lora(sd_inpaint_dir, tmp_path, SD15, "b.safetensors", seed=2, format="peft")
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    assert pipe.release_weights
    weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    file_ptr = weight.data_ptr()
    plain = inpaint(pipe, True)
    pipe.load_lora(a)
    assert weight.data_ptr() != file_ptr  # a new tensor, not written into the (memory-mapped) file
    first = inpaint(pipe, True)  # releases every model's weights after its stage
    assert np.array_equal(inpaint(pipe, True), first) and np.abs(first - plain).max() > 100 * TOL

    pipe.load_lora(b, scale=0.7)
    both = inpaint(pipe, True)
    ref = diffusers_pipeline("StableDiffusionInpaintPipeline", sd_inpaint_dir)
    ref.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    ref.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[1.0, 0.7])
    diff = record(float(np.abs(both - inpaint(ref, False)).max()))
    assert diff <= TOL and np.abs(both - first).max() > 100 * TOL


def test_unknown_key_is_one_line_naming_it(sd_inpaint_dir, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "typo.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight": torch.ones(2, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_up.weight": torch.ones(32, 2)},
              path)
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    with pytest.raises(InputError, match="attn1_to_z") as e:
        pipe.load_lora(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["sdxl_on_sd15", "sd15_unet_on_sdxl", "full_checkpoint", "shapes"])
def test_wrong_file_is_one_line_and_changes_nothing(sd_inpaint_dir, sdxl_dir, tmp_path, case):
    from safetensors.torch import save_file

    if case == "sdxl_on_sd15":
        path, folder, words = write_lora(sdxl_dir, tmp_path, SDXL), sd_inpaint_dir, "SDXL"
    elif case == "sd15_unet_on_sdxl":
        path, folder, words = write_lora(sd_inpaint_dir, tmp_path, SD15, text=False), sdxl_dir, "another model"
    elif case == "full_checkpoint":
        path, folder, words = tmp_path / "model.safetensors", sd_inpaint_dir, "not a LoRA file"
        save_file({"model.diffusion_model.out.2.weight": torch.ones(4)}, path)
    else:  # the right names with a rank-2 update of the wrong width
        path, folder, words = tmp_path / "shapes.safetensors", sd_inpaint_dir, "does not fit"
        name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        save_file({f"{name}.lora_down.weight": torch.ones(2, 768), f"{name}.lora_up.weight": torch.ones(768, 2)}, path)
    pipe = ldm_inpaint.load_pipeline(folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(InputError, match=words) as e:
        pipe.load_lora(path)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


# --- d. the command line -------------------------------------------------------------------------------------------

def test_cli_lora_flag_runs_and_is_recorded(sd_inpaint_dir, tmp_path):
    lora = write_lora(sd_inpaint_dir, tmp_path, SD15)
    make_image().save(tmp_path / "photo.png")
    make_mask().save(tmp_path / "mask.png")
    args = ["--model", str(sd_inpaint_dir), "--image", str(tmp_path / "photo.png"), "--mask",
            str(tmp_path / "mask.png"), "--prompt", "a red brick wall", "--steps", "2", "--seed", "7", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "lora.png"), "--lora", f"{lora}:0.7"]) == 0
    written = Image.open(tmp_path / "lora.png")
    assert json.loads(written.text["parameters"])["lora"] == [f"{lora}:0.7"]

    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    pipe.load_lora(lora, 0.7)
    expected = pipe("a red brick wall", image=make_image(), mask_image=make_mask(), num_inference_steps=2,
                    generator=torch.Generator().manual_seed(7), progress=False).images[0]
    assert np.array_equal(np.asarray(written), np.asarray(expected))
    assert not np.array_equal(np.asarray(written), np.asarray(Image.open(tmp_path / "plain.png")))


def test_cli_missing_lora_file_is_one_line(sd_inpaint_dir, tmp_path, capsys):
    args = ["--model", str(sd_inpaint_dir), "--prompt", "a cat", "--out", str(tmp_path / "o.png"),
            "--lora", str(tmp_path / "nowhere.safetensors:0.5")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lora") and err.count("\n") == 1
