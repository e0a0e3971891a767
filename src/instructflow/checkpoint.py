"""Training checkpoints that survive a kill -9: written into a temporary folder, flushed to disk and
renamed into place, with a manifest written last that holds the SHA-256 of every file. When resuming,
a folder whose manifest is missing or whose files do not match it (cut off, or damaged on disk) is
skipped in favour of the one before.

Everything is safetensors or JSON (no pickle): trainable weights, optimiser tensors, RNG state.
A checkpoint records the fingerprint of the run (training settings + data) so a changed run never
resumes from another run's weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


class CheckpointError(RuntimeError):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


GROUP_PREFIX = "group"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous()
            else:
                scalars[key] = value
    groups = []
    for i, group in enumerate(state["param_groups"]):
        groups.append({k: v for k, v in group.items() if not torch.is_tensor(v)})
        # Some optimisers (optimi) keep a tensor in the group itself, e.g. the step count.
        tensors.update({f"{GROUP_PREFIX}{i}.{k}": v.detach().contiguous() for k, v in group.items() if torch.is_tensor(v)})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    groups = [dict(group) for group in meta["param_groups"]]
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        if idx.startswith(GROUP_PREFIX):
            groups[int(idx[len(GROUP_PREFIX):])][name] = value
        else:
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, fingerprint: str, extra: dict | None = None, keep: int = 2,
                    protect: int | None = None, rng: torch.Tensor | None = None) -> Path:
    """Write checkpoint ``step`` and keep the newest ``keep``, and checkpoint ``protect`` (a step: the best one,
    which train.export: best exports) whatever its age; CheckpointError (older checkpoints intact) when the folder
    cannot be written, e.g. a full disk. ``rng``: torch's RNG state to store (default: the current one)."""
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    try:
        for stale in folder.glob(".step-*.tmp"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(tmp / FILES[0]))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors, str(tmp / FILES[1]))
        save_file({"torch_rng": torch.get_rng_state() if rng is None else rng}, str(tmp / FILES[2]))
        for name in FILES:
            _fsync(tmp / name)
        manifest = {"step": step, "fingerprint": fingerprint, "optimizer": opt_meta, "scheduler": scheduler_state,
                    "extra": extra or {}, "sha256": {name: file_sha256(tmp / name) for name in FILES}}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(folder)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {err}. Free disk space or fix the permissions "
                              f"of {folder}; earlier checkpoints there are intact") from err
    prune(folder, keep, protect=None if protect is None else folder / f"step-{protect:08d}")
    return final


class BackgroundWriter:
    """Writes one checkpoint at a time in a thread, so the next step's forward and backward passes run while it
    goes to disk (on a 2-core CPU a checkpoint of SmolLM2-135M with its optimiser state, 1.1 GB, took 6-10 s,
    mostly waiting for the disk). They read the weights and the optimiser state but never change them: call
    ``wait()`` before anything does (the optimiser step, export). ``wait()`` raises the write's error, if any;
    leaving a ``with`` block waits too, so no checkpoint is left half written behind a finished or failed run."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, folder: Path, step: int, **kwargs) -> None:
        """Start writing ``save_checkpoint(folder, step, **kwargs)`` once the previous write is done. Its small
        parts (scheduler state, extra, RNG state) are copied now; its tensors are read while it writes."""
        self.wait()
        kwargs = {**copy.deepcopy({k: v for k, v in kwargs.items() if k not in ("trainable", "optimizer_state")}),
                  "trainable": kwargs["trainable"], "optimizer_state": kwargs["optimizer_state"],
                  "rng": torch.get_rng_state()}
        self._thread = threading.Thread(target=self._write, args=(folder, step), kwargs=kwargs,
                                        name=f"checkpoint {step}")
        self._thread.start()

    def _write(self, folder: Path, step: int, **kwargs) -> None:
        try:
            save_checkpoint(folder, step, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
        elif self._thread is not None:  # the run failed already: finish the write, keep that error
            self._thread.join()
            self._thread = None


def _fingerprint_of(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune(folder: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest ``keep`` checkpoints of each fingerprint. Counted per fingerprint, so a new run
    never deletes its own fresh checkpoints because an older run (other settings or data) left some with
    higher step numbers; that run keeps its newest ``keep`` too, for when its settings come back. A folder
    whose manifest cannot be read is left alone (resuming skips it), and so is ``protect``."""
    groups: dict[str, list[Path]] = {}
    for path in list_checkpoints(folder):
        fp = _fingerprint_of(path)
        if fp is not None:
            groups.setdefault(fp, []).append(path)
    for paths in groups.values():
        for old in paths[:-keep]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir())


def load_checkpoint(path: Path) -> dict:
    """Loads one checkpoint; CheckpointError on anything partial or corrupt."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"no readable {MANIFEST}: {err}") from None
    for name in FILES:
        if not (path / name).is_file() or file_sha256(path / name) != manifest["sha256"][name]:
            raise CheckpointError(f"{name} is missing or does not match its checksum")
    return {
        "step": int(manifest["step"]),
        "fingerprint": manifest["fingerprint"],
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), manifest["optimizer"]),
        "scheduler": manifest["scheduler"],
        "rng": load_file(str(path / "rng.safetensors"))["torch_rng"],
        "extra": manifest.get("extra", {}),
    }


def latest_valid(folder: Path, fingerprint: str, log=print) -> dict | None:
    """The newest checkpoint that loads and belongs to this run, skipping broken ones."""
    for path in reversed(list_checkpoints(folder)):
        try:
            ckpt = load_checkpoint(path)
        except Exception as err:  # a checkpoint cut off mid-write or damaged on disk
            log(f"skipping unreadable checkpoint {path}: {err}")
            continue
        if ckpt["fingerprint"] != fingerprint:
            log(f"skipping checkpoint {path}: it belongs to different training settings or data")
            continue
        return ckpt
    return None
