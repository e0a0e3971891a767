"""train stage: the training entry point that ``accelerate launch`` runs.

One readable loop (nanoGPT-sized): cached token tensors in, a plain ``save_pretrained`` folder out.
- The batch plan is a pure function of (seed, step), so every rank builds it alone and a resumed run
  continues with the exact batches it would have seen.
- The loss of an optimiser step is the summed cross-entropy over all labelled tokens of the global
  batch divided by their count, so gradient accumulation and several processes give the gradient of
  one large batch (a per-micro-batch mean would weight short answers more).
- Logits are only built for labelled positions (see loss.py).
- Checkpoints live in a work folder outside the rule's outputs (Snakemake deletes outputs before a
  rerun), are written atomically and carry a fingerprint of settings + data.

Run: accelerate launch -m instructflow.train --settings settings.json --model DIR --train TOKENS
     --out MODEL_DIR --metrics metrics.jsonl --summary summary.json --workdir CHECKPOINTS
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from .batching import BatchPlanner, collate
from .checkpoint import CheckpointError, latest_valid, save_checkpoint
from .config import train_settings
from . import allocator, attention, fused, lean_layers
from .device import attention_kernel, autocast, bf16_supported
from .examples import Examples
from .io import append_jsonl, read_jsonl, write_json
from .kahan import optimizer_for as kahan_optimizer, restore_fp32 as kahan_restore_fp32
from .loss import response_loss_sum
from .master_weights import MasterWeights

# Keys the workflow passes beside the schema's training settings.
EXTRA_SETTINGS = ("template_path", "trust_remote_code")


class TrainingError(RuntimeError):
    pass


class ResponseLoss(torch.nn.Module):
    """response_loss_sum as a module's forward, so the DDP wrapper accelerate adds sees every forward
    pass: called on the unwrapped model, DDP never all-reduced the gradients and each rank trained alone."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids, seq_lens):
        return response_loss_sum(self.model, input_ids, labels, position_ids, seq_lens)


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fingerprint(settings: dict, train_path: Path, model_dir: Path) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in (train_path, model_dir / "model.safetensors"):
        stat = path.stat() if path.exists() else None
        digest.update(f"{path.name}:{stat.st_size if stat else 0}:{stat.st_mtime_ns if stat else 0}".encode())
    return digest.hexdigest()[:16]


def build_model(model_dir: Path, settings: dict, bf16_frozen: bool = False):
    """The model to train; LoRA adapters added per settings. ``bf16_frozen`` (LoRA under bf16 autocast)
    stores the frozen weights of adapted linear layers in bf16: autocast would cast them to bf16 for every
    micro-batch anyway, so the matmuls are the same, with half their memory and no casts."""
    from transformers import AutoModelForCausalLM

    kernel = attention_kernel()
    if settings["packing"] and kernel is None:
        kernel = attention.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=kernel,
                                                     trust_remote_code=settings.get("trust_remote_code", False))
    except ValueError as err:
        if kernel != attention.NAME:
            raise
        # Without the attention interface, packed rows could attend to each other: refuse, don't guess.
        raise TrainingError(f"this model's architecture does not support packed training ({err}); "
                            "set train.packing: false") from err
    model.config.use_cache = False
    if settings["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = settings["lora"]
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
        if bf16_frozen:
            from peft.tuners.lora import LoraLayer

            for module in model.modules():
                base = module.get_base_layer() if isinstance(module, LoraLayer) else None
                if isinstance(base, torch.nn.Linear):
                    base.weight.data = base.weight.data.to(torch.bfloat16)
    return model


def merged_lora(model, model_dir: Path, settings: dict):
    """The adapters merged into the base model's original fp32 weights: merged into bf16 weights, an
    update smaller than bf16's resolution (1/256 of a weight) would round away."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    fresh = build_model(model_dir, settings)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    return fresh.merge_and_unload()


def trainable_state(model, masters: MasterWeights | None = None) -> dict[str, torch.Tensor]:
    """The weights a checkpoint keeps: the fp32 masters where the model itself is bf16."""
    if masters:
        return {name: t.cpu() for name, t in masters.state_dict().items()}
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_free_memory() -> None:
    """Hand the heap that glibc keeps after training (freed activations, ~1-2 GB) back to the system, so
    export's second model (LoRA merge) and serialisation do not add to it. No-op without glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def export(model, model_dir: Path, out_dir: Path, settings: dict) -> None:
    """Write the tuned model as a plain folder that AutoModelForCausalLM loads; LoRA is merged."""
    from transformers import AutoTokenizer

    release_free_memory()
    if settings["method"] == "lora":
        model = merged_lora(model, model_dir, settings)
    model.config.use_cache = True
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        if settings.get("template_path"):
            shutil.copy(settings["template_path"], tmp / "instructflow_template.yaml")
        write_json(tmp / "instructflow_training.json", settings)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        # Only a complete folder ever gets the final name, so a later stage never loads half a model.
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"cannot write the tuned model to {out_dir}: {err}. Free disk space or fix the "
                            "folder's permissions, then rerun: training resumes from its last checkpoint") from err


def resolve_precision(settings: dict, bf16_ok: bool) -> str:
    """What `train.precision: auto` means here: fp32 without native bf16; with it, full fine-tuning
    takes bf16-kahan (as fast as bf16 on fp32 masters, 0.7 GiB less memory, held-out loss as good or
    better in our runs: docs/benchmarks.md) unless weight decay is set, which it cannot apply (kahan.py);
    then, and for LoRA, bf16."""
    if settings["precision"] != "auto":
        return settings["precision"]
    if not bf16_ok:
        return "fp32"
    return "bf16-kahan" if settings["method"] == "full" and not settings["weight_decay"] else "bf16"


def train(settings: dict, *, model_dir: Path, train_path: Path, out_dir: Path, metrics_path: Path,
          summary_path: Path, workdir: Path) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    extra = {k: settings[k] for k in EXTRA_SETTINGS if k in settings}
    settings = {**train_settings({k: v for k, v in settings.items() if k not in EXTRA_SETTINGS}), **extra}
    # oneDNN caches a compiled kernel per matmul shape; packed micro-batches all differ in length, so its
    # default 1,024 entries only pile up (about 0.25 GiB RSS over 20 steps). 64 still holds every shape
    # of one micro-batch, which the layers share; no slower in our runs. Read at the first matmul.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    precision = resolve_precision(settings, bf16_supported(device))
    use_bf16 = precision != "fp32"
    torch.manual_seed(settings["seed"])

    examples = Examples.load(train_path)
    planner = BatchPlanner(examples, batch_size=settings["batch_size"], micro_batch_size=settings["micro_batch_size"],
                           world_size=world, seed=settings["seed"], pack=settings["packing"])
    row_lengths = examples.lengths
    model = build_model(model_dir, settings, bf16_frozen=use_bf16)
    # Full fine-tuning in bf16 runs the model itself in bf16: the optimiser on fp32 masters (bf16,
    # master_weights.py) or on the bf16 weights with Kahan-compensated updates (bf16-kahan, kahan.py).
    bf16_model = precision in ("bf16", "bf16-kahan") and settings["method"] == "full"
    kahan = bf16_model and precision == "bf16-kahan"
    masters = MasterWeights(model) if bf16_model and not kahan else None
    if kahan:
        optimizer = kahan_optimizer(model, lr=settings["learning_rate"], betas=(0.9, 0.95),
                                    weight_decay=settings["weight_decay"])
        params = optimizer.param_groups[0]["params"]
    else:
        params = masters.masters if masters else [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel per tensor, in place; the default foreach path allocates temporaries as large
        # as all parameters together (about 0.2 GB more peak RSS for a 135M model on CPU).
        optimizer = torch.optim.AdamW(params, lr=settings["learning_rate"], weight_decay=settings["weight_decay"],
                                      betas=(0.9, 0.95), fused=True)
    autocast_on = use_bf16 and not bf16_model
    fused.enable(settings["fused_kernels"])
    # A model in its own dtype gets RMSNorm and SwiGLU layers that keep less for backward (lean_layers.py).
    lean = {} if autocast_on else lean_layers.patch(model)
    total = settings["max_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=settings["warmup_steps"], total=total, kind=settings["lr_scheduler"]))

    fp = fingerprint(settings, train_path, model_dir)
    log_path = workdir / "metrics.jsonl"
    start_step, tokens, trained_tokens, elapsed_before = 0, 0, 0, 0.0
    ckpt = latest_valid(workdir, fp, log=accelerator.print)
    if ckpt:
        missing = set(trainable_state(model, masters)) - set(ckpt["trainable"])
        if missing:
            raise TrainingError(f"checkpoint {ckpt['step']} lacks weights {sorted(missing)[:3]}...")
        if masters:
            masters.load_state_dict(ckpt["trainable"])
        else:
            model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        tokens, trained_tokens = ckpt["extra"]["tokens"], ckpt["extra"]["trained_tokens"]
        elapsed_before = ckpt["extra"]["elapsed_s"]
        accelerator.print(f"resuming from checkpoint at step {start_step}")
    if accelerator.is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(log_path) if r["step"] <= start_step] if log_path.exists() and start_step else []
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # `model` stays the plain transformers model (the wrapper shares its parameters) for checkpoints and export.
    wrapped, optimizer = accelerator.prepare(ResponseLoss(model), optimizer)
    wrapped.train()
    started = time.perf_counter()
    window_loss, window_tokens = 0.0, 0
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not accelerator.is_main_process,
               dynamic_ncols=True, mininterval=5)
    for step in range(start_step, total):
        plan = planner.step(step)
        micro_batches = plan.micro_batches[rank]
        step_loss = torch.zeros((), device=device)
        for i, rows in enumerate(micro_batches):
            batch = collate(examples, rows, pack=settings["packing"])
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            pos = batch["position_ids"].to(device) if batch["position_ids"] is not None else None
            seq_lens = batch["seq_lens"]
            # Only the last micro-batch of a step all-reduces gradients across processes.
            sync = accelerator.no_sync(wrapped) if i < len(micro_batches) - 1 else contextlib.nullcontext()
            with sync:
                with autocast(device, enabled=autocast_on):
                    loss_sum, _ = wrapped(ids, labels, pos, seq_lens)
                # DDP averages gradients over ranks; scaling by world keeps the global token mean.
                accelerator.backward(loss_sum * world / plan.trained_tokens)
            step_loss += loss_sum.detach()
            tokens += int(row_lengths[rows].sum())
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        loss_value = float(step_loss) / plan.trained_tokens
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {step + 1}; the last good checkpoint in {workdir} "
                                "is kept. Lower train.learning_rate or check the data.")
        if masters:
            masters.step(optimizer, settings["max_grad_norm"])
        else:
            if settings["max_grad_norm"]:
                accelerator.clip_grad_norm_(params, settings["max_grad_norm"])
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += plan.trained_tokens
        window_loss += float(step_loss)
        window_tokens += plan.trained_tokens
        done = step + 1
        bar.update(1)
        if done % settings["log_every"] == 0 or done == total:
            elapsed = elapsed_before + time.perf_counter() - started
            all_tokens = int(accelerator.reduce(torch.tensor(tokens, device=device), reduction="sum")) if world > 1 else tokens
            record = {"step": done, "loss": window_loss / window_tokens, "lr": scheduler.get_last_lr()[0],
                      "tokens": all_tokens, "trained_tokens": trained_tokens, "elapsed_s": round(elapsed, 3)}
            window_loss, window_tokens = 0.0, 0
            if accelerator.is_main_process:
                append_jsonl(log_path, [record])
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{trained_tokens / max(elapsed, 1e-9):.0f}")
        if settings["checkpoint_every"] and done % settings["checkpoint_every"] == 0 and done < total:
            if accelerator.is_main_process:
                save_checkpoint(workdir, done, trainable=trainable_state(model, masters),
                                optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                                fingerprint=fp, extra={"tokens": tokens, "trained_tokens": trained_tokens,
                                                       "elapsed_s": elapsed_before + time.perf_counter() - started})
            accelerator.wait_for_everyone()
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - started
    accelerator.wait_for_everyone()
    summary = {}
    if masters:
        masters.restore_fp32()
    if kahan:
        # The fp32 weights come from the heap glibc kept after training, not on top of it.
        release_free_memory()
        kahan_restore_fp32(model, optimizer)
    if accelerator.is_main_process:
        export(model, model_dir, out_dir, settings)
        shutil.copy(log_path, metrics_path)
        summary = {"method": settings["method"], "steps": total, "resumed_from_step": start_step,
                   "processes": world, "device": str(device), "precision": precision, "bf16": use_bf16,
                   "master_weights": masters is not None,
                   "kahan_bf16": kahan, "lean_layers": lean, "packing": settings["packing"],
                   "trainable_parameters": sum(p.numel() for p in params),
                   "trained_tokens": trained_tokens, "elapsed_s": round(elapsed, 2),
                   "trained_tokens_per_s": round(trained_tokens / max(elapsed, 1e-9), 2),
                   "peak_rss_mb": round(peak_rss_mb(), 1), "allocator": allocator.in_use(),
                   "fused_kernels": fused.report()}
        write_json(summary_path, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="JSON string or path to a JSON file of train settings")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)
    text = args.settings
    settings = json.loads(Path(text).read_text() if not text.lstrip().startswith("{") else text)
    try:
        train(settings, model_dir=args.model, train_path=args.train, out_dir=args.out, metrics_path=args.metrics,
              summary_path=args.summary, workdir=args.workdir)
    except (TrainingError, CheckpointError) as err:
        print(f"instructflow train: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
