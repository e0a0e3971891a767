"""instructflow: raw instruction table -> cleaned data -> prompts -> tokens -> fine-tuned, evaluated model.

Each stage is a module with one job, usable without Snakemake; the workflow's rules are thin calls
into these modules.
"""

__version__ = "0.1.0"
