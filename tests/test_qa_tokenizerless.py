"""A model directory without tokenizer.json (as transformers' save_pretrained writes it) takes token ids only.
Every entrance that needs text refuses it with one line before any weight is read; every entrance that takes ids
works: the scheduler (which the server and sessions drive) must not reach for the tokenizer to find EOS."""


import pytest

import flashport.engine
import flashport.loader
from flashport import load_engine
from flashport.cli import main
from flashport.engine import RequestError
from flashport.scheduler import Scheduler, Sequence


@pytest.mark.parametrize("argv", [["generate", "{d}", "--prompt", "hi"], ["chat", "{d}"], ["serve", "{d}", "--port", "0"],
                                  ["eval", "{d}", "--text", "some text to score"]],
                         ids=["generate", "chat", "serve", "eval"])
def test_text_commands_refuse_before_loading(no_tokenizer, argv, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the weights were read before the refusal")

    monkeypatch.setattr(flashport.engine, "open_model", no_load)
    monkeypatch.setattr(flashport.loader, "open_model", no_load)
    rc = main([a.format(d=no_tokenizer) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("flashport: error: ") and "\n" not in err and "Traceback" not in err, err
    assert "tokenizer.json" in err and f"flashport {argv[0]}" in err, err


def test_scheduler_runs_token_ids_without_a_tokenizer(no_tokenizer):
    engine = load_engine(no_tokenizer, backend="torch")
    assert engine.tokenizer is None
    sched = Scheduler(engine, max_queue=4, max_batch=2).start()
    try:
        seq = sched.submit(Sequence([1, 5, 9, 12], max_tokens=3, temperature=0.0, tokenizer=None))
        assert seq.done.wait(60)
        assert seq.finish_reason in ("length", "stop"), (seq.finish_reason, seq.error)
        assert seq.output == engine.generate([1, 5, 9, 12], max_new_tokens=3).token_ids
    finally:
        sched.stop(drain=False)


def test_server_refuses_an_engine_without_a_tokenizer(no_tokenizer):
    pytest.importorskip("fastapi")
    from flashport.server import Server

    engine = load_engine(no_tokenizer, backend="torch")
    with pytest.raises(RequestError, match="no tokenizer.json"):
        Server(engine)
