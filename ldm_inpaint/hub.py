"""Where a model lives: a local diffusers-layout folder, or a Hugging Face Hub repo id fetched into the cache.

Downloads, resumption, checksums, the cache and offline mode (HF_HUB_OFFLINE=1) are huggingface_hub's; this
module only decides which files a pipeline needs.
"""

from __future__ import annotations

import os
import re

from weights_convert.common import CheckpointError

# the files a Stable Diffusion folder needs: configs, tokenizers and the weights of each component
_CONFIGS = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*"]
# weight files by component, without extension; a variant goes before it (model.fp16.safetensors), shards
# after it (model-00001-of-00002.safetensors, model.fp16-00001-of-00002.safetensors)
_WEIGHTS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder*/model",
            "text_encoder*/pytorch_model"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # single-file checkpoints


def resolve(model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False, variant: str | None = None) -> str:
    """A local folder holding the pipeline: `model` itself if it is a folder, else the cached snapshot of the
    hub repo `model` (`owner/name` or `owner/name@revision`), with only the files a pipeline needs: configs,
    tokenizers and safetensors weights (pickled .bin weights only for repos that have nothing else), of the
    given `variant` ("fp16" → `model.fp16.safetensors`) when asked. A path that does not exist, or a repo
    that cannot be had, is a FileNotFoundError saying which and what to do."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise CheckpointError(f"{os.path.abspath(model)} is a file, not a diffusers-layout folder (single "
                              f"checkpoint files end in {', '.join(CHECKPOINT_SUFFIXES)})")
    if not _REPO_ID.match(model) or model.startswith((".", "~")) or model.endswith(CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"file/folder not found: {os.path.abspath(model)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    repo_id, _, rev = model.partition("@")
    kwargs = dict(revision=rev or revision, cache_dir=cache_dir, local_files_only=local_files_only)
    suffix = f".{variant}" if variant else ""
    cli = _cli()
    download = f"`{cli['download']} {repo_id}" + (f" --revision {rev or revision}`" if rev or revision else "`")
    try:
        folder = snapshot_download(repo_id, allow_patterns=_CONFIGS + weight_patterns(variant, "safetensors"), **kwargs)
        if not _has_weights(folder, suffix + ".safetensors"):  # older repos ship only pickled .bin weights
            folder = snapshot_download(repo_id, allow_patterns=_CONFIGS + weight_patterns(variant, "bin"), **kwargs)
    except LocalEntryNotFoundError as e:
        # snapshot_download raises this both when downloading is off and when the hub cannot be reached
        if local_files_only or isinstance(e.__cause__, OfflineModeIsEnabled):
            off = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
            raise FileNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache (nor a local folder) and downloading is off "
                f"({off}); run once online, or {download}, or pass a folder") from e
        cause = e.__cause__ or e
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache (nor a local folder) and the hub could not be "
            f"reached ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); check the "
            f"network and retry, or {download} where there is one and pass the folder") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo_id} has no revision {kwargs['revision']!r} on the Hugging Face Hub") from e
    except RepositoryNotFoundError as e:  # also gated and private repos without access
        raise FileNotFoundError(
            f"{repo_id}: no such repo on the Hugging Face Hub, or it is private or gated (accept its terms on "
            f"huggingface.co, then log in with `{cli['login']}`)") from e
    return folder


def _cli() -> dict[str, str]:
    """The commands of the installed huggingface_hub: its `hf` CLI since 0.34, `huggingface-cli` before."""
    from importlib.util import find_spec

    if find_spec("huggingface_hub.cli") is not None:
        return {"download": "hf download", "login": "hf auth login"}
    return {"download": "huggingface-cli download", "login": "huggingface-cli login"}


def weight_patterns(variant: str | None, ext: str) -> list[str]:
    """Patterns of exactly one variant's weight files (so a plain download skips the fp16 copies)."""
    v = f".{variant}" if variant else ""
    return [p for w in _WEIGHTS for p in (f"{w}{v}.{ext}", f"{w}{v}.{ext}.index.json", f"{w}{v}-0*.{ext}")]


def _has_weights(folder: str, ending: str) -> bool:
    unet = os.path.join(folder, "unet")
    return os.path.isdir(unet) and any(f.endswith(ending) for f in os.listdir(unet))
