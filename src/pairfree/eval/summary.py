"""`pairfree eval --summary DIR`: one markdown table of every result JSON under a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the numbers shown per task kind (the JSON has them all)
HEADLINE = {
    "retrieval": ("R@1", "R@5", "mAP"),
    "zero_shot": ("Acc@1", "Acc@5"),
    "class_vectors": ("Acc@1", "Acc@5"),
    "localization": ("cIoU@0.5", "AUC"),
    "counterfactual": ("ROC_AUC", "2AFC_accuracy"),
}


def headline(result: dict[str, Any]) -> str:
    m, kind = result["metrics"], result["kind"]
    keys = HEADLINE.get(kind, ())
    if kind in ("retrieval", "class_vectors"):
        dirs = [k for k in m if "_to_" in k]
        return "; ".join(f"{d.replace('_to_', '->')} " + " / ".join(f"{m[d][k]:.3f}" for k in keys) for d in dirs)
    if kind == "counterfactual":
        return "; ".join(f"{d} " + " / ".join(f"{m[d][k]:.3f}" for k in keys) for d in m if d.startswith("swap_"))
    return " / ".join(f"{m[k]:.3f}" for k in keys if k in m)


def collect(folder: str | Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(Path(folder).rglob("*.json")):
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(r, dict) and {"task", "kind", "metrics", "model"} <= set(r):
            out.append(r)
    return out


def table(folder: str | Path) -> str:
    results = collect(folder)
    if not results:
        return f"no evaluation results under {folder}"
    lines = ["| model | task | metrics | coverage |", "| --- | --- | --- | ---: |"]
    for r in sorted(results, key=lambda r: (r["task"], r["model"]["name"])):
        cov = r.get("coverage", {})
        frac = cov.get("fraction")
        metric_names = " / ".join(HEADLINE.get(r["kind"], ()))
        lines.append(f"| {r['model']['name']} | {r['task']} ({metric_names}) | {headline(r)} | "
                     f"{cov.get('present', '?')}/{cov.get('expected', '?')}" + (f" ({frac:.0%})" if frac is not None else "")
                     + " |")
    return "\n".join(lines)
