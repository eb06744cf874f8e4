"""`deepsuite plan`: per-GPU memory and all-to-all traffic of a model × cluster × parallel layout.

Nothing is allocated: the model is built on the meta device to count its parameters, split into
*dense* parameters (replicated, sharded by ZeRO over all ``dp = nodes × gpus`` ranks) and *routed
expert* parameters (sharded over ``ep`` ranks, then by ZeRO over the ``edp = dp / ep`` replicas).

Memory model per GPU (bytes per parameter element; ``w`` = 2 for bf16, 4 for fp32 training),
matching what DeepSpeed 0.19 allocates for a torch AdamW (`tests/distributed` checks it within
10 % against tensors counted on live engines):

============  ==================  ==================  ===============================================
ZeRO stage    parameters          gradients           optimizer states
============  ==================  ==================  ===============================================
0             w                   w                   8 (exp_avg + exp_avg_sq, fp32) + 4 if bf16
1             w                   w / dp (*)          (4 master + 8) / dp
2             w                   w / dp              (4 master + 8) / dp
3             w / dp              w / dp              (4 master + 8) / dp
============  ==================  ==================  ===============================================

(*) ``w`` with gradient accumulation > 1 (full gradients live between micro-batches).
(ZeRO-1/2/3 always keep a separate fp32 partition of the parameters for the optimizer, even when
training in fp32; stage 0 in fp32 steps the parameters directly.) For experts under ZeRO-1/2
replace ``dp`` by ``edp`` and the parameter count by ``routed / ep``. DeepSpeed's communication
buckets (``reduce_bucket_size`` / ``allgather_bucket_size`` elements) are listed separately.

ZeRO-3 × EP: the dense parameters follow the stage-3 row (sharded over all ``dp`` ranks). The
routed experts are held outside ZeRO-3 (`deepsuite.parallel.expert_parallel.HeldExperts`): each EP
rank keeps its ``routed / ep`` elements whole, replicated over the ``edp`` group, not partitioned:
``w`` parameters, 4 bytes of fp32 gradients (after the expert-data-parallel reduction; under bf16
the fp32 master gradients) and 8 bytes of AdamW moments, + 4 for the fp32 masters under bf16. The
held optimizer state stays on the GPU with ``offload_optimizer``. So this layout pays off with
``edp = 1`` (``ep = dp``), where it shards the dense parameters that ZeRO-1/2 replicate.

Activations per micro-batch (``b`` sequences of ``s`` tokens, ``a`` bytes per element = ``w``),
documented estimates of what autograd keeps per layer, with fused/flash attention (no ``s²``
score matrix):

* MHA block (GPT): ``b·s·(9·d + 2·ffn) · a`` — Korthikanti et al. (2022): attention 5.5·d (QKV
  input, Q, K, V, output, dropout mask), MLP 1.5·d + 2·ffn (input, up-projection and activation
  input, mask), two LayerNorm inputs 2·d. For GPT-2's ffn = 4d this is their ``34·b·s·d`` bytes
  at a = 2, without the ``5·heads·s²·b`` score term that flash attention removes.
* MLA block (DeepSeek-V3): ``b·s·(4·d + q_lora + n_h·qk + kv_lora + rope + n_h·(qk + 2·v)) · a``
  — norms and residuals, compressed q, q, compressed kv and k_pe, k/v per head, attention output.
* Dense FFN (SwiGLU): ``b·s·(d + 3·inter) · a``.
* MoE FFN: ``b·s·(2·d + 4·E + k·(2·d + 3·I) + n_shared·3·I) · a`` — input, fp32 router scores,
  ``k`` dispatched token copies, each expert's gate/up/activation, combined output.
* Loss: the chunked linear cross-entropy's work buffers (`deepsuite.loss.linear_cross_entropy.
  work_buffer_bytes`): one chunk of logits (at most 4096 rows and 256 MiB) in the training dtype,
  in bf16 also its 128 MiB float32 scratch and a ``vocab × d`` bf16 weight-gradient product, and
  the ``b·s·d`` float32 hidden-state gradient computed with the loss.

With activation checkpointing each block keeps only its input (``b·s·d·a``) and one block's
activations exist at a time during recomputation.

All-to-all per step and GPU (expert parallel, bf16 tokens): each MoE layer sends ``k`` copies of
each token's hidden vector to the expert's rank (fraction ``(ep−1)/ep`` leaves the GPU) and gets
them back (combine); backward repeats both; activation checkpointing adds one more forward:
``layers × micro_batches × b·s·k·d·a·(ep−1)/ep × (4, or 6 with checkpointing)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from deepsuite.config.errors import ConfigError
from deepsuite.config.families import MODEL_FAMILIES, get_family
from deepsuite.config.schema import ModelConfig

GIB = 1024**3
# The chunked cross-entropy's default rows per chunk (deepsuite.loss; capped at 256 MiB of logits).
LOSS_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class PlanInput:
    """One layout to evaluate."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    zero_stage: int = 1
    ep_size: int = 1
    micro_batch: int = 1
    seq_len: int = 4096
    activation_checkpointing: bool = False
    dtype: str = "bf16"
    grad_accum: int = 1
    offload_optimizer: bool = False
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000

    @property
    def world(self) -> int:
        """Total GPUs."""
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ParamCounts:
    """Parameter elements of a model, by kind."""

    dense: int
    routed: int
    n_routed_experts: int
    moe_layers: int
    shape: dict[str, Any] = field(default_factory=dict)
    mtp: int = 0
    """Parameters of the multi-token-prediction modules (shared embedding and head not included)."""
    mtp_routed: int = 0
    """Of which routed-expert parameters."""

    @property
    def total(self) -> int:
        """All parameters (MTP modules included: they are trained and held in memory)."""
        return self.dense + self.routed

    @property
    def main(self) -> int:
        """Parameters of the main model, MTP modules excluded (the figure DeepSeek reports, e.g. 671B)."""
        return self.total - self.mtp

    @property
    def activated(self) -> int:
        """Main-model parameters used per token: all but the routed experts a token does not choose."""
        if not self.n_routed_experts:
            return self.main
        k = int(self.shape.get("n_activated_experts", 1))
        routed_main = self.routed - self.mtp_routed
        return self.main - routed_main + routed_main * k // self.n_routed_experts


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of one layout (all values in bytes)."""

    inputs: PlanInput
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    all_to_all_bytes_per_step: int
    counts: ParamCounts

    @property
    def total(self) -> int:
        """Everything on the GPU (optimizer excluded when offloaded to the CPU)."""
        return self.params + self.grads + self.activations + self.buffers + self.optimizer

    @property
    def capacity(self) -> int:
        """GPU memory in bytes."""
        return int(self.inputs.gpu_mem_gb * GIB)

    @property
    def fits(self) -> bool:
        """Whether the estimate leaves at least 5 % of the GPU free (fragmentation, CUDA context)."""
        return self.total <= 0.95 * self.capacity


def count_params(model_cfg: ModelConfig) -> ParamCounts:
    """Count dense and routed-expert parameters by building the model on the meta device."""
    import torch

    from deepsuite.models.registry import get_model_spec
    from deepsuite.parallel.expert_parallel import expert_parallel_modules

    args = model_cfg.resolved_args
    with torch.device("meta"):
        model = get_model_spec(model_cfg.name).model_cls(args)
    moe = expert_parallel_modules(model)
    routed_prefixes = tuple(f"{name}.experts." if name else "experts." for name, _ in moe)
    dense = routed = mtp = mtp_routed = 0
    for name, p in model.named_parameters():
        is_routed = name.startswith(routed_prefixes)
        if is_routed:
            routed += p.numel()
        else:
            dense += p.numel()
        if name.startswith("mtp."):
            mtp += p.numel()
            mtp_routed += p.numel() if is_routed else 0
    n_experts = int(getattr(args, "n_routed_experts", 0)) if moe else 0
    return ParamCounts(
        dense=dense,
        routed=routed,
        n_routed_experts=n_experts,
        moe_layers=len(moe),
        shape={k: v for k, v in dataclasses.asdict(args).items() if isinstance(v, int | float | str)},
        mtp=mtp,
        mtp_routed=mtp_routed,
    )


def _optimizer_bytes_per_element(zero_stage: int, dtype: str) -> int:
    master = 4 if (dtype == "bf16" or zero_stage > 0) else 0
    return master + 8


def _state_bytes(n: float, shards: int, inp: PlanInput) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes of ``n`` elements replicated over ``shards`` ZeRO ranks."""
    w = 2 if inp.dtype == "bf16" else 4
    stage = inp.zero_stage
    params = n * w / (shards if stage >= 3 else 1)
    # DeepSpeed 0.19's stage 1 also keeps only its gradient partition when every micro-batch is a
    # gradient-accumulation boundary; with accumulation it holds the full gradients in between.
    grads = n * w / (shards if stage >= 2 or (stage == 1 and inp.grad_accum == 1) else 1)
    optim = n * _optimizer_bytes_per_element(stage, inp.dtype) / (shards if stage >= 1 else 1)
    if inp.offload_optimizer:
        optim = 0.0
    return params, grads, optim


def _held_expert_bytes(n: float, inp: PlanInput) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes of ``n`` expert elements held whole outside ZeRO-3 (see the
    module docstring)."""
    w = 2 if inp.dtype == "bf16" else 4
    return n * w, n * 4, n * (8 + (4 if inp.dtype == "bf16" else 0))


def activation_bytes(shape: dict[str, Any], family: str, inp: PlanInput) -> int:
    """Activation bytes of one micro-batch (see the module docstring for the per-layer formulas)."""
    a = 2 if inp.dtype == "bf16" else 4
    tokens = inp.micro_batch * inp.seq_len
    d = int(shape["d_model"])
    per_layer: list[int] = []  # elements per token, per block
    if family == "gpt":
        ffn = int(shape.get("d_ffn") or 4 * d)
        per_layer = [9 * d + 2 * ffn] * int(shape["n_layers"])
        vocab = int(shape["vocab_size"])
    else:
        n_h = int(shape["n_heads"])
        qk = int(shape["qk_nope_head_dim"]) + int(shape["qk_rope_head_dim"])
        v = int(shape["v_head_dim"])
        mla = 4 * d + int(shape["q_lora_rank"]) + n_h * qk + int(shape["kv_lora_rank"])
        mla += int(shape["qk_rope_head_dim"]) + n_h * (qk + 2 * v)
        dense_ffn = d + 3 * int(shape["inter_dim"])
        i_moe = int(shape["moe_inter_dim"])
        k, n_exp = int(shape["n_activated_experts"]), int(shape["n_routed_experts"])
        moe = 2 * d + 4 * n_exp + k * (2 * d + 3 * i_moe) + int(shape["n_shared_experts"]) * 3 * i_moe
        n_blocks = int(shape["n_layers"]) + int(shape.get("mtp_depth", 0))
        first_dense = int(shape["first_k_dense_replace"])
        per_layer = [mla + (dense_ffn if i < first_dense or n_exp == 0 else moe) for i in range(n_blocks)]
        vocab = int(shape["vocab_size"])
    import torch

    from deepsuite.loss.linear_cross_entropy import work_buffer_bytes

    loss_work = work_buffer_bytes(
        tokens, vocab, d, torch.bfloat16 if inp.dtype == "bf16" else torch.float32, LOSS_CHUNK_ROWS
    )
    if inp.activation_checkpointing:
        kept = len(per_layer) * d + max(per_layer)  # block inputs + one block being recomputed
    else:
        kept = sum(per_layer)
    return int(tokens * kept * a + loss_work)


def all_to_all_bytes(counts: ParamCounts, inp: PlanInput) -> int:
    """Bytes each GPU sends through the expert all-to-all per optimizer step."""
    if inp.ep_size == 1 or counts.moe_layers == 0:
        return 0
    a = 2 if inp.dtype == "bf16" else 4
    k = int(counts.shape.get("n_activated_experts", 1))
    d = int(counts.shape["d_model"])
    passes = 6 if inp.activation_checkpointing else 4  # dispatch + combine, fwd + bwd (+ recompute)
    per_layer = inp.micro_batch * inp.seq_len * k * d * a * (inp.ep_size - 1) / inp.ep_size
    return int(counts.moe_layers * inp.grad_accum * per_layer * passes)


def plan(model_cfg: ModelConfig, inp: PlanInput, counts: ParamCounts | None = None) -> MemoryPlan:
    """The per-GPU memory plan of ``model_cfg`` under ``inp``; raises `ConfigError` on a bad layout."""
    for name in ("nodes", "gpus_per_node", "micro_batch", "seq_len", "grad_accum"):
        if getattr(inp, name) < 1:
            raise ConfigError(f"{name}={getattr(inp, name)} must be >= 1")
    if not (math.isfinite(inp.gpu_mem_gb) and inp.gpu_mem_gb > 0):
        raise ConfigError(f"gpu_mem_gb={inp.gpu_mem_gb} must be a finite number > 0")
    if inp.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={inp.zero_stage} must be 0, 1, 2 or 3")
    if inp.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"training.dtype={inp.dtype!r} must be 'bf16' or 'fp32'")
    from deepsuite.parallel.groups import validate_parallel_layout

    counts = counts or count_params(model_cfg)
    validate_parallel_layout(
        inp.world, inp.zero_stage, inp.ep_size, counts.n_routed_experts if counts.moe_layers else None
    )
    edp = inp.world // inp.ep_size
    dense = _state_bytes(counts.dense, inp.world, inp)
    if inp.zero_stage == 3 and inp.ep_size > 1:
        experts = _held_expert_bytes(counts.routed / inp.ep_size, inp)
    else:
        experts = _state_bytes(counts.routed / inp.ep_size, edp, inp)
    w = 2 if inp.dtype == "bf16" else 4
    buffers = 0
    if inp.zero_stage in (1, 2):
        buffers = (inp.reduce_bucket_size + inp.allgather_bucket_size) * w
    elif inp.zero_stage == 3:
        buffers = inp.reduce_bucket_size * w
    return MemoryPlan(
        inputs=inp,
        params=int(dense[0] + experts[0]),
        grads=int(dense[1] + experts[1]),
        optimizer=int(dense[2] + experts[2]),
        activations=activation_bytes(counts.shape, model_cfg.name, inp),
        buffers=buffers,
        all_to_all_bytes_per_step=all_to_all_bytes(counts, inp),
        counts=counts,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def alternatives(model_cfg: ModelConfig, base: MemoryPlan, limit: int = 5) -> list[MemoryPlan]:
    """Nearby layouts that fit, cheapest change first (checkpointing, ZeRO, EP, micro-batch, offload, nodes)."""
    inp, counts = base.inputs, base.counts
    candidates: list[PlanInput] = []
    if not inp.activation_checkpointing:
        candidates.append(dataclasses.replace(inp, activation_checkpointing=True))
    for stage in range(inp.zero_stage + 1, 4):
        for ckpt in (inp.activation_checkpointing, True):
            candidates.append(dataclasses.replace(inp, zero_stage=stage, activation_checkpointing=ckpt))
    if counts.moe_layers:
        for ep in _divisors(math.gcd(inp.world, counts.n_routed_experts)):
            if ep > inp.ep_size:
                for ckpt in (inp.activation_checkpointing, True):
                    candidates.append(
                        dataclasses.replace(
                            inp, ep_size=ep, zero_stage=max(inp.zero_stage, 1), activation_checkpointing=ckpt
                        )
                    )
    mb = inp.micro_batch
    while mb > 1:
        mb //= 2
        candidates.append(dataclasses.replace(inp, micro_batch=mb, activation_checkpointing=True))
    candidates.append(dataclasses.replace(inp, offload_optimizer=True, activation_checkpointing=True))
    for factor in (2, 4, 8):
        candidates.append(dataclasses.replace(inp, nodes=inp.nodes * factor, activation_checkpointing=True))
        if counts.moe_layers:
            world = inp.nodes * factor * inp.gpus_per_node
            ep = max(_divisors(math.gcd(world, counts.n_routed_experts)))
            candidates.append(
                dataclasses.replace(
                    inp,
                    nodes=inp.nodes * factor,
                    ep_size=ep,
                    zero_stage=max(inp.zero_stage, 1),
                    activation_checkpointing=True,
                )
            )
    found: list[MemoryPlan] = []
    seen: set[PlanInput] = set()
    for cand in candidates:
        if cand in seen:
            continue
        seen.add(cand)
        try:
            p = plan(model_cfg, cand, counts)
        except ConfigError:
            continue
        if p.fits:
            found.append(p)
        if len(found) >= limit:
            break
    return found


MAX_NODES = 512
"""The largest cluster `smallest_layouts` tries (nodes, doubling from 1)."""


def smallest_layouts(model_cfg: ModelConfig, base: MemoryPlan) -> dict[int, MemoryPlan | None]:
    """Per ZeRO stage, the layout with the fewest GPUs (then the least memory) that fits ``base``'s
    GPUs, micro-batch, sequence length and dtype: nodes doubling from 1 to `MAX_NODES`, every EP size
    the stage allows, activation checkpointing as given or on. None: nothing fits up to `MAX_NODES`."""
    inp, counts = base.inputs, base.counts
    found: dict[int, MemoryPlan | None] = {}
    for stage in range(4):
        found[stage] = None
        nodes = 1
        while nodes <= MAX_NODES and found[stage] is None:
            world = nodes * inp.gpus_per_node
            eps = _divisors(math.gcd(world, counts.n_routed_experts)) if counts.moe_layers else [1]
            fitting = []
            for ep in eps:
                for ckpt in sorted({inp.activation_checkpointing, True}):
                    cand = dataclasses.replace(
                        inp, nodes=nodes, zero_stage=stage, ep_size=ep, activation_checkpointing=ckpt
                    )
                    try:
                        p = plan(model_cfg, cand, counts)
                    except ConfigError:
                        continue
                    if p.fits:
                        fitting.append(p)
            if fitting:
                found[stage] = min(fitting, key=lambda p: p.total)
            nodes *= 2
    return found


def format_smallest(found: dict[int, MemoryPlan | None], inp: PlanInput) -> str:
    """The per-stage lines `deepsuite plan` prints under the table."""
    lines = [
        f"smallest layout that fits, per ZeRO stage ({inp.gpu_mem_gb:g} GiB GPUs, {inp.gpus_per_node} per node, "
        f"mb={inp.micro_batch}, seq={inp.seq_len}, {inp.dtype}):"
    ]
    for stage, p in found.items():
        if p is None:
            lines.append(f"  ZeRO-{stage}: none up to {MAX_NODES}x{inp.gpus_per_node} GPUs")
        else:
            lines.append(
                f"  ZeRO-{stage}: {p.inputs.world:>5} GPUs  {_layout(p.inputs):<58} total {_gib(p.total).strip()} GiB"
            )
    return "\n".join(lines)


def _count(n: int) -> str:
    """A parameter count as 37.55B / 2.07M / 512K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def _layout(inp: PlanInput) -> str:
    parts = [
        f"{inp.nodes}x{inp.gpus_per_node} GPUs",
        f"ZeRO-{inp.zero_stage}",
        f"EP={inp.ep_size}",
        f"mb={inp.micro_batch}",
        f"seq={inp.seq_len}",
        "ckpt" if inp.activation_checkpointing else "no-ckpt",
    ]
    if inp.offload_optimizer:
        parts.append("optimizer->CPU")
    return ", ".join(parts)


def format_plan(model_name: str, p: MemoryPlan, fixes: list[MemoryPlan] | None = None) -> str:
    """The table `deepsuite plan` prints."""
    c, inp = p.counts, p.inputs
    lines = [
        f"model {model_name}: {c.main:,} parameters ({_count(c.main)}"
        + (f" without MTP; MTP modules {_count(c.mtp)} more, {_count(c.total)} in memory" if c.mtp else "")
        + ")",
        f"activated per token: {_count(c.activated)}"
        + (
            f" ({_count(c.activated - int(c.shape['vocab_size']) * int(c.shape['d_model']))} without the"
            " embedding lookup)"
            if c.n_routed_experts and not c.shape.get("tie_embeddings")
            else ""
        )
        + (
            f"; {_count(c.dense)} dense, {_count(c.routed)} in {c.n_routed_experts} routed experts "
            f"× {c.moe_layers} MoE layers"
            if c.n_routed_experts
            else ""
        ),
        f"layout: {_layout(inp)}, {inp.dtype}; dp={inp.world}, ep={inp.ep_size}, edp={inp.world // inp.ep_size}",
        "",
        f"{'per GPU':<28}{'GiB':>8}",
        f"{'parameters':<28}{_gib(p.params)}",
        f"{'gradients':<28}{_gib(p.grads)}",
        f"{'optimizer states':<28}{_gib(p.optimizer)}"
        + ("  (offloaded to CPU)" if inp.offload_optimizer else ""),
        f"{'activations (1 micro-batch)':<28}{_gib(p.activations)}",
        f"{'ZeRO comm buffers':<28}{_gib(p.buffers)}",
        f"{'total':<28}{_gib(p.total)}   of {inp.gpu_mem_gb:g} GiB -> {'FITS' if p.fits else 'DOES NOT FIT'}",
        f"{'all-to-all per step':<28}{_gib(p.all_to_all_bytes_per_step)}",
    ]
    if fixes is not None and not p.fits:
        lines.append("")
        if fixes:
            lines.append("layouts that would fit:")
            for f in fixes:
                lines.append(f"  {_layout(f.inputs):<70} total {_gib(f.total).strip()} GiB")
        else:
            lines.append("no nearby layout fits: use more nodes or GPUs with more memory")
    return "\n".join(lines)


def find_flavor(name: str) -> ModelConfig:
    """The `ModelConfig` of ``flavor`` (``deepseek-v3-671b``, ``gpt2-small`` …), ``family:flavor``, or
    ``family`` (its first flavor)."""
    if ":" in name:
        family, flavor = name.split(":", 1)
        get_family(family)
        return ModelConfig(name=family, flavor=flavor)
    if name in MODEL_FAMILIES:
        return ModelConfig(name=name, flavor=next(iter(MODEL_FAMILIES[name].flavors)))
    for entry in MODEL_FAMILIES.values():
        if name in entry.flavors:
            return ModelConfig(name=entry.name, flavor=name)
    known = sorted(f for entry in MODEL_FAMILIES.values() for f in entry.flavors)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"--model {name!r} is not a known flavor{hint} (choose one of {', '.join(known)})")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``deepsuite plan`` arguments (for cli.py)."""
    parser.add_argument(
        "--model",
        default="deepseek-v3-671b",
        help="flavor name, e.g. deepseek-v3-671b, gpt2-xl (default deepseek-v3-671b; ignored with --config)",
    )
    parser.add_argument(
        "--config", default=None, help="a run YAML: its model, parallel and training values are the defaults"
    )
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default 32; 1 with --config)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument(
        "--zero", type=int, default=None, help="ZeRO stage 0-3 (default: the config's, else 1)"
    )
    parser.add_argument(
        "--ep", type=int, default=None, help="expert-parallel size (default: the config's, else 1)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="sequences per GPU pass (default: the config's, else 1)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: the config's, else 4096)"
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=None,
        help="micro-batches accumulated per step (default: the config's, else 1)",
    )
    parser.add_argument("--act-ckpt", action="store_true", help="activation checkpointing (or the config's)")
    parser.add_argument(
        "--offload-optimizer", action="store_true", help="optimizer state on the CPU (or the config's)"
    )
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="training dtype (default: the config's, else bf16)",
    )


def check_plan_arguments(ns: argparse.Namespace) -> None:
    """Raise one `ConfigError` naming the option for a count < 1 or a GPU memory that is not a finite
    number > 0 (they would divide by zero or print a meaningless FITS)."""
    for option in ("nodes", "gpus_per_node", "ep", "micro_batch", "seq_len", "grad_accum"):
        value = getattr(ns, option, None)
        if value is not None and value < 1:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag}={value} must be >= 1; pass a positive whole number")
    if ns.zero is not None and ns.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero={ns.zero} must be a ZeRO stage: 0, 1, 2 or 3")
    if not (math.isfinite(ns.gpu_mem) and ns.gpu_mem > 0):
        raise ConfigError(f"--gpu-mem={ns.gpu_mem} must be a finite number of GiB > 0, e.g. --gpu-mem 80")


def plan_main(ns: argparse.Namespace) -> int:
    """Entry point of ``deepsuite plan``: print the table (and fixes when it does not fit); returns 0.

    Bad numeric options raise a `ConfigError` (the CLI prints one ``error:`` line, exit 2).
    """
    check_plan_arguments(ns)
    cfg = None
    if getattr(ns, "config", None):
        from deepsuite.config.loader import load_config

        cfg = load_config(ns.config)
    model_cfg = cfg.model if cfg is not None else find_flavor(ns.model)
    par, tr = (cfg.parallel, cfg.training) if cfg is not None else (None, None)

    def pick(value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    inp = PlanInput(
        nodes=pick(ns.nodes, 32 if cfg is None else 1),
        gpus_per_node=ns.gpus_per_node,
        gpu_mem_gb=ns.gpu_mem,
        zero_stage=pick(ns.zero, par.zero_stage if par else 1),
        ep_size=pick(ns.ep, par.ep_size if par else 1),
        micro_batch=pick(ns.micro_batch, tr.micro_batch_size if tr else 1),
        seq_len=pick(ns.seq_len, tr.seq_len if tr else 4096),
        activation_checkpointing=bool(ns.act_ckpt or (par and par.activation_checkpointing)),
        dtype=pick(ns.dtype, tr.dtype if tr else "bf16"),
        grad_accum=pick(ns.grad_accum, _config_grad_accum(tr, ns, par) if tr else 1),
        offload_optimizer=bool(ns.offload_optimizer or (par and par.offload_optimizer)),
    )
    p = plan(model_cfg, inp)
    print(format_plan(model_cfg.flavor, p, alternatives(model_cfg, p)))
    print()
    print(format_smallest(smallest_layouts(model_cfg, p), inp))
    return 0


def _config_grad_accum(tr: Any, ns: argparse.Namespace, par: Any) -> int:
    """The config's accumulation steps: explicit, or derived as global / (micro × world) for the
    planned world (`--nodes` × `--gpus-per-node`, one data-parallel replica per GPU)."""
    if tr.gradient_accumulation_steps:
        return int(tr.gradient_accumulation_steps)
    world = (ns.nodes or 1) * ns.gpus_per_node
    micro = ns.micro_batch or tr.micro_batch_size
    return max(1, tr.global_batch_size // max(1, micro * world))


def main(argv: list[str] | None = None) -> int:
    """``python -m deepsuite.parallel.plan`` (same arguments as ``deepsuite plan``)."""
    parser = argparse.ArgumentParser(prog="deepsuite plan", description=__doc__.split("\n")[0])
    add_plan_arguments(parser)
    return plan_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
