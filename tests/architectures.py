"""The architecture matrix: one line per causal-LM architecture, mapping a name to a tiny config.

Every model is 2 layers, hidden 64, 4 attention heads (2 key/value heads where the architecture has
grouped-query attention), 512 positions, under 0.5M parameters besides the embeddings, so a training
step takes milliseconds on a CPU. ``tiny_config(name, vocab_size, eos_id, pad_id)`` builds one offline.

Adding an architecture is one line in ARCHITECTURES: name -> (model_type, naming style, extra kwargs).
The naming style says which keyword names the config class uses for the shared sizes:

- "std":  hidden_size / num_hidden_layers / num_attention_heads / num_key_value_heads /
          intermediate_size / max_position_embeddings (LLaMA and most newer models)
- "gpt2": n_embd / n_layer / n_head / n_positions / n_inner (GPT-2, GPT-J, GPTBigCode)
- "neo":  hidden_size / num_layers / num_heads / max_position_embeddings / intermediate_size (GPT-Neo)
- "bloom": hidden_size / n_layer / n_head (ALiBi, no position table)
- "std-mha": "std" without num_key_value_heads (the architecture has no grouped key/value heads)

Notes on kwargs that change behaviour:
- Sliding windows (gpt_neo's local layers, mistral, gemma2, gemma3_text) are set to 512 = the most
  positions, so they never cut anything off; GPT-Neo's default window is 256, which would.
- gemma/gemma2/gemma3_text/qwen3 have a head_dim of their own (256/128 by default): set to 16 = 64/4.
  Gemma 2/3 scale queries by query_pre_attn_scalar**-0.5: set to 16 (= head_dim, as in the 2B/9B models).
- gemma2 keeps its soft-capping (attention 50, final logits 30); granite gets Granite-3.0's
  multipliers (embedding 12, residual 0.22, attention 1/128, logits divided by 8) and cohere its
  logit_scale 0.0625, so that logit post-processing is visible in the probe.
- falcon is the Falcon-7B layout (multi-query: one key/value head, parallel attention, rotary);
  falcon_new the Falcon-40B/180B one (new_decoder_architecture, 2 key/value heads).
- gpt_bigcode is multi-query (one key/value head, SantaCoder/StarCoder-1).
- stablelm/phi keep their partial rotary (0.25/0.5 of each head's dims); smollm3 drops rotary on every
  second layer (no_rope_layer_interval 2; SmolLM3 does every fourth).
"""

from __future__ import annotations

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 64, 2, 4, 2, 128, 512

_STYLES = {
    "std": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                intermediate_size=FFN, max_position_embeddings=POSITIONS),
    "std-mha": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                    max_position_embeddings=POSITIONS),
    "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS),
    "neo": dict(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN,
                max_position_embeddings=POSITIONS),
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
}

GEMMA = dict(head_dim=16)
GEMMA23 = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=POSITIONS)

# name: (model_type, naming style, architecture-specific kwargs). One line per architecture.
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("gpt2", "gpt2", {}),
    "gpt_neo": ("gpt_neo", "neo", dict(attention_types=[[["global", "local"], 1]], window_size=POSITIONS)),
    "gpt_neox": ("gpt_neox", "std-mha", {}),
    "gptj": ("gptj", "gpt2", dict(rotary_dim=8)),
    "gpt_bigcode": ("gpt_bigcode", "gpt2", dict(multi_query=True)),
    "llama": ("llama", "std", {}),
    "mistral": ("mistral", "std", dict(sliding_window=POSITIONS, head_dim=None)),
    "mixtral": ("mixtral", "std", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen2": ("qwen2", "std", {}),
    "qwen3": ("qwen3", "std", dict(head_dim=16)),
    "gemma": ("gemma", "std", GEMMA),
    "gemma2": ("gemma2", "std", GEMMA23),
    "gemma3": ("gemma3_text", "std", GEMMA23),
    "opt": ("opt", "std-mha", dict(ffn_dim=FFN, word_embed_proj_dim=HIDDEN)),
    "bloom": ("bloom", "bloom", {}),
    "falcon": ("falcon", "std-mha", dict(multi_query=True, parallel_attn=True, alibi=False, ffn_hidden_size=FFN)),
    "falcon_new": ("falcon", "std-mha", dict(new_decoder_architecture=True, num_kv_heads=KV_HEADS, ffn_hidden_size=FFN)),
    "stablelm": ("stablelm", "std", {}),
    "phi": ("phi", "std", {}),
    "phi3": ("phi3", "std", {}),
    "olmo": ("olmo", "std", {}),
    "olmo2": ("olmo2", "std", {}),
    "granite": ("granite", "std", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                       attention_multiplier=0.0078125, logits_scaling=8.0)),
    "cohere": ("cohere", "std", dict(logit_scale=0.0625)),
    "starcoder2": ("starcoder2", "std", {}),
    "smollm3": ("smollm3", "std", dict(no_rope_layer_interval=2)),
}


def tiny_config(name: str, vocab_size: int, eos_id: int, pad_id: int, **overrides):
    """The tiny config of architecture ``name`` (a key of ARCHITECTURES) for this vocabulary."""
    from transformers import AutoConfig

    model_type, style, extra = ARCHITECTURES[name]
    kwargs = {**_STYLES[style], "vocab_size": vocab_size, "eos_token_id": eos_id, "bos_token_id": eos_id,
              "pad_token_id": pad_id, **extra, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)
