"""Build flashport's small stand-in tokenizer: sdk/assets/tokenizer.json.

A byte-level BPE with 8192 ids in total, trained offline and deterministically on the
docstrings of a fixed, sorted list of Python standard-library modules. Control tokens
take the lowest ids, in the order of CONTROL_TOKENS (spellings checked against the
DeepSeek-V4 release vocabulary; see docs/chat-format.md).

    python samples/build_tokenizer.py [--out sdk/assets/tokenizer.json] [--check]

The output depends only on this file, the Python version (docstrings differ between
releases) and the `tokenizers` version; --check rebuilds and compares with the file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import sys
import warnings
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192

# Fixed ids: position in this tuple == token id. Keep in sync with flashport.tokenizer.
CONTROL_TOKENS = (
    "<｜begin▁of▁sentence｜>",  # 0  BOS
    "<｜end▁of▁sentence｜>",  # 1  EOS
    "<｜User｜>",  # 2
    "<｜Assistant｜>",  # 3
    "<｜latest_reminder｜>",  # 4
    "<think>",  # 5
    "</think>",  # 6
    "｜DSML｜",  # 7  tool-call markup prefix
    "<｜action｜>",  # 8  Quick Instruction task tokens
    "<｜query｜>",  # 9
    "<｜authority｜>",  # 10
    "<｜domain｜>",  # 11
    "<｜title｜>",  # 12
    "<｜read_url｜>",  # 13
    "<｜▁pad▁｜>",  # 14 padding (release spelling)
)

MODULES = sorted(
    """abc argparse array ast asyncio base64 bisect calendar cmd codecs collections
    concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib
    email enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip hashlib
    heapq hmac html html.parser http.client http.server imaplib inspect io ipaddress
    itertools json locale logging lzma mailbox math mimetypes multiprocessing numbers
    operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue
    random re sched secrets selectors shelve shlex shutil signal smtplib socket
    socketserver sqlite3 statistics string struct subprocess tarfile tempfile textwrap
    threading timeit tokenize traceback turtle typing unittest urllib.parse
    urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree
    zipfile zoneinfo""".split()
)


def collect_docs() -> list[str]:
    """Docstrings of the modules above and of the classes/functions/methods they define."""
    docs: set[str] = set()

    def add(obj) -> None:
        try:
            doc = inspect.getdoc(obj)
        except Exception:
            return
        if doc and len(doc) > 20:
            docs.add(doc)

    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # e.g. turtle without tkinter
            continue
        add(mod)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                add(obj)
                for mattr, meth in sorted(vars(obj).items()):
                    if not mattr.startswith("_") and callable(meth):
                        add(meth)
            elif inspect.isfunction(obj):
                add(obj)
    return sorted(docs)


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(collect_docs(), trainer=trainer)
    for i, t in enumerate(CONTROL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "sdk" / "assets" / "tokenizer.json"
    ap.add_argument("--out", type=Path, default=default)
    ap.add_argument("--check", action="store_true", help="rebuild and compare, write nothing")
    args = ap.parse_args(argv)
    text = build().to_str(pretty=False) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{'same' if same else 'DIFFERENT'}: {args.out} (rebuilt sha256 {digest})")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text)} bytes, vocab {VOCAB_SIZE}, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
