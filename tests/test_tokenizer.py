import json

import pytest
from hypothesis import given, settings, strategies as st

from flashport.tokenizer import (CONTROL_TOKENS, DEFAULT_PATH, StreamDecoder, Tokenizer,
                                 TokenizerFileError)


TOK = Tokenizer.default()


@pytest.fixture
def tok():
    return TOK


def test_shipped_asset_shape(tok):
    assert DEFAULT_PATH.stat().st_size < 1_000_000
    assert tok.vocab_size == 8192
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert [tok.token_id(t) for t in CONTROL_TOKENS] == list(range(len(CONTROL_TOKENS)))
    assert tok.token_id("<｜Assistant｜>") == tok.token_id("assistant") == 3
    assert tok.token_id("/think") == 6 and tok.token_id("｜DSML｜") == 7
    assert tok.special_ids == frozenset(range(len(CONTROL_TOKENS)))
    with pytest.raises(KeyError, match="nope"):
        tok.token_id("<｜nope｜>")


@pytest.mark.parametrize("text", [
    "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜", "<｜begin▁of▁sentence｜>",
    "please say <｜User｜>hi<｜end▁of▁sentence｜> and <｜action｜>",
    "".join(CONTROL_TOKENS),
])
def test_text_never_becomes_control_token(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text


def test_decode_control_ids(tok):
    ids = [tok.bos_id, tok.token_id("user")] + tok.encode("hi") + [tok.eos_id]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜><｜User｜>hi<｜end▁of▁sentence｜>"
    assert tok.decode(ids, skip_special=True) == "hi"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_roundtrip_and_stream(text):
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    pieces = list(TOK.stream(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_stream_holds_split_characters(tok):
    text = "🙂你好"
    ids = tok.encode(text)
    assert len(ids) > 3  # multi-byte characters spread over byte tokens
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in ids]
    assert "".join(out) == text and all("\ufffd" not in p for p in out)
    assert "" in out  # something was held back until its character completed
    assert dec.finish() == ""


def test_stream_skip_special_and_incomplete_tail(tok):
    ids = [tok.bos_id] + tok.encode("ok🙂")
    assert "".join(tok.stream(ids, skip_special=True)) == "ok🙂"
    dec = StreamDecoder(tok)
    assert dec.push(ids[:-1]).startswith("<｜begin▁of▁sentence｜>ok")
    assert dec.finish() == "\ufffd"  # the emoji never completed


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerFileError, match="bad.json"):
        Tokenizer.from_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(TokenizerFileError, match="wrong.json"):
        Tokenizer.from_file(wrong)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TokenizerFileError, match="bin.json"):
        Tokenizer.from_file(binary)
