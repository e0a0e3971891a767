# export_gguf: a run's tuned model as one GGUF file per type (llama.cpp's converter; q4/q5 types
# requantized with gguf.quants), tokenizer and chat template inside, for llama.cpp, Ollama and LM
# Studio. Opt-in: only the types a run lists in export.gguf are targets (gguf_targets, common.smk).
rule export_gguf:
    output:
        "results/runs/{run}/gguf/model-{gguf_type}.gguf",
    input:
        model="results/runs/{run}/model",
        code=code_inputs("export-gguf"),
    params:
        name=lambda wildcards: shlex.quote(f"{RUNS[wildcards.run]['model_key']}-{wildcards.run}"),
    log:
        "logs/export_gguf/{run}/{gguf_type}.log",
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "python -m instructflow export-gguf --model {input.model:q} --out {output:q} --type {wildcards.gguf_type}"
        " --name {params.name} > {log:q} 2>&1"
