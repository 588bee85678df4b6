"""Command line: python -m ldm_inpaint.train --model MODEL --data FOLDER (--lora-rank R | --full) --out DIR

    python -m ldm_inpaint.train --model stable-diffusion-v1-5/stable-diffusion-inpainting --data ./my-photos \\
        --lora-rank 16 --resolution 512 --steps 2000 --grad-accum 4 --lr 1e-4 --gradient-checkpointing \\
        --dtype bf16 --validate-every 200 --validation-prompt "a photo of sks dog" --out ./my-lora
    torchrun --nproc_per_node 4 -m ldm_inpaint.train ...      # the same run, data-parallel

Writes DIR/lora.safetensors (kohya format; --lora-format peft for diffusers' keys) or DIR/model/ (a
diffusers-layout folder), DIR/checkpoints/, DIR/samples/, DIR/log.jsonl and DIR/loss.png. Ctrl-C (or SIGTERM)
saves a checkpoint; --resume DIR continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from ..sample import DTYPES, HelpFormatter, Parser


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m ldm_inpaint.train", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="diffusers-layout folder, hub repo id or single checkpoint file")
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions or a "
                   "metadata.jsonl (file_name, text); optional masks/ (white = repaint)")
    p.add_argument("--out", required=True, help="output folder")
    what = p.add_argument_group("what is trained")
    what.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank")
    what.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; default: the rank")
    what.add_argument("--lora-format", choices=("kohya", "peft"), default="kohya")
    what.add_argument("--full", action="store_true", help="train the whole UNet instead of LoRA adapters")
    what.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder(s)")
    data = p.add_argument_group("data")
    data.add_argument("--resolution", type=int, default=512)
    data.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    data.add_argument("--random-flip", action="store_true", help="flip half the pictures horizontally")
    data.add_argument("--caption-dropout", type=float, default=0.0,
                      help="share of captions replaced by '' (what classifier-free guidance needs)")
    data.add_argument("--masks", choices=("random", "data"), default="random",
                      help="9-channel models: random strokes and boxes, or the data's masks/ folder")
    loop = p.add_argument_group("the loop")
    loop.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    loop.add_argument("--batch-size", type=int, default=1, help="per process")
    loop.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    loop.add_argument("--lr", type=float, default=1e-4)
    loop.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    loop.add_argument("--warmup-steps", type=int, default=0)
    loop.add_argument("--weight-decay", type=float, default=1e-2)
    loop.add_argument("--max-grad-norm", type=float, default=1.0)
    loop.add_argument("--ema-decay", type=float, default=None, help="full fine-tunes: keep and export an EMA")
    loop.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting (5 is usual)")
    loop.add_argument("--noise-offset", type=float, default=0.0)
    loop.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30 %% more time")
    loop.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                      help="compute dtype (bf16/fp16: autocast, fp32 master weights)")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; under torchrun: cuda:LOCAL_RANK")
    out = p.add_argument_group("checkpoints and validation")
    out.add_argument("--checkpoint-every", type=int, default=500)
    out.add_argument("--keep-checkpoints", type=int, default=2)
    out.add_argument("--resume", default=None, metavar="DIR", help="an output folder or one of its checkpoints")
    out.add_argument("--validate-every", type=int, default=0, help="steps between validation sheets (0: never)")
    out.add_argument("--validation-prompt", action="append", default=[], help="repeat for several")
    out.add_argument("--validation-seeds", default="0,1,2,3")
    out.add_argument("--validation-steps", type=int, default=20)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    import os

    import torch

    from .. import checks, load_pipeline
    from ..checks import InputError
    from .data import ImageFolder
    from .loop import Trainer, TrainConfig

    if (args.lora_rank is None) == (not args.full):
        raise InputError("choose what to train: --lora-rank R (LoRA adapters) or --full (the whole UNet)")
    device = args.device
    if "LOCAL_RANK" in os.environ and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per process
    device = checks.device(device)
    cfg = TrainConfig(
        out=args.out, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_format=args.lora_format,
        train_text_encoder=args.train_text_encoder, resolution=args.resolution, steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        ema_decay=args.ema_decay, gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
        snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every, validation_prompts=tuple(args.validation_prompt),
        validation_seeds=tuple(int(s) for s in args.validation_seeds.split(",")),
        validation_steps=args.validation_steps)
    cfg.check()
    pipe = load_pipeline(args.model, dtype=torch.float32, device=device)
    masks = (args.masks if pipe.unet.cfg.in_channels == 9 else None)
    dataset = ImageFolder(args.data, args.resolution, center_crop=not args.random_crop, random_flip=args.random_flip,
                          caption_dropout=args.caption_dropout, masks=masks, seed=args.seed)
    trainer = Trainer(cfg, pipe, dataset, pipe.configs, tokenizers_from=pipe.tokenizer_folder)
    if args.resume:
        trainer.resume(args.resume)
    trainer.train()
    return str(trainer.out / ("lora.safetensors" if args.lora_rank is not None else "model"))


def main(argv=None) -> int:
    try:
        from ..outputs import handle_sigterm

        handle_sigterm()
        path = run(parse_args(argv))
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
