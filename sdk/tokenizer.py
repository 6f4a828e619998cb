"""Byte-level BPE tokenizer wrapper with safe text encoding and streaming decode.

Text is always encoded with special-token parsing OFF: a user, document or tool string
that happens to contain `<｜Assistant｜>` or `<think>` becomes ordinary text tokens, never
a control id. Control tokens are only ever added by id (see flashport.chat).

    tok = Tokenizer.default()                 # the small shipped asset (8192 ids)
    tok = Tokenizer.from_file("tokenizer.json")
    ids = tok.encode("hello")
    tok.decode(ids)
    for piece in tok.stream(ids): ...         # complete UTF-8 pieces only
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

DEFAULT_PATH = Path(__file__).resolve().parent / "assets" / "tokenizer.json"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
PAD = "<｜▁pad▁｜>"
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
# Order == ids in the shipped asset (samples/build_tokenizer.py); other files may differ.
CONTROL_TOKENS = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK, END_THINK, DSML,
                  *TASK_TOKENS.values(), PAD)
_ALIASES = {"bos": BOS, "eos": EOS, "pad": PAD, "user": USER, "assistant": ASSISTANT,
            "latest_reminder": LATEST_REMINDER, "think": THINK, "/think": END_THINK,
            "dsml": DSML, **TASK_TOKENS}


class TokenizerFileError(ValueError):
    """The tokenizer file exists but cannot be read as a `tokenizers` JSON file."""


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (byte -> printable char)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, path: Path | None = None):
        self._tok = hf
        self.path = path
        # Added (special) tokens in raw text are NOT matched: text stays text.
        self._tok.encode_special_tokens = True

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = _HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # bad UTF-8, bad JSON, or the Rust loader's own Exception
            raise TokenizerFileError(f"cannot load tokenizer file {path}: {e}") from e
        return cls(hf, path)

    @classmethod
    def default(cls) -> "Tokenizer":
        return cls.from_file(DEFAULT_PATH)

    # ---- ids -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int:
        """Control token id, by spelling (`<｜User｜>`) or alias (`user`, `bos`, `/think`)."""
        spelling = _ALIASES.get(name, name)
        tid = self._tok.token_to_id(spelling)
        if tid is None:
            raise KeyError(f"control token {name!r} not in tokenizer {self.path or ''}".rstrip())
        return tid

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # ---- text ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Never produces a control token, never adds BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    @cached_property
    def _id_bytes(self) -> list[bytes]:
        """Raw bytes of every id (byte-level BPE); special tokens give their UTF-8 spelling."""
        inv = _byte_decoder()
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        out = []
        for i in range(self.vocab_size):
            if i in added:
                out.append(added[i].encode())
                continue
            tok = self._tok.id_to_token(i) or ""
            out.append(b"".join(bytes([inv[c]]) if c in inv else c.encode() for c in tok))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one id; b"" for an id past the tokenizer's table (a model's vocabulary may be padded beyond
        its tokenizer's, as the release's is: `decode` skips such ids too)."""
        table = self._id_bytes
        return table[token_id] if 0 <= token_id < len(table) else b""

    def stream(self, ids: Iterable[int], skip_special: bool = False) -> Iterator[str]:
        """Yield decoded text pieces as ids arrive; never splits a UTF-8 character."""
        dec = StreamDecoder(self, skip_special)
        for i in ids:
            if piece := dec.push(i):
                yield piece
        if tail := dec.finish():
            yield tail


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get only complete UTF-8 text.

    Bytes of a character split across tokens are held until the character completes;
    invalid byte sequences become U+FFFD (also at `finish()`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        data = b"".join(self.tokenizer.token_bytes(i) for i in ids if i not in self.skip)
        return self._utf8.decode(data, final=False)

    def finish(self) -> str:
        """Flush what is held (an incomplete tail decodes as U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


__all__ = ["Tokenizer", "StreamDecoder", "TokenizerFileError", "CONTROL_TOKENS", "TASK_TOKENS",
           "DEFAULT_PATH", "BOS", "EOS", "USER", "ASSISTANT", "LATEST_REMINDER", "THINK",
           "END_THINK", "DSML", "PAD"]
