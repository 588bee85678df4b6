"""`python -m weights_convert`: a tiny diffusers folder → single file that diffusers' own `from_single_file` loads
to the same weights and image (so our ldm / sgm layout is the real one) → folder again with the original tensors,
for SD 1.5 (inpainting) and SDXL (inpainting); plus the CLI's one-line errors and atomic outputs.

The tiny SDXL encoders (conftest) have different widths on purpose: diffusers' from_single_file tells CLIP-L from
OpenCLIP by width alone and, without accelerate, loads text encoders non-strictly, so equal widths would load
CLIP-L's weights into both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, make_mask
from safetensors.torch import load_file

from weights_convert.__main__ import main
from weights_convert.common import WEIGHT_FILES

STEPS = 2


def image_of(pipe, inpaint: bool) -> np.ndarray:
    # Weights memory-mapped from a .safetensors file sit at arbitrary alignments, and CPU matmul kernels round
    # differently by alignment (measured: 2.7e-6 on the SDXL image with bitwise-equal weights); own copies make the
    # comparison exact.
    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for p in module.parameters():
                    p.data = p.data.clone()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=make_image(), mask_image=make_mask()) if inpaint else {}
    return pipe(prompt="a red brick wall", negative_prompt="blurry", num_inference_steps=STEPS, height=48, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def component_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The folder's weights; text-encoder keys without transformers' optional `text_model.` prefix."""
    out = {}
    for c, (name, _) in WEIGHT_FILES.items():
        if (folder / c / name).is_file():
            out[c] = {k.removeprefix("text_model."): t for k, t in load_file(folder / c / name).items()}
    return out


CASES = {  # family: (conftest fixture, diffusers pipeline, inpainting)
    "sd15-inpainting": ("sd_inpaint_dir", "StableDiffusionInpaintPipeline", True),
    "sd15": ("sd_dir", "StableDiffusionPipeline", False),
    "sdxl-inpainting": ("sdxl_inpaint_dir", "StableDiffusionXLInpaintPipeline", True),
    "sdxl-base": ("sdxl_dir", "StableDiffusionXLPipeline", False),
}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "sdxl-base" else f for f in CASES])
def test_folder_to_single_file_loads_in_diffusers_and_converts_back_exactly(family, request, tmp_path):
    import diffusers

    fixture, cls_name, inpaint = CASES[family]
    folder = request.getfixturevalue(fixture)
    cls = getattr(diffusers, cls_name)
    extra = dict(add_watermarker=False) if "XL" in cls_name else dict(safety_checker=None)
    single = tmp_path / "model.safetensors"
    assert main([str(folder), str(single)]) == 0

    from_folder = cls.from_pretrained(folder, **extra)
    from_single = cls.from_single_file(str(single), config=str(folder), local_files_only=True, **extra)
    # diffusers loads single-file text encoders non-strictly without accelerate: compare every weight too
    for c in WEIGHT_FILES:
        if hasattr(from_folder, c):
            a, b = getattr(from_folder, c).state_dict(), getattr(from_single, c).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), c
    expected, got = image_of(from_folder, inpaint), image_of(from_single, inpaint)
    diff = float(np.abs(got - expected).max())
    print(f"{family}: from_single_file vs folder max abs diff {diff:.3g}")
    assert diff == 0.0 and expected.std() > 1e-3

    back = tmp_path / "back"
    assert main([str(single), str(back), "--config", str(folder)]) == 0
    original, converted = component_tensors(folder), component_tensors(back)
    assert original.keys() == converted.keys()
    for c in original:
        assert original[c].keys() == converted[c].keys(), c
        assert all(torch.equal(original[c][k], converted[c][k]) for k in original[c]), c
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == cls_name
    reloaded = diffusers.DiffusionPipeline.from_pretrained(back, **extra)  # diffusers reads our folder
    assert type(reloaded).__name__ == cls_name
    for c in original:
        assert all(torch.equal(t, from_folder.components[c].state_dict()[k])
                   for k, t in getattr(reloaded, c).state_dict().items()), c


def test_dtype_option_casts_floating_weights(sd_inpaint_dir, tmp_path):
    single = tmp_path / "model.safetensors"
    assert main([str(sd_inpaint_dir), str(single), "--dtype", "fp16"]) == 0
    tensors = load_file(single)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # ldm's 1×1 conv form

    back = tmp_path / "back"
    assert main([str(single), str(back), "--config", str(sd_inpaint_dir), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(back / "unet" / WEIGHT_FILES["unet"][0]).values()} == {torch.bfloat16}


def test_official_configs_are_the_default_and_a_misfit_leaves_nothing(sd_inpaint_dir, tmp_path):
    """Without --config the official configs of the detected family are used: a tiny file fails their shape
    check with one line and leaves nothing behind."""
    single = tmp_path / "model.safetensors"
    assert main([str(sd_inpaint_dir), str(single)]) == 0
    assert main([str(single), str(tmp_path / "out")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


BAD = {
    "exists": (lambda d, t: [str(d), str(t / "exists.safetensors")], "already exists"),
    "folder_to_folder": (lambda d, t: [str(d), str(t / "out")], "must be a single .safetensors"),
    "missing": (lambda d, t: [str(t / "nope.ckpt"), str(t / "out")], "not found"),
    "ema_on_folder": (lambda d, t: [str(d), str(t / "x.safetensors"), "--ema"], "single-file sources"),
    "vae_only": (lambda d, t: [str(t / "vae.safetensors"), str(t / "out")], "VAE-only"),
}


@pytest.mark.parametrize("case", BAD)
def test_cli_errors_are_one_line_and_leave_nothing(sd_inpaint_dir, tmp_path, capsys, case):
    from safetensors.torch import save_file

    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    (tmp_path / "exists.safetensors").write_bytes(b"")
    before = sorted(os.listdir(tmp_path))
    args, words = BAD[case]
    assert main(args(sd_inpaint_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_python_m_weights_convert_runs_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "weights_convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
