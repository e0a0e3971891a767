"""The memory allocator training runs on: jemalloc where one is found, else the C library's malloc.

Packed micro-batches bring tensors of new sizes every step, and glibc's malloc keeps the memory they
freed in fragments it rarely hands back: the resident size of full fine-tuning of SmolLM2-135M grew from
2.6 to 3.0 GiB over 8 steps though live memory stayed at ~2.2 GiB. jemalloc's size classes reuse
those fragments and return what stays unused: peak RSS 2.64 GiB against 3.02, at the same speed
(docs/benchmarks.md). PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) offers jemalloc the
same way: by `LD_PRELOAD`, since the allocator must be in place before the process allocates.

`instructflow train` (launch.py) puts `preload()` in `LD_PRELOAD` of the training processes.
`make setup` installs jemalloc into the virtual environment (`install`, from Debian's package where
apt is present); the conda environment lists conda-forge's. `INSTRUCTFLOW_JEMALLOC` names another
library file, or `off` to keep the default allocator.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = "INSTRUCTFLOW_JEMALLOC"
LIBRARY = "libjemalloc.so.2"
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib")
DEBIAN_PACKAGE = "libjemalloc2"


def find_jemalloc(env: dict | None = None) -> Path | None:
    """The jemalloc library to preload: the one `INSTRUCTFLOW_JEMALLOC` names (None for `off`), else the
    environment's own (`<prefix>/lib`, where `install` and conda put it), else the system's."""
    env = os.environ if env is None else env
    choice = env.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "none", "false"):
        return None
    if choice:
        path = Path(choice)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV}={choice}: no such file; name a libjemalloc.so file or set it to 'off'")
        return path.resolve()
    if not sys.platform.startswith("linux"):
        return None  # LD_PRELOAD is how Linux's loader does it
    return _library_in(Path(sys.prefix) / "lib", *SYSTEM_DIRS)


def _library_in(*folders) -> Path | None:
    """The jemalloc library in the first of ``folders`` that holds one."""
    for folder in map(Path, folders):
        if (folder / LIBRARY).is_file():
            return (folder / LIBRARY).resolve()
    return None


def preload(env: dict | None = None) -> str:
    """The value for `LD_PRELOAD`: what it already holds, plus jemalloc when found, unless it already
    preloads an allocator (the user's tcmalloc, say: the first one loaded would win anyway)."""
    env = os.environ if env is None else env
    current = env.get("LD_PRELOAD", "").strip()
    lib = find_jemalloc(env)
    if lib is None or any("malloc" in Path(item).name for item in current.replace(":", " ").split()):
        return current
    return f"{current}:{lib}" if current else str(lib)


def trim() -> None:
    """Hand the heap that glibc keeps after training (freed activations, ~1-2 GB) back to the system, so
    export's fp32 weights and serialisation do not add to it. No-op without glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def in_use() -> str:
    """Whose malloc this process calls: `jemalloc`, `default` (the C library's), or another library's
    file name; found from the address `malloc` resolves to and the process's mapped files."""
    try:
        address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high and len(fields) >= 6:
                name = Path(fields[5]).name
                if "jemalloc" in name:
                    return "jemalloc"
                # The C library's, or one linked into the Python executable itself (some builds are).
                own = name.startswith("libc.") or Path(fields[5]) == Path("/proc/self/exe").resolve()
                return "default" if own else name
    except (OSError, AttributeError, ValueError):
        pass
    return "default"


def install(dest: Path) -> Path | None:
    """Put jemalloc in ``dest`` (a virtual environment's lib folder) from Debian's package, without root:
    `apt-get download` and `dpkg -x`. Returns the library, or None where the system has one already or
    where apt is missing or fails (training then runs on the default allocator: a warning says so)."""
    if (dest / LIBRARY).is_file():
        return dest / LIBRARY
    if _library_in(*SYSTEM_DIRS):
        return None
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        print(f"instructflow: no apt here to fetch {DEBIAN_PACKAGE}; training uses the default allocator "
              f"(peak memory ~0.4 GiB higher). Install jemalloc and set {ENV} to its library to use it.")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, check=True, capture_output=True,
                           timeout=300)
            deb = next(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True)
            lib = next((Path(tmp) / "x").rglob(LIBRARY))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration) as err:
            detail = getattr(err, "stderr", b"") or b""
            print(f"instructflow: could not fetch {DEBIAN_PACKAGE} with apt-get ({err} {detail.decode()[-200:]}); "
                  "training uses the default allocator (peak memory ~0.4 GiB higher).")
            return None
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib.resolve(), dest / LIBRARY)
    return dest / LIBRARY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the LD_PRELOAD value training runs with, or install jemalloc.")
    parser.add_argument("--install", type=Path, metavar="DIR", help="fetch jemalloc into DIR (a venv's lib folder)")
    args = parser.parse_args(argv)
    if args.install:
        lib = install(args.install)
        if lib:
            print(f"instructflow: training preloads {lib}")
        return
    print(preload())


if __name__ == "__main__":
    main()
