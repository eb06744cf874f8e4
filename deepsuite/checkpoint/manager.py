"""Training checkpoints: DeepSpeed's engine state plus deepsuite's own, written so a kill at any
moment leaves the previous checkpoint loadable.

Layout of `checkpoint.dir`::

    latest                  # "step_N": the newest complete checkpoint (replaced atomically, last)
    step_N/
      deepspeed/…           # engine.save_checkpoint (model, optimizer, LR scheduler; ZeRO shards)
      rng/rank_00000.json   # every RNG of each rank
      config.yaml           # the resolved run config
      tokenizer.model       # copy of the tokenizer (tokenizer.json for a Hugging Face one): self-contained
      state.json            # step, sampler position, tokens seen, model config, the size (path →
                            # bytes) of every other file and, under ZeRO-0, the parameter names of
                            # each optimizer group (`optimizer_param_names`)
      manifest.json         # written last: size and xxh3-64 digest of every file, state.json
                            # included, and the digest of the manifest itself (`checkpoint.checksums`)

Save sequence: everything goes to `tmp-step_N/`; each rank hashes the files it wrote right after
writing them (DeepSpeed's per-rank files through its checkpoint engine, expert shards, its RNG
state) and rank 0 gathers the digests; rank 0 writes state.json and the manifest, fsynced; the
folder is renamed to `step_N/`; then `latest` is replaced (write + fsync + `os.replace`); only then
are old checkpoints beyond `keep_last` deleted.

Loading verifies before it trusts: every file against the manifest (`verify_checkpoint`; a damaged
checkpoint is refused naming the file and the newest intact checkpoint of the run; one without a
manifest, from an older deepsuite, loads with a warning), then every DeepSpeed file is read with
torch's weights-only unpickler (tensors, containers and a short allowlist of DeepSpeed classes), and
the engine's own reads are routed through it too.

The weights of a checkpoint, consolidated over its ranks, come from `deepsuite.checkpoint.consolidate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from deepsuite.checkpoint.atomic import (
    checkpoint_file,
    deferred_write_failures,
    fsync_dir,
    fsync_file,
    reason,
    refuse_special_files,
    remove_interrupted_saves,
    write_durable,
    write_failure,
    write_fix,
)
from deepsuite.checkpoint.checksums import (
    Entry,
    check_folder,
    hash_file,
    hash_folder,
    warn_unverified,
    write_manifest,
)
from deepsuite.checkpoint.rng import capture_rng_state, restore_rng_state
from deepsuite.config.loader import config_from_dict, config_to_dict, read_yaml
from deepsuite.config.schema import Config
from deepsuite.data.errors import DataError
from deepsuite.parallel.deepspeed import make_checkpoint_loading_safe, safe_torch_load
from deepsuite.parallel.dist import all_gather_object, broadcast_object
from deepsuite.parallel.expert_parallel import load_expert_shards, save_expert_shards

STATE_FILE = "state.json"
LATEST_FILE = "latest"
DS_TAG = "deepspeed"
STATE_FORMAT = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or does not fit the current run."""


def model_signature(cfg: Config) -> dict[str, Any]:
    """The model family and its resolved args: what a checkpoint's weights depend on."""
    args = cfg.model.resolved_args
    return {"name": cfg.model.name, "args": dataclasses.asdict(args)}


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the `step_N` folders in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def check_writable(ckpt_dir: Path) -> None:
    """Create `ckpt_dir` if needed and make sure files can be written in it."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.dir={str(ckpt_dir)!r} is not writable ({exc.strerror}); choose a writable folder"
        ) from None


# ------------------------------------------------------------------------------------------ saving


DS_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
"""The scripts DeepSpeed copies into each checkpoint folder (removed under expert parallelism)."""


def save_checkpoint(
    engine: Any,
    ckpt_dir: str | os.PathLike[str],
    step: int,
    *,
    cfg: Config,
    rank: int,
    world_size: int,
    sampler_state: dict[str, int],
    tokens_seen: int,
    tokenizer_path: str | os.PathLike[str] | None,
    extra: dict[str, Any] | None = None,
    checksums: bool = True,
) -> Path:
    """Write `ckpt_dir/step_<step>` (collective: every rank calls it) and return its path.

    ``checksums=False`` leaves out the hashing and the manifest (the layout of older checkpoints;
    the save benchmark's baseline)."""
    root = Path(ckpt_dir)
    name = f"step_{step}"
    tmp, final = root / f"tmp-{name}", root / name
    # A write that fails on one rank (disk full, no permission, read-only file system) stops every
    # rank: where barriers would leave the others waiting for it, the ranks agree on the failure, and
    # all of them raise the same error, with the temporary folder removed and `latest` unchanged.
    failure: OSError | CheckpointError | None = None
    if rank == 0:
        try:
            _fresh_tmp(root, tmp)
        except CheckpointError as exc:
            failure = exc
        except OSError as exc:
            failure = _failed_write(exc, root)
    failure = broadcast_object(failure)
    hashed = None
    if failure is None:
        try:
            hashed = _write_rank_files(engine, tmp, rank, checksums)
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's (expert shards)
            failure = _failed_write(exc, tmp)
    every_rank = all_gather_object((hashed, failure))  # also waits until every rank has written its files
    failure = next((f for _, f in every_rank if f is not None), None)
    published = False
    if rank == 0 and failure is None:
        state = {
            "format": STATE_FORMAT,
            "step": step,
            "tokens_seen": tokens_seen,
            "sampler": sampler_state,
            "world_size": world_size,
            "zero_stage": cfg.parallel.zero_stage,
            "model": model_signature(cfg),
            "tokenizer": str(tokenizer_path) if tokenizer_path else "",
            "extra": extra or {},
        }
        if cfg.parallel.zero_stage == 0 and (names := optimizer_param_names(engine)) is not None:
            state["optimizer_param_names"] = names
        try:
            if cfg.parallel.ep_size > 1:
                # DeepSpeed's recovery scripts do not know the expert shards and fail on this layout
                # ("consumed N numels out of 2N"); `deepsuite consolidate` is the tool for it.
                for script in DS_RECOVERY_SCRIPTS:
                    (tmp / script).unlink(missing_ok=True)
            _write_state(tmp, cfg, tokenizer_path, state, _merged([h for h, _ in every_rank]))
            published = not final.exists()
            _publish(tmp, final)
            _point_latest(root, name)
            published = False  # `latest` names it: the save is complete
        except OSError as exc:
            failure = _failed_write(exc, tmp)
        else:
            rotate(root, cfg.checkpoint.keep_last)
    failure = broadcast_object(failure)
    if failure is not None:
        if rank == 0:
            _abandon(root, tmp, final if published else None)
        raise _save_failed(failure, root, name)
    return final


def _failed_write(exc: BaseException, folder: Path) -> OSError:
    """The OS error behind a failed write into ``folder`` (`write_failure`); anything else is raised
    as it is."""
    failure = write_failure(exc, folder)
    if failure is None:
        raise exc
    return failure


def _abandon(root: Path, tmp: Path, published: Path | None) -> None:
    """Remove what a failed save wrote: its temporary folder, the pointer being written and, when
    it was renamed into place but `latest` does not name it, its step folder."""
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):  # a read-only file system refuses even a missing file's unlink
        (root / f".{LATEST_FILE}.tmp").unlink(missing_ok=True)
    if published is not None:
        shutil.rmtree(published, ignore_errors=True)


def _save_failed(failure: OSError | CheckpointError, root: Path, name: str) -> CheckpointError:
    """The one line a failed save ends the run with: what, why, the fix, and what is still there."""
    if isinstance(failure, CheckpointError):
        return failure
    try:
        previous = read_latest(root)
    except (CheckpointError, DataError):
        previous = None
    kept = (
        f"the previous checkpoint {previous.name} is intact"
        if previous is not None and previous.is_dir()
        else "no earlier checkpoint was written"
    )
    return CheckpointError(
        f"could not write checkpoint {name} to {root}: {reason(failure)}; "
        f"{write_fix(failure, 'point checkpoint.dir elsewhere')}; {kept}"
    )


def _fresh_tmp(root: Path, tmp: Path) -> None:
    """An empty ``tmp`` in ``root``, the leftovers of killed saves removed (when no other live
    process writes there: `remove_interrupted_saves`)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_interrupted_saves(root, keep_claim=True)  # the trainer did at start-up; other callers here
    if tmp.exists():
        raise CheckpointError(
            f"another live process writes in checkpoint.dir={str(root)!r} and {tmp.name} is there: give each "
            "run its own checkpoint.dir"
        )
    tmp.mkdir()


def _write_rank_files(engine: Any, tmp: Path, rank: int, checksums: bool = True) -> dict[str, Entry] | None:
    """This rank's files: DeepSpeed's, its experts under expert parallelism, its RNG state, each
    fsynced by this rank. Returns their sizes and digests (None: ``checksums`` off).

    Each file is hashed on a second thread as soon as it is written, from the page cache, while
    DeepSpeed writes the next one and while this rank fsyncs them: the fsyncs (disk-bound, outside the
    GIL) take longer than the hashing, which so costs next to no time (tools/benchmarks/checkpoint_save.py).
    """
    written: list[Path] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash") as hasher:
        digests: list[Future[Entry]] = []

        def done(path: str | os.PathLike[str] | None) -> None:
            if path is not None:
                written.append(Path(path))
                if checksums:
                    digests.append(hasher.submit(hash_file, path, mapped=True))

        # DeepSpeed's save ends in a barrier: its writes that fail are raised after it, on this rank
        writers = [(getattr(engine, "checkpoint_engine", None), "save"), (engine, "_copy_recovery_script")]
        with _after_each_engine_save(engine, done), deferred_write_failures(tmp, writers) as failed:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        if failed:
            raise failed[0]
        done(save_expert_shards(engine, tmp / DS_TAG))  # no-op without EP
        (tmp / "rng").mkdir(exist_ok=True)
        rng_file = tmp / "rng" / f"rank_{rank:05d}.json"
        rng_file.write_text(json.dumps(capture_rng_state()), encoding="utf-8")
        done(rng_file)
        for path in written:
            fsync_file(path)
        if not checksums:
            return None
        return {p.relative_to(tmp).as_posix(): d.result() for p, d in zip(written, digests)}


@contextlib.contextmanager
def _after_each_engine_save(engine: Any, callback: Any) -> Iterator[None]:
    """Call ``callback(path)`` after each file DeepSpeed's checkpoint engine writes on this rank
    (model states, this rank's optimizer partition, MoE expert files), while it is in the page cache."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None:
        yield
        return
    original = ckpt_engine.save
    shadowed = "save" in vars(ckpt_engine)

    def save(state_dict: Any, path: str) -> Any:
        out = original(state_dict, path)
        callback(path)
        return out

    ckpt_engine.save = save
    try:
        yield
    finally:
        if shadowed:
            ckpt_engine.save = original
        else:
            del ckpt_engine.save


def _merged(every_rank: list[dict[str, Entry] | None]) -> dict[str, Entry] | None:
    if any(hashed is None for hashed in every_rank):
        return None
    return {rel: entry for hashed in every_rank if hashed for rel, entry in hashed.items()}


def _write_state(
    tmp: Path,
    cfg: Config,
    tokenizer_path: str | os.PathLike[str] | None,
    state: dict[str, Any],
    hashed: dict[str, Entry] | None = None,
) -> None:
    """The run config and the tokenizer copy, state.json with the size of every file, then the
    manifest with every file's digest (``hashed``: those the ranks hashed; the rest is hashed here;
    None: no manifest); all of it fsynced."""
    write_durable(tmp / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, tmp / Path(tokenizer_path).name)  # tokenizer.model or .json
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            fsync_file(p)
            files[p.relative_to(tmp).as_posix()] = p.stat().st_size
    write_durable(tmp / STATE_FILE, json.dumps({**state, "files": files}, indent=1))
    if hashed is not None:
        write_manifest(tmp, hash_folder(tmp, hashed))
    for d in {tmp, *(p.parent for p in tmp.rglob("*"))}:
        fsync_dir(d)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a ``final`` of the same step (saved again after resuming from an
    older one) is replaced."""
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(trash, final)  # the step saved before stays
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def _point_latest(root: Path, name: str) -> None:
    """Make ``root/latest`` name ``name``: written beside it, then renamed over it."""
    pointer = root / f".{LATEST_FILE}.tmp"
    write_durable(pointer, name + "\n")
    os.replace(pointer, root / LATEST_FILE)
    fsync_dir(root)


def optimizer_param_names(engine: Any) -> list[list[str]] | None:
    """Names of the parameters of each optimizer group of ``engine``, in the order in which its
    optimizer wrapper stores their fp32 master copies (None when they cannot be told).

    DeepSpeed's ZeRO-0 mixed-precision wrappers (``FP16_UnfusedOptimizer``, ``FP16_Optimizer``)
    keep the low-precision parameters of group ``i`` in ``fp16_groups[i]`` and save the masters in
    that order with no names; ``BF16_Optimizer`` keeps ``bf16_groups``; without a wrapper (fp32) the
    optimizer's own ``param_groups`` hold the model's parameters.
    """
    module = getattr(engine, "module", None)
    optimizer = getattr(engine, "optimizer", None)
    if module is None or optimizer is None:
        return None
    name_of = {id(p): n for n, p in module.named_parameters()}
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bf16_groups", None)
    if groups is None:
        groups = [g["params"] for g in getattr(optimizer, "param_groups", [])]
    try:
        return [[name_of[id(p)] for p in group] for group in groups]
    except (KeyError, TypeError):
        return None


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (never the one `latest` names)."""
    latest = read_latest(root)
    complete = [p for _, p in step_dirs(root) if (p / STATE_FILE).is_file()]
    removed = []
    for p in complete[: max(0, len(complete) - keep_last)]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for trash in root.glob(".trash-step_*"):
        shutil.rmtree(trash, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------------------- finding


def read_latest(root: Path) -> Path | None:
    """The folder named by `root/latest`, or None when there is no pointer."""
    pointer = root / LATEST_FILE
    if checkpoint_file(pointer) is None:
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_RE.match(name):
        raise CheckpointError(
            f"{pointer} is corrupt (holds {name[:40]!r}); delete it to resume from the newest step_N"
        )
    return root / name


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a step folder or a run folder (through `latest`, else the newest
    complete `step_N`)."""
    p = Path(path)
    if checkpoint_file(p / STATE_FILE) or _STEP_RE.match(p.name):
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
        return p
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist; give a run folder or a step_N folder")
    latest = read_latest(p)
    if latest is not None and checkpoint_file(latest / STATE_FILE):
        return latest
    complete = [d for _, d in step_dirs(p) if checkpoint_file(d / STATE_FILE)]
    if complete:
        return complete[-1]
    if latest is not None:
        raise CheckpointError(f"{p / LATEST_FILE} names {latest.name}, which is missing or incomplete")
    raise CheckpointError(f"no checkpoint in {str(p)!r} (no `latest` and no complete step_N folder)")


def checkpoint_tokenizer(path: str | os.PathLike[str]) -> Path | None:
    """The tokenizer file a checkpoint holds (its copy of the data folder's ``tokenizer.json`` or
    ``tokenizer.model``), from a step folder or a run folder; None when it holds none."""
    p = find_checkpoint(path)
    names = ["tokenizer.json", "tokenizer.model"]
    if (p / STATE_FILE).is_file():
        recorded = str(read_state(p).get("tokenizer") or "")
        if recorded:
            names.insert(0, Path(recorded).name)  # the name the copy was saved under
    return next((p / name for name in names if checkpoint_file(p / name)), None)


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """`checkpoint.resume` → the folder to load: `never` → None; `auto` → the newest complete
    checkpoint in `ckpt_dir` or None when there is none; otherwise the path given."""
    if resume == "never":
        return None
    if resume == "auto":
        root = Path(ckpt_dir)
        if read_latest(root) is None and not step_dirs(root):
            return None
        return find_checkpoint(root)
    return find_checkpoint(resume)


# ---------------------------------------------------------------------------------------- checking


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder."""
    f = path / STATE_FILE
    if checkpoint_file(f) is None:
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {STATE_FILE}); it was interrupted while saving"
        )
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {STATE_FILE} is not valid JSON ({exc})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown {STATE_FILE} format")
    return state


def verify_checkpoint(path: str | os.PathLike[str], *, checksums: bool = True) -> dict[str, Any]:
    """Check that a checkpoint is intact (with ``checksums``: every file it lists in manifest.json has
    its recorded size and digest, the manifest its own; without a manifest, one warning line),
    complete (every file of state.json present with its size) and safe (every DeepSpeed file loads
    with the weights-only unpickler); return its state.

    A damaged file raises `CheckpointError` naming it and the newest intact checkpoint of the same
    run folder (`newest_intact_checkpoint`) to use instead."""
    p = Path(path)
    refuse_special_files(p)  # before anything is opened: a named pipe would block its reader
    if not (p / STATE_FILE).is_file():
        read_state(p)  # raises: incomplete
    if checksums:
        verdict = check_folder(p)
        if verdict.damage is not None:
            raise damaged_checkpoint_error(p, verdict.damage)
        if not verdict.verified:
            warn_unverified(p)
    state = read_state(p)
    for rel, size in state["files"].items():
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {p} is corrupt: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {p} is corrupt: {rel} has {f.stat().st_size} bytes, the manifest says {size}"
            )
    for f in sorted((p / DS_TAG).rglob("*.pt")):
        try:
            safe_torch_load(f, map_location="cpu")
        except Exception as exc:  # pickle errors come as several exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
                first = next(
                    (ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), first
                )
                raise CheckpointError(
                    f"refusing to load {f}: it contains a pickled object that is not tensor data ({first}); "
                    "a checkpoint that names arbitrary code is never unpickled"
                ) from None
            raise CheckpointError(
                f"checkpoint {p} is corrupt: {f.relative_to(p)} cannot be read ({first})"
            ) from None
    return state


def newest_intact_checkpoint(root: Path, *, besides: Path | None = None) -> Path | None:
    """The newest complete ``step_N`` folder of ``root`` (other than ``besides``) whose files all
    match their manifest; checkpoints without a manifest cannot be shown intact and are passed over."""
    for _, d in reversed(step_dirs(root)):
        if besides is not None and d.resolve() == besides.resolve():
            continue
        if not (d / STATE_FILE).is_file():
            continue
        verdict = check_folder(d)
        if verdict.verified and verdict.damage is None:
            return d
    return None


def damaged_checkpoint_error(path: Path, damage: str) -> CheckpointError:
    """The one-line error for checkpoint ``path`` with a damaged file (``damage`` names it)."""
    intact = newest_intact_checkpoint(path.parent, besides=path)
    instead = (
        f"the newest intact checkpoint of the run is {intact} (resume with checkpoint.resume={intact})"
        if intact is not None
        else f"no intact checkpoint in {path.parent} to use instead"
    )
    return CheckpointError(
        f"checkpoint {path} is corrupt: {damage}; {instead}; checkpoint.verify=false or --no-verify "
        "skips this check"
    )


def check_compatible(state: dict[str, Any], cfg: Config, path: Path, world_size: int) -> None:
    """Refuse a checkpoint of another model config (naming the field)."""
    current = model_signature(cfg)
    saved = state["model"]
    if saved["name"] != current["name"]:
        raise CheckpointError(
            f"checkpoint {path} holds a model.name={saved['name']!r} model, the config asks for "
            f"{current['name']!r}; resume with the same model or set checkpoint.resume=never"
        )
    for key in sorted(set(saved["args"]) | set(current["args"])):
        a, b = saved["args"].get(key), current["args"].get(key)
        if a != b:
            raise CheckpointError(
                f"checkpoint {path} was trained with model.{key}={a!r} but the config has model.{key}={b!r}; "
                "resume with the same model config, or start fresh with checkpoint.resume=never "
                "(or another checkpoint.dir)"
            )
    # another world size or ZeRO stage is converted on load (`deepsuite.checkpoint.reshard`), which
    # refuses expert-parallel layouts itself


# ----------------------------------------------------------------------------------------- loading


def load_checkpoint(engine: Any, path: Path, rank: int) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, LR scheduler) and this rank's RNGs; return the state.

    Call `verify_checkpoint` and `check_compatible` first.
    """
    state = read_state(path)
    make_checkpoint_loading_safe(engine)
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=DS_TAG,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state in {path / DS_TAG}")
    load_expert_shards(engine, path / DS_TAG)  # EP: DeepSpeed's module file holds rank 0's experts only
    rng_file = path / "rng" / f"rank_{rank:05d}.json"
    if checkpoint_file(rng_file):
        restore_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    else:
        raise CheckpointError(f"checkpoint {path} has no RNG state for rank {rank} ({rng_file.name})")
    return state


def load_config_of(path: Path) -> Config:
    """The resolved run config stored in a checkpoint."""
    return config_from_dict(read_yaml(path / "config.yaml"))
