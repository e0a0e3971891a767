"""train stage: the worker that ``accelerate launch`` runs (``instructflow train`` starts it).

Cached token tensors in, a plain ``save_pretrained`` folder out. ``train()`` reads top to bottom: set up,
then per step plan the batch, accumulate gradients, step the optimiser, score the held-out rows when due,
log, checkpoint; then export the last or the best weights.
- The batch plan is a pure function of (seed, step), so every rank builds it alone and a resumed run
  continues with the exact batches it would have seen.
- The loss of a step is the summed cross-entropy over the labelled tokens of the global batch divided
  by their count (loss.py), so accumulation and several processes give the gradient of one large batch.
- Precision is one strategy object (precision.py): step with clipping, state for checkpoints, fp32 export.
- The plain path trains any causal LM transformers loads (modeling.py checks its attention and whether
  packing is exact on the model itself); ``kernels.apply`` swaps in the speed work that is safe for the
  architecture and says what it applied (summary.json). ``train.advanced.fast_path: false`` skips it.
- Checkpoints live in a work folder outside the rule's outputs (Snakemake deletes outputs before a
  rerun), are written atomically and carry a fingerprint of settings + data.
- Held-out evaluation (``HeldOut``) scores a fixed subset of the eval split every train.eval_every steps;
  with train.export: best the step of the lowest loss is written as a checkpoint and kept until a better one
  comes, so the best survives a stop and resume, and export loads it back.

Run: python -m instructflow.train --settings settings.json --model DIR --train TOKENS [--eval TOKENS]
     --out MODEL_DIR --metrics metrics.jsonl --summary summary.json --workdir CHECKPOINTS
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from . import precision as precisions
from .batching import BatchPlanner, StepPlan, check_split, collate, source_plan
from .checkpoint import BackgroundWriter, CheckpointError, file_sha256, latest_valid, load_checkpoint
from .device import peak_rss_mib
from .config import train_settings
from .examples import Examples
from .io import append_jsonl, read_jsonl, write_json
from .loss import response_loss_sum
from .modeling import architecture, load_model, position_limit, positions_are_hard

# Keys the workflow passes beside the schema's training settings.
# Settings from outside the train section: the run's template and model, and data.sources' weights.
EXTRA_SETTINGS = ("template_path", "trust_remote_code", "source_weights")


class TrainingError(RuntimeError):
    pass


def no_kwargs(batch: dict, device) -> dict:
    return {}


@dataclasses.dataclass
class TrainingSetup:
    """Everything a step needs: the model, how it is stepped (precision strategy), whether micro-batches are
    packed, the loss, extra forward arguments per batch, and what was applied (for the summary)."""

    model: torch.nn.Module
    precision: object
    packing: bool
    applied: dict
    loss: Callable
    forward_kwargs: Callable = no_kwargs
    report: Callable | None = None
    max_packed_length: int | None = None

    def packs(self, length: int) -> bool:
        """Whether a micro-batch of this many tokens is packed: where packing is on and the packed row fits
        the model's position table where it has a hard one (else that micro-batch is padded)."""
        return self.packing and (self.max_packed_length is None or length <= self.max_packed_length)

    def summary(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {**self.applied, **(self.report() if self.report else {}), "trainable_parameters": trainable}


class ResponseLoss(torch.nn.Module):
    """The setup's loss as a module's forward, so the DDP wrapper accelerate adds sees every forward
    pass: called on the unwrapped model, DDP never all-reduced the gradients and each rank trained alone."""

    def __init__(self, setup: TrainingSetup):
        super().__init__()
        self.model = setup.model
        self.setup = setup

    def forward(self, batch: dict):
        device = batch["input_ids"].device
        return self.setup.loss(self.model, batch["input_ids"], batch["labels"], batch["position_ids"],
                               **self.setup.forward_kwargs(batch, device))


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------ setup
def add_lora(model, settings: dict):
    from peft import LoraConfig, get_peft_model

    lora = settings["lora"]
    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=lora["target_modules"], task_type="CAUSAL_LM"))


def plain_setup(model, attention, settings: dict, precision: str) -> TrainingSetup:
    """Stock modules, the checked attention, torch AdamW (under bf16 autocast for bf16); packed where
    packing is exact for this model, padded otherwise."""
    packing = settings["advanced"]["packing"] and attention.packing
    if settings["advanced"]["packing"] and not attention.packing:
        warnings.warn(f"instructflow: packed rows are not exact for {architecture(model)} with "
                      f"{attention.implementation} attention ({attention.why_not_packed}); it trains on padded "
                      "micro-batches", RuntimeWarning, stacklevel=2)
    strategy = precisions.Plain(model, lr=settings["learning_rate"], weight_decay=settings["weight_decay"],
                                autocast=precision == "bf16")
    applied = {"path": "plain", "architecture": architecture(model), "attention": attention.implementation,
               "packing": packing, "loss": "model logits", "precision_mode": strategy.name}
    # A packed row's positions restart at every source row, so only a model whose position table (or GPT-Neo's
    # causal-mask buffer) spans the packed length as a whole caps it; rotary embeddings do not.
    limit = position_limit(model.config) if positions_are_hard(model.config) else None
    return TrainingSetup(model=model, precision=strategy, packing=packing, applied=applied, loss=response_loss_sum,
                         max_packed_length=limit)


def build_setup(settings: dict, model_dir: Path, device, precision: str, longest_row: int) -> TrainingSetup:
    model, attention = load_model(model_dir, trust_remote_code=settings.get("trust_remote_code", False),
                                  device=device)
    if settings["method"] == "lora":
        model = add_lora(model, settings)
    setup = plain_setup(model, attention, settings, precision)
    if settings["advanced"]["fast_path"]:
        from . import kernels

        setup = kernels.apply(setup, settings, longest_row=longest_row)
    return setup


def content_sha256(path: Path, cache: Path | None = None) -> str:
    """The file's SHA-256, remembered in ``cache`` (JSON in the work folder) under its size, mtime, ctime
    and inode: a file untouched since is not read again (a 7B model is 14 GB), and any write changes ctime,
    which no one can set back, so a file edited in place is hashed afresh even with its mtime restored."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    known = {}
    if cache is not None:
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        entry = known.get(key) if isinstance(known, dict) else None
        if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    value = file_sha256(path)
    if cache is not None:
        known = known if isinstance(known, dict) else {}
        known[key] = {"stat": stamp, "sha256": value}
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # one per process: ranks never collide
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, cache)
        except OSError:  # only a cache: the next run hashes again
            tmp.unlink(missing_ok=True)
    return value


def fingerprint(settings: dict, setup: TrainingSetup, train_path: Path, model_dir: Path,
                cache: Path | None = None, eval_path: Path | None = None) -> str:
    """Settings + what was applied (the resolved precision among it) + the content of the token files (the
    held-out one where evaluation runs: the best step depends on it) and of the base model's weight files: a
    file touched but identical resumes, an edited one starts over."""
    digest = hashlib.sha256(json.dumps([settings, setup.applied], sort_keys=True, default=str).encode())
    files = [Path(train_path), *([Path(eval_path)] if eval_path else []), *sorted(Path(model_dir).glob("*.safetensors"))]
    for path in files:
        content = content_sha256(path, cache) if path.is_file() else "missing"
        digest.update(f"{path.name}:{content}\n".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- step
def device_batch(setup: TrainingSetup, examples: Examples, rows: list[int], device) -> dict:
    """The micro-batch of these rows on the device: packed where the setup packs one of its length."""
    pack = setup.packs(int(examples.lengths[rows].sum()))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples, rows, pack=pack).items()}


def train_step(setup: TrainingSetup, wrapped, accelerator, examples: Examples, plan: StepPlan) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches of one optimiser step; gradients are left for the
    precision strategy to step. Returns the step's mean loss over all ranks and this rank's non-pad tokens."""
    device, world = accelerator.device, accelerator.num_processes
    micro_batches = plan.micro_batches[accelerator.process_index]
    step_loss, tokens = torch.zeros((), device=device), 0
    for i, rows in enumerate(micro_batches):
        batch = device_batch(setup, examples, rows, device)
        # Only the last micro-batch of a step all-reduces gradients across processes.
        sync = accelerator.no_sync(wrapped) if i < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision.autocast):
                loss_sum, _ = wrapped(batch)
            # DDP averages gradients over ranks; scaling by world keeps the global token mean.
            accelerator.backward(loss_sum * world / plan.trained_tokens)
        step_loss += loss_sum.detach()
        tokens += int(examples.lengths[rows].sum())
    return float(accelerator.reduce(step_loss, reduction="sum")) / plan.trained_tokens, tokens


def optimiser_step(setup: TrainingSetup, loss: float, step: int, max_grad_norm: float, workdir: Path) -> float:
    """Step the precision strategy on the gradients of one step and return their norm; a non-finite loss or
    gradient stops training before the step is applied (the last good checkpoint is kept)."""
    if not math.isfinite(loss):
        raise TrainingError(f"loss became {loss} at step {step + 1}; the last good checkpoint in {workdir} "
                            "is kept. Lower train.learning_rate or check the data.")
    try:
        return setup.precision.step(max_grad_norm)
    except precisions.NonFiniteGradient as err:
        raise TrainingError(f"the gradient norm became {err.norm} at step {step + 1} (the loss, {loss:.4g}, was "
                            f"finite); the step was not applied and the last good checkpoint in {workdir} is kept. "
                            "Lower train.learning_rate, set train.max_grad_norm, or use train.precision: fp32; "
                            "then rerun") from None


class Window:
    """Loss (per trained token) and gradient norm (per step) since the last metrics record."""

    def __init__(self):
        self.loss, self.tokens, self.grad_norm, self.steps = 0.0, 0, 0.0, 0

    def add(self, loss: float, trained_tokens: int, grad_norm: float) -> None:
        self.loss += loss * trained_tokens
        self.tokens += trained_tokens
        self.grad_norm += grad_norm
        self.steps += 1

    def record(self, **fields) -> dict:
        record = {"step": fields.pop("step"), "loss": self.loss / self.tokens, "grad_norm": self.grad_norm / self.steps,
                  **fields}
        self.__init__()
        return record


@torch.no_grad()
def held_out_loss(setup: TrainingSetup, accelerator, examples: Examples, rows: list[int], micro_batch_size: int) -> float:
    """Mean loss per response token over ``rows`` of the held-out ``examples``, computed as a training step
    computes it (the setup's loss, packing and precision) without gradients, in eval mode. Each process scores
    every world-th row and the sums are all-reduced: every process gets the same value."""
    device = accelerator.device
    mine = sorted(rows[accelerator.process_index::accelerator.num_processes], key=lambda i: -int(examples.lengths[i]))
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, labelled tokens
    setup.model.eval()
    for start in range(0, len(mine), micro_batch_size):
        batch = device_batch(setup, examples, mine[start:start + micro_batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision.autocast):
            loss_sum, n = setup.loss(setup.model, batch["input_ids"], batch["labels"], batch["position_ids"],
                                     **setup.forward_kwargs(batch, device))
        sums += torch.stack([loss_sum.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
    setup.model.train()
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


class HeldOut:
    """Evaluation during training: after every ``train.eval_every``-th step and after the last one, the held-out
    loss over the first ``train.eval_rows`` rows of the eval split (the same rows every time). Remembers the
    best step, and with ``train.early_stopping_patience`` says when that many evaluations in a row brought no
    lower loss. Every process computes the same all-reduced loss, so all take the same decisions and stop
    together. Without held-out rows (none given, or an empty split) it evaluates nothing."""

    def __init__(self, settings: dict, examples: Examples | None, *, total: int, setup: TrainingSetup, accelerator):
        self.rows = list(range(len(examples))) if examples is not None else []  # load_held_out's first rows
        self.every = settings["eval_every"] if self.rows else 0
        self.export_best = settings["export"] == "best"
        self.patience = settings["early_stopping_patience"]
        self.examples, self.total, self.setup, self.accelerator = examples, total, setup, accelerator
        self.micro_batch_size = settings["micro_batch_size"]
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.since_best = 0  # evaluations since the best one
        self.evaluations = 0
        self.improved = False  # by the evaluation of the step just trained

    def after_step(self, done: int) -> dict:
        """Evaluate where ``done`` steps are due; the fields this step's metrics record gets ({} if none)."""
        self.improved = False
        if not self.every or (done % self.every and done != self.total):
            return {}
        loss = held_out_loss(self.setup, self.accelerator, self.examples, self.rows, self.micro_batch_size)
        self.evaluations += 1
        self.improved = loss < self.best_loss  # a nan never improves
        if self.improved:
            self.best_step, self.best_loss, self.since_best = done, loss, 0
        else:
            self.since_best += 1
        return {"eval_loss": loss}

    @property
    def stop_early(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def keep_best(self, done: int) -> bool:
        """Whether this step's weights must be kept as a checkpoint: a new best to export, before the last step."""
        return self.export_best and self.improved and done < self.total

    def exported_step(self, done: int) -> int:
        return self.best_step if self.export_best and self.best_step is not None else done

    def state_dict(self) -> dict:
        return {"best_step": self.best_step, "best_loss": self.best_loss if self.best_step is not None else None,
                "since_best": self.since_best, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best_step, self.since_best, self.evaluations = state["best_step"], state["since_best"], state["evaluations"]
        self.best_loss = math.inf if state["best_loss"] is None else state["best_loss"]

    def summary(self, done: int) -> dict:
        return {"eval_every": self.every, "eval_rows": len(self.rows) if self.every else 0,
                "evaluations": self.evaluations, "best_step": self.best_step,
                "best_eval_loss": self.best_loss if self.best_step is not None else None,
                "exported": "best" if self.export_best else "last", "exported_step": self.exported_step(done),
                "early_stopping_patience": self.patience, "stopped_early": self.stop_early and done < self.total,
                "stopped_early_at_step": done if self.stop_early and done < self.total else None}


# ------------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class Progress:
    """Where training stands: the step it started from, tokens seen (this rank's non-pad, and trained in
    the global batch) and seconds trained, across resumes."""

    start: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    elapsed_before: float = 0.0
    elapsed_s: float = 0.0

    def advance(self, tokens: int, trained_tokens: int, *, elapsed: float) -> None:
        self.tokens += tokens
        self.trained_tokens += trained_tokens
        self.elapsed_s = self.elapsed_before + elapsed

    def trained_tokens_per_s(self) -> float:
        return self.trained_tokens / max(self.elapsed_s, 1e-9)

    def totals(self, accelerator) -> dict:
        """The counters of a metrics record (non-pad tokens summed over processes)."""
        tokens = self.tokens
        if accelerator.num_processes > 1:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), reduction="sum"))
        return {"tokens": tokens, "trained_tokens": self.trained_tokens, "elapsed_s": round(self.elapsed_s, 3)}

    def extra(self) -> dict:
        """What a checkpoint keeps of it."""
        return {"tokens": self.tokens, "trained_tokens": self.trained_tokens, "elapsed_s": self.elapsed_s}

    def summary(self) -> dict:
        return {"trained_tokens": self.trained_tokens, "elapsed_s": round(self.elapsed_s, 2),
                "trained_tokens_per_s": round(self.trained_tokens_per_s(), 2), "peak_rss_mb": round(peak_rss_mib(), 1)}


def resume(setup: TrainingSetup, scheduler, held_out: HeldOut, workdir: Path, fp: str, log) -> Progress:
    ckpt = latest_valid(workdir, fp, log=log)
    if not ckpt:
        return Progress()
    try:
        setup.precision.load_state_dict({"trainable": ckpt["trainable"], "optimizer": ckpt["optimizer"]})
    except KeyError as err:
        raise TrainingError(f"checkpoint {ckpt['step']} in {workdir} does not fit this model ({err}); delete "
                            "the folder to start over") from err
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    extra = ckpt["extra"]
    held_out.load_state_dict(extra["held_out"])
    best = held_out.exported_step(ckpt["step"])
    if not (workdir / f"step-{best:08d}").is_dir():  # pruned only where a later checkpoint was unreadable
        raise TrainingError(f"checkpoint {ckpt['step']} in {workdir} exports the best step, {best}, whose checkpoint "
                            "is gone; delete the folder to start over, or set train.export: last")
    log(f"resuming from checkpoint at step {ckpt['step']}")
    return Progress(ckpt["step"], extra["tokens"], extra["trained_tokens"], extra["elapsed_s"], extra["elapsed_s"])


def checkpoint(writer: BackgroundWriter, setup: TrainingSetup, scheduler, held_out: HeldOut, workdir: Path, fp: str,
               step: int, progress: dict, *, finish: bool) -> None:
    """Start writing a resumable checkpoint at ``step`` (``writer.wait()`` before the weights change), and with
    ``finish`` wait for it: before a stop, whose other processes exit after the next barrier and whose launcher
    then ends this one. The best step's checkpoint (train.export: best) is kept whatever its age."""
    state = setup.precision.state_dict()
    best = held_out.exported_step(step) if held_out.export_best else None
    writer.submit(workdir, step, trainable=state["trainable"], optimizer_state=state["optimizer"],
                  scheduler_state=scheduler.state_dict(), fingerprint=fp,
                  extra={**progress, "held_out": held_out.state_dict()}, protect=best)
    if finish:
        writer.wait()


def restore_best(setup: TrainingSetup, workdir: Path, fp: str, step: int) -> None:
    """Give the model the weights (and optimiser state: Kahan keeps the low bits of bf16 weights there) of the
    best step's checkpoint, as resuming from it would: export then writes what a run of that many steps would."""
    path = workdir / f"step-{step:08d}"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise TrainingError(f"the best step's checkpoint {path} cannot be read ({err}); delete {workdir} to train "
                            "again, or set train.export: last") from err
    if ckpt["fingerprint"] != fp:
        raise TrainingError(f"the best step's checkpoint {path} belongs to other settings or data; delete {workdir} "
                            "to train again")
    setup.precision.load_state_dict({"trainable": ckpt["trainable"], "optimizer": ckpt["optimizer"]})


def start_log(log_path: Path, start_step: int) -> None:
    """The work folder's metrics log, cut back to the checkpoint a resumed run starts from."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if log_path.exists() and start_step:
        # A line torn by a kill mid-write (the last one, typically) is dropped with a warning, not fatal.
        kept = [r for r in read_jsonl(log_path, skip_damaged=True)
                if isinstance(r.get("step"), int) and r["step"] <= start_step]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ------------------------------------------------------------------------------------------ export
def merged_lora(model, model_dir: Path, settings: dict, adapter_dir: Path | None = None):
    """The adapters merged into the base model's original fp32 weights: merged into bf16 weights, an
    update smaller than bf16's resolution (1/256 of a weight) would round away. The adapter alone goes
    to ``adapter_dir`` first where one is given (a peft folder), without the local path of the base model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    fresh, _ = load_model(model_dir, trust_remote_code=settings.get("trust_remote_code", False))
    fresh = add_lora(fresh, settings)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    if adapter_dir is not None:
        for config in fresh.peft_config.values():
            config.base_model_name_or_path = None
        fresh.save_pretrained(adapter_dir, safe_serialization=True)
    return fresh.merge_and_unload()


def export(setup: TrainingSetup, model_dir: Path, out_dir: Path, settings: dict) -> None:
    """Write the tuned model as a plain folder that AutoModelForCausalLM loads; LoRA is merged, and its
    adapter alone is in the folder's ``adapter/`` (peft's PeftModel.from_pretrained(base, that folder))."""
    from transformers import AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        lora = settings["method"] == "lora"
        model = merged_lora(setup.model, model_dir, settings, tmp / "adapter") if lora else setup.model
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        if settings.get("template_path"):
            shutil.copy(settings["template_path"], tmp / "instructflow_template.yaml")
        write_json(tmp / "instructflow_training.json", {  # the template's file name and hash, not its local path
            **{k: v for k, v in settings.items() if k != "template_path"}, **({"template": Path(settings["template_path"]).name,
            "template_sha256": hashlib.sha256(Path(settings["template_path"]).read_bytes()).hexdigest()} if settings.get("template_path") else {})})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        # Only a complete folder ever gets the final name, so a later stage never loads half a model.
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"cannot write the tuned model to {out_dir}: {err}. Free disk space or fix the "
                            "folder's permissions, then rerun: training resumes from its last checkpoint") from err


# ------------------------------------------------------------------------------------------- train
def planned_steps(settings: dict, planner: BatchPlanner) -> int:
    """train.max_steps, or with train.epochs that many passes over the rows (an epoch is the planner's
    steps_per_epoch full batches of the rows the sources' weights give it; at least one step)."""
    if settings["epochs"]:
        return max(1, math.ceil(settings["epochs"] * planner.steps_per_epoch))
    return settings["max_steps"]


class StopSignals:
    """SIGTERM (SLURM's warning before the time limit, a scheduler's preemption) and SIGINT (Ctrl-C) from
    the moment training starts loading: remembered, so the loop finishes its step, writes a checkpoint and stops. A second
    SIGINT gets the handler that was there before (Ctrl-C twice: stop now; checkpoints are atomic, so that
    loses at most the one being written). Further SIGTERMs are ignored: on SLURM one comes from the
    scheduler to every process of the job step and more from the launcher and Snakemake passing theirs on,
    and the scheduler sends SIGKILL itself when its grace time is up. Installed only inside ``with``, and
    only in the main thread (Python's rule); the old handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.received == signum == signal.SIGINT:
            old = self._old.get(signum)
            old = signal.SIG_DFL if old is None else old
            signal.signal(signum, old)
            if callable(old):
                old(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        if self.received is None:
            self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            # After a stop the process only exits (non-zero): the SIGTERMs still passed on must not kill it
            # while it does, or the exit status would say "killed" instead of "stopped, checkpointed".
            stopping = self.received == signum == signal.SIGTERM
            signal.signal(signum, signal.SIG_IGN if stopping else old)
        self._old = {}
        return False

    def stop_requested(self, accelerator) -> bool:
        """Whether to stop after this step: on any process (all of them stop together; one tiny
        all-reduce a step where there are several processes, none for one)."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            flag = bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), reduction="sum"))
        return flag

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another process"


ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def start_accelerator():
    from accelerate import Accelerator

    # oneDNN caches a compiled kernel per matmul shape; packed micro-batches all differ in length, so its
    # default 1,024 entries only pile up (about 0.25 GiB RSS over 20 steps). 64 still holds every shape
    # of one micro-batch, which the layers share; no slower in our runs. Read at the first matmul.
    os.environ.setdefault(ONEDNN_CACHE, "64")
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return Accelerator(cpu=not torch.cuda.is_available())


def train(settings: dict, *, model_dir: Path, train_path: Path, out_dir: Path, metrics_path: Path,
          summary_path: Path, workdir: Path, eval_path: Path | None = None) -> dict:
    """Train, then export the last or the best weights. ``eval_path``: the held-out tokens that train.eval_every
    scores (without it nothing is evaluated, and train.export: best or early stopping is an error)."""
    from tqdm.auto import tqdm

    extra = {k: settings[k] for k in EXTRA_SETTINGS if k in settings}
    settings = {**train_settings({k: v for k, v in settings.items() if k not in EXTRA_SETTINGS}), **extra}
    accelerator = start_accelerator()
    device, world = accelerator.device, accelerator.num_processes
    precision = precisions.resolve(settings["precision"], device)
    torch.manual_seed(settings["seed"])

    # From here on: a signal while the model loads stops after the first step, with its checkpoint. Checkpoints
    # are written while the next step's gradients are computed; leaving the block waits for the last one.
    with StopSignals() as stop, BackgroundWriter() as writer:
        examples = Examples.load(train_path)
        check_rows(settings, train_path, examples, world)
        held_out_examples = load_held_out(settings, eval_path)
        # Held-out rows pass through the same attention: the longest of either split decides (a sliding window).
        longest_row = max(int(split.lengths.max()) for split in (examples, held_out_examples) if split is not None)
        setup = build_setup(settings, model_dir, device, precision, longest_row=longest_row)
        planner = BatchPlanner(examples, batch_size=settings["batch_size"],
                               micro_batch_size=settings["micro_batch_size"], world_size=world, seed=settings["seed"],
                               pack=setup.packing, source_weights=settings.get("source_weights"))
        total = planned_steps(settings, planner)
        scheduler = torch.optim.lr_scheduler.LambdaLR(setup.precision.optimizer, lambda s: lr_factor(
            s, warmup=settings["warmup_steps"], total=total, kind=settings["lr_scheduler"]))
        held_out = HeldOut(settings, held_out_examples, total=total, setup=setup, accelerator=accelerator)
        fp = fingerprint(settings, setup, train_path, model_dir, cache=workdir / "content-sha256.json",
                         eval_path=eval_path if held_out.every else None)
        progress = resume(setup, scheduler, held_out, workdir, fp, accelerator.print)
        log_path = workdir / "metrics.jsonl"
        if accelerator.is_main_process:
            start_log(log_path, progress.start)

        # `setup.model` stays the plain transformers model (the wrapper shares its parameters).
        wrapped = accelerator.prepare(ResponseLoss(setup))
        wrapped.train()
        started = time.perf_counter()
        window = Window()
        bar = tqdm(total=total, initial=progress.start, desc="train", unit="step", dynamic_ncols=True, mininterval=5,
                   disable=not accelerator.is_main_process)
        done = progress.start
        for step in range(progress.start, total):
            plan = planner.step(step)
            loss, tokens = train_step(setup, wrapped, accelerator, examples, plan)
            writer.wait()  # a checkpoint still being written reads the weights the optimiser step changes
            grad_norm = optimiser_step(setup, loss, step, settings["max_grad_norm"], workdir)
            window.add(loss, plan.trained_tokens, grad_norm)
            scheduler.step()
            progress.advance(tokens, plan.trained_tokens, elapsed=time.perf_counter() - started)
            done = step + 1
            bar.update(1)
            evaluation = held_out.after_step(done)
            stopping = stop.stop_requested(accelerator)
            last = done == total or held_out.stop_early
            if done % settings["log_every"] == 0 or last or evaluation or (stopping and window.steps):
                record = window.record(step=done, lr=scheduler.get_last_lr()[0], **progress.totals(accelerator),
                                       **evaluation)
                if accelerator.is_main_process:
                    append_jsonl(log_path, [record])
                    bar.set_postfix(loss=f"{record['loss']:.4f}", trained_tok_s=f"{progress.trained_tokens_per_s():.0f}")
            periodic = settings["checkpoint_every"] and done % settings["checkpoint_every"] == 0 and not last
            if periodic or stopping or held_out.keep_best(done):
                if accelerator.is_main_process:
                    checkpoint(writer, setup, scheduler, held_out, workdir, fp, done, progress.extra(), finish=stopping)
                accelerator.wait_for_everyone()
            if held_out.stop_early:  # before a signal's stop: a run resumed past its early stop would train on
                accelerator.print(f"stopping early after step {done}: {held_out.patience} held-out evaluations "
                                  f"without a loss below {held_out.best_loss:.4f} (step {held_out.best_step})")
                break
            if stopping:
                bar.close()
                raise TrainingError(f"stopped by {stop.name()} after step {done} of {total}; checkpoint written "
                                    f"to {workdir / f'step-{done:08d}'}; rerun to resume")
    bar.close()
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        if held_out.exported_step(done) != done:
            restore_best(setup, workdir, fp, held_out.exported_step(done))
        setup.precision.to_fp32()
        export(setup, model_dir, out_dir, settings)
        shutil.copy(log_path, metrics_path)
        summary = {"method": settings["method"], "steps": done, "epochs": round(done / planner.steps_per_epoch, 4),
                   "resumed_from_step": progress.start, "sources": planner.sources,
                   "processes": accelerator.num_processes, "device": str(device), "precision": precision,
                   **held_out.summary(done), **setup.summary(), **progress.summary()}
        write_json(summary_path, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def check_rows(settings: dict, train_path: Path, examples: Examples, world: int) -> None:
    """Before the model loads (the batch planner would only say so after minutes of loading): a batch that splits
    into micro-batches on every process, and at least one batch of rows per epoch, counted with data.sources'
    weights. (The workflow's config check says the first too; this is for `instructflow train` run by hand.)"""
    try:
        check_split(settings["batch_size"], settings["micro_batch_size"], world)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    try:
        sources = source_plan(examples, settings.get("source_weights"))
    except ValueError as err:
        raise TrainingError(f"{train_path}: {err}") from None
    per_epoch = sum(source["rows_per_epoch"] for source in sources.values())
    if per_epoch < settings["batch_size"]:
        weighted = f" (with data.sources' weights {per_epoch} per epoch: {sources})" if per_epoch != len(examples) else ""
        raise TrainingError(f"the training split {train_path} has {len(examples)} rows{weighted}, fewer than one batch "
                            f"(train.batch_size: {settings['batch_size']}); lower train.batch_size (and "
                            "train.micro_batch_size to fit), or give more training rows (a larger data file, a "
                            "smaller data.eval_fraction or larger source weights)")


def load_held_out(settings: dict, eval_path: Path | None) -> Examples | None:
    """The held-out examples train.eval_every scores (the first train.eval_rows rows), or None where nothing
    is evaluated; an error where train.export: best or early stopping needs them and there are none."""
    examples = Examples.load(eval_path) if eval_path is not None and settings["eval_every"] else None
    needs = [key for key, on in (("export: best", settings["export"] == "best"),
                                 ("early_stopping_patience", settings["early_stopping_patience"])) if on]
    if needs and (examples is None or not len(examples)):
        what = f"the held-out split {eval_path} has no rows" if eval_path is not None else "no held-out tokens were given"
        raise TrainingError(f"train.{' and train.'.join(needs)} decide by the held-out loss, but {what}; set "
                            "data.eval_fraction above 0 (or give rows that fit tokenize.max_length), or turn them off")
    if examples is None:
        return None
    if not len(examples):
        warnings.warn(f"instructflow: the held-out split {eval_path} has no rows: no held-out loss during training",
                      RuntimeWarning, stacklevel=2)
        return None
    return examples.head(settings["eval_rows"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="JSON string or path to a JSON file of train settings")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--eval", type=Path, help="held-out tokens scored every train.eval_every steps")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)
    text = args.settings
    settings = json.loads(Path(text).read_text() if not text.lstrip().startswith("{") else text)
    try:
        train(settings, model_dir=args.model, train_path=args.train, out_dir=args.out, metrics_path=args.metrics,
              summary_path=args.summary, workdir=args.workdir, eval_path=args.eval)
    except (TrainingError, CheckpointError) as err:
        print(f"instructflow train: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
