"""Backend registry: the built-ins plus out-of-tree plugins found through the `flashport.backends` entry points.

A plugin's entry point names a factory (usually its Backend subclass) called with keyword options (device=...).
Plugins are third-party code, so the registry keeps them at arm's length:

- Naming a backend imports that backend only (`create("torch")` imports no plugin; `create("mychip")` imports
  the one entry point named mychip). An import that raises, or calls sys.exit, becomes a BackendError naming the
  plugin, its distribution and the reason.
- `discover()` (what `flashport backends` lists) imports and starts each plugin in a subprocess
  (`probe`): a plugin that raises, exits, aborts or segfaults there is reported as unavailable with the reason,
  and the listing goes on.
- `create("auto")` considers a plugin only when it has a passing conformance record for this flashport version
  and this plugin version (`flashport conformance NAME` writes it into `cache_dir()/conformance/`); such a
  plugin is probed in a subprocess first, and one whose start-up or `capabilities()` fails is skipped with one
  warning.
- An op that raises at run time is degraded by `dispatch.Ops` (reference fallback); `mark_degraded` records it
  in `cache_dir()/degraded/`, which `flashport backends` shows until the next passing conformance run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from .contract import API_VERSION, OPS, Backend, BackendError, Capabilities, DeviceInfo

log = logging.getLogger("flashport.backends")

ENTRY_POINT_GROUP = "flashport.backends"
PROBE_TIMEOUT = 180.0  # seconds for a plugin to import and start in the probe subprocess
_PROBE_MARK = "flashport-probe:"


def importable(target: str) -> str:
    """'' if the factory's module (and what it imports) loads, else the reason."""
    try:
        importlib.import_module(target.partition(":")[0])
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"{e.__class__.__name__}: {e}"
    return ""


def _torch_probe() -> tuple[bool, str, int]:
    return True, "", 10


def _triton_probe() -> tuple[bool, str, int]:
    import torch

    cuda, interpret = torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET") == "1"
    if not cuda and not interpret:  # unusable whatever it imports: do not import triton (~100 MB resident) to say so
        if importlib.util.find_spec("triton") is None:
            return False, "ModuleNotFoundError: No module named 'triton'", 0
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)", 0
    why = importable(BUILTINS["triton"][0])
    if why:
        return False, why, 0
    if cuda:
        return True, "", 30
    return True, "interpreter (TRITON_INTERPRET=1), no CUDA device", 1  # usable, never picked by "auto": slow


def _onnx_probe() -> tuple[bool, str, int]:
    why = importable(BUILTINS["onnxruntime"][0])
    return (not why), why, 5


# name -> (module:attribute of the factory, availability probe -> (ok, note, priority for backend="auto"))
BUILTINS = {
    # the torch backend with the fast CPU kernels (falls back to plain torch ops off the CPU / without a compiler)
    "torch": ("flashport.backends.torch_fast:FastTorchBackend", _torch_probe),
    "triton": ("flashport.kernels.backend:TritonBackend", _triton_probe),
    "onnxruntime": ("flashport.backends.onnx_backend:OnnxRuntimeBackend", _onnx_probe),
}


@dataclass
class BackendInfo:
    name: str
    source: str                      # "builtin" or the plugin's distribution
    available: bool
    reason: str = ""
    priority: int = 20
    factory: object = field(default=None, repr=False)  # "module:attr" (not imported yet) or the factory itself
    version: str = ""                # the plugin distribution's version (flashport's for the built-ins)
    probe: dict | None = field(default=None, repr=False)  # a plugin's subprocess probe (devices, capabilities)


def load_factory(target: str):
    """The object `module:attribute` names (imports the module)."""
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


def flashport_version() -> str:
    """The installed flashport's version (conformance records are per version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flashport")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def cache_dir() -> Path:
    """flashport's cache: $FLASHPORT_CACHE, else $XDG_CACHE_HOME/flashport, else ~/.cache/flashport."""
    if os.environ.get("FLASHPORT_CACHE"):
        return Path(os.environ["FLASHPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashport"


# -- entry points (listed from metadata: nothing is imported) ------------------------------------------------------
def _plugins(name: str | None = None) -> list[EntryPoint]:
    eps = entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def _dist(ep: EntryPoint) -> tuple[str, str]:
    return (ep.dist.name, ep.dist.version) if ep.dist else (ep.value, "")


def _try_import(ep: EntryPoint):
    """(the plugin's factory, '') imported in this process, or (None, why not): any failure, incl. sys.exit."""
    try:
        factory = ep.load()
    except SystemExit as e:  # a plugin must not end the process that imports it
        return None, f"failed to import: it called sys.exit({e.code!r})"
    except Exception as e:  # noqa: BLE001 - a broken plugin must not break flashport
        return None, f"failed to import: {e.__class__.__name__}: {e}"
    version = tuple(getattr(factory, "api_version", API_VERSION))
    if version[0] != API_VERSION[0]:
        return None, f"built for backend API {version}, flashport speaks {API_VERSION}"
    return factory, ""


def _import_plugin(ep: EntryPoint):
    factory, why = _try_import(ep)
    if factory is None:
        raise BackendError(f"backend plugin {ep.name!r} ({_dist(ep)[0]}) {why}")
    return factory


# -- probing a plugin in a subprocess --------------------------------------------------------------------------------
def caps_to_json(caps: Capabilities) -> dict:
    return {"ops": {op: (sorted(v) if not isinstance(v, bool) else v) for op, v in caps.ops.items()},
            "max_context": caps.max_context, "deterministic": caps.deterministic, "whole_step": caps.whole_step}


def caps_from_json(d: dict) -> Capabilities:
    return Capabilities(ops={op: (set(v) if isinstance(v, list) else bool(v)) for op, v in d["ops"].items()},
                        max_context=d.get("max_context"), deterministic=bool(d.get("deterministic")),
                        whole_step=bool(d.get("whole_step")))


def _probe_child(names: list[str], options: dict) -> None:
    """In the probe subprocess: import, start and query each plugin of `names` in turn; marked JSON lines on
    stdout after every stage, so the parent knows which plugin, at which stage, took the process down."""
    for name in names:
        out = {"name": name, "stage": "import", "ok": False}

        def emit(**kv):
            out.update(kv)
            sys.stdout.write(_PROBE_MARK + json.dumps(out) + "\n")
            sys.stdout.flush()

        emit()
        try:
            eps = _plugins(name)
            if not eps:
                emit(stage="done", reason=f"no entry point {name!r} in group {ENTRY_POINT_GROUP}")
                continue
            factory, why = _try_import(eps[0])
            if factory is None:
                emit(stage="done", reason=why)
                continue
            emit(stage="start", priority=int(getattr(factory, "priority", 20)))
            backend = factory(**options)
            emit(stage="capabilities")
            caps = backend.capabilities()
            if not isinstance(caps, Capabilities):
                raise TypeError(f"returned {type(caps).__name__}, not Capabilities")
            emit(stage="devices", capabilities=caps_to_json(caps))
            devs = [vars(d) for d in backend.devices()]
            describe = getattr(backend, "describe", None)  # contract 1.1; a duck-typed 1.0 backend may lack it
            emit(stage="done", ok=True, devices=devs, describe=str(describe() if callable(describe) else ""),
                 implements=[op for op in OPS if backend.implements(op)])
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from a plugin included
            what = {"import": "failed to import", "start": "failed to start", "capabilities": "capabilities() raised",
                    "devices": "devices() raised"}[out["stage"]]
            msg = f"it called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"{e.__class__.__name__}: {e}"
            emit(stage="done", reason=f"{what}: {msg}")


def probe_plugins(names: list[str], options: dict | None = None, timeout: float = PROBE_TIMEOUT) -> dict[str, dict]:
    """Import and start plugins in a subprocess (same sys.path), one after the other: name -> {"ok", "reason",
    "priority", "capabilities", "devices", "describe", "implements"}. A plugin that kills or hangs the subprocess
    is reported with how, and the plugins after it are probed in a fresh one."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    results: dict[str, dict] = {}
    todo = list(names)
    while todo:
        cmd = [sys.executable, "-c", "import sys, json; from flashport.backends.registry import _probe_child; "
               "_probe_child(json.loads(sys.argv[1]), json.loads(sys.argv[2]))", json.dumps(todo),
               json.dumps(options or {}, default=str)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            stdout, stderr, code = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            stdout, stderr, code = _text(e.stdout), _text(e.stderr), None
        for line in stdout.splitlines():
            if line.startswith(_PROBE_MARK):
                res = json.loads(line[len(_PROBE_MARK):])
                results[res["name"]] = res
        done = [n for n in todo if results.get(n, {}).get("stage") == "done"]
        culprit = next((n for n in todo if n not in done and n in results), None)
        if culprit is None and len(done) < len(todo):  # died before the first plugin (python itself)
            culprit = next(n for n in todo if n not in done)
            results[culprit] = {"name": culprit, "stage": "python start-up", "ok": False}
        if culprit is not None:
            results[culprit].update(ok=False, stage="done", reason=_death(results[culprit]["stage"], code, stderr, timeout))
            done.append(culprit)
        todo = [n for n in todo if n not in done]
    return results


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _death(stage: str, code: int | None, stderr: str, timeout: float) -> str:
    """How a plugin took the probe subprocess down, in words."""
    where = {"import": "at import", "start": "while starting", "capabilities": "in capabilities()",
             "devices": "in devices()"}.get(stage, f"during {stage}")
    if code is None:
        return f"did not finish {where} within {timeout:.0f} s"
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = str(-code)
        how = f"crashed {where} (signal {sig})"
    else:
        how = f"ended the process {where} (exit status {code})"
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:]
    return how + (f": {tail[0][:200]}" if tail else "")


def probe(name: str, options: dict | None = None, timeout: float = PROBE_TIMEOUT) -> dict:
    """probe_plugins for one plugin."""
    return probe_plugins([name], options, timeout)[name]


# -- discovery -------------------------------------------------------------------------------------------------------
def _builtin_info(name: str) -> BackendInfo:
    target, check = BUILTINS[name]
    ok, why, prio = check()
    return BackendInfo(name, "builtin", ok, why, prio, target, flashport_version())


def _plugin_info(ep: EntryPoint, probed: dict | None) -> BackendInfo:
    src, version = _dist(ep)
    info = BackendInfo(ep.name, src, True, "", 20, ep, version, probed)
    if probed is not None:
        info.available, info.reason = bool(probed.get("ok")), probed.get("reason", "")
        info.priority = int(probed.get("priority", 20))
    return info


def discover(check_plugins: bool = True) -> dict[str, BackendInfo]:
    """Every backend flashport knows of, with whether it can be used here and why not.

    Plugins are imported and started in a subprocess (probe_plugins), never in this process: one that raises,
    exits or crashes is reported unavailable with one RuntimeWarning naming it, its distribution and the reason.
    check_plugins=False lists them from their metadata only (available=True means "not checked")."""
    found = {name: _builtin_info(name) for name in BUILTINS}
    eps = [ep for ep in _plugins() if ep.name not in found]
    probed = probe_plugins([ep.name for ep in eps]) if check_plugins and eps else {}
    probes = [probed.get(ep.name) for ep in eps]
    for ep, probed in zip(eps, probes):
        info = _plugin_info(ep, probed)
        if not info.available:
            warnings.warn(f"flashport backend plugin {ep.name!r} ({info.source}) {info.reason}", RuntimeWarning,
                          stacklevel=2)
        found[ep.name] = info
    return found


# -- conformance records and degraded marks ----------------------------------------------------------------------
def _identity(name: str) -> tuple[str, str]:
    """(distribution, version) of backend `name`: flashport's for the built-ins."""
    if name in BUILTINS:
        return "flashport", flashport_version()
    eps = _plugins(name)
    return _dist(eps[0]) if eps else ("", "")


def _slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", p) for p in parts if p)


def record_path(name: str) -> Path:
    dist, version = _identity(name)
    return cache_dir() / "conformance" / f"{_slug(name, dist, version)}.json"


def write_record(name: str, passed: bool, report: dict) -> Path | None:
    """Keep the outcome of a full conformance run of backend `name` for `create("auto")`; a passing run also clears
    the backend's degraded marks. Returns the record's path (None when the cache is not writable)."""
    dist, version = _identity(name)
    rec = {"backend": name, "distribution": dist, "plugin_version": version, "flashport_version": flashport_version(),
           "api_version": list(API_VERSION), "passed": bool(passed), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                              time.gmtime()),
           "device": report.get("device"), "per_op": {k: v.get("passed") for k, v in report.get("per_op", {}).items()},
           "end_to_end": [e.get("passed") for e in report.get("end_to_end", [])]}
    path = record_path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, path)
        if passed:
            _degraded_path(name).unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not write the conformance record %s: %s", path, e)
        return None
    return path


def conformance_record(name: str) -> tuple[bool, str]:
    """(usable by auto, why): a passing record for this flashport version and this plugin version."""
    path = record_path(name)
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"no conformance record (run `flashport conformance {name}`)"
    except (OSError, json.JSONDecodeError) as e:
        return False, f"unreadable conformance record {path} ({e})"
    dist, version = _identity(name)
    if rec.get("flashport_version") != flashport_version() or rec.get("plugin_version") != version:
        return False, (f"conformance record is for flashport {rec.get('flashport_version')} / {dist} "
                       f"{rec.get('plugin_version')} (run `flashport conformance {name}` again)")
    if not rec.get("passed"):
        return False, f"failed conformance on {rec.get('created')}"
    return True, f"passed conformance on {rec.get('created')}"


def _degraded_path(name: str) -> Path:
    return cache_dir() / "degraded" / f"{_slug(name, *_identity(name))}.json"


def mark_degraded(backend: Backend, op: str, error: str) -> None:
    """Record that `op` raised on `backend` at run time (best effort: a read-only cache only loses the mark)."""
    path = _degraded_path(backend.name)
    try:
        marks = json.loads(path.read_text()) if path.exists() else {}
        marks[op] = {"error": error[:500], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "pid": os.getpid()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(marks, indent=1))
        os.replace(tmp, path)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("could not record the degraded backend %s in %s: %s", backend.name, path, e)


def degraded_marks(name: str) -> dict[str, dict]:
    """op -> {"error", "time", "pid"} for every op of backend `name` that raised at run time since its last passing
    conformance run."""
    try:
        return json.loads(_degraded_path(name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# -- creating --------------------------------------------------------------------------------------------------------
def create(name: str = "auto", **options) -> Backend:
    """Instantiate a backend by name (importing only that one); "auto" picks the highest-priority one that
    initialises among the built-ins and the plugins with a passing conformance record."""
    if name == "auto":
        return _auto(options)
    if name in BUILTINS:
        info = _builtin_info(name)
        if not info.available:
            raise BackendError(f"backend {name!r} is not available: {info.reason}")
        return _instantiate(info, options)
    eps = _plugins(name)
    if not eps:
        known = sorted(set(BUILTINS) | {ep.name for ep in _plugins()})
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(known)}")
    return _instantiate(_plugin_info(eps[0], None), options)


def _auto(options: dict) -> Backend:
    cands = [_builtin_info(name) for name in BUILTINS]
    eps = []
    for ep in _plugins():
        ok, why = conformance_record(ep.name) if ep.name not in BUILTINS else (False, "shadows a built-in")
        if ok:
            eps.append(ep)
        else:
            log.debug("auto: not considering plugin %s: %s", ep.name, why)
    # a plugin that crashes at import or start-up only takes the probe's subprocess down
    probed = probe_plugins([ep.name for ep in eps], options) if eps else {}
    for ep in eps:
        info = _plugin_info(ep, probed[ep.name])
        if not info.available:
            warnings.warn(f"flashport backend plugin {ep.name!r} ({info.source}) skipped: {info.reason}",
                          RuntimeWarning, stacklevel=3)
            continue
        cands.append(info)
    why = []
    for info in sorted(cands, key=lambda i: -i.priority):
        if not info.available:
            why.append(f"{info.name}: {info.reason}")
            continue
        try:
            return _instantiate(info, options)
        except BackendError as e:
            why.append(str(e))
    raise BackendError("no backend could be initialised with "
                       f"{', '.join(f'{k}={v!r}' for k, v in options.items()) or 'no options'}: " + "; ".join(why))


def _instantiate(info: BackendInfo, options: dict) -> Backend:
    """The backend object, started and asked for its capabilities once (a plugin failing either is refused here
    with one clear error rather than later, inside a model)."""
    if isinstance(info.factory, EntryPoint):
        factory = _import_plugin(info.factory)
    elif isinstance(info.factory, str):
        factory = load_factory(info.factory)
    else:
        factory = info.factory
    options = coerce_options(info.name, factory, options)
    try:
        backend = factory(**options)
    except SystemExit as e:
        raise BackendError(f"backend {info.name!r} ({info.source}) failed to initialise: it called "
                           f"sys.exit({e.code!r})") from None
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"backend {info.name!r} ({info.source}) failed to initialise: "
                           f"{e.__class__.__name__}: {e}") from e
    try:
        caps = backend.capabilities()
        if not isinstance(caps, Capabilities):
            raise TypeError(f"returned {type(caps).__name__}, not Capabilities")
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"backend {info.name!r} ({info.source}): capabilities() raised "
                           f"{e.__class__.__name__}: {e}") from e
    return backend


def coerce_options(name: str, factory, options: dict) -> dict:
    """Backend options as the factory takes them: a string (from `--backend-option KEY=VALUE`) becomes the type of
    the parameter's default (int, float, bool; "none" -> None), and a key the factory does not take is refused,
    naming the ones it does (a factory with **kwargs takes any key). Raises BackendError."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C factory: nothing to read
        return dict(options)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        named = {}
    else:
        named = {k: p for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = sorted(set(options) - set(named))
        if unknown:
            raise BackendError(f"backend {name!r} takes no option {unknown[0]!r}; its options: "
                               f"{', '.join(named) or '(none)'}")
    out = {}
    for key, value in options.items():
        p = named.get(key)
        default = None if p is None or p.default is inspect.Parameter.empty else p.default
        if isinstance(value, str) and default is not None and not isinstance(default, str):
            try:
                if isinstance(default, bool):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "1", "yes")
                elif isinstance(default, (int, float)):
                    value = type(default)(value)
            except ValueError:
                raise BackendError(f"backend {name!r} option {key}={value!r}: expected "
                                   f"{type(default).__name__}") from None
        elif isinstance(value, str) and value.lower() == "none" and p is not None and p.default is None:
            value = None
        out[key] = value
    return out


def device_infos(probed: dict) -> list[DeviceInfo]:
    return [DeviceInfo(**d) for d in probed.get("devices", [])]
