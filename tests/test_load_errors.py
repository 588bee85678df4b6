"""Damaged, hostile or odd model files: every problem the user's files cause is one CheckpointError (or, for a
path or repo that cannot be had, FileNotFoundError) naming the file and what is wrong, raised before any model is
built; `python -m weights_convert` prints it as one `error:` line, exits with 2 and leaves nothing behind, also on a
full disk, Ctrl-C or SIGTERM. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm_inpaint
from ldm_inpaint.hub import resolve
from ldm_inpaint.tokenizer import CLIPTokenizer
from weights_convert import single_file
from weights_convert.__main__ import main as convert
from weights_convert.common import CheckpointError, read_tensors

UNET = Path("unet", "diffusion_pytorch_model.safetensors")
TEXT_ENCODER = Path("text_encoder", "model.safetensors")


@pytest.fixture
def folder(sd_inpaint_dir, tmp_path) -> Path:
    """A copy of the tiny SD 1.5 inpainting folder to damage."""
    return Path(shutil.copytree(sd_inpaint_dir, tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(path: Path, edit) -> None:
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path)


# --- JSON files ---

JSON_DAMAGE = {  # file: (content, words of the message)
    "model_index.json": ("[]", "holds an array, expected a JSON object"),
    "unet/config.json": ('{"in_channels": 9,', "not valid JSON"),
    "text_encoder/config.json": ("null", "holds null"),
    "scheduler/scheduler_config.json": ('{"_class_name": "DDIMScheduler" "beta_end": 0.012}', "not valid JSON"),
    "vae/config.json": ("\xff\xfe", "not valid JSON|cannot be read"),
}


@pytest.mark.parametrize("name", JSON_DAMAGE)
def test_a_damaged_json_file_is_named(folder, monkeypatch, name):
    content, words = JSON_DAMAGE[name]
    (folder / name).write_text(content, encoding="latin-1")
    monkeypatch.setattr(single_file, "read_component", _no_weights)
    with pytest.raises(CheckpointError, match=words) as e:
        ldm_inpaint.load_pipeline(folder)
    assert str(folder / name) in str(e.value)


def test_malformed_json_says_where(folder):
    (folder / "unet" / "config.json").write_text('{\n  "in_channels": 9,\n  "out_channels": 4,,\n}')
    with pytest.raises(CheckpointError, match=r"unet/config.json: not valid JSON \(.* line 3 column"):
        ldm_inpaint.load_pipeline(folder)


def test_a_folder_without_model_index_is_not_a_pipeline_folder(folder):
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="no model_index.json, so not a diffusers-layout pipeline folder"):
        ldm_inpaint.load_pipeline(folder)


@pytest.mark.parametrize("entry, words", [({"text_encoder_2": "CLIPTextModel"}, "text_encoder_2"),
                                          ({"force_zeros_for_empty_prompt": "yes"}, "true or false")])
def test_model_index_entries_are_checked(folder, entry, words):
    edit_json(folder / "model_index.json", **entry)
    with pytest.raises(CheckpointError, match=words):
        ldm_inpaint.load_pipeline(folder)


def test_a_scheduler_config_without_class_is_refused(folder):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    del config["_class_name"]
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="scheduler_config.json: no \"_class_name\""):
        ldm_inpaint.load_pipeline(folder)


# --- model configs ---

def _no_weights(*args, **kwargs):
    raise AssertionError("weights read before the configs were checked")


BAD_CONFIGS = {  # (component, key, value; tuples are JSON arrays): words of the message
    ("unet", "block_out_channels", (-32, 64)): r"block_out_channels\[0\] must be ≥ 1, got -32",
    ("unet", "layers_per_block", 0): "layers_per_block must be ≥ 1, got 0",
    ("unet", "norm_num_groups", 3): "norm_num_groups 3 does not divide",
    ("unet", "attention_head_dim", "8"): "attention_head_dim must be a whole number, got str",
    ("unet", "down_block_types", "CrossAttnDownBlock2D"): "down_block_types must be a list of block type names",
    ("unet", "up_block_types", ("UpBlock2D", "Nonsense")): "up_block_types",
    ("unet", "norm_eps", -1e-5): "norm_eps must be > 0",
    ("vae", "latent_channels", -4): "latent_channels must be ≥ 1, got -4",
    ("vae", "block_out_channels", (16, 32, 0, 32)): r"block_out_channels\[2\] must be ≥ 1",
    ("vae", "scaling_factor", "0.18215"): "scaling_factor must be a number",
    ("text_encoder", "num_hidden_layers", True): "num_hidden_layers must be a whole number, got bool",
    ("text_encoder", "hidden_size", -32): "hidden_size must be ≥ 1",
    ("text_encoder", "hidden_act", "relu"): "hidden_act",
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_config_no_model_can_be_built_from_is_named_before_loading(folder, monkeypatch, case):
    component, key, value = case
    edit_json(folder / component / "config.json", **{key: value})
    monkeypatch.setattr(single_file, "read_component", _no_weights)
    with pytest.raises(CheckpointError, match=BAD_CONFIGS[case]) as e:
        ldm_inpaint.load_pipeline(folder)
    assert str(e.value).startswith(f"{folder / component / 'config.json'}: ")


def test_a_bad_config_folder_for_a_single_file_is_named(folder, tmp_path):
    single = tmp_path / "model.safetensors"
    assert convert([str(folder), str(single)]) == 0
    edit_json(folder / "vae" / "config.json", layers_per_block=-1)
    with pytest.raises(CheckpointError, match=r"vae/config.json: layers_per_block must be ≥ 1"):
        ldm_inpaint.load_pipeline(single, config=folder)


# --- tensors ---

@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_non_floating_weight_in_a_folder_is_named(folder, dtype):
    key = "conv_in.weight"
    edit_tensors(folder / UNET, lambda t: t.update({key: t[key].to(dtype)}))
    with pytest.raises(CheckpointError, match=rf"{key} holds {dtype} values where a floating-point weight"):
        ldm_inpaint.load_pipeline(folder)


def test_a_non_floating_weight_in_a_single_file_is_named(folder, tmp_path):
    single = tmp_path / "model.safetensors"
    assert convert([str(folder), str(single)]) == 0
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    edit_tensors(single, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(CheckpointError, match="final_layer_norm.weight holds torch.int32"):
        ldm_inpaint.load_pipeline(single, config=folder)


def test_integer_position_ids_still_load(folder, tmp_path):
    """Older transformers saved CLIP's `position_ids` (int64) buffer; it is not a weight and stays allowed, in a
    folder and in a single file."""
    ids = torch.arange(77, dtype=torch.int64)[None]
    prefix = "text_model." if any(k.startswith("text_model.") for k in load_file(folder / TEXT_ENCODER)) else ""
    edit_tensors(folder / TEXT_ENCODER, lambda t: t.update({f"{prefix}embeddings.position_ids": ids}))
    ldm_inpaint.load_pipeline(folder)
    single = tmp_path / "model.safetensors"
    assert convert([str(folder), str(single)]) == 0
    edit_tensors(single, lambda t: t.update({"cond_stage_model.transformer.text_model.embeddings.position_ids": ids}))
    ldm_inpaint.load_pipeline(single, config=folder)


MISSHAPEN = {  # single-file key: its damaged shape; each goes through a layout transform or the family detection
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": "flat",
    "conditioner.embedders.1.model.text_projection": "3-d",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": "0-d",
}


@pytest.mark.parametrize("key", MISSHAPEN, ids=MISSHAPEN.values())
def test_a_misshapen_single_file_tensor_is_named(sd_inpaint_dir, sdxl_inpaint_dir, tmp_path, key):
    folder = sdxl_inpaint_dir if key.startswith("conditioner.") else sd_inpaint_dir
    single = tmp_path / "model.safetensors"
    assert convert([str(folder), str(single)]) == 0
    shapes = {"flat": lambda t: t.flatten(), "3-d": lambda t: t[None], "0-d": lambda t: t.sum()}
    edit_tensors(single, lambda t: t.update({key: shapes[MISSHAPEN[key]](t[key])}))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        ldm_inpaint.load_pipeline(single, config=folder)


def _shard(folder: Path, shard: str) -> None:
    """Replace the UNet's weights file by an index naming `shard` for every tensor."""
    keys = list(load_file(folder / UNET))
    index = {"metadata": {}, "weight_map": {k: shard for k in keys}}
    Path(f"{folder / UNET}.index.json").write_text(json.dumps(index))


def test_shards_beside_their_index_load(folder):
    tensors = load_file(folder / UNET)
    keys = sorted(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, folder / "unet" / name)
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    Path(f"{folder / UNET}.index.json").write_text(json.dumps(index))
    (folder / UNET).unlink()
    pipe = ldm_inpaint.load_pipeline(folder)
    assert torch.equal(pipe.unet.conv_in.weight, tensors["conv_in.weight"])


@pytest.mark.parametrize("where", ["../../elsewhere.safetensors", "absolute", "sub/x.safetensors", ".."])
def test_a_shard_outside_the_model_folder_is_refused(folder, tmp_path, where):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / UNET, outside)  # exists: refused for where it is, not for being missing
    _shard(folder, str(outside) if where == "absolute" else where)
    (folder / UNET).unlink()
    with pytest.raises(CheckpointError, match="not a file name in .*shards must lie beside their index"):
        ldm_inpaint.load_pipeline(folder)


def test_a_shard_index_without_weight_map_is_refused(folder):
    Path(f"{folder / UNET}.index.json").write_text('{"metadata": {}}')
    (folder / UNET).unlink()
    with pytest.raises(CheckpointError, match="index.json: no \"weight_map\""):
        ldm_inpaint.load_pipeline(folder)


class NotATensor:  # a global that weights_only unpickling refuses
    pass


def test_a_legacy_torch_save_file_is_read(folder, tmp_path):
    """torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; it is read into memory, still weights-only."""
    single = tmp_path / "model.safetensors"
    assert convert([str(folder), str(single)]) == 0
    tensors = load_file(single)
    legacy = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors}, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:4] != b"PK\x03\x04"
    got = read_tensors(legacy)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)
    pipe = ldm_inpaint.load_pipeline(legacy, config=folder)
    assert torch.equal(pipe.unet.conv_in.weight, tensors["model.diffusion_model.input_blocks.0.0.weight"])

    torch.save({"state_dict": tensors, "extra": NotATensor()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"weights-only PyTorch checkpoint \(a legacy pre-1.6 torch.save"):
        read_tensors(legacy)


# --- tokenizers ---

def test_a_missing_tokenizer_folder_warns_once(folder, capsys):
    shutil.rmtree(folder / "tokenizer")
    pipe = ldm_inpaint.load_pipeline(folder)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {folder} has no tokenizer/; using the CLIP ViT-L/14 "
                                                   "BPE vocabulary packaged with ldm_inpaint"), err
    assert "'<|endoftext|>'" in err
    assert pipe.tokenizer.encode("a red brick wall") == CLIPTokenizer.from_packaged().encode("a red brick wall")


def test_a_complete_folder_loads_silently(sd_inpaint_dir, capsys):
    ldm_inpaint.load_pipeline(sd_inpaint_dir)
    assert capsys.readouterr().err == ""


def test_a_broken_tokenizer_folder_is_named(folder):
    (folder / "tokenizer" / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"tokenizer: not a usable CLIP tokenizer folder"):
        ldm_inpaint.load_pipeline(folder)


# --- paths and the hub ---

@pytest.mark.parametrize("path", ["models/x.safetensors", "./missing", "../missing/model", "/no/such/folder",
                                  "model.ckpt", "~/sd15"])
def test_a_missing_path_is_not_looked_up_on_the_hub(monkeypatch, path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    with pytest.raises(FileNotFoundError, match="^file/folder not found: ") as e:
        ldm_inpaint.load_pipeline(path)
    assert str(e.value) == f"file/folder not found: {os.path.abspath(path)}"


def test_a_file_that_is_no_checkpoint_is_not_a_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is a file, not a diffusers-layout folder"):
        ldm_inpaint.load_pipeline(tmp_path / "notes.txt")


def _no_hub(*args, **kwargs):
    raise AssertionError("a local path was looked up on the hub")


def _hub_raising(cause):
    from huggingface_hub.utils import LocalEntryNotFoundError

    def snapshot_download(*args, **kwargs):
        try:
            raise cause
        except Exception as e:  # as huggingface_hub chains it
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder ...") from e
    return snapshot_download


def _command() -> str:
    help_text = subprocess.run([os.path.join(os.path.dirname(sys.executable), "hf"), "--help"],
                               capture_output=True, text=True).stdout
    assert "download" in help_text  # the command the message names exists in the installed huggingface_hub
    return "hf download"


def test_an_unreachable_hub_is_told_apart_from_offline_mode(monkeypatch):
    import huggingface_hub

    # huggingface_hub chains its HTTP client's connection error; any exception but OfflineModeIsEnabled reads so
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _hub_raising(ConnectionError("no route to host")))
    with pytest.raises(FileNotFoundError) as e:
        ldm_inpaint.load_pipeline("owner/model")
    message = str(e.value)
    assert message.startswith("owner/model is not in the local Hugging Face cache (nor a local folder) and the hub "
                              "could not be reached (ConnectionError: no route to host)"), message
    assert f"`{_command()} owner/model`" in message and "downloading is off" not in message

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _hub_raising(ConnectionError("x")))
    with pytest.raises(FileNotFoundError, match="--revision v2`"):
        ldm_inpaint.load_pipeline("owner/model@v2")


def test_offline_mode_says_downloading_is_off(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import OfflineModeIsEnabled

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _hub_raising(OfflineModeIsEnabled("offline")))
    with pytest.raises(FileNotFoundError, match=r"downloading is off \(HF_HUB_OFFLINE=1\); run once online, or "
                                                r"`hf download owner/model`"):
        ldm_inpaint.load_pipeline("owner/model")
    with pytest.raises(FileNotFoundError, match=r"downloading is off \(local_files_only=True\)"):
        resolve("owner/model", local_files_only=True)


def test_unknown_repo_with_the_real_offline_hub(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1: what huggingface_hub itself raises then is read as offline mode."""
    with pytest.raises(FileNotFoundError, match=r"nobody-here/no-such-model is not in the local Hugging Face cache "
                                                r"\(nor a local folder\) and downloading is off \(HF_HUB_OFFLINE=1\)"):
        ldm_inpaint.load_pipeline("nobody-here/no-such-model")


# --- the converter's command line ---

def cli_code(patch: str = "") -> str:
    """Python that runs the converter's command line on sys.argv after `patch` (run first, to simulate a
    failure), as `python -m weights_convert` does."""
    return f"import sys\nimport weights_convert.__main__ as cli\n{patch}\nsys.exit(cli.main(sys.argv[1:]))"


def run_cli(*args: str, patch: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", cli_code(patch), *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_error_line(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr, r.stderr


CLI_DAMAGE = {  # name: (damage to the folder, words of the message)
    "malformed json": (lambda f: (f / "unet" / "config.json").write_text("{"), "unet/config.json: not valid JSON"),
    "list model_index": (lambda f: (f / "model_index.json").write_text("[1]"), "model_index.json: holds an array"),
    "negative channels": (lambda f: edit_json(f / "unet" / "config.json", block_out_channels=[-32, 64]),
                          "block_out_channels[0] must be ≥ 1"),
    "integer weight": (lambda f: edit_tensors(f / UNET, lambda t: t.update({"conv_in.bias": t["conv_in.bias"].int()})),
                       "conv_in.bias holds torch.int32"),
    "shard outside": (lambda f: (_shard(f, "../../x.safetensors"), (f / UNET).unlink()), "shards must lie beside"),
}


@pytest.mark.parametrize("case", CLI_DAMAGE)
def test_cli_names_damaged_files_in_one_line_and_leaves_nothing(folder, tmp_path, case):
    damage, words = CLI_DAMAGE[case]
    damage(folder)
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli(str(folder), str(out / "model.safetensors"))
    assert_one_error_line(r, words)
    assert os.listdir(out) == []


ENOSPC_SAFETENSORS = """
import safetensors, safetensors.torch
def save_file(*args, **kwargs):
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
safetensors.torch.save_file = save_file
"""
ENOSPC_JSON = """
import errno, pathlib
def write_text(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(self))
pathlib.Path.write_text = write_text
"""


@pytest.mark.parametrize("to", ["single file", "folder"])
def test_cli_on_a_full_disk_says_so_and_leaves_nothing(folder, tmp_path, to):
    """A full disk, as safetensors reports it (its own error type, the OS error in the message) writing a single
    file, and as Python does writing a folder's JSON files."""
    out = tmp_path / "out"
    out.mkdir()
    if to == "single file":
        r = run_cli(str(folder), str(out / "model.safetensors"), patch=ENOSPC_SAFETENSORS)
    else:
        single = tmp_path / "model.safetensors"
        assert convert([str(folder), str(single)]) == 0
        r = run_cli(str(single), str(out / "model"), "--config", str(folder), patch=ENOSPC_JSON)
    assert_one_error_line(r, f"error: cannot write {out}/model")
    assert "no space left on device; free some space" in r.stderr
    assert os.listdir(out) == []


SLOW_SAVE = """
import time
save = cli._save
def slow_save(*args):
    save(*args)  # a partial output exists while it sleeps
    print("saved", flush=True)
    time.sleep(120)
cli._save = slow_save
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_interrupted_leaves_nothing(folder, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", cli_code(SLOW_SAVE), str(folder), str(out / "model.safetensors")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "saved\n"
        assert len(os.listdir(out)) == 1  # the temporary folder, `.model.safetensors.*.tmp`
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and err == "interrupted\n", err
    assert os.listdir(out) == []


def test_cli_interrupted_while_starting_up_prints_one_line(tmp_path):
    """Ctrl-C while torch is imported (most of the start-up time), simulated by a `torch` that raises it."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "torch.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "weights_convert", "a.ckpt", str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr == "interrupted\n", r.stderr
