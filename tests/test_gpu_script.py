"""benchmarks/gpu.py, the one script a lent GPU runs, dry-run on this CPU: a device is lent for minutes,
so every part must run to its end and report numbers that hold, before one is."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_every_part_on_a_cpu(tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                          "--memory", "8000", "--queries", "256", "--train-steps", "1", "--train-batch", "512",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    # the README's tables, printed and written: a row per kernel and dtype, IVF run and training precision
    tables = (out / "gpu.md").read_text()
    assert tables in run.stdout and "| sdpa/float32 |" in tables and "| ivf float32 cos>=0.99 groups |" in tables
    assert "| fp32, batch 512 |" in tables and "failed" not in tables
    assert set(res["seconds"]) == {"aggregation", "training", "encoder", "groups"} and "seconds per part" in tables
    for part in ("aggregation", "training", "encoder", "groups"):
        assert "failed" not in res[part] and "skipped" not in res[part], (part, res[part], run.stderr[-3000:])
    assert all(res["gemm_gflops"][dt] > 0 for dt in ("float32", "float16", "bfloat16"))

    agg = res["aggregation"]
    for kernel in ("sdpa", "chunked"):
        for dt, tol in (("float32", 1e-5), ("float16", 1e-4), ("bfloat16", 1e-4)):
            r = agg[f"{kernel}/{dt}"]
            assert r["cos_min"] >= 1 - tol, (kernel, dt, r)
            # each figure is rounded (GFLOP/s to 0.1, the ratio to 0.001): a kernel in software runs at ~2 GFLOP/s,
            # where rounding alone moves their quotient by 3 %
            rate = res["gemm_gflops"][dt]
            assert r["ratio_to_gemm"] > 0 and math.isclose(r["gflops"], r["ratio_to_gemm"] * rate, rel_tol=0.01,
                                                             abs_tol=0.05 + 0.0005 * rate + 0.05 * r["ratio_to_gemm"] + 1e-9)
    # the approximate path runs for real at 0.99 (a share of the memory), exact beyond exact_above
    lists = agg["ivf float32 cos>=0.99"]
    assert lists.get("ran") != "exact" and 0 < lists["work_fraction"] < 0.5, lists
    assert lists["cosine_to_exact"]["mean"] >= 0.985, lists["cosine_to_exact"]
    for name in ("ivf float32 cos>=0.999", "ivf bfloat16 cos>=0.999"):
        assert agg[name]["cosine_to_exact"]["mean"] >= 0.998, (name, agg[name]["cosine_to_exact"])
    # select="groups" (its own part, the last) runs for real too, with each query's error estimate and the
    # exact redo of the largest; bf16 is in software here: left to a device that has it
    groups = res["groups"]
    selection = groups.pop("selection")  # top_rows against topk on one batch of means, for a GPU to decide
    assert selection["means"] == 64 and selection["memory"] == 8000 and selection["score_gemm_ms"] > 0, selection
    assert all(selection["2000"][t] > 0 for t in ("top_rows_ms", "topk_ms")), selection
    assert "row selection, 64 means x 8000 rows" in tables
    assert set(groups) == {"ivf float32 cos>=0.99 groups", "ivf float32 cos>=0.999 groups"}, groups
    assert groups["ivf float32 cos>=0.999 groups"]["cosine_to_exact"]["mean"] >= 0.998, groups
    sampled = groups["ivf float32 cos>=0.99 groups"]
    assert sampled.get("ran") != "exact" and 0 < sampled["work_fraction"] < 0.5, sampled
    assert sampled["cosine_to_exact"]["mean"] >= 0.985, sampled["cosine_to_exact"]
    assert sampled["redo"]["queries"] == math.ceil(0.002 * 256), sampled["redo"]
    assert sampled["error_estimate"]["on_the_check"]["rank_correlation"] > 0.5, sampled["error_estimate"]

    train = res["training"]
    assert set(train) == {"fp32", "bf16"}  # fp16 with loss scaling is CUDA's
    for r in train.values():
        assert r["s_per_step"] > 0 and r["ratio_to_gemm"] > 0 and math.isfinite(r["first_loss"])
    # the same initial head and batch: bf16 autocast computes the fp32 loss to its rounding
    assert math.isclose(train["bf16"]["first_loss"], train["fp32"]["first_loss"], rel_tol=1e-3), train

    enc = res["encoder"]
    assert enc["float32"]["texts_per_s"] > 0 and enc["float16"]["texts_per_s"] > 0
    assert enc["fp16_cos_to_fp32_min"] >= 0.999
