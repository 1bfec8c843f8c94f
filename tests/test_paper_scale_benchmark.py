"""`benchmarks/paper_scale.py` end to end on the mini preset: the script the README's paper-scale tables
come from runs its stages, and what it totals is what its stages measured."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_scale.py"


def _module():
    spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_groups_and_second_stages_on_the_mini_world(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PAIRFREE_PROGRESS": "lines", "PAIRFREE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(SCRIPT), "--preset", "mini", "--world", str(tmp_path / "world"),
                          "--stages", "world,groups,second", "--sample", "1600", "--threads", "2", "--out", str(out),
                          "--redo", "0.01"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    ps = _module()
    groups, second = summary["groups"]["hops"], summary["second"]["hops"]
    assert list(groups) == [h[0] for h in ps.HOPS]
    for name, hop in groups.items():
        assert hop["cosine_to_exact"]["mean"] > 0.998, name  # calibrated to 0.999 on 1000 queries, checked on 600
        assert 0 < hop["rows"] <= hop["memory"]
        redo = hop["redo_projected"]  # the check's cosines with its largest estimates as exact, and their cost
        assert redo["estimate_on_the_check"]["rank_correlation"] > 0.5, name
        assert redo["0.01"]["min"] >= hop["cosine_to_exact"]["min"] and redo["0.01"]["seconds"] > 0
    # each pass's first hop, run in full as a user's run would (here with --redo 0.01), chooses what the
    # groups stage measured, and then redoes 1 % of its queries exactly
    for hop in second.values():
        first, report = groups[hop["first_hop"]], hop["first_hop_report"]
        assert (report["rows"], report["groups"]) == (first["rows"], first["groups"])
        assert report["cosine_to_exact_before_redo"] == pytest.approx(first["cosine_to_exact"], abs=1e-6)
        assert report["redo"]["queries"] == -(-hop["queries"] // 100)
        assert report["cosine_to_exact"]["min"] >= report["cosine_to_exact_before_redo"]["min"]
    # the leaf total: the overlap pass's two hops projected, the leaf and base passes as run, checks apart
    direct = sum(groups[h[0]]["projected_s"] for h in ps.HOPS[:2]) + sum(
        h["first_hop_run_s"] - h["first_hop_report"]["seconds"]["check_reference"] + h["projected_s"]
        for h in second.values())
    checks = sum(groups[h[0]]["check_reference_s"] for h in ps.HOPS[:2]) + sum(
        h["first_hop_report"]["seconds"]["check_reference"] + h["check_reference_s"] for h in second.values())
    total = summary["leaf_with_passes_in_full"]
    assert total["exmcr_leaf_min"] == pytest.approx(direct / 60, abs=0.051)
    assert total["with_checks_min"] == pytest.approx((direct + checks) / 60, abs=0.051)
    assert f"passes run in full: {total['exmcr_leaf_min']} min" in run.stdout
    assert summary["world"]["stage"] == "world" and summary["second"]["peak_anon_rss_gib"] > 0


def test_train_precisions_skip_bf16_without_hardware(monkeypatch):
    ps = _module()
    monkeypatch.setattr(ps, "native_bf16", lambda: False)
    assert ps._train_precisions("auto") == ["fp32"]  # bf16 in software would time the emulation
    monkeypatch.setattr(ps, "native_bf16", lambda: True)
    assert ps._train_precisions("auto") == ["fp32", "bf16"]
    assert ps._train_precisions("bf16") == ["bf16"]
    with pytest.raises(SystemExit, match="--train-precisions.*'fp32,fp16'"):
        ps._train_precisions("fp32,fp16")
