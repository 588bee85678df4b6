"""Speed and memory of ldm_inpaint against diffusers, on the same full-size SD 1.5- or SDXL-inpainting files.

    python -m ldm_inpaint.bench               # the full run (docs/benchmarks.md): SD 1.5, fp32 and bf16, 512×512
    python -m ldm_inpaint.bench --quick       # a few minutes: 1 run, fp32, 256×256, 2 steps
    python -m ldm_inpaint.bench --sdxl        # SDXL inpainting: bf16, 768×768, 4 steps
    python -m ldm_inpaint.bench --profile     # also print the top operators of our UNet call

Method:
- Weights. Speed does not depend on the values, so no download is needed: the official configs
  (`ldm_inpaint/configs/<family>/`) are built by diffusers and transformers with their default, seeded
  initialisation and saved once in the diffusers folder layout under `--cache` (SD 1.5 in fp32; SDXL in bf16,
  6.5 GB instead of 13); both sides load these same files. `--weights FOLDER` measures other files instead.
- Isolation. Every measurement runs in a fresh child process (this module with `--child SPEC`), so load time
  and peak RSS (`ru_maxrss` at the child's end) belong to one side only. Import time is taken by one more fresh
  process per run that imports torch and then what a user of that side imports (`ldm_inpaint`, or diffusers'
  pipeline class); imports deferred to load time count as load. Both children use the same number of torch
  threads (torch's default unless `--threads`).
- Alternation. Runs alternate ours, diffusers, then diffusers, ours, … so a slower or busier stretch of the
  machine hits both sides alike and neither side always runs first. Each timing is reported as the median
  and the min–max over all samples of all runs; ratios are ours/diffusers of the medians.
- Stages. A "parts" child loads, then times the UNet call (batch 2 as under guidance, 77-token context; SDXL
  also with pooled text and time ids) once to warm up then `--unet-repeats` times, and VAE encode (posterior
  mode) and decode at the image size, once each (cold: the same for both sides). In the first `--e2e-runs`
  runs an "e2e" child loads and makes one inpainting call end to end (the checkpoint's scheduler, guidance
  7.5, a fixed synthetic image and mask, seed 0): its peak RSS is the memory figure, as a user's would be.
- Noise. Each child also reports the CPU seconds it used per wall-clock second after loading: well below the
  thread count on both sides means other processes took the cores (compare the runs in the JSON).
- Same work. The UNet outputs and end-to-end images of the two sides are compared (max |difference|, expected
  ≤ 1e-3 in fp32); in bf16, each side's image is also compared with its own fp32 image (PSNR).
- Hardware limit. The UNet's FLOPs are counted once (FlopCounterMode on our UNet, on the meta device), giving
  the achieved GFLOP/s of each side next to a plain 4096×4096 matmul's GFLOP/s in the same dtype.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .family import SD15, SDXL, Family

CONFIGS = Path(__file__).resolve().parent / "configs"
SIDES = ("ours", "diffusers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "a photograph of a red brick wall"
GUIDANCE = 7.5
PARITY_TOL = 1e-3  # max |ours − diffusers| expected in fp32
MATMUL_N = 4096


@dataclass(frozen=True)
class Setup:
    """A benchmarked model: a family's inpainting checkpoint, in random weights of one storage dtype."""
    family: Family
    storage: str  # dtype of the random weight files
    full: dict  # settings of the full run
    quick: dict  # settings of --quick

    @property
    def title(self) -> str:
        return f"{self.family.title} inpainting"

    @property
    def configs(self) -> str:  # the official configs, in ldm_inpaint/configs/
        return self.family.variants["inpainting"].config

    @property
    def pipeline(self) -> str:  # diffusers' pipeline class, which is also what its users import
        return self.family.variants["inpainting"].pipeline

    @property
    def weights_folder(self) -> str:  # inside --cache
        return f"{self.configs}-random-{self.storage}-seed0"

    @property
    def sdxl(self) -> bool:
        return self.family.text_encoders == 2


FAMILIES = {
    "sd15": Setup(SD15, "fp32",
                  full=dict(runs=2, dtype="fp32,bf16", size=512, steps=10, unet_repeats=2, e2e_runs=1),
                  quick=dict(runs=1, dtype="fp32", size=256, steps=2, unet_repeats=1, e2e_runs=1)),
    "sdxl": Setup(SDXL, "bf16",
                  full=dict(runs=1, dtype="bf16", size=768, steps=4, unet_repeats=1, e2e_runs=1),
                  quick=dict(runs=1, dtype="bf16", size=512, steps=2, unet_repeats=1, e2e_runs=1)),
}
METRICS = {  # key in a child's result → table label
    "import_s": "import [s]",
    "load_s": "load [s]",
    "ready_s": "import + load [s]",
    "unet_s": "UNet call, batch 2 [s]",
    "unet_gflops": "UNet GFLOP/s",
    "vae_encode_s": "VAE encode [s]",
    "vae_decode_s": "VAE decode [s]",
    "e2e_s": "inpaint end to end [s]",
    "peak_rss_gib": "peak RSS, end to end [GiB]",
    "busy_threads": "CPU s per s, after load",  # below --threads: the machine was busy or a stage is serial
}


# -- 1. weights -----------------------------------------------------------------------------------------------
def build_weights(family: Setup, cache: Path) -> Path:
    """The family's full-size random-weight folder in `cache`, built and saved by diffusers once."""
    folder = cache / family.weights_folder
    if folder.is_dir():
        return folder
    import diffusers
    import transformers

    from .tokenizer import write_tokenizer_folder

    print(f"building random {family.title} weights in {folder} (once) ...", flush=True)
    config = lambda name: json.loads((CONFIGS / family.configs / f"{name}.json").read_text())  # noqa: E731
    partial = cache / (family.weights_folder + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = lambda name, pad: transformers.CLIPTokenizer.from_pretrained(  # noqa: E731
        write_tokenizer_folder(partial / name, pad_token=pad))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[family.storage])  # built in the storage dtype: SDXL never exists in fp32
    try:
        parts = dict(
            unet=diffusers.UNet2DConditionModel.from_config(config("unet")),
            vae=diffusers.AutoencoderKL.from_config(config("vae")),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**config("text_encoder"))),
            tokenizer=tokenizer("tokenizer", "<|endoftext|>"),
            scheduler=getattr(diffusers, config("scheduler")["_class_name"]).from_config(config("scheduler")))
        if family.sdxl:
            parts.update(text_encoder_2=transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**config("text_encoder_2"))), tokenizer_2=tokenizer("tokenizer_2", "!"))
    finally:
        torch.set_default_dtype(default_dtype)
    extra = dict(add_watermarker=False) if family.sdxl else dict(safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
    getattr(diffusers, family.pipeline)(**parts, **extra).save_pretrained(partial, safe_serialization=True)
    write_tokenizer_folder(partial / "tokenizer")  # the official repos ship vocab.json + merges.txt
    if family.sdxl:
        write_tokenizer_folder(partial / "tokenizer_2", pad_token="!")
    partial.rename(folder)  # only a complete folder is ever reused
    return folder


# -- 2. what the hardware and the model ask for -------------------------------------------------------------
def matmul_gflops(dtype: str, threads: int, n: int = MATMUL_N, repeats: int = 5) -> float:
    """Best GFLOP/s of an n×n matmul, a practical ceiling for the UNet's convolutions and projections. Taken in
    a fresh process with the children's thread count: measured in this (parent) process after the SDXL weights
    were built, it read 210 instead of 370 GFLOP/s."""
    code = f"""
import time, torch
torch.set_num_threads({threads})
a, b = torch.randn({n}, {n}).to({DTYPES[dtype]}), torch.randn({n}, {n}).to({DTYPES[dtype]})
a @ b  # warm-up
best = float("inf")
for _ in range({repeats}):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
print(best)"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return 2 * n**3 / float(done.stdout.strip()) / 1e9


def unet_gflop(folder: Path, size: int) -> float:
    """GFLOP of one guided UNet call (batch 2), counted on the meta device: no memory, no time."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models.unet import UNet, UNetConfig

    config = unet_config(folder)
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_diffusers(config))
    x, t, context, added = unet_inputs(config, size, torch.float32)
    x, t, context, added = x.to("meta"), t.to("meta"), context.to("meta"), {k: v.to("meta") for k, v in added.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, context, **added)
    return counter.get_total_flops() / 1e9


# -- 3. the child: one side, one dtype, one run ---------------------------------------------------------------
def unet_config(folder: Path | str) -> dict:
    return json.loads((Path(folder) / "unet" / "config.json").read_text())


def unet_inputs(config: dict, size: int, dtype: torch.dtype):
    """A guided UNet call's inputs: latents [+ mask + masked latents] (2, in_channels, size/8, size/8),
    timestep, context (2, 77, D), and for SDXL the added conditioning: pooled text (2, P) and time ids (2, 6)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config["in_channels"], size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(dtype)
    added = {}
    if config.get("addition_embed_type") == "text_time":
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype)  # original size, crop, target
        pooled_dim = config["projection_class_embeddings_input_dim"] - time_ids.shape[1] * config["addition_time_embed_dim"]
        added = dict(text_embeds=torch.randn(2, pooled_dim, generator=g).to(dtype), time_ids=time_ids)
    return x, torch.tensor(500), context, added


def synthetic_image_and_mask(size: int):
    """A smooth colourful picture and a centred white (repaint) square on black, as PIL images."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.5 * np.sin(6 * xx + 3 * yy + phase) for phase in (0.0, 2.1, 4.2)], axis=-1)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray((rgb * 255).round().astype(np.uint8)), Image.fromarray(mask)


class Ours:
    """The measured operations on ldm_inpaint; `Diffusers` has the same methods."""

    def __init__(self, folder: str, dtype: torch.dtype, family: Setup):
        import ldm_inpaint

        self.pipe = ldm_inpaint.load_pipeline(folder, dtype=dtype)

    def unet(self, x, t, context, added):
        return self.pipe.unet(x, t, context, **added)

    def encode(self, x):
        return self.pipe.vae.encode(x).mode()

    def decode(self, z):
        return self.pipe.vae.decode(z)

    def inpaint(self, **kwargs):
        return self.pipe(**kwargs, progress=False).images


class Diffusers:
    """The measured operations on diffusers' pipeline, loaded as its documentation shows."""

    def __init__(self, folder: str, dtype: torch.dtype, family: Setup):
        import diffusers

        cls = getattr(diffusers, family.pipeline)
        extra = dict(add_watermarker=False) if family.sdxl else dict(safety_checker=None, requires_safety_checker=False)
        self.pipe = cls.from_pretrained(folder, torch_dtype=dtype, **extra)
        self.pipe.set_progress_bar_config(disable=True)
        if family.sdxl and self.pipe.vae.config.force_upcast:
            self.pipe.vae.to(torch.float32)  # as its SDXL pipelines do for every encode and decode, and ours

    def unet(self, x, t, context, added):
        return self.pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added or None,
                              return_dict=False)[0]

    def encode(self, x):
        return self.pipe.vae.encode(x).latent_dist.mode()

    def decode(self, z):
        return self.pipe.vae.decode(z, return_dict=False)[0]

    def inpaint(self, **kwargs):
        return self.pipe(**kwargs).images


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_child(spec: dict) -> None:
    """Measure one side as `spec` says (stage "parts" or "e2e"); write result.json (and the outputs to
    compare) into spec["out"]."""
    torch.set_num_threads(spec["threads"])
    family, dtype, size, out = FAMILIES[spec["family"]], DTYPES[spec["dtype"]], spec["size"], Path(spec["out"])
    module, name = import_of(spec["side"], family)
    getattr(importlib.import_module(module), name)  # imported untimed here: import_probe times it
    side, t_load = _timed(lambda: {"ours": Ours, "diffusers": Diffusers}[spec["side"]](spec["folder"], dtype, family))
    r = {"load_s": [t_load]}
    started, cpu_started = time.perf_counter(), _cpu_seconds()

    if spec["stage"] == "parts":
        with torch.inference_mode():
            x, t, context, added = unet_inputs(unet_config(spec["folder"]), size, dtype)
            eps = side.unet(x, t, context, added)  # warm-up, kept for the comparison
            r["unet_s"] = [_timed(lambda: side.unet(x, t, context, added))[1] for _ in range(spec["unet_repeats"])]
            np.save(out / "unet.npy", eps.float().numpy())

            g = torch.Generator().manual_seed(1)
            vae_dtype = next(side.pipe.vae.parameters()).dtype  # SDXL's VAE stays fp32 on both sides
            image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(vae_dtype)
            latent = torch.randn(1, 4, size // 8, size // 8, generator=g).to(vae_dtype)
            r["vae_encode_s"] = [_timed(lambda: side.encode(image))[1]]
            r["vae_decode_s"] = [_timed(lambda: side.decode(latent))[1]]
        if spec["profile"]:
            r["profile"] = [profile_unet(side, x, t, context, added)]
    else:
        image, mask = synthetic_image_and_mask(size)
        images, t_e2e = _timed(lambda: side.inpaint(
            prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=spec["steps"],
            guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), height=size, width=size,
            output_type="np"))
        r["e2e_s"] = [t_e2e]
        np.save(out / "image.npy", np.asarray(images, dtype=np.float32))
        r["peak_rss_gib"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]  # KiB on Linux
    r["busy_threads"] = [(_cpu_seconds() - cpu_started) / (time.perf_counter() - started)]
    (out / "result.json").write_text(json.dumps(r))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def profile_unet(side, x, t, context, added, rows: int = 20) -> str:
    """The top operators of one UNet call by self CPU time, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        side.unet(x, t, context, added)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# -- 4. the parent: alternate children, collect, compare ------------------------------------------------------
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}


def import_of(side: str, family: Setup) -> tuple[str, str]:
    """(module, name) that a user of `side` imports."""
    return ("ldm_inpaint", "load_pipeline") if side == "ours" else ("diffusers", family.pipeline)


def import_probe(side: str, family: Setup) -> float:
    """Seconds to import what a user of `side` imports, in a fresh process that has imported torch already.
    (The measuring children cannot time it: running this module has imported ldm_inpaint.)"""
    module, name = import_of(side, family)
    code = f"import time, torch; t = time.perf_counter(); from {module} import {name}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], env=CHILD_ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{done.stderr}\nimporting {module} failed (exit {done.returncode})")
    return float(done.stdout.strip().splitlines()[-1])


def spawn(spec: dict, workdir: Path) -> dict:
    """Run one child in a fresh process; returns its result with the paths of its saved outputs."""
    out = Path(tempfile.mkdtemp(prefix=f"{spec['side']}-{spec['dtype']}-{spec['stage']}-", dir=workdir))
    spec = {**spec, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "ldm_inpaint.bench", "--child", str(out / "spec.json")],
                          env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # otherwise its stderr holds only the libraries' warnings and progress bars
        raise SystemExit(f"{done.stderr}\nthe {spec['side']} {spec['dtype']} child failed (exit {done.returncode})")
    result = json.loads((out / "result.json").read_text())
    result["outputs"] = {name: str(out / f"{name}.npy") for name in ("unet", "image") if (out / f"{name}.npy").exists()}
    return result


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def max_abs_diff(a_path: str, b_path: str) -> float:
    return float(np.abs(np.load(a_path) - np.load(b_path)).max())


def bench_dtype(name: str, args, folder: Path, gflop: float, workdir: Path) -> dict:
    """All runs of one dtype, alternating sides; returns the samples, their summaries and the checks."""
    samples = {side: {} for side in SIDES}
    outputs = {side: {} for side in SIDES}
    for run in range(args.runs):
        stages = ("parts", "e2e") if run < args.e2e_runs else ("parts",)
        for side in SIDES if run % 2 == 0 else SIDES[::-1]:  # A B, B A, …: no side always goes first
            print(f"  {name} run {run + 1}/{args.runs}: {side} ...", flush=True)
            r = {"import_s": [import_probe(side, args.family)]}
            for stage in stages:
                spec = dict(side=side, stage=stage, family=args.family_key, dtype=name, folder=str(folder),
                            size=args.size, steps=args.steps, threads=args.threads, unet_repeats=args.unet_repeats,
                            profile=args.profile and side == "ours" and run == 0)
                for key, values in spawn(spec, workdir).items():
                    if key == "outputs":  # saved arrays: the first run's are compared
                        for what, path in values.items():
                            outputs[side].setdefault(what, path)
                    else:
                        r.setdefault(key, []).extend(values)
            r["ready_s"] = [r["import_s"][0] + r["load_s"][0]]
            r["unet_gflops"] = [gflop / s for s in r["unet_s"]]
            for key in METRICS:
                samples[side].setdefault(key, []).extend(r.get(key, []))
            if "profile" in r:
                print(f"\nour UNet call ({name}, batch 2, {args.size}×{args.size}), top operators by self CPU time:\n"
                      f"{r['profile'][0]}", flush=True)
    stats = {side: {k: summary(v) for k, v in samples[side].items()} for side in SIDES}
    checks = {f"{what}_max_abs_diff": max_abs_diff(outputs["ours"][what], outputs["diffusers"][what])
              for what in ("unet", "image")}
    if name == "fp32":
        checks["within_tolerance"] = all(v <= PARITY_TOL for v in checks.values())
    return {"samples": samples, "stats": stats, "checks": checks, "outputs": outputs,
            "matmul_gflops": matmul_gflops(name, args.threads)}


def add_psnr(results: dict) -> None:
    """PSNR of each side's low-precision image against its own fp32 image (same seed, same inputs)."""
    if "fp32" not in results:
        return
    for name, r in results.items():
        if name != "fp32":
            r["psnr_vs_fp32_db"] = {side: psnr(np.load(r["outputs"][side]["image"]),
                                               np.load(results["fp32"]["outputs"][side]["image"])) for side in SIDES}


def format_table(name: str, r: dict, args, gflop: float) -> str:
    def cell(s: dict | None, fmt: str) -> str:
        if s is None:
            return "—"
        spread = f" ({s['min']:{fmt}}–{s['max']:{fmt}})" if s["n"] > 1 else ""
        return f"{s['median']:{fmt}}{spread}"

    lines = [f"{args.family.title}, {name}: {args.size}×{args.size}, {args.steps} {args.scheduler} steps, "
             f"{args.threads} torch threads, {args.runs} run(s); median (min–max)",
             f"  {'':<34} {'ours':>22} {'diffusers':>22} {'ours/diffusers':>15}"]
    for key, label in METRICS.items():
        ours, theirs = (r["stats"][side].get(key) for side in SIDES)
        fmt = ".0f" if key == "unet_gflops" else ".2f"
        ratio = f"{ours['median'] / theirs['median']:.2f}" if ours and theirs and key != "busy_threads" else "—"
        lines.append(f"  {label:<34} {cell(ours, fmt):>22} {cell(theirs, fmt):>22} {ratio:>15}")
    peak = r["matmul_gflops"]
    lines.append(f"  UNet work {gflop:.0f} GFLOP; plain {MATMUL_N}² matmul {peak:.0f} GFLOP/s, so the UNet runs at "
                 + ", ".join(f"{side} {r['stats'][side]['unet_gflops']['median'] / peak:.0%}" for side in SIDES)
                 + " of it")
    c = r["checks"]
    verdict = ("" if "within_tolerance" not in c else
               f" ({'OK' if c['within_tolerance'] else 'EXCEEDS'} ≤ {PARITY_TOL:g})")
    lines.append(f"  max |ours − diffusers|: UNet {c['unet_max_abs_diff']:.2e}, image {c['image_max_abs_diff']:.2e}"
                 + verdict)
    if "psnr_vs_fp32_db" in r:
        lines.append("  PSNR vs own fp32 image: " + ", ".join(f"{side} {r['psnr_vs_fp32_db'][side]:.1f} dB"
                                                             for side in SIDES))
    lines.append("  ratio < 1: ours faster / leaner (GFLOP/s: > 1 is better)")
    return "\n".join(lines)


def machine() -> dict:
    """What the figures were taken on (Linux: ru_maxrss in KiB and /proc/cpuinfo are assumed throughout)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            / 2**30, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": metadata.version("diffusers"), "transformers": metadata.version("transformers"),
            "platform": platform.platform()}


def parse_args(argv=None) -> argparse.Namespace:
    epilog = "Defaults: " + "; ".join(f"{key}{' --sdxl' if key == 'sdxl' else ''}: full run {json.dumps(f.full)}, "
                                      f"--quick {json.dumps(f.quick)}" for key, f in FAMILIES.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog)
    p.add_argument("--quick", action="store_true", help="a short run for development (see defaults below)")
    p.add_argument("--runs", type=int, help="alternating runs per side and dtype")
    p.add_argument("--dtype", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--size", type=int, help="image height and width in pixels (latents are size/8)")
    p.add_argument("--steps", type=int, help="steps of the end-to-end call (the checkpoint's scheduler)")
    p.add_argument("--unet-repeats", type=int, help="timed UNet calls per child, after one warm-up")
    p.add_argument("--e2e-runs", type=int, help="the first this many runs also time the end-to-end call")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in both children")
    p.add_argument("--cache", type=Path, default=Path("bench-cache"), help="where the random weights are kept")
    p.add_argument("--weights", type=Path, help="a diffusers folder of the family to measure instead of random "
                                                "weights (e.g. a real checkpoint)")
    p.add_argument("--json", type=Path, help="where to write all figures (default CACHE/results-FAMILY[-quick].json)")
    p.add_argument("--profile", action="store_true", help="print the top operators of our UNet call")
    p.add_argument("--sdxl", action="store_true", help="benchmark SDXL inpainting instead of SD 1.5 inpainting")
    p.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.family_key = "sdxl" if args.sdxl else "sd15"
    args.family = FAMILIES[args.family_key]
    for key, value in (args.family.quick if args.quick else args.family.full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtypes = [d.strip() for d in args.dtype.split(",")]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype {unknown}; choose from {list(DTYPES)}")
    if args.size % 8 or args.size < 64:
        p.error("--size must be a multiple of 8, at least 64")
    if args.runs < 1 or args.unet_repeats < 1:
        p.error("--runs and --unet-repeats must be at least 1")
    args.e2e_runs = max(1, min(args.e2e_runs, args.runs))  # the image comparison needs one end-to-end call
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(json.loads(Path(args.child).read_text()))
        return 0

    started, load_start = time.perf_counter(), os.getloadavg()
    if args.weights is not None:
        folder = args.weights
        if not (folder / "unet" / "config.json").is_file():
            print(f"--weights {folder}: not a diffusers folder (no unet/config.json)", file=sys.stderr)
            return 2
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        folder = build_weights(args.family, args.cache)
    args.scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    args.scheduler = args.scheduler.removesuffix("DiscreteScheduler").removesuffix("Scheduler")
    gflop = unet_gflop(folder, args.size)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as workdir:
        for name in args.dtypes:
            results[name] = bench_dtype(name, args, folder, gflop, Path(workdir))
        add_psnr(results)
        for r in results.values():
            del r["outputs"]  # temporary files, gone with workdir

    print()
    for name, r in results.items():
        print(format_table(name, r, args, gflop), end="\n\n")
    elapsed = time.perf_counter() - started
    report = {
        "command": "python -m ldm_inpaint.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "load_average_start_end": [load_start, os.getloadavg()],
        "family": args.family_key, "settings": {k: getattr(args, k) for k in (*args.family.full, "threads")},
        "weights": str(folder),
        "unet_gflop": gflop, "elapsed_s": elapsed, "results": results,
    }
    json_path = args.json or args.cache / f"results-{args.family_key}{'-quick' if args.quick else ''}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"all figures: {json_path}; took {elapsed / 60:.1f} min; load average (1, 5, 15 min) "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
