"""Speed and memory of LoRA training: ldm_inpaint's Trainer against the same loop written with diffusers and
peft (as diffusers' train_text_to_image_lora.py does it), on full-size SD 1.5 inpainting with random weights.

    python -m ldm_inpaint.train.bench                 # 512², bf16, rank 16, with and without checkpointing
    python -m ldm_inpaint.train.bench --size 256 --steps 2

Both sides: the 9-channel UNet, VAE and CLIP text encoder built from the official configs with random
weights (speed does not depend on the values), frozen in bf16, LoRA rank 16 on the attention projections in
fp32, bf16 autocast, AdamW; one step = VAE-encode the picture and the masked picture, encode the caption,
noise, UNet forward and backward, optimizer step. Each configuration runs in its own child process (peak RSS
is that child's `ru_maxrss`), in the order ours, diffusers, diffusers, ours, …; time per step is the median
of the timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sd15-inpainting"


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def ours_step(size: int, checkpointing: bool, rank: int):
    from ..family import SD15
    from ..models.clip import CLIPTextConfig, CLIPTextModel
    from ..models.unet import UNet, UNetConfig
    from ..models.vae import AutoencoderKL, VAEConfig
    from ..pipeline import Pipeline
    from ..tokenizer import EOS_TOKEN, CLIPTokenizer
    from .loop import Trainer, TrainConfig

    pipe = Pipeline(unet=UNet(UNetConfig.from_diffusers(_config("unet"))),
                    vae=AutoencoderKL(VAEConfig.from_diffusers(_config("vae"))),
                    text_encoder=CLIPTextModel(CLIPTextConfig.from_diffusers(_config("text_encoder"))),
                    tokenizer=CLIPTokenizer.from_packaged(EOS_TOKEN), scheduler_config=_config("scheduler"),
                    family=SD15)
    item = dict(pixels=torch.rand(3, size, size) * 2 - 1, caption="a photo of a dog",
                mask=(torch.rand(1, size, size) > 0.5).float(), index=0)

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return item

        def set_epoch(self, epoch):
            pass

    cfg = TrainConfig(out="/tmp/unused", lora_rank=rank, resolution=size, dtype="bf16",
                      gradient_checkpointing=checkpointing)
    trainer = Trainer(cfg, pipe, One(), {})
    return trainer.train_step


def diffusers_step(size: int, checkpointing: bool, rank: int):
    import diffusers
    import transformers
    from peft import LoraConfig

    unet = diffusers.UNet2DConditionModel.from_config(_config("unet"))
    vae = diffusers.AutoencoderKL.from_config(_config("vae"))
    text_config = {k: v for k, v in _config("text_encoder").items() if not k.startswith("_")}
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
    scheduler = diffusers.DDPMScheduler.from_config(_config("scheduler"))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(torch.bfloat16)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    mask = (torch.rand(1, 1, size, size) > 0.5).float()
    ids = torch.randint(0, 49407, (1, 77))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.sample() * vae.config.scaling_factor
                masked = vae.encode((pixels * (mask < 0.5)).to(torch.bfloat16)).latent_dist.sample()
                masked = masked * vae.config.scaling_factor
                context = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,))
            x_t = scheduler.add_noise(latents, noise, t)
            small_mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:])
            x = torch.cat([x_t, small_mask.to(x_t.dtype), masked], dim=1)
            prediction = unet(x, t, context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return step


def child(side: str, size: int, checkpointing: bool, rank: int, steps: int) -> dict:
    torch.manual_seed(0)
    step = (ours_step if side == "ours" else diffusers_step)(size, checkpointing, rank)
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(side=side, checkpointing=checkpointing, step_s=statistics.median(times), times=times,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_inpaint.train.bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child, after one warm-up")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1, help="alternations of the two sides")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        side, checkpointing = args.child.split(":")
        print(json.dumps(child(side, args.size, checkpointing == "1", args.rank, args.steps)))
        return 0
    results = []
    for round_ in range(args.rounds):
        for checkpointing in (False, True):
            order = ("ours", "diffusers") if (round_ + checkpointing) % 2 == 0 else ("diffusers", "ours")
            for side in order:
                out = subprocess.run([sys.executable, "-m", "ldm_inpaint.train.bench", "--child",
                                      f"{side}:{int(checkpointing)}", "--size", str(args.size), "--steps",
                                      str(args.steps), "--rank", str(args.rank)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr)
                results.append(json.loads(out.stdout.splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr)
    print(f"LoRA training step, SD 1.5 inpainting, {args.size}², bf16, rank {args.rank}")
    print("| gradient checkpointing | ours s/step | diffusers+peft s/step | ratio | ours peak RSS GiB | "
          "diffusers+peft GiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for checkpointing in (False, True):
        rows = {side: [r for r in results if r["side"] == side and r["checkpointing"] == checkpointing]
                for side in ("ours", "diffusers")}
        t = {s: statistics.median(x["step_s"] for x in rows[s]) for s in rows}
        m = {s: max(x["peak_rss_gib"] for x in rows[s]) for s in rows}
        print(f"| {'on' if checkpointing else 'off'} | {t['ours']:.2f} | {t['diffusers']:.2f} | "
              f"{t['ours'] / t['diffusers']:.2f} | {m['ours']:.2f} | {m['diffusers']:.2f} | "
              f"{m['ours'] / m['diffusers']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
