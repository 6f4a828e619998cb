"""`flashport chat PATH`: an interactive terminal chat on a Session (the KV is reused from turn to turn).

Thinking is shown dimmed (or under a "thinking:" label when the output is not a terminal), apart from the answer.
Line editing and history come from the stdlib's readline. Ctrl-C during a reply stops that reply (what was
generated stays in the conversation) and returns to the prompt; Ctrl-D or /quit leaves.
Commands: /mode MODE (each of flashport.chat.MODES), /clear, /title, /stats, /help, /quit.
"""

from __future__ import annotations

import queue
import sys
import threading

from .chat import MODES
from .session import Session

HELP = (f"commands: /mode {'|'.join(MODES)}  /clear (forget the conversation)  /title (Quick Instruction)  "
        "/stats (KV reuse per turn)  /help  /quit")
UNCLOSED_THINKING = ("(the reply ended inside its thinking, before </think>: raise --max-new-tokens, or /mode chat "
                     "for replies without thinking)")


def chat(engine, mode: str = "chat", system: str = "", sampling: dict | None = None) -> None:
    """Chat with a loaded engine in the terminal until /quit or end of input (`flashport chat`, which loads the
    engine with the engine flags and closes it after)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    session = Session(engine, mode=mode, system=system or None)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and history
        except ImportError:  # not on every platform (Windows): plain input
            pass
    run_chat(session, sampling or {})


def _stream_reply(session: Session, sampling: dict, out):
    """Generate the reply on a worker thread and write its pieces; Ctrl-C cancels the generation (the scheduler
    drops the sequence at its next step) and waits for the worker, so the process never exits under it.
    Returns (the Reply, kind of its last piece, whether it was stopped)."""
    pieces: queue.Queue = queue.Queue()
    failure: list[BaseException] = []
    replies = []

    def work():
        try:
            replies.append(session.generate(on_token=lambda k, t: pieces.put((k, t)), **sampling))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            failure.append(e)
        finally:
            pieces.put(None)

    tty = out.isatty() if hasattr(out, "isatty") else False
    dim, reset = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    worker = threading.Thread(target=work, name="flashport-chat-reply", daemon=True)
    worker.start()
    kind_now, stopped = None, False
    while True:
        try:
            item = pieces.get(timeout=0.1)
            if item is None:
                break
            if stopped:
                continue
            kind, piece = item
            if kind != kind_now:
                if kind == "reasoning":
                    out.write(f"{dim}thinking: ")
                elif kind_now == "reasoning":
                    out.write(f"{reset}\n")
                kind_now = kind
            out.write(piece)
            out.flush()
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            stopped = True
            sch = session.scheduler
            for seq in list(sch.active) + list(sch.waiting):
                seq.cancel()
    worker.join()
    if kind_now == "reasoning":
        out.write(reset)
    if failure:
        raise failure[0]
    return replies[0], kind_now, stopped


def run_chat(session: Session, sampling: dict, read=None, out=None):
    """The read-eval-print loop (separate from chat_cli so tests can drive it); read: input(), out: sys.stdout
    (both looked up at call time)."""
    read, out = read or input, out or sys.stdout
    tty = out.isatty() if hasattr(out, "isatty") else False
    dim, reset = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    out.write(f"flashport chat ({session.mode} mode). {HELP}\n")
    shown_from = 0  # /stats lists the turns since the last /clear
    while True:
        try:
            line = read("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /quit to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/quit":
                return
            if cmd == "/clear":
                session.clear()
                shown_from = len(session.turns)
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
                turns = session.turns[shown_from:]
                if not turns:
                    out.write("(no turns yet)\n")
                for i, t in enumerate(turns):
                    out.write(f"  {i + 1} {t.kind}: prompt {t.prompt_tokens}, reused {t.reused_tokens}, "
                              f"prefilled {t.prefilled_tokens}, generated {t.generated_tokens}, {t.seconds:.2f} s\n")
            elif cmd == "/help":
                out.write(HELP + "\n")
            else:
                out.write(f"unknown command {cmd}; {HELP}\n")
            continue
        session.add({"role": "user", "content": line})
        reply, kind_now, stopped = _stream_reply(session, sampling, out)
        st = reply.stats
        if stopped:
            out.write("\n(stopped)")
        elif kind_now == "reasoning" and session.thinking:
            out.write(f"\n{UNCLOSED_THINKING}")
        for call in reply.tool_calls:
            out.write(f"\n[tool call] {call['function']['name']}({call['function']['arguments']})")
        out.write(f"\n{dim}[{st.reused_tokens} tokens reused, {st.prefilled_tokens} prefilled, "
                  f"{st.generated_tokens} generated in {st.seconds:.2f} s]{reset}\n")


__all__ = ["chat", "run_chat"]
