"""Safetensors folders: sharding, atomic writes, tied weights, pickle refusal, strict loading, native folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepsuite.checkpoint import hf_io
from deepsuite.checkpoint.hf import load_hf, save_hf
from deepsuite.checkpoint.hf_io import (
    CheckpointFormatError,
    load_model,
    read_hf_folder,
    save_model,
    write_hf_folder,
)
from deepsuite.config.errors import ConfigError
from deepsuite.models.gpt.config import GPTConfig
from deepsuite.models.gpt.model import GPT
from deepsuite.models.registry import model_family, unwrap_model

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
        assert sorted(p.name for p in folder.iterdir()) == [
            "manifest.json",
            "model.safetensors",
            "model.yaml",
        ]
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
    (tmp_path / "m" / "manifest.json").unlink()  # edited on purpose (test_checksums covers the check)
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
    assert unwrap_model(Engine(model)) is model
    with pytest.raises(ConfigError, match="not a model of any registered family"):
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


# ------------------------------------------------------------------- bad input, MTP copies, modes


def tiny_deepseek(tie: bool = False, mtp_depth: int = 2):
    from deepsuite.models.deepseek_v3.config import DeepSeekV3Config
    from deepsuite.models.deepseek_v3.model import DeepSeekV3

    args = DeepSeekV3Config(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        inter_dim=48,
        moe_inter_dim=16,
        q_lora_rank=0,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=1,
        n_limited_groups=1,
        first_k_dense_replace=1,
        mtp_depth=mtp_depth,
        max_seq_len=64,
        tie_embeddings=tie,
    )
    args.validate()
    torch.manual_seed(0)
    model = DeepSeekV3(args)
    model.init_weights()
    return model.eval()


def _rewrite(file: Path, edit) -> None:
    """Load the safetensors ``file``, apply ``edit(tensors, metadata)`` and write it back."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata() or {}
    edit(tensors, metadata)
    save_file(tensors, str(file), metadata=metadata)


def test_corrupt_folders_raise_checkpoint_format_error_naming_the_file(tmp_path: Path):
    """Truncated safetensors, bad index/config JSON, bad model.yaml and a dangling alias all raise
    `CheckpointFormatError` (not SafetensorError, JSONDecodeError, YAMLError or KeyError)."""
    import shutil

    hf, ds, sharded = tmp_path / "hf", tmp_path / "ds", tmp_path / "sharded"
    save_hf(tiny(), hf)
    save_model(tiny(), ds)
    save_hf(tiny(), sharded, max_shard_bytes=20_000)

    def broken(src: Path, name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(src, out)
        (out / "manifest.json").unlink()  # without checksums the readers' own checks speak
        return out

    trunc = broken(hf, "trunc")
    weights = trunc / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(
        CheckpointFormatError, match=r"trunc/model\.safetensors is not a readable safetensors"
    ):
        load_hf(trunc)
    trunc_ds = broken(ds, "trunc_ds")
    (trunc_ds / "model.safetensors").write_bytes((ds / "model.safetensors").read_bytes()[:50])
    with pytest.raises(CheckpointFormatError, match=r"trunc_ds/model\.safetensors is not a readable"):
        load_model(trunc_ds)

    idx = broken(sharded, "idx")
    (idx / "model.safetensors.index.json").write_text("{\n")
    with pytest.raises(CheckpointFormatError, match=r"idx/model\.safetensors\.index\.json is not valid JSON"):
        load_hf(idx)
    (idx / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointFormatError, match="no 'weight_map'"):
        load_hf(idx)

    cfg = broken(hf, "cfg")
    (cfg / "config.json").write_text("{oops")
    with pytest.raises(CheckpointFormatError, match=r"cfg/config\.json is not valid JSON"):
        load_hf(cfg)

    yml = broken(ds, "yml")
    (yml / "model.yaml").write_text("name: gpt\nargs: {d_model: 32\n")
    with pytest.raises(CheckpointFormatError, match=r"yml/model\.yaml is not valid YAML"):
        load_model(yml)

    for src, load in ((ds, load_model), (hf, load_hf)):
        alias = broken(src, f"alias_{load.__name__}")
        _rewrite(
            alias / "model.safetensors",
            lambda _t, meta: meta.update(
                {"deepsuite.aliases": json.dumps({"lm_head.weight": "nonexistent"})}
            ),
        )
        with pytest.raises(CheckpointFormatError, match=r"'lm_head\.weight' an alias of 'nonexistent'"):
            load(alias)
        with pytest.raises(CheckpointFormatError, match="alias"):
            hf_io.read_safetensors(alias)


def test_bad_deepseek_folders_raise_checkpoint_format_error(tmp_path: Path):
    """A config.json lacking a required key, an expert without up_proj and an unknown weight name are
    `CheckpointFormatError`s naming the folder (not KeyErrors from the adapter)."""
    import shutil

    good = tmp_path / "good"
    save_hf(tiny_deepseek(mtp_depth=0), good)

    def broken(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(good, out)
        (out / "manifest.json").unlink()  # without checksums the readers' own checks speak
        return out

    cfg = broken("cfg")
    config = json.loads((cfg / "config.json").read_text())
    del config["kv_lora_rank"]
    (cfg / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=r"cfg/config\.json lacks the key 'kv_lora_rank'"):
        load_hf(cfg)

    miss = broken("miss")
    _rewrite(miss / "model.safetensors", lambda t, _m: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(
        CheckpointFormatError, match=r"miss do not fit the deepseek_v3 model.*'up_proj' is missing"
    ):
        load_hf(miss)

    unk = broken("unk")
    _rewrite(
        unk / "model.safetensors", lambda t, _m: t.update({"model.layers.0.self_attn.extra": torch.zeros(2)})
    )
    with pytest.raises(
        CheckpointFormatError, match=r"unk do not fit .*unknown DeepSeek-V3 weight 'self_attn\.extra'"
    ):
        load_hf(unk)


@pytest.mark.parametrize("tie", [False, True])
def test_mtp_embedding_and_head_copies_are_real_tensors_on_disk(tmp_path: Path, tie: bool):
    """DeepSeek's MTP layers repeat the embedding and head; a plain safetensors reader (vLLM, DeepSeek's
    inference code) must find them by name through the index, and loading ignores them again."""
    from safetensors import safe_open

    model = tiny_deepseek(tie=tie)
    folder = save_hf(model, tmp_path / "hf", max_shard_bytes=30_000)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    head = model.embed.weight if tie else model.lm_head.weight
    for k in range(model.args.mtp_depth):
        layer = model.args.n_layers + k
        for name, expected in (
            ("embed_tokens.weight", model.embed.weight),
            ("shared_head.head.weight", head),
        ):
            key = f"model.layers.{layer}.{name}"
            assert key in weight_map, key
            with safe_open(str(folder / weight_map[key]), "pt") as f:
                assert key in set(f.keys()), key  # a real tensor, not only a deepsuite alias
                assert torch.equal(f.get_tensor(key), expected.detach()), key
    loaded = load_hf(folder)
    assert loaded.args.mtp_depth == model.args.mtp_depth
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie


def test_loaded_models_are_in_eval_mode(tmp_path: Path):
    """load_model and load_hf return models with dropout off, as transformers' from_pretrained does."""
    args = GPTConfig(**{**ARGS.__dict__, "dropout": 0.5})
    save_model(tiny(args), tmp_path / "ds")
    save_hf(tiny(args), tmp_path / "hf")
    for model in (load_model(tmp_path / "ds"), load_hf(tmp_path / "hf")):
        assert not any(m.training for m in model.modules()), type(model).__name__
        ids = torch.randint(0, 64, (1, 8))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), model(ids), atol=0, rtol=0)  # deterministic


def test_atomic_dir_sets_mode_from_umask_and_fsyncs_before_the_rename(tmp_path: Path, monkeypatch):
    import os
    import stat

    from deepsuite.checkpoint import atomic

    synced: list[tuple[str, Path, bool]] = []
    real_file, real_dir = atomic.fsync_file, atomic.fsync_dir

    def record(kind, real):
        def fsync(path):
            synced.append((kind, Path(path), (tmp_path / "out").exists()))
            real(path)

        return fsync

    monkeypatch.setattr(atomic, "fsync_file", record("file", real_file))
    monkeypatch.setattr(atomic, "fsync_dir", record("dir", real_dir))
    old = os.umask(0o027)
    try:
        save_hf(tiny(), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    before_rename = [(kind, p.name) for kind, p, renamed in synced if not renamed]
    assert ("file", "model.safetensors") in before_rename and ("file", "config.json") in before_rename
    assert any(kind == "dir" and name.startswith(".out.tmp-") for kind, name in before_rename)
    assert ("dir", tmp_path) in [(kind, p) for kind, p, renamed in synced if renamed]  # the rename itself
    old = os.umask(0o022)
    try:
        save_model(tiny(), tmp_path / "ds")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o755
