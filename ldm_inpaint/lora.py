"""Low-rank adaptation (LoRA) of the UNet and the text encoders: the modules that train it, the files other tools
read, and merging such a file into a pipeline's weights.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685: a frozen weight W (out × in)
is adapted by W + (α / r) · up @ down, with down (r × in) and up (out × r) trained; up starts at zero, so training
starts from the base model. α ("network alpha", kohya-ss) makes the update's size independent of the rank r.

Files are safetensors that name each adapted module by its path in some layout of the model:

    kohya (kohya-ss sd-scripts; A1111 and ComfyUI read it; diffusers converts it on load):
        lora_unet_<path, . → _>.lora_down.weight (r × in), .lora_up.weight (out × r), .alpha (0-d)
        UNet paths are diffusers' for SD 1.x (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q)
        and the original sgm ones for SDXL (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q); text
        encoders are lora_te_ (SD 1.x) or lora_te1_ / lora_te2_ (SDXL) + transformers' path
        (lora_te_text_model_encoder_layers_0_self_attn_q_proj).
    peft (diffusers' own `save_lora_weights` / `load_lora_weights`):
        unet.<diffusers path>.lora_A.weight (down), .lora_B.weight (up); text_encoder.…, text_encoder_2.…
        The scale is lora_alpha / r from the header's `lora_adapter_metadata` ({"unet.lora_alpha": …,
        "unet.r": …}), 1 without it. `save_lora` writes no such header and folds α / r into lora_B instead, so
        the file means the same to readers that ignore the header (ComfyUI); diffusers then infers scale 1.

Module paths come from weights_convert's key tables (the same ones that load checkpoints), so no second table
of names is kept here. A reader of another LoRA layout is one more entry in `READERS`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import weights_convert.clip as clip_keys
import weights_convert.unet as unet_keys
from weights_convert.common import read_tensors

from .checks import InputError, number
from .family import SD15, Family
from .outputs import atomic_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # the attention projections, as diffusers' LoRA scripts adapt
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMATS = ("kohya", "peft")
# kohya's key prefix → pipeline component; lora_te_ is SD 1.x's one encoder, te1 / te2 SDXL's two
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_BASE_MODEL = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version values
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key (loaders/lora_base.py)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + (α / r) · up(down(x))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        # fp32 whatever the base's dtype: the optimizer's small steps need the precision
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own initialisation, as peft's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))  # (…, r) → (…, out)
        return self.base(x) + update * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = UNET_TARGETS) -> list[nn.Parameter]:
    """Wrap every nn.Linear of `model` whose name ends in one of `targets` in a `LoRALinear` (in place) and
    return the new trainable parameters. α defaults to the rank (scale 1). The caller freezes the rest
    (`model.requires_grad_(False)` before this call)."""
    rank = number(rank, "rank", integer=True, low=1)
    alpha = None if alpha is None else number(alpha, "alpha", low=0, low_open=True)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in targets]
    if not names:
        raise InputError(f"no nn.Linear named {targets} in {type(model).__name__}: use targets=UNET_TARGETS for "
                         f"a UNet, TEXT_TARGETS for a text encoder")
    params = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        lora = LoRALinear(getattr(owner, leaf), rank, alpha)
        setattr(owner, leaf, lora)
        params += [lora.down, lora.up]
    return params


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{native module name: LoRALinear} of a model `add_lora` adapted."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# --- module paths -----------------------------------------------------------------------------------------------

def _paths(table: Mapping[str, str]) -> dict[str, str]:
    """{native module: checkpoint module} from a {native key: checkpoint key} table, for modules with a weight."""
    return {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
            for ours, theirs in table.items() if ours.endswith(".weight")}


def file_paths(component: str, model: nn.Module, family: Family, format: str) -> dict[str, str]:
    """{native module: its path in a LoRA file} for one component, as `save_lora` writes it."""
    if component != "unet":  # kohya and diffusers both name text encoders by transformers' paths
        return _paths(clip_keys.diffusers_keys(model.cfg, clip_keys.TEXT_MODEL_PREFIX))
    if format == "kohya" and family.name == "sdxl":  # kohya trains SDXL on the original sgm UNet
        return _paths(unet_keys.ldm_keys(model.cfg, prefix=""))
    return _paths(unet_keys.diffusers_keys(model.cfg))


def _known_paths(component: str, model: nn.Module) -> dict[str, str]:
    """{path in any layout a LoRA file may use: native module}: diffusers' and sgm's UNet paths; text-encoder
    paths with and without transformers' `text_model.` (diffusers strips it from some files)."""
    if component == "unet":
        tables = [unet_keys.diffusers_keys(model.cfg), unet_keys.ldm_keys(model.cfg, prefix="")]
    else:
        tables = [clip_keys.diffusers_keys(model.cfg, prefix) for prefix in (clip_keys.TEXT_MODEL_PREFIX, "")]
    return {theirs: ours for table in tables for ours, theirs in _paths(table).items()}


# --- saving ------------------------------------------------------------------------------------------------------

def kohya_prefix(component: str, family: Family) -> str:
    if component == "unet":
        return "lora_unet_"
    if family.text_encoders == 1:
        return "lora_te_"
    return "lora_te1_" if component == "text_encoder" else "lora_te2_"


def save_lora(path: str | os.PathLike, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
              text_encoder_2: nn.Module | None = None, family: Family = SD15, format: str = "kohya",
              metadata: Mapping[str, object] | None = None) -> None:
    """Write the LoRA weights of the models `add_lora` adapted to a safetensors file, atomically.

    Args:
        path: the `.safetensors` file.
        unet, text_encoder, text_encoder_2: the adapted models; leave out those that were not trained.
        family: SD15 or SDXL: decides kohya's UNet layout (diffusers / sgm) and text-encoder prefixes.
        format: "kohya" (A1111, ComfyUI, diffusers) or "peft" (diffusers' own layout; α / r folded into lora_B).
        metadata: extra header entries (training settings, …); values that are not strings are stored as JSON.
            The header also gets kohya's summary fields: ss_network_dim (r), ss_network_alpha (the trained α,
            which a peft file has already folded into lora_B), ss_base_model_version.
    """
    if format not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {format!r}")
    if text_encoder_2 is not None and family.text_encoders != 2:
        raise InputError(f"{family.title} has no text_encoder_2: pass family=SDXL, or leave text_encoder_2 out")
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for component, model in models.items():
        if model is None:
            continue
        adapted = lora_modules(model)
        if not adapted:
            raise InputError(f"{component} has no LoRA modules: call add_lora on it, or leave it out")
        paths = file_paths(component, model, family, format)
        for name, m in adapted.items():
            down, up = m.down.detach(), m.up.detach()
            if format == "kohya":
                key = kohya_prefix(component, family) + paths[name].replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(m.alpha, dtype=down.dtype)}
            else:
                key = f"{component}.{paths[name]}"
                tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up * m.scale}
            ranks.add(m.rank)
            alphas.add(m.alpha)
    if not tensors:
        raise InputError("nothing to save: pass the adapted unet=, text_encoder= or text_encoder_2=")

    header = {"ss_network_module": "networks.lora", "ss_base_model_version": KOHYA_BASE_MODEL[family.name]}
    if len(ranks) == 1 and len(alphas) == 1:  # kohya's summary fields hold one value for the whole file
        header |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": f"{alphas.pop():g}"}
    if format == "peft":
        header["format"] = "pt"  # as diffusers writes it
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise InputError(f"metadata keys must be strings, got {key!r}")
        header[key] = value if isinstance(value, str) else json.dumps(value)

    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)
    with atomic_file(path) as f:
        f.write(data)


# --- reading and merging -----------------------------------------------------------------------------------------

@dataclass
class Update:
    """One module's low-rank update as a file holds it."""
    format: str  # the key of its reader in READERS
    component: str  # "unet", "text_encoder", "text_encoder_2"
    name: str  # the module's path, spelled as the file's format spells it
    key: str  # the file key it came from, for messages
    down: torch.Tensor  # (r, in) or a conv's (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float  # α / r


def _read_kohya(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], path: str) -> list[Update]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, leaf = key.partition(".")
        if leaf not in ("lora_down.weight", "lora_up.weight", "alpha") or not name.startswith(tuple(KOHYA_PREFIXES)):
            raise InputError(f"{path}: {key} is not a key of a kohya LoRA (lora_unet_… / lora_te…_ with "
                             f".lora_down.weight, .lora_up.weight, .alpha); LoHa, LoKr and DoRA are not supported")
        groups.setdefault(name, {})[leaf] = t
    updates = []
    for name, g in groups.items():
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise InputError(f"{path}: {name} lacks its lora_down or lora_up weight; the file is incomplete")
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        if down.ndim < 2 or g.get("alpha", torch.zeros(())).numel() != 1:
            raise InputError(f"{path}: {name} holds a {tuple(down.shape)} lora_down or a non-scalar alpha; "
                             f"the file is damaged or not a LoRA")
        alpha = float(g["alpha"]) if "alpha" in g else down.shape[0]  # no alpha: α = r, as kohya and diffusers
        prefix = next(p for p in KOHYA_PREFIXES if name.startswith(p))
        component = KOHYA_PREFIXES[prefix]
        updates.append(Update("kohya", component, name.removeprefix(prefix), name, down, up, alpha / down.shape[0]))
    return updates


_PEFT_KEY = re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight")


def _peft_scale(header: Mapping[str, str], component: str, path: str) -> float | None:
    """lora_alpha / r of one component from diffusers' `lora_adapter_metadata` header, None without it."""
    try:
        meta = json.loads(header.get(PEFT_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        raise InputError(f"{path}: its {PEFT_METADATA_KEY} header is not valid JSON") from None
    config = {k.removeprefix(f"{component}."): v for k, v in meta.items() if k.startswith(f"{component}.")}
    if any(config.get(k) for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora")):
        raise InputError(f"{path}: per-module ranks or alphas, rsLoRA and DoRA in {PEFT_METADATA_KEY} are not "
                         f"supported yet")
    if "lora_alpha" not in config:
        return None
    return float(config["lora_alpha"]) / float(config.get("r", 8))  # 8: peft LoraConfig's default r


def _read_peft(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], path: str) -> list[Update]:
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise InputError(f"{path}: {key} is not a key of a diffusers LoRA (unet. / text_encoder. / "
                             f"text_encoder_2. + module + .lora_A.weight / .lora_B.weight)")
        pairs.setdefault((m[1], m[2]), {})[m[3]] = t
    updates = []
    for (component, name), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InputError(f"{path}: {component}.{name} lacks its lora_A or lora_B weight; the file is incomplete")
        scale = _peft_scale(header, component, path)
        updates.append(Update("peft", component, name, f"{component}.{name}.lora_A.weight", ab["A"], ab["B"],
                              1.0 if scale is None else scale))
    return updates


@dataclass(frozen=True)
class Reader:
    detect: Callable[[list[str]], bool]  # does a file with these keys use this layout?
    read: Callable[[Mapping[str, torch.Tensor], Mapping[str, str], str], list[Update]]
    spell: Callable[[str], str]  # a module path (dots) as the layout writes it


READERS = {
    "kohya": Reader(lambda keys: any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys), _read_kohya,
                    lambda p: p.replace(".", "_")),
    "peft": Reader(lambda keys: any(".lora_A." in k or ".lora_B." in k for k in keys), _read_peft, lambda p: p),
}


def read_lora(path: str | os.PathLike) -> list[Update]:
    """The updates a LoRA file holds, in any layout of `READERS`."""
    path = os.fspath(path)
    tensors = read_tensors(path)
    header = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    keys = list(tensors)
    for reader in READERS.values():
        if reader.detect(keys):
            return reader.read(tensors, header, path)
    example = f", e.g. {keys[0]}" if keys else ""
    raise InputError(f"{path} is not a LoRA file: expected kohya (lora_unet_…, lora_te…_) or diffusers "
                     f"(….lora_A.weight) keys, found {len(keys)} other key(s){example}")


def load_lora(pipe, path: str | os.PathLike, scale: float = 1.0) -> None:
    """Merge a LoRA file into `pipe`'s UNet and text encoder weights: W ← W + scale · (α / r) · up @ down.

    Strict: every update must name a module of this pipeline, with matching shapes; otherwise nothing is
    changed and a one-line InputError names the key. Loading several files stacks them. The merged weights are
    new tensors (see `merge`), so they survive the pipeline handing its weights back to the page cache."""
    scale = number(scale, "LoRA scale")
    updates = read_lora(path)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    if pipe.text_encoder_2 is None and any(u.component == "text_encoder_2" for u in updates):
        raise InputError(f"{path} adapts a second text encoder: it is an SDXL LoRA, and this pipeline is "
                         f"{pipe.family.title}")
    plan = []  # everything is checked before any weight changes
    for component in COMPONENTS:
        todo = [u for u in updates if u.component == component]
        if not todo:
            continue
        spell = READERS[todo[0].format].spell
        modules = {spell(p): native for p, native in _known_paths(component, models[component]).items()}
        missing = [u.key for u in todo if u.name not in modules]
        if missing:
            raise InputError(f"{path}: {len(missing)} LoRA key(s) name no module of this {pipe.family.title} "
                             f"pipeline's {component}, e.g. {missing[0]}; is the LoRA for another model?")
        for u in todo:
            module = models[component].get_submodule(modules[u.name])
            _check_shapes(u, module, component, path)
            plan.append((module, u))
    for module, u in plan:
        merge(module, u.down, u.up, scale * u.scale)


def _check_shapes(u: Update, module: nn.Module, component: str, path: str) -> None:
    weight = getattr(module, "weight", None)
    ok = (isinstance(weight, torch.Tensor) and weight.ndim >= 2 and u.down.ndim == u.up.ndim >= 2
          and u.up.shape[1] == u.down.shape[0] and u.up.shape[0] == weight.shape[0]
          and math.prod(u.up.shape[2:]) == 1 and u.down[0].numel() == weight[0].numel())
    if not ok:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise InputError(f"{path}: {u.key} (down {tuple(u.down.shape)}, up {tuple(u.up.shape)}) does not fit "
                         f"{component} weight {shape}; is the LoRA for another model (SD 1.x vs SDXL)?")


@torch.no_grad()
def merge(module: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    """module.weight ← weight + scale · up @ down, for a Linear or a Conv2d (LoCon's k×k down, 1×1 up)."""
    w = module.weight
    delta = up.flatten(1).to(w.device, torch.float32) @ down.flatten(1).to(w.device, torch.float32)  # (out, in·k·k)
    # a new tensor, never an in-place add: the weight may be the memory-mapped checkpoint file itself
    # (weights_convert.common.load_into), whose pages the pipeline hands back to the page cache after each stage
    w.data = (w.float() + scale * delta.reshape(w.shape)).to(w.dtype)
