"""codedeps.py: the package files a stage's command imports, read from the source with ast; checked on a
made-up package and against what each stage really imports at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from instructflow import codedeps

STAGES = ("prepare-model", "clean", "render", "tokenize", "train", "evaluate", "compare", "report", "compare-runs",
          "export-gguf", "track")


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "instructflow"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


@pytest.fixture
def fake_package(tmp_path):
    return _write(tmp_path, {
        "__init__.py": "",
        "__main__.py": "from .cli import main\n",
        "cli.py": """
            import json
            from . import common

            def cmd_alpha(a):
                from .alpha import run

            def cmd_beta(a):
                import instructflow.beta

            def cmd_gamma_delta(a):
                from instructflow.kernels import fast
        """,
        "common.py": "import os\n",
        "alpha.py": """
            from typing import TYPE_CHECKING
            from .util import helper
            if TYPE_CHECKING:
                from . import worker

            def later():
                from .lazy import thing
        """,
        "util.py": "",
        "lazy.py": "",
        "worker.py": "from .kernels.fast import kernel\n",
        "beta.py": "from .util import helper as h\n",
        "unrelated.py": "from . import alpha\n",
        "kernels/__init__.py": "",
        "kernels/fast.py": "from .. import util\nfrom . import slow\n",
        "kernels/slow.py": "import torch\n",
    })


def rel(pkg: Path, files) -> set[str]:
    return {Path(p).relative_to(pkg).as_posix() for p in files}


ENTRY = {"__init__.py", "__main__.py", "cli.py", "common.py"}


def test_relative_absolute_function_level_and_type_checking_imports_count(fake_package):
    alpha = rel(fake_package, codedeps.stage_files("alpha", fake_package))
    assert alpha == ENTRY | {"alpha.py", "util.py", "lazy.py", "worker.py", "kernels/__init__.py", "kernels/fast.py",
                             "kernels/slow.py"}


def test_a_stage_gets_its_own_functions_imports_not_its_siblings(fake_package):
    assert rel(fake_package, codedeps.stage_files("beta", fake_package)) == ENTRY | {"beta.py", "util.py"}
    gamma = rel(fake_package, codedeps.stage_files("gamma-delta", fake_package))
    assert gamma == ENTRY | {"kernels/__init__.py", "kernels/fast.py", "kernels/slow.py", "util.py"}
    assert "unrelated.py" not in set().union(*(rel(fake_package, codedeps.stage_files(s, fake_package))
                                               for s in ("alpha", "beta", "gamma-delta")))


def test_unknown_stage_is_an_error(fake_package):
    with pytest.raises(LookupError, match="cmd_nope"):
        codedeps.stage_files("nope", fake_package)


def test_module_files_of_a_subpackage_module(fake_package):
    assert rel(fake_package, codedeps.module_files("instructflow.kernels.fast", fake_package)) == {
        "__init__.py", "kernels/__init__.py", "kernels/fast.py", "kernels/slow.py", "util.py"}


def test_real_stages_hold_their_modules():
    files = {s: {Path(p).name for p in codedeps.code_inputs(s)} for s in STAGES}
    assert all({"cli.py", "__main__.py", "__init__.py"} <= f for f in files.values())
    assert {"clean.py", "io.py"} <= files["clean"] and "train.py" not in files["clean"]
    assert {"launch.py", "allocator.py", "train.py", "loss.py", "batching.py"} <= files["train"]
    assert "report.py" in files["report"] and "evaluate.py" not in files["report"]
    assert "codedeps.py" not in set().union(*files.values())  # parse-time only: it runs no stage


# What each stage imports when it runs: the stage is started on inputs that do not exist, so it
# imports what its command imports and then fails; sys.modules is read at exit.


def _missing(tmp: Path, *names: str) -> list[str]:
    return [item for name in names for item in (f"--{name}", str(tmp / "missing" / name))]


STAGE_ARGS = {
    "prepare-model": lambda t: ["--spec", str(t / "missing.gguf"), "--out", str(t / "m")],
    "clean": lambda t: _missing(t, "data", "clean", "rejected", "report"),
    "render": lambda t: _missing(t, "clean", "template", "out"),
    "tokenize": lambda t: _missing(t, "prompts", "model", "train", "eval", "rejected", "audit"),
    "train": lambda t: ["--run", "r", "--accelerate-configs", str(t / "missing")]
    + _missing(t, "settings", "model", "train", "out", "metrics", "summary", "workdir"),
    "evaluate": lambda t: _missing(t, "model", "examples", "prompts", "metrics", "samples"),
    "compare": lambda t: _missing(t, "base-metrics", "tuned-metrics", "base-samples", "tuned-samples", "out-metrics",
                                  "out-samples"),
    "export-gguf": lambda t: _missing(t, "model", "out"),
    "compare-runs": lambda t: ["--runs", "r", "--settings", '{"r": {}}']
    + _missing(t, "metrics-jsonl", "train-summary", "eval-metrics", "loss-png", "metrics-png", "out-csv", "out-html"),
    "track": lambda t: ["--run", "r", "--settings", "{}", "--tracking", json.dumps(
        {"mlflow": True, "tensorboard": True, "tracking_uri": "", "experiment": "x"}), "--artifacts", str(t / "missing")]
    + _missing(t, "metrics-jsonl", "eval-metrics", "tensorboard", "out", "local-store"),
    "report": lambda t: ["--run", "r"] + _missing(t, "metrics-jsonl", "eval-metrics", "samples-md", "clean-report",
                                                  "audit", "train-summary", "loss-png", "out-md", "out-html"),
}


def _imported(tmp: Path, argv: list[str]) -> set[str]:
    out = tmp / f"modules-{len(list(tmp.glob('modules-*')))}.json"
    code = ("import atexit, json, runpy, sys\n"
            "out = sys.argv.pop(1)\n"
            "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted({m.__file__ for n, m in "
            "list(sys.modules.items()) if n.split('.')[0] == 'instructflow' and getattr(m, '__file__', None)}))))\n"
            "target = sys.argv.pop(1)\n"
            "runpy.run_module(target, run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code, str(out), *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert out.is_file(), proc.stderr[-2000:]
    return {str(Path(p).resolve()) for p in json.loads(out.read_text())}


@pytest.mark.parametrize("stage", STAGES)
def test_what_a_stage_imports_at_run_time_is_in_its_code_inputs(stage, tmp_path):
    computed = set(codedeps.code_inputs(stage))
    ran = _imported(tmp_path, ["instructflow", stage, *STAGE_ARGS[stage](tmp_path)])
    assert {Path(p).name for p in ran} >= {"cli.py", "__init__.py"}  # the probe really ran the stage
    assert ran <= computed, sorted(ran - computed)
    if stage == "train":  # the worker accelerate starts: `python -m instructflow.train`
        worker = _imported(tmp_path, ["instructflow.train", "--help"])
        assert any(p.endswith("batching.py") for p in worker)  # train.py itself runs as __main__
        assert str(codedeps.ROOT / "train.py") in computed
        assert worker <= computed, sorted(worker - computed)
