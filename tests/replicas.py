"""Tiny replicas of the benchmark datasets in their exact distributed layouts (file names, columns,
JSON keys, folders; short PyAV-made videos where the dataset ships video), for the adapter tests.
Each writer returns the root and what the adapter should read."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np

RNG = np.random.default_rng(0)


def rooted(writer):
    """Create the dataset root before writing into it."""
    def wrapped(root: Path, *args, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        return writer(Path(root), *args, **kwargs)

    wrapped.__doc__ = writer.__doc__
    return wrapped


def jpg(path: Path, seed: int = 0, size=(64, 48)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def wav(path: Path, seed: int = 0, seconds: float = 0.5, rate: int = 16000) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)).astype(np.float32), rate)
    return path


def video(path: Path, seed: int = 0, seconds: float = 2.0, fps: int = 10, rate: int = 16000) -> Path:
    """A short mp4 (h264 video of changing colour + aac audio tone) written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        as_ = out.add_stream("aac", rate=rate)
        as_.layout = "mono"
        for i in range(int(seconds * fps)):
            img = np.full((48, 64, 3), (seed * 40 + i * 10) % 255, np.uint8)
            for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.3 * np.sin(2 * np.pi * (300 + 40 * seed) * t)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            chunk = samples[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in as_.encode(frame):
                out.mux(packet)
        for packet in as_.encode():
            out.mux(packet)
    return path


@rooted
def ave(root: Path) -> Path:
    """AVE_Dataset layout: AVE/<id>.mp4 + Annotations.txt ('&' rows with a header); v3 has no video."""
    rows = [("Church bell", "vid0", "good", 0, 2), ("Dog", "vid1", "good", 0.5, 1.5), ("Dog", "vid1", "good", 1.5, 2),
            ("Rodents", "vid2", "bad", 0, 1), ("Church bell", "vid3", "good", 0, 2)]
    for i in range(3):
        video(root / "AVE" / f"vid{i}.mp4", seed=i)
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" +
                                          "".join(f"{c}&{v}&{q}&{s}&{e}\n" for c, v, q, s, e in rows))
    (root / "testSet.txt").write_text("".join(f"{c}&{v}&{q}&{s}&{e}\n" for c, v, q, s, e in rows[:2]))
    return root


@rooted
def vggss(root: Path) -> Path:
    """vggss.json + frames/ + audio/ (LVS / EZ-VSL test layout) for two clips, a VGGSound video for a
    third, nothing for a fourth, a corrupt audio for a fifth."""
    files = ["zpWuikVorYg_000032", "gEvCUcZ6w88_000030", "JIemsK_0lXc_000364", "missingclip_000000", "corrupt_000010"]
    ann = [{"file": f, "class": c, "bbox": b} for f, c, b in zip(
        files, ["elk bugling", "female speech, woman speaking", "playing bass drum", "dog", "dog"],
        [[[0.403125, 0.253125, 0.6, 0.75]], [[0.45, 0.19, 0.58, 0.47], [0.1, 0.1, 0.2, 0.2]], [[0.0, 0.36, 0.37, 0.99]],
         [[0, 0, 1, 1]], [[0.2, 0.2, 0.8, 0.8]]])]
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "vggss.json").write_text(json.dumps(ann))
    for i, f in enumerate(files[:2]):
        jpg(root / "frames" / f"{f}.jpg", i)
        wav(root / "audio" / f"{f}.wav", i)
    video(root / "video" / f"{files[2]}.mp4", seed=2)
    jpg(root / "frames" / f"{files[4]}.jpg", 4)
    (root / "audio" / f"{files[4]}.wav").write_bytes(b"RIFF\x00\x00garbage")
    return root


@rooted
def flickr_soundnet(root: Path) -> Path:
    """frames/ audio/ Annotations/<id>.xml flickr_test.csv; one test id lacks its xml."""
    ids = ["10000130166", "10007936344", "10008553263", "2432219254"]
    for i, x in enumerate(ids):
        jpg(root / "frames" / f"{x}.jpg", i)
        wav(root / "audio" / f"{x}.wav", i)
    (root / "Annotations").mkdir(parents=True)
    for x in ids[:2]:
        # three annotators' boxes; the first child of <bbox> is skipped by the reference parser
        boxes = "".join(f"<object><bbox><annotator>{k}</annotator><xmin>{32 + 8 * k}</xmin><ymin>64</ymin>"
                        f"<xmax>{160 + 8 * k}</xmax><ymax>192</ymax></bbox></object>" for k in range(3))
        (root / "Annotations" / f"{x}.xml").write_text(f"<annotation>{boxes}</annotation>")
    (root / "flickr_test.csv").write_text("".join(f"{x},{i}\n" for i, x in enumerate(ids[:3])))
    return root


@rooted
def audiocaps(root: Path) -> Path:
    """test.csv (audiocap_id,youtube_id,start_time,caption), 5 captions per clip; audio/test/<yid>.wav
    for two of three clips (the third one's audio is gone, as often on YouTube)."""
    rows = [(100 + k + 5 * c, yid, 30, f"caption {k} of {yid}") for c, yid in enumerate(["ytA", "ytB", "ytC"]) for k in range(5)]
    with open(root / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    wav(root / "audio" / "test" / "ytA.wav", 0)
    wav(root / "audio" / "test" / "YytB.wav", 1)  # the 'Y' prefix some downloaders add
    return root


@rooted
def clotho(root: Path) -> Path:
    names = ["a.wav", "b.wav"]
    with open(root / "clotho_captions_evaluation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        for n in names:
            w.writerow([n] + [f"{n} says {k}" for k in range(1, 6)])
    wav(root / "clotho_audio_evaluation" / "evaluation" / "a.wav", 0)
    wav(root / "clotho_audio_evaluation" / "evaluation" / "b.wav", 1)
    return root


@rooted
def coco(root: Path) -> Path:
    images = [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"},
              {"id": 632, "file_name": "000000000632.jpg"}]
    anns = [{"image_id": i["id"], "id": 10 * i["id"] + k, "caption": f"a photo {k} of {i['id']}"} for i in images for k in range(5)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for k, i in enumerate(images[:2]):
        jpg(root / "val2017" / i["file_name"], k)
    return root


@rooted
def karpathy(root: Path, name: str, image_dir: str) -> Path:
    imgs = [{"filepath": image_dir, "filename": f"im{k}.jpg", "split": split, "cocoid": k,
             "sentences": [{"raw": f"sentence {j} about {k}"} for j in range(5)]}
            for k, split in enumerate(["test", "test", "train", "val"])]
    if name == "dataset_flickr30k.json":
        for i in imgs:
            i.pop("filepath")
    (root / name).write_text(json.dumps({"images": imgs, "dataset": name}))
    for k in range(2):
        jpg(root / image_dir / f"im{k}.jpg", k)
    return root


def record(path: Path, n: int = 300, seed: int = 0) -> Path:
    """An Objaverse record (a pickled 0-d object array of a dict with xyz), as OpenShape writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rec = {"xyz": rng.normal(size=(n, 3)).astype(np.float16), "rgb": rng.random((n, 3)).astype(np.float16),
           "id": path.stem, "text": ["a thing"]}
    np.save(path, np.array(rec, dtype=object), allow_pickle=True)  # our own test file, read back safely
    return path


@rooted
def objaverse_lvis(root: Path) -> Path:
    entries = [{"uid": f"uid{k}", "category": ["chair", "lamp"][k % 2],
                "data_path": f"objaverse-processed/merged_for_training_final/Objaverse/000-00{k}/uid{k}.npy"}
               for k in range(4)]
    (root / "meta_data" / "split").mkdir(parents=True)
    (root / "meta_data" / "split" / "lvis.json").write_text(json.dumps(entries))
    for k, e in enumerate(entries[:3]):
        record(root / e["data_path"], seed=k)
        if k < 2:
            jpg(root / "images" / f"{e['uid']}.png", k)
    return root


@rooted
def eshot(root: Path) -> Path:
    with open(root / "eshot_audio_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["eshot_audio_id", "youtube_id", "start_time", "end_time", "file_name"])
        for k in range(4):
            w.writerow([k, f"yt{k}", 0, 10, f"{k}.wav"])
    with open(root / "eshot_points_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["eshot_point_id", "object_id", "file_name"])
        for k in range(4):
            w.writerow([k, f"obj{k}", f"{k}.npy"])
    (root / "category_to_audio_ids.json").write_text(json.dumps({"dog": [0, 1], "piano": [2, 3]}))
    (root / "category_to_point_ids.json").write_text(json.dumps({"dog": [0, 1], "piano": [2, 3]}))
    for k in range(4):
        wav(root / "audio" / f"{k}.wav", k)
    for k in range(3):
        (root / "point-clouds").mkdir(exist_ok=True)
        np.save(root / "point-clouds" / f"{k}.npy", RNG.normal(size=(200, 3)).astype(np.float32))
    return root


@rooted
def modelnet40(root: Path, with_dat: bool) -> Path:
    base = root / "modelnet40_normal_resampled"
    base.mkdir(parents=True)
    names = ["airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup",
             "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop",
             "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa",
             "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox"]
    (base / "modelnet40_shape_names.txt").write_text("\n".join(names) + "\n")
    ids = ["airplane_0627", "flower_pot_0150", "xbox_0104"]
    (base / "modelnet40_test.txt").write_text("\n".join(ids) + "\n")
    clouds = [RNG.normal(size=(256, 6)).astype(np.float32) for _ in ids]
    labels = [np.array([names.index("_".join(i.split("_")[:-1]))], np.int32) for i in ids]
    if with_dat:
        with open(base / "modelnet40_test_8192pts_fps.dat", "wb") as f:
            pickle.dump([clouds, labels], f)
    else:
        for i, c in zip(ids[:2], clouds):
            (base / "_".join(i.split("_")[:-1])).mkdir(exist_ok=True)
            np.savetxt(base / "_".join(i.split("_")[:-1]) / f"{i}.txt", c, delimiter=",", fmt="%.6f")
    return root


@rooted
def esc50(root: Path) -> Path:
    (root / "meta").mkdir(parents=True)
    rows = [("1-100032-A-0.wav", 1, 0, "dog"), ("1-100038-A-14.wav", 1, 14, "chirping_birds"),
            ("2-100648-A-43.wav", 2, 43, "chainsaw"), ("5-9032-A-0.wav", 5, 0, "dog")]
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for fn, fold, target, cat in rows:
            w.writerow([fn, fold, target, cat, "True", fn.split("-")[1], "A"])
    for k, (fn, *_rest) in enumerate(rows[:3]):
        wav(root / "audio" / fn, k)
    return root


@rooted
def scanobjectnn(root: Path) -> Path:
    import h5py

    path = root / "h5_files" / "main_split" / "test_objectdataset_augmentedrot_scale75.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=RNG.normal(size=(5, 2048, 3)).astype(np.float32))
        f.create_dataset("label", data=np.array([0, 4, 14, 4, 9], np.int64))
    return root
