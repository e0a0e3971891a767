"""allocator.py: which jemalloc training preloads, that a process started that way really runs on it,
and that setup's install fetches a working one (or says why not)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from instructflow.kernels import allocator
from instructflow.kernels.allocator import ENV, find_jemalloc, in_use, preload

PROBE = "from instructflow.kernels.allocator import in_use; print(in_use())"


def _run_with_preload(value: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": value}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_off_and_explicit_library(tmp_path):
    assert find_jemalloc({ENV: "off"}) is None
    assert preload({ENV: "off", "LD_PRELOAD": "/x/libfoo.so"}) == "/x/libfoo.so"
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    assert find_jemalloc({ENV: str(lib)}) == lib.resolve()
    with pytest.raises(FileNotFoundError, match=ENV):
        find_jemalloc({ENV: str(tmp_path / "missing.so")})


def test_preload_keeps_what_is_there_and_adds_jemalloc_once(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    env = {ENV: str(lib)}
    assert preload(env) == str(lib.resolve())
    assert preload({**env, "LD_PRELOAD": "/x/libfoo.so"}) == f"/x/libfoo.so:{lib.resolve()}"
    assert preload({**env, "LD_PRELOAD": str(lib.resolve())}) == str(lib.resolve())
    # An allocator the user preloads already is left alone.
    assert preload({**env, "LD_PRELOAD": "/opt/libtcmalloc.so.4"}) == "/opt/libtcmalloc.so.4"


def test_a_process_started_with_the_preload_runs_on_jemalloc():
    lib = find_jemalloc()
    if lib is None:
        pytest.skip("no jemalloc here: `make setup` installs one where apt is present")
    assert _run_with_preload(preload({})) == "jemalloc"
    assert _run_with_preload("") == "default"
    assert in_use() in ("jemalloc", "default")


def test_install_without_apt_says_so_and_installs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(allocator, "SYSTEM_DIRS", ())
    monkeypatch.setattr(allocator.shutil, "which", lambda name: None)
    assert allocator.install(tmp_path / "lib") is None
    assert "default allocator" in capsys.readouterr().out
    assert not (tmp_path / "lib").exists()


@pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("dpkg")), reason="needs apt (Debian/Ubuntu)")
def test_install_fetches_a_library_a_process_can_preload(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "SYSTEM_DIRS", ())  # as on a system without jemalloc
    lib = allocator.install(tmp_path / "lib")
    assert lib == tmp_path / "lib" / allocator.LIBRARY and lib.is_file()
    assert _run_with_preload(str(lib)) == "jemalloc"
    assert allocator.install(tmp_path / "lib") == lib  # already there: nothing fetched
