"""Run evaluation tasks for one unified model: load each dataset from its root, score it, write one
JSON per (model, task) with the protocol, the dataset coverage, versions and fingerprints, and the
plots people look at (localization heatmaps, per-class accuracy, a retrieval examples sheet)."""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path
from typing import Any

from pairfree.eval.data import fingerprint_files
from pairfree.eval.registry import TaskSpec
from pairfree.eval.tasks import KINDS
from pairfree.fileio import write_json


def result_path(out: Path, model_name: str, task: str) -> Path:
    return Path(out) / model_name / (task.replace("/", "__") + ".json")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("pairfree", "torch", "numpy", "transformers", "open_clip_torch", "laion_clap"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_task(um, spec: TaskSpec, root: str | Path, out: str | Path, model_name: str, *, limit: int | None = None,
             cache: str | Path | None = None, progress: bool = False, plots: bool = True) -> dict[str, Any]:
    """Score `um` on one task and write `<out>/<model_name>/<task>.json`; returns the result."""
    missing = spec.modalities() - set(um.modalities)
    if missing:
        raise ValueError(f"{spec.name}: the model does not embed {sorted(missing)} (it embeds {list(um.modalities)})")
    t0 = time.perf_counter()
    data = spec.load()(Path(root), limit=limit, cache=Path(cache) if cache else None, **spec.options)
    if data.coverage.present == 0:
        raise FileNotFoundError(f"{spec.name}: none of the {data.coverage.expected} items is under {root} "
                                f"(first missing: {data.coverage.missing[:3]}); see docs/datasets.md")
    metrics, extras = KINDS[spec.kind](um, data, cache, progress)
    result = {
        "task": spec.name, "kind": spec.kind, "description": spec.description,
        "model": {"name": model_name, "fingerprint": um.fingerprint, "method": getattr(um.model, "method", None),
                  "encoders": {s: e if isinstance(e, str) else getattr(e, "id", None) for s, e in um.encoder_specs.items()},
                  "profile": um.profile, "release": um.meta.get("release")},
        "protocol": data.protocol, "dataset_root": str(root), "limit": limit,
        "coverage": data.coverage.as_dict(), "annotation_fingerprints": fingerprint_files(data.files),
        "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2), "versions": versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    path = result_path(Path(out), model_name, spec.name)
    write_json(path, result)
    if plots:
        from pairfree.eval import plots as P

        base = path.parent / "plots" / spec.name.replace("/", "__")
        if spec.kind == "localization":
            P.localization_sheet(extras["maps"], extras["cious"], base.with_suffix(".png"))
        elif spec.kind == "zero_shot":
            P.per_class_accuracy(extras["per_class"], spec.name, base.with_suffix(".png"))
        elif spec.kind == "retrieval":
            P.retrieval_sheet(extras, spec.name, base.with_suffix(".png"))
    return result
