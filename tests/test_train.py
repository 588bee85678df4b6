"""Training on tiny random models: the loss falls when overfitting a few pictures, a resumed run equals an
uninterrupted one, two processes equal one, what is written loads in diffusers with the same output, and the
loop's options (gradient checkpointing, bf16, min-SNR, v-prediction, SDXL) do what they say."""

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
from conftest import diffusers_pipeline, make_image, make_mask
from safetensors.torch import load_file

import ldm_inpaint
from ldm_inpaint.checks import InputError
from ldm_inpaint.train.data import ImageFolder
from ldm_inpaint.train.loop import Trainer, TrainConfig
from ldm_inpaint.train.objective import Objective
from ldm_inpaint.train.shapes import write_folder

RES = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("shapes"), 4, seed=0, size=RES)


def trainer(model_dir, data_dir, out, masks="data", **options) -> Trainer:
    pipe = ldm_inpaint.load_pipeline(model_dir)
    cfg = TrainConfig(out=str(out), resolution=RES, **{"steps": 3, "lr": 1e-3, **options})
    data = ImageFolder(data_dir, RES, masks=masks if pipe.unet.cfg.in_channels == 9 else None)
    return Trainer(cfg, pipe, data, pipe.configs, pipe.tokenizer_folder)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in t.params.items()}


def test_overfitting_four_pictures_lowers_the_loss(sd_inpaint_dir, data_dir, tmp_path):
    t = trainer(sd_inpaint_dir, data_dir, tmp_path, lora_rank=4, batch_size=4, lr=1e-2)
    # the same batch and the same draws every step: only the weights change
    t.samples_of = lambda step, micro: [0, 1, 2, 3]
    losses = []
    for _ in range(12):
        t.step = 0
        losses.append(t.train_step())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_an_uninterrupted_run(sd_inpaint_dir, data_dir, tmp_path, mode):
    options = dict(lora_rank=4) if mode == "lora" else dict(ema_decay=0.9, train_text_encoder=True)
    options.update(steps=4, checkpoint_every=2, lr_schedule="cosine", warmup_steps=1, grad_accum=2, batch_size=1)
    straight = trainer(sd_inpaint_dir, data_dir, tmp_path / "a", **options)
    for _ in range(4):
        straight.train_step()
    first = trainer(sd_inpaint_dir, data_dir, tmp_path / "b", **options)
    first.train_step(), first.train_step()
    first.save_checkpoint()
    resumed = trainer(sd_inpaint_dir, data_dir, tmp_path / "b", **options)
    resumed.resume(tmp_path / "b")
    assert resumed.step == 2
    resumed.train_step(), resumed.train_step()
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(resumed)[k]), k
    if mode == "full":
        assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)


def test_gradient_checkpointing_gives_the_same_gradients(sd_inpaint_dir, data_dir, tmp_path):
    grads = []
    for checkpointing in (False, True):
        t = trainer(sd_inpaint_dir, data_dir, tmp_path / str(checkpointing), lora_rank=4,
                    gradient_checkpointing=checkpointing)
        with torch.no_grad():  # non-zero up-weights, so every LoRA weight gets a gradient
            for k, p in t.params.items():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))))
        batch = t._fetch(t.samples_of(0, 0))
        from ldm_inpaint.train.objective import sample_generator
        t.loss(batch, [sample_generator(0, 0, 0)]).backward()
        grads.append({k: p.grad.clone() for k, p in t.params.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_bf16_and_options_train(sd_dir, data_dir, tmp_path):
    """A 4-channel model (text-to-image), bf16 autocast, min-SNR weighting and a noise offset: trains, and the
    frozen parts are held in bf16 while the LoRA weights stay fp32 masters."""
    t = trainer(sd_dir, data_dir, tmp_path, lora_rank=4, dtype="bf16", snr_gamma=5.0, noise_offset=0.1)
    before = weights(t)
    assert np.isfinite(t.train_step())
    assert t.pipe.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in t.params.values())
    assert any(not torch.equal(before[k], p) for k, p in t.params.items())


def test_sdxl_trains_with_pooled_text_and_time_ids(sdxl_inpaint_dir, data_dir, tmp_path):
    t = trainer(sdxl_inpaint_dir, data_dir, tmp_path, lora_rank=2, train_text_encoder=True)
    assert np.isfinite(t.train_step())
    assert any(k.startswith("text_encoder_2.") for k in t.params)


def test_objective_targets_and_weights():
    config = json.loads((Path(ldm_inpaint.__file__).parent / "configs" / "sd15" / "scheduler.json").read_text())
    eps = Objective(config)
    v = Objective({**config, "prediction_type": "v_prediction"}, snr_gamma=5.0)
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 990])
    a = eps.alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.equal(eps.target(x0, noise, t), noise)
    torch.testing.assert_close(v.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    # v on the clean latent and noise recovers x0 the way the schedulers predict it
    x_t = eps.noisy(x0, noise, t)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v.target(x0, noise, t), x0, rtol=1e-4, atol=1e-5)
    # min-SNR-γ: at t = 10 the SNR is far above 5, so the weight is 5/(SNR + 1) for v
    snr = (a / (1 - a)).flatten()
    per_sample = torch.ones(3)
    pred, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    expected = (per_sample * snr.clamp(max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(v.loss(pred, target, t), expected)


def test_full_fine_tune_folder_loads_in_diffusers_with_the_same_output(sd_inpaint_dir, data_dir, tmp_path):
    t = trainer(sd_inpaint_dir, data_dir, tmp_path, steps=2, ema_decay=0.5, train_text_encoder=True)
    t.train()
    folder = tmp_path / "model"
    ours = ldm_inpaint.load_pipeline(folder)
    ref = diffusers_pipeline("StableDiffusionInpaintPipeline", folder)
    kw = dict(prompt="a red circle", image=make_image(), mask_image=make_mask(), num_inference_steps=2,
              height=48, width=64, output_type="np")
    a = ours(**kw, generator=torch.Generator().manual_seed(0), progress=False).images
    b = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - b).max() <= 1e-4
    # the exported weights are the EMA, which differs from the last trained weights
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(unet["conv_in.weight"], t.params["unet.conv_in.weight"].detach())
    assert torch.equal(unet["conv_in.weight"], t.ema["unet.conv_in.weight"])
    for name in ("log.jsonl", "loss.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_trained_lora_gives_diffusers_the_same_image(sd_inpaint_dir, data_dir, tmp_path, fmt):
    t = trainer(sd_inpaint_dir, data_dir, tmp_path, steps=2, lora_rank=4, lora_alpha=2.0, lr=5e-2,
                train_text_encoder=True, lora_format=fmt)
    t.train()
    path = tmp_path / "lora.safetensors"
    ours = ldm_inpaint.load_pipeline(sd_inpaint_dir)
    base_image = None
    kw = dict(prompt="a red circle", image=make_image(), mask_image=make_mask(), num_inference_steps=2,
              height=48, width=64, output_type="np")
    base_image = ours(**kw, generator=torch.Generator().manual_seed(0), progress=False).images
    ours.load_lora(path)
    ref = diffusers_pipeline("StableDiffusionInpaintPipeline", sd_inpaint_dir)
    ref.load_lora_weights(str(path))
    a = ours(**kw, generator=torch.Generator().manual_seed(0), progress=False).images
    b = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - base_image).max() > 1e-3  # the trained LoRA changes the picture
    assert np.abs(a - b).max() <= 1e-4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sd_inpaint_dir, data_dir, tmp_path):
    t = trainer(sd_inpaint_dir, data_dir, tmp_path, lora_rank=4, steps=6, checkpoint_every=2)
    real = t.loss
    t.loss = lambda batch, gens: real(batch, gens) * (float("nan") if t.step == 3 else 1.0)
    with pytest.raises(FloatingPointError, match="step 4.*step-000002"):
        t.train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_config_checks_are_one_line():
    with pytest.raises(InputError, match="lr_schedule"):
        TrainConfig(out="x", lr_schedule="linear").check()
    with pytest.raises(InputError, match="resolution must be a multiple of 8"):
        TrainConfig(out="x", resolution=30).check()
    with pytest.raises(InputError, match="ema_decay applies to full fine-tunes"):
        TrainConfig(out="x", lora_rank=4, ema_decay=0.99).check()


# -- the command line -------------------------------------------------------------------------------------------
def train_cli(model, data, out, *extra, steps=2) -> list[str]:
    return ["-m", "ldm_inpaint.train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--resolution", str(RES), "--steps", str(steps), "--seed", "0", *map(str, extra)]


def test_cli_writes_lora_checkpoints_samples_log_and_plot(sd_inpaint_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, *train_cli(sd_inpaint_dir, data_dir, out, "--lora-rank", "4",
                                                   "--validate-every", "2", "--validation-prompt", "a red circle",
                                                   "--validation-seeds", "0,1", "--validation-steps", "2",
                                                   "--checkpoint-every", "1")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "lora.safetensors")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    from PIL import Image
    sheet = Image.open(out / "samples" / "step-000002.png")
    assert sheet.width == 2 * RES  # one row: the prompt, two seeds
    assert Image.open(out / "loss.png").size == (640, 360)


def test_cli_needs_lora_or_full(sd_inpaint_dir, data_dir, tmp_path):
    r = subprocess.run([sys.executable, *train_cli(sd_inpaint_dir, data_dir, tmp_path / "o")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lora-rank R" in r.stderr


def test_sigterm_saves_a_checkpoint_and_resume_finishes(sd_inpaint_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, *train_cli(sd_inpaint_dir, data_dir, out, "--lora-rank", "4",
                                                      "--checkpoint-every", "1000", steps=400)],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and not list((out / "checkpoints").glob(".*"))
    step = json.loads((saved[0] / "trainer.json").read_text())["step"]
    r = subprocess.run([sys.executable, *train_cli(sd_inpaint_dir, data_dir, out, "--lora-rank", "4", "--resume", out,
                                                   steps=step + 1)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "lora.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()][-1] == step + 1


def test_two_processes_equal_one(sd_inpaint_dir, data_dir, tmp_path):
    """torchrun with 2 CPU ranks (gloo), batch 1 each, against one process with batch 2: the same weights."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *train_cli(sd_inpaint_dir, data_dir, tmp_path / "one", "--full",
                                                     "--batch-size", "2")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517",
                          *train_cli(sd_inpaint_dir, data_dir, tmp_path / "two", "--full", "--batch-size", "1")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    a = load_file(tmp_path / "one" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(Path(sd_inpaint_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    # The gradients are summed in another order; for an element whose gradient is ~0, Adam (update ≈ lr·g/√v)
    # turns that rounding into up to a step of lr = 1e-4. So: every element within one step, and all but a few
    # equal to float precision.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 0.02, (diff.max(), (diff > 1e-6).float().mean())
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    np.testing.assert_allclose(logs[0], logs[1], rtol=1e-5)
    shutil.rmtree(tmp_path)
