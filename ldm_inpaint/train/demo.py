"""The embedded demo model: a tiny latent-diffusion inpainting model (the same VAE, 9-channel UNet and CLIP text
encoder classes as Stable Diffusion 1.5, at small widths, with the standard CLIP tokenizer), trained from scratch
by this package's own training code on the procedural shapes of shapes.py.

    make demo-model       # python -m ldm_inpaint.train.demo --out ldm_inpaint/demo (work files in its work/)

The recipe, fixed seeds throughout:
    1. the VAE alone, as an autoencoder (L1 reconstruction + a tiny KL term, LDM's autoencoder loss without the
       perceptual and adversarial parts: flat-coloured shapes need neither); its latent scale is then measured
       (1 / std of the latents, as SD's 0.18215 was);
    2. the UNet and the text encoder together, from scratch, with the VAE frozen: Trainer (loop.py), full
       fine-tuning with EMA, captions dropped 10 % of the time for classifier-free guidance.
The folder written is diffusers-layout (fp16 weights), loaded by `ldm_inpaint.load_pipeline("demo")`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..family import SD15
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..pipeline import Pipeline
from ..tokenizer import EOS_TOKEN, CLIPTokenizer
from .data import collate
from .export import save_folder
from .loop import Trainer, TrainConfig
from .shapes import ShapesDataset, demo_inputs
from .sheet import line_plot

SIZE = 128  # pixels; latents are 16 × 16
TEXT_WIDTH = 64
INITIAL_LOGVAR = -6.0  # the VAE posterior's starting log-variance

CONFIGS = {
    "model_index": {"_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": "0.42.1",
                    "feature_extractor": [None, None], "safety_checker": [None, None],
                    "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
                    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
    # SD 1.5 inpainting's own schedule and sampler
    "scheduler": {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None},
    "unet": {"_class_name": "UNet2DConditionModel", "sample_size": SIZE // 8, "in_channels": 9, "out_channels": 4,
             "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 8,
             # text cross-attention at 8 × 8 and 4 × 4 only: the 16 × 16 level's 256-token attention was a third
             # of a training step's time, and flat shapes need no finer placement from the text
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "cross_attention_dim": TEXT_WIDTH, "norm_num_groups": 32},
    "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "sample_size": SIZE, "scaling_factor": 1.0},
    "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
                     "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
                     "projection_dim": TEXT_WIDTH, "torch_dtype": "float32"},
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_data: int = 5000  # scenes, each encoded once (cache_latents) and seen ~13 times
    unet_lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1


def random_pipeline(seed: int) -> Pipeline:
    """The demo architecture with fresh random weights (PyTorch's default initialisations)."""
    torch.manual_seed(seed)
    return Pipeline(unet=UNet(UNetConfig.from_diffusers(CONFIGS["unet"])),
                    vae=AutoencoderKL(VAEConfig.from_diffusers(CONFIGS["vae"])),
                    text_encoder=CLIPTextModel(CLIPTextConfig.from_diffusers(CONFIGS["text_encoder"])),
                    tokenizer=CLIPTokenizer.from_packaged(EOS_TOKEN), scheduler_config=CONFIGS["scheduler"],
                    family=SD15, name="demo", configs=json.loads(json.dumps(CONFIGS)))


def train_vae(vae: AutoencoderKL, recipe: Recipe, log) -> float:
    """Stage 1: the autoencoder on shape pictures; returns the latent scale 1/std (SD: 0.18215)."""
    data = ShapesDataset(recipe.vae_steps * recipe.vae_batch, SIZE, seed=recipe.seed + 1, masks=None)
    with torch.no_grad():  # start from a nearly deterministic posterior (σ ≈ 0.05): with the default σ ≈ 1 the
        vae.quant_conv.bias[vae.cfg.latent_channels:] = INITIAL_LOGVAR  # noise drowned the latents, loss stalled
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    g = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.vae_steps):
        x = collate([data[step * recipe.vae_batch + i] for i in range(recipe.vae_batch)])["pixels"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x)
            recon = vae.decode(posterior.sample(g))
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        error = recon.float() - x
        loss = error.abs().mean() + (error**2).mean() + recipe.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(dict(stage="vae", step=step + 1, loss=loss.item()))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = collate([data[i] for i in range(min(64, len(data)))])["pixels"]
        return 1.0 / vae.encode(x).sample(g).std().item()


def build(out: Path, recipe: Recipe) -> Path:
    """Both stages, then the folder `out/model` (fp16 weights), `out/log.jsonl` and `out/loss.png`."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    log_file = out / "log.jsonl"
    if not log_file.is_file():
        log_file.write_text("")
    start = time.monotonic()

    def log(record: dict) -> None:
        with open(log_file, "a") as f:
            f.write(json.dumps({**record, "seconds": round(time.monotonic() - start, 1)}) + "\n")
        if record["step"] % 100 == 0:
            print(f"{record['stage']} step {record['step']}: loss {record['loss']:.4f} "
                  f"({time.monotonic() - start:.0f} s)", file=sys.stderr)

    pipe = random_pipeline(recipe.seed)
    vae_file = work / "vae.safetensors"  # stage 1's result: a rerun of the recipe starts from stage 2
    if vae_file.is_file():
        pipe.vae.load_state_dict(load_file(vae_file))
        pipe.vae.requires_grad_(False)
        scale = json.loads((work / "vae.json").read_text())["scale"]
    else:
        scale = train_vae(pipe.vae, recipe, log)
        work.mkdir(parents=True, exist_ok=True)
        save_file(pipe.vae.state_dict(), vae_file)
        (work / "vae.json").write_text(json.dumps({"scale": scale}))
    pipe.vae.cfg = dataclasses.replace(pipe.vae.cfg, scaling_factor=scale)
    pipe.configs["vae"]["scaling_factor"] = round(scale, 5)
    print(f"VAE latent scale {scale:.4f}", file=sys.stderr)

    cfg = TrainConfig(out=str(work), train_text_encoder=True, resolution=SIZE, steps=recipe.unet_steps,
                      batch_size=recipe.unet_batch, lr=recipe.unet_lr, lr_schedule="cosine",
                      warmup_steps=recipe.warmup, ema_decay=recipe.ema_decay, dtype="bf16", seed=recipe.seed,
                      cache_latents=True,
                      checkpoint_every=500, keep_checkpoints=1, validate_every=500,
                      validation_prompts=("a red circle on a white background", "a blue square on a yellow background",
                                          "a green triangle and a white circle on a black background"),
                      validation_steps=20)
    data = ShapesDataset(recipe.unet_data, SIZE, seed=recipe.seed + 2, caption_dropout=recipe.caption_dropout)
    vae_weights = {k: v.clone() for k, v in pipe.vae.state_dict().items()}  # the trainer keeps it in bf16
    trainer = Trainer(cfg, pipe, data, pipe.configs)
    trainer.train()
    pipe.vae.float().load_state_dict(vae_weights)
    for line in (work / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        log(dict(stage="unet", step=r["step"], loss=r["loss"]))
    with trainer.ema_weights():
        save_folder(pipe, pipe.configs, out / "model", dtype=torch.float16)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    for stage, name in (("vae", "vae_loss.png"), ("unet", "loss.png")):
        steps = [r for r in records if r["stage"] == stage]
        line_plot([r["step"] for r in steps], [r["loss"] for r in steps], out / name,
                  title=f"demo model, {stage.upper()} stage: training loss", xlabel="step")
    image, mask = demo_inputs("white", SIZE)  # what `make demo` inpaints
    image.save(out / "image.png")
    mask.save(out / "mask.png")
    return out / "model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_inpaint.train.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ldm_inpaint/demo")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test of the recipe)")
    args = p.parse_args(argv)
    recipe = (Recipe(vae_steps=4, vae_batch=2, unet_steps=4, unet_batch=2, unet_data=8, warmup=1) if args.quick
              else Recipe())
    print(build(Path(args.out), recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
