# train: accelerate launch on the package's entry point. Resumable state lives in
# results/runs/{run}/checkpoints, outside the outputs, because Snakemake deletes a job's outputs
# before rerunning it. Threads are split among accelerate's processes.
rule train:
    output:
        model=directory("results/runs/{run}/model"),
        metrics="results/runs/{run}/train/metrics.jsonl",
        summary="results/runs/{run}/train/summary.json",
    input:
        model=get_run_base_model,
        train=get_run_tokens,
        template=get_run_template,
        accelerate_config=str(REPO / "config" / "accelerate" / "default.yaml"),
        code=lib("train.py", "batching.py", "loss.py", "checkpoint.py", "examples.py", "device.py"),
    params:
        settings=get_train_settings,
        processes=get_run_processes,
        workdir="results/runs/{run}/checkpoints",
        # Each run gets its own rendezvous port so concurrent trainings on one node never collide.
        port=get_run_port,
    threads: 2
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "OMP_NUM_THREADS=$(( {threads} / {params.processes} > 0 ? {threads} / {params.processes} : 1 ))"
        " accelerate launch --config_file {input.accelerate_config} --num_processes {params.processes}"
        " --main_process_port {params.port}"
        " -m instructflow.train --settings {params.settings} --model {input.model} --train {input.train}"
        " --out {output.model} --metrics {output.metrics} --summary {output.summary}"
        " --workdir {params.workdir} > {log} 2>&1"
