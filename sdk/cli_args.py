"""Command-line arguments checked before any work: argv -> a function's typed keyword arguments (from its
signature), and the checks commands run on their values (ranges, choices, files, output directories). Each
problem is one `UsageError` line naming the flag; `flashport.cli.main` prints it and exits with code 2."""

import difflib
import inspect
import math
import types
import typing
from pathlib import Path


class UsageError(ValueError):
    """A command-line value that cannot work (unknown flag, wrong type, out of range, missing file...)."""


def at_least(flag: str, value: float, low: float) -> None:
    if value < low:
        raise UsageError(f"{flag} must be >= {low}, not {value}")


def one_of(flag: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"{flag} must be one of {', '.join(map(str, choices))}, not {value!r}{hint}")


def csv_choices(flag: str, value, choices) -> list[str] | None:
    """The items of a comma-separated flag, each one of `choices` (None when the flag is not given)."""
    if value is None:
        return None
    items = [x.strip() for x in str(value).split(",") if x.strip()]
    if not items:
        raise UsageError(f"{flag}: give a comma-separated list")
    for x in items:
        one_of(flag, x, choices)
    return items


def ints(flag: str, value) -> list[int]:
    """Positive whole numbers from a comma-separated flag (`--prompt-lens 512,2048`)."""
    try:
        out = [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected whole numbers separated by commas, got {value!r}") from None
    if not out or min(out) < 1:
        raise UsageError(f"{flag}: expected whole numbers >= 1 separated by commas, got {value!r}")
    return out


# -------------------------------------------------------------------------------------------------------------
# Files and directories
# -------------------------------------------------------------------------------------------------------------
def existing_dir(flag: str, path: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"{flag}: {path} does not exist")


def parent_dir(flag: str, path: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: directory {parent} does not exist")


def empty_out_dir(flag: str, path: str, force: bool) -> None:
    """Refuse an output directory that holds files (another model's folder, the source) unless --force."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag}: {path} is a file, not a directory")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UsageError(f"{flag}: {path} is not empty (add --force to write into it)")


def text_file(flag: str, text: str) -> None:
    """A text argument that looks like a path must name an existing file (never use the path as the text)."""
    from .export.calibrate import looks_like_path

    p = Path(text).expanduser()
    if looks_like_path(text) and not p.is_file():
        raise UsageError(f"{flag}: {text} {'is a directory' if p.is_dir() else 'does not exist'}")


# -------------------------------------------------------------------------------------------------------------
# argv -> keyword arguments
# -------------------------------------------------------------------------------------------------------------
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(tp):
    """(base type, is_list, optional) of an annotation: int, int | None, list[str] | None, ..."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _convert(flag: str, value: str, tp):
    if tp is bool:
        if value.lower() in TRUE:
            return True
        if value.lower() in FALSE:
            return False
        raise UsageError(f"{flag}: expected true or false, got {value!r}")
    if tp is int:
        try:
            return int(value.replace("_", ""))
        except ValueError:
            raise UsageError(f"{flag}: expected a whole number, got {value!r}") from None
    if tp is float:
        try:
            v = float(value)
        except ValueError:
            raise UsageError(f"{flag}: expected a number, got {value!r}") from None
        if not math.isfinite(v):
            raise UsageError(f"{flag}: expected a finite number, got {value!r}")
        return v
    return value


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_args(fn, argv: list[str], prog: str) -> dict:
    """Keyword arguments of `fn` from argv (`--name value`, `--name=value`, `--flag`, `--noflag`, `-n value`,
    positionals in order). Raises UsageError on an unknown flag (naming the closest), a value of the wrong type,
    a missing or an extra argument."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    params = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    kinds = {n: _type_of(hints.get(n, str)) for n in params}
    firsts = [n[0] for n in params]
    short = {n[0]: n for n in params if firsts.count(n[0]) == 1}  # python-fire's short flags (unique first letter)
    out: dict = {}

    def put(name: str, flag: str, raw):
        tp, is_list, _ = kinds[name]
        v = _convert(flag, raw, tp) if isinstance(raw, str) else raw
        if is_list:
            out.setdefault(name, []).append(v)
        elif name in out:
            raise UsageError(f"{flag} given twice")
        else:
            out[name] = v

    positionals: list[str] = []
    i, only_positional = 0, False
    while i < len(argv):
        a = argv[i]
        i += 1
        if only_positional or not a.startswith("-") or a == "-" or _is_number(a):
            positionals.append(a)
            continue
        if a == "--":
            only_positional = True
            continue
        key, eq, val = a.lstrip("-").partition("=")
        name = key.replace("-", "_")
        if a.startswith("--") and name not in params and name.startswith("no") and \
                kinds.get(name[2:], (None,))[0] is bool and not eq:
            put(name[2:], _flag(name[2:]), False)
            continue
        if not a.startswith("--"):
            name = short.get(key, "") if len(key) == 1 else ""
        if name not in params:
            names = [_flag(n) for n in params]
            close = difflib.get_close_matches(_flag(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; {prog} --help lists the flags"
            raise UsageError(f"unknown flag {a.partition('=')[0]}{hint}")
        flag = _flag(name)
        if eq:
            put(name, flag, val)
        elif kinds[name][0] is bool:
            if i < len(argv) and argv[i].lower() in TRUE + FALSE:
                put(name, flag, argv[i])
                i += 1
            else:
                put(name, flag, True)
        elif i < len(argv) and (not argv[i].startswith("-") or _is_number(argv[i])):
            put(name, flag, argv[i])
            i += 1
        else:
            raise UsageError(f"{flag} needs a value (write {flag}=VALUE for a value that starts with -)")
    free = [n for n, p in params.items() if n not in out and p.kind == p.POSITIONAL_OR_KEYWORD]
    for v in positionals:
        if not free:
            raise UsageError(f"unexpected argument {v!r} ({prog} --help lists the arguments)")
        name = free.pop(0)
        # a positional that lands on a flag (e.g. `--json maybe`: `maybe` fills the next free parameter) is
        # named as that flag, so the error says where the word went
        required = params[name].default is params[name].empty
        put(name, name.upper() if required else f"{_flag(name)} (from the positional argument {v!r})", v)
    missing = [n for n, p in params.items() if n not in out and p.default is p.empty]
    if missing:
        raise UsageError(f"{prog} needs {' and '.join(n.upper() for n in missing)} ({prog} --help)")
    return out
