"""Config loading as the CLI sees it: clear errors for bad input, shipped configs, DeepSpeed translation."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from deepsuite.config import ConfigError, load_config
from deepsuite.config.errors import ConfigWarning
from deepsuite.config.loader import check_schedule
from deepsuite.parallel.deepspeed import build_ds_config, resolve_batch
from deepsuite.parallel.dist import ParallelDims

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepsuite", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # a shipped config needs no warning either
        cfg = load_config(path)
        check_schedule(cfg)
    assert cfg.training.steps > 0
    build_ds_config(cfg, ParallelDims(world_size=1, rank=0, local_rank=0))


def test_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"default.yaml", "gpt2-small.yaml"}


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'training.stpes'.*did you mean 'steps'"):
        load_config(None, ["training.stpes=10"])


def test_a_config_file_given_as_an_override_points_to_config() -> None:
    with pytest.raises(ConfigError, match=r"must look like section.key=value.*--config configs/default.yaml"):
        load_config(None, ["configs/default.yaml"])
    with pytest.raises(ConfigError, match=r"must look like section.key=value \(e.g. training.steps=100\)$"):
        load_config(None, ["steps"])


def test_unknown_section_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trainig:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown section 'trainig'.*did you mean 'training'"):
        load_config(f)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"training.steps='many' must be an integer"):
        load_config(None, ["training.steps=many"])


def test_inconsistent_model_sizes() -> None:
    with pytest.raises(ConfigError, match=r"model.n_heads=5 does not divide model.d_model=64"):
        load_config(None, ["model.n_heads=5"])


def test_steps_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"training.steps=0 must be > 0"):
        load_config(None, ["training.steps=0"])


def test_batch_not_divisible() -> None:
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible"):
        load_config(None, ["training.global_batch_size=10", "training.micro_batch_size=4"])


def test_batch_not_divisible_by_world() -> None:
    cfg = load_config(None, ["training.global_batch_size=6", "training.micro_batch_size=2"])
    assert resolve_batch(cfg.training, 1).gradient_accumulation_steps == 3
    with pytest.raises(ConfigError, match=r"not divisible by micro_batch_size × data-parallel ranks = 2 × 2"):
        resolve_batch(cfg.training, 2)
    cfg = load_config(
        None,
        [
            "training.global_batch_size=8",
            "training.micro_batch_size=2",
            "training.gradient_accumulation_steps=2",
        ],
    )
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps × data-parallel ranks = 2 × 2 × 3"):
        resolve_batch(cfg.training, 3)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_python_tag_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f'training: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"YAML tag refused"):
        load_config(f)
    assert not marker.exists()


def test_cli_error_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f'training: !!python/object/apply:os.system ["touch {marker}"]\n')
    for args in (
        ["train", "--config", str(f)],
        ["train", "training.stpes=1"],
        ["prepare-data", "--config", "nope.yaml"],
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "args", [[], ["train"], ["prepare-data"], ["generate"], ["convert"], ["convert", "zero-to-hf"], ["plan"]]
)
def test_cli_help_everywhere(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from deepsuite.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deepsuite")


def test_dry_run_prints_config_and_layout() -> None:
    proc = run_cli("train", "--config", "configs/default.yaml", "--dry-run", "parallel.zero_stage=2")
    assert proc.returncode == 0, proc.stderr
    assert "# resolved config" in proc.stdout and "zero_stage: 2" in proc.stdout
    assert "world: 1 rank(s)" in proc.stdout and "train_batch_size" in proc.stdout


def test_deepspeed_config_translation() -> None:
    cfg = load_config(
        None,
        [
            "training.global_batch_size=32",
            "training.micro_batch_size=4",
            "training.dtype=bf16",
            "training.grad_clip=0.5",
            "parallel.zero_stage=3",
            "parallel.offload_optimizer=true",
            "parallel.offload_params=true",
            "parallel.reduce_bucket_size=1000",
            "parallel.overlap_comm=true",
            "parallel.deepspeed={zero_optimization: {stage3_max_live_parameters: 7}, flops_profiler: {enabled: false}}",
        ],
    )
    ds = build_ds_config(cfg, ParallelDims(world_size=2, rank=0, local_rank=0))
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 1000 and z["overlap_comm"] is True
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 7  # raw keys merged, not replacing the section
    assert ds["flops_profiler"] == {"enabled": False}
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] > 10**9


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("train_batch_size", "training.global_batch_size"),
        ("train_micro_batch_size_per_gpu", "training.micro_batch_size"),
        ("gradient_accumulation_steps", "training.gradient_accumulation_steps"),
    ],
)
def test_raw_deepspeed_batch_keys_are_refused(key: str, ours: str) -> None:
    """A raw batch key would make DeepSpeed's batch differ from the loop's and the sampler's."""
    with pytest.raises(ConfigError, match=rf"parallel.deepspeed.{key}=3 is not allowed.*set {ours}"):
        load_config(None, [f"parallel.deepspeed={{{key}: 3}}"])
    # a config built without load_config (no validation) is refused where the dict is built
    cfg = load_config(None, [])
    cfg.parallel.deepspeed = {key: 3}
    with pytest.raises(ConfigError, match=rf"parallel.deepspeed.{key}=3"):
        build_ds_config(cfg, ParallelDims(world_size=1, rank=0, local_rank=0))


@pytest.mark.parametrize(
    ("raw", "shown", "ours"),
    [
        ("{zero_optimization: {stage: 3}}", "zero_optimization.stage=3", "parallel.zero_stage"),
        ("{bf16: {enabled: true}}", "bf16.enabled=True", "training.dtype"),
        ("{fp16: {enabled: true}}", "fp16.enabled=True", "training.dtype"),
        ("{gradient_clipping: 5.0}", "gradient_clipping=5.0", "training.grad_clip"),
    ],
)
def test_raw_deepspeed_keys_that_deepsuite_derives_are_refused(raw: str, shown: str, ours: str) -> None:
    """The ZeRO stage, precision and clipping are read by the layout checks, checkpoints and the
    planner: a raw value would contradict them silently (e.g. EP under a raw stage 3)."""
    with pytest.raises(
        ConfigError, match=rf"parallel.deepspeed.{re.escape(shown)} is not allowed.*set {ours}"
    ):
        load_config(None, [f"parallel.deepspeed={raw}"])
    # keys deepsuite does not model still pass through
    cfg = load_config(None, ["parallel.deepspeed={zero_optimization: {reduce_bucket_size: 1000}, bf16: {}}"])
    ds = build_ds_config(cfg, ParallelDims(world_size=1, rank=0, local_rank=0))
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=nan", r"optim.lr=nan must be > 0 and finite, e.g. optim.lr="),
        ("optim.lr=.inf", r"optim.lr=inf must be > 0 and finite"),
        ("optim.lr=0", r"optim.lr=0.0 must be > 0"),
        ("optim.eps=-1", r"optim.eps=-1.0 must be > 0 and finite, e.g. optim.eps=1e-08"),
        ("optim.eps=0", r"optim.eps=0.0 must be > 0"),
        ("optim.weight_decay=.nan", r"optim.weight_decay=nan must be >= 0 and finite"),
        ("optim.betas=[0.9, .nan]", r"optim.betas=\[0.9, nan\] must be two numbers in \[0, 1\)"),
        ("training.grad_clip=.nan", r"training.grad_clip=nan must be >= 0 and finite; 0 turns clipping off"),
        ("training.grad_clip=.inf", r"training.grad_clip=inf must be >= 0 and finite"),
        ("training.grad_clip=-1", r"training.grad_clip=-1.0 must be >= 0"),
        ("training.mtp_lambda=.nan", r"training.mtp_lambda=nan must be >= 0 and finite"),
        ("training.mtp_lambda_after=-0.1", r"training.mtp_lambda_after=-0.1 must be >= 0"),
        ("training.mtp_lambda_switch=.nan", r"training.mtp_lambda_switch=nan must be in \[0, 1\]"),
        (
            "training.router_bias_update_rate=.nan",
            r"training.router_bias_update_rate=nan must be >= 0 and finite",
        ),
        ("schedule.min_lr_ratio=.nan", r"schedule.min_lr_ratio=nan must be in \[0, 1\]"),
        ("loss.label_smoothing=.nan", r"loss.label_smoothing=nan must be in \[0, 1\)"),
        ("data.val_fraction=.nan", r"data.val_fraction=nan must be in \(0, 1\)"),
        ("model.dropout=.nan", r"model.dropout=nan must be a finite number, e.g. model.dropout=0.0"),
        ("model.init_std=.inf", r"model.init_std=inf must be a finite number"),
    ],
)
def test_non_finite_and_out_of_range_floats_are_refused(override: str, message: str) -> None:
    """NaN/inf and negative values are caught at load time, naming the key and a valid value (a NaN
    learning rate used to crash inside torch's AdamW, a NaN grad_clip silently turned clipping off)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_float_field_refuses_nan() -> None:
    """Every float field of every section (not only the ones with a range check) refuses NaN."""
    import dataclasses
    import typing

    from deepsuite.config.schema import SECTIONS

    checked = 0
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is float:
                with pytest.raises(ConfigError, match=rf"{section}.{f.name}=nan must be"):
                    load_config(None, [f"{section}.{f.name}=.nan"])
                checked += 1
    assert checked >= 10


def test_resumed_wandb_run_continues_the_same_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The wandb run id is stored in logging.run_dir; a resumed run passes it with resume="allow"."""
    import types

    from deepsuite.training.metrics import MetricsLogger

    inits: list[dict[str, object]] = []
    run = types.SimpleNamespace(log=lambda data, step: None, finish=lambda: None)
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(
        None, [f"logging.run_dir={tmp_path}", "logging.wandb=true", "logging.wandb_mode=disabled"]
    )

    id_file = tmp_path / "wandb_run_id"
    MetricsLogger(cfg, enabled=True).close()  # fresh run
    first = inits[0].get("id")
    assert isinstance(first, str) and first and inits[0].get("resume") == "allow"
    assert id_file.read_text().strip() == first
    MetricsLogger(cfg, enabled=True, resume_step=2).close()  # resumed: same wandb run
    assert inits[1].get("id") == first and inits[1].get("resume") == "allow"
    MetricsLogger(cfg, enabled=True).close()  # a fresh run in the same folder: a new wandb run
    assert inits[2].get("id") != first
    assert id_file.read_text().strip() == inits[2]["id"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "training:\n  steps: 3\n bad: x\n",
            r"line 3, column 2: expected <block end>, but found '<block mapping start>'",
        ),
        ("training: {steps: 3\n", r"line 2, column 1: expected ',' or '\}', but got '<stream end>'"),
        ("training:\n  steps: a: b\n", r"line 2, column 11: mapping values are not allowed here"),
    ],
)
def test_bad_yaml_names_the_problem_and_its_line(tmp_path: Path, text: str, where: str) -> None:
    """A YAML syntax error says what is wrong and where (1-based line and column), on one line."""
    f = tmp_path / "bad2.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad2.yaml: not valid YAML at {where}") as info:
        load_config(f)
    assert "\n" not in str(info.value)


def test_bad_yaml_override_value_is_one_line_with_its_column() -> None:
    with pytest.raises(
        ConfigError, match=r"override training.steps='\[1' is not a valid YAML value \(column 3: "
    ) as info:
        load_config(None, ["training.steps=[1"])
    assert "\n" not in str(info.value)


def test_expert_parallel_on_a_dense_model_asks_for_moe() -> None:
    """ep_size > 1 on a model without routed experts names MoE and the fix, not a divisibility rule."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["parallel.ep_size=2"])  # the default model is a GPT
    message = str(info.value)
    assert "needs a Mixture-of-Experts model" in message and "model.name=deepseek_v3" in message
    assert "set parallel.ep_size=1" in message and "does not divide" not in message
    # a MoE model whose expert count ep_size does not divide still gets the divisibility message
    with pytest.raises(ConfigError, match=r"parallel.ep_size=3 does not divide model.n_routed_experts=8"):
        load_config(None, ["model.name=deepseek_v3", "model.flavor=deepseek-v3-debug", "parallel.ep_size=3"])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["training.steps=20", "schedule.warmup_steps=40"], r"never reaches its peak"),
        (["training.steps=2", "schedule.warmup_steps=2"], r"never decays to schedule.min_lr_ratio"),
        (
            ["training.steps=1", "schedule.warmup_steps=2", "schedule.decay=constant"],
            r"never reaches its peak",
        ),
    ],
)
def test_warmup_not_shorter_than_training_warns(overrides: list[str], fragment: str) -> None:
    """training.steps <= schedule.warmup_steps is a loud warning naming both keys and the fix (not an
    error: the tiny integration runs train 1-2 steps with schedule.warmup_steps=2 on purpose)."""
    with pytest.warns(ConfigWarning, match=fragment) as record:
        check_schedule(load_config(None, overrides))
    assert len(record) == 1
    message = str(record[0].message)
    assert "training.steps=" in message and "schedule.warmup_steps=" in message
    assert "lower schedule.warmup_steps below training.steps" in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["training.steps=41", "schedule.warmup_steps=40"],
        ["training.steps=40", "schedule.warmup_steps=40", "schedule.decay=constant"],
        ["training.steps=1", "schedule.warmup_steps=0"],
    ],
)
def test_a_schedule_that_completes_does_not_warn(overrides: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        check_schedule(load_config(None, overrides))


def test_eval_every_docstring_says_when_validation_runs() -> None:
    """Validation runs before the first step of a fresh run, every eval_every steps and after the
    last step (trainer._train); the docstring used to claim 0 meant "only at the end"."""
    from deepsuite.config.docs import field_docs
    from deepsuite.config.schema import TrainingConfig

    doc = field_docs(TrainingConfig)["eval_every"]
    assert "only at the end" not in doc
    assert "step 0" in doc and "training.steps" in doc


def test_train_warns_about_the_schedule_on_rank_0_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from deepsuite.cli import main

    argv = [
        "train",
        "--config",
        str(ROOT / "configs" / "debug.yaml"),
        "--dry-run",
        "training.steps=2",
        "schedule.warmup_steps=4",
        f"data.out_dir={tmp_path / 'data'}",
        f"checkpoint.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(ConfigWarning, match="never reaches its peak"):
        assert main(argv) == 0
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        main(argv)  # rank 1 stays quiet (its dry run may say only "config and layout OK")


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process: exit 2 and one `error: …` line on stderr, no traceback; the line."""
    from deepsuite.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=1e39"], r"optim.lr=1e\+39 is beyond float32's range .*e.g. optim.lr=0.003"),
        (["optim.eps=-1e39"], r"optim.eps=-1e\+39 must be > 0"),
        (["training.grad_clip=1e39"], r"training.grad_clip=1e\+39 is beyond float32's range"),
        (["loss.label_smoothing=1e39"], r"loss.label_smoothing=1e\+39 must be in \[0, 1\)"),
        (["model.init_std=1e39"], r"model.init_std=1e\+39 is beyond float32's range .*model.init_std=0.02"),
        (
            ["model.name=deepseek_v3", "model.flavor=deepseek-v3-debug", "model.rope_theta=1e39"],
            r"model.rope_theta=1e\+39 is beyond float32's range",
        ),
    ],
)
def test_floats_beyond_float32_are_refused(overrides: list[str], message: str) -> None:
    """torch computes learning rates, clip norms and init stds in float32: 1e39 used to end in an
    overflow traceback inside AdamW (or an inf) instead of an error naming the key."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.init_std=-0.02"], r"model.init_std=-0.02 must be >= 0"),
        (["model.layer_norm_eps=-1e-5"], r"model.layer_norm_eps=-1e-05 must be >= 0"),
        (["model.name=deepseek_v3", "model.flavor=deepseek-v3-debug", "model.init_std=-0.02"], r"init_std"),
        (
            ["model.name=deepseek_v3", "model.flavor=deepseek-v3-debug", "model.rms_norm_eps=-1"],
            r"rms_norm_eps",
        ),
        (
            ["model.name=deepseek_v3", "model.flavor=deepseek-v3-debug", "model.rope_theta=0"],
            r"rope_theta=0.0",
        ),
        (["model.name=deepseek_v3", "model.flavor=deepseek-v3-debug", "model.route_scale=0"], r"route_scale"),
        (
            ["model.name=deepseek_v3", "model.rope_scaling=yarn", "model.beta_fast=0"],
            r"beta_fast=0.0 must be > 0",
        ),
        (["model.name=deepseek_v3", "model.rope_scaling=yarn", "model.mscale_all_dim=-1"], r"mscale_all_dim"),
    ],
)
def test_model_args_out_of_range_are_refused(overrides: list[str], message: str) -> None:
    """Model fields torch or the RoPE tables cannot take (a negative std, a RoPE base <= 1, a YaRN
    beta of 0) are refused when the config loads, not as a traceback when the model is built."""
    if overrides[0] == "model.name=deepseek_v3" and "model.flavor=deepseek-v3-debug" not in overrides:
        overrides = [*overrides, "model.flavor=deepseek-v3-671b"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.reduce_bucket_size=0", r"parallel.reduce_bucket_size=0 must be > 0"),
        ("parallel.allgather_bucket_size=0", r"parallel.allgather_bucket_size=0 must be > 0"),
        ("parallel.allgather_bucket_size=3", r"parallel.allgather_bucket_size=3 must be even"),
        (
            "parallel.deepspeed={zero_optimization: {allgather_bucket_size: 0}}",
            r"zero_optimization.allgather_bucket_size=0 must be a whole number >= 2 and even",
        ),
        (
            "parallel.deepspeed={zero_optimization: {reduce_bucket_size: 5e8}}",
            r"reduce_bucket_size='5e8' must be a whole number >= 1; YAML reads 5e8 as text",
        ),
        ("parallel.deepspeed={steps_per_print: 0}", r"parallel.deepspeed.steps_per_print=0 must be"),
        ("parallel.deepspeed={optimizer: {params: {lr: .nan}}}", r"optimizer.params.lr=nan must be a finite"),
    ],
)
def test_deepspeed_sizes_it_cannot_run_with_are_refused(override: str, message: str) -> None:
    """A 0 bucket divides by zero inside DeepSpeed's all-gather, an odd one trips its assert, a
    reduce bucket of 0 its pydantic model: each is refused here, passthrough keys included."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["parallel.zero_stage=2", override])


def test_valid_deepspeed_sizes_pass_through() -> None:
    cfg = load_config(
        None, ["parallel.deepspeed={zero_optimization: {reduce_bucket_size: 5.0e+8, sub_group_size: 0}}"]
    )
    assert cfg.parallel.deepspeed["zero_optimization"]["reduce_bucket_size"] == 5e8


@pytest.mark.parametrize(
    ("command", "override"),
    [
        (["train", "--dry-run"], "data.seed=-1"),
        (["prepare-data"], "data.seed=-1"),
        (["train", "--dry-run"], "data.seed=4294967296"),
        (["train", "--dry-run"], "training.seed=-5"),
    ],
)
def test_seeds_out_of_range_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str], override: str
) -> None:
    """numpy and SentencePiece take unsigned 32-bit seeds: a negative data seed used to be a
    traceback in prepare-data and train."""
    key, _, value = override.partition("=")
    line = _cli_error(capsys, [*command, f"data.out_dir={tmp_path / 'd'}", override])
    assert f"{key}={value} must be in [0, 4294967295]" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        (
            "training:\n  steps: 5\nmodel:\n  name: gpt\ntraining:\n  seq_len: 32\n",
            "training",
            "lines 1 and 5",
        ),
        ("training:\n  steps: 5\n  seq_len: 32\n  steps: 6\n", "training.steps", "lines 2 and 4"),
        (
            "parallel:\n  deepspeed:\n    zero_optimization: {a: 1, a: 2}\n",
            "parallel.deepspeed.zero_optimization.a",
            "lines 3 and 3",
        ),
    ],
)
def test_duplicate_yaml_keys_name_the_key_and_both_lines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, key: str, lines: str
) -> None:
    """PyYAML keeps the last of two equal keys: a section written twice lost the first silently."""
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    line = _cli_error(capsys, ["train", "--config", str(f), "--dry-run"])
    assert f"the key '{key}' is written twice ({lines})" in line


def test_duplicate_keys_in_an_override_and_merge_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has the key 'a' twice \(columns 2 and 8\)"):
        load_config(None, ["parallel.deepspeed={a: 1, a: 2}"])
    f = tmp_path / "merge.yaml"  # keys brought in by `<<:` may be overridden, as YAML intends
    f.write_text("training:\n  <<: {steps: 3, seq_len: 16}\n  steps: 5\n")
    cfg = load_config(f)
    assert (cfg.training.steps, cfg.training.seq_len) == (5, 16)


@pytest.mark.parametrize(
    ("override", "module"),
    [
        ("attention.backend=flash", "flash_attn"),
        ("loss.backend=cce", "cut_cross_entropy"),
        ("loss.backend=liger", "liger_kernel"),
        ("logging.wandb=true", "wandb"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_backend_asked_for_by_name_must_be_installed(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    override: str,
    module: str,
    dry_run: bool,
) -> None:
    """`--dry-run` used to pass attention.backend=flash without flash-attn and `train` then failed
    with a traceback once the model ran; both now refuse it before anything is built."""
    import importlib.util

    import deepsuite.training.trainer as trainer

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a)
    )

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trainer was reached")

    monkeypatch.setattr(trainer, "train", never)
    monkeypatch.setattr(trainer, "dry_run", never)
    argv = ["train", *(["--dry-run"] if dry_run else []), f"data.out_dir={tmp_path / 'd'}", override]
    line = _cli_error(capsys, argv)
    assert f"{override} needs the `{module}` package, which is not installed: pip install" in line
    assert list(tmp_path.iterdir()) == []
