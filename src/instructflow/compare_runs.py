"""All runs side by side: ``results/compare.html`` and ``results/compare.csv``, one row per run.

A row holds the settings in which the runs differ (flattened, ``train.learning_rate``; settings every run
shares are left out), training time and speed (the run's train/summary.json), and base and tuned metrics
on the held-out split and on each of ``evaluate.test_sets`` (the run's eval/metrics.json, as ``compare``
writes it). The page adds the loss curves of every run in one plot (train/metrics.jsonl: train loss
solid, ``eval_loss`` records dashed where the log has them) and the metrics as bars, base beside tuned.

The best run is the one with the lowest tuned ``eval_loss`` on the held-out split: every run is scored
on the same held-out rows, and the loss covers all of them (the generation metrics only the first
``evaluate.max_samples``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path, read_json, read_jsonl
from .report import _CSS, EVAL_METRICS, _num, fmt, html_table, save_loss_figure, write_text

HELD_OUT = "held_out"  # the column prefix of the held-out split's metrics; a test set's is test_sets.<name>
BEST_METRIC = "eval_loss"
BAR_METRICS = ("eval_loss", "exact_match", "rouge_l", "chrf")
SIDES = ("base", "tuned")
# From train/summary.json: how long the training loop ran (summed over resumes) and its speed.
SUMMARY_KEYS = ("steps", "elapsed_s", "trained_tokens_per_s")
BEST_RULE = ("The best run has the lowest tuned eval_loss on the held-out split (mean cross-entropy per "
             "response token over every held-out row; lower is better).")


class CompareRunsError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ table
def flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (``{"train": {"lora": {"r": 8}}}`` -> ``{"train.lora.r": 8}``);
    lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differing_keys(flat_by_run: dict[str, dict[str, Any]]) -> list[str]:
    """The flattened keys whose values are not the same in every run (a key some runs lack counts as
    differing), in the order they first appear; none with one run."""
    keys = list(dict.fromkeys(k for flat in flat_by_run.values() for k in flat))
    missing = object()
    return [k for k in keys
            if len({json.dumps(flat.get(k, missing), sort_keys=True, default=repr)
                    for flat in flat_by_run.values()}) > 1]


def _read_json(path, what: str) -> dict:
    try:
        data = read_json(path)
    except ValueError as err:
        raise CompareRunsError(f"{path}: the {what} is not valid JSON ({err}); delete it and rerun the "
                               "workflow to write it again") from None
    if not isinstance(data, dict):
        raise CompareRunsError(f"{path}: the {what} holds no JSON object; delete it and rerun the workflow")
    return data


def eval_sets(metrics: dict) -> dict[str, dict]:
    """Column prefix -> {"base": {...}, "tuned": {...}} for the held-out split and each test set."""
    sets = {HELD_OUT: {side: metrics.get(side) or {} for side in SIDES}}
    for name, result in (metrics.get("test_sets") or {}).items():
        sets[f"test_sets.{name}"] = {side: result.get(side) or {} for side in SIDES}
    return sets


def best_run(tuned_losses: dict[str, Any]) -> str | None:
    """The run with the lowest finite loss (the first in run order on a tie); None if no run has one."""
    scored = [(loss, i, run) for i, (run, value) in enumerate(tuned_losses.items())
              if (loss := _num(value)) is not None]
    return min(scored)[2] if scored else None


def run_table(runs: Sequence[str], settings: dict[str, dict], summaries: dict[str, dict],
              metrics: dict[str, dict]) -> tuple[list[str], list[dict[str, Any]], list[str], list[str]]:
    """(columns, one row per run, the differing settings' keys, the eval sets' column prefixes)."""
    flat = {run: flatten(settings[run]) for run in runs}
    differing = differing_keys(flat)
    sets = list(dict.fromkeys(prefix for run in runs for prefix in eval_sets(metrics[run])))
    best = best_run({run: metrics[run].get("tuned", {}).get(BEST_METRIC) for run in runs})
    metric_columns = [f"{prefix}.{side}.{m}" for prefix in sets for side in SIDES for m in EVAL_METRICS]
    columns = ["run", "best", *differing, *SUMMARY_KEYS, *metric_columns]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run, "best": run == best}
        row.update({k: flat[run].get(k) for k in differing})
        row.update({k: summaries[run].get(k) for k in SUMMARY_KEYS})
        for prefix, sides in eval_sets(metrics[run]).items():
            row.update({f"{prefix}.{side}.{m}": sides[side].get(m) for side in SIDES for m in EVAL_METRICS})
        rows.append({c: row.get(c) for c in columns})
    return columns, rows, differing, sets


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def write_csv(path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows([_csv_value(row[c]) for c in columns] for row in rows)


# ------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _colours(runs: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {run: cmap(i % cmap.N) for i, run in enumerate(runs)}


def loss_curves(records: list[dict]) -> dict[str, list[tuple[float, float | None, float]]]:
    """{"train": [(step, trained_tokens, loss)], "eval": [(step, trained_tokens, eval_loss)]} from one
    run's metrics.jsonl records. An eval record without trained_tokens takes the train record's of its step."""
    tokens_at = {}
    curves: dict[str, list] = {"train": [], "eval": []}
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        for r in records:
            step, value = _num(r.get("step")), _num(r.get(key))
            if step is None or value is None:
                continue
            tokens = _num(r.get("trained_tokens"))
            if kind == "train" and tokens is not None:
                tokens_at[step] = tokens
            curves[kind].append((step, tokens if tokens is not None else tokens_at.get(step), value))
    return curves


def plot_loss_curves(curves: dict[str, dict], out_png, best: str | None) -> dict[str, int]:
    """Every run's loss against optimiser step (left) and trained tokens (right), one colour per run:
    train loss solid, eval_loss dashed with markers. Returns the plotted points per run and kind."""
    from matplotlib.lines import Line2D

    fig = _figure(13.5, 4.5)
    ax_step, ax_tok = fig.subplots(1, 2)
    colours = _colours(list(curves))
    counts = {}
    for run, kinds in curves.items():
        label = f"{run} (best)" if run == best else run
        width = 2.2 if run == best else 1.2
        for kind, style in (("train", dict(ls="-")), ("eval", dict(ls="--", marker="o", ms=4))):
            points = kinds[kind]
            counts[f"{run}:{kind}"] = len(points)
            if not points:
                continue
            ax_step.plot([p[0] for p in points], [p[2] for p in points], color=colours[run], lw=width, **style,
                         label=label if kind == "train" or not kinds["train"] else None)
            by_tokens = [(p[1], p[2]) for p in points if p[1] is not None]
            if by_tokens:
                ax_tok.plot(*zip(*by_tokens), color=colours[run], lw=width, **style)
    if ax_step.lines:
        handles, _ = ax_step.get_legend_handles_labels()
        styles = [Line2D([], [], color="grey", ls="-", label="train loss")]
        if any(kinds["eval"] for kinds in curves.values()):
            styles.append(Line2D([], [], color="grey", ls="--", marker="o", ms=4, label="eval loss"))
        # Right of the plots, so no curve is hidden however many runs there are.
        ax_tok.legend(handles=handles + styles, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    save_loss_figure(fig, ax_step, ax_tok, "Loss curves of all runs", out_png)
    return counts


def plot_metric_bars(rows: Sequence[dict], sets: Sequence[str], out_png, best: str | None) -> int:
    """One panel per eval set and metric of BAR_METRICS: per run a base and a tuned bar. Returns the
    number of bars drawn (a missing value draws none)."""
    import numpy as np

    runs = [row["run"] for row in rows]
    # As many panels side by side as fit about 14 inches (shown scaled to the page), each set starting a row.
    panel_width = 0.8 + 0.45 * len(runs)
    ncols = next((n for n in range(len(BAR_METRICS), 1, -1)
                  if len(BAR_METRICS) % n == 0 and n * panel_width <= 14), 1)
    nrows = len(sets) * len(BAR_METRICS) // ncols
    fig = _figure(max(10, ncols * panel_width), 0.8 + 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).flat
    x = np.arange(len(runs))
    bars = 0
    for prefix in sets:
        for metric in BAR_METRICS:
            ax = next(axes)
            for k, (side, colour) in enumerate((("base", "#9e9e9e"), ("tuned", "#1f77b4"))):
                values = [_num(row.get(f"{prefix}.{side}.{metric}")) for row in rows]
                shown = [(xi, v) for xi, v in zip(x, values) if v is not None]
                if shown:
                    xs, vs = zip(*shown)
                    drawn = ax.bar(np.array(xs) + (k - 0.5) * 0.38, vs, width=0.38, color=colour, label=side)
                    if len(runs) <= 6:  # values on the bars (a 0 is then seen as 0, not as missing) while they fit
                        ax.bar_label(drawn, fmt="%.3g", fontsize="x-small")
                    bars += len(shown)
            ax.set_xticks(x, [f"{run} ★" if run == best else run for run in runs],
                          rotation=30 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center",
                          fontsize="small")
            ax.set_title(f"{prefix.removeprefix('test_sets.')}: {metric}", fontsize="medium")
            ax.grid(True, axis="y", alpha=0.3)
            if ax.patches and min(p.get_height() for p in ax.patches) >= 0:
                ax.set_ylim(bottom=0)
            if not ax.patches:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    handles = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if handles:  # once for the figure, clear of the bars
        fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize="small", ncols=2)
    fig.suptitle("Base vs tuned per run" + (" (★ best run)" if best else ""))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return bars


# ------------------------------------------------------------------------------------------- page
def _img(alt: str, png) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>\n'


def _set_title(prefix: str, metrics: dict[str, dict]) -> str:
    if prefix == HELD_OUT:
        return "Held-out split"
    name = prefix.removeprefix("test_sets.")
    paths = {(m.get("test_sets") or {}).get(name, {}).get("path") for m in metrics.values()} - {None}
    return f"Test set {name}" + (f" ({', '.join(sorted(paths))})" if paths else "")


def render_page(rows, differing, sets, metrics: dict[str, dict], best: str | None, loss_png,
                metrics_png) -> str:
    parts = ["<h1>Runs side by side</h1>\n"]
    if best is not None:
        parts.append(f"<p class=\"best\">Best run: <strong>{html.escape(best)}</strong> ★. "
                     f"{html.escape(BEST_RULE)}</p>\n")
    else:
        parts.append(f"<p class=\"best\">No best run: no run has a tuned held-out eval_loss. "
                     f"{html.escape(BEST_RULE)}</p>\n")
    if "model.base" in differing:
        parts.append("<p>The runs start from different base models: their tokenizers split the text differently, "
                     "so per-token losses are not on one scale; compare the generation metrics too.</p>\n")

    def run_cell(row):
        return f"{row['run']} ★ best" if row["best"] else row["run"]

    parts.append("<h2>Runs</h2>\n")
    if len(rows) == 1:
        parts.append("<p>One run: no settings to compare.</p>\n")
    elif not differing:
        parts.append("<p>The runs' settings are all the same.</p>\n")
    else:
        parts.append("<p>Only the settings in which the runs differ; the others are the same in every run.</p>\n")
    headers = ["run", *differing, "steps", "train time (s)", "trained tokens/s", f"tuned held-out {BEST_METRIC}"]
    table = [[run_cell(row), *(fmt(row[k]) for k in differing), fmt(row["steps"]), fmt(row["elapsed_s"]),
              fmt(row["trained_tokens_per_s"]), fmt(row[f"{HELD_OUT}.tuned.{BEST_METRIC}"])] for row in rows]
    parts.append(html_table(headers, table))

    parts.append("<h2>Loss curves</h2>\n<p>Train loss solid, eval loss during training dashed (where the "
                 "training log has it); the best run's lines are thicker.</p>\n")
    parts.append(_img("loss curves of all runs", loss_png))
    parts.append("<h2>Metrics: base vs tuned</h2>\n")
    parts.append(_img("base and tuned metrics per run", metrics_png))
    for prefix in sets:
        parts.append(f"<h3>{html.escape(_set_title(prefix, metrics))}</h3>\n<p>Each cell: base → tuned.</p>\n")
        table = [[run_cell(row), *(f"{fmt(row[f'{prefix}.base.{m}'])} → {fmt(row[f'{prefix}.tuned.{m}'])}"
                                   for m in EVAL_METRICS)] for row in rows]
        parts.append(html_table(["run", *EVAL_METRICS], table))
    parts.append("<p>All columns, unrounded: compare.csv beside this page.</p>\n")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Runs side by side</title>\n"
            f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n" + "".join(parts) + "</body>\n</html>\n")


# ------------------------------------------------------------------------------------------ stage
def compare_runs(runs: Sequence[str], settings: dict[str, dict], *, metrics_jsonl: Sequence, train_summary: Sequence,
                 eval_metrics: Sequence, loss_png, metrics_png, out_csv, out_html) -> dict:
    """Write the comparison of ``runs`` (names in display order): ``out_csv``, the two plots and ``out_html``
    (the plots embedded as data URIs). ``settings``: run -> its resolved settings (model, template, train,
    export); the file lists hold one file per run, in the order of ``runs``. Returns {"best", "differing" (the
    settings' keys shown), "columns" (the CSV's)}."""
    runs = list(runs)
    for option, files in (("metrics_jsonl", metrics_jsonl), ("train_summary", train_summary),
                          ("eval_metrics", eval_metrics)):
        if len(files) != len(runs):
            raise CompareRunsError(f"--{option.replace('_', '-')} gives {len(files)} files for {len(runs)} runs "
                                   f"({', '.join(runs)}); give one per run, in the same order")
    missing = [run for run in runs if run not in settings]
    if missing:
        raise CompareRunsError(f"--settings has no entry for run(s) {', '.join(missing)}")
    summaries = {run: _read_json(path, "training summary") for run, path in zip(runs, train_summary)}
    metrics = {run: _read_json(path, "evaluation metrics") for run, path in zip(runs, eval_metrics)}
    columns, rows, differing, sets = run_table(runs, settings, summaries, metrics)
    best = next((row["run"] for row in rows if row["best"]), None)
    curves = {run: loss_curves(read_jsonl(path, skip_damaged=True)) for run, path in zip(runs, metrics_jsonl)}

    write_csv(out_csv, columns, rows)
    plot_loss_curves(curves, loss_png, best)
    plot_metric_bars(rows, sets, metrics_png, best)
    write_text(out_html, render_page(rows, differing, sets, metrics, best, loss_png, metrics_png))
    return {"best": best, "differing": differing, "columns": columns}
