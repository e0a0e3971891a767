# train: `instructflow train` (src/instructflow/launch.py) splits the job's threads among the
# processes, picks a rendezvous port (per run name, or from the SLURM job id), the accelerate config
# (one process or DDP) and jemalloc, then runs `accelerate launch -m instructflow.train`. Resumable
# state lives in results/runs/{run}/checkpoints, outside the outputs, because Snakemake deletes a job's
# outputs before rerunning it. The held-out tokens give the loss every train.eval_every steps (and the
# best step, for train.export: best). On a cluster the profile (profiles/slurm) gives this rule GPUs
# (resource `gpu`: one process each), CPUs and memory; never `tasks`, which would start one copy of
# the whole launch per task. `exec`: no shell stays between the scheduler and the launcher, since SLURM's
# warning signal before the time limit reaches every process of the job and would end the shell.
rule train:
    output:
        model=directory("results/runs/{run}/model"),
        metrics="results/runs/{run}/train/metrics.jsonl",
        summary="results/runs/{run}/train/summary.json",
    input:
        model=from_run("results/models/{model}"),
        train=from_run("results/tokens/{data}/{model}/{template}/train.safetensors"),
        eval=from_run("results/tokens/{data}/{model}/{template}/eval.safetensors"),
        template=get_run_template,
        accelerate_configs=accelerate_configs(),
        code=code_inputs("train"),
    params:
        settings=get_train_settings,
        processes=get_run_processes,
        workdir="results/runs/{run}/checkpoints",
    threads: 2
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        "../../envs/instructflow.yaml"
    shell:
        "exec python -m instructflow train --run {wildcards.run:q} --threads {threads} --processes {params.processes}"
        " --settings {params.settings} --model {input.model:q} --train {input.train:q} --eval {input.eval:q}"
        " --out {output.model:q}"
        " --metrics {output.metrics:q} --summary {output.summary:q} --workdir {params.workdir:q} > {log:q} 2>&1"
