"""GPT-2 <-> transformers ``GPT2LMHeadModel``: config and state-dict conversion (pure functions).

transformers' GPT-2 stores its projections as ``Conv1D`` with weights ``[in, out]`` (the transpose
of ``nn.Linear``), calls the blocks ``transformer.h.{i}``, keeps causal-mask buffers
(``attn.bias``, ``attn.masked_bias``) in old checkpoints and ties ``lm_head.weight`` to
``transformer.wte.weight``. Checkpoints on disk may omit the ``transformer.`` prefix.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from deepsuite.config.errors import ConfigError
from deepsuite.models.gpt.config import GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_DROPPED_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def config_to_hf(args: GPTConfig) -> dict[str, Any]:
    """A transformers ``GPT2Config`` dict (config.json) describing ``args`` (weights in float32;
    `deepsuite.models.save_hf` rewrites ``torch_dtype`` to the dtype it saves)."""
    eos = 50256 if args.vocab_size == 50257 else None  # GPT-2's <|endoftext|>; unknown otherwise
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": args.vocab_size,
        "n_positions": args.max_seq_len,
        "n_embd": args.d_model,
        "n_layer": args.n_layers,
        "n_head": args.n_heads,
        "n_inner": None if args.ffn_dim == 4 * args.d_model else args.ffn_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": args.dropout,
        "embd_pdrop": args.dropout,
        "attn_pdrop": 0.0,  # deepsuite applies no dropout to attention probabilities
        "layer_norm_epsilon": args.layer_norm_eps,
        "initializer_range": args.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def config_from_hf(config: dict[str, Any]) -> GPTConfig:
    """`GPTConfig` from a transformers GPT-2 config dict; unsupported options raise `ConfigError`.

    ``dropout`` takes ``resid_pdrop`` (deepsuite has one dropout for embeddings and residual
    branches and none on attention probabilities, so ``attn_pdrop`` is not carried over).
    """
    if config.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"config.json model_type={config.get('model_type')!r} is not a GPT-2 config")
    activation = config.get("activation_function", "gelu_new")
    if activation not in _GELU_TANH:
        raise ConfigError(
            f"config.json activation_function={activation!r} is not supported: deepsuite's GPT uses the "
            f"tanh-approximated GELU ({', '.join(_GELU_TANH)})"
        )
    for key, supported in (
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
        ("scale_attn_weights", True),
    ):
        if bool(config.get(key, supported)) != supported:
            raise ConfigError(
                f"config.json {key}={config[key]!r} is not supported by deepsuite's GPT (needs {supported})"
            )
    n_embd = int(config.get("n_embd", 768))
    n_inner = config.get("n_inner")
    args = GPTConfig(
        vocab_size=int(config.get("vocab_size", 50257)),
        max_seq_len=int(config.get("n_positions", 1024)),
        d_model=n_embd,
        n_layers=int(config.get("n_layer", 12)),
        n_heads=int(config.get("n_head", 12)),
        d_ffn=0 if n_inner is None or int(n_inner) == 4 * n_embd else int(n_inner),
        dropout=float(config.get("resid_pdrop", 0.1)),
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
    args.validate()
    return args


def state_dict_to_hf(sd: dict[str, torch.Tensor], args: GPTConfig) -> dict[str, torch.Tensor]:
    """deepsuite GPT state dict -> ``GPT2LMHeadModel`` state dict (``transformer.`` prefix, Conv1D
    weights transposed, ``lm_head.weight`` present; tied, it is the very tensor of ``wte``).

    With ``args.bias=False`` the biases GPT-2 always has are written as zeros.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            continue
        hf_key = re.sub(r"^layers\.", "h.", key)
        if hf_key.endswith(_CONV1D):
            value = value.t().contiguous()
        out[f"transformer.{hf_key}"] = value
    if not args.bias:
        _add_zero_biases(out, args)
    out["lm_head.weight"] = out["transformer.wte.weight"] if args.tie_embeddings else sd["lm_head.weight"]
    return out


def _add_zero_biases(out: dict[str, torch.Tensor], args: GPTConfig) -> None:
    like = out["transformer.wte.weight"]
    sizes = {"ln_1": args.d_model, "ln_2": args.d_model, "attn.c_attn": 3 * args.d_model}
    sizes |= {"attn.c_proj": args.d_model, "mlp.c_fc": args.ffn_dim, "mlp.c_proj": args.d_model}
    for i in range(args.n_layers):
        for name, size in sizes.items():
            out.setdefault(f"transformer.h.{i}.{name}.bias", like.new_zeros(size))
    out.setdefault("transformer.ln_f.bias", like.new_zeros(args.d_model))


def state_dict_from_hf(sd: dict[str, torch.Tensor], args: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) state dict -> deepsuite GPT state dict.

    Accepts keys with or without the ``transformer.`` prefix, drops the causal-mask buffers and,
    when tied, takes the head from ``wte`` (``lm_head.weight`` may be absent on disk). Unknown keys
    are passed through so that the strict load names them.
    """
    out: dict[str, torch.Tensor] = {}
    head: torch.Tensor | None = None
    for key, value in sd.items():
        if key == "lm_head.weight":
            head = value
            continue
        key = key.removeprefix("transformer.")
        if _DROPPED_BUFFERS.match(key):
            continue
        if key.endswith(_CONV1D):
            value = value.t().contiguous()
        out[re.sub(r"^h\.", "layers.", key)] = value
    if not args.bias:
        for key in [k for k in out if k.endswith(".bias")]:
            if torch.count_nonzero(out[key]):
                raise ConfigError(f"{key} is non-zero but model.bias=false; load with model.bias=true")
            del out[key]
    if args.tie_embeddings:
        if "wte.weight" in out:
            out["lm_head.weight"] = out["wte.weight"]
    elif head is not None:
        out["lm_head.weight"] = head
    return out
