"""The command line as a user meets it: help on every command, typed flags checked before any work, one-line
errors with exit code 2 and no traceback, engine flags mapped to one load_engine call, chat, planner auto mode,
file modes. Commands are enumerated from the Cli class, so a new command is covered without editing this file."""

import fcntl
import inspect
import io
import json
import os
import stat
import typing

import pytest

import flashport
from flashport.bench_cli import Bench
from flashport.cli import Cli, commands, main
from flashport.cli_args import _type_of, parse_args
from flashport.options import KVOptions, OffloadOptions


def _all_commands(obj=None, words=()):
    """[(words, bound method)] of every command and subcommand (groups such as bench walked into)."""
    out = []
    for name, target in commands(obj or Cli()).items():
        if callable(target):
            out.append(([*words, name], target))
        else:
            out += _all_commands(target, [*words, name])
    return out


COMMANDS = _all_commands()
IDS = [" ".join(w) for w, _ in COMMANDS]


def _one_line_error(capsys, rc, expect_rc=2) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == expect_rc, (rc, err)
    assert "Traceback" not in err and "\n" not in err and err.startswith("flashport: error: "), err
    return err


def test_every_command_is_enumerated():
    names = {" ".join(w) for w, _ in COMMANDS}
    assert {"generate", "chat", "serve", "export", "plan", "inspect", "eval", "export-onnx", "conformance", "kv",
            "config", "make-checkpoint", "bench decode", "bench serve", "bench ops"} <= names


@pytest.mark.parametrize("words, fn", COMMANDS, ids=IDS)
def test_help_lists_every_flag_with_type_and_meaning(words, fn, capsys):
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    hints = typing.get_type_hints(fn)
    for name in inspect.signature(fn).parameters:
        shown = name.upper() if name.upper() in out.split() else f"--{name.replace('_', '-')}"
        assert shown in out, f"{' '.join(words)} --help does not list {name}"
        # flags are shown as users type them (--max-new-tokens), never in Python's spelling
        assert f"--{name}=" not in out or "_" not in name, f"{' '.join(words)} --help shows --{name}"
    assert "Type:" in out or not hints
    # every parameter has a meaning in the docstring's Args section (what fire prints under the flag)
    doc = inspect.getdoc(fn)
    assert "Args:" in doc
    for name in inspect.signature(fn).parameters:
        assert f"{name}:" in doc, f"{' '.join(words)}: {name} has no description"
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in inspect.signature(fn).parameters.values())


def test_top_level_help_lists_commands_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words, _ in COMMANDS:
        assert f"\n     {words[0]}\n" in out, words[0]  # as typed: export-onnx, not export_onnx
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flashport {flashport.__version__}"
    assert main([]) == 0  # no command: the help, not a traceback
    capsys.readouterr()


def _bad_values():
    """For every command and every int / float / bool flag, one value of the wrong type."""
    cases = []
    for words, fn in COMMANDS:
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        required = [f"/nonexistent-{n}" for n, p in sig.parameters.items() if p.default is p.empty]
        for name in sig.parameters:
            tp, _, _ = _type_of(hints.get(name, str))
            flag = "--" + name.replace("_", "-")
            bad = {int: "abc", float: "abc", bool: "maybe"}.get(tp)
            if bad is not None:
                cases.append(pytest.param([*words, *required, f"{flag}={bad}"], flag,
                                          id=f"{' '.join(words)} {flag}={bad}"))
    return cases


@pytest.mark.parametrize("argv, flag", _bad_values())
def test_wrong_type_is_one_line_exit_2(argv, flag, capsys):
    err = _one_line_error(capsys, main(argv))
    assert flag in err


@pytest.mark.parametrize("words, fn", COMMANDS, ids=IDS)
def test_unknown_flag_is_refused(words, fn, capsys):
    err = _one_line_error(capsys, main([*words, "--no-such-flag", "1"]))
    assert "unknown flag --no-such-flag" in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "{ck}", "--prompt", "x", "--max-new-tokens", "abc"], "--max-new-tokens: expected a whole number"),
    (["generate", "{ck}", "--prompt", "x", "--temperature", "abc"], "--temperature: expected a number"),
    (["generate", "{ck}", "--prompt", "x", "--seed", "abc"], "--seed: expected a whole number"),
    (["generate", "{ck}", "--prompt", "x", "--ep", "cpu"], "--ep: expected a whole number"),
    (["generate", "{ck}", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "{ck}"], "generate needs a prompt"),
    (["generate", "{ck}", "--prompt", "x", "--max-new-token", "4", "--json"], "did you mean --max-new-tokens?"),
    (["genrate", "{ck}"], "did you mean generate?"),
    (["kv", "--context", "abc"], "--context: expected a whole number"),
    (["kv", "--context", "-5"], "--context must be >= 1"),
    (["plan", "--context", "abc"], "--context: expected a whole number"),
    (["export", "{ck}", "{tmp}/out", "--calib-tokens", "abc"], "--calib-tokens: expected a whole number"),
    (["export", "{ck}", "{tmp}/out", "--calib", "/nonexistent.txt"], "--calib: /nonexistent.txt does not exist"),
    (["export", "{ck}", "{ck}"], "is the source checkpoint"),
    (["eval", "{ck}", "--text", "/nonexistent.txt"], "--text: /nonexistent.txt does not exist"),
    (["eval", "{ck}", "--text", "x", "--max-tokens", "abc"], "--max-tokens: expected a whole number"),
    (["serve", "{ck}", "--max-tokens", "abc"], "--max-tokens: expected a whole number"),
    (["serve", "{ck}", "--port", "abc"], "--port: expected a whole number"),
    (["serve", "{ck}", "--port", "70000"], "--port must be at most 65535"),
    (["serve", "{ck}", "--max-context", "abc"], "--max-context: expected a whole number"),
    (["export-onnx", "{ck}", "{tmp}/onnx", "--accuracy-level", "9"], "--accuracy-level must be one of 0, 1, 2, 3, 4"),
    (["conformance", "torch", "--formats", "fp3"], "--formats must be one of"),
    (["make-checkpoint", "--out", "{ck}"], "is not empty (add --force"),
    (["make-checkpoint", "--out", "{tmp}/new", "--format", "onnx"], "--format must be one of release, hf"),
    (["bench", "decode", "--prompt-lens", "512,abc"], "--prompt-lens: expected whole numbers"),
    (["generate", "{ck}", "--prompt", "x", "--backend", "torch", "--execution-provider", "CPUExecutionProvider"],
     "use --backend onnxruntime"),
    (["generate", "{ck}", "--prompt", "x", "--pg-backend", "nccl"], "applies with --ep N"),
    (["generate", "{ck}", "--prompt", "x", "--offload-tier", "disk"], "--offload-tier without --max-device-memory"),
    (["generate", "{ck}", "--prompt", "x", "--max-device-memory", "8XB"], "expected a size such as 8GiB"),
    (["generate", "{ck}", "--prompt", "x", "--kv-dir", "{tmp}/kv", "--kv-strategy", "often"], "kv strategy must be"),
    (["generate", "{ck}", "--prompt", "x", "--kv-strategy", "full"], "--kv-strategy without --kv-dir"),
    (["generate", "{ck}", "--prompt", "x", "--kv-dtype", "bf16"], "--kv-dtype applies with --kv-dir"),
    (["generate", "{ck}", "--prompt", "x", "--backend-option", "novalue"], "KEY=VALUE"),
    (["chat", "{ck}", "--ep", "2"], "chat is one interactive process"),
])
def test_bad_input_is_refused_before_any_work(argv, message, tiny_release, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the job ran before its flags were checked")

    # nothing may be loaded, exported, evaluated or served
    import flashport.engine

    monkeypatch.setattr(flashport.engine, "load_engine", no_work)
    monkeypatch.setattr(flashport.engine, "run_command", no_work)
    monkeypatch.setattr(flashport.Engine, "load", no_work)
    import flashport.export.bundle as bundle
    import flashport.export.evaluate as evaluate

    monkeypatch.setattr(bundle, "export_cli", no_work)
    monkeypatch.setattr(evaluate, "eval_cli", no_work)
    before = sorted(os.listdir(tiny_release))
    argv = [a.format(ck=tiny_release, tmp=tmp_path) for a in argv]
    err = _one_line_error(capsys, main(argv))
    assert message in err
    assert sorted(os.listdir(tiny_release)) == before
    assert not (tmp_path / "new").exists()  # make-checkpoint --format onnx leaves no empty directory


def test_read_text_arg_never_uses_a_missing_path_as_text(tmp_path):
    from flashport.export.calibrate import read_text_arg

    f = tmp_path / "corpus.txt"
    f.write_text("some text")
    assert read_text_arg(str(f)) == "some text"
    assert read_text_arg("just some words") == "just some words"
    for missing in ("/nonexistent.txt", "corpus.txt", "./x", str(tmp_path / "nope.md")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            read_text_arg(missing)


def test_typed_booleans_and_flag_forms():
    b = Bench()
    assert parse_args(b.decode, ["--peer", "false"], "p")["peer"] is False
    assert parse_args(b.decode, ["--nopeer"], "p")["peer"] is False
    assert parse_args(b.decode, ["--peer=yes"], "p")["peer"] is True
    assert parse_args(b.decode, ["--peer"], "p")["peer"] is True
    kw = parse_args(Cli().generate, ["ck", "--prompt", "123", "--max_new_tokens=5", "--backend-option", "a=1",
                                     "--backend-option", "b=2", "-j"], "p")
    # "123" stays text (fire would hand over an int); repeated flags accumulate; fire's short flag -j works
    assert kw == {"path": "ck", "prompt": "123", "max_new_tokens": 5, "backend_option": ["a=1", "b=2"], "json": True}


@pytest.mark.parametrize("flags,runs_peer", [(["--peer", "false"], False), (["--peer=False"], False),
                                              (["--nopeer"], False), (["--peer", "0"], False), ([], True)])
def test_bench_decode_peer_flag_through_the_cli(flags, runs_peer, tiny_release, monkeypatch, capsys):
    """`flashport bench decode --peer false` (parsed by the CLI itself, as a user types it) never runs
    transformers and prints '-' in its cells; without the flag it runs, and each row shows flashport /
    transformers and the decode roofline fraction."""
    from flashport.bench import decode, ops

    ran = []
    monkeypatch.setattr(decode, "_flashport",
                        lambda path, ids, n, fast, backend_options=None: (200.0, 20.0, 10 ** 6))
    monkeypatch.setattr(decode, "_transformers", lambda *a: ran.append(1) or (100.0, 10.0))
    monkeypatch.setattr(ops, "read_bandwidth", lambda nbytes: 1e9)
    rc = main(["bench", "decode", str(tiny_release), "--prompt-lens", "16", "--decode-tokens", "2", *flags])
    out = capsys.readouterr().out
    assert rc == 0 and bool(ran) is runs_peer
    pre, dec = (line.split() for line in out.strip().splitlines()[-3:-1])  # the last line is for scripts
    assert dec[:4] == ["16", "decode", "20.0", "20.0"] and dec[-1] == "2.0%"  # 20 tok/s * 1 MB / 1 GB/s
    assert (dec[4:6] == ["10.0", "2.00x"] and pre[4:6] == ["100.0", "2.00x"]) if runs_peer else \
        (dec[4:6] == ["-", "-"] and pre[4:6] == ["-", "-"])


class FakeEngine:
    ep_runner = None

    def __init__(self):
        self.closed = False

    def generate(self, prompt, stream=False, **kw):
        from flashport.engine import Generation

        g = Generation([1, 2], "ok", 1, 0.1, 0.1, "length")
        return iter(["ok"]) if stream else g

    def close(self):
        self.closed = True


def test_engine_flags_become_one_load_engine_call(tiny_release, tmp_path, monkeypatch, capsys):
    calls = []

    def load_engine(path, **kw):
        calls.append((path, kw))
        return FakeEngine()

    import flashport.engine

    monkeypatch.setattr(flashport.engine, "load_engine", load_engine)  # what run_command calls
    lib = tmp_path / "libplugin_ep.so"
    lib.write_bytes(b"")
    kv = tmp_path / "kv"
    argv = ["generate", str(tiny_release), "--prompt", "hi", "--json", "--backend", "onnxruntime",
            "--execution-provider", "MyEP", "--plugin-ep-library", str(lib), "--backend-option", "threads=2",
            "--device", "cpu", "--deterministic", "--kv-dir", str(kv), "--kv-strategy", "full", "--kv-dtype", "bf16",
            "--max-device-memory", "1GiB", "--offload-tier", "disk", "--index-numerics", "fp32"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["text"] == "ok"
    (path, kw), = calls
    assert path == str(tiny_release)
    assert kw == dict(backend="onnxruntime", backend_options={"threads": "2", "ep": "MyEP",
                                                              "plugin_ep_library": str(lib)},
                      device="cpu", deterministic=True, kv=KVOptions(str(kv), "full", dtype="bf16"),
                      offload=OffloadOptions(1 << 30, tier="disk"), parallel=None, public_key=None,
                      index_numerics="fp32")
    # chat and serve build their options with the same helper
    calls.clear()
    from flashport import chat_cli

    monkeypatch.setattr(chat_cli, "chat", lambda engine, mode, system, sampling: None)
    assert main(["chat", str(tiny_release), "--kv-dir", str(kv)]) == 0
    assert calls[0][1]["kv"] == KVOptions(str(kv)) and calls[0][1]["offload"] is None
    assert "loading" in capsys.readouterr().err  # chat says what it is doing while the model loads
    calls.clear()
    import flashport.server as server

    served = []
    monkeypatch.setattr(server, "run_server", lambda engine, *a, **k: served.append(k))
    assert main(["serve", str(tiny_release), "--backend", "onnxruntime", "--execution-provider", "MyEP",
                 "--max-tokens", "7", "--kv-dir", str(kv), "--kv-dtype", "bf16"]) == 0, capsys.readouterr().err
    assert calls[0][1]["backend_options"] == {"ep": "MyEP"} and served[0]["default_max_tokens"] == 7
    assert calls[0][1]["kv"] == KVOptions(str(kv), dtype="bf16")


def test_kv_directory_in_use_is_one_line(tiny_release, tmp_path, capsys):
    kv = tmp_path / "kv"
    holder = flashport.load_engine(tiny_release, kv=KVOptions(str(kv)))  # this process holds the directory's lock
    try:
        lock = next(kv.rglob("LOCK"))
        with open(lock, "a+b") as f:  # flock is per open file: this test's second opener conflicts like a process
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = _one_line_error(capsys, main(["generate", str(tiny_release), "--prompt", "x", "--kv-dir", str(kv)]))
        assert "in use by another process" in err
    finally:
        holder.close()


def test_debug_shows_the_traceback_and_internal_errors_stay_one_line(capsys, monkeypatch):
    assert main(["--debug", "kv", "--context", "-5"]) == 2
    assert "Traceback" in capsys.readouterr().err

    def boom(self, *a, **k):
        raise RuntimeError("something broke\ninside")

    monkeypatch.setattr(Cli, "kv", boom)
    err = _one_line_error(capsys, main(["kv"]), expect_rc=1)
    assert "RuntimeError: something broke inside" in err and "--debug" in err


def test_config_table_json_and_broken_pipe(capsys, monkeypatch):
    assert main(["config", "v4-flash"]) == 0
    out = capsys.readouterr().out
    assert "B parameters" in out and "B active per token" in out and "routed experts" in out
    assert main(["config", "v4-flash", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["total"] > d["active_params"] > 0 and d["hidden_size"] == 4096

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["config", "v4-flash"]) == 1  # `flashport config | head`: quiet, no traceback
    assert "Traceback" not in capsys.readouterr().err


def test_kv_uses_binary_units(capsys):
    assert main(["kv", "flash-tiny", "--context", "1000", "--memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "8.00 GiB" in out and "KiB" in out and " GB" not in out and " MB" not in out


def test_conformance_table_columns_fit_long_names():
    from flashport.backends.conformance import CaseResult, Report

    rep = Report("b", "cpu", (1, 0))
    rep.cases = [CaseResult("linear", "c", "int4-g32", True, max_abs=0.0, max_ulp=0),
                 CaseResult("moe_experts_long_op_name", "c", "fp8-e4m3-block128-ue8m0", True, max_abs=0.0,
                            max_ulp=0)]
    rows = rep.summary().splitlines()[1:4]
    col = rows[0].index("cases") + len("cases")  # right-aligned: every row's count ends where "cases" ends
    assert all(r[col - 1] == "1" and r[col - 2] == " " for r in rows[1:]), rows


def test_plan_auto_mode_falls_back_to_edge(capsys):
    # README's headline: two 64 GiB accelerators cannot hold V4-Flash's experts in ep mode; auto places in edge
    argv = ["plan", "--model", "v4-flash", "--devices", "npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk",
            "--recipe", "int4-experts"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "mode edge" in out and "auto mode: ep does not fit" in out
    assert main([*argv, "--mode", "ep"]) == 2
    assert "does not fit" in capsys.readouterr().err


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_tensor_files_follow_the_umask(mask, tmp_path):
    from flashport.checkpoint import make_checkpoint

    old = os.umask(mask)
    try:
        ck = make_checkpoint(tmp_path / "ck", "flash-tiny", 0, "release")
    finally:
        os.umask(old)
    modes = {p.suffix: stat.S_IMODE(p.stat().st_mode) for p in ck.iterdir() if p.is_file()}
    assert modes[".safetensors"] == modes[".json"] == 0o666 & ~mask


def test_export_bundle_files_follow_the_umask(tiny_release, tmp_path):
    from flashport.export.bundle import export

    old = os.umask(0o022)
    try:
        export(tiny_release, tmp_path / "b", "int8", progress=False)
    finally:
        os.umask(old)
    shards = list((tmp_path / "b").rglob("*.safetensors"))
    assert shards and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in shards)


def test_make_checkpoint_force_writes_into_a_non_empty_directory(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["make-checkpoint", "--out", str(out)]) == 2
    assert sorted(os.listdir(out)) == ["notes.txt"]
    capsys.readouterr()
    assert main(["make-checkpoint", "--out", str(out), "--force"]) == 0
    assert (out / "config.json").exists() and (out / "notes.txt").read_text() == "mine"


def test_eval_shows_progress(tiny_release, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    assert main(["eval", str(tiny_release), "--text", str(text), "--max-tokens", "32"]) == 0
    cap = capsys.readouterr()
    assert "perplexity" in cap.out and "eval: loading" in cap.err and "eval: scoring" in cap.err


# -- chat -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_release):
    return flashport.Engine.load(tiny_release)


def _script(engine, *pieces):
    from flashport.chat import Control

    tok, out = engine.tokenizer, []
    for p in pieces:
        out += [tok.token_id(p.token)] if isinstance(p, Control) else tok.encode(p)
    return out


def test_chat_commands_and_unclosed_thinking(engine):
    from flashport.chat_cli import UNCLOSED_THINKING, run_chat
    from flashport.session import Session

    s = Session(engine, mode="thinking")
    s.scheduler.script_next(_script(engine, "still thinking about it"))  # never closes </think>
    lines = iter(["hello", "/stats", "/clear", "/stats", "/bogus", "/quit"])
    out = io.StringIO()
    run_chat(s, {"max_new_tokens": 8}, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert UNCLOSED_THINKING in text
    assert "1 turn: prompt" in text
    after_clear = text.split("(conversation cleared)")[1]
    assert "(no turns yet)" in after_clear and "turn: prompt" not in after_clear
    assert "unknown command /bogus" in after_clear


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(engine):
    from flashport.chat_cli import run_chat
    from flashport.session import Session

    s = Session(engine, mode="chat")
    s.scheduler.script_next(_script(engine, "one two three four five six seven eight nine ten " * 3))

    class Out(io.StringIO):
        interrupted = False

        def write(self, text):
            if "one" in text and len(text) < 12 and not Out.interrupted:  # Ctrl-C while the reply prints
                Out.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    lines = iter(["count", "again", "/quit"])
    out = Out()
    run_chat(s, {"max_new_tokens": 40}, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert Out.interrupted and "(stopped)" in text
    roles = [m["role"] for m in s.messages]
    assert roles == ["user", "assistant", "user", "assistant"]  # the conversation went on after the stop
    assert s.turns[0].generated_tokens < 30


def test_config_json_value_of_the_wrong_type_is_one_line(tiny_release, tmp_path, capsys):
    d = json.loads((tiny_release / "config.json").read_text())
    d["hidden_size"] = "abc"
    (tmp_path / "config.json").write_text(json.dumps(d))
    err = _one_line_error(capsys, main(["config", str(tmp_path)]))
    assert "hidden_size" in err and "'abc'" in err and "config.json" in err


def test_bench_decode_backend_option_reaches_the_fast_backend(tiny_release, monkeypatch, capsys):
    """`bench decode --backend-option decode_activations=int8` hands the option to flashport's fast backend only
    (the reference path stays exact) and names it in the header; an unknown key or value is one line, exit 2."""
    from flashport.bench import decode, ops

    seen = []
    monkeypatch.setattr(decode, "_flashport", lambda path, ids, n, fast, backend_options=None:
                        seen.append((fast, backend_options)) or (200.0, 20.0, 10 ** 6))
    monkeypatch.setattr(ops, "read_bandwidth", lambda nbytes: 1e9)
    argv = ["bench", "decode", str(tiny_release), "--prompt-lens", "16", "--decode-tokens", "2", "--peer", "false"]
    assert main([*argv, "--backend-option", "decode_activations=int8"]) == 0
    assert "decode_activations=int8" in capsys.readouterr().out.splitlines()[0]
    assert seen == [(False, None), (True, {"decode_activations": "int8"})]
    for bad, named in (("decode_activation=int8", "decode_activation"), ("decode_activations=int4", "int4")):
        assert main([*argv, "--backend-option", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flashport: error: ") and "\n" not in err and named in err
