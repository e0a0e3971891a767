# instructflow: raw instruction table -> clean -> render -> tokenize -> train -> evaluate -> report.
#
# Results layout (one helper per path in workflow/rules/common.smk):
#   results/models/{model}/                       base model as a plain HF folder (prepare_model)
#   results/data/{data}/clean.parquet, rejected.parquet, clean_report.json      (clean; every data source)
#   results/prompts/{data}/{model}/{template}.parquet                            (render)
#   results/tokens/{data}/{model}/{template}/{train,eval}.safetensors, audit.json (tokenize)
#   results/base_eval/{data}/{model}/{template}/metrics.json                     (evaluate_base)
#   results/runs/{run}/model/, train/metrics.jsonl, eval/metrics.json, report.html
#   results/runs/{run}/gguf/model-{gguf_type}.gguf  only the types a run lists in export.gguf (export_gguf)
#   results/compare.html, compare.csv, compare/{loss_curves,metric_bars}.png   all runs side by side (compare_runs)
#   results/runs/{run}/tracking.json, tensorboard/  only with tracking.mlflow or tracking.tensorboard (track)
#   results/mlflow/mlflow.db, artifacts/         the local MLflow store all runs share (tracking.tracking_uri "")
#   results/runs/{run}/checkpoints/   resumable state, deliberately not a rule output
#   results/test_sets/{testset}/ clean.parquet, prompts/{model}/{template}.parquet, tokens/{model}/{template}/
#     and results/base_eval/{model}/{template}/test_sets/{testset}/, results/runs/{run}/eval/test_sets/{testset}/
#     for each of evaluate.test_sets (the *_test_set rules), merged into eval/metrics.json by compare
# {data}: "default" for the config's data, else the first run (runs.NAME.data) with that data.
# Stages before train depend only on (data, model, template), so runs that share them share the work.

configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/track.smk"


rule all:
    input:
        expand("results/runs/{run}/report.html", run=RUNS),
        "results/compare.html",
        gguf_targets(),
        track_targets(),
    default_target: True
