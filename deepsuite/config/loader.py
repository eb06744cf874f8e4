"""Load, merge, check and dump configurations.

Precedence: CLI `key=value` overrides > YAML file > dataclass defaults. Every problem raises one
`ConfigError` naming the key, the value and the fix. YAML goes through the safe loader only, so a
file with a Python tag is refused instead of executed, and a key written twice in one mapping is
refused instead of the later one silently winning.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
import warnings
from pathlib import Path
from typing import Any, get_origin

import yaml

from deepsuite.config.coerce import FLOAT32_MAX, build_dataclass, suggest
from deepsuite.config.errors import ConfigError, ConfigWarning
from deepsuite.config.schema import SECTIONS, Config, ModelConfig


class DuplicateKeyError(Exception):
    """A key written twice in one YAML mapping: ``key`` (dotted path) at marks ``first`` and ``second``."""

    def __init__(self, key: str, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second

    def where(self, unit: str = "line") -> str:
        """``lines 3 and 7`` (``unit="column"``: ``columns 2 and 9``), 1-based."""
        a, b = (m.line if unit == "line" else m.column for m in (self.first, self.second))
        return f"{unit}s {a + 1} and {b + 1}"


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that raises `DuplicateKeyError` for a key repeated in one mapping (PyYAML
    keeps the last one, so a section written twice would silently lose the first one's values).
    Keys brought in by a merge (``<<: *anchor``) may still be overridden, as YAML intends."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicates(node, "", set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node: yaml.Node, path: str, visited: set[int]) -> None:
        if id(node) in visited:  # aliases may point back up the tree
            return
        visited.add(id(node))
        children: list[tuple[str, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, value_node in node.value:
                name = path
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    name = f"{path}.{key}" if path else str(key)
                    if key in seen:
                        raise DuplicateKeyError(name, seen[key], key_node.start_mark)
                    seen[key] = key_node.start_mark
                children.append((name, value_node))
        elif isinstance(node, yaml.SequenceNode):
            children = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
        for name, child in children:
            self._refuse_duplicates(child, name, visited)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split a CLI override `a.b=value` into (["a", "b"], value parsed as YAML scalar)."""
    if "=" not in text:
        hint = ""
        if text.endswith((".yaml", ".yml")):
            hint = f"; to train from a config file, pass it as --config {text}"
        raise ConfigError(
            f"override {text!r} must look like section.key=value (e.g. training.steps=100){hint}"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write section.key=value")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"override {key}={raw!r} has the key '{exc.key}' twice ({exc.where('column')}); keep one of them"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {key}={raw!r} is not a valid YAML value ({_yaml_problem(exc, 'column')})"
        ) from None
    return key.split("."), value


def _yaml_problem(exc: yaml.YAMLError, where: str = "line") -> str:
    """One line for a YAML syntax error: `line L, column C: problem (while ...)`, 1-based.

    `where="column"` leaves the line out (for a one-line override value)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    mark = exc.problem_mark
    problem = exc.problem or exc.context or "syntax error"
    if mark is None:
        text = problem
    elif where == "column":
        text = f"column {mark.column + 1}: {problem}"
    else:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if exc.problem and exc.context:
        start = exc.context_mark
        at = (
            f" that starts at line {start.line + 1}, column {start.column + 1}"
            if start and where == "line"
            else ""
        )
        text += f" ({exc.context}{at})"
    return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; missing files and tags raise `ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file with --config")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{p}: the key '{exc.key}' is written twice ({exc.where()}); keep one of them (YAML would "
            "silently use the last)"
        ) from None
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{p}: YAML tag refused ({exc.problem}); config files hold plain values only"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML at {_yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}; save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, training:, ...)")
    return data


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a nested dict of sections."""
    for section in data:
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section '{section}'{suggest(str(section), SECTIONS)} "
                f"(valid sections: {', '.join(SECTIONS)})"
            )
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = data.get(name) or {}
        if name == "model":
            if not isinstance(values, dict):
                raise ConfigError(f"model={values!r} must be a mapping")
            own = {k: v for k, v in values.items() if k in ("name", "flavor")}
            extra = dict(values.get("args") or {})
            extra.update({k: v for k, v in values.items() if k not in ("name", "flavor", "args")})
            model = build_dataclass(ModelConfig, own, "model")
            model.args = extra
            built[name] = model
        else:
            built[name] = build_dataclass(cls, values, name)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a run configuration: defaults < YAML file at `path` < `key=value` overrides."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "model" and len(keys) == 2 and keys[1] not in ("name", "flavor", "args"):
            keys = ["model", keys[1]]
        _merge(data, keys, value)
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict of `cfg` (model args flattened into the model section), ready for YAML."""
    out = dataclasses.asdict(cfg)
    model = out["model"]
    args = model.pop("args")
    model.update(args)
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML (the resolved run config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _example(key: str) -> str:
    """`; e.g. KEY=<schema default>` for a `section.field` key (empty when there is no default)."""
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        return ""
    default = getattr(cls(), name)
    if isinstance(default, (list, dict)) or default in (None, ""):
        return ""
    return f", e.g. {key}={default} (the default)"


def _positive(key: str, value: float, strict: bool = True, hint: str = "") -> None:
    """Raise a `ConfigError` unless `value` is a finite number > 0 (`strict`) or >= 0."""
    if not math.isfinite(value) or ((value <= 0) if strict else (value < 0)):
        kind = "> 0" if strict else ">= 0"
        finite = " and finite" if isinstance(value, float) else ""
        raise ConfigError(f"{key}={value} must be {kind}{finite}{hint or _example(key)}")


def _fraction(
    key: str, value: float, low: float, high: float, high_open: bool = False, hint: str = ""
) -> None:
    """Raise a `ConfigError` unless `low <= value <= high` (`< high` when `high_open`); NaN is refused."""
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:  # NaN fails every comparison
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value} must be in {interval}{hint or _example(key)}")


SEED_MAX = 2**32 - 1
"""numpy's `default_rng`/`PCG64` and SentencePiece take seeds in [0, 2**32 - 1]."""


def _seed(key: str, value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(
            f"{key}={value} must be in [0, {SEED_MAX}] (an unsigned 32-bit seed){_example(key)}"
        )


def _even(key: str, value: int) -> None:
    """DeepSpeed's ZeRO-1/2 asserts its all-gather bucket is a multiple of 2 (4-byte aligned fp16)."""
    if value % 2:
        raise ConfigError(
            f"{key}={value} must be even (DeepSpeed aligns its all-gather buffers to 2 elements), "
            f"e.g. {key}={value + 1}"
        )


def _check_finite(cfg: Config) -> None:
    """Refuse NaN, infinity and values beyond float32's range in every float field (and list of
    floats) of every section."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            tp, value = hints[f.name], getattr(obj, f.name)
            values = value if get_origin(tp) is list and isinstance(value, list) else [value]
            key = f"{section}.{f.name}"
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{key}={value} must be a finite number{_example(key)}")
                if isinstance(v, float) and abs(v) > FLOAT32_MAX:
                    raise ConfigError(
                        f"{key}={value} is beyond float32's range (|x| <= {FLOAT32_MAX:.2g}), which torch "
                        f"computes in{_example(key)}"
                    )


# Batch keys DeepSpeed must take from `training.*`: the training loop, the sampler and the LR
# schedule are driven by deepsuite's own layout, so a different value here would desynchronise them.
DEEPSPEED_BATCH_KEYS: dict[str, str] = {
    "train_batch_size": "training.global_batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps (0 derives it)",
}


DEEPSPEED_DERIVED_KEYS: dict[tuple[str, ...], str] = {
    ("zero_optimization", "stage"): "parallel.zero_stage",
    ("bf16", "enabled"): "training.dtype",
    ("fp16", "enabled"): "training.dtype",
    ("gradient_clipping",): "training.grad_clip",
}
"""Raw DeepSpeed keys deepsuite derives from its own settings, which the layout checks, the
checkpoint code and the planner read: a raw value would silently contradict them."""


DEEPSPEED_COUNTS: dict[tuple[str, ...], tuple[int, bool]] = {
    ("zero_optimization", "reduce_bucket_size"): (1, False),
    ("zero_optimization", "allgather_bucket_size"): (2, True),
    ("zero_optimization", "stage3_prefetch_bucket_size"): (0, False),
    ("zero_optimization", "stage3_param_persistence_threshold"): (0, False),
    ("zero_optimization", "stage3_model_persistence_threshold"): (0, False),
    ("zero_optimization", "stage3_max_live_parameters"): (0, False),
    ("zero_optimization", "stage3_max_reuse_distance"): (0, False),
    ("zero_optimization", "sub_group_size"): (0, False),
    ("steps_per_print",): (1, False),
}
"""Raw DeepSpeed counts that pass through: path -> (smallest allowed value, must be even). DeepSpeed
answers a bad one with a traceback (pydantic, an assert) or, for a 0 bucket or print interval, with
a division by zero steps later."""


def _deepspeed_numbers(node: Any, path: str) -> None:
    """Refuse NaN and infinity anywhere in the raw passthrough (DeepSpeed takes floats as given)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _deepspeed_numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _deepspeed_numbers(value, f"{path}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{path}={node} must be a finite number")


def check_deepspeed_passthrough(raw: dict[str, Any]) -> None:
    """Refuse raw `parallel.deepspeed` keys that deepsuite derives itself (the batch layout, the
    ZeRO stage, the precision and gradient clipping), non-finite numbers, and counts DeepSpeed
    cannot run with (`DEEPSPEED_COUNTS`); other keys, e.g. ZeRO offload, pass through."""
    for key, ours in DEEPSPEED_BATCH_KEYS.items():
        if key in raw:
            raise ConfigError(
                f"parallel.deepspeed.{key}={raw[key]!r} is not allowed: deepsuite derives it from training.* "
                f"and its training loop would no longer match DeepSpeed; remove it and set {ours} instead"
            )
    for path, ours in DEEPSPEED_DERIVED_KEYS.items():
        node: Any = raw
        for part in path:
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            dotted = ".".join(path)
            raise ConfigError(
                f"parallel.deepspeed.{dotted}={node!r} is not allowed: deepsuite derives it from {ours} (which "
                f"its layout checks, checkpoints and planner follow); remove it and set {ours} instead"
            )
    _deepspeed_numbers(raw, "parallel.deepspeed")
    for path, (low, even) in DEEPSPEED_COUNTS.items():
        value: Any = raw
        for part in path:
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            continue
        whole = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
        if not whole or value < low or (even and value % 2):
            key = "parallel.deepspeed." + ".".join(path)
            need = f"a whole number >= {low}" + (
                " and even (DeepSpeed aligns it to 2 elements)" if even else ""
            )
            text = "; YAML reads 5e8 as text, write 500000000 or 5.0e+8" if isinstance(value, str) else ""
            raise ConfigError(f"{key}={value!r} must be {need}{text}; DeepSpeed fails on it later")


_MISSING = object()


def check_optional_packages(cfg: Config) -> None:
    """Refuse a backend asked for by name whose package is not installed, before anything is built
    (`deepsuite train` calls it, with or without ``--dry-run``). `auto` never needs one. Not part of
    `validate`: `generate` may reload a run trained with flash-attn on a machine without it."""
    wanted: list[tuple[str, str, str, str]] = []  # (setting, module, install command, alternative)
    if cfg.attention.backend == "flash":
        wanted.append(
            ("attention.backend=flash", "flash_attn", "deepsuite[flash]", "attention.backend=auto or sdpa")
        )
    if cfg.loss.backend in ("cce", "liger"):
        module = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}[cfg.loss.backend]
        wanted.append(
            (
                f"loss.backend={cfg.loss.backend}",
                module,
                f"deepsuite[{cfg.loss.backend}]",
                "loss.backend=auto or chunked",
            )
        )
    if cfg.logging.wandb:
        wanted.append(("logging.wandb=true", "wandb", "wandb", "logging.wandb=false"))
    for setting, module, package, instead in wanted:
        if importlib.util.find_spec(module) is None:  # finds, imports nothing
            raise ConfigError(
                f"{setting} needs the `{module}` package, which is not installed: pip install '{package}' "
                f"(or set {instead})"
            )


def check_schedule(cfg: Config) -> None:
    """Warn (once per message, Python's default filter) when the schedule cannot finish; `deepsuite
    train` calls it on rank 0 (not part of `validate`: commands that only reload a run's config,
    e.g. `generate`, have nothing to fix).

    With `training.steps <= schedule.warmup_steps` the LR stops part-way up the warmup or at the
    peak and never decays to `min_lr_ratio`. Only a warning: short smoke runs (1-2 steps with a
    warmup of 2, as the integration tests use) are deliberate."""
    steps, warmup, decay = cfg.training.steps, cfg.schedule.warmup_steps, cfg.schedule.decay
    if steps < warmup:
        peak = steps / warmup
        what = f"the learning rate never reaches its peak (it stops at {peak:.0%} of optim.lr)"
        if decay != "constant":
            what += " and never decays to schedule.min_lr_ratio"
    elif steps == warmup and warmup and decay != "constant":
        what = "the learning rate reaches its peak on the last step and never decays to schedule.min_lr_ratio"
    else:
        return
    warnings.warn(
        f"training.steps={steps} <= schedule.warmup_steps={warmup}: {what}; lower schedule.warmup_steps "
        f"below training.steps (e.g. schedule.warmup_steps={max(steps // 10, 0)}) or raise training.steps",
        ConfigWarning,
        stacklevel=2,
    )


def validate(cfg: Config) -> None:
    """Cross-field checks; model sizes are checked by the family's args `validate()`."""
    args = cfg.model.resolved_args  # built here, once: every later reader gets this object
    t = cfg.training
    _positive("training.steps", t.steps)
    _positive("training.seq_len", t.seq_len)
    _positive("training.global_batch_size", t.global_batch_size)
    _positive("training.micro_batch_size", t.micro_batch_size)
    _positive("training.gradient_accumulation_steps", t.gradient_accumulation_steps, strict=False)
    _positive(
        "training.grad_clip",
        t.grad_clip,
        strict=False,
        hint="; 0 turns clipping off, e.g. training.grad_clip=1.0",
    )
    _positive("training.eval_every", t.eval_every, strict=False)
    _positive("training.eval_batches", t.eval_batches)
    _positive("training.sample_tokens", t.sample_tokens, strict=False)
    _positive("training.router_bias_update_rate", t.router_bias_update_rate, strict=False)
    _positive("training.mtp_lambda", t.mtp_lambda, strict=False)
    _positive("training.mtp_lambda_after", t.mtp_lambda_after, strict=False)
    _positive("training.max_steps_per_run", t.max_steps_per_run, strict=False)
    _seed("training.seed", t.seed)
    per_step = t.micro_batch_size * max(t.gradient_accumulation_steps, 1)
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size × "
            f"gradient_accumulation_steps = {per_step}; make the global batch a multiple of {per_step}"
        )
    _fraction("training.mtp_lambda_switch", t.mtp_lambda_switch, 0.0, 1.0, hint="; 1.0 = never switch")
    o = cfg.optim
    _positive("optim.lr", o.lr)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    _positive("optim.eps", o.eps)
    _positive(
        "optim.weight_decay",
        o.weight_decay,
        strict=False,
        hint="; 0 turns it off, e.g. optim.weight_decay=0.1",
    )
    s = cfg.schedule
    _positive("schedule.warmup_steps", s.warmup_steps, strict=False)
    _fraction("schedule.min_lr_ratio", s.min_lr_ratio, 0.0, 1.0)
    d = cfg.data
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1), e.g. 0.05")
    _positive("data.num_proc", d.num_proc)
    _seed("data.seed", d.seed)
    _positive("data.shard_tokens", d.shard_tokens)
    if not d.tokenizer and d.vocab_size < 260:
        raise ConfigError(
            f"data.vocab_size={d.vocab_size} must be >= 260 (256 byte-fallback pieces + specials)"
        )
    p = cfg.parallel
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    _positive("parallel.ep_size", p.ep_size)
    _positive("parallel.reduce_bucket_size", p.reduce_bucket_size)
    _positive("parallel.allgather_bucket_size", p.allgather_bucket_size)
    _even("parallel.allgather_bucket_size", p.allgather_bucket_size)
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallel.offload_params=true needs parallel.zero_stage=3")
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer=true needs parallel.zero_stage >= 1")
    check_deepspeed_passthrough(p.deepspeed)
    n_experts = getattr(args, "n_routed_experts", 0)
    if p.ep_size > 1 and not n_experts:
        has = "model.n_routed_experts=0" if hasattr(args, "n_routed_experts") else "no routed experts"
        raise ConfigError(
            f"parallel.ep_size={p.ep_size} needs a Mixture-of-Experts model, but model.name={cfg.model.name} "
            f"has {has}; expert parallelism only applies to model.name=deepseek_v3 with routed experts, "
            "so set parallel.ep_size=1"
        )
    if p.ep_size > 1 and n_experts % p.ep_size:
        raise ConfigError(
            f"parallel.ep_size={p.ep_size} does not divide model.n_routed_experts={n_experts}; "
            "pick an ep_size that divides the number of routed experts"
        )
    c = cfg.checkpoint
    _positive("checkpoint.every", c.every, strict=False)
    _positive("checkpoint.keep_last", c.keep_last)
    if not c.resume:
        raise ConfigError("checkpoint.resume is empty; use auto, never or a checkpoint path")
    lc = cfg.loss
    _positive("loss.chunk_size", lc.chunk_size)
    _fraction("loss.label_smoothing", lc.label_smoothing, 0.0, 1.0, high_open=True)
    _positive("logging.log_every", cfg.logging.log_every)
    max_pos = getattr(args, "max_seq_len", None)
    if max_pos is not None and t.seq_len > max_pos:
        raise ConfigError(
            f"training.seq_len={t.seq_len} exceeds the model's max_seq_len={max_pos}; "
            f"lower training.seq_len or set model.max_seq_len={t.seq_len}"
        )
    _check_finite(cfg)  # every other float field
