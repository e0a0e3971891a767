"""`make bench`: training throughput, memory and held-out loss of instructflow's train stage beside the
2023 recipe and TRL's SFTTrainer, plus preprocessing and generation speed, on one machine in one run.

bench/run.py orchestrates; every trainer runs in its own process (bench/systems.py) so its peak RSS
is its own; bench/data.py builds the data with the project's own clean/render/tokenize stages."""
