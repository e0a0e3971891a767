"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random models of every architecture in the
matrix (tests/architectures.py), built offline in the test session so every stage runs in seconds without
the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / ".test" / "data" / "instructions.csv"
from architectures import tiny_config  # the architecture matrix, one line each

ARCHS = ("gpt2", "gpt_neox", "llama")  # the unit tests' own three; test_architectures.py runs the whole matrix
# torch.compile on the CPU needs a C++ compiler: inductor takes $CXX, else g++ (as `make setup` checks).
HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# A minimal chat template in the shape real ones have: role markers, generation prompt at the end.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _fused_kernels_on():
    """Each test starts with the fused kernels switched on, as a new process does: a run with
    `train.advanced.fused_kernels: false` switches them off for the whole process (kernels.apply)."""
    from instructflow.kernels import fused

    fused.enable(True)


def _corpus() -> list[str]:
    """Text the BPE merges are learnt from; byte-level BPE still encodes any other text (byte fallback)."""
    from instructflow.templates import bundled_names, bundled_path

    templates = [bundled_path(name).read_text(encoding="utf-8") for name in bundled_names()]
    table = pd.read_csv(TEST_DATA, keep_default_na=False)
    return templates + [" ".join(row) for row in table.astype(str).itertuples(index=False)]


def build_tokenizer(pad_is_eos: bool = False, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS if pad_is_eos else PAD,
                                   unk_token=None, chat_template=CHAT_TEMPLATE)


def build_model(arch: str, vocab_size: int, eos_id: int, pad_id: int, seed: int = 0, attn: str | None = None,
                **config):
    """A tiny random model of architecture ``arch`` (a name in tests/architectures.py), ``config`` set on its config."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size, eos_id, pad_id, **config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()


def end_of_turn_tokenizer():
    """The tiny tokenizer with a chat template that ends every turn with a special token, as real ones do
    (SmolLM2's and Qwen's "<|im_end|>", Llama 3's "<|eot_id|>"), and that token is not EOS."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}\n", "{{ m['content'] }}<|end|>\n")
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> a save_pretrained folder (safetensors + tokenizer with a chat template), built once."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            tok = build_tokenizer()
            model = build_model(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(folder, safe_serialization=True)
            tok.save_pretrained(folder)
            built[arch] = folder
        return built[arch]

    return make


@pytest.fixture(scope="session")
def test_rows() -> pd.DataFrame:
    return pd.read_csv(TEST_DATA, keep_default_na=False)


@pytest.fixture(scope="session")
def clean_rows() -> pd.DataFrame:
    """The .test rows after the clean stage (row, instruction, input, output, messages, split)."""
    from instructflow.clean import clean_table, read_table

    return clean_table(read_table(TEST_DATA), source=str(TEST_DATA), eval_fraction=0.2).kept


@pytest.fixture(scope="session")
def alpaca_prompts(clean_rows) -> pd.DataFrame:
    from instructflow.render import render_prompts
    from instructflow.templates import load_template

    return render_prompts(clean_rows, load_template("alpaca"))


def copy_code(dest: Path) -> Path:
    """The workflow's code (Snakefile, rules, src, config, resources, envs) copied to ``dest``, so a test can
    edit a stage's code without touching the repository."""
    dest.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "src", "config", "resources", "envs"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def train_examples(tmp_path_factory, alpaca_prompts):
    """The .test rows' training split tokenized by the tiny tokenizer: (Examples, its safetensors path)."""
    from instructflow.tokenization import tokenize_prompts

    result = tokenize_prompts(alpaca_prompts, build_tokenizer(), max_length=1024)
    path = tmp_path_factory.mktemp("tokens") / "train.safetensors"
    result.splits["train"].save(path)
    return result.splits["train"], path


def training_prompt_ids(folder, template: str, conversation: list[dict]) -> list[int]:
    """What training fed the model before its answer to ``conversation`` (ending with the user's message): the
    conversation with an answer, rendered and tokenized by the render and tokenize stages' own code with the
    folder's tokenizer, cut where the answer starts (where evaluation generates from)."""
    import json

    from transformers import AutoTokenizer

    from instructflow.render import render_prompts
    from instructflow.templates import load_template
    from instructflow.tokenization import tokenize_prompts

    tokenizer = AutoTokenizer.from_pretrained(folder)
    turns = [*conversation, {"role": "assistant", "content": "An answer."}]
    clean = pd.DataFrame({"row": [0], "instruction": [""], "input": [""], "output": ["An answer."],
                          "messages": [json.dumps(turns)], "split": ["train"]})
    prompts = render_prompts(clean, load_template(template), tokenizer)
    assert prompts["segments"][0], "the template renders whole conversations"
    return tokenize_prompts(prompts, tokenizer, max_length=4096).splits["train"].prompt(0).tolist()
