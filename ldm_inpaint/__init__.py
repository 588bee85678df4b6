"""ldm_inpaint: a readable PyTorch reimplementation of latent-diffusion inpainting that matches diffusers.

    import torch, ldm_inpaint
    pipe = ldm_inpaint.load_pipeline("stable-diffusion-v1-5/stable-diffusion-inpainting")
    out = pipe("a red brick wall", image=img, mask_image=mask, generator=torch.Generator().manual_seed(0))
    out.images[0].save("out.png")
"""

import importlib

# name → module; imported on first use, so `python -m ldm_inpaint.sample --help` (and a Ctrl-C while it starts)
# does not wait for torch before the command line can answer
_API = {"load_pipeline": "loading", "Pipeline": "pipeline", "PipelineOutput": "pipeline", "outpaint": "inpaint",
        "mask_from_alpha": "inpaint", "InputError": "checks"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ldm_inpaint' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
