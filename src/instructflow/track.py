"""track stage: a finished run's settings, training curve, final metrics and report, logged to MLflow and
written as TensorBoard event files, so runs can be browsed and compared in either tool.

It reads only what the workflow already wrote (the training loop knows nothing of it):
  * the run's resolved settings (model, template, train, data, tokenize, evaluate, export) -> MLflow
    params (nested keys joined with ".") and a ``config.json`` artifact; a TensorBoard text summary;
  * ``train/metrics.jsonl`` -> one metric per numeric key of each record (loss, lr, grad_norm, tokens,
    eval_loss, ...) at the record's step;
  * ``eval/metrics.json`` -> ``held_out/{base,tuned,delta}/<metric>`` and
    ``test_sets/<name>/{base,tuned,delta}/<metric>``, at the last training step;
  * the report (``report.html``, ``loss.png``) -> MLflow artifacts.

MLflow: ``tracking.tracking_uri`` "" is the local store, a SQLite database (MLflow's own default backend
since 3.7; its file store is in maintenance mode) with artifacts beside it, under ``results/mlflow/``;
any other URI (a team's ``http(s)://`` server, ``databricks``, a database) is used as given. One MLflow
run per distinct result: the run is tagged with the instructflow run name and a fingerprint of its
settings and metrics, and a rerun with the same fingerprint refreshes that run's artifacts instead of
logging a second run (a retrained run, with other metrics, is a new MLflow run; the old one stays as
history). A server that cannot be reached stops the stage at once with a TrackingError, before anything is
written (and the workflow checks the servers before its first job: see workflow/rules/track.smk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .io import read_json, write_json

RUN_TAG = "instructflow.run"
FINGERPRINT_TAG = "instructflow.fingerprint"
LOCAL_DB = "mlflow.db"  # under the local store folder, with artifacts/ beside it
CONFIG_ARTIFACT = "config.json"
REACH_TIMEOUT_S = 5.0
# MLflow's limits per log_batch call and per param value (mlflow.utils.validation).
BATCH_METRICS = 1000
BATCH_PARAMS = 100
MAX_PARAM_VALUE = 6000


class TrackingError(RuntimeError):
    """Tracking cannot go on; the message says what to do."""


# ------------------------------------------------------------------------------------- reading inputs
def _number(value) -> float | None:
    """A finite int or float (not a bool) as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_step_metrics(path: str | os.PathLike) -> tuple[list[tuple[str, float, int]], list[str]]:
    """(name, value, step) of every numeric value in metrics.jsonl, and the "key@step" of those that are
    not finite numbers (null, text), which are not logged."""
    metrics, skipped = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            record, step = None, None
        if not isinstance(record, dict) or isinstance(step, bool) or not isinstance(step, int):
            raise TrackingError(f"{path}, line {number}: not a JSON record with an integer \"step\"; "
                                "metrics.jsonl is written by the train stage: rerun it (delete the run's train/ "
                                "folder)")
        for key, value in record.items():
            if key == "step":
                continue
            number_value = _number(value)
            if number_value is None:
                skipped.append(f"{key}@{step}")
            else:
                metrics.append((key, number_value, step))
    return metrics, skipped


def read_final_metrics(path: str | os.PathLike) -> tuple[dict[str, float], list[str]]:
    """eval/metrics.json as flat names -> values (held_out/<side>/<metric>, test_sets/<name>/<side>/<metric>,
    side: base, tuned, delta), and the names of values that are not finite numbers (not logged)."""
    combined = read_json(path)
    groups = {"held_out": combined}
    groups.update({f"test_sets/{name}": sides for name, sides in (combined.get("test_sets") or {}).items()})
    metrics, skipped = {}, []
    for prefix, sides in groups.items():
        for side in ("base", "tuned", "delta"):
            for key, value in (sides.get(side) or {}).items():
                name = f"{prefix}/{side}/{key}"
                if (number := _number(value)) is None:
                    skipped.append(name)
                else:
                    metrics[name] = number
    return metrics, skipped


def flat_params(settings: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: keys joined with ".", text as it is, anything else as JSON."""
    params = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, name + "."))
        else:
            params[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return params


def fingerprint(run: str, settings: dict, *files: str | os.PathLike) -> str:
    """What makes a result distinct: the run name, its settings and its metrics files' bytes."""
    digest = hashlib.sha256(json.dumps([run, settings], sort_keys=True).encode())
    for path in files:
        digest.update(b"\0" + Path(path).read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------- the tracking URI
def redact(uri: str) -> str:
    """``uri`` without a password in it (user:password@host), for logs and tracking.json."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def local_uri(store: str | os.PathLike) -> str:
    return f"sqlite:///{Path(store).resolve() / LOCAL_DB}"


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S, key: str = "tracking.tracking_uri") -> None:
    """An http(s) tracking URI must answer (any HTTP status counts: the server is there) within
    ``timeout`` seconds; TrackingError naming ``key`` otherwise. Other URIs are not checked here."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"config key {key}: cannot reach the MLflow tracking server at {redact(uri)} ({reason}); start the "
            "server or fix the URI, or set it to \"\" to log to the local store under results/mlflow "
            "(tracking.mlflow: false turns MLflow off)") from None


def check_servers(runs: dict[str, dict], timeout: float = REACH_TIMEOUT_S) -> None:
    """Every distinct http(s) tracking URI of the runs that log to MLflow answers (check_reachable): the
    workflow calls this before its first job, so a wrong URI stops it before any training."""
    uris = {}
    for name, run in runs.items():
        tracking = run["tracking"]
        if tracking["mlflow"] and tracking["tracking_uri"]:
            uris.setdefault(tracking["tracking_uri"], name)
    for uri, name in uris.items():
        key = "tracking.tracking_uri" if len(runs) == 1 else f"tracking.tracking_uri (run {name})"
        check_reachable(uri, timeout, key=key)


# ------------------------------------------------------------------------------------- TensorBoard
def write_tensorboard(folder: str | os.PathLike, settings: dict, step_metrics, final_metrics: dict,
                      final_step: int) -> Path:
    """A fresh event file in ``folder`` (older ones removed, so a rerun never doubles a curve): the step
    metrics, the final metrics at ``final_step``, and the settings as a text summary named "config"."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.metadata import create_summary_metadata
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    writer = EventFileWriter(str(folder))
    now = time.time()

    def scalar(tag, value, step):
        writer.add_event(Event(wall_time=now, step=step,
                               summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))

    text = "```\n" + json.dumps(settings, indent=2, sort_keys=True) + "\n```"
    tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    writer.add_event(Event(wall_time=now, step=0, summary=Summary(value=[Summary.Value(
        tag="config", metadata=create_summary_metadata("config", "the run's resolved settings"), tensor=tensor)])))
    for name, value, step in step_metrics:
        scalar(name, value, step)
    for name, value in final_metrics.items():
        scalar(name, value, final_step)
    writer.close()
    return folder


# ------------------------------------------------------------------------------------- MLflow
@contextlib.contextmanager
def _store_lock(store: Path | None):
    """One writer at a time on the local SQLite store (parallel track jobs would otherwise race to create
    its tables); a server orders its own writes."""
    if store is None:
        yield
        return
    import fcntl

    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by a parallel job on the same server
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"config key tracking.experiment: MLflow experiment {name!r} is deleted in that store; "
                            f"restore it (mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                            "or choose another name")
    return experiment.experiment_id


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_mlflow(run: str, settings: dict, step_metrics, final_metrics: dict, final_step: int,
               artifacts: list[str | os.PathLike], *, uri: str, experiment: str, fp: str,
               local_store: Path | None = None) -> dict:
    """Log one run (or refresh the artifacts of the run already logged with this fingerprint); returns
    {"run_id", "experiment_id", "reused", "skipped_params"}. ``local_store``: the folder of the local
    SQLite store when ``uri`` is it (artifacts go beside it, writes are serialised)."""
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    artifact_location = (Path(local_store).resolve() / "artifacts").as_uri() if local_store else None
    experiment_id = _experiment_id(client, experiment, artifact_location)
    same = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run}' and tags.`{FINGERPRINT_TAG}` = '{fp}'")
    finished = [r for r in same if r.info.status == "FINISHED"]
    for stale in [r for r in same if r.info.status != "FINISHED"] + finished[1:]:
        client.delete_run(stale.info.run_id)  # an attempt that died half-way, or a duplicate: not a result
    params = flat_params(settings)
    skipped = sorted(k for k, v in params.items() if len(v) > MAX_PARAM_VALUE)  # whole in config.json
    if finished:
        run_id, reused = finished[0].info.run_id, True
    else:
        tags = {RUN_TAG: run, FINGERPRINT_TAG: fp, "instructflow.model": str(settings.get("model_key", "")),
                "instructflow.template": str(settings.get("template_key", ""))}
        run_id, reused = client.create_run(experiment_id, run_name=run, tags=tags).info.run_id, False
    try:
        if not reused:
            for batch in _batches([Param(k, v) for k, v in params.items() if k not in skipped], BATCH_PARAMS):
                client.log_batch(run_id, params=batch)
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, s) for k, v, s in step_metrics]
            metrics += [Metric(k, v, now, final_step) for k, v in final_metrics.items()]
            for batch in _batches(metrics, BATCH_METRICS):
                client.log_batch(run_id, metrics=batch)
        # Artifacts every time: a rebuilt report replaces the old one under the same names.
        client.log_dict(run_id, settings, CONFIG_ARTIFACT)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    except BaseException:
        if not reused:  # never taken for a result; the next attempt deletes it
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    if not reused:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return {"run_id": run_id, "experiment_id": experiment_id, "reused": reused, "skipped_params": skipped}


# ------------------------------------------------------------------------------------- the stage
def run_track(run: str, settings: dict, tracking: dict, metrics_jsonl: str | os.PathLike,
              eval_metrics: str | os.PathLike, artifacts: list[str | os.PathLike], tensorboard_dir: str | os.PathLike,
              out: str | os.PathLike, local_store: str | os.PathLike = "results/mlflow") -> dict:
    """Track one run as ``tracking`` ({mlflow, tensorboard, tracking_uri, experiment}) says; write
    ``out`` (tracking.json: where it went, the MLflow run id, what was not logged) and return it.
    The tensorboard folder is created empty when tracking.tensorboard is off (it is a rule output)."""
    uri = tracking["tracking_uri"] or local_uri(local_store)
    if tracking["mlflow"]:
        check_reachable(uri)  # before anything is written, and before MLflow's minutes of retries
    step_metrics, skipped_steps = read_step_metrics(metrics_jsonl)
    final_metrics, skipped_final = read_final_metrics(eval_metrics)
    final_step = max((step for _, _, step in step_metrics), default=0)
    missing = [str(p) for p in artifacts if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(2, "No such file", missing[0])
    result = {
        "run": run,
        "fingerprint": fingerprint(run, settings, metrics_jsonl, eval_metrics),
        "step_metrics": len(step_metrics),
        "final_metrics": len(final_metrics),
        "not_logged": {"not_numbers": skipped_steps + skipped_final},
        "tensorboard": None,
        "mlflow": None,
    }
    if tracking["tensorboard"]:
        result["tensorboard"] = str(write_tensorboard(tensorboard_dir, settings, step_metrics, final_metrics,
                                                      final_step))
    else:
        if Path(tensorboard_dir).exists():
            shutil.rmtree(tensorboard_dir)
        Path(tensorboard_dir).mkdir(parents=True)
    if tracking["mlflow"]:
        from mlflow.exceptions import MlflowException

        store = None if tracking["tracking_uri"] else Path(local_store)
        try:
            with _store_lock(store):
                logged = log_mlflow(run, settings, step_metrics, final_metrics, final_step, artifacts, uri=uri,
                                    experiment=tracking["experiment"], fp=result["fingerprint"], local_store=store)
        except MlflowException as err:
            raise TrackingError(f"MLflow at {redact(uri)} refused the run: {err.message}; check "
                                "tracking.tracking_uri and tracking.experiment") from None
        result["not_logged"]["params_too_long"] = logged.pop("skipped_params")
        result["mlflow"] = {"tracking_uri": redact(uri), "experiment": tracking["experiment"], **logged}
    write_json(out, result)
    return result
