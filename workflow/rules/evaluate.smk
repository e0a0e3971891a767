# The base model is evaluated once per (data, model, template) and shared by every run that starts from it.
rule evaluate_base:
    output:
        metrics="results/base_eval/{data}/{model}/{template}/metrics.json",
        samples="results/base_eval/{data}/{model}/{template}/samples.parquet",
    input:
        model="results/models/{model}",
        examples="results/tokens/{data}/{model}/{template}/eval.safetensors",
        prompts="results/prompts/{data}/{model}/{template}.parquet",
        code=code_inputs("evaluate"),
    params:
        options=json_option(EVALUATE_OPTIONS),
    threads: 2
    log:
        "logs/evaluate_base/{data}/{model}/{template}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow evaluate --model {input.model:q} --examples {input.examples:q}"
        " --prompts {input.prompts:q} --metrics {output.metrics:q} --samples {output.samples:q}"
        " --options {params.options} > {log:q} 2>&1"


rule evaluate:
    output:
        tuned="results/runs/{run}/eval/tuned.json",
        samples="results/runs/{run}/eval/tuned_samples.parquet",
    input:
        model="results/runs/{run}/model",
        examples=from_run("results/tokens/{data}/{model}/{template}/eval.safetensors"),
        prompts=from_run("results/prompts/{data}/{model}/{template}.parquet"),
        code=code_inputs("evaluate"),
    params:
        options=json_option(EVALUATE_OPTIONS),
    threads: 2
    log:
        "logs/evaluate/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow evaluate --model {input.model:q} --examples {input.examples:q}"
        " --prompts {input.prompts:q} --metrics {output.tuned:q} --samples {output.samples:q}"
        " --options {params.options} > {log:q} 2>&1"


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
        base=from_run("results/base_eval/{data}/{model}/{template}/metrics.json"),
        base_samples=from_run("results/base_eval/{data}/{model}/{template}/samples.parquet"),
        tuned="results/runs/{run}/eval/tuned.json",
        tuned_samples="results/runs/{run}/eval/tuned_samples.parquet",
        test_sets_base=test_set_files("results/base_eval/{model}/{template}/test_sets/{testset}/metrics.json"),
        test_sets_tuned=test_set_files("results/runs/{run}/eval/test_sets/{testset}/tuned.json"),
        code=code_inputs("compare"),
    params:
        test_sets=get_test_sets,
    log:
        "logs/compare/{run}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow compare --base-metrics {input.base:q} --tuned-metrics {input.tuned:q}"
        " --base-samples {input.base_samples:q} --tuned-samples {input.tuned_samples:q}"
        " --out-metrics {output.metrics:q} --out-samples {output.samples:q} --test-sets {params.test_sets}"
        " > {log:q} 2>&1"


# Each test set (evaluate.test_sets), for the base model (shared per model and template) and each run's.
use rule evaluate_base as evaluate_base_test_set with:
    output:
        metrics="results/base_eval/{model}/{template}/test_sets/{testset}/metrics.json",
        samples="results/base_eval/{model}/{template}/test_sets/{testset}/samples.parquet",
    input:
        model="results/models/{model}",
        examples="results/test_sets/{testset}/tokens/{model}/{template}/eval.safetensors",
        prompts="results/test_sets/{testset}/prompts/{model}/{template}.parquet",
        code=code_inputs("evaluate"),
    log:
        "logs/evaluate_base_test_set/{testset}/{model}/{template}.log",


use rule evaluate as evaluate_test_set with:
    output:
        tuned="results/runs/{run}/eval/test_sets/{testset}/tuned.json",
        samples="results/runs/{run}/eval/test_sets/{testset}/tuned_samples.parquet",
    input:
        model="results/runs/{run}/model",
        examples=from_run("results/test_sets/{testset}/tokens/{model}/{template}/eval.safetensors"),
        prompts=from_run("results/test_sets/{testset}/prompts/{model}/{template}.parquet"),
        code=code_inputs("evaluate"),
    log:
        "logs/evaluate_test_set/{run}/{testset}.log",
