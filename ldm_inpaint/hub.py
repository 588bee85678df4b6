"""Where a model lives: a local diffusers-layout folder, or a Hugging Face Hub repo id fetched into the cache.

Downloads, resumption, checksums, the cache and offline mode (HF_HUB_OFFLINE=1) are huggingface_hub's; this
module only decides which files a pipeline needs.
"""

from __future__ import annotations

import os
import re

# the files a Stable Diffusion folder needs: configs, tokenizers and the weights of each component
_CONFIGS = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*"]
# weight files by component, without extension; a variant goes before it (model.fp16.safetensors), shards
# after it (model-00001-of-00002.safetensors, model.fp16-00001-of-00002.safetensors)
_WEIGHTS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder*/model",
            "text_encoder*/pytorch_model"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve(model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False, variant: str | None = None) -> str:
    """A local folder holding the pipeline: `model` itself if it is a folder, else the cached snapshot of the
    hub repo `model` (`owner/name` or `owner/name@revision`), with only the files a pipeline needs: configs,
    tokenizers and safetensors weights (pickled .bin weights only for repos that have nothing else), of the
    given `variant` ("fp16" → `model.fp16.safetensors`) when asked."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if not _REPO_ID.match(model) or os.path.exists(model):
        raise FileNotFoundError(f"model not found: {model!r} is neither a folder, a checkpoint file nor a hub "
                                "repo id (owner/name); give a diffusers-layout folder or a .safetensors file")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, rev = model.partition("@")
    kwargs = dict(revision=rev or revision, cache_dir=cache_dir, local_files_only=local_files_only)
    suffix = f".{variant}" if variant else ""
    try:
        folder = snapshot_download(repo_id, allow_patterns=_CONFIGS + weight_patterns(variant, "safetensors"), **kwargs)
        if not _has_weights(folder, suffix + ".safetensors"):  # older repos ship only pickled .bin weights
            folder = snapshot_download(repo_id, allow_patterns=_CONFIGS + weight_patterns(variant, "bin"), **kwargs)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and downloading is off (offline mode or "
            f"local_files_only); run once online, or `huggingface-cli download {repo_id}`, or pass a folder") from e
    return folder


def weight_patterns(variant: str | None, ext: str) -> list[str]:
    """Patterns of exactly one variant's weight files (so a plain download skips the fp16 copies)."""
    v = f".{variant}" if variant else ""
    return [p for w in _WEIGHTS for p in (f"{w}{v}.{ext}", f"{w}{v}.{ext}.index.json", f"{w}{v}-0*.{ext}")]


def _has_weights(folder: str, ending: str) -> bool:
    unet = os.path.join(folder, "unet")
    return os.path.isdir(unet) and any(f.endswith(ending) for f in os.listdir(unet))
