"""The official C-MCR and Ex-MCR releases by name, with the encoders they were trained on.

    pf.UnifiedModel.from_release("ex-mcr/base")      # CLAP and ULIP-2 leaves into CLIP
    pf.UnifiedModel.from_release("c-mcr/clap-clip")  # audio-visual C-MCR
    pf.UnifiedModel.from_release("c-mcr/ulip-clip")  # 3D-language C-MCR

Every file is looked for, in order: in the weights folders (`weights_dir=`, `--weights-dir`,
`$PAIRFREE_WEIGHTS`, ':'-separated) under its official name; in the cache; then fetched once. Files
on the Hugging Face Hub go to the Hub's cache (`huggingface_hub`); the projector files, which the
authors publish in their GitHub repositories, are downloaded from a pinned commit into
pairfree's cache and checked against their git object id (the SHA-1 git itself records for the
file, so the check needs no number we made up). What each file is, where it comes from and its
licence is printed when it is fetched; offline, a missing file is named with its source and how to
place it by hand.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pairfree.fileio import atomic_path, user_cache_dir

C_MCR_COMMIT = "038dec166e6f7a1900b383040f9265c05cf8dcfd"  # MCR-PEFT/C-MCR
EX_MCR_COMMIT = "0f2baa5cd002b646a002ee0fe045ab05271be487"  # MCR-PEFT/Ex-MCR


@dataclass(frozen=True)
class WeightFile:
    """One file a release needs."""

    name: str  # official file name (what the official READMEs tell users to put in `checkpoints/`)
    what: str
    licence: str
    url: str | None = None  # plain download (pinned)
    hub: tuple[str, str, str] | None = None  # (repo_id, filename, repo_type)
    git_blob: str | None = None  # git object id of the file (sha1 of "blob <size>\0" + content)
    aliases: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        if self.hub:
            repo, filename, repo_type = self.hub
            return f"huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo} ({filename})"
        return self.url or "(no public source known)"


@dataclass(frozen=True)
class EncoderSource:
    """An encoder of a release: a registry kind plus the file or Hub folder it loads."""

    kind: str  # registry kind: hf-clip, laion-clap, ulip2
    file: WeightFile | None = None  # a single checkpoint file (laion-clap, ulip2)
    hub_folder: str | None = None  # a transformers folder on the Hub (hf-clip), or a local copy of it
    licence: str = ""


@dataclass(frozen=True)
class Release:
    name: str
    method: str  # "cmcr" | "exmcr"
    description: str
    projectors: dict[str, WeightFile]  # C-MCR: {"": file}; Ex-MCR: {leaf: file}
    encoders: dict[str, EncoderSource]
    sources: dict[str, tuple[str, str]]
    paper: str
    layout: str | None = None  # C-MCR official layout
    extra: dict[str, Any] = field(default_factory=dict)


CLIP = EncoderSource("hf-clip", hub_folder="openai/clip-vit-base-patch32",
                     licence="MIT (OpenAI CLIP)")
CLAP = EncoderSource("laion-clap", WeightFile(
    "630k-fusion-best.pt", "LAION-CLAP 630k fusion checkpoint", "CC0-1.0 (LAION-AI/CLAP)",
    hub=("lukewys/laion_clap", "630k-fusion-best.pt", "model"), aliases=("laion_clap_fullset_fusion.pt",)),
    licence="CC0-1.0 (LAION-AI/CLAP)")
ULIP2 = EncoderSource("ulip2", WeightFile(
    "pointbert_ULIP-2.pt", "ULIP-2 PointBERT checkpoint (Salesforce)", "BSD-3-Clause (salesforce/ULIP)",
    hub=("SFXX/ulip", "pretrained_models/ckpt_zero-sho_classification/pointbert_ULIP-2.pt", "dataset")),
    licence="BSD-3-Clause (salesforce/ULIP)")

_CMCR_URL = f"https://raw.githubusercontent.com/MCR-PEFT/C-MCR/{C_MCR_COMMIT}/checkpoints/"
_EXMCR_URL = f"https://raw.githubusercontent.com/MCR-PEFT/Ex-MCR/{EX_MCR_COMMIT}/checkpoints/"
_CC = "CC-BY-4.0 (MCR-PEFT release)"

RELEASES: dict[str, Release] = {
    "c-mcr/clap-clip": Release(
        "c-mcr/clap-clip", "cmcr", "C-MCR audio-visual space: CLAP and CLIP connected through text",
        {"": WeightFile("clap_clip.pt", "C-MCR CLAP-CLIP projector", _CC, url=_CMCR_URL + "clap_clip.pt",
                        git_blob="61099f73eabf34a1f8da2ab11ffdd87db95b20b3")},
        {"clip": CLIP, "clap": CLAP},
        {"image": ("clip", "image"), "text": ("clip", "text"), "audio": ("clap", "audio")},
        "Wang et al., Connecting Multi-modal Contrastive Representations, NeurIPS 2023", layout="clap_clip"),
    "c-mcr/ulip-clip": Release(
        "c-mcr/ulip-clip", "cmcr", "C-MCR 3D-language space: ULIP-2 and CLIP connected through images",
        {"": WeightFile("ulip_clip.pt", "C-MCR ULIP-CLIP projector", _CC, url=_CMCR_URL + "ulip_clip.pt",
                        git_blob="350a714d9eef411985e353ba0306b885196f2610")},
        {"clip": CLIP, "ulip": ULIP2},
        {"image": ("clip", "image"), "text": ("clip", "text"), "3d": ("ulip", "3d")},
        "Wang et al., Connecting Multi-modal Contrastive Representations, NeurIPS 2023", layout="ulip_clip"),
    "ex-mcr/base": Release(
        "ex-mcr/base", "exmcr", "Ex-MCR: CLAP (via text) and ULIP-2 (via images) extended into a frozen CLIP",
        {"clap": WeightFile("ex_clap.pt", "Ex-MCR CLAP head", _CC, url=_EXMCR_URL + "ex_clap.pt",
                            git_blob="f85c9a202324d9374c71b032fd9f42a9c818cf87"),
         "ulip": WeightFile("ex_ulip.pt", "Ex-MCR ULIP-2 head", _CC, url=_EXMCR_URL + "ex_ulip.pt",
                            git_blob="50b8eff07c85a0cd1084de54537282deffe04567")},
        {"clip": CLIP, "clap": CLAP, "ulip": ULIP2},
        {"image": ("clip", "image"), "text": ("clip", "text"), "audio": ("clap", "audio"), "3d": ("ulip", "3d")},
        "Zhang, Wang et al., Extending Multi-modal Contrastive Representations, NeurIPS 2024"),
}


class MissingWeights(FileNotFoundError):
    """Files a release needs are neither present nor downloadable; the message lists each."""


def git_blob_id(path: str | Path) -> str:
    """The git object id of a file's content (what `git hash-object` prints)."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, wf: WeightFile) -> Path:
    if wf.git_blob and git_blob_id(path) != wf.git_blob:
        raise ValueError(f"{path}: not the released {wf.name} (git object id {git_blob_id(path)[:12]}..., "
                         f"expected {wf.git_blob[:12]}... from {wf.source}); a different or damaged file")
    return path


def weights_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    dirs = [Path(weights_dir)] if weights_dir else []
    dirs += [Path(d) for d in os.environ.get("PAIRFREE_WEIGHTS", "").split(os.pathsep) if d]
    return dirs


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_file(wf: WeightFile, dirs: list[Path], say: Callable[[str], None] = _say) -> Path:
    """The local path of one release file: a weights folder, the cache, or a download (see module doc).
    OfflineError (short: what is missing and why) when none of them has it."""
    for d in dirs:
        for n in (wf.name, *wf.aliases):
            if (d / n).is_file():
                return verify(d / n, wf)
    from pairfree.remote import OfflineError, endpoint, unreachable_reason

    if wf.hub:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        repo, filename, repo_type = wf.hub
        cached = try_to_load_from_cache(repo, filename, repo_type=repo_type)
        if isinstance(cached, str) and Path(cached).is_file():
            return verify(Path(cached), wf)
        reason = unreachable_reason()
        if reason is not None:
            how = f"hf download {repo} {filename}" + (" --repo-type dataset" if repo_type == "dataset" else "")
            raise OfflineError(f"not in the Hugging Face cache and {endpoint()} cannot be reached ({reason}); "
                               f"with network: `{how}`")
        say(f"pairfree: fetching {wf.name} ({wf.what}) from {wf.source}; licence {wf.licence}")
        return verify(Path(hf_hub_download(repo, filename, repo_type=repo_type)), wf)
    cached_file = user_cache_dir("weights", wf.git_blob or "unpinned", wf.name)
    if cached_file.is_file():
        return verify(cached_file, wf)
    if wf.url is None:
        raise OfflineError("no public source known")
    reason = unreachable_reason(wf.url)
    if reason is not None:
        raise OfflineError(f"not in {cached_file.parent} and cannot be downloaded ({reason})")
    say(f"pairfree: downloading {wf.name} ({wf.what}) from {wf.url}; licence {wf.licence}")
    with atomic_path(cached_file) as tmp:
        try:
            with urllib.request.urlopen(wf.url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            raise OfflineError(f"download from {wf.url} failed ({e})") from None
        verify(tmp, wf)
    return cached_file


def _hub_folder(src: EncoderSource, dirs: list[Path]) -> str:
    """A local copy of a Hub folder in a weights folder (as `<dir>/<name>` or `<dir>/<org>/<name>`), else the id."""
    name = src.hub_folder or ""
    for d in dirs:
        for cand in (d / name, d / name.split("/")[-1]):
            if (cand / "config.json").is_file():
                return str(cand)
    return name


def release_spec(name: str, weights_dir: str | Path | None = None, say: Callable[[str], None] = _say
                 ) -> tuple[Release, dict[str, Path], dict[str, str]]:
    """(release, {projector key: local file}, {space: encoder spec}); every missing file in one error."""
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}; known: {sorted(RELEASES)}")
    rel = RELEASES[name]
    dirs = weights_dirs(weights_dir)
    missing: list[str] = []
    projectors: dict[str, Path] = {}
    for key, wf in rel.projectors.items():
        try:
            projectors[key] = resolve_file(wf, dirs, say)
        except Exception as e:  # offline, not found upstream, wrong checksum: all listed together
            missing.append(f"{wf.name} ({wf.what}; {wf.source}; {wf.licence}): {e}")
    specs: dict[str, str] = {}
    for space, src in rel.encoders.items():
        if src.file is not None:
            try:
                specs[space] = f"{src.kind}:{resolve_file(src.file, dirs, say)}"
            except Exception as e:
                missing.append(f"{src.file.name} ({src.file.what}; {src.file.source}; {src.file.licence}): {e}")
        else:
            specs[space] = f"{src.kind}:{_hub_folder(src, dirs)}"
    if missing:
        where = ", ".join(map(str, dirs)) or "none given"
        raise MissingWeights(
            f"release {name!r} needs files that are not here: " + "; ".join(f"[{i + 1}] {m}" for i, m in enumerate(missing))
            + f". Put them under their names in a folder and pass --weights-dir DIR (or set PAIRFREE_WEIGHTS=DIR; "
              f"weights folders searched: {where})")
    return rel, projectors, specs


def load_release(name: str, *, weights_dir: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                 profile: str = "official", **kw: Any):
    """`UnifiedModel` of an official release (module docstring). The encoders load on first use;
    `profile="official"` (default) feeds them what the official code feeds them."""
    from pairfree.unified import UnifiedModel

    rel, projectors, specs = release_spec(name, weights_dir)
    if rel.method == "cmcr":
        from pairfree.connect import CMCR

        model = CMCR.from_official(projectors[""], layout=rel.layout)
    else:
        from pairfree.extend import ExMCR

        model = ExMCR.from_official({leaf: p for leaf, p in projectors.items()})
    meta = {"release": rel.name, "paper": rel.paper, "description": rel.description,
            "licences": {**{wf.name: wf.licence for wf in rel.projectors.values()},
                         **{s: e.licence for s, e in rel.encoders.items()}}}
    return UnifiedModel(model, specs, sources=rel.sources, device=device, dtype=dtype, profile=profile, meta=meta, **kw)
