"""Safetensors model folders: HF (config.json + model.safetensors or a sharded index) and deepsuite's
native folder (model.yaml + model.safetensors with deepsuite key names).

Writes are atomic: everything goes into a temporary folder next to the target, which is renamed into
place only when complete (files and folders fsynced, their modes set from the umask as ``open`` and
``mkdir`` would), so a crash never leaves a half-written folder. A tokenizer passed to the writers
(the run's, when exporting a training checkpoint) goes into the same folder, and last a
``manifest.json`` with the size and digest of every file (`deepsuite.checkpoint.checksums`).
Readers check a folder against its manifest before they read it (``verify=False`` skips that; a
folder without one, e.g. from the Hugging Face hub, is read unverified). Only safetensors are read;
pickled ``pytorch_model.bin`` files are refused (unpickling runs arbitrary code). Whatever is wrong
with a folder being read (a file that does not match its checksum, truncated or corrupt files, bad
JSON/YAML, dangling aliases) raises `CheckpointFormatError` naming the file.

safetensors refuses tensors that share storage, so aliases (tied weights) are written once and the
alias map is stored in the file metadata (``deepsuite.aliases``); readers restore the aliases.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from deepsuite.checkpoint.atomic import atomic_dir, checkpoint_file
from deepsuite.checkpoint.checksums import check_folder, hash_folder, warn_unverified, write_manifest
from deepsuite.config.loader import build_dataclass
from deepsuite.data.tokenizer import export_hf_tokenizer, store_tokenizer
from deepsuite.models.registry import get_model_spec, model_family, unwrap_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
MODEL_YAML = "model.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
"""Names of the tokenizer file a deepsuite folder or training checkpoint may hold."""
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_ALIASES_KEY = "deepsuite.aliases"
_T = TypeVar("_T")


class CheckpointFormatError(ValueError):
    """A model folder is missing, unsafe or inconsistent; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------- writing


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def dedupe_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop exact aliases (tied weights; the first key in order is kept) and copy partial overlaps.

    Returns the tensors to write (detached, contiguous, on CPU) and ``{dropped_key: kept_key}``.
    """
    kept: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        skey = _storage_key(t)
        if skey in kept:
            aliases[key] = kept[skey]
            continue
        kept[skey] = key
        storage = (t.device, t.untyped_storage().data_ptr())
        shared = (
            storage in storages
            or not t.is_contiguous()
            or t.numel() != t.untyped_storage().nbytes() // t.element_size()
        )
        storages.add(storage)
        t = t.to("cpu")
        out[key] = t.clone().contiguous() if shared else t.contiguous()
    return out, aliases


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def write_safetensors(
    folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` into ``folder`` as ``model.safetensors`` or, above ``max_shard_bytes``, as
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. Returns the
    file names written."""
    to_write, aliases = dedupe_tensors(tensors)
    metadata = {"format": "pt"}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases)
    shards = _shards(to_write, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in to_write.values())
    index = {"metadata": {"total_size": total, _ALIASES_KEY: json.dumps(aliases)}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


def write_hf_folder(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Atomically write an HF model folder: ``config.json`` + safetensors (sharded above ``max_shard_bytes``).

    With ``tokenizer`` (a SentencePiece model, deepsuite's bundle of an HF tokenizer or an HF
    tokenizer), the folder also gets it as transformers reads it (``tokenizer.json`` or
    ``tokenizer.model``, plus ``tokenizer_config.json``) and ``config.json`` its special ids.
    """
    with atomic_dir(path, overwrite=overwrite) as tmp:
        if tokenizer is not None:
            config = {**config, **export_hf_tokenizer(tokenizer, tmp)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp, tensors, max_shard_bytes)
        write_manifest(tmp, hash_folder(tmp))  # just written: hashed from the page cache
    return Path(path)


def folder_tokenizer(folder: str | os.PathLike[str]) -> Path | None:
    """The tokenizer file a deepsuite folder holds (``tokenizer.json`` or ``tokenizer.model``), or None."""
    return next((Path(folder) / n for n in TOKENIZER_FILES if checkpoint_file(Path(folder) / n)), None)


# ----------------------------------------------------------------------------------------- reading


def verify_folder(folder: Path, verify: bool = True) -> None:
    """Check a model folder against its manifest.json (see `deepsuite.checkpoint.checksums`); a
    damaged file raises `CheckpointFormatError` naming it. A deepsuite folder (model.yaml) without a
    manifest was written by an older deepsuite: one warning line; an HF folder without one is
    usually not deepsuite's: read as it is."""
    if not verify:
        return
    verdict = check_folder(folder)
    if verdict.file is not None:
        raise CheckpointFormatError(
            f"{folder / verdict.file} is corrupt: it {verdict.problem}; export or copy the folder again (if the "
            "change was on purpose, delete its manifest.json, or pass --no-verify / checkpoint.verify=false)"
        )
    if not verdict.verified and (folder / MODEL_YAML).is_file():
        warn_unverified(folder)


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(pickles)})" if pickles else ""
    raise CheckpointFormatError(
        f"{folder} has no model.safetensors or model.safetensors.index.json{hint}. deepsuite reads "
        "safetensors only and never unpickles .bin files; convert them first, e.g. with transformers: "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; unreadable JSON raises `CheckpointFormatError` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(
            f"{path} is not valid JSON ({_one_line(exc)}); copy or download it again"
        ) from None
    check_finite_json(value, path)
    return value


def non_finite_number(value: Any, key: str = "") -> tuple[str, float] | None:
    """``(key path, number)`` of the first number in a parsed JSON value that is not finite, or
    None. Python's json reads ``Infinity``, ``-Infinity``, ``NaN`` (and ``1e999`` as infinity),
    which JSON itself does not allow."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, dict):
        items = [(f"{key}.{k}" if key else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    return next((found for k, v in items if (found := non_finite_number(v, k)) is not None), None)


def check_finite_json(value: Any, path: Path) -> None:
    """Refuse a non-finite number in ``value``, read from the JSON file ``path``, naming its key."""
    found = non_finite_number(value)
    if found is not None:
        key, number = found
        raise CheckpointFormatError(
            f"{path}: {key or 'its value'} is {json.dumps(number)}, which JSON does not allow; write the "
            "model's real value there (the model's original config.json has it)"
        )


def _read_file(path: Path, out: dict[str, torch.Tensor]) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[key] = f.get_tensor(key)
            return f.metadata() or {}
    except SafetensorError as exc:
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file ({_one_line(exc)}); it is probably truncated or "
            "partly copied: copy or download it again"
        ) from None


def _aliases_of(meta: dict[str, str], path: Path) -> dict[str, str]:
    """The ``{alias: stored name}`` map in a safetensors file's metadata (empty when there is none)."""
    raw = meta.get(_ALIASES_KEY)
    if raw is None:
        return {}
    try:
        aliases = json.loads(raw)
    except json.JSONDecodeError:
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointFormatError(
            f"{path}: its {_ALIASES_KEY} metadata is not a JSON object of tensor names; the file is "
            "damaged or was edited: write it again from the model"
        )
    return aliases


def restore_aliases(tensors: dict[str, _T], aliases: dict[str, str], source: str | os.PathLike[str]) -> None:
    """Add to ``tensors`` each alias of ``aliases`` (``{alias: stored name}``, the ``deepsuite.aliases``
    metadata) as the entry of its stored name, in place; an alias whose stored name is not among
    ``tensors`` raises `CheckpointFormatError` naming ``source``."""
    dangling = {alias: name for alias, name in aliases.items() if name not in tensors}
    if dangling:
        alias, name = next(iter(dangling.items()))
        more = f" (and {len(dangling) - 1} more such aliases)" if len(dangling) > 1 else ""
        raise CheckpointFormatError(
            f"{source}: its {_ALIASES_KEY} metadata makes {alias!r} an alias of {name!r}, which is not "
            f"stored{more}; the folder is incomplete or was edited: write it again from the model"
        )
    for alias, name in aliases.items():
        tensors.setdefault(alias, tensors[name])


def read_safetensors(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of ``folder`` (``model.safetensors`` or a sharded index), aliases restored.

    A truncated or corrupt file, a bad index or an alias of a tensor that is not stored raises
    `CheckpointFormatError` naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointFormatError(f"{folder} is not a folder")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    if checkpoint_file(folder / SINGLE_FILE):
        meta = _read_file(folder / SINGLE_FILE, tensors)
        aliases = _aliases_of(meta, folder / SINGLE_FILE)
    elif checkpoint_file(folder / INDEX_FILE):
        index = _read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFormatError(
                f"{folder / INDEX_FILE} has no 'weight_map' object (tensor name -> shard file); "
                "copy or download it again"
            )
        for name in sorted(set(weight_map.values())):
            shard = folder / name
            if Path(name).name != name or not checkpoint_file(shard):
                raise CheckpointFormatError(f"{folder / INDEX_FILE} names shard {name!r}, which is missing")
            meta = _read_file(shard, tensors)
            aliases.update(_aliases_of(meta, shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointFormatError(f"shards of {folder} lack tensors listed in the index: {missing[:5]}")
    else:
        _refuse_pickles(folder)
    restore_aliases(tensors, aliases, folder / SINGLE_FILE if (folder / SINGLE_FILE).is_file() else folder)
    return tensors


def read_hf_folder(
    path: str | os.PathLike[str], verify: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json as a dict, tensors)`` of an HF model folder, checked against its manifest
    first (``verify``); a missing, damaged or corrupt config.json or safetensors file raises
    `CheckpointFormatError`."""
    folder = Path(path)
    if not checkpoint_file(folder / CONFIG_FILE):
        raise CheckpointFormatError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    verify_folder(folder, verify)
    config = _read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{folder / CONFIG_FILE} must hold a JSON object (the model's config)")
    return config, read_safetensors(folder)


# ------------------------------------------------------------------------ loading into a model


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """``model.load_state_dict(state_dict)`` with one error naming missing and unexpected keys.

    A key of a tied parameter (one Parameter under several names, e.g. ``lm_head.weight`` and
    ``wte.weight``) may be absent when another name of the same parameter is present.
    """
    state_dict = dict(state_dict)
    names_of: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(value), []).append(key)
    for names in names_of.values():
        present = [k for k in names if k in state_dict]
        if present:
            for key in names:
                state_dict.setdefault(key, state_dict[present[0]])
    expected = set(model.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        raise CheckpointFormatError(
            f"{source} does not match {type(model).__name__}: keys " + "; ".join(parts)
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointFormatError(f"{source} does not match {type(model).__name__}: {exc}") from None


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> nn.Module:
    """Move a meta-built model to ``device`` (initialising every parameter and buffer), cast to ``dtype``."""
    model = model.to_empty(device=device)
    model.init_weights()  # type: ignore[operator]  # also fills non-persistent buffers (RoPE caches, ...)
    if dtype is not None:
        model = model.to(dtype)
    return model


# ------------------------------------------------------------------- deepsuite-native folder


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` as a deepsuite folder: ``model.yaml`` ({name, args}) + safetensors with
    deepsuite key names (tied weights stored once), and its tokenizer when there is one.

    ``tokenizer`` (a tokenizer file, e.g. `checkpoint.manager.checkpoint_tokenizer` of the source
    checkpoint; None: no tokenizer) is stored as deepsuite keeps it: ``tokenizer.model`` or ``tokenizer.json`` (a bundle; an HF tokenizer is bundled).
    """
    model = unwrap_model(model)
    name = model_family(model)
    args = model.args
    spec = {"name": name, "args": dataclasses.asdict(args)}  # type: ignore[call-overload]
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / MODEL_YAML).write_text(yaml.safe_dump(spec, sort_keys=False))
        write_safetensors(tmp, model.state_dict(), max_shard_bytes)
        if tokenizer is not None:
            store_tokenizer(tokenizer, tmp)
        write_manifest(tmp, hash_folder(tmp))  # just written: hashed from the page cache
    return Path(path)


def load_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> nn.Module:
    """Build the model described by ``model.yaml`` in ``path`` and load its safetensors strictly.

    The model is returned in eval mode (dropout off), as transformers' ``from_pretrained`` does; call
    ``model.train()`` to train it. The folder is checked against its manifest first (``verify``); a
    missing, damaged or corrupt ``model.yaml`` or safetensors file raises `CheckpointFormatError`
    naming the file.
    """
    folder = Path(path)
    if not checkpoint_file(folder / MODEL_YAML):
        raise CheckpointFormatError(
            f"{folder} has no {MODEL_YAML}; for a Hugging Face folder use deepsuite.models.load_hf"
        )
    verify_folder(folder, verify)
    try:
        spec_data = yaml.safe_load((folder / MODEL_YAML).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(
            f"{folder / MODEL_YAML} is not valid YAML ({_one_line(exc)}); fix it or write the folder again"
        ) from None
    if not isinstance(spec_data, dict) or "name" not in spec_data:
        raise CheckpointFormatError(f"{folder / MODEL_YAML} must be a mapping with 'name' and 'args'")
    model_args = spec_data.get("args") or {}
    if not isinstance(model_args, dict):
        raise CheckpointFormatError(f"{folder / MODEL_YAML}: 'args' must be a mapping of model settings")
    spec = get_model_spec(str(spec_data["name"]))
    args = build_dataclass(spec.args_cls, dict(model_args), "model")
    args.validate()
    with torch.device("meta"):
        model = spec.model_cls(args)
    model = materialize(model, device, dtype)
    load_state_dict_strict(model, read_safetensors(folder), source=str(folder))
    return model.eval()
