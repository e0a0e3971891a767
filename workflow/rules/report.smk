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
        clean="results/data/clean_report.json",
        audit=from_run("results/tokens/{model}/{template}/audit.json"),
        code=lib("report.py"),
    log:
        "logs/report/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli report --run {wildcards.run} --metrics-jsonl {input.metrics}"
        " --eval-metrics {input.eval} --samples-md {input.samples} --clean-report {input.clean}"
        " --audit {input.audit} --train-summary {input.summary} --loss-png {output.png}"
        " --out-md {output.md} --out-html {output.html} > {log} 2>&1"
