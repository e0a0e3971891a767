"""The run report: a loss-curve PNG, and a Markdown + self-contained HTML summary of evaluation,
training, cleaning and tokenization.

Both outputs are rendered from one list of blocks (heading / paragraph / table / image / embedded
Markdown), so they always carry the same content and no Markdown library is needed.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path, read_json, read_jsonl

EVAL_METRICS = ("eval_loss", "perplexity", "exact_match", "rouge_l", "chrf", "eos_rate", "length_ratio", "n")


# ------------------------------------------------------------------------------------ formatting
def fmt(value: Any) -> str:
    """How a value appears in a report cell: ints plainly, floats with 4 decimals (or 4 significant
    digits when very large/small), None/NaN as an em dash, containers as JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    try:  # numpy / pandas scalars
        import numpy as np

        if isinstance(value, np.generic):
            return fmt(value.item())
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def md_escape(value: Any) -> str:
    """Make any value safe inside one Markdown table cell: backslashes and ``|`` escaped, HTML
    special characters as entities (so text like ``<tag>`` shows literally), newlines as <br>."""
    text = value if isinstance(value, str) else fmt(value)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\\", "\\\\")
    text = html.escape(text, quote=False)
    text = text.replace("|", "\\|")
    return text.replace("\n", "<br>")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(md_escape(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        cells = [("" if _is_missing(c) else md_escape(c)) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def html_cell(value: Any) -> str:
    text = value if isinstance(value, str) else fmt(value)
    return html.escape(text.replace("\r\n", "\n").replace("\r", "\n"), quote=False).replace("\n", "<br>")


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, raw: bool = False) -> str:
    """An HTML table; ``raw`` cells are already HTML (from a parsed Markdown table)."""
    cell = (lambda c: c) if raw else (lambda c: "" if _is_missing(c) else html_cell(c))
    head = "".join(f"<th>{cell(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


_UNESCAPED_PIPE = re.compile(r"(?<!\\)((?:\\\\)*)\|")


def _split_md_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not re.search(r"(?<!\\)(\\\\)*\\\|$", line):
        line = line[:-1]
    cells = _UNESCAPED_PIPE.sub(lambda m: m.group(1) + "\x00", line).split("\x00")
    return [c.strip() for c in cells]


def _md_cell_to_html(cell: str) -> str:
    # Cells written by md_escape are already HTML-escaped; undo only the Markdown escapes.
    return re.sub(r"\\([\\|])", r"\1", cell)


def markdown_to_html(md: str) -> str:
    """Just enough Markdown for files this project writes: headings, pipe tables, paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush():
        if para:
            out.append("<p>" + html.escape(" ".join(para), quote=False) + "</p>\n")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        is_table = (
            stripped.startswith("|")
            and i + 1 < len(lines)
            and re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", lines[i + 1].strip() or "x")
        )
        if is_table:
            flush()
            headers = [_md_cell_to_html(c) for c in _split_md_row(stripped)]
            i += 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [_md_cell_to_html(c) for c in _split_md_row(lines[i])]
                cells = (cells + [""] * len(headers))[: len(headers)]
                rows.append(cells)
                i += 1
            out.append(html_table(headers, rows, raw=True))
            continue
        m = re.match(r"(#{1,6})\s+(.*)", stripped)
        if m:
            flush()
            level = len(m.group(1))
            out.append(f"<h{level}>{html.escape(m.group(2), quote=False)}</h{level}>\n")
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return "".join(out)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------- plot
def _num(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plot_loss(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> dict[str, int]:
    """Training loss (train.py's metrics.jsonl) against optimiser step (left) and against trained
    tokens (right), with the held-out loss of the records that have one (train.eval_every) as points on
    both. Returns how many points each plotted series holds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_jsonl(metrics_jsonl) if Path(metrics_jsonl).exists() else []
    train = [r for r in rows if _num(r.get("loss")) is not None and _num(r.get("step")) is not None]
    held_out = [r for r in rows if _num(r.get("eval_loss")) is not None and _num(r.get("step")) is not None]

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_step, ax_tok = fig.subplots(1, 2)
    counts: dict[str, int] = {}

    lines = {}
    if train:
        lines["train_vs_step"] = ax_step.plot(
            [float(r["step"]) for r in train], [float(r["loss"]) for r in train], label="train loss", lw=1.2
        )[0]
        tok = [(_num(r.get("trained_tokens")), float(r["loss"])) for r in train
               if _num(r.get("trained_tokens")) is not None]
        if tok:
            lines["train_vs_tokens"] = ax_tok.plot(*zip(*tok), label="train loss", lw=1.2)[0]
    if held_out:
        style = {"label": "held-out loss", "marker": "o", "ms": 4, "lw": 1.0, "color": "tab:orange"}
        lines["eval_vs_step"] = ax_step.plot([float(r["step"]) for r in held_out],
                                             [float(r["eval_loss"]) for r in held_out], **style)[0]
        tok = [(_num(r.get("trained_tokens")), float(r["eval_loss"])) for r in held_out
               if _num(r.get("trained_tokens")) is not None]
        if tok:
            lines["eval_vs_tokens"] = ax_tok.plot(*zip(*tok), **style)[0]
    for name, line in lines.items():
        counts[name] = len(line.get_xdata())

    for ax in (ax_step, ax_tok):
        if ax.lines:
            ax.legend()
    save_loss_figure(fig, ax_step, ax_tok, "Training and held-out loss" if held_out else "Training loss", out_png)
    return counts


def save_loss_figure(fig, ax_step, ax_tok, title: str, out_png) -> None:
    """Label the loss-vs-step and loss-vs-tokens panels (a run's loss.png, compare_runs' curves of all runs),
    say "no data" on an empty one, and write the figure atomically."""
    ax_step.set_xlabel("optimiser step")
    ax_tok.set_xlabel("trained tokens")
    for ax in (ax_step, ax_tok):
        ax.set_ylabel("loss (mean CE per response token)")
        ax.grid(True, alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax_step.set_title("Loss vs step")
    ax_tok.set_title("Loss vs trained tokens")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------------------- report
def _load_json(path) -> Any:
    if path is None or not Path(path).exists():
        return None
    return read_json(path)


def _scalar_items(obj: dict) -> list[list[Any]]:
    return [[k, v] for k, v in obj.items() if not isinstance(v, (dict, list))]


def _blocks(run, *, metrics_jsonl, eval_metrics, samples_md, clean_report, audit, train_summary, loss_png):
    blocks: list[tuple] = [("h", 1, f"Instruction-tuning report: {run}")]

    blocks.append(("h", 2, "Evaluation: base vs tuned"))
    ev = _load_json(eval_metrics)
    if ev:
        base, tuned, delta = ev.get("base", {}), ev.get("tuned", {}), ev.get("delta", {})
        rows = [[k, fmt(base.get(k)), fmt(tuned.get(k)), fmt(delta.get(k))] for k in EVAL_METRICS]
        blocks.append(("table", ["metric", "base", "tuned", "delta (tuned − base)"], rows))
        if not base.get("n_loss_rows") and not tuned.get("n_loss_rows"):
            blocks.append(("p", "No held-out row was evaluated: the held-out split is empty (data.eval_fraction of "
                                "the rows, chosen by a hash of each row's content: clean_report.json's splits), or "
                                "none of its rows fits tokenize.max_length (audit.json). Add rows or raise "
                                "data.eval_fraction."))
        extra = [k for k in tuned if k not in EVAL_METRICS]
        if extra:
            blocks.append(("table", ["other metric", "base", "tuned"], [[k, fmt(base.get(k)), fmt(tuned.get(k))] for k in extra]))
    else:
        blocks.append(("p", "No evaluation metrics."))
    if ev and ev.get("test_sets"):
        blocks.append(("h", 3, "Your test sets: base vs tuned"))
        blocks.append(("p", "Each set's file is evaluated in full (loss over every row that fits tokenize.max_length, "
                            "generations for the first evaluate.max_samples); none of its rows is trained on."))
        rows = [[f"{name} ({result.get('path', '')})" if i == 0 else "", k, fmt(result["base"].get(k)),
                 fmt(result["tuned"].get(k)), fmt(result["delta"].get(k))]
                for name, result in ev["test_sets"].items() for i, k in enumerate(EVAL_METRICS + ("n_loss_rows",))]
        blocks.append(("table", ["test set", "metric", "base", "tuned", "delta (tuned − base)"], rows))

    blocks.append(("h", 2, "Training"))
    ts = _load_json(train_summary)
    if ts:
        blocks.append(("table", ["key", "value"], [[k, fmt(v)] for k, v in ts.items() if k != "sources"]))
        if ts.get("sources"):
            blocks.append(("p", "Rows per source and epoch: round(weight × the source's training rows)."))
            blocks.append(("table", ["source", "training rows", "weight", "rows per epoch"],
                           [[name, fmt(s["train_rows"]), fmt(s["weight"]), fmt(s["rows_per_epoch"])]
                            for name, s in ts["sources"].items()]))
    else:
        blocks.append(("p", "No training summary."))
    logged = read_jsonl(metrics_jsonl) if metrics_jsonl is not None and Path(metrics_jsonl).exists() else []
    train_rows = [r for r in logged if _num(r.get("loss")) is not None]
    if train_rows:
        blocks.append(("p", f"Logged {len(train_rows)} training points; last train loss "
                            f"{fmt(float(train_rows[-1]['loss']))}."))
    if ts and ts.get("evaluations"):
        blocks.append(("p", held_out_sentence(ts)))

    blocks.append(("h", 2, "Loss curve"))
    if loss_png is not None and Path(loss_png).exists():
        blocks.append(("img", "training loss curve", Path(loss_png)))
    else:
        blocks.append(("p", "No loss curve."))

    blocks.append(("h", 2, "Data cleaning"))
    cr = _load_json(clean_report)
    if cr:
        blocks.append(("table", ["key", "value"], [[k, fmt(v)] for k, v in _scalar_items(cr)]))
        sources = cr.get("sources", {})
        if sources:
            blocks.append(("p", "Per source (in data.sources' order; a row equal to one of an earlier source is "
                                "rejected as its duplicate):"))
            blocks.append(("table", ["source", "path", "columns", "rows in", "kept", "rejected", "train", "eval",
                                     "rejected by reason"],
                           [[name, s["path"], fmt(s["columns"]), fmt(s["rows_in"]), fmt(s["rows_kept"]),
                             fmt(s["rows_rejected"]), fmt(s["splits"]["train"]), fmt(s["splits"]["eval"]),
                             fmt(s["rejected_by_reason"])] for name, s in sources.items()]))
        for key, value in cr.items():
            if isinstance(value, dict) and key != "sources":
                blocks.append(("p", f"{key}:"))
                blocks.append(("table", ["reason" if "reason" in key or "reject" in key else "key", "count"],
                               [[k, fmt(v)] for k, v in value.items()]))
    else:
        blocks.append(("p", "No cleaning report."))

    blocks.append(("h", 2, "Tokenization audit"))
    au = _load_json(audit)
    if au:
        blocks.append(("table", ["key", "value"], [[k, fmt(v)] for k, v in _scalar_items(au)]))
    else:
        blocks.append(("p", "No tokenization audit."))

    blocks.append(("h", 2, "Sample generations"))
    if samples_md is not None and Path(samples_md).exists():
        blocks.append(("md", Path(samples_md).read_text(encoding="utf-8")))
    else:
        blocks.append(("p", "No samples."))
    return blocks


def held_out_sentence(summary: dict) -> str:
    """What the held-out evaluations during training found, and which weights became the model."""
    text = (f"Held-out loss during training (the first {summary['eval_rows']} held-out rows, every "
            f"{summary['eval_every']} steps): {summary['evaluations']} evaluations, the lowest "
            f"{fmt(summary['best_eval_loss'])} at step {summary['best_step']}. Exported: the {summary['exported']} "
            f"weights (step {summary['exported_step']}).")
    if summary.get("stopped_early"):
        patience = summary["early_stopping_patience"]
        text += (f" Stopped early at step {summary['stopped_early_at_step']}: {patience} "
                 f"evaluation{'s' if patience != 1 else ''} in a row without a lower loss.")
    return text


def _render_md(blocks, out_md) -> str:
    parts = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append("#" * b[1] + " " + b[2].replace("\n", " ") + "\n")
        elif kind == "p":
            parts.append(b[1] + "\n")
        elif kind == "table":
            parts.append(md_table(b[1], b[2]))
        elif kind == "img":
            rel = os.path.relpath(Path(b[2]).resolve(), Path(out_md).resolve().parent)
            parts.append(f"![{b[1]}]({Path(rel).as_posix()})\n")
        elif kind == "md":
            parts.append(b[1].rstrip("\n") + "\n")
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; }
""".strip()


def _render_html(blocks, run) -> str:
    parts = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2], quote=False)}</h{b[1]}>\n")
        elif kind == "p":
            parts.append(f"<p>{html.escape(b[1], quote=False)}</p>\n")
        elif kind == "table":
            parts.append(html_table(b[1], b[2]))
        elif kind == "img":
            data = base64.b64encode(Path(b[2]).read_bytes()).decode("ascii")
            parts.append(f'<p><img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}"></p>\n')
        elif kind == "md":
            parts.append(markdown_to_html(b[1]))
    title = html.escape(f"Instruction-tuning report: {run}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        + "".join(parts)
        + "</body>\n</html>\n"
    )


def build_report(
    run: str,
    *,
    metrics_jsonl,
    eval_metrics,
    samples_md,
    clean_report,
    audit,
    train_summary,
    loss_png,
    out_md,
    out_html,
) -> None:
    """Write the Markdown report (image linked by relative path) and the self-contained HTML report
    (image embedded as a base64 data URI). ``metrics_jsonl`` supplies the last logged train loss; the curve itself comes from ``loss_png`` (see plot_loss). A missing input becomes a short note."""
    blocks = _blocks(
        run,
        metrics_jsonl=metrics_jsonl,
        eval_metrics=eval_metrics,
        samples_md=samples_md,
        clean_report=clean_report,
        audit=audit,
        train_summary=train_summary,
        loss_png=loss_png,
    )
    write_text(out_md, _render_md(blocks, out_md))
    write_text(out_html, _render_html(blocks, run))
