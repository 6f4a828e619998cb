"""Quality metrics (perplexity, KL, top-1 agreement), `flashport eval`, and a calibrated (GPTQ) export."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flashport.cli import main
from flashport.export.bundle import export
from flashport.export.evaluate import compare, evaluate, perplexity, quality_table

TEXT = ("Calibration and evaluation read ordinary text. The exporter rounds each expert with the rows its "
        "router sent it, then checks the result against the release model. ") * 6


def test_metric_definitions():
    V = 50
    assert perplexity(torch.zeros(4, V), [0, 1, 2, 3]) == pytest.approx(V)  # uniform logits: perplexity = vocab
    lg = torch.full((4, V), -30.0)  # row t predicts token t + 1
    lg[torch.arange(3), torch.tensor([5, 6, 7])] = 30.0
    assert perplexity(lg, [0, 5, 6, 7]) == pytest.approx(1.0, abs=1e-6)
    a, b = torch.randn(6, V), torch.randn(6, V)
    kl, agree = compare(a, b)  # KL(b || a)
    want = F.kl_div(F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1), log_target=True,
                    reduction="none").sum(-1).mean()
    assert kl == pytest.approx(float(want)) and kl > 0
    assert agree == float((a.argmax(-1) == b.argmax(-1)).double().mean())
    assert compare(a, a) == (0.0, 1.0)


def test_eval_checkpoint_and_bundles(tiny_release, tmp_path, capsys):
    q = evaluate(tiny_release, TEXT, tiny_release, max_tokens=96)
    assert q.tokens == 95 and q.kl == 0.0 and q.top1_agreement == 1.0 and q.perplexity == q.ref_perplexity
    assert 1.0 < q.perplexity and math.isfinite(q.perplexity)  # random weights: confidently wrong, huge
    rel, i4 = tmp_path / "rel", tmp_path / "i4"
    export(tiny_release, rel, "release", progress=False)
    export(tiny_release, i4, "int4-experts", progress=False)
    table, res = quality_table(tiny_release, {"release": rel, "int4-experts": i4}, TEXT, max_tokens=96)
    assert res["release"].kl == 0.0 and res["release"].top1_agreement == 1.0
    assert res["int4-experts"].kl > 0 and res["int4-experts"].top1_agreement < 1.0
    assert "int4-experts" in table and "perplexity" in table
    text = tmp_path / "heldout.txt"
    text.write_text(TEXT)
    assert main(["eval", str(i4), "--text", str(text), "--reference", str(tiny_release), "--max-tokens", "64",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens"] == 63 and d["kl"] > 0 and 0 <= d["top1_agreement"] <= 1


def test_calibrated_export_records_stats_and_uses_gptq(tiny_release, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    recipe = {"name": "int4-gptq", "extends": "int4-experts", "calibration": "gptq"}
    m = export(tiny_release, tmp_path / "g", recipe, calib=str(calib), calib_tokens=160, progress=False)
    assert m["calibration"]["method"] == "gptq" and m["calibration"]["tokens"] == 160
    stats = json.loads((tmp_path / "g" / "routing_stats.json").read_text())
    assert sum(stats["layers"]["layers.3"]) == 160 * 2 and "activation_stats.safetensors" in m["files"]
    r = export(tiny_release, tmp_path / "r", "int4-experts", progress=False)
    # GPTQ chose other codes than round-to-nearest for the calibrated experts, same layout
    g_e = m["tensors"]["layers.3.ffn.experts.0.w1.weight"]
    r_e = r["tensors"]["layers.3.ffn.experts.0.w1.weight"]
    assert g_e["format"] == r_e["format"] == "int4-g32" and g_e["crc32c"] != r_e["crc32c"]
    assert m["tensors"]["layers.3.attn.wq_a.weight"]["crc32c"] == r["tensors"]["layers.3.attn.wq_a.weight"]["crc32c"]
    # on the calibration text the GPTQ bundle tracks the release model at least as closely as RTN does
    qg = evaluate(tmp_path / "g", TEXT, tiny_release, max_tokens=160)
    qr = evaluate(tmp_path / "r", TEXT, tiny_release, max_tokens=160)
    print(f"KL gptq {qg.kl:.5f} rtn {qr.kl:.5f}; top-1 gptq {qg.top1_agreement:.3f} rtn {qr.top1_agreement:.3f}")
    assert qg.kl < qr.kl
