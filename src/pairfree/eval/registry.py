"""Every evaluation task by name: which dataset adapter reads it, which task kind scores it, and
which dataset root it reads (`--root DATASET=DIR`). As CLIP_benchmark's registry: adding a task is
one entry here and, for a new dataset, one adapter module under `pairfree/eval/datasets/`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str  # the root it needs (`--root DATASET=DIR`)
    loader: str  # "module:function" under pairfree.eval.datasets
    kind: str  # a key of pairfree.eval.tasks.KINDS
    needs: tuple[str, ...]  # modalities the model must embed
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the loader
    description: str = ""

    def load(self) -> Callable:
        module, fn = self.loader.split(":")
        return getattr(importlib.import_module(f"pairfree.eval.datasets.{module}"), fn)

    def modalities(self) -> set[str]:
        return set(self.needs)


def _toy_tasks() -> list[TaskSpec]:
    mods = ("image", "text", "audio", "3d")
    out = [TaskSpec(f"toy/{a}-{b}", "toy", "toy:load_retrieval", "retrieval", (a, b), {"a": a, "b": b},
                    f"toy world: {a} <-> {b} retrieval on the held-out test items")
           for i, a in enumerate(mods) for b in mods[i + 1:]]
    out += [TaskSpec("toy/3d-zero-shot", "toy", "toy:load_zero_shot", "zero_shot", ("3d", "text"), {"modality": "3d"},
                     "toy world: 3D zero-shot classification against the concept names"),
            TaskSpec("toy/audio-zero-shot", "toy", "toy:load_zero_shot", "zero_shot", ("audio", "text"),
                     {"modality": "audio"}, "toy world: audio zero-shot classification against the concept names"),
            TaskSpec("toy/localization", "toy", "toy:load_localization", "localization", ("image", "audio"), {},
                     "toy world: find the tiles of a 2 x 2 scene that show the audio's concept"),
            TaskSpec("toy/counterfactual", "toy", "toy:load_retrieval", "counterfactual", ("audio", "image"),
                     {"a": "audio", "b": "image"}, "toy world: factual vs counterfactual audio-image pairs")]
    return out


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("ave/audio-image", "ave", "ave:load", "retrieval", ("audio", "image"), {}, "AVE audio <-> image retrieval (all videos)"),
    TaskSpec("vggss/audio-image", "vggss", "vggss:load", "retrieval", ("audio", "image"), {}, "VGG-Sound Source audio <-> image retrieval"),
    TaskSpec("flickr-soundnet/audio-image", "flickr-soundnet", "flickr_soundnet:load", "retrieval", ("audio", "image"), {},
             "Flickr-SoundNet audio <-> image retrieval (every pair present)"),
    TaskSpec("audiocaps/audio-text", "audiocaps", "text_audio:load_audiocaps", "retrieval", ("audio", "text"), {},
             "AudioCaps test audio <-> text retrieval (5 captions per clip)"),
    TaskSpec("clotho/audio-text", "clotho", "text_audio:load_clotho", "retrieval", ("audio", "text"), {},
             "Clotho v2.1 evaluation audio <-> text retrieval (5 captions per clip)"),
    TaskSpec("coco/image-text", "coco", "image_text:load_coco", "retrieval", ("image", "text"), {}, "COCO val2017 image <-> text retrieval"),
    TaskSpec("coco-karpathy/image-text", "coco-karpathy", "image_text:load_coco_karpathy", "retrieval", ("image", "text"), {},
             "COCO Karpathy 5k test image <-> text retrieval"),
    TaskSpec("flickr30k/image-text", "flickr30k", "image_text:load_flickr30k", "retrieval", ("image", "text"), {},
             "Flickr30k 1k test image <-> text retrieval"),
    TaskSpec("objaverse-lvis/3d-image", "objaverse-lvis", "points3d:load_objaverse_lvis", "retrieval", ("3d", "image"), {},
             "Objaverse-LVIS 3D <-> image retrieval"),
    TaskSpec("eshot/audio-3d", "eshot", "points3d:load_eshot", "class_vectors", ("audio", "3d"), {},
             "EShot emergent audio <-> 3D zero-shot classification (class vectors of the other modality)"),
    TaskSpec("modelnet40/3d-zero-shot", "modelnet40", "points3d:load_modelnet40", "zero_shot", ("3d", "text"), {},
             "ModelNet40 zero-shot 3D classification (ULIP test split, 64 templates)"),
    TaskSpec("scanobjectnn/3d-zero-shot", "scanobjectnn", "points3d:load_scanobjectnn", "zero_shot", ("3d", "text"), {},
             "ScanObjectNN (PB_T50_RS) zero-shot 3D classification"),
    TaskSpec("esc50/audio-zero-shot", "esc50", "points3d:load_esc50", "zero_shot", ("audio", "text"), {},
             "ESC-50 zero-shot audio classification (official 5 folds)"),
    TaskSpec("vggss/localization", "vggss", "vggss:load_localization", "localization", ("image", "audio"), {},
             "VGG-Sound Source sound-source localization (cIoU, AUC)"),
    TaskSpec("flickr-soundnet/localization", "flickr-soundnet", "flickr_soundnet:load_localization", "localization",
             ("image", "audio"), {},
             "Flickr-SoundNet test (250) sound-source localization (cIoU, AUC)"),
    TaskSpec("vggss/counterfactual", "vggss", "vggss:load", "counterfactual", ("audio", "image"), {},
             "counterfactual audio-image recognition on VGG-Sound Source (pairfree's definition)"),
    TaskSpec("ave/counterfactual", "ave", "ave:load", "counterfactual", ("audio", "image"), {},
             "counterfactual audio-image recognition on AVE (pairfree's definition)"),
    *_toy_tasks(),
]}


def resolve(names: list[str]) -> list[TaskSpec]:
    """Task names, with "<dataset>/all" and "all" expanded."""
    out: list[TaskSpec] = []
    for n in names:
        if n == "all":
            picked = [t for t in TASKS.values() if t.dataset != "toy"]
        elif n.endswith("/all"):
            picked = [t for t in TASKS.values() if t.dataset == n[:-4]]
        elif n in TASKS:
            picked = [TASKS[n]]
        else:
            raise ValueError(f"unknown task {n!r}; `pairfree eval --list` shows them all")
        if not picked:
            raise ValueError(f"no tasks match {n!r}")
        out += [t for t in picked if t not in out]
    return out
