rule report:
    output:
        png=report(
            "results/runs/{run}/loss.png",
            caption="../report/loss.rst",
            category="Training",
            subcategory="{run}",
        ),
        md="results/runs/{run}/report.md",
        html=report(
            "results/runs/{run}/report.html",
            caption="../report/run_report.rst",
            category="Reports",
        ),
    input:
        metrics="results/runs/{run}/train/metrics.jsonl",
        summary="results/runs/{run}/train/summary.json",
        eval="results/runs/{run}/eval/metrics.json",
        samples="results/runs/{run}/eval/samples.md",
        clean=from_run("results/data/{data}/clean_report.json"),
        audit=from_run("results/tokens/{data}/{model}/{template}/audit.json"),
        code=code_inputs("report"),
    log:
        "logs/report/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow report --run {wildcards.run:q} --metrics-jsonl {input.metrics:q}"
        " --eval-metrics {input.eval:q} --samples-md {input.samples:q} --clean-report {input.clean:q}"
        " --audit {input.audit:q} --train-summary {input.summary:q} --loss-png {output.png:q}"
        " --out-md {output.md:q} --out-html {output.html:q} > {log:q} 2>&1"


# All runs side by side (src/instructflow/compare_runs.py): one job for the whole sweep, after every run's
# training and evaluation. Not to be confused with `compare`, which merges one run's base and tuned metrics.
rule compare_runs:
    output:
        html=report(
            "results/compare.html",
            caption="../report/compare_runs.rst",
            category="Comparison",
        ),
        csv=report(
            "results/compare.csv",
            caption="../report/compare_runs_csv.rst",
            category="Comparison",
        ),
        loss_png=report(
            "results/compare/loss_curves.png",
            caption="../report/compare_runs_loss.rst",
            category="Comparison",
        ),
        metrics_png=report(
            "results/compare/metric_bars.png",
            caption="../report/compare_runs_metrics.rst",
            category="Comparison",
        ),
    input:
        metrics=expand("results/runs/{run}/train/metrics.jsonl", run=RUNS),
        summary=expand("results/runs/{run}/train/summary.json", run=RUNS),
        eval=expand("results/runs/{run}/eval/metrics.json", run=RUNS),
        code=code_inputs("compare_runs"),
    params:
        runs=list(RUNS),
        settings=compared_settings(),
    log:
        "logs/compare_runs.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow compare-runs --runs {params.runs:q} --settings {params.settings}"
        " --metrics-jsonl {input.metrics:q} --train-summary {input.summary:q} --eval-metrics {input.eval:q}"
        " --loss-png {output.loss_png:q} --metrics-png {output.metrics_png:q} --out-csv {output.csv:q}"
        " --out-html {output.html:q} > {log:q} 2>&1"
