"""pairfree encode: listing inputs, the DataLoader pipeline, errors.jsonl, kill-and-resume."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")
sf = pytest.importorskip("soundfile")

import pairfree.encode as E  # noqa: E402
from pairfree.cli import main  # noqa: E402
from pairfree.encoders.base import Encoder  # noqa: E402
from pairfree.store import EmbeddingStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


class TinyEncoder(Encoder):
    """A deterministic 16 -> 8 linear "model" over simple per-modality features.

    Computed in float64 so that a row's embedding does not depend on which batch it is in
    (the kill-and-resume and Ray tests compare stores bit for bit). Test hooks (subprocess only):
    PAIRFREE_TEST_EXIT_AFTER=K exits the process hard (os._exit) at the (K+1)-th forward;
    PAIRFREE_TEST_SLEEP=s sleeps s seconds per forward.
    """

    id = "test:tiny"
    modalities = ("image", "text", "audio", "3d")
    dim = 8
    sample_rate = 16000

    def __init__(self, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        self.w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.calls = 0

    @staticmethod
    def features(modality, item):
        if modality == "image":
            return np.asarray(item.resize((4, 4), Image.Resampling.BILINEAR), np.float64).mean(axis=2).ravel() / 255 + 0.1
        if modality == "text":
            return np.frombuffer(hashlib.sha256(item.encode()).digest()[:16], np.uint8) / 255.0 + 0.1
        if modality == "audio":
            from pairfree.media import fix_length

            return fix_length(item[::97], 16, "repeatpad").astype(np.float64) + 0.1 + len(item) / 1e5
        pts = np.asarray(item, np.float64)
        return np.concatenate([pts.mean(0), pts.std(0), pts.min(0), pts.max(0), [len(pts) / 1e4, 1, 1, 1]])

    def preprocess(self, modality, item):
        return torch.as_tensor(self.features(modality, item), dtype=torch.float64)

    def forward(self, modality, batch):
        self.calls += 1
        limit = os.environ.get("PAIRFREE_TEST_EXIT_AFTER")
        if limit and self.calls > int(limit):
            os._exit(3)
        if os.environ.get("PAIRFREE_TEST_SLEEP"):
            time.sleep(float(os.environ["PAIRFREE_TEST_SLEEP"]))
        return batch.to(torch.float64) @ self.w

    def expected(self, modality, items):
        z = np.stack([self.features(modality, i) for i in items]) @ self.w.numpy()
        z = torch.nn.functional.normalize(torch.from_numpy(z).float(), dim=-1).numpy()
        return z


SPEC = "test-tiny:v1"


def _tiny_factory(rest, device="cpu", dtype="float32", **options):
    return TinyEncoder(device, dtype)


@pytest.fixture
def tiny():
    """TinyEncoder registered in the real encoder registry as the kind 'test-tiny'."""
    from pairfree.encoders import registry

    registry.register_encoder("test-tiny", _tiny_factory, overwrite=True)
    yield TinyEncoder()
    registry._REGISTRY.pop("test-tiny", None)


def _images(folder: Path, n: int, seed: int = 0, bad: tuple = ()) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / (f"sub/im{i:03d}.png" if i % 4 == 1 else f"im{i:03d}.png")
        p.parent.mkdir(exist_ok=True)
        if i in bad:
            p.write_bytes(b"\x89PNG broken")
        else:
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


# ------------------------------------------------------------------------------------- listing


def test_list_inputs_kinds(tmp_path):
    paths = _images(tmp_path / "d", 6)
    (tmp_path / "d" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "d" / "readme.md").write_text("x")
    items = E.list_inputs([tmp_path / "d"], "image")
    assert [i.id for i in items] == [str(p) for p in paths]
    (tmp_path / "list.txt").write_text("# a comment\nd/im000.png\n\nd/sub/im001.png\n" + f"{paths[2]}\n")
    items = E.list_inputs([tmp_path / "list.txt", tmp_path / "d"], "image", limit=4)
    d = tmp_path / "d"
    assert [i.id for i in items] == [str(d / "im000.png"), str(d / "sub/im001.png"), str(d / "im003.png"), str(d / "im002.png")]
    (tmp_path / "caps.txt").write_text("a cat\n\nA dog \n")
    items = E.list_inputs([tmp_path / "caps.txt"], "text")
    assert [(i.id, i.text) for i in items] == [(f"{tmp_path / 'caps.txt'}#0", "a cat"), (f"{tmp_path / 'caps.txt'}#1", "A dog")]
    with pytest.raises(FileNotFoundError, match="input .*nope does not exist"):
        E.list_inputs([tmp_path / "nope"], "image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image inputs in .*empty \\(looked for files with extensions .jpg"):
        E.list_inputs([tmp_path / "empty"], "image")
    with pytest.raises(ValueError, match="not a folder, .tar, file list"):
        E.list_inputs([tmp_path / "d" / "readme.md"], "image")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tar(tmp_path, tiny):
    rng = np.random.default_rng(1)
    imgs, members = [], {}
    for k in range(5):
        buf = io.BytesIO()
        im = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
        im.save(buf, "PNG")
        imgs.append(im)
        members[f"part/{k:04d}.png"] = buf.getvalue()
        members[f"part/{k:04d}.txt"] = f"caption number {k}\n".encode()
        members[f"part/{k:04d}.json"] = b"{}"
    members["part/0005.png"] = b"broken"
    shard = _tar(tmp_path / "shard-000.tar", members)
    items = E.list_inputs([shard], "image")
    assert [i.id for i in items] == [f"{shard}#part/{k:04d}" for k in range(6)]
    res = E.encode([shard], encoder=SPEC, modality="image", out=tmp_path / "img", batch_size=2, shard_size=3, progress=False)
    assert (res.encoded, res.errors) == (5, 1)
    s = EmbeddingStore.open(tmp_path / "img")
    np.testing.assert_allclose(s.array(), tiny.expected("image", imgs), atol=1e-6)
    assert s.errors()[0]["id"] == f"{shard}#part/0005" and "not a readable image" in s.errors()[0]["reason"]
    E.encode([shard], encoder=SPEC, modality="text", out=tmp_path / "txt", progress=False)
    t = EmbeddingStore.open(tmp_path / "txt")
    np.testing.assert_allclose(t.array(), tiny.expected("text", [f"caption number {k}" for k in range(5)]), atol=1e-6)
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    with pytest.raises(ValueError, match="gz.tar: not an uncompressed tar file"):
        E.list_inputs([tmp_path / "gz.tar"], "image")


# ------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("workers", [0, 2])
def test_encode_folder_with_a_corrupt_image(tmp_path, tiny, workers):
    paths = _images(tmp_path / "imgs", 11, bad=(4,))
    args = ["encode", "--encoder", SPEC, "--modality", "image", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"),
            "--batch-size", "3", "--shard-size", "4", "--workers", str(workers), "--quiet"]
    assert main(args) == 0
    s = EmbeddingStore.open(tmp_path / "s")
    good = [p for p in paths if p.name != "im004.png"]
    assert s.ids == [str(p) for p in good] and s.complete
    from pairfree.media import load_image

    np.testing.assert_allclose(s.array(), tiny.expected("image", [load_image(p) for p in good]), atol=1e-6)
    errs = [json.loads(line) for line in (tmp_path / "s" / "errors.jsonl").read_text().splitlines()]
    assert errs == s.errors() and len(errs) == 1
    assert errs[0]["id"] == str(tmp_path / "imgs" / "im004.png") and "im004.png: not a readable image" in errs[0]["reason"]
    assert main(args) == 0  # a second run finds everything done
    assert EmbeddingStore.open(tmp_path / "s").count == 10


def test_encode_texts_audio_points(tmp_path, tiny, capsys):
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"id": [1, 2, 3], "caption": ["a red car", "", "two dogs"]}).to_csv(tmp_path / "c.csv", index=False)
    assert main(["encode", "--encoder", SPEC, "--modality", "text", str(tmp_path / "c.csv"), "--column", "caption",
                 "--out", str(tmp_path / "t"), "--quiet", "--dtype", "float16"]) == 0
    t = EmbeddingStore.open(tmp_path / "t")
    assert t.ids == [f"{tmp_path / 'c.csv'}#0", f"{tmp_path / 'c.csv'}#1"] and t.dtype == "float16"
    np.testing.assert_allclose(t.array(), tiny.expected("text", ["a red car", "two dogs"]), atol=2e-3)
    assert "2 encoded" in capsys.readouterr().out

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, 16000).astype(np.float32)
    sf.write(tmp_path / "a" / "x.wav", x, 16000, subtype="FLOAT")
    sf.write(tmp_path / "a" / "y.flac", x[:8000], 16000)
    (tmp_path / "a" / "z.wav").write_bytes((tmp_path / "a" / "x.wav").read_bytes()[:5000])  # truncated
    res = E.encode([tmp_path / "a"], encoder=SPEC, modality="audio", out=tmp_path / "au", progress=False)
    assert (res.encoded, res.errors) == (2, 1)
    from pairfree.media import load_audio

    a = EmbeddingStore.open(tmp_path / "au")
    np.testing.assert_allclose(a.array(), tiny.expected("audio", [load_audio(tmp_path / "a" / f, 16000) for f in ("x.wav", "y.flac")]), atol=1e-6)
    assert "truncated" in a.errors()[0]["reason"]

    (tmp_path / "p").mkdir()
    pts = rng.standard_normal((100, 3)).astype(np.float32)
    np.save(tmp_path / "p" / "a.npy", pts)
    (tmp_path / "p" / "b.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    E.encode([tmp_path / "p"], encoder=SPEC, modality="3d", out=tmp_path / "3d", progress=False)
    from pairfree.media import load_points

    p = EmbeddingStore.open(tmp_path / "3d")
    np.testing.assert_allclose(p.array(), tiny.expected("3d", [pts, load_points(tmp_path / "p" / "b.obj")]), atol=1e-6)


def test_empty_inputs_fail_cleanly(tmp_path, tiny, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    out = tmp_path / "out"
    assert main(["encode", "--encoder", SPEC, "--modality", "text", str(tmp_path / "empty.txt"), "--out", str(out)]) == 2
    assert f"no texts in {tmp_path / 'empty.txt'}" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "nothing").mkdir()
    assert main(["encode", "--encoder", SPEC, "--modality", "image", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no image inputs in" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    assert main(["encode", "--encoder", SPEC, "--modality", "image", str(tmp_path / "bad"), "--out", str(out), "--quiet"]) == 2
    assert "none of the 1 inputs could be read; no store written" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "one").mkdir()
    _images(tmp_path / "one", 1)
    assert main(["encode", "--encoder", "no-such-kind:x", "--modality", "image", str(tmp_path / "one"),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "unknown encoder kind 'no-such-kind'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_encoder_modality_checked(tmp_path):
    class ImageOnly(TinyEncoder):
        modalities = ("image",)

    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="embeds \\['image'\\], not 'text'"):
        E.encode([tmp_path / "t.txt"], encoder=ImageOnly(), modality="text", out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["BBQ", "toilet", "train"])
def test_demo_assets_through_the_pipeline(tmp_path, tiny, name):
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is absent (the official reference files live in ../shared/reference beside the repo)")
    from pairfree import media

    assets = REFERENCE / "assets"
    for modality, ext in (("image", "jpeg"), ("audio", "wav"), ("3d", "npy")):
        res = E.encode([assets / f"{name}.{ext}"], encoder=SPEC, modality=modality, out=tmp_path / modality, progress=False)
        assert (res.encoded, res.errors) == (1, 0)
        item = media.load(modality, assets / f"{name}.{ext}", sample_rate=16000)
        np.testing.assert_allclose(EmbeddingStore.open(tmp_path / modality).array(), tiny.expected(modality, [item]), atol=1e-6)


def test_ray_factory_carries_the_registry_entry(tiny):
    """What a Ray actor receives: a pickled factory that loads a kind registered only in the
    driver (a worker's registry holds the built-in kinds only); an unknown kind fails at once."""
    import pickle

    from pairfree.encoders import registry

    factory = pickle.loads(pickle.dumps(E._factory(SPEC, "cpu", "float32")))
    registry._REGISTRY.pop("test-tiny")  # as in a fresh worker process
    enc = factory()
    assert isinstance(enc, TinyEncoder) and enc.id == SPEC
    with pytest.raises(ValueError, match="unknown encoder kind 'nope'"):
        E._factory("nope:x", "cpu", "float32")


# ------------------------------------------------------------------------------------- kill and resume

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pairfree.encoders.registry import register_encoder
from test_encode import _tiny_factory
register_encoder("test-tiny", _tiny_factory)
from pairfree.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args, env=None, wait=True):
    full = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-c", _SCRIPT.format(tests=str(REPO / "tests")), *args]
    if wait:
        return subprocess.run(cmd, env=full, capture_output=True, text=True, cwd=REPO, timeout=120)
    return subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _same_store(a: Path, b: Path, layout: bool = True):
    x, y = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert x.complete and y.complete
    assert x.ids == y.ids
    assert x.array().dtype == y.array().dtype and np.array_equal(x.array(), y.array())
    assert x.errors() == y.errors()
    if layout:  # same shard boundaries too
        assert [s["rows"] for s in x.manifest["shards"]] == [s["rows"] for s in y.manifest["shards"]]


def _args(inputs, out, workers=0):
    return ["encode", "--encoder", SPEC, "--modality", "image", str(inputs), "--out", str(out), "--batch-size", "4",
            "--shard-size", "8", "--workers", str(workers), "--quiet", "--dtype", "float16"]


def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny):
    _images(tmp_path / "imgs", 30, bad=(5, 21))
    assert main(_args(tmp_path / "imgs", tmp_path / "ref")) == 0  # uninterrupted, in this process
    # hard exit at the 6th batch: 5 batches = 20 items done, 2 shards (16 rows) committed, 2 rows lost
    cut = _cli(_args(tmp_path / "imgs", tmp_path / "run"), env={"PAIRFREE_TEST_EXIT_AFTER": "5"})
    assert cut.returncode == 3, cut.stderr
    partial = EmbeddingStore.open(tmp_path / "run")
    assert partial.count == 16 and not partial.complete
    (tmp_path / "run" / ".shard-00002.npy.zz.tmp").write_bytes(b"half a shard")  # as a kill mid-commit leaves
    assert main(_args(tmp_path / "imgs", tmp_path / "run")) == 0  # resume, in this process
    _same_store(tmp_path / "run", tmp_path / "ref")
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_sigkill_with_workers_and_resume(tmp_path, tiny):
    _images(tmp_path / "imgs", 48, bad=(7,))
    assert main(_args(tmp_path / "imgs", tmp_path / "ref", workers=2)) == 0
    proc = _cli(_args(tmp_path / "imgs", tmp_path / "run", workers=2), env={"PAIRFREE_TEST_SLEEP": "0.25"}, wait=False)
    manifest = tmp_path / "run" / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = EmbeddingStore.open(tmp_path / "run")
    assert 0 < partial.count < 47 and not partial.complete
    assert main(_args(tmp_path / "imgs", tmp_path / "run", workers=2)) == 0
    _same_store(tmp_path / "run", tmp_path / "ref")


def test_encode_points_skips_a_malicious_pickle_without_running_it(tmp_path, tiny):
    """A crafted .npy among point clouds: recorded in errors.jsonl, never executed, the run completes."""
    import os

    class Gadget:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "clouds"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(folder / f"c{i}.npy", rng.standard_normal((50, 3)).astype(np.float32))
    evil = np.empty((), dtype=object)
    evil[()] = {"xyz": np.zeros((4, 3), np.float16), "x": Gadget()}
    np.save(folder / "c1_evil.npy", evil, allow_pickle=True)
    assert main(["encode", "--encoder", SPEC, "--modality", "3d", str(folder), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    s = EmbeddingStore.open(tmp_path / "s")
    assert s.complete and len(s.ids) == 3 and not any("evil" in i for i in s.ids)
    (err,) = s.errors()
    assert err["id"].endswith("c1_evil.npy") and "refusing to load posix.system" in err["reason"], err
    assert not (tmp_path / "pwned").exists()
