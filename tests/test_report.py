from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest

from instructflow.report import (
    build_report,
    fmt,
    markdown_to_html,
    md_escape,
    md_table,
    plot_loss,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Collects text and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text, self.tags = [], [], [], {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "img":
            self.img_src = dict(attrs)["src"]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _write_metrics(path, n_train=10):
    """Records as train.py writes them into metrics.jsonl."""
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-4, "tokens": 100 * s, "trained_tokens": 80 * s, "elapsed_s": 0.5 * s}
            for s in range(1, n_train + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_loss_png_and_points(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    counts = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "sub" / "loss.png")
    data = (tmp_path / "sub" / "loss.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert counts == {"train_vs_step": 10, "train_vs_tokens": 10}
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "loss.png"]  # no temp file left


def test_plot_loss_draws_the_held_out_points(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["step"] % 4 == 0 or r["step"] == 10:  # train.eval_every 4: steps 4, 8 and the last
            r["eval_loss"] = 2.0 + 1.0 / r["step"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert counts == {"train_vs_step": 10, "train_vs_tokens": 10, "eval_vs_step": 3, "eval_vs_tokens": 3}
    without = tmp_path / "plain.png"
    _write_metrics(tmp_path / "plain.jsonl")
    plot_loss(tmp_path / "plain.jsonl", without)
    assert (tmp_path / "loss.png").read_bytes() != without.read_bytes()


def test_plot_loss_without_data(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png") == {}
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_escaping_roundtrip():
    assert md_escape("a|b\nc") == "a\\|b<br>c"
    assert md_escape("x\r\ny") == "x<br>y"
    assert md_escape("<b>&") == "&lt;b&gt;&amp;"
    assert md_escape("back\\|slash") == "back\\\\\\|slash"
    assert md_escape(0.5) == "0.5000" and md_escape(None) == "—"
    table = md_table(["h|1", "h2"], [["a|b\nc", 1], ["back\\|slash", None]])
    lines = table.strip().splitlines()
    assert lines[0] == "| h\\|1 | h2 |" and lines[1] == "|---|---|"
    assert lines[2] == "| a\\|b<br>c | 1 |"
    html_out = markdown_to_html("## Samples\n\n" + table)
    p = _Checker()
    p.feed(html_out)
    assert not p.errors and not p.stack
    assert p.tags["table"] == 1 and p.tags["tr"] == 3 and p.tags["td"] == 4 and p.tags["h2"] == 1
    text = "".join(p.text)
    assert "h|1" in text and "a|b" in text and "back\\|slash" in text


def test_fmt():
    assert fmt(3) == "3" and fmt(2.34567) == "2.3457" and fmt(1234567.0) == "1.235e+06"
    assert fmt(float("nan")) == "—" and fmt(True) == "true" and fmt({"a": 1}) == '{"a": 1}'


@pytest.fixture
def inputs(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    plot_loss(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    base = {"eval_loss": 2.3456, "perplexity": 10.4395, "exact_match": 0.05, "rouge_l": 0.2117, "chrf": 21.5,
            "eos_rate": 0.25, "length_ratio": 2.75, "n": 40,
            "n_loss_rows": 50, "n_loss_tokens": 812, "generation_seconds": 3.2, "generation_tokens_per_s": 99.1}
    tuned = dict(base, eval_loss=1.2345, perplexity=3.4367, exact_match=0.625, rouge_l=0.7781, chrf=70.25,
                 eos_rate=1.0, length_ratio=1.125)
    delta = {k: tuned[k] - base[k] for k in base}
    (tmp_path / "eval.json").write_text(json.dumps({"base": base, "tuned": tuned, "delta": delta}))
    (tmp_path / "train.json").write_text(json.dumps(
        {"steps": 123, "trained_tokens": 45678, "useful_tokens_per_s": 1512.75, "method": "lora",
         "model": "HuggingFaceTB/SmolLM2-135M", "peak_rss_mb": 2048.5}))
    (tmp_path / "clean.json").write_text(json.dumps(
        {"rows_in": 1000, "rows_kept": 930, "rows_rejected": 70,
         "rejected_by_reason": {"empty_response": 40, "duplicate": 25, "too_long": 5}}))
    (tmp_path / "audit.json").write_text(json.dumps(
        {"n_rows": 930, "max_length": 512, "truncated_rows": 3, "eos_appended": True, "lengths": [1, 2, 3]}))
    (tmp_path / "samples.md").write_text(md_table(
        ["row", "prompt", "reference", "base", "tuned"],
        [[7, "What is 2+2? | quick\nplease", "4", "five <b>", "4"]]))
    return tmp_path, base, tuned


def test_build_report(inputs):
    d, base, tuned = inputs
    build_report("demo-run", metrics_jsonl=d / "metrics.jsonl", eval_metrics=d / "eval.json",
                 samples_md=d / "samples.md", clean_report=d / "clean.json", audit=d / "audit.json",
                 train_summary=d / "train.json", loss_png=d / "plots" / "loss.png",
                 out_md=d / "out" / "report.md", out_html=d / "out" / "report.html")
    md = (d / "out" / "report.md").read_text()
    html_text = (d / "out" / "report.html").read_text()
    assert "demo-run" in md
    for k in ("eval_loss", "perplexity", "exact_match", "rouge_l", "chrf", "eos_rate", "length_ratio"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {k} |"))
        assert row == f"| {k} | {fmt(base[k])} | {fmt(tuned[k])} | {fmt(tuned[k] - base[k])} |"
    assert "| n | 40 | 40 | 0 |" in md
    assert "| eval_loss | 2.3456 | 1.2345 | -1.1111 |" in md
    for text in ("| steps | 123 |", "| useful_tokens_per_s | 1512.7500 |", "| method | lora |",
                 "| peak_rss_mb | 2048.5000 |", "| rows_in | 1000 |", "| rows_rejected | 70 |",
                 "| empty_response | 40 |", "| too_long | 5 |", "| truncated_rows | 3 |",
                 "| eos_appended | true |", "What is 2+2? \\| quick<br>please", "![training loss curve](../plots/loss.png)",
                 "Logged 10 training points; last train loss 0.3000."):
        assert text in md, text
    assert "lengths" not in md  # only scalar audit keys

    p = _Checker()
    p.feed(html_text)
    p.close()
    assert not p.errors and not p.stack, p.errors
    assert html_text.startswith("<!DOCTYPE html>")
    assert p.tags["table"] >= 6 and p.tags["img"] == 1
    png = (d / "plots" / "loss.png").read_bytes()
    assert p.img_src == "data:image/png;base64," + base64.b64encode(png).decode()
    text = "".join(p.text)
    for s in ("demo-run", "2.3456", "1.2345", "-1.1111", "0.6250", "1512.7500", "empty_response",
              "truncated_rows", "What is 2+2? | quick", "five <b>", "HuggingFaceTB/SmolLM2-135M"):
        assert s in text, s


def test_build_report_missing_inputs(tmp_path):
    build_report("bare", metrics_jsonl=tmp_path / "nope.jsonl", eval_metrics=None, samples_md=None,
                 clean_report=None, audit=None, train_summary=None, loss_png=None,
                 out_md=tmp_path / "r.md", out_html=tmp_path / "r.html")
    assert "No evaluation metrics." in (tmp_path / "r.md").read_text()
    p = _Checker()
    p.feed((tmp_path / "r.html").read_text())
    assert not p.errors and not p.stack


def test_build_report_says_why_no_held_out_row_was_evaluated(inputs):
    d, base, tuned = inputs
    kwargs = dict(metrics_jsonl=d / "metrics.jsonl", eval_metrics=d / "eval.json", samples_md=d / "samples.md",
                  clean_report=d / "clean.json", audit=d / "audit.json", train_summary=d / "train.json",
                  loss_png=d / "plots" / "loss.png", out_md=d / "report.md", out_html=d / "report.html")
    build_report("demo-run", **kwargs)
    assert "No held-out row was evaluated" not in (d / "report.md").read_text()
    empty = {"eval_loss": None, "perplexity": None, "exact_match": None, "n": 0, "n_loss_rows": 0, "n_loss_tokens": 0}
    (d / "eval.json").write_text(json.dumps({"base": empty, "tuned": empty, "delta": {}}))
    build_report("demo-run", **kwargs)
    assert "No held-out row was evaluated: the held-out split is empty" in (d / "report.md").read_text()


def test_build_report_says_what_held_out_evaluation_found(inputs):
    d, _, _ = inputs
    summary = json.loads((d / "train.json").read_text())
    summary.update(eval_every=20, eval_rows=32, evaluations=3, best_step=40, best_eval_loss=1.23456, exported="best",
                   exported_step=40, early_stopping_patience=2, stopped_early=True, stopped_early_at_step=60)
    (d / "train.json").write_text(json.dumps(summary))
    build_report("demo-run", metrics_jsonl=d / "metrics.jsonl", eval_metrics=d / "eval.json",
                 samples_md=d / "samples.md", clean_report=d / "clean.json", audit=d / "audit.json",
                 train_summary=d / "train.json", loss_png=d / "plots" / "loss.png",
                 out_md=d / "report.md", out_html=d / "report.html")
    md = (d / "report.md").read_text()
    assert ("Held-out loss during training (the first 32 held-out rows, every 20 steps): 3 evaluations, the lowest "
            "1.2346 at step 40. Exported: the best weights (step 40). Stopped early at step 60: 2 evaluations in a "
            "row without a lower loss.") in md
    assert "| best_step | 40 |" in md and "| exported | best |" in md
