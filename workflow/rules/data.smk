rule clean:
    output:
        clean="results/data/clean.parquet",
        rejected=report(
            "results/data/rejected.parquet",
            caption="../report/rejected.rst",
            category="Data",
        ),
        report=report(
            "results/data/clean_report.json",
            caption="../report/clean_report.rst",
            category="Data",
        ),
    input:
        data=CONFIG["data"]["path"],
        code=lib("clean.py"),
    params:
        options=json_option(
            {k: CONFIG["data"][k] for k in ("columns", "placeholders", "max_chars", "eval_fraction")}
        ),
    log:
        "logs/clean.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli clean --data {input.data} --clean {output.clean}"
        " --rejected {output.rejected} --report {output.report} --options {params.options} > {log} 2>&1"


rule render:
    output:
        "results/prompts/{model}/{template}.parquet",
    input:
        clean="results/data/clean.parquet",
        template=get_template,
        model=get_render_model,
        code=lib("render.py", "templates.py"),
    params:
        model=lambda wc, input: f"--model {input.model}" if input.model else "",
    log:
        "logs/render/{model}/{template}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli render --clean {input.clean} --template {input.template}"
        " --out {output} {params.model} > {log} 2>&1"


rule tokenize:
    output:
        train="results/tokens/{model}/{template}/train.safetensors",
        eval="results/tokens/{model}/{template}/eval.safetensors",
        rejected="results/tokens/{model}/{template}/rejected.parquet",
        audit=report(
            "results/tokens/{model}/{template}/audit.json",
            caption="../report/audit.rst",
            category="Data",
        ),
    input:
        prompts="results/prompts/{model}/{template}.parquet",
        model="results/models/{model}",
        code=lib("tokenization.py", "examples.py"),
    params:
        options=json_option(CONFIG["tokenize"]),
    log:
        "logs/tokenize/{model}/{template}.log",
    benchmark:
        "benchmarks/tokenize/{model}/{template}.tsv"
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow.cli tokenize --prompts {input.prompts} --model {input.model}"
        " --train {output.train} --eval {output.eval} --rejected {output.rejected} --audit {output.audit}"
        " --options {params.options} > {log} 2>&1"
