"""SDK surface and CLI: Engine.load / logits / generate, `flashport generate --json`, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashport
from flashport.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine(tiny_release):
    return flashport.Engine.load(tiny_release)


def test_logits_shape_and_generate(engine):
    ids = [0] + engine.tokenizer.encode("hello world")
    lg = engine.logits(ids)
    assert lg.shape == (len(ids), engine.cfg.vocab_size) and lg.dtype == torch.float32
    out = engine.generate(ids, max_new_tokens=12)
    assert out.token_ids[0] == int(lg[-1].argmax())
    assert len(out.token_ids) == 12 or out.finish_reason == "stop"
    streamed = "".join(engine.generate(ids, max_new_tokens=12, stream=True))
    assert streamed == out.text


def test_sampling_is_seeded(engine):
    a = engine.generate("abc", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7).token_ids
    b = engine.generate("abc", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7).token_ids
    assert a == b


def test_cli_generate_json(tiny_release, capsys):
    assert main(["generate", str(tiny_release), "--prompt", "hi there", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) <= 5 and isinstance(out["text"], str)


@pytest.mark.parametrize("argv, message", [
    (["generate", "/nonexistent/ck", "--prompt", "x"], "does not exist"),
    (["make-checkpoint", "--preset", "nope", "--out", "/tmp/x"], "unknown preset 'nope'"),
    (["generate", "{ck}", "--prompt", "x", "--max-new-tokens", "2000000"], "exceeds the model's limit"),
    (["generate", "{ck}", "--prompt", "x", "--backend", "cuda-magic"], "unknown backend"),
])
def test_cli_errors_are_one_line(argv, message, tiny_release, capsys):
    argv = [a.format(ck=tiny_release) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("flashport: error:")


def test_embed_app_sample(tiny_release):
    r = subprocess.run([sys.executable, str(ROOT / "samples" / "embed_app.py"), str(tiny_release)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ids: [") and "text:" in r.stdout
