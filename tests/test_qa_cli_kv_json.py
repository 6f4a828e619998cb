"""`flashport generate --kv-dir DIR --json` run twice: the second run says, in its JSON, that it read the prompt from
the cache (a user had no way to see that the cache was used at all). Without --kv-dir the JSON has no "kv" key."""

import json

from flashport.cli import main

PROMPT = "The quick brown fox jumps over the lazy dog. " * 20


def _run(capsys, *argv):
    rc = main(["generate", *argv, "--prompt", PROMPT, "--max-new-tokens", "2", "--json", "--backend", "torch"])
    out = capsys.readouterr().out
    assert rc in (0, None), out
    return json.loads(out)


def test_second_run_reports_the_cache_hit(tiny_release, tmp_path, capsys):
    kv = str(tmp_path / "kv")
    first = _run(capsys, str(tiny_release), "--kv-dir", kv)
    second = _run(capsys, str(tiny_release), "--kv-dir", kv)
    assert first["kv"]["path"] == "miss" and first["kv"]["hit_tokens"] == 0
    assert second["kv"]["hit_tokens"] > 0 and second["kv"]["read_from"] == "disk", second["kv"]
    assert second["token_ids"] == first["token_ids"]
    assert "kv" not in _run(capsys, str(tiny_release))
