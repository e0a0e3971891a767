rule clean:
    output:
        clean="results/data/{data}/clean.parquet",
        rejected=report(
            "results/data/{data}/rejected.parquet",
            caption="../report/rejected.rst",
            category="Data",
        ),
        report=report(
            "results/data/{data}/clean_report.json",
            caption="../report/clean_report.rst",
            category="Data",
        ),
    input:
        data=get_data_files,
        code=code_inputs("clean"),
    params:
        options=get_clean_options,
    log:
        "logs/clean/{data}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow clean --clean {output.clean:q} --rejected {output.rejected:q}"
        " --report {output.report:q} --options {params.options} > {log:q} 2>&1"


rule render:
    output:
        "results/prompts/{data}/{model}/{template}.parquet",
    input:
        clean="results/data/{data}/clean.parquet",
        template=get_template,
        model=get_render_model,
        code=code_inputs("render"),
    params:
        model=lambda wc, input: f"--model {shlex.quote(input.model)}" if input.model else "",
    log:
        "logs/render/{data}/{model}/{template}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow render --clean {input.clean:q} --template {input.template:q} --out {output:q}"
        " {params.model} > {log:q} 2>&1"


rule tokenize:
    output:
        train="results/tokens/{data}/{model}/{template}/train.safetensors",
        eval="results/tokens/{data}/{model}/{template}/eval.safetensors",
        rejected="results/tokens/{data}/{model}/{template}/rejected.parquet",
        audit=report(
            "results/tokens/{data}/{model}/{template}/audit.json",
            caption="../report/audit.rst",
            category="Data",
        ),
    input:
        prompts="results/prompts/{data}/{model}/{template}.parquet",
        model="results/models/{model}",
        code=code_inputs("tokenize"),
    params:
        options=json_option(CONFIG["tokenize"]),
    log:
        "logs/tokenize/{data}/{model}/{template}.log",
    benchmark:
        "benchmarks/tokenize/{data}/{model}/{template}.tsv"
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow tokenize --prompts {input.prompts:q} --model {input.model:q}"
        " --train {output.train:q} --eval {output.eval:q} --rejected {output.rejected:q} --audit {output.audit:q}"
        " --options {params.options} > {log:q} 2>&1"


# Test sets (evaluate.test_sets): each file goes through clean, render and tokenize as the raw table does,
# with every row held out (eval_fraction 1) and messages naming the set's config key. Its clean job has a
# high priority: a bad file stops the workflow before training starts.
use rule clean as clean_test_set with:
    output:
        clean="results/test_sets/{testset}/clean.parquet",
        rejected="results/test_sets/{testset}/rejected.parquet",
        report="results/test_sets/{testset}/clean_report.json",
    input:
        data=lambda wc: TEST_SETS[wc.testset]["path"],
        code=code_inputs("clean"),
    params:
        options=lambda wc: json_option({
            **{k: CONFIG["data"][k] for k in ("placeholders", "max_chars")},
            "sources": [{"name": wc.testset, "path": TEST_SETS[wc.testset]["path"],
                         "columns": TEST_SETS[wc.testset]["columns"], "config_key": f"evaluate.test_sets.{wc.testset}"}],
            "eval_fraction": 1.0,
        }),
    priority: 50
    log:
        "logs/clean_test_set/{testset}.log",


use rule render as render_test_set with:
    output:
        "results/test_sets/{testset}/prompts/{model}/{template}.parquet",
    input:
        clean="results/test_sets/{testset}/clean.parquet",
        template=get_template,
        model=get_render_model,
        code=code_inputs("render"),
    log:
        "logs/render_test_set/{testset}/{model}/{template}.log",


rule tokenize_test_set:
    output:
        eval="results/test_sets/{testset}/tokens/{model}/{template}/eval.safetensors",
        rejected="results/test_sets/{testset}/tokens/{model}/{template}/rejected.parquet",
        audit="results/test_sets/{testset}/tokens/{model}/{template}/audit.json",
    input:
        prompts="results/test_sets/{testset}/prompts/{model}/{template}.parquet",
        model="results/models/{model}",
        code=code_inputs("tokenize"),
    params:
        options=lambda wc: json_option({**CONFIG["tokenize"], "test_set": wc.testset}),
    log:
        "logs/tokenize_test_set/{testset}/{model}/{template}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow tokenize --prompts {input.prompts:q} --model {input.model:q}"
        " --eval {output.eval:q} --rejected {output.rejected:q} --audit {output.audit:q}"
        " --options {params.options} > {log:q} 2>&1"
