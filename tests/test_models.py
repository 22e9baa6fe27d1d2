"""Properties of the models: 3D RoPE, variable depth and padding, checkpointing, naming contract, export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from volvlp_ray.config import ModelConfig
from volvlp_ray.models import (
    VIT3D_PRESETS,
    VLP,
    RotaryEmbedding3D,
    TextTower,
    ViT3D,
    build_model,
    build_tokenizer,
    load_tokenizer,
    vit3d_flops_per_sample,
    vit3d_from_config,
)
from volvlp_ray.models.vision import apply_rotary, rope_split

PATCH = (4, 16, 16)
CORPUS = [
    "No pleural effusion. Mild cardiomegaly is present.",
    "A lung nodule in the right upper lobe; emphysema in both lungs.",
    "Coronary artery wall calcification. Hiatal hernia.",
    "Bronchiectasis and peribronchial thickening in the lower lobes.",
    "Consolidation and atelectasis; no lymphadenopathy.",
] * 4


def small_vit(pool: str = "cls", **kw) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(dim=48, depth=2, heads=2, patch=PATCH, pool=pool, **kw).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


# --------------------------------------------------------------------------------------------------------
# 3D RoPE


def test_rope_split_covers_head_dim_with_even_parts():
    for hd in (6, 16, 24, 32, 64, 128):
        split = rope_split(hd)
        assert sum(split) * 2 == hd and min(split) >= 1
    with pytest.raises(ValueError, match="head dim"):
        rope_split(4)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 24
    rope = RotaryEmbedding3D(hd)
    ang = rope.angles((7, 6, 6)).view(7, 6, 6, hd // 2)

    def rotated_scores(z0: int, y0: int, x0: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        a = ang[z0 : z0 + 3, y0 : y0 + 3, x0 : x0 + 3].reshape(27, -1)
        qr, kr = apply_rotary(q, a.cos(), a.sin()), apply_rotary(k, a.cos(), a.sin())
        return qr @ kr.transpose(-1, -2)

    q, k = torch.randn(1, 1, 27, hd, dtype=torch.float64), torch.randn(1, 1, 27, hd, dtype=torch.float64)
    base = rotated_scores(0, 0, 0, q, k)
    for shift in [(1, 0, 0), (4, 2, 3), (0, 3, 1)]:
        torch.testing.assert_close(rotated_scores(*shift, q, k), base, rtol=1e-5, atol=1e-5)
    # and positions do matter: the same content on a stretched grid scores differently
    a = ang[0:7:3, 0:6:2, 0:6:2].reshape(27, -1)
    stretched = apply_rotary(q, a.cos(), a.sin()) @ apply_rotary(k, a.cos(), a.sin()).transpose(-1, -2)
    assert not torch.allclose(stretched, base, atol=1e-3)


def test_rope_prefix_token_is_not_rotated():
    cos, sin = RotaryEmbedding3D(24)((2, 2, 2), n_prefix=1, device=torch.device("cpu"))
    assert cos.shape == (9, 12)
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)


# --------------------------------------------------------------------------------------------------------
# variable depth and padding


def test_any_depth_works():
    vit = small_vit()
    for d in (4, 8, 12, 28):
        out = vit(torch.randn(2, 1, d, 32, 32))
        assert out.shape == (2, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize("pool", ["cls", "mean", "attn"])
def test_padding_does_not_change_the_embedding(pool):
    vit = small_vit(pool)
    torch.manual_seed(1)
    vol = torch.randn(1, 1, 12, 32, 32)  # 3 z-patches
    other = torch.randn(1, 1, 20, 32, 32)  # 5 z-patches, unpadded
    with torch.no_grad():
        alone = vit(vol)
        assert torch.allclose(vit(vol, torch.tensor([12])), alone, atol=1e-6)
        zero_pad = torch.cat([vol, torch.zeros(1, 1, 8, 32, 32)], dim=2)
        noise_pad = torch.cat([vol, 5 * torch.randn(1, 1, 8, 32, 32)], dim=2)
        for padded in (zero_pad, noise_pad):
            batch = vit(torch.cat([padded, other]), torch.tensor([12, 20]))
            torch.testing.assert_close(batch[0:1], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch[1:2], vit(other), rtol=1e-5, atol=1e-5)
        # without depths the padding is content, and it shows
        assert not torch.allclose(vit(noise_pad), alone, atol=1e-3)


def test_partial_z_patch_counts_as_valid():
    vit = small_vit()
    valid = vit.valid_tokens(torch.tensor([5, 8, 1]), grid=(3, 2, 2), d=12)
    assert valid.sum(dim=1).tolist() == [2 * 4, 2 * 4, 1 * 4]
    assert vit.valid_tokens(torch.tensor([12, 9]), grid=(3, 2, 2), d=12) is None


# --------------------------------------------------------------------------------------------------------
# checkpointing, errors, presets, naming


def _grads_and_forward_calls(mode, x: torch.Tensor, depths: torch.Tensor | None):
    """Gradients of every parameter after one forward + backward in ``mode``, and per block how often the MLP
    and the attention's qkv projection ran forward (pre-hooks: they fire on recomputation too)."""
    vit = small_vit("attn", grad_checkpointing=mode).train()
    calls = {"mlp": [0] * vit.depth, "qkv": [0] * vit.depth}

    def counter(kind, i):
        def hook(module, args):
            calls[kind][i] += 1
        return hook

    for i, blk in enumerate(vit.blocks):
        blk.mlp.register_forward_pre_hook(counter("mlp", i))
        blk.attn.qkv.register_forward_pre_hook(counter("qkv", i))
    vit(x, depths).pow(2).sum().backward()
    grads = {name: p.grad for name, p in vit.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    return grads, calls


@pytest.mark.parametrize("depths", [None, [12, 8]], ids=["unmasked", "masked"])
def test_grad_checkpointing_modes_give_the_same_gradients_and_recompute_what_they_say(depths):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 12, 32, 32)
    d = None if depths is None else torch.tensor(depths)
    ref, calls = _grads_and_forward_calls("none", x, d)
    # forward calls per block: none runs each sub-layer once; selective runs the MLP again in the backward
    # pass but not attention; full reruns the whole block
    expected = {"none": (1, 1), "selective": (2, 1), "full": (2, 2)}
    assert (calls["mlp"], calls["qkv"]) == ([1, 1], [1, 1])
    for mode in ("selective", "full"):
        grads, calls = _grads_and_forward_calls(mode, x, d)
        assert (calls["mlp"], calls["qkv"]) == ([expected[mode][0]] * 2, [expected[mode][1]] * 2), mode
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
    # no recomputation outside training or without grad
    vit = small_vit(grad_checkpointing="selective").eval()
    vit.blocks[0].mlp.register_forward_pre_hook(lambda m, a: calls.setdefault("eval", []).append(1))
    vit(x, d).sum().backward()
    assert calls["eval"] == [1]


def test_grad_checkpointing_accepts_the_old_boolean_and_rejects_unknown_modes():
    assert small_vit(grad_checkpointing=True).grad_checkpointing == "full"
    assert small_vit(grad_checkpointing=False).grad_checkpointing == "none"
    assert small_vit().grad_checkpointing == "none"
    vit = small_vit(grad_checkpointing="selective")
    vit.grad_checkpointing = True
    assert vit.grad_checkpointing == "full"
    with pytest.raises(ValueError, match=r"'none', 'full', 'selective'"):
        small_vit(grad_checkpointing="partial")
    with pytest.raises(ValueError, match="grad_checkpointing"):
        vit.grad_checkpointing = 1


def test_grad_checkpointing_config_values_from_yaml_and_cli(tmp_path):
    from volvlp_ray.config import ConfigError, config_from_dict, load_config

    for raw, mode in (("true", "full"), ("false", "none"), ("none", "none"), ("selective", "selective"),
                      ("full", "full")):
        (tmp_path / "c.yaml").write_text(f"model:\n  grad_checkpointing: {raw}\n")
        assert load_config(tmp_path / "c.yaml").model.grad_checkpointing == mode, raw
        assert load_config(None, [f"model.grad_checkpointing={raw}"]).model.grad_checkpointing == mode, raw
    assert config_from_dict({"model": {"grad_checkpointing": True}}).model.grad_checkpointing == "full"
    with pytest.raises(ConfigError, match=r"model.grad_checkpointing='some'.*'none', 'full', 'selective'"):
        load_config(None, ["model.grad_checkpointing=some"])


@pytest.mark.parametrize(
    "shape, depths, match",
    [
        ((1, 12, 32, 32), None, "B, C, D, H, W"),
        ((1, 2, 12, 32, 32), None, "channel"),
        ((1, 1, 10, 32, 32), None, r"10, 32, 32.*\(4, 16, 16\)"),
        ((1, 1, 12, 32, 40), None, "multiple of the patch"),
        ((2, 1, 12, 32, 32), [12, 13], r"depths must lie in \[1, D=12\]"),
        ((2, 1, 12, 32, 32), [0, 12], "depths must lie"),
        ((2, 1, 12, 32, 32), [12], "depths must have shape"),
    ],
)
def test_impossible_inputs_raise_clear_errors(shape, depths, match):
    vit = small_vit()
    d = None if depths is None else torch.tensor(depths)
    with pytest.raises(ValueError, match=match):
        vit(torch.zeros(shape), d)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="pool"):
        ViT3D(dim=48, depth=1, heads=2, pool="max")
    with pytest.raises(ValueError, match="dim % heads"):
        ViT3D(dim=50, depth=1, heads=4)
    with pytest.raises(ValueError, match="depths must be an integer"):
        small_vit()(torch.zeros(1, 1, 4, 16, 16), torch.tensor([4.0]))


def test_preset_sizes_and_flops():
    counts = {}
    for name, dims in VIT3D_PRESETS.items():
        with torch.device("meta"):
            vit = ViT3D(**dims, patch=PATCH)
        counts[name] = sum(p.numel() for n, p in vit.named_parameters() if not n.startswith("patch_embed"))
    assert counts["tiny"] < 1e6
    assert 20e6 < counts["small"] < 23e6
    assert 85e6 <= counts["base"] <= 90e6
    assert 295e6 < counts["large"] < 310e6
    # 2 FLOPs per weight per token, plus attention 4 N^2 dim per layer
    n = 8 * 4 * 4
    vit = small_vit("mean")
    matmul = sum(p.numel() for name, p in vit.named_parameters() if p.ndim >= 2)
    expected = 2 * n * matmul + vit.depth * 4 * n * n * vit.dim
    assert vit3d_flops_per_sample(vit, n) == pytest.approx(expected)
    assert vit3d_flops_per_sample("base", n) == vit3d_flops_per_sample(dict(VIT3D_PRESETS["base"]), n)


@pytest.mark.parametrize("pool", ["cls", "mean", "attn"])
def test_muon_adamw_naming_contract(tokenizer, pool):
    model = build_model(ModelConfig(pool=pool), tokenizer)
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embed" not in name:  # routed to Muon: must be a hidden Linear matrix
            assert p.ndim == 2 and isinstance(modules[name.rsplit(".", 1)[0]], nn.Linear), name
    assert model.vision.patch_embed.weight.ndim == 5
    assert "vision.patch_embed.weight" in dict(model.named_parameters())


def test_vit_from_config_and_logit_scale(tokenizer):
    cfg = ModelConfig(preset="tiny", pool="mean", patch=[2, 8, 8], grad_checkpointing="selective")
    vit = vit3d_from_config(cfg)
    assert (vit.dim, vit.patch, vit.pool, vit.grad_checkpointing) == (96, (2, 8, 8), "mean", "selective")
    assert ModelConfig(grad_checkpointing=True).grad_checkpointing == "full"  # the old boolean
    model = build_model(ModelConfig(), tokenizer).eval()
    batch = tokenizer(["no effusion", "lung nodule present"], padding=True, return_tensors="pt")
    out = model(torch.randn(2, 1, 8, 64, 64), None, batch["input_ids"], batch["attention_mask"])
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert out["logit_bias"].item() == pytest.approx(ModelConfig().init_logit_bias)
    # 0-dim outputs (the losses' contract) from (1,)-shaped parameters (DeepSpeed broadcasts need >= 1 dim)
    assert out["logit_scale"].ndim == 0 and out["logit_bias"].ndim == 0
    assert model.logit_scale.ndim == 1 and model.logit_bias.ndim == 1


# --------------------------------------------------------------------------------------------------------
# text tower and tokenizer


def test_tokenizer_round_trip_and_determinism(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Mild CARDIOMEGALY; pleural effusions.", "unseen wordz here"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    enc = loaded(texts, padding=True)
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    assert [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id, loaded.sep_token_id] == [0, 1, 2, 3]
    assert enc["input_ids"][0][0] == loaded.cls_token_id
    # the same corpus gives the same vocabulary, also in another process (Rust hash maps are randomised)
    assert build_tokenizer(CORPUS, 300).get_vocab() == tokenizer.get_vocab()
    code = (
        "import json,sys; from volvlp_ray.models.text import build_tokenizer as b;"
        "print(json.dumps(b(json.loads(sys.argv[1]), 300).get_vocab(), sort_keys=True))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CORPUS)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="corpus"):
        load_tokenizer(ModelConfig())


def test_text_mean_pool_ignores_padding(tokenizer):
    model = build_model(ModelConfig(text_pool="mean"), tokenizer).eval()
    one = tokenizer(["no effusion"], return_tensors="pt")
    two = tokenizer(["no effusion", "a lung nodule in the right upper lobe"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model.text(one["input_ids"], one["attention_mask"])
        b = model.text(two["input_ids"], two["attention_mask"])
    torch.testing.assert_close(b[0:1], a, rtol=1e-5, atol=1e-5)


def test_freeze_text_layers(tokenizer):
    model = build_model(ModelConfig(freeze_text_layers=1), tokenizer)
    bert = model.text.model
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    assert not any(p.requires_grad for p in bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in bert.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in model.vision.parameters())
    batch = tokenizer(["no effusion", "a lung nodule"], padding=True, return_tensors="pt")
    model.encode_text(batch["input_ids"], batch["attention_mask"]).sum().backward()
    assert bert.encoder.layer[0].output.dense.weight.grad is None
    assert bert.encoder.layer[1].output.dense.weight.grad is not None
    with pytest.raises(ValueError, match="has 2 layers"):
        build_model(ModelConfig(freeze_text_layers=3), tokenizer)


# --------------------------------------------------------------------------------------------------------
# export


def test_save_and_load_give_identical_embeddings(tokenizer, tmp_path):
    cfg = ModelConfig(pool="attn", text_pool="mean")
    model = build_model(cfg, tokenizer).eval()
    model.save_pretrained(tmp_path / "export", tokenizer, config={"model": dataclasses.asdict(cfg), "seed": 0})
    loaded = VLP.from_pretrained(tmp_path / "export")
    assert not loaded.training and loaded.model_config == cfg
    spec = json.loads((tmp_path / "export" / "vlp_config.json").read_text())
    assert spec["vocab_size"] == len(tokenizer) and spec["run_config"]["seed"] == 0

    texts = ["Mild cardiomegaly.", "No pleural effusion in both lungs."]
    torch.testing.assert_close(loaded.embed_text(texts), model.embed_text(texts), rtol=0, atol=0)
    vol = np.random.default_rng(0).standard_normal((30, 64, 64)).astype(np.float32)  # D not a multiple of 4
    v = loaded.embed_volume(vol)
    assert v.shape == (128,)
    padded = torch.full((1, 1, 32, 64, 64), -1.0)  # the depth padded with air, as evaluation's collate pads
    padded[0, 0, :30] = torch.from_numpy(vol)
    with torch.no_grad():
        torch.testing.assert_close(v, model.encode_image(padded, torch.tensor([30]))[0], rtol=0, atol=0)
    torch.testing.assert_close(loaded.embed_volume("scan.nii.gz", preprocess=lambda path: vol), v)
    with pytest.raises(ValueError, match="preprocess"):
        loaded.embed_volume("scan.nii.gz")
    assert loaded.logit_scale.item() == model.logit_scale.item()


def test_export_of_a_pretrained_text_model_loads_offline(tmp_path):
    """A non-scratch tower (an HF folder) is rebuilt from the saved HF config, not from its source."""
    import shutil

    from transformers import BertConfig, BertModel

    src = tmp_path / "hf-bert"
    tok = build_tokenizer(CORPUS, 300)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = ModelConfig(text_model=str(src), freeze_text_layers=1)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer).eval()
    assert isinstance(model.text, TextTower) and model.text.hidden_size == 32
    model.save_pretrained(tmp_path / "export", tokenizer)
    shutil.rmtree(src)
    loaded = VLP.from_pretrained(tmp_path / "export")
    texts = ["lung nodule"]
    torch.testing.assert_close(loaded.embed_text(texts), model.embed_text(texts), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.text.model.embeddings.parameters())


# --------------------------------------------------------------------------------------------------------
# GPU-facing properties, checked on CPU


def test_attention_gets_no_mask_unless_a_sample_is_padded(monkeypatch):
    """SDPA's flash / cuDNN kernels take no arbitrary mask: unpadded batches must pass none."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    vit = small_vit("attn")
    x = torch.randn(2, 1, 12, 32, 32)
    with torch.no_grad():
        for depths in (None, torch.tensor([12, 12]), torch.tensor([12, 9])):  # 9 slices still fill 3 z-patches
            masks.clear()
            vit(x, depths)
            assert len(masks) == vit.depth + 1 and all(m is None for m in masks), depths
        masks.clear()
        vit(x, torch.tensor([12, 8]))
    assert len(masks) == vit.depth + 1
    assert all(m is not None and m.dtype == torch.bool and m.shape == (2, 1, 1, 3 * 2 * 2) for m in masks)


@pytest.mark.parametrize("pool", ["cls", "mean", "attn"])
def test_bf16_forward_and_backward_match_fp32(pool):
    """The GPU path runs the model in bf16 (DeepSpeed casts the module): RoPE tables, masks and pooling follow."""
    vit = small_vit(pool).train()
    x, depths = torch.randn(2, 1, 12, 32, 32), torch.tensor([12, 8])
    ref = vit(x, depths)
    half = small_vit(pool).train().to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in vit.state_dict().items()})
    out = half(x.to(torch.bfloat16), depths)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in half.parameters())


@pytest.mark.parametrize("depth", [1, 5])
def test_any_number_of_blocks_and_head_dims_rope_cannot_split(depth):
    vit = ViT3D(dim=36, depth=depth, heads=3, patch=PATCH)  # head dim 12: 2 rotation pairs per axis
    assert len(vit.blocks) == depth and vit(torch.randn(1, 1, 4, 16, 16)).shape == (1, 36)
    with pytest.raises(ValueError, match="even head dim >= 6"):
        ViT3D(dim=20, depth=1, heads=4)  # head dim 5
    with pytest.raises(ValueError, match="even head dim >= 6"):
        ViT3D(dim=16, depth=1, heads=4)  # head dim 4: less than one pair per axis


def test_logit_scale_and_bias_learn(tokenizer):
    model = build_model(ModelConfig(), tokenizer).train()
    from volvlp_ray.losses import build_loss

    batch = tokenizer(["no effusion", "lung nodule present", "emphysema", "hiatal hernia"], padding=True,
                      return_tensors="pt")
    out = model(torch.randn(4, 1, 8, 32, 32), None, batch["input_ids"], batch["attention_mask"])
    build_loss("sigmoid")(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"]).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs().item() > 0
    assert model.vision_proj.weight.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0


def test_text_tower_from_a_local_hf_folder_and_vocab_check(tmp_path):
    """``model.text_model`` = a local folder: AutoModel + AutoTokenizer load it (the cluster path, offline)."""
    from transformers import BertConfig, BertModel

    tok = build_tokenizer(CORPUS, 300)
    src = tmp_path / "clinical-bert"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = ModelConfig(text_model=str(src), text_pool="cls", freeze_text_layers=2)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    assert model.text.model.pooler is None and model.text.hidden_size == 32 and model.text.pool == "cls"
    assert [any(p.requires_grad for p in layer.parameters()) for layer in model.text.model.encoder.layer] == [
        False, False, True]
    ref = BertModel.from_pretrained(src, add_pooling_layer=False).eval()
    enc = tokenizer(["mild cardiomegaly", "no pleural effusion"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.text.eval()(enc["input_ids"], enc["attention_mask"]),
                                   ref(**enc).last_hidden_state[:, 0])
    small = tmp_path / "small-vocab"
    BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(small)
    with pytest.raises(ValueError, match="embeds only 50"):
        build_model(ModelConfig(text_model=str(small)), tokenizer)
