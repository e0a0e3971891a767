# train: accelerate launch on the package's entry point. Resumable state lives in
# results/runs/{run}/checkpoints, outside the outputs, because Snakemake deletes a job's outputs
# before rerunning it. Threads are split among accelerate's processes. On a cluster the profile
# (profiles/slurm) gives this rule GPUs (resource `gpu`: one process each), CPUs and memory; never
# `tasks`, which would start one copy of the whole launch per task.
rule train:
    output:
        model=directory("results/runs/{run}/model"),
        metrics="results/runs/{run}/train/metrics.jsonl",
        summary="results/runs/{run}/train/summary.json",
    input:
        model=from_run("results/models/{model}"),
        train=from_run("results/tokens/{model}/{template}/train.safetensors"),
        template=get_run_template,
        # The rule picks one of these by its process count (params.accelerate_config).
        accelerate_configs=expand(str(REPO / "config" / "accelerate" / "{name}.yaml"), name=["default", "ddp"]),
        code=lib("train.py", "batching.py", "loss.py", "checkpoint.py", "examples.py", "device.py"),
    params:
        settings=get_train_settings,
        processes=get_run_processes,
        accelerate_config=get_accelerate_config,
        workdir="results/runs/{run}/checkpoints",
        # Each run gets its own rendezvous port so concurrent trainings on one node never collide;
        # under SLURM the job id picks it (below 32768, the kernel's ephemeral range), so jobs of
        # different workflows or users sharing a node never collide either.
        port=get_run_port,
    threads: 2
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "PORT=${{SLURM_JOB_ID:+$(( 20000 + SLURM_JOB_ID % 12000 ))}};"
        # jemalloc where one is found (allocator.py): ~0.4 GiB less peak memory than glibc's malloc.
        " PRELOAD=$(python -m instructflow.kernels.allocator);"
        " LD_PRELOAD=$PRELOAD OMP_NUM_THREADS=$(( {threads} / {params.processes} > 0 ? {threads} / {params.processes} : 1 ))"
        " accelerate launch --config_file $(dirname {input.accelerate_configs[0]})/{params.accelerate_config}.yaml"
        " --num_processes {params.processes} --main_process_port ${{PORT:-{params.port}}}"
        " -m instructflow.train --settings {params.settings} --model {input.model} --train {input.train}"
        " --out {output.model} --metrics {output.metrics} --summary {output.summary}"
        " --workdir {params.workdir} > {log} 2>&1"
