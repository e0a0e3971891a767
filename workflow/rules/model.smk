# prepare_model: any base-model spec -> a plain HF folder. A localrule because compute nodes on a
# cluster often have no internet (a Hub id is fetched here, on the submitting host).
localrules:
    prepare_model,


rule prepare_model:
    output:
        directory("results/models/{model}"),
    input:
        code=code_inputs("prepare-model"),
    params:
        spec=lambda wc: shlex.quote(MODELS[wc.model]["base"]),
        trust=lambda wc: "--trust-remote-code" if MODELS[wc.model]["trust_remote_code"] else "",
    log:
        "logs/prepare_model/{model}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow prepare-model --spec {params.spec} --out {output:q} {params.trust} > {log:q} 2>&1"
