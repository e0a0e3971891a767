"""One trainer per process: ``python -m bench.systems NAME --config CONFIG.json --out RESULT.json``.

Every system trains the same model on the same rows for the same steps and reports, per optimiser
step, its wall time, the non-pad tokens (prompt + response of the rows it saw) and the trained tokens
(response tokens that carry a loss), plus its peak RSS and, where asked, the held-out loss of the
trained model computed by one shared function (instructflow.evaluate.eval_loss). For the counted FLOPs
(bench/flops.py) each step also records what the model ran: ``computed`` positions (padding included),
``attention`` as [rows, width] per attention call, ``logits`` (positions projected onto the vocabulary).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .common import IGNORE_INDEX, peak_rss_mib, write_json


def memory(rss_mib: float) -> dict:
    """Peak RSS, and on a GPU the peak memory torch allocated there (what limits the model size there)."""
    out = {"peak_rss_mib": rss_mib}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def model_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def packed_attention(lengths: list[int], implementation: str) -> list[list[int]]:
    """[rows, width] per attention call for one packed (padding-free) sequence of rows of ``lengths``:
    FlashAttention's varlen kernels run row by row; SDPA and eager over a block-diagonal mask run the
    whole packed length at once."""
    if implementation.startswith("flash"):
        return [[1, n] for n in lengths]
    return [[1, sum(lengths)]]


# ------------------------------------------------------------------------- transformers Trainer glue
def _timed_trainer_steps(trainer, counts: list[dict], accumulation: int = 1) -> list[dict]:
    """Train, timing each optimiser step with a callback; ``counts`` is filled by the collator,
    one entry per batch (no dataloader workers: batches i*accumulation ... are step i)."""
    from transformers import TrainerCallback

    times: list[float] = []

    def now() -> float:  # on a GPU, once the work queued so far has run
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = now()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(now() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    # Counts add up over a step's micro-batches; lists (attention calls) are joined.
    per_step = [{k: sum((c[k] for c in counts[i : i + accumulation]), [] if isinstance(counts[i][k], list) else 0)
                 for k in counts[i]} for i in range(0, len(counts), accumulation)]
    return [{"seconds": t, **c} for t, c in zip(times, per_step)]


def _load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Packed rows only stay apart when no KV cache is built during training (see guide/performance.md).
    model.config.use_cache = False
    return model


def _rows(cfg: dict):
    from instructflow.examples import Examples
    from instructflow.io import read_parquet

    train = Examples.load(cfg["train"])
    texts = read_parquet(cfg["prompts"]).set_index("row")
    rows = [int(r) for r in train.row.tolist()]
    trained = [int((train.get(i)[1] != IGNORE_INDEX).sum()) for i in range(len(train))]
    return texts.loc[rows, "prompt"].tolist(), texts.loc[rows, "response"].tolist(), trained, train


def recipe_2023(cfg: dict) -> dict:
    """The 2023 script: every row padded to 512, fp32, batch 8, labels = input_ids (pads included),
    transformers Trainer with its defaults, lr 1e-3, warmup 10, weight decay 0.01."""
    from torch.utils.data import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    prompts, responses, _, _ = _rows(cfg)

    class InstructDataset(Dataset):
        def __init__(self):
            self.items = []
            for p, r in zip(prompts, responses):
                enc = tokenizer(p + r, padding="max_length", max_length=512, truncation=True)
                n_prompt = len(tokenizer(p)["input_ids"])
                self.items.append((torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"]),
                                   sum(enc["attention_mask"]) - n_prompt))

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    counts: list[dict] = []

    def collate(data):
        # Every row is computed at its padded 512 positions, attention included, logits at all of them.
        computed = int(sum(f[0].numel() for f in data))
        counts.append({"nonpad": int(sum(int(f[1].sum()) for f in data)), "trained": int(sum(f[2] for f in data)),
                       "computed": computed, "attention": [[len(data), 512]], "logits": computed})
        return {"input_ids": torch.stack([f[0] for f in data]), "attention_mask": torch.stack([f[1] for f in data]),
                "labels": torch.stack([f[0] for f in data])}

    args = TrainingArguments(output_dir=cfg["work"], max_steps=cfg["steps"], per_device_train_batch_size=8,
                             warmup_steps=10, weight_decay=0.01, learning_rate=1e-3, use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", report_to=[], logging_steps=1000, dataloader_num_workers=0,
                             disable_tqdm=True, seed=42)
    trainer = Trainer(model=_load_model(cfg["model"]), args=args, train_dataset=InstructDataset(), data_collator=collate)
    steps = _timed_trainer_steps(trainer, counts)
    return {"steps": steps, **memory(peak_rss_mib()), "bf16": False, "method": "full",
            "model_config": model_config(cfg["model"]),
            "parameters": sum(p.numel() for p in trainer.model.parameters())}


def trl_sft(cfg: dict, packed: bool, lora: bool = False) -> dict:
    """TRL's SFTTrainer as its docs recommend for speed: padding-free batches (rows flattened, position
    ids restarting per row), bf16, completion-only loss, gradient checkpointing off; our optimiser and
    learning-rate schedule.

    packed=False: it trains on exactly the rows our train stage takes at each step, in micro-batches of
    the same size (its dataset is laid out in our batch plan's order and read sequentially), so the
    held-out losses compare at the same rows, trained tokens and schedule.
    packed=True: the issue's reference setup: its own shuffled rows, BFD-packed into rows of 512 tokens,
    as many per step as give about the tokens of our step.
    lora=True: peft LoRA with our train stage's LoRA settings (rank, alpha, dropout, target modules)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from instructflow.batching import BatchPlanner
    from instructflow.config import train_settings
    from instructflow.evaluate import eval_loss
    from instructflow.examples import Examples
    from instructflow.train import lr_factor

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    prompts, responses, _, train = _rows(cfg)
    ours = train_settings(cfg["ours"])
    if packed:
        dataset = Dataset.from_dict({"prompt": prompts, "completion": responses})
        accumulation, micro = 1, max(1, round(ours["batch_size"] * float(train.lengths.float().mean()) / 512))
        layout = {"train_sampling_strategy": "random", "max_length": 512, "packing": True, "packing_strategy": "bfd"}
    else:
        planner = BatchPlanner(train, batch_size=ours["batch_size"], micro_batch_size=ours["micro_batch_size"],
                               world_size=1, seed=ours["seed"], pack=ours["advanced"]["packing"])
        order = [r for step in range(cfg["steps"]) for m in planner.step(step).micro_batches[0] for r in m]
        dataset = Dataset.from_dict({"prompt": [prompts[r] for r in order], "completion": [responses[r] for r in order]})
        accumulation, micro = ours["batch_size"] // ours["micro_batch_size"], ours["micro_batch_size"]
        # Rows are already within the tokenize stage's max_length (TRL refuses to enforce one here).
        layout = {"train_sampling_strategy": "sequential", "max_length": None, "packing": False}
    # Learning rate, betas, weight decay and schedule come with the optimiser and scheduler below.
    args = SFTConfig(output_dir=cfg["work"], max_steps=cfg["steps"], per_device_train_batch_size=micro,
                     gradient_accumulation_steps=accumulation, **layout, padding_free=True, pad_to_multiple_of=None,
                     completion_only_loss=True, gradient_checkpointing=False, bf16=cfg["bf16"], max_grad_norm=1.0,
                     use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[], logging_steps=1000,
                     dataloader_num_workers=0, disable_tqdm=True, seed=42)
    # Our optimiser and learning-rate schedule, step for step (transformers' warm-up starts at lr 0).
    model = _load_model(cfg["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=cfg["warmup_steps"], total=cfg["steps"], kind="cosine"))
    peft_config = None
    if lora:
        from peft import LoraConfig, get_peft_model

        settings = ours["lora"]
        peft_config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                                 target_modules=settings["target_modules"], task_type="CAUSAL_LM")
        # Wrapped before the optimiser is built, so it steps the adapters only.
        model = get_peft_model(model, peft_config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["learning_rate"],
                                      betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup=cfg["warmup_steps"], total=cfg["steps"], kind="cosine"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         optimizers=(optimizer, scheduler))
    implementation = trainer.model.config._attn_implementation or "sdpa"
    inner = trainer.data_collator
    counts: list[dict] = []

    def collate(features):
        batch = inner(features)
        nonpad = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        # Padding-free: one row whose position ids restart at every packed row; logits at every position.
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
        lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
        computed = int(batch["input_ids"].numel())
        counts.append({"nonpad": nonpad, "trained": int((batch["labels"] != IGNORE_INDEX).sum()),
                       "computed": computed, "attention": packed_attention(lengths, implementation),
                       "logits": computed})
        return batch

    trainer.data_collator = collate
    steps = _timed_trainer_steps(trainer, counts, accumulation)
    used = memory(peak_rss_mib())
    model = trainer.model.eval()
    loss = eval_loss(model, Examples.load(cfg["eval"]), use_bf16=cfg["bf16"]) if cfg.get("eval_loss", True) else {}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps": steps, **used, "bf16": cfg["bf16"], "eval": loss, "method": "lora" if lora else "full",
            "model_config": model_config(cfg["model"]), "attention": implementation,
            "parameters": sum(p.numel() for p in model.parameters() if not lora or not p.requires_grad),
            "trainable_parameters": trainable}


def computed_shapes(cfg: dict, steps: int, attention: str, pack: bool, precision: str) -> list[dict]:
    """Per step, the positions the train stage ran (padding included; packed rows have none) and its
    attention calls as [rows, width]: its batch plan is a pure function of (seed, step), so the bench
    rebuilds it rather than asking the trainer. ``attention``, ``pack``, ``precision``: what it trained with
    (summary.json)."""
    from instructflow.batching import BatchPlanner
    from instructflow.config import train_settings
    from instructflow.examples import Examples
    from instructflow.kernels.attention import NAME as SEGMENTS, group_rows, matmul_max_length

    settings = train_settings(cfg["ours"])
    examples = Examples.load(cfg["train"])
    lengths = examples.lengths.numpy()
    planner = BatchPlanner(examples, batch_size=settings["batch_size"], world_size=1, pack=pack,
                           micro_batch_size=settings["micro_batch_size"], seed=settings["seed"])
    # Every bf16 mode runs the attention's matmuls in bf16 (under autocast too).
    matmul_max = matmul_max_length(torch.bfloat16 if precision == "bf16" else torch.float32)
    out = []
    for i in range(steps):
        computed, calls = 0, []
        for rows in planner.step(i).micro_batches[0]:
            row_lengths = [int(n) for n in lengths[rows]]
            if not pack:
                computed += len(rows) * max(row_lengths)
                calls.append([len(rows), max(row_lengths)])
                continue
            computed += sum(row_lengths)
            if SEGMENTS in attention and not attention.startswith("flash"):  # row groups padded to their longest row
                calls += [[len(group), row_lengths[group[0]]] for group in group_rows(row_lengths, matmul_max)]
            else:
                calls += packed_attention(row_lengths, attention)
        out.append({"computed": computed, "attention": calls})
    return out


def ours(cfg: dict, method: str, **advanced) -> dict:
    """instructflow's train stage, called as `accelerate launch -m instructflow.train` would call it, with
    `train.advanced` settings (docs/speed.md): bf16_mode (where the machine has bf16: auto, the default,
    Kahan-compensated bf16 weights for full fine-tuning; masters, a bf16 model on fp32 master weights;
    autocast, autocast over fp32 weights, TRL's numerics), fused_kernels, fast_path."""
    from instructflow.evaluate import eval_loss
    from instructflow.examples import Examples
    from instructflow.io import read_jsonl
    from instructflow.train import train

    work = Path(cfg["work"])
    settings = {**cfg["ours"], "method": method, "max_steps": cfg["steps"], "learning_rate": cfg["learning_rate"],
                "warmup_steps": cfg["warmup_steps"], "log_every": 1, "checkpoint_every": 0,
                "precision": "auto" if cfg["bf16"] else "fp32",
                "advanced": {**cfg["ours"].get("advanced", {}), **advanced}}
    summary = train(settings, model_dir=Path(cfg["model"]), train_path=Path(cfg["train"]), out_dir=work / "model",
                    metrics_path=work / "metrics.jsonl", summary_path=work / "summary.json", workdir=work / "ckpt")
    used = memory(peak_rss_mib())
    log = read_jsonl(work / "metrics.jsonl")
    steps, prev = [], {"elapsed_s": 0.0, "tokens": 0, "trained_tokens": 0}
    # The fast path builds logits only where a label is predicted (loss.py); the plain path's model all.
    labelled_logits = summary["loss"] != "model logits"
    for rec, shapes in zip(log, computed_shapes(cfg, len(log), summary["attention"], summary["packing"],
                                                  summary["precision"])):
        trained = rec["trained_tokens"] - prev["trained_tokens"]
        steps.append({"seconds": rec["elapsed_s"] - prev["elapsed_s"], "nonpad": rec["tokens"] - prev["tokens"],
                      "trained": trained, **shapes, "logits": trained if labelled_logits else shapes["computed"]})
        prev = rec
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    loss = eval_loss(model, Examples.load(cfg["eval"]), use_bf16=cfg["bf16"]) if cfg.get("eval_loss", True) else {}
    return {"steps": steps, **used, "bf16": summary["precision"] == "bf16", "eval": loss, "method": method,
            "precision_mode": summary["precision_mode"], "path": summary["path"], "attention": summary["attention"],
            "allocator": summary.get("allocator", "default"), "model_config": model_config(cfg["model"]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": summary["trainable_parameters"]}


def generation(cfg: dict) -> dict:
    """Greedy evaluation generation, batched with the KV cache (what evaluate does) against one
    prompt at a time, on the same held-out prompts."""
    from instructflow.device import pick_device
    from instructflow.evaluate import evaluation_model, generate
    from instructflow.examples import Examples

    model, _ = evaluation_model(cfg["model"], pick_device(), cfg["bf16"])  # as the evaluate stage loads it
    examples = Examples.load(cfg["eval"])
    prompts = [examples.prompt(i) for i in range(min(cfg["gen_prompts"], len(examples)))]
    kw = {"eos_token_ids": [examples.eos_token_id], "pad_token_id": examples.pad_token_id,
          "max_new_tokens": cfg["gen_new_tokens"]}
    generate(model, prompts[:2], batch_size=2, **kw)  # warm-up
    batched, batched_s = generate(model, prompts, batch_size=cfg["gen_batch"], **kw)
    single, single_s = generate(model, prompts, batch_size=1, **kw)
    return {"prompts": len(prompts), "batch_size": cfg["gen_batch"], "max_new_tokens": cfg["gen_new_tokens"],
            "batched_seconds": batched_s, "one_at_a_time_seconds": single_s, "speedup": single_s / batched_s,
            "new_tokens": sum(len(t) for t in batched),
            "same_output": sum(a == b for a, b in zip(batched, single))}


SYSTEMS = {
    "recipe_2023": recipe_2023,
    "trl": lambda cfg: trl_sft(cfg, packed=False),
    "trl_packed": lambda cfg: trl_sft(cfg, packed=True),
    "ours_full": lambda cfg: ours(cfg, "full"),
    "ours_full_masters": lambda cfg: ours(cfg, "full", bf16_mode="masters"),
    "ours_full_autocast": lambda cfg: ours(cfg, "full", bf16_mode="autocast"),
    "ours_full_glibc": lambda cfg: ours(cfg, "full"),  # run.py starts it without jemalloc
    "ours_full_unfused": lambda cfg: ours(cfg, "full", fused_kernels=False),
    "ours_full_plain": lambda cfg: ours(cfg, "full", fast_path=False),
    "ours_lora": lambda cfg: ours(cfg, "lora"),
    "trl_lora": lambda cfg: trl_sft(cfg, packed=False, lora=True),
    "generation": generation,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(SYSTEMS))
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    cfg = json.loads(args.config.read_text())
    torch.manual_seed(42)
    result = SYSTEMS[args.name](cfg)
    result["torch_threads"] = torch.get_num_threads()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
