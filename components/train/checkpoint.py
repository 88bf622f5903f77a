"""Training checkpoints: safetensors plus JSON, written atomically, the last K kept.

    <root>/step-00000120/
        model.safetensors              module weights (rank 0)
        optimizer-rank00000.safetensors  every tensor of that rank's optimizer state
        state-rank00000.json           the rest of that rank's state: the optimizer's structure,
                                       scheduler, RNG states, engine counters, caller's extra state
        hashes.json                    the SHA-256 of every other file, written last
    <root>/latest                      the name of the newest complete checkpoint

Nothing is pickled, so a checkpoint from anywhere can be loaded safely. The optimizer's state
dict (a DeepSpeed ZeRO optimizer's included: Adam moments, fp32 master partitions, loss scaler)
is split into a JSON tree and a flat map of tensors; objects of the optimizer's own (its loss
scaler, ZeRO's fragment addresses) are stored as their plain attributes and, on load, set onto
the fresh optimizer's objects of the same place, so `load_state_dict` gets back what it gave.

A checkpoint is written into a temporary folder and renamed into place, then `latest` is
replaced (write, fsync, rename); a process killed at any moment leaves the previous checkpoint
complete and named by `latest`. Several ranks: rank 0 makes and publishes the folder, every
rank writes its own optimizer partition in between, with barriers around.

What the rename cannot promise (a disk that loses unsynced pages in a power cut, a file cut
short by a full disk, a copy between machines, a hand edit) the hashes catch: before the rename
rank 0 hashes and fsyncs every file and writes hashes.json; `resume_point` verifies the
checkpoint `latest` names against them and, when it is damaged, says so in one line, moves it
aside (`.damaged-step-...`, kept for inspection, never loaded) and takes the newest intact one
before it. Hashing reads the checkpoint once more on save and on resume (about a second per GB).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from components.artifacts import sha256_file

LATEST = "latest"
HASHES = "hashes.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


# ---- state trees: JSON structure + flat tensors ----------------------------------------------

def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able tree of `obj`; its tensors go into `tensors` under dotted keys."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, f"{prefix}.k{i}", tensors), flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    attrs = {k: v for k, v in vars(obj).items() if v is None or isinstance(v, (bool, int, float, str))} \
        if hasattr(obj, "__dict__") else {}
    return {"__object__": type(obj).__name__, "attrs": attrs}


def unflatten(node: Any, tensors: dict[str, torch.Tensor], template: Any = None) -> Any:
    """The inverse of `flatten`; `template` (the fresh state at the same place) supplies objects."""
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__object__" in node:
            if template is None or type(template).__name__ != node["__object__"]:
                raise ValueError(f"checkpoint holds a {node['__object__']} where the optimizer has "
                                 f"{type(template).__name__}: was it saved with another configuration?")
            for key, value in node["attrs"].items():
                setattr(template, key, value)
            return template
        if "__dict__" in node:
            out = {}
            for k, v in node["__dict__"]:
                key = unflatten(k, tensors)
                out[key] = unflatten(v, tensors, template.get(key) if isinstance(template, dict) else None)
            return out
        for kind, ctor in (("__list__", list), ("__tuple__", tuple)):
            if kind in node:
                items = node[kind]
                same = isinstance(template, (list, tuple)) and len(template) == len(items)
                return ctor(unflatten(v, tensors, template[i] if same else None) for i, v in enumerate(items))
    return node


# ---- module weights: tied tensors stored once ---------------------------------------------------

def save_module(module: torch.nn.Module, path: Path) -> None:
    """The module's state in safetensors; a tensor tied to an earlier one (lm_head = embedding) is
    stored once and named in the file's metadata. (safetensors' own save_model cannot decide
    which name to keep when DeepSpeed has made every parameter a view of one flat buffer.)"""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for name, value in module.state_dict().items():
        key = (value.data_ptr(), tuple(value.shape), value.dtype)
        if key in seen and value.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.detach().cpu().contiguous().clone()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load what `save_module` wrote, strictly: every key of the module must be there."""
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    tensors.update({name: tensors[target] for name, target in aliases.items()})
    module.load_state_dict(tensors, strict=True)


# ---- RNG ----------------------------------------------------------------------------------------

def rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch"] = torch.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    return {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- save / load --------------------------------------------------------------------------------

def _dist() -> tuple[int, int, Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed.barrier
    return 0, 1, lambda: None


def write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_files(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder` (fsynced as it is read)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p, sync=True)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != HASHES}


def _engine_parts(engine: Any) -> tuple[torch.nn.Module, Any, Any]:
    """(module, optimizer, scheduler) of a DeepSpeed engine or of a plain (module, optimizer)."""
    module = getattr(engine, "module", engine)
    return module, getattr(engine, "optimizer", None), getattr(engine, "lr_scheduler", None)


COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def save(root: str | os.PathLike, step: int, engine: Any, extra: dict[str, Any] | None = None,
         keep: int = 3, modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write checkpoint `step` under `root`, point `latest` at it, keep the newest `keep`.
    `modules` are more modules to carry (rank 0 writes each as `<name>.safetensors`)."""
    rank, world, barrier = _dist()
    tmp = begin(root, step)
    module, optimizer, scheduler = _engine_parts(engine)
    if rank == 0:
        save_module(module, tmp / "model.safetensors")
        for name, extra_module in (modules or {}).items():
            save_module(extra_module, tmp / f"{name}.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "step": step, "world_size": world,
        "optimizer": flatten(optimizer.state_dict(), "optimizer", tensors) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "counters": {c: getattr(engine, c) for c in COUNTERS if isinstance(getattr(engine, c, None), int)},
        "rng": rng_state(tensors),
        "extra": extra or {},
    }
    save_file(tensors, str(tmp / f"optimizer-rank{rank:05d}.safetensors"))
    write_json(tmp / f"state-rank{rank:05d}.json", state)
    return publish(root, step, keep)


def begin(root: str | os.PathLike, step: int) -> Path:
    """The temporary folder every rank writes checkpoint `step` into (rank 0 makes it; a barrier follows)."""
    root = Path(root)
    rank, _, barrier = _dist()
    tmp = root / f".step-{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    return tmp


def publish(root: str | os.PathLike, step: int, keep: int) -> Path:
    """After every rank has written into `begin`'s folder: rename it into place, point `latest` at
    it, keep the newest `keep` (rank 0; barriers around)."""
    root = Path(root)
    rank, _, barrier = _dist()
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    barrier()
    if rank == 0:
        write_json(tmp / HASHES, {"sha256": _hash_files(tmp)})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        _write_text(pointer, final.name + "\n")
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        for old in checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one; None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named.is_dir() and STEP_DIR.match(named.name):
            return named
    found = checkpoints(root)
    return found[-1] if found else None


def damage(path: str | os.PathLike) -> str | None:
    """Why checkpoint folder `path` may not be loaded (a file missing, cut short or changed since it
    was saved, or no readable hashes.json), or None when every recorded file has its hash."""
    path = Path(path)
    try:
        recorded = json.loads((path / HASHES).read_text(encoding="utf-8"))["sha256"]
        if not isinstance(recorded, dict) or not recorded:
            raise ValueError("no files recorded")
    except FileNotFoundError:
        return f"no {HASHES} (written before checkpoints recorded their hashes, or damaged)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return f"{HASHES} is unreadable ({type(err).__name__})"
    for name, digest in sorted(recorded.items()):
        file = path / name
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            return f"{HASHES} names {name!r}, outside the checkpoint"
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} does not match its recorded hash (cut short or changed since it was saved)"
    return None


def resume_point(root: str | os.PathLike, log: Any = None) -> Path | None:
    """The newest intact checkpoint under `root` (None: none), verified against its hashes.

    A damaged one on the way is reported in one line (`log.warning`) and moved aside to
    `.damaged-step-NNNNNNNN[-k]` (not listed, never loaded again), and `latest` is pointed at the
    one chosen. Rank 0 verifies; the other ranks of a distributed run get its choice."""
    root = Path(root)
    rank, world, barrier = _dist()
    chosen = None
    if rank == 0:
        found = checkpoints(root)
        for i, path in reversed(list(enumerate(found))):  # one renamed in before `latest` moved is complete too
            why = damage(path)
            if why is None:
                chosen = path
                break
            aside = root / f".damaged-{path.name}"
            k = 1
            while aside.exists():
                aside, k = root / f".damaged-{path.name}-{k}", k + 1
            os.replace(path, aside)
            if log is not None:
                log.warning(f"checkpoint {path}: damaged, {why}; moved to {aside.name}, "
                            + ("resuming from the one before it" if i else "no intact checkpoint left: starting afresh"))
        pointer_file = root / LATEST
        named = pointer_file.read_text(encoding="utf-8").strip() if pointer_file.is_file() else None
        if chosen is not None and named != chosen.name:
            pointer = root / f".{LATEST}.tmp"
            _write_text(pointer, chosen.name + "\n")
            os.replace(pointer, root / LATEST)
    if world > 1:  # every rank resumes from rank 0's choice
        step = torch.tensor([int(chosen.name[5:]) if chosen is not None else -1], dtype=torch.long)
        torch.distributed.broadcast(step, src=0)
        barrier()
        chosen = root / f"step-{int(step):08d}" if int(step) >= 0 else None
    return chosen


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Rank 0's JSON state of checkpoint folder `path` (step, world_size, extra...), tensors not read;
    a 3D-parallel checkpoint's (components/train/parallel/state.py) has "topology" besides."""
    path = Path(path)
    for name in ("state-rank00000.json", "state.json"):
        if (path / name).is_file():
            return json.loads((path / name).read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{path}: not a checkpoint (no state-rank00000.json or state.json)")


def load(path: str | os.PathLike, engine: Any, modules: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Restore module, optimizer, scheduler, counters and RNG from checkpoint folder `path`, and
    the `modules` saved with it; returns {"step": ..., "extra": ...} for the caller's own state."""
    path = Path(path)
    rank, world, _ = _dist()
    state = json.loads((path / f"state-rank{rank:05d}.json").read_text(encoding="utf-8"))
    if state["world_size"] != world:
        raise ValueError(f"{path}: saved by {state['world_size']} processes, loading into {world}; "
                         f"resuming under another data-parallel size is not supported yet")
    tensors = load_file(str(path / f"optimizer-rank{rank:05d}.safetensors"))
    module, optimizer, scheduler = _engine_parts(engine)
    load_module(module, path / "model.safetensors")
    for name, extra_module in (modules or {}).items():
        load_module(extra_module, path / f"{name}.safetensors")
    if optimizer is not None and state["optimizer"] is not None:
        restored = unflatten(state["optimizer"], tensors, optimizer.state_dict())
        if hasattr(optimizer, "load_state_dict") and "single_partition_of_fp32_groups" in restored:
            # ZeRO indexes the list by data-parallel rank; with the saving topology each rank
            # needs only its own partition, which is what this rank's files hold
            optimizer.load_state_dict([restored] * world, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(restored)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    for name, value in state["counters"].items():
        setattr(engine, name, value)
    set_rng_state(state["rng"], tensors)
    return {"step": state["step"], "extra": state["extra"]}
