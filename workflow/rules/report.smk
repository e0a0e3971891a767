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
