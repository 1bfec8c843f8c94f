"""Sharing unified models: a folder (or a Hugging Face Hub repository) with the projector weights
(safetensors), the model's config.json, `unified.json` (encoder ids, which space embeds which
modality, the preprocessing profile) and a generated model card (README.md).

    um.save_pretrained("my-space")
    um = pf.UnifiedModel.from_pretrained("my-space")          # or "user/repo" (the Hub; cached)
    um.push_to_hub("user/repo")                                # `pairfree push my-space user/repo`

Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pairfree.fileio import atomic_dir

UNIFIED = "unified.json"
FORMAT, VERSION = "pairfree-unified", 1
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_METHOD_NAMES = {"cmcr": "C-MCR", "exmcr": "Ex-MCR", "ridge": "ridge map", "procrustes": "orthogonal Procrustes map",
                 "random": "random map", "supervised": "supervised map"}


def save_pretrained(um, path: str | Path, *, license: str | None = None, title: str | None = None) -> Path:
    """Write `um` (a `UnifiedModel`) to a folder, atomically: weights, config, unified.json, README.md."""
    path = Path(path)
    specs = {}
    for space, enc in um.encoder_specs.items():
        spec = enc if isinstance(enc, str) else getattr(enc, "id", None)
        if not spec:
            raise ValueError(f"encoder of space {space!r} has no registry id; give it as a spec string to save it")
        specs[space] = spec
    with atomic_dir(path) as tmp:
        um.model.save(tmp / "model")
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        info = {"format": FORMAT, "version": VERSION, "encoders": specs,
                "sources": {m: list(s) for m, s in um.sources.items()}, "profile": um.profile,
                "meta": {k: v for k, v in um.meta.items() if k != "source"}}
        (tmp / UNIFIED).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(um, specs, license=license, title=title or path.name))
    return path


def read_unified(folder: Path) -> dict[str, Any]:
    f = folder / UNIFIED
    if not f.is_file():
        raise FileNotFoundError(f"{folder}: not a saved unified model ({UNIFIED} missing); "
                                "a plain model folder loads with pairfree.models.load_model")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{f}: field 'format' must be {FORMAT!r}")
    if info.get("version") != VERSION:
        raise ValueError(f"{f}: field 'version' is {info.get('version')!r}; this pairfree reads {VERSION}")
    enc = info.get("encoders")
    if not isinstance(enc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in enc.items()):
        raise ValueError(f"{f}: field 'encoders' must map space names to encoder specs, got {enc!r}")
    src = info.get("sources", {})
    if not isinstance(src, dict) or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                                            for v in src.values()):
        raise ValueError(f"{f}: field 'sources' must map modalities to [space, modality], got {src!r}")
    if not isinstance(info.get("profile", "default"), str) or not isinstance(info.get("meta", {}), dict):
        raise ValueError(f"{f}: fields 'profile' (a string) and 'meta' (an object) are malformed")
    return info


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded once into the Hub cache (offline:
    from the cache, or one clear error)."""
    local = Path(path_or_repo)
    if local.is_dir():
        return local
    name = str(path_or_repo)
    if not _REPO.match(name):
        raise FileNotFoundError(f"{name}: no such folder, and not a Hub repository id ('user/name')")
    from huggingface_hub import snapshot_download

    from pairfree.remote import hub_access

    with hub_access("unified model", name, hint="or pass the local folder"):
        return Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"]))


def from_pretrained(path_or_repo: str | Path, *, revision: str | None = None, encoders: dict[str, str] | None = None,
                    weights_dir: str | Path | None = None, profile: str | None = None, **kw: Any):
    """A `UnifiedModel` from a folder written by `save_pretrained`, or a Hub repo of one.

    `encoders` replaces encoder specs (e.g. a local checkpoint path on this machine). For a saved
    official release, encoder files are found as `from_release` finds them (`weights_dir`)."""
    from pairfree.models import load_model
    from pairfree.unified import UnifiedModel

    folder = resolve(path_or_repo, revision)
    info = read_unified(folder)
    specs = dict(info["encoders"])
    release = info.get("meta", {}).get("release")
    if release and not encoders:
        from pairfree.releases import RELEASES, _hub_folder, resolve_file, weights_dirs

        if release in RELEASES:  # encoders found as from_release finds them, lazily per space
            dirs = weights_dirs(weights_dir)
            for space, src in RELEASES[release].encoders.items():
                if src.file is None:
                    specs[space] = f"{src.kind}:{_hub_folder(src, dirs)}"
                else:
                    try:
                        specs[space] = f"{src.kind}:{resolve_file(src.file, dirs)}"
                    except Exception:  # reported when that encoder is first used
                        pass
    specs.update(encoders or {})
    model = load_model(folder)
    return UnifiedModel(model, specs, sources={m: tuple(v) for m, v in info.get("sources", {}).items()},
                        profile=profile or info.get("profile", "default"),
                        meta={**info.get("meta", {}), "source": str(path_or_repo)}, **kw)


def push_to_hub(um, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload unified model with pairfree", license: str | None = None) -> str:
    """Save `um` and upload it to the Hub repo `repo_id` (created if needed); returns the repo URL."""
    import tempfile

    if not _REPO.match(repo_id):
        raise ValueError(f"repo id {repo_id!r}: expected 'user/name'")
    from pairfree.remote import OfflineError, endpoint, unreachable_reason

    reason = unreachable_reason()
    if reason is not None:
        raise OfflineError(f"cannot push to {endpoint()}/{repo_id}: {reason}; save_pretrained(folder) works offline "
                           f"and `pairfree push folder {repo_id}` uploads it later")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as d:
        folder = save_pretrained(um, Path(d) / "model", license=license, title=repo_id.split("/")[1])
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(url)


def push_folder(folder: str | Path, repo_id: str, **kw: Any) -> str:
    """Upload a folder `save_pretrained` wrote (checked first) to the Hub."""
    um = from_pretrained(folder)
    return push_to_hub(um, repo_id, **kw)


# ---- the model card ----------------------------------------------------------------------------
def model_card(um, specs: dict[str, str], *, license: str | None, title: str) -> str:
    import yaml

    model = um.model
    method = getattr(model, "method", type(model).__name__)
    meta = um.meta
    modalities = sorted(um.sources)
    licences = dict(meta.get("licences", {}))
    for space, spec in specs.items():
        licences.setdefault(space, _known_licence(spec))
    front = {"library_name": "pairfree", "license": license or "other", "pipeline_tag": "feature-extraction",
             "tags": ["pairfree", "multimodal", "embeddings", _METHOD_NAMES.get(method, method).lower().replace(" ", "-"),
                      *modalities]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    what = meta.get("description") or f"A unified embedding space for {', '.join(modalities)}"
    lines += [f"{what}, built with pairfree "
              f"({_METHOD_NAMES.get(method, method)}) from pretrained contrastive spaces, without paired data "
              "between the modalities it connects." + (f" Release of: {meta['paper']}." if meta.get("paper") else ""), ""]
    lines += ["## Use", "", "```python", "import pairfree as pf", "",
              f'um = pf.UnifiedModel.from_pretrained("{title if "/" in title else "<this repo or folder>"}")']
    for m in modalities:
        example = {"text": '["a dog barking"]', "image": '["photo.jpg"]', "audio": '["clip.wav"]', "3d": '["object.ply"]'}
        lines.append(f'z_{m.replace("3d", "pc")} = um.encode("{m}", {example.get(m, "[...]")})')
    lines += ["```", "", "## Spaces and encoders", "", "| modality | space | encoder | licence |", "| --- | --- | --- | --- |"]
    for m, (space, mod) in sorted(um.sources.items()):
        lines.append(f"| {m} | {space} ({mod}) | `{specs.get(space, '-')}` | {licences.get(space, 'see the encoder')} |")
    lines += ["", f"Preprocessing profile: `{um.profile}` (`pairfree.media.profiles`).", ""]
    config = getattr(model, "config", None)
    if config is not None:
        import dataclasses

        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False).strip(),
                  "```", ""]
    data = getattr(model, "training_data", None)
    if data:
        lines += ["## Training data", "", "Unpaired embeddings per space (rows and content fingerprints); no pairs "
                  "between the connected modalities were used.", "", "| space | modality | rows | fingerprint |",
                  "| --- | --- | ---: | --- |"]
        for space, mods in data.items():
            for m, d in mods.items():
                lines.append(f"| {space} | {m} | {d['rows']} | `{d['fingerprint'][:16]}` |")
        lines.append("")
    ev = meta.get("evaluation")
    if ev:
        keys = sorted({k for r in ev.values() for k in r})
        lines += ["## Evaluation", "", "| task | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for task, r in ev.items():
            lines.append(f"| {task} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
                                                   for k in keys) + " |")
        lines.append("")
    lines += ["## Licences", "", "The projector weights are this model's own; each encoder keeps the licence of its "
              "source model:", ""]
    lines += [f"- {k}: {v}" for k, v in licences.items()] + [""]
    return "\n".join(lines)


def _known_licence(spec: str) -> str:
    known = {"hf-clip:openai/": "MIT (OpenAI CLIP)", "open_clip:": "see the open_clip pretrained tag",
             "laion-clap:": "CC0-1.0 (LAION-AI/CLAP)", "hf-clap:laion/": "Apache-2.0 (laion on the Hub)",
             "ulip2:": "BSD-3-Clause (salesforce/ULIP)", "toy:": "MIT (pairfree toy world)"}
    return next((v for k, v in known.items() if spec.startswith(k)), "see the encoder's source")
