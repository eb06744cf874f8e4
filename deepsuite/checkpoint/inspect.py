"""What a checkpoint holds, read without building the model on real memory: `deepsuite inspect`.

Three kinds of folders are understood:

* a training checkpoint (a run folder through its ``latest`` pointer, or a ``step_N`` folder):
  state.json, config.yaml and DeepSpeed's files (any ZeRO stage, expert-parallel shards);
* a deepsuite model folder: ``model.yaml`` + safetensors with deepsuite key names;
* a Hugging Face folder: ``config.json`` + safetensors.

Tensor shapes and dtypes come from safetensors headers (parsed here, no tensor data read) or from
DeepSpeed's model-states file opened with torch's weights-only unpickler on a memory map; the
parameter count is the number of elements of the stored tensors that are parameters of the model
the config describes (built on the meta device), tied weights counted once — so it equals
``sum(p.numel() for p in model.parameters())`` of the loaded model. Every file is first checked
against the folder's manifest.json (size and digest; ``verify=False`` skips that, and then only the
headers are read for a model folder). Any inconsistency (a file that does not match its checksum, a
missing, truncated or unreadable file, a tensor the config does not expect) raises `CheckpointError`
with one line naming the file and the problem: a damaged checkpoint is never reported healthy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from deepsuite.checkpoint.atomic import checkpoint_file
from deepsuite.checkpoint.checksums import MANIFEST_FILE, Verdict, check_folder, warn_unverified
from deepsuite.checkpoint.consolidate import stacked_parameters
from deepsuite.checkpoint.hf_io import (
    CONFIG_FILE,
    INDEX_FILE,
    MODEL_YAML,
    SINGLE_FILE,
    check_finite_json,
    restore_aliases,
)
from deepsuite.checkpoint.manager import (
    DS_TAG,
    STATE_FILE,
    CheckpointError,
    find_checkpoint,
    load_config_of,
    verify_checkpoint,
)
from deepsuite.config.loader import build_dataclass
from deepsuite.models.registry import family_for_hf_model_type, get_model_spec
from deepsuite.parallel.deepspeed import safe_globals

KIND_TRAINING = "training"
KIND_DEEPSUITE = "deepsuite"
KIND_HF = "hf"
_ALIASES_KEY = "deepsuite.aliases"  # written by hf_io.write_safetensors
_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit

# safetensors dtype codes -> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rank_(\d+)\.")  # not mp_rank_NN (model parallel)
_EXPERT_SHARD = re.compile(r"expert_shard_ep(\d+)_of(\d+)\.pt$")

# name -> (shape, dtype name)
TensorInfo = tuple[tuple[int, ...], str]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({name: (shape, dtype)}, metadata)`` of one safetensors file, checked against its size.

    Only the header is read; a file whose tensor data is shorter or longer than its header says
    (e.g. truncated by an interrupted copy) raises `CheckpointError`.
    """
    checkpoint_file(path)  # a named pipe would block the open below
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is corrupt: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is corrupt: its safetensors header claims {n} bytes but the file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a mapping")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
        if stop - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} has the wrong byte range")
        tensors[name] = (shape, _dtype_name(dtype))
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is corrupt: it has {size} bytes, its safetensors header describes {8 + n + end} "
            "(truncated or partly copied?)"
        )
    return tensors, metadata


def _safetensors_folder(folder: Path) -> tuple[dict[str, TensorInfo], list[str], dict[str, str]]:
    """(tensors with aliases restored, file names, aliases) of a model folder's safetensors."""
    tensors: dict[str, TensorInfo] = {}
    aliases: dict[str, str] = {}
    if checkpoint_file(folder / SINGLE_FILE):
        files = [SINGLE_FILE]
    elif checkpoint_file(folder / INDEX_FILE):
        try:
            index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
            weight_map: dict[str, str] = dict(index["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / INDEX_FILE} is corrupt ({exc})") from None
        shards = sorted(set(weight_map.values()))
        for name in shards:
            if Path(name).name != name or not checkpoint_file(folder / name):
                raise CheckpointError(f"{folder / INDEX_FILE} names shard {name!r}, which is missing")
        files = [*shards, INDEX_FILE]
    else:
        raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")
    for name in files:
        if name == INDEX_FILE:
            continue
        found, meta = read_safetensors_header(folder / name)
        tensors.update(found)
        try:
            aliases.update(json.loads(meta.get(_ALIASES_KEY, "{}")))
        except json.JSONDecodeError:
            raise CheckpointError(f"{folder / name} is corrupt: bad {_ALIASES_KEY} metadata") from None
    if INDEX_FILE in files:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"shards of {folder} lack tensors listed in the index: {missing[:5]}")
    restore_aliases(tensors, aliases, folder)
    return tensors, files, aliases


# ------------------------------------------------------------------------------ parameter count


def _meta_model(family: str, args: Any) -> torch.nn.Module:
    with torch.device("meta"):
        return get_model_spec(family).model_cls(args)


def _count_parameters(model: torch.nn.Module, tensors: dict[str, TensorInfo], source: str) -> dict[str, Any]:
    """Parameters of ``model`` found in ``tensors`` (shapes checked; tied weights once), by dtype."""
    groups: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        params[id(p)] = p
    expected = set(model.state_dict())
    problems: list[str] = []
    total = 0
    by_dtype: dict[str, int] = {}
    for pid, names in groups.items():
        present = [n for n in names if n in tensors]
        if not present:
            problems.append(f"missing {names[0]}")
            continue
        shape, dtype = tensors[present[0]]
        want = tuple(params[pid].shape)
        if shape != want:
            problems.append(f"{present[0]} has shape {list(shape)}, the config gives {list(want)}")
            continue
        total += math.prod(shape)
        by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(shape)
    unexpected = sorted(set(tensors) - expected)
    missing_buffers = sorted(
        k for k in expected - set(tensors) if not any(k in names for names in groups.values())
    )
    problems += [f"unexpected {k}" for k in unexpected[:3]] + [f"missing {k}" for k in missing_buffers[:3]]
    if problems:
        raise CheckpointError(
            f"{source} does not match the model its config describes: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    return {"total": total, "by_dtype": dict(sorted(by_dtype.items()))}


def _flavor_of(family: str, args: Any) -> str | None:
    """The named flavor whose fields equal ``args`` exactly, if any."""
    fields = dataclasses.asdict(args)
    for name, flavor in get_model_spec(family).flavors.items():
        if dataclasses.asdict(flavor) == fields:
            return str(name)
    return None


def _files(root: Path, names: list[str]) -> list[dict[str, Any]]:
    return [{"path": n, "bytes": (root / n).stat().st_size} for n in names]


# ----------------------------------------------------------------------------------- the kinds


def _checksum_line(verdict: Verdict | None) -> str:
    if verdict is None:
        return "checksums not verified (--no-verify)"
    if not verdict.verified:
        return f"checksums not verified (no {MANIFEST_FILE})"
    return f"every file matches its size and checksum in {MANIFEST_FILE}"


def _verified_model_folder(folder: Path, kind: str, verify: bool) -> Verdict | None:
    if not verify:
        return None
    verdict = check_folder(folder)
    if verdict.file is not None:
        raise CheckpointError(
            f"{folder / verdict.file} is corrupt: it {verdict.problem}; export or copy the folder again (if "
            "the change was on purpose, delete its manifest.json, or pass --no-verify)"
        )
    if not verdict.verified and kind == KIND_DEEPSUITE:
        warn_unverified(folder)
    return verdict


def _inspect_model_folder(folder: Path, kind: str, verify: bool = True) -> dict[str, Any]:
    verdict = _verified_model_folder(folder, kind, verify)
    tensors, files, aliases = _safetensors_folder(folder)
    extra: dict[str, Any] = {}
    if kind == KIND_DEEPSUITE:
        try:
            spec_data = yaml.safe_load((folder / MODEL_YAML).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{folder / MODEL_YAML} is corrupt ({' '.join(str(exc).split())})"
            ) from None
        if not isinstance(spec_data, dict) or "name" not in spec_data:
            raise CheckpointError(f"{folder / MODEL_YAML} must be a mapping with 'name' and 'args'")
        spec = get_model_spec(str(spec_data["name"]))
        args = build_dataclass(spec.args_cls, dict(spec_data.get("args") or {}), "model")
        args.validate()
        named = tensors
        meta_files = [MODEL_YAML]
    else:
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{folder / CONFIG_FILE} is corrupt ({exc})") from None
        check_finite_json(config, folder / CONFIG_FILE)
        if not isinstance(config, dict) or "model_type" not in config:
            raise CheckpointError(f"{folder / CONFIG_FILE} has no model_type; is it a Hugging Face folder?")
        spec = family_for_hf_model_type(str(config["model_type"]))
        adapter = spec.adapter()
        args = adapter.config_from_hf(config)
        # the family's own name mapping, run on shape-only (meta) tensors: no data is read
        meta = {
            k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for k, (shape, dtype) in tensors.items()
        }
        try:
            converted = adapter.state_dict_from_hf(meta, args)  # may lower args.mtp_depth to what is stored
        except KeyError as exc:
            raise CheckpointError(f"{folder} does not match {spec.name}: {exc.args[0]}") from None
        named = {k: (tuple(t.shape), _dtype_name(t.dtype)) for k, t in converted.items()}
        meta_files = [CONFIG_FILE]
        extra = {
            "hf": {
                "model_type": config["model_type"],
                "architectures": config.get("architectures", []),
                "dtype": config.get("dtype", config.get("torch_dtype")),
            }
        }
    parameters = _count_parameters(_meta_model(spec.name, args), named, str(folder))
    stored_dtypes = sorted({d for _, d in tensors.values()})
    file_list = _files(folder, [*meta_files, *files])
    return {
        "path": str(folder),
        "kind": kind,
        "model": {
            "family": spec.name,
            "flavor": _flavor_of(spec.name, args),
            "config": dataclasses.asdict(args),
        },
        **extra,
        "step": None,
        "tokens_seen": None,
        "parameters": parameters,
        "dtypes": stored_dtypes,
        "layout": {
            "files": file_list,
            "total_bytes": sum(f["bytes"] for f in file_list),
            "tensors": len(tensors),
            "tied": aliases,
        },
        "integrity": {
            "ok": True,
            "checks": [
                _checksum_line(verdict),
                f"{len(files)} file(s) present; every safetensors header parses and matches its file size",
                "every tensor is one the config expects, with the expected shape (none missing)",
            ],
        },
    }


def _load_weights_only(path: Path) -> Any:
    checkpoint_file(path)
    with safe_globals():  # memory-mapped: only the tensors touched are read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _training_tensors(tag_dir: Path) -> tuple[dict[str, TensorInfo], int]:
    """{name: (full shape, dtype)} of the model's stored parameters and buffers; the EP size."""
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("*_model_states.pt"))
    if not states:
        raise CheckpointError(f"checkpoint {tag_dir.parent} has no DeepSpeed model states file in {tag_dir}")
    ms = _load_weights_only(states[0])
    tensors: dict[str, TensorInfo] = {
        k: (tuple(v.shape), _dtype_name(v.dtype))
        for k, v in ms["module"].items()
        if isinstance(v, torch.Tensor)
    }

    def dtype_of(name: str) -> str:
        return tensors[name][1] if name in tensors else "float32"

    # ZeRO-1/2/3 record full shapes here (ZeRO-3's module entries are empty partitions)
    for group in ms.get("param_shapes") or []:
        for name, shape in group.items():
            tensors[name] = (tuple(shape), dtype_of(name))
    for name, shape in (ms.get("frozen_param_shapes") or {}).items():
        tensors[name] = (tuple(shape), dtype_of(name))
    for alias, target in (ms.get("shared_params") or {}).items():
        if target in tensors:
            tensors[alias] = tensors[target]
    # parameters a module saves stacked are known to the optimizer (param_shapes) one by one
    for stacked_name, parts in stacked_parameters(ms["module"]).items():
        if parts[0] in tensors:
            shape, _ = tensors[parts[0]]
            for part in parts:
                del tensors[part]
            tensors[stacked_name] = ((len(parts), *shape), dtype_of(stacked_name))
    # expert parallel: each EP rank's [E/ep, …] experts sit in its own shard file
    shards = sorted(tag_dir.glob("expert_shard_ep*_of*.pt"))
    ep_size = 1
    if shards:
        stacked: dict[str, list[tuple[int, ...]]] = {}
        for f in shards:
            m = _EXPERT_SHARD.search(f.name)
            ep_size = int(m.group(2)) if m else ep_size
            for name, t in _load_weights_only(f)["tensors"].items():
                stacked.setdefault(name, []).append(tuple(t.shape))
        for name, shapes in stacked.items():
            first = shapes[0]
            tensors[name] = ((sum(s[0] for s in shapes), *first[1:]), dtype_of(name))
    return tensors, ep_size


def _inspect_training(step_dir: Path, verify: bool = True) -> dict[str, Any]:
    # checksums (manifest.json), state.json sizes, every DeepSpeed file loads weights-only
    state = verify_checkpoint(step_dir, checksums=verify)
    has_manifest = (step_dir / MANIFEST_FILE).is_file()
    cfg = load_config_of(step_dir)
    tensors, ep_size = _training_tensors(step_dir / DS_TAG)
    args = cfg.model.resolved_args
    parameters = _count_parameters(_meta_model(cfg.model.name, args), tensors, str(step_dir))
    names = sorted([*state["files"], STATE_FILE, *([MANIFEST_FILE] if has_manifest else [])])
    ranks: dict[str, list[str]] = {}
    ep_ranks: dict[str, list[str]] = {}
    shared: list[str] = []
    for rel in names:
        base = rel.rsplit("/", 1)[-1]
        if m := _EXPERT_SHARD.search(base):
            ep_ranks.setdefault(str(int(m.group(1))), []).append(rel)
        elif m := _RANK_FILE.search(base):
            ranks.setdefault(str(int(m.group(1) or m.group(2))), []).append(rel)
        else:
            shared.append(rel)
    file_list = _files(step_dir, names)
    return {
        "path": str(step_dir),
        "kind": KIND_TRAINING,
        "model": {
            "family": cfg.model.name,
            "flavor": cfg.model.flavor,
            "overrides": dict(cfg.model.args),
            "config": dataclasses.asdict(args),
        },
        "step": int(state["step"]),
        "tokens_seen": int(state["tokens_seen"]),
        "parameters": parameters,
        "dtypes": sorted({dtype for _, dtype in tensors.values()}),
        "layout": {
            "files": file_list,
            "total_bytes": sum(f["bytes"] for f in file_list),
            "zero_stage": int(state["zero_stage"]),
            "world_size": int(state["world_size"]),
            "ep_size": ep_size,
            "training_dtype": cfg.training.dtype,
            "per_rank": dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))),
            "per_ep_rank": dict(sorted(ep_ranks.items(), key=lambda kv: int(kv[0]))),
            "shared": shared,
        },
        "integrity": {
            "ok": True,
            "checks": [
                _checksum_line(Verdict(has_manifest) if verify else None),
                f"{len(state['files'])} files of state.json present with their recorded sizes",
                "every DeepSpeed file loads with the weights-only unpickler",
                "the stored parameters are the ones the run config describes, with their shapes",
            ],
        },
    }


def inspect_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Describe the checkpoint or model folder at ``path`` and check its integrity.

    ``path`` is a training checkpoint (a run folder, through ``latest``, or a ``step_N`` folder), a
    deepsuite model folder (``model.yaml`` + safetensors) or a Hugging Face folder (``config.json`` +
    safetensors). Returns a JSON-serialisable dict with ``path``, ``kind`` (``training``,
    ``deepsuite`` or ``hf``), ``model`` (``family``, ``flavor`` — None when the sizes match no named
    flavor —, resolved ``config``), ``step`` and ``tokens_seen`` (training checkpoints, else None),
    ``parameters`` (``total`` and ``by_dtype``: elements of the stored parameters, tied weights
    once), ``dtypes`` (of the stored model tensors), ``layout`` (``files`` with their ``bytes``,
    ``total_bytes``; for training checkpoints also ``zero_stage``, ``world_size``, ``ep_size`` and
    the files of each rank) and ``integrity`` (the checks that passed).

    Raises `CheckpointError` (one line naming the file and the problem) when the folder is missing,
    incomplete or corrupt: a file that does not match its size and checksum in manifest.json (not
    checked with ``verify=False``), a file of state.json missing or of the wrong size, a DeepSpeed
    file that does not load with the weights-only unpickler, a safetensors header that does not
    parse or does not match its file size, or stored tensors that do not fit the config.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p} does not exist; give a run folder, a step_N folder, a deepsuite model folder or an HF folder"
        )
    if checkpoint_file(p / MODEL_YAML):
        return _inspect_model_folder(p, KIND_DEEPSUITE, verify)
    if checkpoint_file(p / CONFIG_FILE):
        return _inspect_model_folder(p, KIND_HF, verify)
    try:
        step_dir = find_checkpoint(p)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; nor is it a model folder (no {MODEL_YAML} or {CONFIG_FILE})") from None
    return _inspect_training(step_dir, verify)


# --------------------------------------------------------------------------------- text report


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table `deepsuite inspect` prints for an `inspect_checkpoint` result."""
    kinds = {
        KIND_TRAINING: "training checkpoint",
        KIND_DEEPSUITE: "deepsuite model folder",
        KIND_HF: "HF folder",
    }
    model = report["model"]
    layout = report["layout"]
    params = report["parameters"]
    rows: list[tuple[str, str]] = [
        ("path", report["path"]),
        ("kind", kinds[report["kind"]]),
        ("model", f"{model['family']}, flavor {model['flavor'] or 'custom (matches no named flavor)'}"),
    ]
    if model.get("overrides"):
        rows.append(("overrides", ", ".join(f"{k}={v}" for k, v in model["overrides"].items())))
    if "hf" in report:
        hf = report["hf"]
        rows.append(("hf", f"model_type {hf['model_type']}, {', '.join(hf['architectures']) or '-'}"))
    if report["step"] is not None:
        rows.append(("step", str(report["step"])))
        tokens = report["tokens_seen"]
        rows.append(("tokens seen", f"{tokens:,}" + (f" ({_human(tokens)})" if tokens >= 1000 else "")))
    per_dtype = ", ".join(f"{d} {n:,}" for d, n in params["by_dtype"].items())
    rows.append(("parameters", f"{params['total']:,} ({_human(params['total'])}); {per_dtype}"))
    rows.append(("dtypes", ", ".join(report["dtypes"])))
    if report["kind"] == KIND_TRAINING:
        rows.append(
            (
                "layout",
                f"ZeRO-{layout['zero_stage']}, world size {layout['world_size']}, ep size {layout['ep_size']}, "
                f"training dtype {layout['training_dtype']}",
            )
        )
    rows.append(("files", f"{len(layout['files'])} files, {_bytes(layout['total_bytes'])}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    name_width = max(len(f["path"]) for f in layout["files"])
    lines += [f"  {f['path']:<{name_width}}  {_bytes(f['bytes']):>10}" for f in layout["files"]]
    for title, key in (("rank", "per_rank"), ("ep rank", "per_ep_rank")):
        for rank, files in layout.get(key, {}).items():
            lines.append(f"{title + ' ' + rank:<{width}}  {', '.join(files)}")
    lines.append(f"{'integrity':<{width}}  ok: " + "; ".join(report["integrity"]["checks"]))
    cfg = ", ".join(f"{k}={v}" for k, v in model["config"].items())
    lines.append(f"{'config':<{width}}  {cfg}")
    return "\n".join(lines)
