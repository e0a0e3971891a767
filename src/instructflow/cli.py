"""Command line for the workflow's rules: ``python -m instructflow.cli STAGE ...``.

Each subcommand is a thin call into the stage's module, so rules stay one shell line with their
log redirected, and the same commands run on a laptop or a SLURM node.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _json(text: str):
    return json.loads(text) if text else {}


def cmd_prepare_model(a):
    from .prepare_model import prepare_model

    prepare_model(a.spec, a.out, trust_remote_code=a.trust_remote_code)


def cmd_clean(a):
    from .clean import run_clean

    options = _json(a.options)
    result = run_clean(a.data, a.clean, a.rejected, a.report, **options)
    print(json.dumps(result.report, indent=2))


def cmd_render(a):
    from .render import run_render

    run_render(a.clean, a.template, a.out, model_dir=a.model)


def cmd_tokenize(a):
    from .tokenization import run_tokenize

    result = run_tokenize(a.prompts, a.model, a.train, a.eval, a.rejected, a.audit, **_json(a.options))
    print(json.dumps(result.audit, indent=2))


def cmd_evaluate(a):
    from .evaluate import run_evaluate

    metrics = run_evaluate(a.model, a.examples, a.prompts, a.metrics, a.samples, **_json(a.options))
    print(json.dumps(metrics, indent=2))


def cmd_combine(a):
    from .evaluate import combine

    combine(a.base_metrics, a.tuned_metrics, a.base_samples, a.tuned_samples, a.out_metrics, a.out_samples)


def cmd_report(a):
    from .report import build_report, plot_loss

    plot_loss(a.metrics_jsonl, a.loss_png)
    build_report(a.run, metrics_jsonl=a.metrics_jsonl, eval_metrics=a.eval_metrics, samples_md=a.samples_md,
                 clean_report=a.clean_report, audit=a.audit, train_summary=a.train_summary, loss_png=a.loss_png,
                 out_md=a.out_md, out_html=a.out_html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, *args, optional=("options",)):
        p = sub.add_parser(name)
        for arg in args:
            p.add_argument(f"--{arg.replace('_', '-')}", dest=arg, required=arg not in optional,
                           default="" if arg == "options" else None)
        p.set_defaults(func=func)
        return p

    p = add("prepare-model", cmd_prepare_model, "spec", "out")
    p.add_argument("--trust-remote-code", action="store_true")
    add("clean", cmd_clean, "data", "clean", "rejected", "report", "options")
    add("render", cmd_render, "clean", "template", "out", "model", optional=("model",))
    add("tokenize", cmd_tokenize, "prompts", "model", "train", "eval", "rejected", "audit", "options")
    add("evaluate", cmd_evaluate, "model", "examples", "prompts", "metrics", "samples", "options")
    add("combine", cmd_combine, "base_metrics", "tuned_metrics", "base_samples", "tuned_samples", "out_metrics",
        "out_samples")
    add("report", cmd_report, "run", "metrics_jsonl", "eval_metrics", "samples_md", "clean_report", "audit",
        "train_summary", "loss_png", "out_md", "out_html")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
