"""Experiment tracking (the track stage): a run's settings, per-step and final metrics and report logged to
MLflow and TensorBoard, read back with MLflow's own client and TensorBoard's event reader; reruns that
log nothing twice; an unreachable tracking server stopping the stage and the workflow; the config keys;
`track` jobs planned per run when tracking is on and absent when off; and one tiny workflow run."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

from conftest import TEST_DATA, copy_code
from instructflow.config import ConfigError, load, run_settings
from instructflow.track import TrackingError, check_servers, redact, run_track

UNREACHABLE = "http://127.0.0.1:9"  # the discard port on loopback: nothing listens, no traffic leaves the machine
STEPS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.5, "tokens": 100, "trained_tokens": 100, "elapsed_s": 0.5},
    {"step": 2, "loss": 2.0, "lr": 5e-4, "grad_norm": 1.0, "tokens": 210, "trained_tokens": 210, "elapsed_s": 1.0},
    {"step": 2, "eval_loss": 2.25},  # an eval-during-training record: its own key at its step
    {"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": None, "tokens": 300, "trained_tokens": 300, "elapsed_s": 1.5},
]
EVAL = {
    "base": {"eval_loss": 3.0, "rouge_l": 0.1, "eos_rate": None, "n": 4},
    "tuned": {"eval_loss": 2.0, "rouge_l": 0.3, "eos_rate": 0.5, "n": 4},
    "delta": {"eval_loss": -1.0, "rouge_l": 0.2, "eos_rate": None, "n": 0},
    "test_sets": {"qa": {"path": "data/qa.csv", "base": {"exact_match": 0.0}, "tuned": {"exact_match": 0.6},
                         "delta": {"exact_match": 0.6}}},
}
SETTINGS = {"run": "lora-a", "model": {"base": "pkg://x/y.gguf", "trust_remote_code": False}, "model_key": "y",
            "template": "alpaca", "template_key": "alpaca",
            "train": {"learning_rate": 2e-4, "method": "lora", "lora": {"r": 8, "target_modules": "all-linear"}},
            "data": {"eval_fraction": 0.1, "placeholders": ["n/a", "-"]}}
ON = {"mlflow": True, "tensorboard": True, "tracking_uri": "", "experiment": "instructflow"}


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's files, written by hand: no training needed."""
    run = tmp_path / "results" / "runs" / "lora-a"
    (run / "train").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STEPS))
    (run / "eval" / "metrics.json").write_text(json.dumps(EVAL))
    (run / "report.html").write_text("<html><body>report of lora-a</body></html>")
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a picture")
    return run


def track(run_dir, tracking=ON, settings=SETTINGS):
    return run_track("lora-a", settings, tracking, run_dir / "train" / "metrics.jsonl",
                     run_dir / "eval" / "metrics.json", [run_dir / "report.html", run_dir / "loss.png"],
                     run_dir / "tensorboard", run_dir / "tracking.json",
                     local_store=run_dir.parents[1] / "mlflow")


def mlflow_runs(run_dir, experiment="instructflow"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parents[1] / 'mlflow' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


def tensorboard_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_a_run_is_logged_to_mlflow_and_read_back_with_its_client(run_dir, tmp_path):
    result = track(run_dir)
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    run = runs[0]
    assert result["mlflow"]["run_id"] == run.info.run_id and result["mlflow"]["reused"] is False
    assert json.loads((run_dir / "tracking.json").read_text()) == result
    assert run.info.status == "FINISHED" and run.info.run_name == "lora-a"
    assert run.data.tags["instructflow.run"] == "lora-a" and run.data.tags["instructflow.fingerprint"]
    # The resolved settings, nested keys joined with ".".
    params = run.data.params
    assert params["train.learning_rate"] == "0.0002" and params["train.lora.r"] == "8"
    assert params["train.lora.target_modules"] == "all-linear" and params["template"] == "alpaca"
    assert json.loads(params["data.placeholders"]) == ["n/a", "-"] and params["model.trust_remote_code"] == "false"
    # Per-step metrics with their steps; the eval-during-training record at its own step; a null is left out.
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("loss", "lr", "grad_norm", "tokens", "eval_loss")}
    assert history["loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert history["lr"] == [(1, 1e-3), (2, 5e-4), (3, 1e-4)]
    assert history["grad_norm"] == [(1, 1.5), (2, 1.0)]
    assert history["tokens"] == [(1, 100), (2, 210), (3, 300)]
    assert history["eval_loss"] == [(2, 2.25)]
    # Final metrics per eval set and side, at the last training step.
    final = {key: client.get_metric_history(run.info.run_id, key) for key in
             ("held_out/tuned/rouge_l", "held_out/delta/eval_loss", "test_sets/qa/tuned/exact_match")}
    assert [(m.step, m.value) for m in final["held_out/tuned/rouge_l"]] == [(3, 0.3)]
    assert [(m.step, m.value) for m in final["held_out/delta/eval_loss"]] == [(3, -1.0)]
    assert [(m.step, m.value) for m in final["test_sets/qa/tuned/exact_match"]] == [(3, 0.6)]
    assert "held_out/base/eos_rate" not in run.data.metrics
    assert set(result["not_logged"]["not_numbers"]) == {"grad_norm@3", "held_out/base/eos_rate",
                                                        "held_out/delta/eos_rate"}
    # The report and the settings as artifacts, byte for byte.
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.html", "loss.png", "config.json"}
    got = tmp_path / "download"
    got.mkdir()
    client.download_artifacts(run.info.run_id, "report.html", str(got))
    assert (got / "report.html").read_bytes() == (run_dir / "report.html").read_bytes()
    client.download_artifacts(run.info.run_id, "config.json", str(got))
    assert json.loads((got / "config.json").read_text()) == SETTINGS


def test_tensorboard_events_read_back_with_its_reader(run_dir):
    track(run_dir, {**ON, "mlflow": False})
    acc = tensorboard_events(run_dir / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens", "eval_loss", "held_out/tuned/rouge_l",
            "test_sets/qa/delta/exact_match"} <= scalars
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval_loss")] == [(2, 2.25)]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("held_out/delta/rouge_l")] == [(3, 0.2)]
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.0002' in text
    assert not (run_dir.parents[1] / "mlflow").exists()  # MLflow off: no store
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"] is None


def test_a_rerun_reuses_the_mlflow_run_and_rewrites_the_event_file(run_dir):
    first = track(run_dir)
    (run_dir / "report.html").write_text("<html><body>rebuilt report</body></html>")
    second = track(run_dir)
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert second["mlflow"]["reused"] is True
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]  # not logged twice
    assert client.download_artifacts(runs[0].info.run_id, "report.html").endswith("report.html")
    assert "rebuilt report" in open(client.download_artifacts(runs[0].info.run_id, "report.html")).read()
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert [e.step for e in tensorboard_events(run_dir / "tensorboard").Scalars("loss")] == [1, 2, 3]
    # A retrained run (other metrics) is another result: a second MLflow run, the first kept as history.
    with (run_dir / "train" / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    third = track(run_dir)
    _, runs = mlflow_runs(run_dir)
    assert len(runs) == 2 and third["mlflow"]["reused"] is False
    assert third["fingerprint"] != first["fingerprint"]


def test_an_attempt_that_died_half_way_is_replaced_not_kept(run_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_artifact

    def broken(self, run_id, local_path, artifact_path=None):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_artifact", broken)
    with pytest.raises(OSError, match="disk full"):
        track(run_dir)
    assert [r.info.status for r in mlflow_runs(run_dir)[1]] == ["FAILED"]
    monkeypatch.setattr(MlflowClient, "log_artifact", real)
    result = track(run_dir)
    _, runs = mlflow_runs(run_dir)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(result["mlflow"]["run_id"], "FINISHED")]


def test_an_unreachable_server_stops_before_anything_is_written(run_dir, monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # straight to loopback, through no proxy
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"^config key tracking.tracking_uri: cannot reach the MLflow tracking "
                                            r"server at http://127\.0\.0\.1:9 .*set it to \"\" to log to the local"):
        track(run_dir, {**ON, "tracking_uri": UNREACHABLE})
    assert time.monotonic() - started < 10  # no minutes of MLflow's retries
    assert not (run_dir / "tracking.json").exists() and not (run_dir / "tensorboard").exists()
    # The workflow's check before its first job: every run that logs to that server, the key named.
    runs = {"a": {"tracking": {**ON, "tracking_uri": UNREACHABLE}}, "b": {"tracking": {**ON, "mlflow": False}}}
    with pytest.raises(TrackingError, match=r"tracking.tracking_uri \(run a\): cannot reach"):
        check_servers(runs)
    check_servers({"b": runs["b"], "c": {"tracking": ON}})  # MLflow off, or the local store: nothing to reach


def test_a_password_in_the_uri_is_not_written_anywhere():
    assert redact("https://me:s3cret@mlflow.example.org:5000/x") == "https://me:***@mlflow.example.org:5000/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_malformed_metrics_line_names_file_and_line(run_dir):
    with (run_dir / "train" / "metrics.jsonl").open("a") as fh:
        fh.write('{"loss": 1.0}\n')
    with pytest.raises(TrackingError, match=r"metrics\.jsonl, line 5: not a JSON record with an integer \"step\""):
        track(run_dir)


# ------------------------------------------------------------------------------------------ config

@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "data.csv").write_text("instruction,input,output\nSay hi.,,hi\n")
    return tmp_path


def test_tracking_is_off_by_default_and_a_run_may_override_it(workdir):
    config, runs = load({"data": {"path": "data.csv"}, "tracking": {"tensorboard": True},
                         "runs": {"a": {}, "b": {"tracking": {"mlflow": True, "experiment": "sweep"}}}}, workdir)
    assert load({"data": {"path": "data.csv"}}, workdir)[1]["default"]["tracking"] == {
        "mlflow": False, "tensorboard": False, "tracking_uri": "", "experiment": "instructflow"}
    assert runs["a"]["tracking"] == {"mlflow": False, "tensorboard": True, "tracking_uri": "", "experiment": "instructflow"}
    assert runs["b"]["tracking"] == {"mlflow": True, "tensorboard": True, "tracking_uri": "", "experiment": "sweep"}
    settings = run_settings(config, "b", runs["b"])
    assert settings["run"] == "b" and settings["train"] == runs["b"]["train"]
    assert settings["data"]["path"] == "data.csv" and "tracking" not in settings
    assert {"model", "model_key", "template", "template_key", "export", "tokenize", "evaluate"} <= set(settings)
    with pytest.raises(ConfigError, match="config key runs.b.tracking.uri: unknown key"):
        load({"data": {"path": "data.csv"}, "runs": {"b": {"tracking": {"uri": "x"}}}}, workdir)
    with pytest.raises(ConfigError, match="config key tracking.mlflow: 'yes' is not of type 'boolean'"):
        load({"data": {"path": "data.csv"}, "tracking": {"mlflow": "yes"}}, workdir)


# ------------------------------------------------------------------------------------------ workflow

def _workflow_dir(root, tiny_model_dir, **config):
    from test_workflow import TINY_CONFIG

    work = root / "work"
    (work / "data").mkdir(parents=True)
    (work / "config").mkdir()
    shutil.copy(TEST_DATA, work / "data" / "instructions.csv")
    config = {**TINY_CONFIG, "model": {"base": str(tiny_model_dir("gpt2"))}, **config}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return work


def test_track_jobs_are_planned_per_run_when_on_and_absent_when_off(tmp_path, tiny_model_dir):
    from test_workflow import planned_jobs

    code = copy_code(tmp_path / "code")
    work = _workflow_dir(tmp_path, tiny_model_dir, runs={"a": {}, "b": {"tracking": {"tensorboard": True}},
                                                         "c": {"tracking": {"mlflow": True}}})
    jobs = planned_jobs(code, work)
    assert {output for rule, output in jobs if rule == "track"} == {
        "results/runs/b/tracking.json", "results/runs/c/tracking.json"}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(
        {**yaml.safe_load((work / "config" / "config.yaml").read_text()), "runs": {"a": {}, "b": {}}}))
    assert "track" not in {rule for rule, _ in planned_jobs(code, work)}


def test_an_unreachable_server_stops_the_workflow_before_its_first_job(tmp_path, tiny_model_dir, monkeypatch):
    from test_workflow import snakemake

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    code = copy_code(tmp_path / "code")
    work = _workflow_dir(tmp_path, tiny_model_dir, tracking={"mlflow": True, "tracking_uri": UNREACHABLE})
    proc = snakemake(code, work, check=False, timeout=300)
    assert proc.returncode != 0
    assert "config key tracking.tracking_uri: cannot reach the MLflow tracking server at http://127.0.0.1:9" \
        in proc.stderr + proc.stdout
    assert not (work / "results").exists() and not (work / "logs").exists()  # no job ran, training included


@pytest.mark.slow
def test_workflow_tracks_a_tiny_run_and_a_forced_rerun_logs_no_second_run(tmp_path, tiny_model_dir):
    from test_workflow import snakemake

    code = copy_code(tmp_path / "code")
    work = _workflow_dir(tmp_path, tiny_model_dir, tracking={"mlflow": True, "tensorboard": True})
    snakemake(code, work, timeout=900)
    run_dir = work / "results" / "runs" / "default"
    first = json.loads((run_dir / "tracking.json").read_text())
    client, runs = mlflow_runs(run_dir)
    assert [r.info.run_id for r in runs] == [first["mlflow"]["run_id"]]
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == steps == [1, 2]
    assert runs[0].data.params["train.max_steps"] == "2"
    assert {"held_out/base/eval_loss", "held_out/tuned/eval_loss"} <= set(runs[0].data.metrics)
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"report.html", "loss.png", "config.json"}
    assert [e.step for e in tensorboard_events(run_dir / "tensorboard").Scalars("loss")] == [1, 2]
    snakemake(code, work, "--forcerun", "track")
    second = json.loads((run_dir / "tracking.json").read_text())
    _, runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and second["mlflow"]["reused"] and second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
