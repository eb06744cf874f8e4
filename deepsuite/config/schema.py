"""The typed configuration schema: one dataclass per section, a docstring on every field.

YAML files hold values only; `deepsuite.config.load_config` merges defaults < file < CLI
overrides and validates the result. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from deepsuite.config.families import build_args


@dataclass
class ModelConfig:
    """Which model to build. Any other key in this section overrides a field of the flavor."""

    name: str = "gpt"
    """Model family in the registry: `gpt` or `deepseek_v3`."""

    flavor: str = "gpt2-debug"
    """Named size of the family (e.g. `gpt2-small`, `deepseek-v3-671b`); `deepsuite plan` lists them."""

    args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the flavor's model fields (written as plain keys of `model:` in YAML, e.g. `model.n_layers=4`)."""

    @cached_property
    def resolved_args(self) -> Any:
        """The family's args dataclass (e.g. `GPTConfig`): the flavor's values with `args` applied,
        validated. Built once, on first use (`load_config` does it); not a field, so dumps leave it out."""
        return build_args(self.name, self.flavor, self.args)


@dataclass
class DataConfig:
    """Corpus, tokenizer and token shards."""

    source: str = "shakespeare"
    """Text to train on: `shakespeare` (the embedded plays), a local file, folder or glob of .txt/.jsonl/.parquet files, or `hf:<dataset name>` (needs network)."""

    text_field: str = "text"
    """Column holding the text in jsonl/parquet/HF datasets."""

    out_dir: str = "data/shakespeare"
    """Folder for the tokenizer, the packed token shards and `meta.json`."""

    tokenizer: str = ""
    """An existing tokenizer: a SentencePiece `.model`, or a Hugging Face `tokenizer.json` / model folder holding one (its EOS from `tokenizer_config.json` or `config.json`), e.g. to fine-tune that model with `checkpoint.init_from`; empty trains a BPE tokenizer (byte fallback) on the corpus."""

    vocab_size: int = 4096
    """Vocabulary size of a newly trained tokenizer (ignored when `tokenizer` is given)."""

    val_fraction: float = 0.05
    """Fraction of documents held out for validation (0 < f < 1)."""

    num_proc: int = 2
    """Processes used for tokenisation."""

    shard_tokens: int = 50_000_000
    """Maximum tokens per shard file."""

    seed: int = 1234
    """Seed for the document split and the training sampler."""


@dataclass
class OptimConfig:
    """The optimizer (torch AdamW, handed to DeepSpeed)."""

    name: Literal["adamw"] = "adamw"
    """Optimizer; torch's AdamW (no JIT-built kernel needed)."""

    lr: float = 3e-3
    """Peak learning rate (a finite number > 0)."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1, beta2."""

    eps: float = 1e-8
    """Adam epsilon (> 0)."""

    weight_decay: float = 0.1
    """Decoupled weight decay (>= 0; not applied to norms, biases, embeddings or router biases)."""

    fused: bool = False
    """Use torch's fused AdamW kernel (CUDA only)."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay (torch.optim.lr_scheduler)."""

    warmup_steps: int = 20
    """Steps of linear warmup: step s (0-based) uses (s + 1) / warmup_steps of the peak learning rate. Keep it below `training.steps` (a warning says so otherwise), or the rate never decays."""

    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup."""

    min_lr_ratio: float = 0.1
    """Learning rate of the last step (`training.steps` - 1) as a fraction of the peak."""


@dataclass
class TrainingConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to train for (> 0)."""

    seq_len: int = 128
    """Tokens per training sequence."""

    global_batch_size: int = 16
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation steps."""

    micro_batch_size: int = 16
    """Sequences per forward pass on one rank."""

    gradient_accumulation_steps: int = 0
    """Micro-batches accumulated per step; 0 derives it as global / (micro × data-parallel world)."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype: fp32, or bf16 mixed precision through DeepSpeed (fp32 master weights)."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    seed: int = 1234
    """Seed for initialisation and every random number generator."""

    eval_every: int = 100
    """Validation runs before the first step of a fresh run (step 0), after every step that is a multiple of N, and after the last step (`training.steps`); 0 = only at step 0 and after the last step. A run cut short by `max_steps_per_run` evaluates at its end only on a multiple of N."""

    eval_batches: int = 8
    """Micro-batches per evaluation."""

    router_bias_update_rate: float = 0.001
    """γ of aux-loss-free balancing: after each step `bias += γ·sign(mean_load − load)`; 0 turns it off."""

    mtp_lambda: float = 0.3
    """Weight λ of the multi-token-prediction loss (>= 0)."""

    mtp_lambda_after: float = 0.1
    """λ used after `mtp_lambda_switch` of the steps (DeepSeek-V3: 0.3, then 0.1)."""

    mtp_lambda_switch: float = 1.0
    """Fraction of the steps after which λ becomes `mtp_lambda_after` (1.0 = never)."""

    sample_prompt: str = "ROMEO:"
    """Prompt for the text sample printed at the end of training."""

    sample_tokens: int = 64
    """Tokens generated for that sample (0 = no sample)."""

    max_steps_per_run: int = 0
    """Stop after this many steps in this invocation (checkpointing first), e.g. to split a run; 0 = no limit."""

    report_mtp_acceptance: bool = True
    """At the end of a DeepSeek-V3 run with MTP, decode a few validation prompts greedily with MTP drafting and report the acceptance rate."""

    cpu_heap_reuse: bool = True
    """On CPU, have glibc keep freed memory for reuse instead of unmapping every block over 32 MiB (each step's large tensors would fault in fresh pages; one MoE layer's step 16 % faster)."""


@dataclass
class ParallelConfig:
    """Data, expert and ZeRO parallelism (applied from `deepsuite.parallel`)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3."""

    ep_size: int = 1
    """Expert-parallel size: ranks sharing one copy of the routed experts; divides the world and n_routed_experts."""

    offload_optimizer: bool = False
    """ZeRO: keep optimizer states on the CPU."""

    offload_params: bool = False
    """ZeRO-3: keep parameters on the CPU."""

    reduce_bucket_size: int = 50_000_000
    """ZeRO reduce bucket, in elements."""

    allgather_bucket_size: int = 50_000_000
    """ZeRO-1/2 all-gather bucket, in elements."""

    overlap_comm: bool = False
    """Overlap gradient reduction with backward (ZeRO)."""

    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of storing its activations."""

    compile: bool = False
    """torch.compile each transformer block."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo otherwise."""

    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged over the generated config (for what deepsuite does not model); keys deepsuite derives are refused: the batch keys `train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps` (set `training.*`), `zero_optimization.stage` (`parallel.zero_stage`), `bf16`/`fp16` `enabled` (`training.dtype`) and `gradient_clipping` (`training.grad_clip`)."""


@dataclass
class FP8Config:
    """FP8 training (a conversion step over nn.Linear; lm_head, router and embeddings stay high precision)."""

    enabled: bool = False
    """Train the selected linear layers in FP8."""

    backend: Literal["auto", "te", "native"] = "auto"
    """auto = Transformer Engine when installed with FP8 hardware, else the native `torch._scaled_mm` path."""

    recipe: Literal["delayed", "current", "block", "mxfp8"] = "current"
    """Scaling recipe: delayed (amax history), current (tensorwise), block (1×128 activations, 128×128 weights), mxfp8."""

    native_scaling: Literal["tensorwise", "rowwise", "block"] = "tensorwise"
    """Scaling of the native path when the recipe does not fix it."""

    exclude: list[str] = field(default_factory=lambda: ["lm_head", "router", "gate", "embed", "eh_proj"])
    """Substrings of module names kept in high precision."""

    grad_dtype: Literal["e5m2", "e4m3"] = "e5m2"
    """FP8 format of the gradients: e5m2 (range; TE's HYBRID format) or e4m3 (precision; TE's E4M3 format for delayed/current)."""

    amax_history_len: int = 16
    """Delayed scaling: length of the amax history."""

    power_of_two_scales: bool = False
    """Round scales to powers of two (DeepSeek-V3 style)."""


@dataclass
class AttentionConfig:
    """Attention kernels."""

    backend: Literal["auto", "flash", "sdpa"] = "auto"
    """auto = flash-attn when installed on CUDA, else torch SDPA."""


@dataclass
class LossConfig:
    """The language-modelling loss."""

    backend: Literal["auto", "chunked", "cce", "liger", "naive"] = "auto"
    """Fused linear cross-entropy: auto = cut-cross-entropy or Liger on CUDA when installed, else the chunked one."""

    chunk_size: int = 4096
    """Tokens per chunk in the chunked linear cross-entropy."""

    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (0 ≤ s < 1)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    dir: str = "runs/default"
    """Folder holding the checkpoints and the `latest` pointer."""

    every: int = 100
    """Save every N steps (0 = only at the end)."""

    keep_last: int = 2
    """Keep the newest K checkpoints, delete older ones."""

    resume: str = "auto"
    """`auto` resumes from the latest checkpoint in `dir` if there is one, `never` starts fresh, or a checkpoint path."""

    save_final: bool = True
    """Save a checkpoint when training ends."""

    init_from: str = ""
    """Start a fresh run (step 0, new optimizer) from these weights: an HF folder (`config.json` + safetensors), a deepsuite model folder (`model.yaml`) or a training run/`step_N` folder (any ZeRO stage, world size and `ep_size`). Its architecture must equal `model` (dropout/init may differ; missing MTP modules start fresh). Ignored when the run resumes from its own checkpoint."""

    verify: bool = True
    """Check every file of the checkpoint resumed from (and of `init_from`) against the size and checksum its `manifest.json` recorded when it was written, before reading it; a damaged file stops the run naming it and the newest intact checkpoint. `false` skips the check (the weights-only unpickling check stays)."""


@dataclass
class LoggingConfig:
    """Progress, metrics files and wandb."""

    run_dir: str = "runs/default"
    """Folder for `metrics.jsonl`, the resolved config and plots."""

    log_every: int = 10
    """Append metrics every N steps."""

    progress: bool = True
    """Show a progress bar (rank 0)."""

    wandb: bool = False
    """Log to Weights & Biases."""

    wandb_project: str = "deepsuite"
    """wandb project name."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: offline by default (sync later with `wandb sync`), online when the machine has network."""

    wandb_run_name: str = ""
    """wandb run name (empty = wandb's default)."""


@dataclass
class Config:
    """A whole run. One YAML file = one reproducible run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model family, flavor and overrides."""

    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and shards."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Training loop."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism."""

    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention kernels."""

    loss: LossConfig = field(default_factory=LossConfig)
    """Loss kernels."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "training": TrainingConfig,
    "parallel": ParallelConfig,
    "fp8": FP8Config,
    "attention": AttentionConfig,
    "loss": LossConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
