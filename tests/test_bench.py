"""The bench names the machine class its figures belong to: bf16 CPUs and fp32-only CPUs are never compared."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import cpu_info  # noqa: E402

ZEN2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16 avx512vl\n"
XEON_AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")


def test_cpu_class_follows_native_bf16():
    assert cpu_info(ZEN2) == ("AMD EPYC 7B12", ["avx2"], "fp32 CPU")
    assert cpu_info(ZEN4) == ("AMD EPYC 9B14", ["avx2", "avx512f", "avx512_bf16"], "bf16 CPU")
    # AMX's bf16 matmuls are several times AVX-512 BF16's: a class of its own.
    assert cpu_info(XEON_AMX) == ("Intel(R) Xeon(R) Processor", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"],
                                  "bf16 CPU with AMX")


def test_this_machine_is_classed_by_its_own_flags():
    text = Path("/proc/cpuinfo").read_text()
    _, flags, kind = cpu_info(text)
    words = text.split()
    expected = "bf16 CPU with AMX" if "amx_bf16" in words else "bf16 CPU" if "avx512_bf16" in words else "fp32 CPU"
    assert kind == expected
    assert set(flags) <= set(text.split())


# ----------------------------------------------------------------------------- FLOPs a step computes
from bench.flops import decoder_linear_parameters, step_flops  # noqa: E402

TINY = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 32}


def test_step_flops_by_hand():
    # Per layer: q, o 8x8 each, k, v 8x4 each (1 key/value head of 4), gate/up/down 8x16 each: 576.
    assert decoder_linear_parameters(TINY) == 2 * 576
    # 10 positions in rows of 5 and 5 (one group), logits at 4 of them.
    linear = 2 * 1152 * 10 * 3
    attention = (2 * 5 * 5) * 2 * 2 * 2 * 4 * 2 * 3  # rows*width^2, QK^T + PV, 2 FLOPs, heads, head_dim, layers, fwd+bwd
    head = 2 * 8 * 32 * 4 * 3
    assert step_flops(TINY, positions=10, attention=[(2, 5)], logit_positions=4) == linear + attention + head
    # LoRA: the frozen weights and the head get forward + input gradient only; adapters the full 6 x.
    lora = step_flops(TINY, positions=10, attention=[(2, 5)], logit_positions=4, method="lora", adapter_parameters=7)
    assert lora == linear * 2 / 3 + 6 * 7 * 10 + attention + head * 2 / 3


def test_step_flops_matches_torch_flop_counter():
    """A plain transformers model (eager attention: full score matrices), forward + backward of its
    own loss, which projects every position: the counted FLOPs are what torch counts, within 1%."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 256}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True, attn_implementation="eager"))
    ids = torch.randint(0, 256, (3, 24))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = step_flops(cfg, positions=3 * 24, attention=[(3, 24)], logit_positions=3 * 24)
    assert abs(counter.get_total_flops() / counted - 1) < 0.01


# ------------------------------------------------------------------- one docs section per machine class
from bench.run import fill_fits, markdown, merge_classes, render_docs  # noqa: E402


def _report(kind: str, tok_s: float, gpu: str | None = None) -> dict:
    """A stored bench report of one system, ``tok_s`` non-pad tokens per second, on a machine of ``kind``."""
    steps = [{"seconds": 1.0, "nonpad": tok_s, "trained": tok_s / 2, "computed": tok_s,
              "attention": [[1, int(tok_s)]], "logits": tok_s / 2}] * 3
    cfg = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "vocab_size": 32}
    result = {"steps": steps, "peak_rss_mib": 3 * 1024, "bf16": kind != "fp32 CPU", "method": "full",
              "model_config": cfg, "parameters": 1_000_000, "precision_mode": "bf16-kahan"}
    if gpu:
        result["peak_gpu_mib"] = 1024
    data = {"rows": 10, "mean_tokens": 5.0, "trained_fraction": 0.5}
    return {"date": "2026-12-04 02:00 UTC", "peak_device": "cpu", "peak_bf16_gflops": 400.0, "peak_fp32_gflops": 100.0,
            "machine": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "class": kind, "cores": 2, "torch": "2", "gpu": gpu},
            "config": {"steps": 3, "recipe_steps": 1, "warm": 1, "big_steps": 3, "big_batch": 8,
                       "ours": {"batch_size": 16},
                       "data": {"train": data, "source": "test rows"}},
            "results": {"ours_full": result, "ours_full@qwen2.5-0.5b": result}}


def test_a_run_replaces_only_its_own_machine_class():
    stored = merge_classes({}, _report("bf16 CPU", 300.0))
    stored = merge_classes(stored, _report("GPU: Test GPU", 5000.0, gpu="Test GPU"))
    stored = merge_classes(stored, _report("bf16 CPU", 350.0))  # a later run on the bf16 CPU
    assert sorted(stored) == ["GPU: Test GPU", "bf16 CPU"]
    text = render_docs(stored, "benchmarks.json")
    bf16, fp32, gpu = text.index("## bf16 CPU"), text.index("## fp32 CPU"), text.index("## GPU: Test GPU")
    assert bf16 < fp32 < gpu
    assert "**350.0**" in text[bf16:fp32] and "**300.0**" not in text
    assert "Not measured yet" in text[fp32:gpu] and "**5000.0**" in text[gpu:]
    # No GPU run stored: the GPU section is there and says so.
    only_cpu = render_docs({"bf16 CPU": stored["bf16 CPU"]}, "benchmarks.json")
    assert "## GPU\n\nNot measured yet" in only_cpu


def test_mfu_is_against_the_peak_of_the_systems_own_precision():
    fp32 = render_docs({"fp32 CPU": _report("fp32 CPU", 100.0)}, "b.json")
    bf16 = render_docs({"bf16 CPU": _report("bf16 CPU", 100.0)}, "b.json")
    # 6 x 1 M parameters x 100 tok/s = 0.6 GFLOP/s: 0.6% of the fp32 peak (100), 0.15% -> 0% of the bf16 peak.
    assert "| 1% |" in fp32 and "| 0% |" in bf16
    # A run without native bf16 measures no bf16 peak (its matmuls would be emulated): its fp32 rows still render.
    no_bf16 = render_docs({"fp32 CPU": {**_report("fp32 CPU", 100.0), "peak_bf16_gflops": None}}, "b.json")
    assert "bf16 — GFLOP/s" in no_bf16 and "| 1% |" in no_bf16


def test_the_peak_is_the_highest_of_the_runs_measurements():
    """A peak measured while something else ran would overstate every MFU: the run keeps the highest it measured."""
    from bench.common import Peaks

    peaks = Peaks("cpu", bf16=False)  # one fp32 measurement now; no bf16 one (its matmuls would be emulated)
    assert peaks.samples["bf16"] == [] and len(peaks.samples["fp32"]) == 1 and peaks.samples["fp32"][0] > 0
    first = peaks.samples["fp32"][0]
    peaks.samples["fp32"].append(first / 3)  # as a measurement beside another busy process would give
    assert peaks.best() == {"bf16": None, "fp32": first}
    report = {**_report("bf16 CPU", 300.0), "peak_samples_gflops": {"bf16": [420.0, 143.0], "fp32": [190.0, 77.0]}}
    assert "; the highest of 2 measurements, the lowest bf16 143, fp32 77)" in render_docs({"bf16 CPU": report}, "b.json")


def test_the_24_gib_lines_come_from_the_stored_runs():
    text = "intro\n<!-- fits-24gib: filled by make bench from docs/benchmarks.json -->\nold\n<!-- /fits-24gib -->\nend\n"
    empty = fill_fits(text, {})
    assert "Not measured yet" in empty and "old" not in empty and empty.endswith("end\n")
    filled = fill_fits(text, {"bf16 CPU": _report("bf16 CPU", 300.0)})
    # 3 GiB peak over 1 M parameters: 3221 bytes each; 24 GiB / that = 8 M parameters = 0.0 B.
    assert "bf16 CPU, instructflow full, qwen2.5-0.5b: measured peak 3.00 GiB (3221.2 bytes per parameter)" in filled
    assert fill_fits("no markers\n", {}) == "no markers\n"


def test_a_system_reports_its_own_peak_rss_not_its_parents():
    """ru_maxrss survives exec: a child of a process holding 1 GiB would report >= 1 GiB (its own: ~0.2 GiB, torch)."""
    import subprocess

    child = ("import sys; sys.path.insert(0, %r); from bench.common import peak_rss_mib; print(peak_rss_mib())"
             % str(Path(__file__).resolve().parents[1]))
    held = bytearray(2**30)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page
    peak = float(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    assert peak < 700, peak
    del held


def test_our_steps_record_the_shapes_the_train_stage_computes(train_examples):
    """The bench rebuilds our batch plan: every row of a step is computed once, without padding, and
    sits in exactly one attention call (row groups for the row-by-row attention, the whole packed
    micro-batch for SDPA over a block-diagonal mask, one call per row for FlashAttention)."""
    from bench.systems import computed_shapes
    from instructflow.batching import BatchPlanner
    from instructflow.config import train_settings

    examples, path = train_examples
    cfg = {"train": str(path), "ours": {"batch_size": 4, "micro_batch_size": 2}}
    settings = train_settings(cfg["ours"])
    planner = BatchPlanner(examples, batch_size=4, micro_batch_size=2, world_size=1, seed=settings["seed"], pack=True)
    varlen = "flash varlen (torch.nn.attention.varlen, instructflow_segments)"
    settings = [(attention, precision) for attention in ("row-by-row (instructflow_segments)", "sdpa",
                                                         "flash_attention_2", varlen) for precision in ("bf16", "fp32")]
    for attention, precision in settings:
        shapes = computed_shapes(cfg, 3, attention, pack=True, precision=precision)
        for step, shape in enumerate(shapes):
            micro = planner.step(step).micro_batches[0]
            lengths = [int(examples.lengths[r]) for rows in micro for r in rows]
            assert shape["computed"] == sum(lengths)
            calls = shape["attention"]
            if attention == "sdpa":
                assert calls == [[1, sum(int(examples.lengths[r]) for r in rows)] for rows in micro]
            else:
                assert sum(rows for rows, _ in calls) == len(lengths)
                assert all(width >= min(lengths) for _, width in calls)
            if attention in ("flash_attention_2", varlen):
                assert sorted(width for _, width in calls) == sorted(lengths)


def test_a_kept_system_keeps_its_own_runs_peak_and_warm_up():
    """--keep-results mixes runs: each system's MFU is against the peak its own run measured, its rates
    over the steps after its own run's warm-up."""
    from bench.run import summarise

    result = _report("bf16 CPU", 100.0)["results"]["ours_full"]
    result = {**result, "steps": [{**result["steps"][0], "seconds": 10.0}] + result["steps"][1:]}
    now = {"bf16": 1e12, "fp32": 1e12}
    fresh = summarise({"ours_full": result}, now, warm=0)["ours_full"]
    kept = summarise({"ours_full": {**result, "peaks": {"bf16": 1e9, "fp32": 1e9}, "warm": 1}}, now, warm=0)["ours_full"]
    assert abs(kept["mfu"] / fresh["mfu"] - 1000) < 1e-6 and kept["steps_timed"] == 2 and fresh["steps_timed"] == 3


def test_repeated_runs_report_the_median_run_and_every_runs_rate():
    """--repeat: the table shows the run with the median non-pad tok/s; every run's rate and MFU beside it."""
    from bench.run import median_run

    base = _report("bf16 CPU", 100.0)
    step = base["results"]["ours_full"]["steps"][0]

    def run(seconds: float, date: str) -> dict:
        return {**base["results"]["ours_full"], "steps": [{**step, "seconds": seconds}] * 3, "date": date}

    runs = [run(1.0, "a"), run(4.0, "b"), run(2.0, "c"), {"error": "exit 1", "wall_s": 1.0}]
    chosen = median_run("ours_full", runs, warm=1)
    rate = step["nonpad"]
    assert chosen["date"] == "c" and [x["nonpad_tok_s"] for x in chosen["repeats"]] == [rate, rate / 4, rate / 2]
    assert chosen["failed_repeats"] == 1
    assert median_run("ours_full", runs[:1], warm=1) is runs[0]  # one run: as it is
    text = markdown({**base, "results": {"ours_full": chosen}})
    assert f"**{rate / 2:.1f}**" in text
    assert f"instructflow full: {rate:.1f} / {rate / 4:.1f} / {rate / 2:.1f} tok/s" in text and "1 failed" in text


def test_kept_systems_keep_the_date_of_the_run_that_measured_them():
    """--keep-results twice: a system kept through both runs keeps the first run's date, not the second's."""
    from bench.run import kept_runs

    first = {"date": "02:58", "results": {}}
    second = {"date": "04:23", "kept": kept_runs(first, ["big"])}
    assert second["kept"] == [{"date": "02:58", "systems": ["big"]}]
    third = kept_runs(second, ["big", "trl"])
    assert third == [{"date": "02:58", "systems": ["big"]}, {"date": "04:23", "systems": ["trl"]}]
    text = markdown({**_report("bf16 CPU", 100.0), "kept": third})
    assert "Measured in 3 runs: big on 02:58; trl on 04:23; the others on 2026-12-04 02:00 UTC" in text
    # A report stored before "kept" was a list.
    assert kept_runs({"date": "04:23", "kept": {"date": "02:58", "systems": ["big", "gone"]}}, ["big"]) == \
        [{"date": "02:58", "systems": ["big"]}]


def test_a_gpu_run_says_what_fits_in_the_cards_memory_and_when_weights_were_random():
    report = _report("GPU: Test GPU", 5000.0, gpu="Test GPU")
    report["machine"]["gpu_memory_gib"] = 140.0
    report["config"].update(model_shape="smollm2-135m", eval_loss=False, ours={"batch_size": 64})
    text = markdown(report)
    assert "fits 140 GiB up to (estimate)" in text and "fits 24 GiB" not in text
    assert "random weights in smollm2-135m's published config" in text and "3 steps of 64 rows per system" in text
    # 1 GiB of GPU memory over 1 M parameters: 1073.7 bytes each.
    lines = fill_fits("<!-- fits-24gib: filled by make bench from docs/benchmarks.json -->\n<!-- /fits-24gib -->",
                      {"GPU: Test GPU": report})
    assert "measured peak 1.00 GiB (1073.7 bytes per parameter): up to ~0.1 B parameters in 140 GiB" in lines


def test_a_system_that_outlasts_its_timeout_is_stopped_and_recorded_as_failed(tmp_path, monkeypatch):
    """--system-timeout: a hung system (here a process that sleeps) costs the run its limit, not the whole bench."""
    import time

    import bench.run

    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nsleep 60\n")
    sleeper.chmod(0o755)
    monkeypatch.setattr(bench.run.sys, "executable", str(sleeper))
    t0 = time.perf_counter()
    result = bench.run.run_system("trl", {"steps": 1}, tmp_path, timeout=1.0)
    assert time.perf_counter() - t0 < 30
    assert result["error"] == "stopped after 1 s (--system-timeout)"


def test_a_random_model_of_a_published_shape_keeps_its_vocabulary_and_the_tokenizer(tmp_path):
    """--model-shape: the default model's shape with random weights, for a machine without the bundled GGUF."""
    import json

    from bench import models

    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "model.safetensors").write_text("not copied")
    folder = models.build("smollm2-135m", tmp_path / "out", tokenizer, tiny=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert (folder / "tokenizer.json").read_text() == "{}" and (folder / "model.safetensors").stat().st_size > 1e6
    assert models.config("smollm2-135m")["hidden_size"] == 576  # the published shape, untouched by tiny
    assert "smollm2-135m" not in models.BIGGER  # the bigger models' systems stay what they were


def test_a_lora_row_is_compared_with_trl_lora_where_that_ran():
    from bench.run import same_rows_ratio

    assert same_rows_ratio({"method": "lora", "x_trl_nonpad": 1.4, "x_trl_lora_nonpad": 1.7}) == 1.7
    assert same_rows_ratio({"method": "lora", "x_trl_nonpad": 1.4}) == 1.4  # no TRL LoRA run: TRL full
    assert same_rows_ratio({"method": "full", "x_trl_nonpad": 2.2, "x_trl_lora_nonpad": 2.9}) == 2.2
    lora = _report("GPU: Test GPU", 300.0, gpu="Test GPU")
    base = lora["results"]["ours_full"]
    lora["results"] = {"ours_lora": {**base, "method": "lora", "trainable_parameters": 10},
                       "trl": base, "trl_lora": {**base, "method": "lora", "steps": [{**base["steps"][0], "seconds": 2.0}] * 3}}
    row = next(line for line in markdown(lora).splitlines() if line.startswith("| instructflow LoRA |"))
    assert "| 2.00 |" in row  # 300 tok/s against TRL LoRA's 150, not TRL full's 300


def test_step_profile_times_each_setting_and_shows_where_the_step_goes(tiny_model_dir, tmp_path, capsys):
    """bench/step_profile.py: one line per setting with its step time and rate, the profiler's table for the first."""
    import re

    from bench import step_profile
    from conftest import TEST_DATA

    step_profile.main(["--model", str(tiny_model_dir("llama")), "--data", str(TEST_DATA), "--out", str(tmp_path),
                       "--batch", "4", "8", "--variant", "no_fused", "--steps", "3", "--warm", "1",
                       "--profile-steps", "1"])
    out = capsys.readouterr().out
    lines = re.findall(r"=== full no_fused batch (\d+): ([\d.]+) s a step, (\d+) non-pad tok/s \(([\d.]+) tokens", out)
    assert [int(batch) for batch, *_ in lines] == [4, 8]
    assert all(float(s) > 0 and int(rate) > 0 for _, s, rate, _ in lines)
    assert float(lines[1][3]) > float(lines[0][3])  # twice the rows, more tokens a step
    assert "aten::mm" in out and "Self CPU time total" in out and "path: fast" in out


def test_paired_steps_switch_one_piece_of_the_fast_path_off_and_on_again(tiny_model_dir, train_examples, capsys):
    """bench/paired.py: each piece, switched off, runs what the plain path runs, and switched on again, the fast
    path's; a run prints one ratio per step and their median."""
    import re

    from bench import paired
    from instructflow.config import train_settings
    from instructflow.kernels import fused
    from instructflow.loss import response_loss_sum
    from instructflow.train import no_kwargs

    setup, plain_attention = paired.build(tiny_model_dir("llama"), train_settings({"method": "full"}), "fp32", 64)
    model = setup.model
    fast_attention = model.config._attn_implementation
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert patched and fast_attention != plain_attention and setup.loss is not response_loss_sum
    for piece in [p for p in paired.PIECES if p != "embedding_gradient"]:  # that one below, on a tied model
        to = paired.switch(piece, setup, plain_attention)
        off = to(False)
        assert {"fused_kernels": not fused.enabled(),
                "loss": off.loss is response_loss_sum and off.forward_kwargs is setup.forward_kwargs,
                "lean_layers": not any("forward" in vars(m) for m in patched),
                "attention": model.config._attn_implementation == plain_attention
                and off.forward_kwargs is no_kwargs}[piece], piece
        assert to(True) is setup and fused.enabled() and model.config._attn_implementation == fast_attention
        assert all("forward" in vars(m) for m in patched), piece
    with pytest.raises(SystemExit, match="stays dense"):  # tiny Llama's embedding is not tied
        paired.switch("embedding_gradient", setup, plain_attention)(False)
    tied, tied_attention = paired.build(tiny_model_dir("gpt2"), train_settings({"method": "full"}), "fp32", 64)
    embedding, to = tied.model.get_input_embeddings(), paired.switch("embedding_gradient", tied, tied_attention)
    assert embedding.sparse and to(False) is tied and not embedding.sparse
    assert to(True) is tied and embedding.sparse

    paired.main(["--model", str(tiny_model_dir("llama")), "--train", str(train_examples[1]), "--steps", "2",
                 "--piece", "lean_layers", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert len(re.findall(r"step \d: \d+ tokens, with [\d.]+ tok/s, without [\d.]+ tok/s", out)) == 2
    assert re.search(r"lean_layers \(fp32\), with / without speed: median [\d.]+ over 2 paired steps", out)
