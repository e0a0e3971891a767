# track: a finished run's settings, training curve, final metrics and report logged to MLflow (the local
# store under results/mlflow, or tracking.tracking_uri) and written as TensorBoard event files. Opt-in:
# only runs with tracking.mlflow or tracking.tensorboard on are targets (track_targets, common.smk).
rule track:
    output:
        tracking="results/runs/{run}/tracking.json",
        tensorboard=directory("results/runs/{run}/tensorboard"),
    input:
        metrics="results/runs/{run}/train/metrics.jsonl",
        eval="results/runs/{run}/eval/metrics.json",
        html="results/runs/{run}/report.html",
        png="results/runs/{run}/loss.png",
        code=code_inputs("track"),
    params:
        settings=get_run_settings,
        tracking=get_tracking,
    log:
        "logs/track/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow track --run {wildcards.run:q} --settings {params.settings} --tracking {params.tracking}"
        " --metrics-jsonl {input.metrics:q} --eval-metrics {input.eval:q} --artifacts {input.html:q} {input.png:q}"
        " --tensorboard {output.tensorboard:q} --out {output.tracking:q} --local-store results/mlflow > {log:q} 2>&1"


# A tracking server that does not answer stops the workflow here, before its first job (training included),
# rather than in track after hours of training. Runs in the main Snakemake process only (not dry runs).
onstart:
    from instructflow.track import check_servers

    check_servers(RUNS)
