"""Bigger models for the bench, with random weights from their published configs (no model hub here).

Speed and memory depend on the shapes, not the weights, so a random model of the published shape measures
what training the real one costs. They train on the bench's rows tokenized with the bundled SmolLM2
tokenizer: its ids (< 49,152) fit both vocabularies; the embedding and LM head keep each model's own
vocabulary size, so their cost is the real model's. Losses of random models mean nothing: the bench
reports no held-out loss for them.

BENCH_TINY_MODELS=1 shrinks each to 2 layers of width 64 (same vocabulary) for a smoke test of the path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# From the models' config.json on the Hub (HuggingFaceTB/SmolLM2-135M, -360M, Qwen/Qwen2.5-0.5B). smollm2-135m is
# the default model's shape, for machines that cannot install the bundled GGUF (`bench.run --model-shape`).
CONFIGS = {
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "hidden_act": "silu",
    },
    "smollm2-360m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 960,
        "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
        "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "hidden_act": "silu",
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "hidden_act": "silu", "use_sliding_window": False,
    },
}
# The bigger models the bench trains besides the default one (SYSTEM@MODEL).
BIGGER = ("smollm2-360m", "qwen2.5-0.5b")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def config(name: str, tiny: bool | None = None) -> dict:
    if name not in CONFIGS:
        raise ValueError(f"unknown bench model {name!r}; known: {', '.join(CONFIGS)}")
    tiny = os.environ.get("BENCH_TINY_MODELS") == "1" if tiny is None else tiny
    return {**CONFIGS[name], **(TINY if tiny else {})}


def build(name: str, out_dir: Path, tokenizer_dir: Path, tiny: bool | None = None) -> Path:
    """A save_pretrained folder of ``name`` with random weights (seed 0) and the tokenizer of
    ``tokenizer_dir``; reused when one of the same config is there."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    wanted = config(name, tiny)
    folder = out_dir / (name + ("-tiny" if wanted["num_hidden_layers"] == TINY["num_hidden_layers"] else ""))
    marker = folder / "bench_config.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = dict(wanted)
    model_type = settings.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings), dtype=torch.float32)
    model.save_pretrained(folder)
    del model
    for item in Path(tokenizer_dir).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(item, folder / item.name)
    marker.write_text(json.dumps(wanted, indent=1))
    return folder
