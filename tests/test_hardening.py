"""Bad input, as a hostile user gives it: every case ends in one `error: …` line with exit status 2 (the CLI) or
an InputError with that line (the Python API), never a traceback, a silent wrong result or a leftover file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, make_mask
from PIL import Image
from safetensors.torch import load_file, save_file

import ldm_inpaint
from ldm_inpaint.checks import InputError
from ldm_inpaint.sample import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-inputs")
    make_image().save(d / "photo.png")
    make_mask().save(d / "mask.png")
    Image.new("L", (64, 48), 0).save(d / "black-mask.png")
    make_image(1800, 1200).save(d / "large.png")  # 2.2 MP
    return d


def cli(model, files, out, *extra):
    return ["--model", str(model), "--image", str(files / "photo.png"), "--mask", str(files / "mask.png"),
            "--prompt", "a red brick wall", "--steps", "2", "--seed", "7", "--no-progress", "--out", str(out), *extra]


def run_cli(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_inpaint.sample", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- the command line, through a subprocess -------------------------------------------------------------------
CLI_BAD = {
    # 1. tracebacks before
    "device_banana": (["--device", "banana"], ["banana", "cpu"]),
    "device_cuda_on_cpu_torch": (["--device", "cuda"], ["cuda", "--device cpu"]),
    "device_mps": (["--device", "mps"], ["mps"]),
    "device_meta": (["--device", "meta"], ["meta"]),
    "clip_skip_50": (["--clip-skip", "50"], ["clip_skip", "≤"]),
    "mask_blur_huge": (["--mask-blur", "1e30", "--preserve-unmasked"], ["mask_blur"]),
    # 2. silent wrong results before
    "guidance_inf": (["--guidance-scale", "inf"], ["guidance_scale", "finite"]),
    "guidance_nan": (["--guidance-scale", "nan"], ["guidance_scale", "finite"]),
    "guidance_1e30": (["--guidance-scale", "1e30"], ["guidance_scale", "≤"]),
    "strength_nan": (["--strength", "nan"], ["strength"]),
    "rescale_2": (["--guidance-rescale", "2"], ["guidance_rescale"]),
    # 4. no upper bounds before
    "outpaint_huge": (["--outpaint", "0,0,100000000,0"], ["outpaint"]),
    "size_huge": (["--height", "100000", "--width", "100000"], ["GiB", "LDM_INPAINT_MAX_MEMORY_GB"]),
    "num_images_huge": (["--num-images", "1000000000"], ["GiB"]),
    "crop_height_huge": (["--crop-to-mask", "4", "--height", "65536", "--width", "65536"], ["GiB"]),
    "mask_grow_huge": (["--mask-grow", "1000000"], ["mask_grow"]),
    # 5. unclear messages before
    "not_an_int": (["--steps", "two"], ["--steps", "invalid int"]),
    "relative_missing_model": (["--model", "models/x.safetensors"], ["not found"]),
    "black_mask": (["--mask", "{files}/black-mask.png"], ["black"]),
    "seed_huge": (["--seed", "99999999999999999999999"], ["--seed", "≤"]),
    "attention_maps_unwritable": (["--attention-maps", "/proc/maps/here"], ["--attention-maps", "/proc"]),
}


@pytest.mark.parametrize("case", CLI_BAD)
def test_cli_bad_input_one_line_no_file(sd_inpaint_dir, files, tmp_path, case):
    extra, words = CLI_BAD[case]
    args = cli(sd_inpaint_dir, files, tmp_path / "out.png", *[a.format(files=files) for a in extra])
    if case == "outpaint_huge":
        args.remove("--mask"), args.remove(str(files / "mask.png"))
    if case == "relative_missing_model":
        args[1] = "models/x.safetensors"
    start = time.monotonic()
    r = run_cli(args, timeout=120)
    assert_one_line_error(r, *words)
    assert os.listdir(tmp_path) == []
    assert time.monotonic() - start < 60  # refused up front, not after building a huge canvas or list


def test_cli_img2img_on_inpainting_model_names_the_flag(sd_inpaint_dir, files, tmp_path):
    args = cli(sd_inpaint_dir, files, tmp_path / "out.png")
    del args[4:6]  # --mask mask.png
    assert_one_line_error(run_cli(args), "--mask")


def test_cli_help_says_each_default_once():
    out = run_cli(["--help"]).stdout
    assert "(default:" in out
    for line in out.split("  --")[1:]:
        assert line.count("default") <= 1, line


def test_cli_nan_weights_stop_naming_the_step(sd_inpaint_dir, files, tmp_path):
    model = shutil.copytree(sd_inpaint_dir, tmp_path / "nan-model")
    path = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, path)
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(run_cli(cli(model, files, out / "o.png")), "step 1 of", "NaN")
    assert os.listdir(out) == []


def test_cli_decompression_bomb_is_refused_from_the_header(sd_inpaint_dir, files, tmp_path):
    """A PNG whose header claims 20000×20000 (the pixel data is not even there): refused before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    out = tmp_path / "out"
    out.mkdir()
    args = cli(sd_inpaint_dir, files, out / "o.png")
    args[3] = str(bomb)
    assert_one_line_error(run_cli(args), "megapixels", "400000000 pixels")
    assert os.listdir(out) == []


def test_cli_large_photo_says_what_it_costs(sd_inpaint_dir, files, tmp_path):
    args = cli(sd_inpaint_dir, files, tmp_path / "o.png")
    args[3] = str(files / "large.png")
    del args[4:6]
    args[1] = str(sd_inpaint_dir)
    r = run_cli(args, env={"LDM_INPAINT_MAX_MEMORY_GB": "1"})  # 2.2 MP in fp32 needs ~8 GiB: refused
    note = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "1800x1200" in note[0] and "--crop-to-mask" in note[0]
    assert_one_line_error(r, "GiB", "1.0 GiB")


def test_cli_existing_output_needs_overwrite_and_keeps_umask(sd_inpaint_dir, files, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    assert_one_line_error(run_cli(cli(sd_inpaint_dir, files, out)), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    old = os.umask(0o022)
    try:
        assert main(cli(sd_inpaint_dir, files, out, "--overwrite")) == 0
    finally:
        os.umask(old)
    assert Image.open(out).size == (64, 48)
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_cli_unwritable_output_folder_is_refused_before_loading(files, tmp_path, capsys):
    # /proc refuses new files even to root (a chmod'ed folder would not stop root)
    assert main(cli(tmp_path / "no-model", files, "/proc/out.png")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot write in /proc" in err


# A wrapper that runs the CLI with save_png slowed down (SIGTERM case) or failing on the second image
# (a disk filling up), to reach the moments a user hits by chance.
WRAPPER = """
import os, sys, time, errno
import ldm_inpaint.outputs as outputs
from ldm_inpaint.sample import main
mode = sys.argv[1]
real_save = outputs.save_png
calls = []
class SlowFile:
    def __init__(self, f): self.f = f
    def write(self, b):
        n = self.f.write(b); self.f.flush(); time.sleep(0.5); return n
    def __getattr__(self, name): return getattr(self.f, name)
def save_png(image, path, parameters=None):
    calls.append(path)
    if mode == "full" and len(calls) == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if mode == "slow":
        with outputs.atomic_file(path) as f:
            image.save(SlowFile(f), format="PNG")
        return
    real_save(image, path, parameters)
outputs.save_png = save_png
sys.exit(main(sys.argv[2:]))
"""


def test_cli_sigterm_while_saving_leaves_nothing(sd_inpaint_dir, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", WRAPPER, "slow", *cli(sd_inpaint_dir, files, out / "o.png")],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(n.startswith(".tmp-") for n in os.listdir(out)):  # the PNG is being written
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert os.listdir(out) == []


def test_cli_disk_full_on_second_image_says_what_was_written(sd_inpaint_dir, files, tmp_path):
    r = subprocess.run([sys.executable, "-c", WRAPPER, "full",
                        *cli(sd_inpaint_dir, files, tmp_path / "o.png", "--num-images", "2")],
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, "o_1.png", "No space left", "written: " + str(tmp_path / "o_0.png"))
    assert sorted(os.listdir(tmp_path)) == ["o_0.png"]


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    """SIGINT during the imports (torch takes a second to load) prints one line, not a traceback."""
    p = subprocess.Popen([sys.executable, "-m", "ldm_inpaint.sample", "--prompt", "x", "--model", str(tmp_path)],
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert "Traceback" not in err, err


# -- the Python API: the same checks raise InputError ---------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(sd_inpaint_dir):
    return ldm_inpaint.load_pipeline(sd_inpaint_dir)


def call(pipe, **kw):
    args = dict(image=make_image(), mask_image=make_mask(), num_inference_steps=2, progress=False,
                generator=torch.Generator().manual_seed(0))
    return pipe("a red brick wall", **{**args, **kw})


API_BAD = {
    "strength_string": (dict(strength="0.5"), "strength must be a number, got str"),
    "height_float": (dict(height=48.0), "height must be a whole number"),
    "generator_int": (dict(generator=42), "torch.Generator().manual_seed(42)"),
    "steps_bool": (dict(num_inference_steps=True), "num_inference_steps must be a whole number, got bool"),
    "steps_too_many": (dict(num_inference_steps=5000), "num_inference_steps must be ≤ 1000"),
    "guidance_inf": (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    "eta_negative": (dict(eta=-5.0), "eta must be ≥ 0"),
    "eta_nan": (dict(eta=float("nan")), "eta must be a finite number"),
    "unknown_keyword": (dict(callback_on_step=print), "unknown argument(s) callback_on_step"),
    "unknown_keyword_tensor": (dict(latent=torch.zeros(1000, 1000)), "unknown argument(s) latent:"),
    "latents_nan": (dict(latents=torch.full((1, 4, 6, 8), float("nan"))), "latents holds NaN"),
    "sdxl_size_on_sd15": (dict(original_size=(1024, 1024)), "original_size: SDXL-only"),
    "sdxl_pooled_on_sd15": (dict(negative_crops_coords_top_left=(8, 8)), "SDXL-only"),
    "size_pair": (dict(original_size=(1024,)), "original_size must be a pair"),
    "clip_skip_negative": (dict(clip_skip=-1), "clip_skip must be ≥ 0"),
}


@pytest.mark.parametrize("case", API_BAD)
def test_api_bad_input_raises_input_error(pipe, case):
    kw, words = API_BAD[case]
    with pytest.raises(InputError) as e:
        call(pipe, **kw)
    message = str(e.value)
    assert words in message and "\n" not in message and len(message) < 400


def test_api_numpy_scalars_are_numbers(pipe):
    a = call(pipe, num_inference_steps=np.int64(2), guidance_scale=np.float32(7.5), output_type="np").images
    b = call(pipe, num_inference_steps=2, guidance_scale=7.5, output_type="np").images
    assert np.array_equal(a, b)


def test_api_memory_limit_is_overridable(pipe, monkeypatch):
    monkeypatch.setenv("LDM_INPAINT_MAX_MEMORY_GB", "0.001")
    with pytest.raises(InputError, match="more than the 0.0 GiB available"):
        call(pipe)
    monkeypatch.setenv("LDM_INPAINT_MAX_MEMORY_GB", "lots")
    with pytest.raises(InputError, match="must be a number of GiB"):
        call(pipe)
    monkeypatch.setenv("LDM_INPAINT_MAX_MEMORY_GB", "64")
    assert call(pipe).images[0].size == (64, 48)


def test_nan_weights_raise_naming_the_step(pipe):
    unet = pipe.unet
    bias = unet.conv_out.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match=r"step 1 of 2 \(t=\d+\) gave NaN"):
            call(pipe)
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_json_parameters_are_still_written(sd_inpaint_dir, files, tmp_path):
    """The atomic writer keeps the PNG's generation parameters (regression guard for the move to outputs.py)."""
    assert main(cli(sd_inpaint_dir, files, tmp_path / "o.png")) == 0
    assert json.loads(Image.open(tmp_path / "o.png").text["parameters"])["seed"] == 7
    assert Path(tmp_path / "o.png").stat().st_size > 0
