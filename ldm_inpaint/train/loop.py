"""The training loop: LoRA or full fine-tuning of a loaded Pipeline's UNet (and text encoders), one process or
data-parallel under torchrun.

    trainer = Trainer(TrainConfig(out="my-lora", lora_rank=16, steps=2000), pipe, dataset, configs)
    trainer.train()      # out/lora.safetensors (or out/model/), checkpoints/, samples/, log.jsonl, loss.png

Order of one optimizer step (Rombach et al. 2022 §4 for the objective, Hu et al. 2021 for LoRA):
    for each micro-batch: pixels → VAE latents (frozen) → noised to a random t → UNet(x_t, t, text) → loss
    → backward; then average the gradients over processes, clip, AdamW, learning-rate schedule, EMA.

What a step draws and which samples it reads are functions of (seed, step) alone (objective.py), so resuming
from a checkpoint continues exactly, and N processes with batch B equal one process with batch N·B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..checks import InputError, number
from ..pipeline import Pipeline
from .data import collate
from .objective import Objective, inpainting_input, sample_generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    out: str
    lora_rank: int | None = None  # None: full fine-tune of the UNet
    lora_alpha: float | None = None  # default: the rank (scale 1)
    lora_format: str = "kohya"  # or "peft"
    train_text_encoder: bool = False
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine" (to 0 at the last step)
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float | None = None  # full fine-tunes: exported weights are the EMA
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # encode each item once (the posterior mean of its epoch-0 crop) and reuse it
    dtype: str = "fp32"  # compute dtype: bf16/fp16 autocast with fp32 master weights
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_seeds: tuple[int, ...] = (0, 1, 2, 3)
    validation_steps: int = 20

    def check(self) -> None:
        number(self.steps, "steps", integer=True, low=1)
        number(self.batch_size, "batch_size", integer=True, low=1)
        number(self.grad_accum, "grad_accum", integer=True, low=1)
        number(self.resolution, "resolution", integer=True, low=8)
        number(self.lr, "lr", low=0, low_open=True)
        number(self.max_grad_norm, "max_grad_norm", low=0, low_open=True)
        if self.lora_rank is not None:
            number(self.lora_rank, "lora_rank", integer=True, low=1)
        if self.resolution % 8:
            raise InputError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.ema_decay is not None and (self.lora_rank is not None or not 0 < self.ema_decay < 1):
            raise InputError("ema_decay applies to full fine-tunes and must be in (0, 1)")


class Trainer:
    def __init__(self, cfg: TrainConfig, pipe: Pipeline, dataset, configs: dict[str, dict],
                 tokenizers_from: str | None = None):
        """`configs`: each component's diffusers config (model_index, unet, vae, …), written with a full
        fine-tune's folder; `tokenizers_from`: the folder whose tokenizer/ folders that folder copies."""
        cfg.check()
        self.cfg, self.pipe, self.dataset, self.configs = cfg, pipe, dataset, configs
        self.tokenizers_from = tokenizers_from
        self.rank, self.world = _distributed(pipe.device)
        self.out = Path(cfg.out)
        self.compute_dtype = DTYPES[cfg.dtype]
        self.inpainting = pipe.unet.cfg.in_channels == 9
        self.objective = Objective(pipe.scheduler_config, cfg.snr_gamma, cfg.noise_offset)
        pipe.release_weights = False  # the weights change: they are no longer the file's pages
        self.params = self._trainable()
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = ({k: p.detach().clone() for k, p in self.params.items()} if cfg.ema_decay is not None
                    else None)
        self.step = 0
        self.stop_requested = False
        self._order = (-1, None)  # (epoch, its permutation of the data set)
        self.cache = {}  # cache_latents: item index → its latents, masked-image latents, mask and caption

    # -- what is trained ------------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        """Freeze everything, then make the trained part fp32 master weights; frozen parts go to the compute
        dtype (half the memory, and the speed of bf16 on CPUs that have it)."""
        cfg, pipe = self.cfg, self.pipe
        text_encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        text_encoders = {k: m for k, m in text_encoders.items() if m is not None}
        models = {"unet": pipe.unet, "vae": pipe.vae, **text_encoders}
        for model in models.values():
            model.requires_grad_(False)
        trained = {"unet": pipe.unet, **(text_encoders if cfg.train_text_encoder else {})}
        upcast_vae = pipe.family.vae_upcast and pipe.vae.cfg.force_upcast  # SDXL's VAE overflows in fp16
        for name, model in models.items():
            if name not in trained or cfg.lora_rank is not None:
                model.to(torch.float32 if name == "vae" and upcast_vae else self.compute_dtype)
        torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every process
        params = {}
        for name, model in trained.items():
            if cfg.lora_rank is not None:
                from ..lora import TEXT_TARGETS, UNET_TARGETS, add_lora

                add_lora(model, cfg.lora_rank, cfg.lora_alpha, UNET_TARGETS if name == "unet" else TEXT_TARGETS)
            else:
                model.float().requires_grad_(True)
            for key, p in model.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float().clone()  # own memory, not the checkpoint file's pages
                    params[f"{name}.{key}"] = p
            model.train()
        pipe.unet.gradient_checkpointing = cfg.gradient_checkpointing
        return params

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then constant or cosine decay to 0 at the last step."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    # -- one step -------------------------------------------------------------------------------------------
    def samples_of(self, step: int, micro: int) -> list[int]:
        """This process's places in the stream of samples (epoch after epoch, each a fixed permutation), for
        micro-batch `micro` of optimizer step `step`; the global batch is split by rank."""
        cfg = self.cfg
        per_micro = cfg.batch_size * self.world
        first = (step * cfg.grad_accum + micro) * per_micro + self.rank * cfg.batch_size
        return list(range(first, first + cfg.batch_size))

    def _fetch(self, places: list[int]) -> dict:
        """The micro-batch at these places of the sample stream: pixels, captions, masks; with cache_latents the
        VAE latents of each item instead of its pixels, encoded on first use (its epoch-0 crop, mask, caption)."""
        n = len(self.dataset)
        indices = []
        for place in places:
            epoch, position = divmod(place, n)
            if self._order[0] != epoch:  # each epoch a fixed permutation of the data set
                self._order = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)))
            indices.append((epoch, int(self._order[1][position])))
        if not self.cfg.cache_latents:
            items = []
            for epoch, index in indices:
                self.dataset.set_epoch(epoch)
                items.append(self.dataset[index])
            return collate(items)
        missing = sorted({index for _, index in indices} - set(self.cache))
        if missing:
            self.dataset.set_epoch(0)
            batch = collate([self.dataset[i] for i in missing])
            latents = self._latents(batch["pixels"], None)
            masked = self._latents(batch["pixels"] * (batch["masks"] < 0.5), None) if self.inpainting else None
            for j, index in enumerate(missing):
                self.cache[index] = dict(latents=latents[j], caption=batch["captions"][j],
                                         mask=None if masked is None else batch["masks"][j],
                                         masked_latents=None if masked is None else masked[j])
        entries = [self.cache[index] for _, index in indices]
        stack = (lambda key: torch.stack([e[key] for e in entries]) if entries[0][key] is not None else None)  # noqa: E731
        return dict(latents=stack("latents"), masked_latents=stack("masked_latents"), masks=stack("mask"),
                    captions=[e["caption"] for e in entries])

    def loss(self, batch: dict, generators: list[torch.Generator]) -> torch.Tensor:
        """The denoising loss of one micro-batch: pixels (B, 3, R, R) in [-1, 1] (or their cached latents),
        captions, masks (B, 1, R, R)."""
        pipe, obj = self.pipe, self.objective
        if "latents" in batch:
            latents = batch["latents"].to(pipe.device)
        else:
            pixels = batch["pixels"].to(pipe.device)
            latents = self._latents(pixels, generators)  # (B, 4, R/8, R/8)
        t, noise = obj.draw(tuple(latents.shape[1:]), generators)
        t, noise = t.to(pipe.device), noise.to(pipe.device)
        x_t = obj.noisy(latents, noise, t)
        if self.inpainting:  # masks: 1 = repaint; the masked picture has those pixels at 0 (grey)
            masks = batch["masks"].to(pipe.device)
            masked_latents = (batch["masked_latents"].to(pipe.device) if "latents" in batch
                              else self._latents(pixels * (masks < 0.5), generators))
            x_t = inpainting_input(x_t, masks, masked_latents)
        context, pooled = pipe.encode_prompt(batch["captions"], grad=self.cfg.train_text_encoder)
        kwargs = {}
        if pipe.family.time_ids:  # SDXL: the picture's own size, uncropped (original = target = resolution)
            r = self.cfg.resolution
            kwargs = dict(text_embeds=pooled, time_ids=torch.tensor([[r, r, 0, 0, r, r]] * len(latents),
                                                                     device=pipe.device))
        prediction = pipe.unet(x_t, t, context, **kwargs)
        return obj.loss(prediction, obj.target(latents, noise, t), t)

    @torch.no_grad()
    def _latents(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Scaled VAE latents, the whole batch in one pass (the pipeline encodes one image at a time when given
        several generators, as diffusers does; here only each sample's ε needs its own generator); without
        generators, the posterior's mean."""
        vae = self.pipe.vae
        z = vae.encode(pixels.to(self.pipe.vae_dtype))
        return vae.cfg.scaling_factor * (z.sample(generators) if generators is not None else z.mode()).float()

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss over all processes."""
        cfg, step = self.cfg, self.step
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        autocast = torch.autocast(self.pipe.device.type, dtype=self.compute_dtype,
                                  enabled=self.compute_dtype != torch.float32)
        for micro in range(cfg.grad_accum):
            places = self.samples_of(step, micro)
            batch = self._fetch(places)
            # a sample's random numbers depend on its place in the global batch, not on the process
            first_in_step = step * cfg.grad_accum * cfg.batch_size * self.world
            generators = [sample_generator(cfg.seed, step, p - first_in_step) for p in places]
            with autocast:
                loss = self.loss(batch, generators)
            (loss / cfg.grad_accum).backward()
            total += loss.detach().float().cpu() / cfg.grad_accum
        if self.world > 1:  # average gradients and loss over processes (DDP's all-reduce, done once here)
            for p in self.params.values():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
            total = total.to(self.pipe.device)
            dist.all_reduce(total)
            total = total.cpu() / self.world
        if not torch.isfinite(total):
            raise FloatingPointError(f"the loss is {total.item()} at step {step + 1}: training stopped; the last good "
                                     f"checkpoint is {self.latest_checkpoint() or 'none yet'} (lower --lr, or use "
                                     "bf16 instead of fp16)")
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    self.ema[k].lerp_(p.detach(), 1 - cfg.ema_decay)
        self.step += 1
        return total.item()

    # -- the run --------------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0, desc="training")
        start, first_step = time.monotonic(), self.step
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                lr = self.schedule.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if self.rank == 0:
                    self._log(dict(step=self.step, loss=loss, lr=lr,
                                   seconds=round(time.monotonic() - start, 3), since_step=first_step))
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    self.validate()
                if self._stop_agreed():
                    self.save_checkpoint()
                    print(f"interrupted at step {self.step}: checkpoint {self.latest_checkpoint()}; continue with "
                          f"--resume {self.out}", file=sys.stderr)
                    raise KeyboardInterrupt
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
            self.save_checkpoint()
            self.export()
            if self.rank == 0:
                plot_loss(self.out / "log.jsonl", self.out / "loss.png")
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.rank == 0:
            print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def _stop_agreed(self) -> bool:
        """Every process stops at the same step when any was asked to."""
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.pipe.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step-*")) if (self.out / "checkpoints").is_dir() else []
        return found[-1] if found else None

    def save_checkpoint(self) -> None:
        """checkpoints/step-NNNNNN/: the trained tensors, EMA, optimizer and schedule state; written under a
        temporary name and renamed, older ones removed only after, so a full disk or a kill keeps the last
        good one."""
        if self.rank == 0:
            folder = self.out / "checkpoints" / f"step-{self.step:06d}"
            if not folder.exists():
                folder.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=folder.parent))
                try:
                    save_file({k: p.detach().contiguous() for k, p in self.params.items()}, tmp / "trained.safetensors")
                    if self.ema is not None:
                        save_file(self.ema, tmp / "ema.safetensors")
                    torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()},
                               tmp / "optimizer.pt")
                    (tmp / "trainer.json").write_text(json.dumps(
                        {"step": self.step, "config": dataclasses.asdict(self.cfg)}, indent=1))
                    os.rename(tmp, folder)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                for old in sorted(folder.parent.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        if self.world > 1:
            dist.barrier()

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint folder, or from the latest one of a training output folder."""
        path = Path(path)
        if (path / "checkpoints").is_dir():
            path = sorted((path / "checkpoints").glob("step-*"))[-1] if any((path / "checkpoints").glob(
                "step-*")) else path
        if not (path / "trainer.json").is_file():
            raise InputError(f"--resume {path}: no checkpoint there (expected checkpoints/step-NNNNNN/trainer.json)")
        state = json.loads((path / "trainer.json").read_text())
        trained = load_file(path / "trained.safetensors")
        if set(trained) != set(self.params):
            raise InputError(f"--resume {path}: its trained tensors do not match this run's (same --lora-rank, "
                             "--train-text-encoder and model as the run that wrote it?)")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(trained[k])
        if self.ema is not None:
            self.ema = load_file(path / "ema.safetensors")
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.step = state["step"]
        if self.rank == 0 and (self.out / "log.jsonl").is_file():  # drop what was logged after the checkpoint
            lines = (self.out / "log.jsonl").read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            (self.out / "log.jsonl").write_text("".join(line + "\n" for line in kept))

    # -- validation and export ------------------------------------------------------------------------------
    def validate(self) -> Path | None:
        """One contact sheet, samples/step-NNNNNN.png: a row per validation prompt, a column per seed (fixed),
        inpainting into the data's first pictures and masks for 9-channel models."""
        cfg = self.cfg
        if self.rank != 0 or not cfg.validation_prompts:
            if self.world > 1:
                dist.barrier()
            return None
        from .sheet import contact_sheet

        rows = []
        with self.ema_weights(), torch.no_grad(), torch.autocast(self.pipe.device.type, dtype=self.compute_dtype,
                                                                   enabled=self.compute_dtype != torch.float32):
            for i, prompt in enumerate(cfg.validation_prompts):
                inputs = {}
                if self.inpainting:
                    item = self.dataset[i % len(self.dataset)]
                    inputs = dict(image=(item["pixels"][None] + 1) / 2, mask_image=item["mask"][None])
                rows.append([self.pipe(prompt, **inputs, num_inference_steps=cfg.validation_steps,
                                       generator=torch.Generator().manual_seed(seed), progress=False).images[0]
                             for seed in cfg.validation_seeds])
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows, list(cfg.validation_prompts), path)
        if self.world > 1:
            dist.barrier()
        return path

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones (for validation and export), then back."""
        if self.ema is None:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.ema[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])

    def export(self) -> Path | None:
        """out/lora.safetensors (LoRA) or out/model/ (a diffusers-layout folder, EMA weights if kept)."""
        if self.rank != 0:
            return None
        cfg, pipe = self.cfg, self.pipe
        if cfg.lora_rank is not None:
            from ..lora import save_lora

            path = self.out / "lora.safetensors"
            text = cfg.train_text_encoder
            save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder if text else None,
                      text_encoder_2=pipe.text_encoder_2 if text else None, family=pipe.family,
                      format=cfg.lora_format, metadata=dict(ss_steps=self.step, ss_resolution=cfg.resolution,
                                                            ss_learning_rate=cfg.lr, ss_seed=cfg.seed,
                                                            ss_training_comment="ldm_inpaint.train"))
            return path
        from .export import save_folder

        with self.ema_weights():
            return save_folder(pipe, self.configs, self.out / "model", self.tokenizers_from)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE set), join the process group: nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def plot_loss(log: Path, out: Path) -> None:
    from .sheet import line_plot

    records = [json.loads(line) for line in log.read_text().splitlines()]
    line_plot([r["step"] for r in records], [r["loss"] for r in records], out, title="training loss",
              xlabel="step", ylabel="loss")
