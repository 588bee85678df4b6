"""The parity debugger (`python -m ldm_inpaint.parity`) on tiny random models: on an unaltered model every stage
agrees with diffusers; with one weight of one UNet ResBlock moved, it names the first UNet output as the first
difference and that ResBlock as the first differing module."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

import ldm_inpaint
from ldm_inpaint.parity import compare, load_reference, main, unet_modules

TOL = 1e-4
STEPS = 2
TEXT = [f"{what} (text_encoder, {call})" for call in ("prompt", "negative")
        for what in ("token ids", "text embeddings")]
SD_INPAINT_STAGES = [
    *TEXT, "vae encoder 0: image", "vae encoder 0: moments",
    "unet context", "start latents", "masked-image latents", "mask",
    *[f"step {i}: {what}" for i in range(STEPS) for what in ("timestep", "unet output", "latents")],
    "decoded image", "output image",
]
# the tiny SD UNet (tests/conftest.py): two levels, attention at the first only, in the order ours runs them
SD_MODULES = [
    "conv_in",
    "down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1", "down_blocks.0.attentions.1",
    "down_blocks.0.downsample = down_blocks.0.downsamplers.0.conv", "down_blocks.0",
    "down_blocks.1.resnets.0", "down_blocks.1.resnets.1", "down_blocks.1",
    "mid_block.resnet_1 = mid_block.resnets.0", "mid_block.attention = mid_block.attentions.0",
    "mid_block.resnet_2 = mid_block.resnets.1", "mid_block",
    "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.resnets.2",
    "up_blocks.0.upsample = up_blocks.0.upsamplers.0.conv", "up_blocks.0",
    *[f"up_blocks.1.{kind}.{j}" for j in range(3) for kind in ("resnets", "attentions")], "up_blocks.1",
    "conv_out",
]


@pytest.fixture(scope="module")
def sd_reference(sd_inpaint_dir):
    return load_reference(sd_inpaint_dir, "sd15", "inpaint")


def test_sd_inpaint_every_stage_and_module_agrees_with_diffusers(sd_inpaint_dir, sd_reference):
    report = compare(sd_inpaint_dir, steps=STEPS, modules=True, reference=sd_reference)
    assert [s.name for s in report.stages] == SD_INPAINT_STAGES
    assert [s.name for s in report.modules] == SD_MODULES
    assert report.ok, report.format()
    assert report.first_difference is None and report.first_module_difference is None
    by_name = {s.name: s for s in report.stages}
    assert by_name["step 0: unet output"].shape == (2, 4, 8, 8)  # guided: both halves, at the 64×64 default
    assert by_name["masked-image latents"].shape == (2, 4, 8, 8) and by_name["mask"].shape == (2, 1, 8, 8)


def test_sdxl_inpaint_every_stage_agrees_with_diffusers(sdxl_inpaint_dir):
    report = compare(sdxl_inpaint_dir, steps=3, negative_prompt="blurry", height=48, width=64)
    names = [s.name for s in report.stages]
    for encoder in ("text_encoder", "text_encoder_2"):
        for call in ("prompt", "negative"):
            assert f"token ids ({encoder}, {call})" in names and f"text embeddings ({encoder}, {call})" in names
    for stage in ("pooled (text_encoder_2, prompt)", "pooled (text_encoder_2, negative)", "unet text_embeds",
                  "unet time_ids", "start latents", "masked-image latents", "mask", "step 1: latents",
                  "decoded image", "output image"):
        assert stage in names
    assert "step 2: unet output" not in names  # SDXL inpainting's default strength 0.9999 skips one of 3 steps
    assert report.ok, report.format()


def test_altered_resnet_is_named_as_the_first_difference(sd_inpaint_dir, sd_reference):
    ours = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    with torch.no_grad():
        ours.unet.up_blocks[1].resnets[0].conv1.weight[0, 0, 1, 1] += 1e-2
    report = compare(sd_inpaint_dir, steps=STEPS, modules=True, pipeline=ours, reference=sd_reference)
    assert report.first_difference.name == "step 0: unet output"
    assert report.first_module_difference.name == "up_blocks.1.resnets.0"
    assert report.first_block_difference == "up_blocks.1"
    assert "first module beyond 0.0001: up_blocks.1.resnets.0" in report.format()
    assert not report.ok


def test_modules_map_onto_diffusers_by_the_key_table(sd_inpaint_dir, sd_reference):
    ours = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    names = dict(sd_reference.unet.named_modules())
    for mine, theirs in unet_modules(ours.unet).items():
        assert theirs in names, mine
        # the same module: the same weights
        ours_params = [p.shape for p in ours.unet.get_submodule(mine).parameters()]
        assert sorted(ours_params) == sorted(p.shape for p in names[theirs].parameters()), mine


def test_main_prints_the_table_and_exits_0(sd_inpaint_dir, capsys):
    assert main([str(sd_inpaint_dir), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 0: unet output" in out and "decoded image" in out
    assert out.rstrip().endswith("stages agree within 0.0001")


def test_main_exits_1_naming_the_first_difference(sd_inpaint_dir, capsys, monkeypatch):
    # our attention (text encoder, VAE and UNet alike, through the one swap point) made 0.1 % too large
    from ldm_inpaint.models import attention as attn

    fused = attn.fused_attention
    monkeypatch.setattr(attn, "attention", lambda q, k, v, heads, causal=False: fused(q, k, v, heads, causal) * 1.001)
    assert main([str(sd_inpaint_dir), "--steps", "1"]) == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].startswith("first difference beyond 0.0001: ")
    first = lines[-1].removeprefix("first difference beyond 0.0001: ").rsplit(" (", 1)[0]
    assert "text" in first  # the text encoder runs first
    flagged = [line for line in lines if line.endswith("DIFFERS")]
    assert flagged[0].startswith(first)


@pytest.mark.parametrize("args", [
    ["--task", "txt2img"],  # a 9-channel UNet only inpaints
    ["--steps", "0"],
    ["--tol", "-1"],
    ["--scheduler", "no_such_scheduler"],
    ["--mask", "{tmp}/mask.png"],  # a mask without an image
    ["--image", "{tmp}/missing.png"],
    ["--no-such-flag"],
])
def test_bad_usage_exits_2_with_one_line(sd_inpaint_dir, tmp_path, capsys, args):
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    assert main([str(sd_inpaint_dir), *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_missing_model_folder_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_without_diffusers_says_what_to_install(sd_inpaint_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert main([str(sd_inpaint_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install diffusers transformers" in err and "\n" not in err
