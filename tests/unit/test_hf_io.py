"""Safetensors folders: sharding, atomic writes, tied weights, pickle refusal, strict loading, native folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepsuite.checkpoint import hf_io
from deepsuite.checkpoint.hf_io import (
    CheckpointFormatError,
    load_model,
    read_hf_folder,
    save_model,
    write_hf_folder,
)
from deepsuite.models.gpt.config import GPTConfig
from deepsuite.models.gpt.model import GPT
from deepsuite.models.hf import load_hf, model_family, save_hf

ARGS = GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2)


def tiny(args: GPTConfig = ARGS, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(args)
    model.init_weights()
    return model.eval()


def test_sharded_write_and_read(tmp_path):
    model = tiny()
    save_hf(model, tmp_path / "m", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = load_hf(tmp_path / "m")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 64, (1, 16))
    torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_tied_weights_are_written_once_and_retied(tmp_path):
    save_hf(tiny(), tmp_path / "hf")
    _, tensors = read_hf_folder(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert "lm_head.weight" not in on_disk and "transformer.wte.weight" in on_disk
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    loaded = load_hf(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.wte.weight


def test_native_folder_round_trip(tmp_path):
    for args in (ARGS, GPTConfig(**{**ARGS.__dict__, "tie_embeddings": False, "d_ffn": 48})):
        model = tiny(args, seed=1)
        folder = tmp_path / f"native-{args.tie_embeddings}"
        save_model(model, folder)
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "model.yaml"]
        loaded = load_model(folder)
        assert isinstance(loaded, GPT) and loaded.args == args
        assert (loaded.lm_head.weight is loaded.wte.weight) == args.tie_embeddings
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
    bf16 = load_model(tmp_path / "native-True", dtype=torch.bfloat16)
    assert bf16.wte.weight.dtype == torch.bfloat16


def test_write_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    target = tmp_path / "out"
    save_hf(tiny(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(tiny(seed=2), target)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_io, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(tiny(seed=2), target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before, (
        "a failed write must leave the old folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder may be left behind"
    with pytest.raises(RuntimeError):
        save_hf(tiny(), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    save_hf(tiny(seed=2), target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointFormatError, match=r"found pytorch_model\.bin.*safetensors only"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointFormatError, match=r"no config\.json"):
        load_hf(tmp_path / "missing")


def test_strict_load_names_missing_and_unexpected_keys(tmp_path):
    model = tiny()
    save_hf(model, tmp_path / "m")
    config, tensors = read_hf_folder(tmp_path / "m")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    write_hf_folder(tmp_path / "broken", config, tensors)
    with pytest.raises(
        CheckpointFormatError,
        match=r"missing \(e\.g\. layers\.1\.mlp\.c_fc\.bias\).*unexpected \(e\.g\. layers\.0\.attn\.rotary\.weight\)",
    ):
        load_hf(tmp_path / "broken")
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(5)
    del tensors["transformer.h.0.attn.rotary.weight"]
    write_hf_folder(tmp_path / "shape", config, tensors)
    with pytest.raises(CheckpointFormatError, match="size mismatch"):
        load_hf(tmp_path / "shape")


def test_load_hf_dtype_and_unknown_model_type(tmp_path):
    save_hf(tiny(), tmp_path / "m")
    assert load_hf(tmp_path / "m", dtype=torch.bfloat16).wte.weight.dtype == torch.bfloat16
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    from deepsuite.config.errors import ConfigError

    with pytest.raises(ConfigError, match="bert"):
        load_hf(tmp_path / "m")


def test_shared_storage_views_are_copied(tmp_path):
    base = torch.arange(12.0)
    tensors = {"a": base[:6], "b": base[6:], "c": base[:6]}
    write_hf_folder(tmp_path / "v", {"model_type": "x"}, tensors)
    _, back = read_hf_folder(tmp_path / "v")
    assert (
        torch.equal(back["a"], base[:6])
        and torch.equal(back["b"], base[6:])
        and torch.equal(back["c"], base[:6])
    )


def test_model_family_of_wrapped_models():
    model = tiny()

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert model_family(model) == "gpt"
    from deepsuite.models.hf import unwrap_model

    assert unwrap_model(Engine(model)) is model
    with pytest.raises(CheckpointFormatError, match="not a model of any registered family"):
        model_family(torch.nn.Linear(2, 2))


def test_reads_a_plain_single_file_folder_written_elsewhere(tmp_path: Path):
    """A folder written by another tool (no deepsuite metadata, untied head present) loads."""
    model = tiny()
    from deepsuite.models.gpt import hf_adapter

    sd = {
        k: v.clone()
        for k, v in hf_adapter.state_dict_to_hf(model.state_dict(), ARGS).items()
        if k != "lm_head.weight"
    }
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_adapter.config_to_hf(ARGS)))
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(load_hf(tmp_path)(ids), model(ids), atol=0, rtol=0)


def test_strict_load_accepts_one_name_of_a_tied_parameter():
    from deepsuite.checkpoint.hf_io import load_state_dict_strict

    source = tiny(seed=4)
    sd = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    target = tiny(seed=5)
    load_state_dict_strict(target, sd)
    assert (
        torch.equal(target.lm_head.weight, source.wte.weight) and target.lm_head.weight is target.wte.weight
    )
    untied_args = GPTConfig(**{**ARGS.__dict__, "tie_embeddings": False})
    with pytest.raises(CheckpointFormatError, match=r"1 missing \(e\.g\. lm_head\.weight\)"):
        load_state_dict_strict(tiny(untied_args), sd)
