# The base model is evaluated once per (model, template) and shared by every run that starts from it.
rule evaluate_base:
    output:
        metrics="results/base_eval/{model}/{template}/metrics.json",
        samples="results/base_eval/{model}/{template}/samples.parquet",
    input:
        model="results/models/{model}",
        examples="results/tokens/{model}/{template}/eval.safetensors",
        prompts="results/prompts/{model}/{template}.parquet",
        code=lib("evaluate.py", "loss.py", "device.py"),
    params:
        options=json_option(CONFIG["evaluate"]),
    threads: 2
    log:
        "logs/evaluate_base/{model}/{template}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli evaluate --model {input.model} --examples {input.examples}"
        " --prompts {input.prompts} --metrics {output.metrics} --samples {output.samples}"
        " --options {params.options} > {log} 2>&1"


rule evaluate:
    output:
        tuned="results/runs/{run}/eval/tuned.json",
        samples="results/runs/{run}/eval/tuned_samples.parquet",
    input:
        model="results/runs/{run}/model",
        examples=from_run("results/tokens/{model}/{template}/eval.safetensors"),
        prompts=from_run("results/prompts/{model}/{template}.parquet"),
        code=lib("evaluate.py", "loss.py", "device.py"),
    params:
        options=json_option(CONFIG["evaluate"]),
    threads: 2
    log:
        "logs/evaluate/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli evaluate --model {input.model} --examples {input.examples}"
        " --prompts {input.prompts} --metrics {output.tuned} --samples {output.samples}"
        " --options {params.options} > {log} 2>&1"


rule compare:
    output:
        metrics=report(
            "results/runs/{run}/eval/metrics.json",
            caption="../report/metrics.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        samples=report(
            "results/runs/{run}/eval/samples.md",
            caption="../report/samples.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
    input:
        base=from_run("results/base_eval/{model}/{template}/metrics.json"),
        base_samples=from_run("results/base_eval/{model}/{template}/samples.parquet"),
        tuned="results/runs/{run}/eval/tuned.json",
        tuned_samples="results/runs/{run}/eval/tuned_samples.parquet",
        code=lib("evaluate.py"),
    log:
        "logs/compare/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli combine --base-metrics {input.base} --tuned-metrics {input.tuned}"
        " --base-samples {input.base_samples} --tuned-samples {input.tuned_samples}"
        " --out-metrics {output.metrics} --out-samples {output.samples} > {log} 2>&1"
