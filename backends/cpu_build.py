"""Build a C++ extension once per machine, the way a user meets it: said, locked, interruptible, cached.

    mod = load_extension("flashport_cpu", [dir / "quant_gemv.cpp", ...], extra_cflags=[...], what="CPU kernels")

`torch.utils.cpp_extension.load` does the compiling (ninja and the system compiler). Around it:

- **Cache by content.** The build directory is ``<cache>/<name>_<key>``, key = sha256 of every source and header
  (all the C/C++ files beside the sources), the flags, the compiler ($CXX), torch's version and the Python ABI
  (plus ``key_extra``: the CPU's flags, since ``-march=native`` code must never run on another CPU). A finished
  build leaves a marker; a later process imports the library directly, without running ninja or the compiler.
  Two flashport versions (or checkouts) with different kernels use different directories, so they never rebuild
  each other's.
  ``<cache>`` is ``$FLASHPORT_KERNEL_CACHE``, else ``<torch extensions root>/flashport``
  (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``).
- **A lock that dies with its process.** Builders serialise on ``fcntl.flock`` of ``<dir>/flashport.lock``: the
  kernel releases it when the holder exits, however it exits (SIGKILL included). torch's own lock inside the
  directory is a file whose *existence* is the lock, so a killed build leaves it behind and every later torch
  build there waits forever; under our lock no live process can hold it, so it is removed, with a message.
- **Said on stderr.** One line when the build starts ("flashport: building CPU kernels, once (~30 s)..."), one
  when it is done, one while waiting for another process's build.
- **Ctrl-C stops it.** KeyboardInterrupt propagates, also from a build in a worker thread (where Python does not
  raise it and torch reports the compiler killed by the same Ctrl-C as a failed build, which callers would take
  for "no compiler" and go on without the kernels), and the lock goes with the process.

`last_status[name]` says what the last `load_extension(name, ...)` of this process did: "built" or "cached".
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: torch's own lock only
    fcntl = None

DONE = "flashport-built.json"   # written last: its presence means the library is complete
LOCK = "flashport.lock"         # flock'ed by the building process
TORCH_LOCK = "lock"             # torch.utils.cpp_extension's FileBaton
SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".h", ".hpp")

last_status: dict[str, str] = {}


def cache_root() -> Path:
    env = os.environ.get("FLASHPORT_KERNEL_CACHE")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / "flashport"


def build_key(sources: list[Path], flags: list[str], key_extra: str = "") -> str:
    """sha256 (16 hex digits) of the sources and the C/C++ files beside them, the flags, torch, Python and $CXX."""
    h = hashlib.sha256()
    files = sorted({p for s in sources for p in Path(s).parent.iterdir() if p.suffix in SOURCE_SUFFIXES}
                   | set(map(Path, sources)))
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for part in (*flags, torch.__version__, sys.version, sys.platform, os.environ.get("CXX", ""), key_extra):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


def build_dir(name: str, sources: list[Path], extra_cflags=(), extra_ldflags=(), key_extra: str = "") -> Path:
    """Where `load_extension` with these arguments builds and caches: <cache>/<name>_<key>."""
    key = build_key([Path(s).resolve() for s in sources], [*extra_cflags, "|", *extra_ldflags], key_extra)
    return cache_root() / f"{name}_{key}"


def _lib_path(d: Path, ext_name: str) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return d / f"{ext_name}{LIB_EXT}"


def _import(ext_name: str, lib: Path):
    spec = importlib.util.spec_from_file_location(ext_name, lib)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _say(msg: str) -> None:
    print(f"flashport: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """Hold an exclusive flock on `path` (created if needed); say so when another process holds it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is building the {what} ({path.parent})...")
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait (PEP 475: the handler runs, then raises)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_extension(name: str, sources: list[Path], *, extra_cflags: list[str] = (), extra_ldflags: list[str] = (),
                   key_extra: str = "", what: str = "CPU kernels", expected_s: int = 30):
    """The compiled module `name` built from `sources` (cached, see the module docstring). Raises what the build
    raises (no compiler, a compile error: RuntimeError/OSError); KeyboardInterrupt on Ctrl-C."""
    sources = [Path(s).resolve() for s in sources]
    d = build_dir(name, sources, extra_cflags, extra_ldflags, key_extra)
    ext_name = d.name
    lib, done = _lib_path(d, ext_name), d / DONE
    if done.exists() and lib.exists():
        with contextlib.suppress(ImportError):  # a damaged library is rebuilt below
            mod = _import(ext_name, lib)
            last_status[name] = "cached"
            return mod
    d.mkdir(parents=True, exist_ok=True)
    with exclusive(d / LOCK, what):
        if done.exists() and lib.exists():  # another process built it while we waited
            try:
                mod = _import(ext_name, lib)
                last_status[name] = "cached"
                return mod
            except ImportError:  # damaged: link it again
                lib.unlink()
        stale = d / TORCH_LOCK
        if stale.exists():  # we hold the build lock, so no live process holds torch's: its owner was killed
            _say(f"removing a stale build lock left by an interrupted build ({stale})")
            stale.unlink()
        done.unlink(missing_ok=True)
        _say(f"building {what}, once (~{expected_s} s)...")
        t0 = time.monotonic()
        from torch.utils.cpp_extension import load

        try:
            mod = load(ext_name, [str(s) for s in sources], extra_cflags=list(extra_cflags),
                       extra_ldflags=list(extra_ldflags), build_directory=str(d), verbose=False)
        except Exception as e:
            # Ctrl-C reaches ninja and the compiler too. In the main thread Python raises KeyboardInterrupt itself;
            # in a worker thread only the killed build is seen ("ninja: build stopped: interrupted by user"):
            # that is the interrupt too, not a build failure to fall back from
            if "interrupted by user" in str(e):
                raise KeyboardInterrupt from e
            raise
        done.write_text(json.dumps({"name": ext_name, "torch": torch.__version__, "seconds": time.monotonic() - t0,
                                    "sources": [str(s) for s in sources]}))
        _say(f"{what} built in {time.monotonic() - t0:.0f} s (cached in {d})")
    last_status[name] = "built"
    return mod
