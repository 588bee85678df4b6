"""The command line: same image as the Python API for the same seed, parameters in the PNG, and one-line
errors with no partial output for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_image, make_mask
from PIL import Image

import ldm_inpaint
from ldm_inpaint.sample import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-inputs")
    make_image().save(d / "photo.png")
    make_mask().save(d / "mask.png")
    make_mask(32, 32).save(d / "small-mask.png")
    (d / "garbage.png").write_bytes(b"not an image")
    return d


def cli(model, files, out, *extra):
    return ["--model", str(model), "--image", str(files / "photo.png"), "--mask", str(files / "mask.png"),
            "--prompt", "a red brick wall", "--steps", "2", "--seed", "7", "--no-progress", "--out", str(out), *extra]


def test_cli_writes_the_python_api_image_with_parameters(sd_inpaint_dir, files, tmp_path):
    out = tmp_path / "out.png"
    assert main(cli(sd_inpaint_dir, files, out)) == 0
    pipe = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    expected = pipe("a red brick wall", image=Image.open(files / "photo.png"), mask_image=Image.open(files / "mask.png"),
                    num_inference_steps=2, generator=torch.Generator().manual_seed(7), progress=False).images[0]
    written = Image.open(out)
    assert np.array_equal(np.asarray(written), np.asarray(expected))
    params = json.loads(written.text["parameters"])
    assert params["seed"] == 7 and params["steps"] == 2 and params["prompt"] == "a red brick wall"
    assert params["scheduler"] == "DDIMScheduler" and params["model"] == str(sd_inpaint_dir)


def test_cli_numbers_several_images(sd_inpaint_dir, files, tmp_path):
    assert main(cli(sd_inpaint_dir, files, tmp_path / "out.png", "--num-images", "2")) == 0
    assert sorted(os.listdir(tmp_path)) == ["out_0.png", "out_1.png"]


BAD = {
    "missing_image": (["--image", "nowhere.png"], "not found"),
    "unreadable_image": (["--image", "{files}/garbage.png"], "cannot read"),
    "mask_size": (["--mask", "{files}/small-mask.png"], "mask"),
    "steps_0": (["--steps", "0"], "num_inference_steps"),
    "strength": (["--strength", "1.5"], "strength"),
    "scheduler": (["--scheduler", "fancy"], "available"),
    "out_not_png": (["--out", "{tmp}/out.jpg"], ".png"),
    "prompt_2_without_sdxl": (["--prompt-2", "a cat"], "SDXL"),
}


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_input_is_one_line_and_leaves_no_file(sd_inpaint_dir, files, tmp_path, capsys, case):
    extra, words = BAD[case]
    extra = [a.format(files=files, tmp=tmp_path) for a in extra]
    assert main(cli(sd_inpaint_dir, files, tmp_path / "out.png", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert os.listdir(tmp_path) == []


def test_cli_sdxl_takes_second_prompts(sdxl_inpaint_dir, files, tmp_path):
    out = tmp_path / "xl.png"
    assert main(cli(sdxl_inpaint_dir, files, out, "--prompt-2", "a cat", "--negative-prompt-2", "dark")) == 0
    params = json.loads(Image.open(out).text["parameters"])
    assert params["prompt_2"] == "a cat" and params["negative_prompt_2"] == "dark"


def test_cli_missing_model_folder(files, tmp_path, capsys):
    assert main(cli(tmp_path / "no-model", files, tmp_path / "out.png")) == 2
    assert "not found" in capsys.readouterr().err


def test_python_m_sample_runs_without_traceback(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ldm_inpaint.sample", *cli(tmp_path / "no-model", files, tmp_path / "o.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
