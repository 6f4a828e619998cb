"""`flashport chat PATH`: an interactive terminal chat on a Session (the KV is reused from turn to turn).

Thinking is shown dimmed (or under a "thinking:" label when the output is not a terminal), apart from the answer.
Commands: /mode chat|thinking|thinking-max, /clear, /title, /stats, /help, /quit.
"""

from __future__ import annotations

import sys

from .chat import MODES
from .session import Session

HELP = ("commands: /mode chat|thinking|thinking-max  /clear (forget the conversation)  /title (Quick Instruction)  "
        "/stats (KV reuse per turn)  /help  /quit")


def chat_cli(path: str, mode: str = "chat", system: str = "", max_new_tokens: int = 512, temperature: float = 0.7,
             top_p: float = 0.95, seed: int | None = None, backend: str = "auto", execution_provider: str = "",
             plugin_ep_library: str = "", backend_option: str | tuple = "", device: str = "",
             deterministic: bool = False, kv_dir: str = "", kv_strategy: str = "periodic:4096",
             max_device_memory: str = "", offload_tier: str = "host", ep: int = 0):
    """Chat with PATH (a checkpoint or bundle directory) in the terminal.

    mode: chat | thinking | thinking-max; system: a system prompt; max_new_tokens, temperature, top_p, seed:
    sampling of each reply; the engine flags (backend, execution provider, KV, offload) are those of
    `flashport generate`. The chat is one interactive process: --ep is refused (serve with --ep instead).
    """
    from .engine import run_command
    from .options import OptionError, engine_options

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    if ep not in (0, 1):
        raise OptionError(f"chat with --ep {ep}: the chat is one interactive process; run `flashport serve PATH "
                          f"--ep {ep}` and chat through a client")
    opts = engine_options(backend, execution_provider, plugin_ep_library, backend_option, device, deterministic,
                          kv_dir, kv_strategy, "fp32", max_device_memory, offload_tier)

    def chat(engine):
        session = Session(engine, mode=mode, system=system or None)
        run_chat(session, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed))

    run_command(path, opts, chat, ["chat", path])


def run_chat(session: Session, sampling: dict, read=None, out=None):
    """The read-eval-print loop (separate from chat_cli so tests can drive it); read: input(), out: sys.stdout
    (both looked up at call time)."""
    read, out = read or input, out or sys.stdout
    tty = out.isatty() if hasattr(out, "isatty") else False
    dim, reset = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    out.write(f"flashport chat ({session.mode} mode). {HELP}\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/quit":
                return
            if cmd == "/clear":
                session.clear()
                out.write("(conversation cleared)\n")
            elif cmd == "/mode":
                if arg.strip() not in MODES:
                    out.write(f"modes: {', '.join(MODES)} (now {session.mode})\n")
                else:
                    session.mode = arg.strip()
                    out.write(f"(mode: {session.mode})\n")
            elif cmd == "/title":
                if any(m["role"] == "user" for m in session.messages):
                    out.write(f"title: {session.quick('title').content}\n")
                else:
                    out.write("(say something first)\n")
            elif cmd == "/stats":
                for i, t in enumerate(session.turns):
                    out.write(f"  {i + 1} {t.kind}: prompt {t.prompt_tokens}, reused {t.reused_tokens}, "
                              f"prefilled {t.prefilled_tokens}, generated {t.generated_tokens}, {t.seconds:.2f} s\n")
            else:
                out.write(HELP + "\n")
            continue
        session.add({"role": "user", "content": line})
        kind_now = None
        for kind, piece in session.stream(**sampling):
            if kind != kind_now:
                if kind == "reasoning":
                    out.write(f"{dim}thinking: ")
                elif kind_now == "reasoning":
                    out.write(f"{reset}\n")
                kind_now = kind
            out.write(piece)
            out.flush()
        if kind_now == "reasoning":
            out.write(reset)
        reply, st = session.last_reply, session.turns[-1]
        for call in reply.tool_calls:
            out.write(f"\n[tool call] {call['function']['name']}({call['function']['arguments']})")
        out.write(f"\n{dim}[{st.reused_tokens} tokens reused, {st.prefilled_tokens} prefilled, "
                  f"{st.generated_tokens} generated in {st.seconds:.2f} s]{reset}\n")


__all__ = ["chat_cli", "run_chat"]
