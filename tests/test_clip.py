"""The native CLIP text transformers match transformers' CLIPTextModel / CLIPTextModelWithProjection in fp32
(tiny random models saved with save_pretrained and loaded through the key table), and the key tables cover the
official full-size text encoders exactly."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ldm_inpaint.loading import build_text_encoder
from ldm_inpaint.models.clip import VIT_BIGG_14, VIT_L_14, CLIPTextConfig, CLIPTextModel
from weights_convert.clip import TEXT_MODEL_PREFIX, diffusers_keys, diffusers_prefix
from parity import record

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
LAYERS = 3


def tiny_reference(tmp_path: Path, with_projection: bool, eos_token_id: int):
    """A seeded tiny transformers model (real vocabulary size, so real token ids work), saved and reloaded."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if with_projection else "quick_gelu",
        projection_dim=24 if with_projection else 512, eos_token_id=eos_token_id)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    cls(config).eval().save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path).eval()


def loaded_as(config: dict) -> str:
    """The pipeline component a text-encoder config is loaded as: SDXL's second encoder has the projection."""
    return "text_encoder_2" if "CLIPTextModelWithProjection" in config["architectures"] else "text_encoder"


def load_native(folder: Path, tensors=None) -> CLIPTextModel:
    d = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors") if tensors is None else tensors
    return build_text_encoder(d, tensors, torch.float32, "cpu", loaded_as(d))


def input_ids() -> torch.Tensor:
    """Two prompts of different lengths, padded the two ways (49407 as SD 1.5, 0 as SDXL tokenizer_2), and one
    row without <|endoftext|>, where the two pooling rules (argmax / first eos) pick different positions."""
    g = torch.Generator().manual_seed(1)
    cat = [49406, 320, 1125, 539, 320, 2368, 49407]
    long = [49406, *torch.randint(0, 49406, (30,), generator=g).tolist(), 49407]
    rows = [cat + [49407] * (77 - len(cat)), long + [0] * (77 - len(long)),
            torch.randint(0, 49406, (77,), generator=g).tolist()]
    return torch.tensor(rows)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return record((a - b).abs().max().item())


@pytest.mark.parametrize("eos_token_id", [2, 49407], ids=["legacy-eos2", "eos49407"])
@pytest.mark.parametrize("with_projection", [False, True], ids=["vit-l-layout", "bigg-layout"])
def test_text_encoder_matches_transformers_tiny(tmp_path, with_projection, eos_token_id):
    ref = tiny_reference(tmp_path, with_projection, eos_token_id)
    ours = load_native(tmp_path)
    ids = input_ids()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        final_ln = (ref.text_model if with_projection else ref).final_layer_norm
        hidden, pooled = ours(ids, pooled=True)
        diffs = {"last+LN": max_diff(hidden, out.last_hidden_state),
                 "pooled": max_diff(pooled, out.text_embeds if with_projection else out.pooler_output)}
        for i in range(LAYERS + 1):  # every hidden state, without and with the final LayerNorm (clip skip)
            diffs[f"h[{i}]"] = max_diff(ours(ids, hidden_layer=i, final_norm=False).hidden, out.hidden_states[i])
            diffs[f"LN(h[{i}])"] = max_diff(ours(ids, hidden_layer=i).hidden, final_ln(out.hidden_states[i]))
        # SDXL: penultimate without LN, and pooled from the same call
        penult, pooled2 = ours(ids, hidden_layer=-2, final_norm=False, pooled=True)
        diffs["h[-2]"] = max_diff(penult, out.hidden_states[-2])
        diffs["pooled(-2 call)"] = max_diff(pooled2, pooled)
    print(f"\n{'bigG' if with_projection else 'ViT-L'} layout, eos {eos_token_id}: max abs diffs {diffs}")
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("with_projection", [False, True], ids=["vit-l-layout", "bigg-layout"])
def test_both_key_prefix_forms_load(tmp_path, with_projection):
    """transformers 5 saves CLIPTextModel without `text_model.` and CLIPTextModelWithProjection with it; files
    of transformers 4.x always have it and may hold the position_ids buffer. Each file is rewritten to the
    other form and must load to the same outputs."""
    tiny_reference(tmp_path, with_projection, 2)
    saved = load_file(tmp_path / "model.safetensors")
    prefixed = diffusers_prefix(saved) == TEXT_MODEL_PREFIX
    assert prefixed == with_projection
    if prefixed:
        other = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in saved.items()}
    else:
        other = {(k if k == "text_projection.weight" else TEXT_MODEL_PREFIX + k): v for k, v in saved.items()}
        other[TEXT_MODEL_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    ids = input_ids()
    with torch.no_grad():
        a = load_native(tmp_path)(ids, pooled=True)
        b = load_native(tmp_path, other)(ids, pooled=True)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)


def test_layers_after_the_requested_one_are_not_run():
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                         intermediate_size=37))
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    ids = input_ids()[:1]
    with torch.no_grad():
        assert model(ids, hidden_layer=1).pooled is None and calls == [0]
        calls.clear()
        model(ids, hidden_layer=-2)
        assert calls == list(range(LAYERS - 1))
        calls.clear()
        model(ids, hidden_layer=0, pooled=True)
        assert calls == list(range(LAYERS))
    with pytest.raises(IndexError):
        model(ids, hidden_layer=LAYERS + 1)


OFFICIAL = [("sd15", "text_encoder"), ("sd15-inpainting", "text_encoder"), ("sdxl-base", "text_encoder"),
            ("sdxl-base", "text_encoder_2"), ("sdxl-inpainting", "text_encoder"),
            ("sdxl-inpainting", "text_encoder_2")]


@pytest.mark.parametrize("family,component", OFFICIAL)
def test_official_text_encoder_keys_map_exactly(family, component):
    d = json.loads((ROOT / "ldm_inpaint" / "configs" / family / f"{component}.json").read_text())
    cfg = CLIPTextConfig.from_diffusers(d, with_projection="CLIPTextModelWithProjection" in d["architectures"])
    assert cfg == (VIT_BIGG_14 if component == "text_encoder_2" else VIT_L_14)
    official = json.loads((ROOT / "tests" / "data" / "keys" / f"{family}.diffusers.json").read_text())[component]
    # the loader itself, on the meta device: strict, so every official key is read and every parameter filled
    tensors = {k: torch.empty(s, device="meta") for k, s in official.items()}
    model = build_text_encoder(d, tensors, None, "meta", component)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    table = diffusers_keys(cfg, diffusers_prefix(official))
    assert set(table) == set(shapes)
    assert sorted(table.values()) == sorted(official)  # every checkpoint key used once, none left over
    assert {k: official[v] for k, v in table.items()} == shapes


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu_new"), ("num_attention_heads", 7),
                                         ("eos_token_id", [2, 49407]), ("model_type", "clip_vision_model"),
                                         ("projection_dim", None), ("num_hidden_layers", 0)])
def test_unsupported_config_names_the_field(field, value):
    d = json.loads((ROOT / "ldm_inpaint" / "configs" / "sdxl-base" / "text_encoder_2.json").read_text())
    d[field] = value
    with pytest.raises(ValueError, match=field):
        CLIPTextConfig.from_diffusers(d, with_projection=True)
