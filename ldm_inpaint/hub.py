"""Where a model lives: a local diffusers-layout folder, or a Hugging Face Hub repo id fetched into the cache.

Downloads, resumption, checksums, the cache and offline mode (HF_HUB_OFFLINE=1) are huggingface_hub's; this
module only decides which files a pipeline needs.
"""

from __future__ import annotations

import os
import re

# the files a Stable Diffusion folder needs: configs, tokenizers and the weights of each component
_CONFIGS = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*"]
_SAFETENSORS = ["unet/diffusion_pytorch_model*.safetensors*", "vae/diffusion_pytorch_model*.safetensors*",
                "text_encoder*/model*.safetensors*"]
_BIN = ["unet/diffusion_pytorch_model*.bin*", "vae/diffusion_pytorch_model*.bin*", "text_encoder*/pytorch_model*.bin*"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve(model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False) -> str:
    """A local folder holding the pipeline: `model` itself if it is a folder, else the cached snapshot of the
    hub repo `model` (`owner/name` or `owner/name@revision`)."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if not _REPO_ID.match(model) or os.path.exists(model):
        raise FileNotFoundError(f"model not found: {model!r} is neither a folder nor a hub repo id "
                                "(owner/name); give a diffusers-layout folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, rev = model.partition("@")
    kwargs = dict(revision=rev or revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        folder = snapshot_download(repo_id, allow_patterns=_CONFIGS + _SAFETENSORS, **kwargs)
        if not _has_weights(folder):  # older repos ship only pickled .bin weights
            folder = snapshot_download(repo_id, allow_patterns=_CONFIGS + _BIN, **kwargs)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and downloading is off (offline mode or "
            f"local_files_only); run once online, or `huggingface-cli download {repo_id}`, or pass a folder") from e
    return folder


def _has_weights(folder: str) -> bool:
    unet = os.path.join(folder, "unet")
    return os.path.isdir(unet) and any(f.endswith(".safetensors") for f in os.listdir(unet))
