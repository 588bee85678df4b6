"""ldm_inpaint: a readable PyTorch reimplementation of latent-diffusion inpainting that matches diffusers.

    import torch, ldm_inpaint
    pipe = ldm_inpaint.load_pipeline("stable-diffusion-v1-5/stable-diffusion-inpainting")
    out = pipe("a red brick wall", image=img, mask_image=mask, generator=torch.Generator().manual_seed(0))
    out.images[0].save("out.png")
"""

from .inpaint import mask_from_alpha, outpaint
from .loading import load_pipeline
from .pipeline import Pipeline, PipelineOutput

__all__ = ["load_pipeline", "Pipeline", "PipelineOutput", "outpaint", "mask_from_alpha"]
