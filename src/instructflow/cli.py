"""Command line for the workflow's rules: ``instructflow STAGE ...`` (or ``python -m instructflow STAGE ...``).

Each subcommand is a thin call into the stage's module, so rules stay one shell line with their
log redirected, and the same commands run on a laptop or a SLURM node. A subcommand shares its name
with its rule and with its function here (``cmd_<stage>``, which codedeps.py reads to find the files a
rule depends on). A failing stage ends with one line on stderr, ``instructflow STAGE: what went wrong``,
and exit status 1; ``INSTRUCTFLOW_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

DEBUG_ENV = "INSTRUCTFLOW_DEBUG"


def _json(text: str):
    return json.loads(text) if text else {}


def cmd_prepare_model(a):
    from .prepare_model import prepare_model

    prepare_model(a.spec, a.out, trust_remote_code=a.trust_remote_code)


def cmd_clean(a):
    from .clean import run_clean

    options = _json(a.options)
    # Several sources (the workflow's data.sources, each with its own columns) come in the options; --data is one file.
    sources = options.pop("sources", None) or a.data
    if not sources:
        raise ValueError("give --data FILE, or the sources in --options {\"sources\": [...]}")
    result = run_clean(sources, a.clean, a.rejected, a.report, **options)
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


def cmd_compare(a):
    from .evaluate import compare

    compare(a.base_metrics, a.tuned_metrics, a.base_samples, a.tuned_samples, a.out_metrics, a.out_samples,
            test_sets=_json(a.test_sets or ""))


def cmd_report(a):
    from .report import build_report, plot_loss

    plot_loss(a.metrics_jsonl, a.loss_png)
    build_report(a.run, metrics_jsonl=a.metrics_jsonl, eval_metrics=a.eval_metrics, samples_md=a.samples_md,
                 clean_report=a.clean_report, audit=a.audit, train_summary=a.train_summary, loss_png=a.loss_png,
                 out_md=a.out_md, out_html=a.out_html)


def cmd_compare_runs(a):
    from .compare_runs import compare_runs

    result = compare_runs(a.runs, _json(a.settings), metrics_jsonl=a.metrics_jsonl, train_summary=a.train_summary,
                          eval_metrics=a.eval_metrics, loss_png=a.loss_png, metrics_png=a.metrics_png,
                          out_csv=a.out_csv, out_html=a.out_html)
    print(json.dumps({key: result[key] for key in ("best", "differing")}, indent=2))


def cmd_track(a):
    from .track import run_track

    result = run_track(a.run, _json(a.settings), _json(a.tracking), a.metrics_jsonl, a.eval_metrics, a.artifacts,
                       a.tensorboard, a.out, local_store=a.local_store)
    print(json.dumps(result, indent=2))


def cmd_generate(a):
    from .generate import generate_file

    given = {"max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size}
    generate_file(a.model, a.input, a.out, template=a.template, **{k: v for k, v in given.items() if v is not None})


def cmd_chat(a):
    from .chat import chat

    given = {"max_new_tokens": a.max_new_tokens} if a.max_new_tokens is not None else {}
    chat(a.model, template=a.template, compare=a.compare, base=a.base, system=a.system, **given)


def cmd_serve(a):
    from .serve import serve

    given = {"max_new_tokens": a.max_new_tokens} if a.max_new_tokens is not None else {}
    serve(a.model, host=a.host, port=a.port, template=a.template, **given)


def cmd_export_gguf(a):
    from .export_gguf import export_gguf

    print(export_gguf(a.model, a.out, a.type, name=a.name))


def cmd_train(a):
    from . import launch

    worker = launch.worker_args(settings=a.settings, model=a.model, train=a.train, out=a.out, metrics=a.metrics,
                                summary=a.summary, workdir=a.workdir, eval=a.eval)
    code = launch.run(worker, run=a.run, threads=a.threads, processes=a.processes,
                      config_folder=a.accelerate_configs or launch.ACCELERATE_CONFIGS)
    if code:
        raise StageFailed(f"the training processes exited with status {code}; their error is above in this log. "
                          f"Fix it and rerun: training resumes from the last checkpoint in {a.workdir}", code)


class StageFailed(RuntimeError):
    """A stage whose work ran in a child process that failed (the child's own output says why)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# What to do, by error type, where the type's messages say only what went wrong (CleanError's,
# AuditError's, TrainingError's and CheckpointError's messages name the fix themselves).
HINTS = {
    "ConfigError": "fix that key in your config (config/README.md documents every key)",
    "ModelSpecError": "fix model.base in your config",
    "TemplateError": "fix the template file (src/instructflow/prompt_templates/alpaca.yaml shows the format)",
    "JSONDecodeError": "the --options/--settings JSON is malformed",
}


def describe(err: BaseException) -> str:
    """One line: what went wrong, and what to do."""
    name = type(err).__name__
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and err.filename:
        what = f"{err.strerror or name}: {err.filename}"
        hint = "check the path (a rule input, or a path in your config)"
    elif isinstance(err, ImportError):
        what = f"a dependency is missing ({err})"
        hint = "install the pinned requirements (make setup, or pip install -r requirements.txt)"
    elif type(err).__module__.startswith("instructflow") or isinstance(err, (OSError, ValueError, KeyError)):
        what = str(err) or name
        hint = HINTS.get(name, "")
    else:
        what = f"unexpected {name}: {err}"
        hint = f"this looks like a bug: rerun with {DEBUG_ENV}=1 for the traceback and report it"
    line = f"{what.rstrip('. ')}; {hint}" if hint else what
    return " ".join(line.split())


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
    add("clean", cmd_clean, "data", "clean", "rejected", "report", "options", optional=("options", "data"))
    add("render", cmd_render, "clean", "template", "out", "model", optional=("model",))
    add("tokenize", cmd_tokenize, "prompts", "model", "train", "eval", "rejected", "audit", "options",
        optional=("options", "train"))  # no --train: a test set (options {"test_set": NAME}), all rows evaluated
    add("evaluate", cmd_evaluate, "model", "examples", "prompts", "metrics", "samples", "options")
    add("compare", cmd_compare, "base_metrics", "tuned_metrics", "base_samples", "tuned_samples", "out_metrics",
        "out_samples", "test_sets", optional=("test_sets",))
    add("report", cmd_report, "run", "metrics_jsonl", "eval_metrics", "samples_md", "clean_report", "audit",
        "train_summary", "loss_png", "out_md", "out_html")
    p = add("compare-runs", cmd_compare_runs, "settings", "loss_png", "metrics_png", "out_csv", "out_html")
    for files in ("runs", "metrics_jsonl", "train_summary", "eval_metrics"):  # one per run, in the order of --runs
        p.add_argument(f"--{files.replace('_', '-')}", dest=files, nargs="+", required=True)
    p = add("track", cmd_track, "run", "settings", "tracking", "metrics_jsonl", "eval_metrics", "tensorboard", "out",
            "local_store")
    p.add_argument("--artifacts", nargs="+", required=True, help="files logged as MLflow artifacts (the report)")
    p = add("export-gguf", cmd_export_gguf, "model", "out", "name", optional=("name",))
    p.add_argument("--type", default="q8_0", help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1")
    # Not a rule: a trained model's answers to a file of instructions.
    p = add("generate", cmd_generate, "model", "input", "out", "template", optional=("template",))
    # Defaults: generate_file's own (None here), so the command and the function cannot disagree.
    p.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens (default 256)")
    p.add_argument("--batch-size", type=int, help="prompts generated at once (default: evaluate.batch_size)")
    # Not rules either: a trained model in the terminal, and behind an OpenAI-compatible HTTP API.
    for name, func in (("chat", cmd_chat), ("serve", cmd_serve)):
        p = add(name, func, "template", optional=("template",))
        p.add_argument("model", metavar="RUN_OR_FOLDER", help="a run name (results/runs/<run>/model) or a model folder")
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help=("longest answer, in tokens" if name == "chat" else "longest answer where a request sets "
                             "no max_tokens") + " (default 256)")
        if name == "chat":
            p.add_argument("--compare", action="store_true", help="answer with the base model too, then the tuned one")
            p.add_argument("--base", help="the base model for --compare (default: the only folder in results/models)")
            p.add_argument("--system", help="a system prompt that starts the conversation (where the template has "
                                            "a place for one: the chat template, a file template's prompt_system)")
        else:
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p = add("train", cmd_train, "run", "settings", "model", "train", "eval", "out", "metrics", "summary", "workdir",
            "accelerate_configs", optional=("accelerate_configs", "eval"))  # --eval: the held-out tokens
    p.add_argument("--threads", type=int, default=1, help="CPU threads the job holds (split among processes)")
    p.add_argument("--processes", type=int, default=1, help="accelerate processes (one per GPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"instructflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one line, the traceback on request
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            traceback.print_exc()
        sys.stdout.flush()
        print(f"instructflow {args.command}: {describe(err)}", file=sys.stderr, flush=True)
        return getattr(err, "status", 1) if isinstance(err, StageFailed) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
