"""GPT-2 parity with transformers' GPT2LMHeadModel on tiny random configs built offline."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from deepsuite.checkpoint.hf import load_hf, save_hf
from deepsuite.config.errors import ConfigError
from deepsuite.models.gpt import hf_adapter
from deepsuite.models.gpt.config import GPTConfig
from deepsuite.models.gpt.model import GPT

transformers = pytest.importorskip("transformers")

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "tied-4x": dict(vocab_size=113, n_positions=40, n_embd=32, n_layer=2, n_head=4),
    "untied-n_inner": dict(
        vocab_size=97,
        n_positions=24,
        n_embd=48,
        n_layer=3,
        n_head=6,
        n_inner=80,
        tie_word_embeddings=False,
        layer_norm_epsilon=1e-6,
    ),
    "one-layer-2-heads": dict(vocab_size=128, n_positions=16, n_embd=64, n_layer=1, n_head=2, n_inner=256),
    "pytorch-tanh-8-heads": dict(
        vocab_size=64,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=8,
        activation_function="gelu_pytorch_tanh",
    ),
}


def hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**HF_CONFIGS[name], **NO_DROPOUT, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.config._attn_implementation = "eager"  # the plain softmax(QK^T)V reference
    with torch.no_grad():  # biases and LayerNorms are 0/1 at init: randomise them so the test sees them
        for name_, p in model.named_parameters():
            if name_.endswith("bias") or ".ln_" in name_:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def to_deepsuite(hf) -> GPT:
    args = hf_adapter.config_from_hf(hf.config.to_dict())
    model = GPT(args).eval()
    model.load_state_dict(hf_adapter.state_dict_from_hf(hf.state_dict(), args), strict=True)
    return model


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_gradients_match_transformers(name):
    hf = hf_model(name)
    ours = to_deepsuite(hf)
    assert ours.args.tie_embeddings == hf.config.tie_word_embeddings
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (3, hf.config.n_positions), generator=g)
    targets = torch.randint(0, hf.config.vocab_size, ids.shape, generator=g)

    hf_logits = hf(ids).logits
    our_logits = ours(ids)
    assert (our_logits - hf_logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=0)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    loss(hf_logits).backward()
    loss(our_logits).backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    mapped = hf_adapter.state_dict_from_hf(hf_grads, ours.args)
    our_params = dict(ours.named_parameters())
    assert set(our_params) <= set(mapped)
    for key, p in our_params.items():
        torch.testing.assert_close(
            p.grad, mapped[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_to_deepsuite_to_hf_is_bitwise(name):
    hf = hf_model(name, seed=3)
    ours = to_deepsuite(hf)
    original = hf.state_dict()
    back = hf_adapter.state_dict_to_hf(ours.state_dict(), ours.args)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    assert hf_adapter.config_from_hf(hf_adapter.config_to_hf(ours.args)) == ours.args


def test_keys_without_prefix_and_mask_buffers_are_accepted():
    hf = hf_model("tied-4x")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n_pos = hf.config.n_positions
    for i in range(hf.config.n_layer):  # what old checkpoints (e.g. openai-community/gpt2) carry
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    args = hf_adapter.config_from_hf(hf.config.to_dict())
    ours = GPT(args).eval()
    ours.load_state_dict(hf_adapter.state_dict_from_hf(sd, args), strict=True)
    ids = torch.randint(0, args.vocab_size, (2, 9))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_save_hf_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    for i, args in enumerate(
        [
            GPTConfig(vocab_size=90, max_seq_len=20, d_model=32, n_layers=2, n_heads=2, d_ffn=40),
            GPTConfig(vocab_size=90, max_seq_len=20, d_model=32, n_layers=1, n_heads=4, tie_embeddings=False),
        ]
    ):
        ours = GPT(args)
        ours.init_weights()
        folder = tmp_path / f"m{i}"
        save_hf(ours, folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        assert hf.config.tie_word_embeddings == args.tie_embeddings
        ids = torch.randint(0, args.vocab_size, (2, 20))
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), atol=1e-5, rtol=0)


def test_save_hf_without_biases_writes_zero_biases(tmp_path):
    args = GPTConfig(vocab_size=50, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, bias=False)
    ours = GPT(args)
    ours.init_weights()
    save_hf(ours, tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 50, (1, 16))
    torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tied-4x", "untied-n_inner"])
def test_load_hf_reads_transformers_save_pretrained(tmp_path, name):
    hf = hf_model(name, seed=5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf(tmp_path)
    assert isinstance(ours, GPT)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert (ours.lm_head.weight is ours.wte.weight) == hf.config.tie_word_embeddings
    # and back: save_hf of what we loaded is bitwise the transformers state dict
    save_hf(ours, tmp_path / "again")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again")
    for key, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"activation_function": "gelu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_head": 5}, "n_heads"),
    ],
)
def test_config_from_hf_rejects_unsupported(override, match):
    config = transformers.GPT2Config(**HF_CONFIGS["tied-4x"]).to_dict() | override
    with pytest.raises(ConfigError, match=match):
        hf_adapter.config_from_hf(config)


def test_config_to_hf_fields():
    args = GPTConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=100, tie_embeddings=False, max_seq_len=77)
    cfg = hf_adapter.config_to_hf(args)
    assert cfg["n_inner"] == 100 and cfg["n_positions"] == 77 and cfg["tie_word_embeddings"] is False
    assert hf_adapter.config_to_hf(GPTConfig())["n_inner"] is None
    assert hf_adapter.config_to_hf(GPTConfig())["eos_token_id"] == 50256
    assert hf_adapter.config_from_hf(cfg) == args
