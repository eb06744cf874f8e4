"""The operator tools end to end on checkpoints this module trains itself: `tools/convert_hf.py`,
`tools/consolidate_zero.py`, `tools/inspect_checkpoint.py`, `tools/plot_metrics.py` and their
`deepsuite convert|consolidate|inspect` subcommands, as subprocesses, for GPT (ZeRO-0) and
DeepSeek-V3 (ZeRO-2)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DEEPSEEK, tiny_overrides

from deepsuite.checkpoint.consolidate import load_model_from_checkpoint
from deepsuite.checkpoint.hf import save_hf
from deepsuite.checkpoint.hf_io import read_safetensors, save_model
from deepsuite.checkpoint.inspect import inspect_checkpoint
from deepsuite.cli import main
from deepsuite.config import load_config
from deepsuite.models.registry import get_model_spec
from deepsuite.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["gpt", "deepseek_v3"]
STEPS, GLOBAL_BATCH, SEQ_LEN = 4, 4, 16  # tiny_overrides' batch and sequence length
COMMON = dict(training__steps=STEPS, training__eval_every=100, training__sample_tokens=0)
DEEPSEEK = dict(
    **TINY_DEEPSEEK,
    model__n_routed_experts=4,
    model__n_expert_groups=2,
    model__n_limited_groups=1,
    parallel__zero_stage=2,
)
ZERO_STAGE = {"gpt": 0, "deepseek_v3": 2}


def tool(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Run `tools/<script>` (when args[0] ends in .py) or `python -m deepsuite …` in a subprocess."""
    cmd = (
        [str(ROOT / "tools" / args[0]), *args[1:]] if args[0].endswith(".py") else ["-m", "deepsuite", *args]
    )
    proc = subprocess.run(
        [sys.executable, *cmd], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert proc.returncode == expect, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without DeepSpeed's own log lines (`[2026-… [WARNING] …`)."""
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[20")]


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 4-step runs checkpointed at steps 2 and 4: GPT under ZeRO-0, DeepSeek-V3 (MoE + MTP) under ZeRO-2."""
    root = tmp_path_factory.mktemp("tools")
    out = {}
    for family, extra in (("gpt", {}), ("deepseek_v3", DEEPSEEK)):
        run_dir = root / family
        train(load_config(None, tiny_overrides(tiny_data, run_dir, **COMMON, **extra)))
        out[family] = run_dir
    return out


@pytest.fixture(scope="module")
def loaded(runs: dict[str, Path]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """(model, state) of each run's latest checkpoint."""
    return {family: load_model_from_checkpoint(run)[:2] for family, run in runs.items()}


@pytest.fixture(scope="module")
def folders(
    loaded: dict[str, tuple[Any, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Path]]:
    """A deepsuite folder and an HF folder of each trained model (written in-process)."""
    root = tmp_path_factory.mktemp("folders")
    return {
        family: {
            "deepsuite": save_model(model, root / family / "ds"),
            "hf": save_hf(model, root / family / "hf"),
        }
        for family, (model, _) in loaded.items()
    }


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize(
    ("script", "command"),
    [
        ("convert_hf.py", "convert"),
        ("consolidate_zero.py", "consolidate"),
        ("inspect_checkpoint.py", "inspect"),
        ("plot_metrics.py", None),
    ],
)
def test_help_of_each_tool(script: str, command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    proc = tool(script, "--help")
    assert proc.stdout.startswith(f"usage: {script}" if command else "usage: plot_metrics.py"), proc.stdout
    if command is not None:
        assert f"deepsuite {command}" in " ".join(proc.stdout.split())  # says which subcommand it is
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: deepsuite {command}")


# ----------------------------------------------------------------------------------- consolidate


def test_consolidate_gpt_zero0_to_hf_with_the_tool(
    runs: dict[str, Path], loaded: dict[str, tuple[Any, dict[str, Any]]], tmp_path: Path
) -> None:
    model, _ = loaded["gpt"]
    out = tmp_path / "hf"
    proc = tool("consolidate_zero.py", str(runs["gpt"]), str(out))  # latest, --format hf by default
    assert "step 4" in proc.stdout and "ZeRO-0" in proc.stdout
    names = sorted(p.name for p in out.iterdir())  # the run's tokenizer travels with the weights
    assert names == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    adapter = get_model_spec("gpt").adapter()
    assert_same_tensors(read_safetensors(out), adapter.state_dict_to_hf(model.state_dict(), model.args))


def test_consolidate_deepseek_zero2_to_deepsuite_with_the_subcommand(
    runs: dict[str, Path], loaded: dict[str, tuple[Any, dict[str, Any]]], tmp_path: Path
) -> None:
    from deepsuite.parallel.deepspeed import safe_torch_load

    model, _ = loaded["deepseek_v3"]
    run = runs["deepseek_v3"]
    out = tmp_path / "ds"
    proc = tool("consolidate", str(run), str(out), "--format", "deepsuite", "--step", "4")
    assert "step 4" in proc.stdout and "ZeRO-2" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "model.yaml",
        "tokenizer.model",
    ]
    weights = read_safetensors(out)
    assert_same_tensors(weights, model.state_dict())
    # independent of DeepSpeed's zero_to_fp32: under ZeRO-2 in fp32 the engine's module copy is the
    # live model, saved next to the optimizer's fp32 partitions the consolidation reads
    live = safe_torch_load(run / "step_4" / "deepspeed" / "mp_rank_00_model_states.pt")["module"]
    assert_same_tensors(weights, dict(live))


def test_consolidate_other_steps_and_refusals(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs["deepseek_v3"]
    assert (
        main(["consolidate", str(run), str(tmp_path / "s2"), "--format", "deepsuite", "--tag", "step_2"]) == 0
    )
    assert main(["consolidate", str(run / "step_4"), str(tmp_path / "s4"), "--format", "deepsuite"]) == 0
    s2, s4 = read_safetensors(tmp_path / "s2"), read_safetensors(tmp_path / "s4")
    assert not torch.equal(s2["embed.weight"], s4["embed.weight"])  # the run trained between them
    capsys.readouterr()
    assert main(["consolidate", str(run), str(tmp_path / "x"), "--step", "9"]) == 2
    assert main(["consolidate", str(run), str(tmp_path / "s4"), "--format", "deepsuite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
    assert "step_9" in err[0] and "step_2, step_4" in err[0]
    assert "s4 exists and is not empty; pass --overwrite" in err[1]
    assert not (tmp_path / "x").exists()
    assert main(["consolidate", str(run), str(tmp_path / "s4"), "--step", "2", "--overwrite"]) == 0
    assert (tmp_path / "s4" / "config.json").is_file()  # replaced by the HF folder of step 2


# --------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_hf_both_directions_and_transformers_parity(
    family: str,
    loaded: dict[str, tuple[Any, dict[str, Any]]],
    folders: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    model, _ = loaded[family]
    to_hf, to_ds = (
        (("convert_hf.py",), ("convert",)) if family == "gpt" else (("convert",), ("convert_hf.py",))
    )
    tool(*to_hf, "deepsuite-to-hf", str(folders[family]["deepsuite"]), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == {"gpt": "GPT2LMHeadModel", "deepseek_v3": "DeepseekV3ForCausalLM"}[family]
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 0.05  # not a comparison of near-zero logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    tool(*to_ds, "hf-to-deepsuite", str(tmp_path / "hf"), str(tmp_path / "ds"))
    assert (tmp_path / "ds" / "model.yaml").is_file()
    assert_same_tensors(read_safetensors(tmp_path / "ds"), read_safetensors(folders[family]["deepsuite"]))


# --------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_reports_step_tokens_and_parameters_on_every_kind(
    family: str,
    runs: dict[str, Path],
    loaded: dict[str, tuple[Any, dict[str, Any]]],
    folders: dict[str, dict[str, Path]],
) -> None:
    model, _ = loaded[family]
    total = n_params(model)
    run = runs[family]
    cases = {
        "run": (run, "training", STEPS),
        "step_2": (run / "step_2", "training", 2),
        "deepsuite": (folders[family]["deepsuite"], "deepsuite", None),
        "hf": (folders[family]["hf"], "hf", None),
    }
    for name, (path, kind, step) in cases.items():
        report = inspect_checkpoint(path)
        assert report["kind"] == kind, name
        assert report["model"]["family"] == family, name
        assert report["model"]["config"]["d_model"] == 32, name
        assert report["parameters"] == {"total": total, "by_dtype": {"float32": total}}, name
        assert report["dtypes"] == ["float32"], name
        assert report["integrity"]["ok"] is True, name
        assert report["step"] == step, name
        if kind == "training":
            assert report["tokens_seen"] == step * GLOBAL_BATCH * SEQ_LEN, name
            layout = report["layout"]
            assert layout["zero_stage"] == ZERO_STAGE[family] and layout["world_size"] == 1
            assert layout["ep_size"] == 1
            assert "rng/rank_00000.json" in layout["per_rank"]["0"]
            if ZERO_STAGE[family] == 2:
                assert "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt" in layout["per_rank"]["0"]
            assert "deepspeed/mp_rank_00_model_states.pt" in layout["shared"]
            ckpt = Path(report["path"])
            assert layout["total_bytes"] == sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        else:
            assert report["tokens_seen"] is None
    latest = inspect_checkpoint(run)
    assert latest["path"] == str(run / "step_4")  # through `latest`
    assert latest["model"]["flavor"] == {"gpt": "gpt2-debug", "deepseek_v3": "deepseek-v3-debug"}[family]

    # the same through the tool (--json) and the subcommand (table)
    script = ("inspect_checkpoint.py",) if family == "gpt" else ("inspect",)
    report = json.loads(tool(*script, str(run), "--json").stdout)
    assert report["step"] == STEPS and report["tokens_seen"] == STEPS * GLOBAL_BATCH * SEQ_LEN
    assert report["parameters"]["total"] == total
    other = ("inspect",) if family == "gpt" else ("inspect_checkpoint.py",)
    table = tool(*other, str(folders[family]["hf"])).stdout
    assert f"parameters  {total:,} " in table and "kind        HF folder" in table


def test_inspect_exits_2_with_one_line_on_a_corrupt_checkpoint(
    runs: dict[str, Path],
    folders: dict[str, dict[str, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad_run = tmp_path / "run"
    shutil.copytree(runs["gpt"], bad_run)
    states = bad_run / "step_4" / "deepspeed" / "mp_rank_00_model_states.pt"
    with open(states, "r+b") as f:
        f.truncate(states.stat().st_size // 2)
    lines = error_lines(tool("inspect_checkpoint.py", str(bad_run), expect=2))
    assert len(lines) == 1 and lines[0].startswith("error: ") and "mp_rank_00_model_states.pt" in lines[0]
    assert "Traceback" not in lines[0]

    bad_hf = tmp_path / "hf"
    shutil.copytree(folders["deepseek_v3"]["hf"], bad_hf)
    weights = bad_hf / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    lines = error_lines(tool("inspect", str(bad_hf), expect=2))
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors is corrupt" in lines[0]

    # same for a lying header (every byte present, one tensor's range wrong) and a missing folder
    bad_ds = tmp_path / "ds"
    shutil.copytree(folders["gpt"]["deepsuite"], bad_ds)
    raw = (bad_ds / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0] + 1, *header[key]["shape"][1:]]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    text = text.ljust(n)  # safetensors pads its header with spaces
    (bad_ds / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + n :])
    capsys.readouterr()
    assert main(["inspect", str(bad_ds), "--no-verify"]) == 2  # past the checksums (test_checksums)
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "wrong byte range" in err[0] and "does not exist" in err[1]


# ---------------------------------------------------------------------------------- plot_metrics


def test_plot_metrics_of_two_runs_writes_a_png(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "metrics.png"
    tool("plot_metrics.py", *(str(runs[f] / "metrics.jsonl") for f in FAMILIES), "--out", str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])  # IHDR's checksum
    assert width >= 1000 and height >= 300  # three or four panels side by side
    assert len(data) > 20_000  # lines, labels and legends, not an empty canvas


# ------------------------------------------------------------------------------- convert: bad input


def _tiny_folders(root: Path) -> dict[str, Path]:
    """A GPT deepsuite folder, a GPT HF folder (sharded) and a DeepSeek-V3 HF folder of tiny random models."""
    from deepsuite.models.deepseek_v3.config import DeepSeekV3Config
    from deepsuite.models.deepseek_v3.model import DeepSeekV3
    from deepsuite.models.gpt.config import GPTConfig
    from deepsuite.models.gpt.model import GPT

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2))
    gpt.init_weights()
    ds_args = DeepSeekV3Config(
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
        mtp_depth=1,
        max_seq_len=64,
    )
    dsv3 = DeepSeekV3(ds_args)
    dsv3.init_weights()
    return {
        "ds": save_model(gpt, root / "ds"),
        "hf": save_hf(gpt, root / "hf"),
        "sharded": save_hf(gpt, root / "sharded", max_shard_bytes=20_000),
        "dsv3": save_hf(dsv3, root / "dsv3"),
    }


def _edit_safetensors(file: Path, edit: Any) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata() or {}
    edit(tensors, metadata)
    save_file(tensors, str(file), metadata=metadata)


def test_convert_exits_2_with_one_line_on_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each kind of broken SRC: one `error: …` line naming the file, exit 2, no traceback, no DST."""
    good = _tiny_folders(tmp_path / "good")

    def broken(kind: str, name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(good[kind], out)
        return out

    trunc = broken("hf", "trunc")
    with open(trunc / "model.safetensors", "r+b") as f:
        f.truncate((trunc / "model.safetensors").stat().st_size - 100)
    idx = broken("sharded", "idx")
    (idx / "model.safetensors.index.json").write_text("{\n")
    cfg = broken("hf", "cfg")
    (cfg / "config.json").write_text("{oops")
    yml = broken("ds", "yml")
    (yml / "model.yaml").write_text("name: gpt\nargs: {d_model: 32\n")
    alias = broken("ds", "alias")
    _edit_safetensors(
        alias / "model.safetensors",
        lambda _t, meta: meta.update({"deepsuite.aliases": json.dumps({"lm_head.weight": "nonexistent"})}),
    )
    nokey = broken("dsv3", "nokey")
    config = json.loads((nokey / "config.json").read_text())
    del config["kv_lora_rank"]
    (nokey / "config.json").write_text(json.dumps(config))
    noup = broken("dsv3", "noup")
    _edit_safetensors(
        noup / "model.safetensors", lambda t, _m: t.pop("model.layers.1.mlp.experts.0.up_proj.weight")
    )
    unknown = broken("dsv3", "unknown")
    _edit_safetensors(
        unknown / "model.safetensors",
        lambda t, _m: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}),
    )
    cases = [
        ("hf-to-deepsuite", trunc, "trunc/model.safetensors is not a readable safetensors file"),
        ("hf-to-deepsuite", idx, "idx/model.safetensors.index.json is not valid JSON"),
        ("hf-to-deepsuite", cfg, "cfg/config.json is not valid JSON"),
        ("deepsuite-to-hf", yml, "yml/model.yaml is not valid YAML"),
        (
            "deepsuite-to-hf",
            alias,
            "alias/model.safetensors: its deepsuite.aliases metadata makes 'lm_head.weight'",
        ),
        ("hf-to-deepsuite", nokey, "nokey/config.json lacks the key 'kv_lora_rank'"),
        ("hf-to-deepsuite", noup, "'up_proj' is missing"),
        ("hf-to-deepsuite", unknown, "unknown DeepSeek-V3 weight 'self_attn.rotary_emb.inv_freq'"),
    ]
    capsys.readouterr()
    for conversion, src, message in cases:
        # --no-verify: the readers' own checks (the checksums would name each file first: test_checksums)
        assert main(["convert", conversion, str(src), str(tmp_path / "out"), "--no-verify"]) == 2, src.name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (src.name, err)
        assert not (tmp_path / "out").exists()
    # the stand-alone tool: one line, no traceback
    lines = error_lines(tool("convert_hf.py", "hf-to-deepsuite", str(trunc), str(tmp_path / "out"), expect=2))
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0], lines


def test_convert_checks_dst_before_loading_src(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _tiny_folders(tmp_path / "good")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    capsys.readouterr()
    # SRC does not even exist: the DST error must come first (no load was attempted)
    assert main(["convert", "hf-to-deepsuite", str(tmp_path / "nowhere"), str(dst)]) == 2
    assert main(["convert", "deepsuite-to-hf", str(tmp_path / "nowhere"), str(a_file)]) == 2
    assert main(["convert", "zero-to-hf", str(tmp_path / "nowhere"), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "dst exists and is not empty; pass --overwrite" in err[0] and "zero" not in err[0]
    assert "a_file exists and is not a folder" in err[1]
    assert "dst exists and is not empty" in err[2]
    assert (dst / "keep.txt").read_text() == "x"
    # an empty DST folder is fine, and --overwrite replaces a full one
    (tmp_path / "empty").mkdir()
    assert main(["convert", "deepsuite-to-hf", str(good["ds"]), str(tmp_path / "empty")]) == 0
    assert main(["convert", "deepsuite-to-hf", str(good["ds"]), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]


def test_inspect_refuses_a_dangling_alias_like_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alias = _tiny_folders(tmp_path / "good")["ds"]
    _edit_safetensors(
        alias / "model.safetensors",
        lambda _t, meta: meta.update({"deepsuite.aliases": json.dumps({"lm_head.weight": "nonexistent"})}),
    )
    capsys.readouterr()
    assert main(["inspect", str(alias), "--no-verify"]) == 2  # past the checksums (test_checksums)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nonexistent" in err[0], err


@pytest.mark.parametrize("kind", ["gpt", "deepseek"])
def test_convert_dtype_bfloat16_halves_the_folder_and_transformers_reads_it(
    tmp_path: Path, kind: str
) -> None:
    """`--dtype bfloat16`: every weight stored in bf16 (the DeepSeek router bias stays float32) and
    `dtype` in config.json says so; the logits of the bf16 folder stay within bf16 rounding of the
    float32 one."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folders = _tiny_folders(tmp_path / "src")
    src = folders["ds"] if kind == "gpt" else folders["dsv3"]
    # deepsuite folder -> HF in bf16 (GPT); HF -> deepsuite -> HF in bf16 (DeepSeek)
    if kind == "deepseek":
        assert (
            main(["convert", "hf-to-deepsuite", str(src), str(tmp_path / "mid"), "--dtype", "bfloat16"]) == 0
        )
        src = tmp_path / "mid"
    for dtype in ("float32", "bfloat16"):
        assert main(["convert", "deepsuite-to-hf", str(src), str(tmp_path / dtype), "--dtype", dtype]) == 0
    files = sorted((tmp_path / "bfloat16").glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    # the router bias stays float32 (it selects experts; DeepSeek's release stores it so too)
    assert {d for k, d in dtypes.items() if "e_score_correction_bias" not in k} == {"BF16"}
    assert {d for k, d in dtypes.items() if "e_score_correction_bias" in k} <= {"F32"}
    assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "float32").eval()(ids).logits
        low = (
            AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16", dtype=torch.float32)
            .eval()(ids)
            .logits
        )
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
