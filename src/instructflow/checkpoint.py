"""Training checkpoints that survive a kill -9: written into a temporary folder and renamed into
place, with a manifest written last; a folder without a valid manifest is ignored when resuming.

Everything is safetensors or JSON (no pickle): trainable weights, optimiser tensors, RNG state.
A checkpoint records the fingerprint of the run (training settings + data) so a changed run never
resumes from another run's weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().clone()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, fingerprint: str, extra: dict | None = None, keep: int = 2) -> Path:
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    manifest = {"step": step, "fingerprint": fingerprint, "optimizer": opt_meta, "scheduler": scheduler_state,
                "extra": extra or {}}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh)
        fh.flush()
        os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir())


def load_checkpoint(path: Path) -> dict:
    """Loads one checkpoint; raises on anything partial or corrupt."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
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
