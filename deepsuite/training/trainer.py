"""The training loop: one DeepSpeed engine, a world of one or many ranks, exact resume.

`train(cfg)` prepares the world, data, model, optimizer and engine, optionally resumes from a
checkpoint, then runs `training.steps` optimizer steps of `gradient_accumulation_steps`
micro-batches each, evaluating, logging and checkpointing on the way, and prints a text sample.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from deepsuite.checkpoint.atomic import remove_interrupted_saves
from deepsuite.checkpoint.init_from import load_initial_weights, missing_source_error
from deepsuite.checkpoint.manager import (
    check_compatible,
    check_writable,
    load_checkpoint,
    read_state,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from deepsuite.checkpoint.reshard import layout_changed, load_resharded
from deepsuite.checkpoint.rng import seed_everything
from deepsuite.config.errors import ConfigError
from deepsuite.config.loader import config_to_dict, dump_config
from deepsuite.config.schema import Config
from deepsuite.data.files import leftovers_message
from deepsuite.data.sampler import WindowSampler, eval_starts, rank_slice, windows_batch
from deepsuite.data.shards import TokenShards, read_meta
from deepsuite.data.tokenizer import Tokenizer, check_tokenizer
from deepsuite.fp8 import prepare_fp8, te_blockers_for
from deepsuite.generation.text import generate_text
from deepsuite.heads import LM_IGNORE_INDEX
from deepsuite.models.registry import build_model, get_model_spec
from deepsuite.parallel.balancing import moe_layers, update_router_biases
from deepsuite.parallel.deepspeed import build_ds_config, initialize_engine, resolve_batch
from deepsuite.parallel.dist import (
    ParallelDims,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    amax_reduction_group,
    init_distributed,
    restore_torch_linear,
    world_from_env,
)
from deepsuite.parallel.expert_parallel import held_experts
from deepsuite.parallel.groups import validate_parallel_layout
from deepsuite.training.cpu_memory import keep_freed_memory_in_heap
from deepsuite.training.metrics import MetricsLogger
from deepsuite.training.optim import build_held_expert_optimizer, build_optimizer, build_scheduler


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stops without writing a checkpoint."""


class TrainingStopped(RuntimeError):
    """A stop signal (SIGTERM, SIGUSR1) arrived: the run saved a checkpoint after the current step
    and stopped; ``signum`` is the signal's number (the CLI exits with 128 + signum)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
"""Signals that make a run checkpoint after its current step and stop: what `docker stop`, SLURM
(time limit, preemption, `scancel`; `#SBATCH --signal=USR1@120` for an early warning) and torchrun's
agent send."""


class _StopSignals:
    """``with _StopSignals() as stop:`` records stop signals while a run trains (main thread only);
    the previous handlers come back when the block ends."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def received_anywhere(self, device: str | torch.device, world_size: int) -> int:
        """The signal one rank received (0 if none): every rank stops after the same step. One
        process needs no collective (and no device sync) for that."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=device)
        return int(all_reduce_max(flag).item())


@dataclass
class TrainResult:
    """What a `train` call did."""

    start_step: int = 0
    end_step: int = 0
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    checkpoint: str = ""
    sample: str = ""
    mtp_acceptance: float | None = None


def _say(dims: Any, text: str) -> None:
    if dims.is_main:
        print(text, flush=True)


def configure_model(model: nn.Module, cfg: Config) -> None:
    """Set the plain attributes the model reads: loss kernel options and attention backend."""
    model.loss_backend = cfg.loss.backend  # type: ignore[assignment]
    model.loss_chunk_size = cfg.loss.chunk_size  # type: ignore[assignment]
    model.label_smoothing = cfg.loss.label_smoothing  # type: ignore[assignment]
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = cfg.attention.backend  # type: ignore[assignment]


def mtp_lambda_at(cfg: Config, step: int) -> float:
    """λ of the MTP loss for optimizer step `step` (0-based)."""
    t = cfg.training
    return t.mtp_lambda if step < t.mtp_lambda_switch * t.steps else t.mtp_lambda_after


def describe_layout(cfg: Config, dims: Any, layout: Any, ds_config: dict[str, Any]) -> str:
    """The parallel layout as a few lines of text (for --dry-run and the start of a run)."""
    experts = []
    if cfg.parallel.zero_stage == 3 and dims.ep_size > 1:
        experts = [
            f"experts: held outside ZeRO-3, whole on each of the {dims.ep_size} expert-parallel ranks and "
            f"replicated over {dims.world_size // dims.ep_size} expert-data-parallel rank(s); own AdamW, "
            "clipped by the joint gradient norm"
        ]
    return "\n".join(
        [
            f"world: {dims.world_size} rank(s); data parallel {dims.dp_size}, expert parallel {dims.ep_size}",
            f"batch: global {layout.global_batch_size} = micro {layout.micro_batch_size} × accumulation "
            f"{layout.gradient_accumulation_steps} × data-parallel {layout.dp_size}; "
            f"{layout.global_batch_size * cfg.training.seq_len:,} tokens per step",
            f"engine: DeepSpeed ZeRO-{cfg.parallel.zero_stage}, {cfg.training.dtype}, "
            f"gradient clipping {ds_config['gradient_clipping']}, activation checkpointing "
            f"{cfg.parallel.activation_checkpointing}, compile {cfg.parallel.compile}",
            *experts,
        ]
    )


def _check_fp8_layout(cfg: Config) -> None:
    """FP8 converts the stacked experts into modules that register their weights again, which ZeRO-3
    would then partition over the whole world: refused under ZeRO-3 × EP (see `HeldExperts`)."""
    if cfg.fp8.enabled and cfg.parallel.zero_stage == 3 and cfg.parallel.ep_size > 1:
        raise ConfigError(
            f"fp8.enabled=true with parallel.zero_stage=3 and parallel.ep_size={cfg.parallel.ep_size} is not "
            "supported: use parallel.zero_stage=1 or 2 with expert parallelism and FP8, or fp8.enabled=false"
        )


def _prepare_fp8(model: nn.Module, cfg: Config) -> Any:
    _check_fp8_layout(cfg)
    if not cfg.fp8.enabled:
        return None
    blockers = te_blockers_for(cfg.parallel.ep_size, cfg.parallel.activation_checkpointing)
    return prepare_fp8(model, cfg.fp8, blockers)


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class Trainer:
    """Owns the engine, data and state of one training run (see `train`)."""

    def __init__(self, cfg: Config, resume: str | None = None) -> None:
        self.cfg = cfg
        self.dims = init_distributed(cfg.parallel.backend, cfg.parallel.ep_size)
        self.layout = resolve_batch(cfg.training, self.dims.dp_size)
        self.ds_config = build_ds_config(cfg, self.dims)
        self.device = self.dims.device
        if torch.device(self.device).type == "cpu" and cfg.training.cpu_heap_reuse:
            keep_freed_memory_in_heap()
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir)
        # data
        data_dir = Path(cfg.data.out_dir)
        self.meta = read_meta(data_dir)
        self.tokenizer_path = data_dir / self.meta["tokenizer"]
        _check_vocab(cfg, self.meta, data_dir)
        self.train_data = TokenShards(data_dir, "train")
        self.val_data = TokenShards(data_dir, "val")
        self.sampler = WindowSampler(self.train_data, cfg.training.seq_len, seed=cfg.data.seed)

        # which checkpoint (checked before the expensive part)
        self.resume_from, _ = _checked_resume(cfg, resume, self.dims.world_size, self.sampler)

        if self.dims.is_main:
            check_writable(self.ckpt_dir)
            if removed := remove_interrupted_saves(self.ckpt_dir):  # saves of a killed run
                _say(self.dims, leftovers_message(removed))
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / ".write-test").write_text("")
                (self.run_dir / ".write-test").unlink()
            except OSError as exc:
                raise ConfigError(
                    f"logging.run_dir={str(self.run_dir)!r} is not writable ({exc.strerror}); choose a writable folder"
                ) from None

        self.engine = self._build_engine()
        self.step = 0
        self.tokens_seen = 0
        self.val_losses: dict[int, float] = {}
        self.last_val_mtp: dict[str, float] = {}

    # -------------------------------------------------------------------------------- building
    def _build_engine(self) -> Any:
        cfg = self.cfg
        seed_everything(cfg.training.seed)
        model = build_model(cfg.model, device=self.device)
        if cfg.checkpoint.init_from and self.resume_from is None:
            _say(self.dims, load_initial_weights(model, cfg.checkpoint.init_from, cfg.checkpoint.verify))
        elif cfg.checkpoint.init_from:
            _say(self.dims, f"checkpoint.init_from ignored: resuming from {self.resume_from}")
        configure_model(model, cfg)
        spec = get_model_spec(cfg.model.name)
        model = spec.parallelize_fn()(model, self.dims, cfg)
        self.fp8 = _prepare_fp8(model, cfg)
        if self.fp8 is not None and hasattr(self.fp8, "amax_group"):
            # TE delayed scaling: one scale per tensor across ranks
            self.fp8.amax_group = amax_reduction_group()
        if self.fp8 is not None:
            _say(self.dims, str(getattr(self.fp8, "summary", "")))
        self.model = model
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.steps)
        # ZeRO-3 × EP: the routed experts are not in the module tree the engine sees
        self.held_experts = held_experts(model)
        if self.held_experts is not None:
            self.held_experts.use_dtype(torch.bfloat16 if cfg.training.dtype == "bf16" else torch.float32)
            self.held_experts.optimizer = build_held_expert_optimizer(self.held_experts.masters, cfg.optim)
        engine = initialize_engine(model, optimizer, scheduler, self.ds_config)
        if self.held_experts is not None:
            self.held_experts.attach(engine)
        # the same seed on every rank gave identical initial weights; from here each rank draws
        # its own numbers (dropout) from a rank-dependent seed
        seed_everything(cfg.training.seed + 1_000_003 * self.dims.rank)
        return engine

    @property
    def has_moe(self) -> bool:
        return bool(moe_layers(self.model))

    # ---------------------------------------------------------------------------------- state
    def load(self) -> None:
        """Resume from `self.resume_from` (if any)."""
        if self.resume_from is None:
            return
        rank, world = self.dims.rank, self.dims.world_size
        if layout_changed(read_state(self.resume_from), self.cfg, world):  # another world size or ZeRO stage
            state = load_resharded(self.engine, self.resume_from, self.cfg, rank, world)
        else:
            state = load_checkpoint(self.engine, self.resume_from, rank)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self._apply_configured_lr()
        self.tokens_seen = int(state["tokens_seen"])
        _say(self.dims, f"resumed from {self.resume_from} at step {self.step}")

    def _apply_configured_lr(self) -> None:
        """After a resume: the schedule of *this* config from the restored step on.

        DeepSpeed restores the scheduler's base learning rates and the optimizer's current rate
        from the checkpoint, so a changed `optim.lr` would be ignored and a changed schedule (e.g.
        more `training.steps`) would apply one step late. Unchanged settings give the same values,
        computed the same way (exact resume stays bitwise)."""
        sched = getattr(self.engine, "lr_scheduler", None)
        if sched is None or not hasattr(sched, "lr_lambdas"):
            return
        sched.base_lrs = [float(self.cfg.optim.lr) for _ in sched.base_lrs]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs

    def save(self) -> Path:
        """Write a checkpoint of the current step."""
        return save_checkpoint(
            self.engine,
            self.ckpt_dir,
            self.step,
            cfg=self.cfg,
            rank=self.dims.rank,
            world_size=self.dims.world_size,
            sampler_state=self.sampler.state_dict(),
            tokens_seen=self.tokens_seen,
            tokenizer_path=self.tokenizer_path,
        )

    # ----------------------------------------------------------------------------------- steps
    def _autocast(self) -> Any:
        return self.fp8.autocast() if self.fp8 is not None else nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its metrics."""
        engine, layout, cfg = self.engine, self.layout, self.cfg
        if hasattr(self.model, "mtp_lambda"):
            self.model.mtp_lambda = mtp_lambda_at(cfg, self.step)  # type: ignore[assignment]
        starts = rank_slice(
            self.sampler.next_starts(layout.global_batch_size), self.dims.dp_rank, self.dims.dp_size
        )
        micro = layout.micro_batch_size
        gas = layout.gradient_accumulation_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        parts: dict[str, torch.Tensor] = {}  # main_loss, mtp_loss_k, balance_loss summed over micro-batches
        grad_norm: float | None = None
        lr = float(engine.get_lr()[0])
        for m in range(gas):
            inputs, labels = self.sampler.batch(starts[m * micro : (m + 1) * micro])
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            with self._autocast():
                out = engine(inputs, labels=labels)
            engine.backward(out.loss)
            loss_sum += out.loss.detach().double()
            for key, value in out.metrics.items():
                if key != "total_loss":
                    value = value.detach().double()
                    parts[key] = parts[key] + value if key in parts else value
            if m == gas - 1:
                loss = float(all_reduce_mean(loss_sum / gas))
                if not math.isfinite(loss):
                    raise TrainingDivergedError(
                        f"non-finite loss ({loss}) at step {self.step + 1}; stopped without saving a checkpoint "
                        "(lower optim.lr, raise schedule.warmup_steps, or check the data)"
                    )
                if cfg.parallel.zero_stage == 0 and cfg.training.dtype == "fp32":
                    grad_norm = _grad_norm(self.model)  # DeepSpeed reports none for plain fp32
                if self.held_experts is not None:
                    self.held_experts.reduce_gradients()  # before the engine's norm, which includes them
            engine.step()
        reported = engine.get_global_grad_norm()
        if reported is not None:
            grad_norm = float(reported)
        if self.held_experts is not None:
            self.held_experts.step(lr, cfg.training.grad_clip, reported)
        self.step += 1
        self.tokens_seen += layout.global_batch_size * cfg.training.seq_len
        metrics: dict[str, float] = {"loss": loss, "lr": lr}
        if parts:
            stacked = all_reduce_mean(torch.stack([parts[k] for k in sorted(parts)]) / gas)
            metrics.update({k: float(v) for k, v in zip(sorted(parts), stacked)})
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if self.has_moe:
            metrics.update(update_router_biases(self.model, cfg.training.router_bias_update_rate))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over fixed windows (the same every time, whatever the world size)."""
        cfg = self.cfg
        micro, world = self.layout.micro_batch_size, self.dims.dp_size
        starts = eval_starts(self.val_data, cfg.training.seq_len, cfg.training.eval_batches * micro)
        weights = np.ones(len(starts))  # 1 = a real window, 0 = padding
        per_rank = -(-len(starts) // world)
        per_rank = -(-per_rank // micro) * micro  # every rank runs the same number of passes (ZeRO-3)
        pad = per_rank * world - len(starts)
        starts = np.concatenate([starts, np.repeat(starts[:1], pad)])
        weights = np.concatenate([weights, np.zeros(pad)])
        mine = starts[self.dims.dp_rank :: world]
        my_w = weights[self.dims.dp_rank :: world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        mtp_total: torch.Tensor | None = None  # per MTP depth, same weighting
        self.engine.eval()
        for lo in range(0, len(mine), micro):
            inputs, labels = windows_batch(self.val_data, mine[lo : lo + micro], cfg.training.seq_len)
            # padding windows (copies of the first, there so every rank runs the same passes) are
            # ignored by the loss; a micro-batch counts with its real tokens
            labels[torch.as_tensor(my_w[lo : lo + micro] == 0)] = LM_IGNORE_INDEX
            real = float((labels != LM_IGNORE_INDEX).sum())
            with self._autocast():
                out = self.engine(inputs.to(self.device), labels=labels.to(self.device))
            depths = sorted(k for k in out.metrics if k.startswith("mtp_loss_"))
            if depths and mtp_total is None:
                # before the padding skip: a rank with padding windows only (eval windows fewer than
                # ranks) must still join the MTP all-reduce below, or the ranks' collectives diverge
                mtp_total = torch.zeros(len(depths), dtype=torch.float64, device=self.device)
            if real == 0:  # a micro-batch of padding only (its loss is NaN): nothing to add
                continue
            # The model's loss is the mean over the micro-batch's real tokens. The validation loss
            # is the next-token loss alone (`main_loss`), comparable across models with and
            # without MTP; the MTP depths are reported beside it.
            main = out.metrics.get("main_loss", out.loss)
            total[0] += main.double() * real
            total[1] += real
            if mtp_total is not None:
                mtp_total += torch.stack([out.metrics[k].double() for k in depths]) * real
        self.engine.train()
        all_reduce_sum(total)
        self.last_val_mtp = {}
        if mtp_total is not None:
            all_reduce_sum(mtp_total)
            self.last_val_mtp = {
                f"val_mtp_loss_{i + 1}": float(v / total[1]) for i, v in enumerate(mtp_total)
            }
        return float(total[0] / total[1])

    @property
    def _generates(self) -> bool:
        """Whether this rank runs generation. ZeRO-3 gathers weights and expert parallelism
        exchanges tokens collectively: then every rank generates (the same tokens: same seed, same
        logits); otherwise rank 0 alone."""
        return self.cfg.parallel.zero_stage == 3 or self.cfg.parallel.ep_size > 1 or self.dims.is_main

    def sample(self) -> str:
        """Generate `training.sample_tokens` tokens after `training.sample_prompt` ("" where this
        rank does not generate)."""
        cfg = self.cfg
        if cfg.training.sample_tokens == 0 or not self._generates:
            return ""
        return generate_text(
            self.engine.module,
            Tokenizer(self.tokenizer_path),
            cfg.training.sample_prompt,
            cfg.training.sample_tokens,
            self.device,
            seed=cfg.training.seed,
        )

    @torch.no_grad()
    def mtp_acceptance(
        self, n_prompts: int = 4, prompt_len: int = 32, new_tokens: int = 64
    ) -> dict[str, float]:
        """Greedy speculative decoding (MTP drafts, main model verifies) on validation prompts.

        Returns ``{"mtp_acceptance": rate, "mtp_drafted": n}``, or ``{}`` when the model has no MTP
        module or `training.report_mtp_acceptance` is off, and where this rank does not generate.
        """
        cfg = self.cfg
        model: Any = self.engine.module
        if (
            not cfg.training.report_mtp_acceptance
            or getattr(getattr(model, "args", None), "mtp_depth", 0) < 1
        ):
            return {}
        if not self._generates:
            return {}
        limit = int(model.args.max_seq_len)
        prompt_len = min(prompt_len, limit // 2)
        new_tokens = max(1, min(new_tokens, limit - prompt_len))
        tokens = self.val_data.arrays[0]
        stride = max((len(tokens) - prompt_len) // n_prompts, 1)
        drafted = accepted = 0
        was_training = model.training
        model.eval()
        try:
            for i in range(n_prompts):
                window = tokens[i * stride : i * stride + prompt_len].astype(np.int64)
                ids = torch.as_tensor(window, device=self.device)[None]
                model.generate(ids, new_tokens, temperature=0, speculative=True)
                drafted += int(model.last_generation_stats["drafted"])
                accepted += int(model.last_generation_stats["accepted"])
        finally:
            model.train(was_training)
        return {"mtp_acceptance": accepted / drafted if drafted else 0.0, "mtp_drafted": float(drafted)}


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Run (or continue) training as configured; see the module docstring."""
    try:
        return _train(cfg, resume)
    finally:
        restore_torch_linear()  # ZeRO-3 replaced torch.nn.functional.linear process-wide


def should_save(cfg: Config, step: int, end: int, stopping: bool) -> bool:
    """Whether to checkpoint after `step`: on the `checkpoint.every` schedule, when a stop signal
    ends the run, and at this run's last step `end` — the last step of training only with
    `checkpoint.save_final`."""
    every = cfg.checkpoint.every
    if stopping or (every and step % every == 0):
        return True
    return step == end and (cfg.checkpoint.save_final or step < cfg.training.steps)


def _train(cfg: Config, resume: str | None) -> TrainResult:
    trainer = Trainer(cfg, resume=resume)
    dims, t = trainer.dims, cfg.training
    _say(dims, describe_layout(cfg, dims, trainer.layout, trainer.ds_config))
    trainer.load()
    result = TrainResult(start_step=trainer.step, end_step=trainer.step)
    if trainer.step >= t.steps:  # a finished run started again: nothing to do, nothing written
        _say(
            dims,
            f"{trainer.resume_from} is at step {trainer.step} and training.steps={t.steps}: nothing to "
            "train; raise training.steps to continue",
        )
        return result
    resumed = trainer.resume_from is not None
    end = t.steps if t.max_steps_per_run == 0 else min(t.steps, trainer.step + t.max_steps_per_run)
    with closing(MetricsLogger(cfg, dims.is_main, resume_step=trainer.step if resumed else None)) as logger:
        if dims.is_main:
            dump_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
        if trainer.step == 0:
            _evaluate(trainer, logger, result)
        _run_steps(trainer, end, logger, result)
        result.end_step = trainer.step
        if trainer.step == t.steps:
            _report_sample(trainer, logger, result)
        else:
            _say(
                dims,
                f"stopped at step {trainer.step} of {t.steps} (training.max_steps_per_run); resume to continue",
            )
    return result


def _run_steps(trainer: Trainer, end: int, logger: MetricsLogger, result: TrainResult) -> None:
    """Optimizer steps up to `end`, logging, evaluating and checkpointing on schedule. A stop signal
    (on any rank) ends the run after the current step: saved, then `TrainingStopped` is raised."""
    cfg, dims, t = trainer.cfg, trainer.dims, trainer.cfg.training
    tokens_per_step = trainer.layout.global_batch_size * t.seq_len
    progress = tqdm(
        total=t.steps,
        initial=trainer.step,
        desc="train",
        unit="step",
        disable=not (dims.is_main and cfg.logging.progress),
        file=sys.stdout,
        dynamic_ncols=True,
    )
    with _StopSignals() as stop, progress as bar:
        while trainer.step < end:
            tick = time.perf_counter()
            metrics = trainer.train_step()
            tokens_per_s = tokens_per_step / max(time.perf_counter() - tick, 1e-9)
            result.losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                gnorm=f"{metrics.get('grad_norm', float('nan')):.3f}",
                tok_s=f"{tokens_per_s:,.0f}",
            )
            if trainer.step % cfg.logging.log_every == 0 or trainer.step == end:
                logger.log(
                    {
                        "step": trainer.step,
                        **metrics,
                        "tokens_per_s": tokens_per_s,
                        "tokens_seen": trainer.tokens_seen,
                    }
                )
            if (t.eval_every and trainer.step % t.eval_every == 0) or trainer.step == t.steps:
                _evaluate(trainer, logger, result)
            signum = stop.received_anywhere(trainer.device, dims.world_size) if trainer.step < end else 0
            if should_save(cfg, trainer.step, end, stopping=bool(signum)):
                result.checkpoint = str(trainer.save())
            if signum:
                raise TrainingStopped(
                    f"{signal.Signals(signum).name} received: stopped after step {trainer.step} of {t.steps} and "
                    f"saved {result.checkpoint}; run the same command again to resume",
                    signum,
                )


def _evaluate(trainer: Trainer, logger: MetricsLogger, result: TrainResult) -> None:
    """The validation loss at the current step: logged, printed above the progress bar, kept."""
    val = trainer.evaluate()
    trainer.val_losses[trainer.step] = result.val_losses[trainer.step] = val
    ppl = math.exp(min(val, 50.0))
    logger.log({"step": trainer.step, "val_loss": val, "val_ppl": ppl, **trainer.last_val_mtp})
    if trainer.dims.is_main:
        tqdm.write(f"step {trainer.step}: val loss {val:.4f}, perplexity {ppl:.1f}")


def _report_sample(trainer: Trainer, logger: MetricsLogger, result: TrainResult) -> None:
    """After the last step of training: a text sample and, with MTP, the speculative acceptance rate."""
    text = trainer.sample()
    if text:
        result.sample = text
        _say(trainer.dims, f"--- sample after {trainer.step} steps ---\n{text}\n---")
    spec = trainer.mtp_acceptance()
    if spec:
        result.mtp_acceptance = spec["mtp_acceptance"]
        logger.log({"step": trainer.step, **spec})
        _say(
            trainer.dims,
            f"MTP speculative decoding (greedy, validation prompts): {spec['mtp_acceptance']:.1%} of "
            f"{int(spec['mtp_drafted'])} drafted tokens accepted",
        )


def dry_run(cfg: Config, resume: str | None = None) -> str:
    """Validate the config and world layout without building anything heavy; return the report."""
    world, rank, local = world_from_env()
    dims = ParallelDims(world_size=world, rank=rank, local_rank=local, ep_size=cfg.parallel.ep_size)
    n_experts = getattr(cfg.model.resolved_args, "n_routed_experts", 0)
    validate_parallel_layout(world, cfg.parallel.zero_stage, cfg.parallel.ep_size, n_experts)
    _check_fp8_layout(cfg)
    layout = resolve_batch(cfg.training, dims.dp_size)
    ds_config = build_ds_config(cfg, dims)
    checks = _dry_run_checks(cfg, world, resume)
    if rank != 0:  # the layout was validated on this rank too; the report is rank 0's
        return f"rank {rank}: config and layout OK"
    return (
        "# resolved config\n"
        + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        + "# parallel layout\n"
        + describe_layout(cfg, dims, layout, ds_config)
        + "\n# DeepSpeed config\n"
        + yaml.safe_dump(ds_config, sort_keys=False)
        + "# run\n"
        + "\n".join(checks)
    )


def _check_vocab(cfg: Config, meta: dict[str, Any], data_dir: Path) -> None:
    """The model's vocabulary must hold every id of the prepared data's tokenizer."""
    check_tokenizer(data_dir, meta)  # the data's own tokenizer: present, intact, matching meta.json
    vocab = getattr(cfg.model.resolved_args, "vocab_size", None)
    if vocab is not None and vocab < meta["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {meta['vocab_size']} pieces "
            f"(in {data_dir}); set model.vocab_size={meta['vocab_size']}"
        )


def _checked_resume(
    cfg: Config, resume: str | None, world_size: int, sampler: Any
) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint this run resumes from (None: a fresh start) and its state, after checking that
    it is complete, fits the model config and world size, and (given a ``sampler``) that its data
    position fits this config's windows."""
    path = resolve_resume(resume or cfg.checkpoint.resume, cfg.checkpoint.dir)
    if path is None:
        return None, {}
    state = verify_checkpoint(path, checksums=cfg.checkpoint.verify)
    check_compatible(state, cfg, path, world_size)
    if sampler is not None:
        sampler.check_state(state.get("sampler", {}))
    return path, state


def _dry_run_checks(cfg: Config, world_size: int, resume: str | None = None) -> list[str]:
    """What `train` checks before building anything, without building: the prepared data against
    the model's vocabulary, the checkpoint it would resume from (and whether it fits), and the
    `checkpoint.init_from` source. Raises the same errors `train` would; returns report lines."""
    lines = []
    data_dir = Path(cfg.data.out_dir)
    sampler = None
    if (data_dir / "meta.json").exists():  # a special file there is refused by read_meta, not skipped
        meta = read_meta(data_dir)
        _check_vocab(cfg, meta, data_dir)
        sampler = WindowSampler(TokenShards(data_dir, "train"), cfg.training.seq_len, seed=cfg.data.seed)
        TokenShards(data_dir, "val")  # train opens both splits: refuse what it would refuse
        lines.append(
            f"data: {data_dir} ({meta['splits']['train']['tokens']:,} train tokens, vocab {meta['vocab_size']})"
        )
    else:
        lines.append(
            f"data: {data_dir} is not prepared yet (deepsuite prepare-data --config ... before training)"
        )
    resume_from, state = _checked_resume(cfg, resume, world_size, sampler)
    if resume_from is not None:
        lines.append(f"would resume from {resume_from} (step {state['step']})")
    else:
        lines.append("starts at step 0")
    if cfg.checkpoint.init_from:
        if resume_from is not None:
            lines.append("checkpoint.init_from ignored: the run resumes")
        elif not Path(cfg.checkpoint.init_from).exists():
            raise missing_source_error(cfg.checkpoint.init_from)
        else:
            lines.append(
                f"initialised from {cfg.checkpoint.init_from} (architecture checked when training starts)"
            )
    return lines
