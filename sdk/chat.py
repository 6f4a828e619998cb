"""DeepSeek-V4 chat format: render OpenAI-style messages to segments/ids, parse replies.

Follows the release's `encoding/encoding_dsv4.py` (V4, not V4.1); docs/chat-format.md
records which copies were compared and the rules pinned here. The renderer returns
*segments*: `Control` markers (added to the prompt by id) and plain `str` text (tokenized
with special-token parsing off). Text from users, tools and documents is never scanned
for control spellings, so it can never become a control token.

    segs = render(messages, tools=tools, mode="thinking")
    ids = encode_chat(tokenizer, messages, tools=tools, mode="thinking")
    reply = parse_assistant(tokenizer.decode(generated_ids))
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from flashport.tokenizer import (ASSISTANT, BOS, DSML, END_THINK, EOS, LATEST_REMINDER,
                                 TASK_TOKENS, THINK, USER)


@dataclass(frozen=True)
class Control:
    """A control token, by its spelling; `encode_chat` adds it by id."""

    token: str

    def __str__(self) -> str:
        return self.token

    def __repr__(self) -> str:
        return f"C({self.token!r})"


C = Control
Segment = Control | str
MODES = {"chat": (False, None), "thinking": (True, None), "thinking-high": (True, None),
         "thinking-max": (True, "max")}

# Prompt text of the release, byte for byte (V4: one effort prompt, used for "max").
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
# Trusted template text: the control spellings in it become control tokens (as in the
# release, whose prompt string is tokenized with special tokens recognised).
_TOOLS_HEAD = """## Tools

You have access to a set of tools to help answer the user's question. \
You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types \
(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning \
inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_TAIL = """

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
_CONTROL_RE = re.compile("(" + "|".join(map(re.escape, (BOS, EOS, USER, ASSISTANT, THINK,
                                                          END_THINK, DSML, LATEST_REMINDER))) + ")")


def _trusted(template: str) -> list[Segment]:
    """Split OUR template text into text and Control segments. Never call on user data."""
    return [C(p) if i % 2 else p for i, p in enumerate(_CONTROL_RE.split(template)) if p]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: list[dict]) -> list[Segment]:
    """The release's tools section: OpenAI `tools` -> one JSON schema per line."""
    schemas = "\n".join(_json(t.get("function", t)) for t in tools)
    return _merge([*_trusted(_TOOLS_HEAD), schemas, *_trusted(_TOOLS_TAIL)])


def _call_arguments(call: dict) -> dict:
    args = call.get("function", call).get("arguments", "{}")
    if isinstance(args, dict):
        return args
    try:
        parsed = json.loads(args)
    except (TypeError, ValueError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": args}


def render_tool_calls(tool_calls: list[dict]) -> list[Segment]:
    """OpenAI tool_calls -> `\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>` segments."""
    segs = _trusted("\n\n<｜DSML｜tool_calls>\n")
    for n, call in enumerate(tool_calls):
        segs += _trusted(("\n" if n else "") + '<｜DSML｜invoke name="')
        segs += [call.get("function", call)["name"], *_trusted('">\n')]
        for k, (key, val) in enumerate(_call_arguments(call).items()):
            is_str = isinstance(val, str)
            segs += _trusted(("\n" if k else "") + '<｜DSML｜parameter name="')
            segs += [f'{key}" string="{"true" if is_str else "false"}">',
                     val if is_str else _json(val), *_trusted("</｜DSML｜parameter>")]
        segs += _trusted("\n</｜DSML｜invoke>")
    return _merge(segs + _trusted("\n</｜DSML｜tool_calls>"))


def _text_of(content: Any, sep: str = "") -> str:
    """OpenAI content (str or list of parts) -> text; non-text parts are marked."""
    if not isinstance(content, list):
        return content or ""
    return sep.join(p.get("text", "") if p.get("type") == "text"
                    else f"[Unsupported {p.get('type')}]" for p in content)


def _prepare(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Attach request tools to the system turn; fold tool results into user turns."""
    out: list[dict] = []
    for m in copy.deepcopy(list(messages)):
        role = m.get("role")
        if role == "tool":
            block = {"type": "tool_result", "id": m.get("tool_call_id", ""),
                     "text": _text_of(m.get("content"), "\n\n")}
        elif role == "user":
            block = {"type": "text", "text": _text_of(m.get("content"))}
        else:
            out.append(m)
            continue
        prev = out[-1] if out else None
        if prev and prev["role"] == "user" and (role == "tool" or prev.get("task") is None):
            prev["blocks"].append(block)  # consecutive user/tool turns merge (release rule)
            if role == "tool" and m.get("task") is not None:  # Quick Instruction after tool results
                prev["task"] = m["task"]
        else:
            out.append({"role": "user", "blocks": [block],
                        **{k: m[k] for k in ("task", "wo_eos") if k in m and (role == "user" or k == "task")}})
    for m in out:
        if not isinstance(m.get("role"), str):
            raise ValueError(f"chat message without a role: {m!r:.80}")
    if tools:
        system = next((m for m in out if m["role"] == "system"), None)
        if system is None:
            system = {"role": "system", "content": ""}
            out.insert(0, system)
        system["tools"] = tools
    # Tool results follow the order of the calls of the latest assistant turn.
    order: dict[str, int] = {}
    for m in out:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {c.get("id"): i for i, c in enumerate(m["tool_calls"]) if c.get("id")}
        elif m["role"] == "user" and order:
            results = sorted((b for b in m["blocks"] if b["type"] == "tool_result"),
                             key=lambda b: order.get(b["id"], 0))
            m["blocks"] = [results.pop(0) if b["type"] == "tool_result" else b for b in m["blocks"]]
    return out


def _user_text(m: dict) -> str:
    return "\n\n".join(f"<tool_result>{b['text']}</tool_result>" if b["type"] == "tool_result"
                       else b["text"] for b in m["blocks"])


def _merge(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segs:
        if isinstance(s, str):
            if not s:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += s
                continue
        out.append(s)
    return out


def _last_user(msgs: list[dict]) -> int:
    return max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)


def render(messages: list[dict], tools: list[dict] | None = None, mode: str = "chat",
           add_generation_prompt: bool = True) -> list[Segment]:
    """Messages -> segments, as the V4 release encodes them (BOS first).

    mode: "chat" (assistant opens with `</think>`), "thinking" / "thinking-high" (opens with
    `<think>`), "thinking-max" (thinking + the maximum-effort prompt before the first turn).
    With tools (request or per-message) earlier reasoning is kept (interleaved thinking);
    otherwise, in thinking mode, reasoning before the last user turn is dropped.
    """
    if mode not in MODES:
        raise ValueError(f"unknown chat mode {mode!r}; expected one of {sorted(MODES)}")
    thinking, effort = MODES[mode]
    msgs = _prepare(messages, tools)
    keep_reasoning = any(m.get("tools") for m in msgs)
    last_user = _last_user(msgs)
    if thinking and not keep_reasoning:  # release quirk: earlier developer turns are dropped
        msgs = [m for i, m in enumerate(msgs) if m["role"] != "developer" or i >= last_user]
        last_user = _last_user(msgs)

    out: list[Segment] = [C(BOS)]
    for i, m in enumerate(msgs):
        role = m["role"]
        if i == 0 and effort == "max":
            out.append(REASONING_EFFORT_MAX)
        if role == "system":
            out.append(_text_of(m.get("content")))
        elif role in ("user", "developer"):
            out += [C(USER), _user_text(m) if role == "user" else _text_of(m.get("content"))]
        elif role == "latest_reminder":
            out += [C(LATEST_REMINDER), _text_of(m.get("content"))]
        elif role == "assistant":
            after_task = i > 0 and msgs[i - 1].get("task") is not None
            if thinking and not after_task and (keep_reasoning or i > last_user):
                out += [m.get("reasoning_content") or "", C(END_THINK)]
            out.append(_text_of(m.get("content")))
            if m.get("tool_calls"):
                out += render_tool_calls(m["tool_calls"])
            if not m.get("wo_eos"):
                out.append(C(EOS))
        else:
            raise ValueError(f"unsupported chat role {role!r} in message {i}")
        if role in ("system", "developer") and m.get("tools"):
            out += ["\n\n", *render_tools(m["tools"])]

        # What opens the next assistant turn (only before an assistant turn or at the end).
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if (nxt is None and not add_generation_prompt) or nxt not in (None, "assistant",
                                                                     "latest_reminder"):
            continue
        think_tok = C(THINK if thinking and (keep_reasoning or i >= last_user) else END_THINK)
        task = m.get("task")
        if task is not None:
            if task not in TASK_TOKENS:
                raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
            out += ([C(ASSISTANT), C(THINK if thinking else END_THINK)] if task == "action" else [])
            out.append(C(TASK_TOKENS[task]))
        elif role in ("user", "developer"):
            out += [C(ASSISTANT), think_tok]
    return _merge(out)


def to_text(segments: list[Segment]) -> str:
    """The prompt as one string (what the release's encode_messages returns)."""
    return "".join(map(str, segments))


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                mode: str = "chat", add_generation_prompt: bool = True) -> list[int]:
    """Render and tokenize: control tokens by id, all text with special parsing off."""
    ids: list[int] = []
    for s in render(messages, tools, mode, add_generation_prompt):
        ids += [tokenizer.token_id(s.token)] if isinstance(s, Control) else tokenizer.encode(s)
    return ids


def common_prefix_len(a_ids, b_ids) -> int:
    """Length of the shared prefix of two id sequences (how much KV can be reused)."""
    n = min(len(a_ids), len(b_ids))
    return next((i for i in range(n) if a_ids[i] != b_ids[i]), n)


# ---- parsing the model's output -----------------------------------------------------------
_OPEN = "<｜DSML｜tool_calls>"
_INVOKE = re.compile(r'\s*<｜DSML｜invoke\s+name="([^"<>]*)"\s*>')
_PARAM = re.compile(r'\s*<｜DSML｜parameter\s+name="([^"<>]*)"\s+string="(true|false)"\s*>(.*?)'
                    r"</｜DSML｜parameter>", re.S)
_END_INVOKE = re.compile(r"\s*</｜DSML｜invoke>")
_CLOSE = re.compile(r"\s*</｜DSML｜tool_calls>")


def _snippet(s: str, pos: int) -> str:
    return repr(s[pos:pos + 60])


def _parse_calls(s: str, pos: int, errors: list[str]) -> tuple[list[dict], int]:
    """Parse one tool_calls block starting after its open tag; returns (calls, end)."""
    calls = []
    while True:
        if m := _CLOSE.match(s, pos):
            return calls, m.end()
        m = _INVOKE.match(s, pos)
        if not m:
            found = (s.find("<｜DSML｜invoke", pos), s.find("</｜DSML｜tool_calls>", pos))
            nxt = min((j for j in found if j > pos), default=-1)
            if not s[pos:].strip():
                errors.append("tool_calls block not closed")
                return calls, len(s)
            errors.append(f"unexpected text in tool_calls block at {_snippet(s, pos)}")
            if nxt < 0:
                return calls, len(s)
            pos = nxt
            continue
        name, pos, args, bad = m.group(1), m.end(), {}, None
        while p := _PARAM.match(s, pos):
            key, is_str, raw = p.groups()
            if "<｜DSML｜" in raw:  # its close tag is missing: resync inside this invoke
                bad, pos = f"malformed parameter {key!r}", p.start() + 1
                break
            pos = p.end()
            if key in args:
                bad = f"duplicate parameter {key!r}"
            elif is_str == "true":
                args[key] = raw
            else:
                try:
                    args[key] = json.loads(raw)
                except ValueError:
                    bad = f"parameter {key!r} is not valid JSON: {raw[:40]!r}"
        end = _END_INVOKE.match(s, pos)
        if bad is None and end is None:
            bad = f"malformed invoke at {_snippet(s, pos)}"
        if bad is None:
            calls.append({"type": "function",
                          "function": {"name": name, "arguments": _json(args)}})
            pos = end.end()
            continue
        errors.append(f"tool call {name!r} dropped: {bad}")
        j = s.find("</｜DSML｜invoke>", pos)
        if j < 0:
            errors.append("tool_calls block not closed")
            return calls, len(s)
        pos = j + len("</｜DSML｜invoke>")


# Control sequences a reply can be cut inside of. The renderer puts a blank line before the tool-call opener.
CONTROL_SEQUENCES = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK, END_THINK, *TASK_TOKENS.values(),
                     "\n\n" + _OPEN, _OPEN, "</｜DSML｜tool_calls>", "<｜DSML｜invoke", "</｜DSML｜invoke>",
                     "<｜DSML｜parameter", "</｜DSML｜parameter>")
_NO_TOOLS = tuple(c for c in CONTROL_SEQUENCES if DSML not in c)  # without tools, DSML markup is plain text


def partial_markup(text: str, tool_calls: bool = True) -> int:
    """Length of the tail of `text` that is the unfinished beginning of a control sequence (CONTROL_SEQUENCES;
    without tool_calls, DSML markup is ordinary text): what a reply that ends there (max_tokens, a stop string, a
    cancel, EOS) must not show as content or reasoning. A single '<' and the blank line before the tool-call opener
    alone are ordinary text: the tail must hold two characters of markup (one after the blank line)."""
    best = 0
    for seq in CONTROL_SEQUENCES if tool_calls else _NO_TOOLS:
        lead = len(seq) - len(seq.lstrip("\n"))
        shortest = lead + 1 if lead else 2
        for k in range(min(len(seq) - 1, len(text)), shortest - 1, -1):
            if text.endswith(seq[:k]):
                best = max(best, k)
                break
    return best


def split_releasable(text: str, final: bool, stops: tuple[str, ...] = (), tool_calls: bool = True) -> tuple[str, str]:
    """Streaming: (release, hold) of decoded text. While the reply goes on (final=False), the longest tail that may
    still become a stop string, the tool-call opener or other control markup is held back. When it ends
    (final=True: length, stop, cancel, EOS) nothing is held, and a tail that is unfinished control markup
    (`partial_markup`) is dropped: a cut reply never shows partial markup, streamed or not."""
    if final:
        return text[:len(text) - partial_markup(text, tool_calls)], ""
    pats = (*stops, *(("\n\n" + _OPEN, _OPEN) if tool_calls else ()))
    hold = max((k for pat in pats for k in range(1, min(len(pat), len(text) + 1)) if text.endswith(pat[:k])),
               default=0)
    # markup right before a possible stop string is held with it: if the stop string completes, the reply ends there
    hold = max(hold + partial_markup(text[:len(text) - hold], tool_calls), partial_markup(text, tool_calls))
    return text[:len(text) - hold], text[len(text) - hold:]


def parse_assistant(text: str, thinking: bool | None = None) -> dict:
    """Raw model output -> {content, reasoning_content, tool_calls, errors}. Never raises.

    `text` is what the model generated after the prompt (the prompt's `<think>` is not in
    it; a leading one is tolerated). thinking=None: reasoning is whatever precedes
    `</think>`, if present; True: a missing `</think>` is an error (all text is reasoning);
    False: no reasoning section. A trailing EOS is accepted and removed.
    """
    errors: list[str] = []
    body, reasoning, calls = text, None, []
    if EOS in body:
        cut = body.index(EOS)
        if body[cut + len(EOS):].strip():
            errors.append("text after end-of-sentence ignored")
        body = body[:cut]
    if thinking is not False:
        body = body.removeprefix(THINK)
        end = body.find(END_THINK)
        if end >= 0:
            reasoning, body = body[:end], body[end + len(END_THINK):]
        elif thinking:
            reasoning, body = body, ""
            errors.append("reasoning not closed by </think>")
    if reasoning is not None and END_THINK not in text and (cut := partial_markup(reasoning)):
        errors.append(f"reply ends inside control markup: {reasoning[-cut:]!r} dropped")
        reasoning = reasoning[:-cut]
    start = body.find(_OPEN)
    content = body if start < 0 else body[:start].removesuffix("\n\n")
    if start < 0 and (cut := partial_markup(content)):
        errors.append(f"reply ends inside control markup: {content[-cut:]!r} dropped")
        content = content[:-cut]
    while start >= 0:
        found, pos = _parse_calls(body, start + len(_OPEN), errors)
        calls += found
        start = body.find(_OPEN, pos)
        rest = body[pos:start if start >= 0 else len(body)]
        if rest.strip():
            errors.append(f"text after tool calls ignored: {rest[:60]!r}")
    for tok in (BOS, THINK, END_THINK, DSML):
        if tok in content or (reasoning and tok in reasoning):
            errors.append(f"unexpected {tok} in {'content' if tok in content else 'reasoning'}")
    return {"content": content, "reasoning_content": reasoning, "tool_calls": calls,
            "errors": errors}


__all__ = ["Control", "C", "Segment", "MODES", "REASONING_EFFORT_MAX", "render", "render_tools",
           "render_tool_calls", "to_text", "encode_chat", "common_prefix_len", "parse_assistant",
           "CONTROL_SEQUENCES", "partial_markup", "split_releasable"]
