"""load_pipeline on every source it accepts: a diffusers folder, a single .safetensors or .ckpt file in the
original layout (fp32 or fp16 storage, with the official extra tensors), and the same images from each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_image, make_mask
from safetensors.torch import load_file, save_file

import ldm_inpaint
from ldm_inpaint.loading import build_unet
from ldm_inpaint.memory import release
from weights_convert.__main__ import main as convert
from weights_convert.common import CheckpointError, read_component

CASES = {"sd15-inpainting": ("sd_inpaint_dir", True), "sdxl-inpainting": ("sdxl_inpaint_dir", True),
         "sd15": ("sd_dir", False)}


def image(pipe, inpaint):
    kw = dict(image=make_image(), mask_image=make_mask()) if inpaint else dict(height=48, width=64)
    return pipe("a red brick wall", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", progress=False, **kw).images


@pytest.mark.parametrize("family", CASES)
def test_single_file_gives_the_folder_image(family, request, tmp_path):
    fixture, inpaint = CASES[family]
    folder = request.getfixturevalue(fixture)
    single = tmp_path / "model.safetensors"
    assert convert([str(folder), str(single)]) == 0
    expected = image(ldm_inpaint.load_pipeline(folder), inpaint)
    got = image(ldm_inpaint.load_pipeline(single, config=folder), inpaint)
    # same tensors; memory-mapped weights at other file offsets may round differently in CPU kernels
    assert np.abs(got - expected).max() <= 1e-5


def test_ckpt_fp16_with_official_extras_loads(sd_inpaint_dir, tmp_path):
    single = tmp_path / "model.safetensors"
    assert convert([str(sd_inpaint_dir), str(single)]) == 0
    tensors = {k: t.half() for k, t in load_file(single).items()}
    tensors["alphas_cumprod"] = torch.ones(1000)  # schedule buffers and EMA counters ship in official files
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1}, ckpt)
    pipe = ldm_inpaint.load_pipeline(ckpt, config=sd_inpaint_dir)
    ref = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    assert torch.equal(pipe.unet.conv_in.weight, ref.unet.conv_in.weight.half().float())
    assert image(pipe, True).shape == (1, 48, 64, 3)


def test_single_file_with_a_missing_key_is_refused(sd_inpaint_dir, tmp_path):
    single = tmp_path / "model.safetensors"
    assert convert([str(sd_inpaint_dir), str(single)]) == 0
    tensors = load_file(single)
    tensors.pop("model.diffusion_model.out.2.bias")
    save_file(tensors, single)
    with pytest.raises(CheckpointError, match="out.2.bias|conv_out.bias"):
        ldm_inpaint.load_pipeline(single, config=sd_inpaint_dir)


@pytest.mark.parametrize("content", [b"", b"hello, this is text", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError):
        ldm_inpaint.load_pipeline(bad)


def test_config_only_with_single_files(sd_inpaint_dir):
    with pytest.raises(ValueError, match="single-file"):
        ldm_inpaint.load_pipeline(sd_inpaint_dir, config=sd_inpaint_dir)


def test_unknown_repo_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        ldm_inpaint.load_pipeline("nobody-here/no-such-model")


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_downloads_only_one_variant_of_the_weights(variant):
    from fnmatch import fnmatch

    from ldm_inpaint.hub import weight_patterns

    files = ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model.fp16-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.bin", "safety_checker/model.safetensors"]
    wanted = [f for f in files if any(fnmatch(f, p) for p in weight_patterns(variant, "safetensors"))]
    if variant is None:
        assert wanted == ["unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model-00001-of-00002.safetensors"]
    else:
        assert wanted == ["unet/diffusion_pytorch_model.fp16.safetensors",
                          "text_encoder_2/model.fp16-00001-of-00002.safetensors"]


def test_folder_variant_files_load(sd_inpaint_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(sd_inpaint_dir, folder)
    for c, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        tensors = {k: t.half() for k, t in load_file(folder / c / f"{name}.safetensors").items()}
        save_file(tensors, folder / c / f"{name}.fp16.safetensors")
    pipe = ldm_inpaint.load_pipeline(folder, variant="fp16")
    assert pipe.unet.conv_in.weight.dtype == torch.float32  # fp16 storage, loaded in the asked dtype
    ref = ldm_inpaint.load_pipeline(folder)
    assert torch.equal(pipe.unet.conv_in.weight, ref.unet.conv_in.weight.half().float())


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Exploit()}, bad)
    with pytest.raises(CheckpointError, match="safetensors"):
        ldm_inpaint.load_pipeline(bad)
    assert not marker.exists()


def _resident_pages(tensors) -> int:
    """Pages wholly inside the tensors that are mapped into this process (pagemap 'present' bit)."""
    page, present = 4096, 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        for t in tensors:
            first, end = -(-t.data_ptr() // page), (t.data_ptr() + t.nbytes) // page
            if end > first:
                pagemap.seek(first * 8)
                entries = np.frombuffer(pagemap.read((end - first) * 8), dtype=np.uint64)
                present += int(((entries >> np.uint64(63)) & np.uint64(1)).sum())
    return present


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux only")
def test_a_call_hands_mapped_weights_back_and_the_next_call_is_the_same(sd_inpaint_dir):
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)  # fp32 files, fp32 weights: the mapped file itself
    models = {"unet": pipe.unet, "vae": pipe.vae, "text encoder": pipe.text_encoder}
    pipe.release_weights = False
    first = image(pipe, inpaint=True)
    kept = {name: _resident_pages(m.parameters()) for name, m in models.items()}
    pipe.release_weights = True
    assert np.array_equal(image(pipe, inpaint=True), first)
    left = {name: _resident_pages(m.parameters()) for name, m in models.items()}
    assert all(left[name] == 0 < kept[name] for name in models), (kept, left)
    assert np.array_equal(image(pipe, inpaint=True), first)


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux only")
def test_loading_with_a_cast_hands_back_the_file_pages_it_read(sd_inpaint_dir):
    """Casting reads every page of the file; they must not stay resident until the file is closed (bf16 loading
    of SD 1.5 peaked at 6.3 GiB for 2 GiB of weights)."""
    tensors = read_component(sd_inpaint_dir, "unet")
    config = json.loads((sd_inpaint_dir / "unet" / "config.json").read_text())
    unet = build_unet(config, tensors, torch.bfloat16, "cpu")
    assert _resident_pages(tensors.values()) == 0 < _resident_pages(unet.parameters())


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_keeps_edited_and_cast_weights(sd_inpaint_dir, dtype):
    """Releasing drops only unmodified file pages: an in-place edit (a private copy-on-write page) and weights
    cast into ordinary memory must keep their values."""
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir, dtype=dtype)
    unet = pipe.unet
    expected = {k: v.clone() for k, v in unet.named_parameters()}
    edited = "down_blocks.0.resnets.0.conv1.weight"
    with torch.no_grad():
        unet.get_parameter(edited).mul_(-2)  # an edit of every page of one tensor
    expected[edited] *= -2
    release(unet)
    assert all(torch.equal(v, expected[k]) for k, v in unet.named_parameters())


def test_loading_imports_no_heavy_modules(sd_inpaint_dir):
    """What load time is made of: neither transformers, diffusers nor torch._dynamo (imported by normal_ on the
    meta device, 2 s) may be imported by loading a pipeline."""
    code = ("import sys, ldm_inpaint; ldm_inpaint.load_pipeline(sys.argv[1]); "
            "print([m for m in ('transformers', 'diffusers', 'torch._dynamo') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, str(sd_inpaint_dir)], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_release_without_pagemap_does_nothing(sd_inpaint_dir, monkeypatch):
    """Some sandboxes hide /proc/self/pagemap: a call must still work, just without handing pages back."""
    import ldm_inpaint.memory

    monkeypatch.setattr(ldm_inpaint.memory, "_PAGEMAP", "/nonexistent/pagemap")
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir, dtype=torch.bfloat16)  # a cast: drops source pages
    expected = {k: v.clone() for k, v in pipe.unet.named_parameters()}
    image(pipe, inpaint=True)
    release(pipe.unet)
    assert all(torch.equal(v, expected[k]) for k, v in pipe.unet.named_parameters())
