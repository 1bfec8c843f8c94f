"""pairfree.media: point clouds, meshes, the Objaverse record format and the restricted unpickler."""

import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest

from pairfree.media import (
    MediaError,
    UnsafePickleError,
    load_npy,
    load_objaverse_record,
    load_points,
    record_feature,
    records_to_space,
    sample_points,
)
from pairfree.media import safe_pickle

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
DEMO = ("BBQ", "toilet", "train")


def reference(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the official reference files live in ../shared/reference beside the repo)")
    return path


def _globals_in(path: Path) -> set[str]:
    """GLOBAL / STACK_GLOBAL names of a pickled .npy payload, found without executing anything."""
    from numpy.lib import format as npformat

    with open(path, "rb") as f:
        npformat.read_magic(f)
        npformat.read_array_header_1_0(f)
        data = f.read()
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
    return names


def _deep_equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.hasobject:
            return all(_deep_equal(x, y) for x, y in zip(a.flat, b.flat))
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------- the demo records


@pytest.mark.parametrize("name", DEMO)
def test_demo_record_equals_numpy_pickle_load(name):
    path = reference("assets", f"{name}.npy")
    names = _globals_in(path)
    allowed = {f"{m}.{n}" for m, n in safe_pickle._ALLOWED}
    assert names and names <= allowed, names
    # only now, with every callable in the file known to be numpy's own, is np.load safe as an oracle
    expect = np.load(path, allow_pickle=True)
    got = load_npy(path)
    assert _deep_equal(got, expect)
    rec = load_objaverse_record(path)
    ref = expect.item()
    assert rec["xyz"].dtype == np.float32 and rec["xyz"].shape == (10000, 3)
    np.testing.assert_array_equal(rec["xyz"], ref["xyz"].astype(np.float32))
    np.testing.assert_array_equal(rec["rgb"], ref["rgb"].astype(np.float32))
    assert rec["image_feat"].shape == (12, 1280) and rec["thumbnail_feat"].shape == (1280,)
    assert isinstance(rec["id"], str) and len(rec["id"]) == 32 and rec["dataset"] == "Objaverse"
    pts = load_points(path)
    np.testing.assert_array_equal(pts, rec["xyz"])


def test_demo_records_to_space():
    paths = [reference("assets", f"{n}.npy") for n in DEMO]
    space, ids = records_to_space(paths, return_ids=True)
    assert space.dim == 1280 and space.count("image") == space.count("text") == 3
    raw = [np.load(p, allow_pickle=True).item() for p in paths]  # safe: checked by the test above
    assert ids == [r["id"] for r in raw]
    for i, r in enumerate(raw):
        t = r["thumbnail_feat"] / np.linalg.norm(r["thumbnail_feat"])
        np.testing.assert_allclose(space["image"][i], t, atol=1e-6)
        x = r["text_feat"][0]["original"][0]
        np.testing.assert_allclose(space["text"][i], x / np.linalg.norm(x), atol=1e-6)
    # real OpenCLIP ViT-bigG-14 features: each object's thumbnail is closest to its own name text
    sim = space["image"] @ space["text"].T
    assert (sim.argmax(axis=1) == np.arange(3)).all()

    views = records_to_space(paths, {"image": "image_feat", "text": "blip_caption_feat:prompt_avg"})
    for i, r in enumerate(raw):
        v = r["image_feat"] / np.linalg.norm(r["image_feat"], axis=1, keepdims=True)
        m = v.mean(axis=0)
        np.testing.assert_allclose(views["image"][i], m / np.linalg.norm(m), atol=1e-6)
        c = r["blip_caption_feat"]["prompt_avg"][0]
        np.testing.assert_allclose(views["text"][i], c / np.linalg.norm(c), atol=1e-6)
    rec = load_objaverse_record(paths[0])
    np.testing.assert_allclose(record_feature(rec, "image_feat[3]"), rec["image_feat"][3])
    with pytest.raises(MediaError, match="no variant 'prompt_avg'"):
        record_feature(rec, "retrieval_text_feat:prompt_avg")
    with pytest.raises(MediaError, match="no field 'depth_feat'"):
        record_feature(rec, "depth_feat")


# ------------------------------------------------------------------------------- restricted unpickler


class _System:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _Open:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import builtins

        return (builtins.open, (str(self.target), "w"))


class _Eval:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import builtins

        return (builtins.eval, (f"open({str(self.target)!r}, 'w')",))


def _record_npy(path: Path, payload) -> Path:
    arr = np.empty((), dtype=object)
    arr[()] = {"xyz": np.zeros((4, 3), np.float16), "evil": payload}
    np.save(path, arr, allow_pickle=True)
    return path


@pytest.mark.parametrize("gadget", [_System, _Open, _Eval])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, gadget):
    target = tmp_path / "pwned"
    path = _record_npy(tmp_path / "evil.npy", gadget(target))
    for load in (load_objaverse_record, load_points, load_npy):
        with pytest.raises(UnsafePickleError, match=r"evil.npy: refusing to load (posix\.system|io\.open|builtins\.eval)"):
            load(path)
    assert not target.exists()
    assert issubclass(UnsafePickleError, MediaError)
    # sanity: the gadget is real -- numpy's own loader would have run it
    np.load(path, allow_pickle=True)
    assert target.exists()


def test_pickle_cannot_tamper_with_the_allowed_callables():
    # BUILD with a state on the allowed numpy.dtype callable: refused before anything is modified
    key = "__defaults__".encode()
    build = b"\x80\x02cnumpy\ndtype\n}X" + struct.pack("<I", len(key)) + key + b"K\x01sb."
    with pytest.raises(UnsafePickleError, match="tries to modify numpy.dtype"):
        safe_pickle.loads(build)
    # calling numpy.ndarray directly (it could allocate any amount of memory)
    with pytest.raises(UnsafePickleError, match="calls numpy.ndarray directly"):
        safe_pickle.loads(b"\x80\x02cnumpy\nndarray\nK\x05\x85R.")
    # returning an allowed callable itself is not data
    with pytest.raises(UnsafePickleError, match="produced an object of type _Guarded"):
        safe_pickle.loads(b"\x80\x02cnumpy\ndtype\n.")
    with pytest.raises(MediaError, match="malformed pickle data"):
        safe_pickle.loads(b"\x80\x02}q\x00(X\x01")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickles_of_every_protocol(protocol):
    obj = {
        "a": np.arange(12, dtype=np.float16).reshape(4, 3),
        "b": [np.ones((2, 2), np.float32), {"c": np.array([1, 2], np.int64)}],
        "s": "text", "n": 3, "f": 1.5, "t": (1, None, True), "raw": b"\x00\x01",
        "scalar": np.float32(2.5), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    }
    arr = np.empty((), dtype=object)
    arr[()] = obj
    got = safe_pickle.loads(pickle.dumps(arr, protocol=protocol))
    assert _deep_equal(got, arr)


def test_numeric_npy_is_read_without_pickle(tmp_path):
    a = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(load_npy(tmp_path / "a.npy"), a)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(MediaError, match="bad.npy: not a .npy file"):
        load_npy(tmp_path / "bad.npy")


# ------------------------------------------------------------------------------- point clouds / meshes


def test_points_npy(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 6))
    np.save(tmp_path / "p6.npy", a)
    np.testing.assert_array_equal(load_points(tmp_path / "p6.npy"), a[:, :3].astype(np.float32))
    s = load_points(tmp_path / "p6.npy", n_points=20, seed=1)
    assert s.shape == (20, 3) and len({tuple(r) for r in s}) == 20  # a subset without replacement
    assert np.array_equal(s, load_points(tmp_path / "p6.npy", n_points=20, seed=1))
    up = load_points(tmp_path / "p6.npy", n_points=80)
    np.testing.assert_array_equal(up[:50], a[:, :3].astype(np.float32))  # all points, then duplicates
    np.save(tmp_path / "p2.npy", a[:, :2])
    with pytest.raises(MediaError, match=r"p2.npy: expected an \(N, 3\)"):
        load_points(tmp_path / "p2.npy")
    np.save(tmp_path / "nan.npy", np.full((3, 3), np.nan))
    with pytest.raises(MediaError, match="NaN"):
        load_points(tmp_path / "nan.npy")
    obj = np.empty((), dtype=object)
    obj[()] = {"no_xyz": 1}
    np.save(tmp_path / "o.npy", obj, allow_pickle=True)
    with pytest.raises(MediaError, match=r"o.npy: the record has no 'xyz' field \(fields: \['no_xyz'\]\)"):
        load_points(tmp_path / "o.npy")


def _ply(vertices, faces=None, fmt="ascii"):
    head = ["ply", f"format {fmt} 1.0", "comment made by a test", f"element vertex {len(vertices)}",
            "property float x", "property float y", "property float z", "property uchar red"]
    if faces is not None:
        head += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    head.append("end_header")
    out = ("\n".join(head) + "\n").encode()
    if fmt == "ascii":
        out += "".join(f"{x} {y} {z} 7\n" for x, y, z in vertices).encode()
        if faces is not None:
            out += "".join(f"{len(f)} {' '.join(map(str, f))}\n" for f in faces).encode()
        return out
    o = "<" if fmt == "binary_little_endian" else ">"
    vt = np.dtype([("x", o + "f4"), ("y", o + "f4"), ("z", o + "f4"), ("r", "u1")])
    v = np.zeros(len(vertices), vt)
    v["x"], v["y"], v["z"], v["r"] = vertices[:, 0], vertices[:, 1], vertices[:, 2], 7
    out += v.tobytes()
    for f in faces if faces is not None else []:
        out += np.uint8(len(f)).tobytes() + np.asarray(f, o + "i4").tobytes()
    return out


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_point_cloud_and_mesh(tmp_path, fmt):
    v = np.random.default_rng(0).standard_normal((30, 3)).astype(np.float32)
    (tmp_path / "c.ply").write_bytes(_ply(v, fmt=fmt))
    np.testing.assert_allclose(load_points(tmp_path / "c.ply"), v, rtol=1e-6)
    # a unit square (two triangles, one as a quad) in the z = 2 plane
    sq = np.array([[0, 0, 2], [1, 0, 2], [1, 1, 2], [0, 1, 2]], np.float32)
    (tmp_path / "m.ply").write_bytes(_ply(sq, [[0, 1, 2, 3]], fmt=fmt))
    p = load_points(tmp_path / "m.ply", n_points=2000, seed=0)
    assert p.shape == (2000, 3)
    np.testing.assert_allclose(p[:, 2], 2.0)
    assert p[:, :2].min() >= 0 and p[:, :2].max() <= 1
    assert abs(p[:, 0].mean() - 0.5) < 0.03 and abs(p[:, 1].mean() - 0.5) < 0.03  # uniform on the square
    np.testing.assert_array_equal(p, load_points(tmp_path / "m.ply", n_points=2000, seed=0))
    data = _ply(sq, [[0, 1, 2, 3]], fmt=fmt)
    (tmp_path / "cut.ply").write_bytes(data[: len(data) - 12])
    with pytest.raises(MediaError, match="cut.ply"):
        load_points(tmp_path / "cut.ply")


def test_obj_off_meshes_area_weighted(tmp_path):
    # triangle A has 3x the area of triangle B; OBJ with a negative (relative) index and v/vt/vn syntax
    obj = "v 0 0 0\nv 3 0 0\nv 0 2 0\nv 10 0 0\nv 11 0 0\nv 10 2 0\nvt 0 0\nf 1/1 2/1 3/1\nf -3 -2 -1\n"
    (tmp_path / "m.obj").write_text(obj)
    p = load_points(tmp_path / "m.obj", n_points=20000, seed=0)
    frac_a = (p[:, 0] < 5).mean()
    assert abs(frac_a - 0.75) < 0.015
    assert (p[:, 0] >= 0).all() and (p[:, 1] >= 0).all() and np.allclose(p[:, 2], 0)
    off = "OFF\n# comment\n6 2 0\n0 0 0\n3 0 0\n0 2 0\n10 0 0\n11 0 0\n10 2 0\n3 0 1 2\n3 3 4 5\n"
    (tmp_path / "m.off").write_text(off)
    q = load_points(tmp_path / "m.off", n_points=20000, seed=0)
    np.testing.assert_allclose(q, p, atol=1e-6)  # same mesh, same seed -> same samples
    assert load_points(tmp_path / "m.off").shape == (10000, 3)  # meshes default to 10000 samples
    (tmp_path / "bad.obj").write_text("v 0 0 0\nf 1 2 3\n")
    with pytest.raises(MediaError, match="bad.obj: face indices out of range"):
        load_points(tmp_path / "bad.obj")


def test_meshes_written_by_trimesh(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))  # faces of area 2, 3 and 6 (two of each)
    for ext in ("ply", "obj", "off", "stl"):
        box.export(tmp_path / f"b.{ext}")
        p = load_points(tmp_path / f"b.{ext}", n_points=12000, seed=0).astype(np.float64)
        assert p.shape == (12000, 3)
        half = np.array([0.5, 1.0, 1.5])
        on_face = np.isclose(np.abs(p), half, atol=1e-5)  # every sample lies on one of the box faces
        assert on_face.any(axis=1).all() and (np.abs(p) <= half + 1e-5).all(), ext
        frac = on_face.mean(axis=0) / on_face.any(axis=1).mean()  # share of samples on x-, y-, z-faces
        np.testing.assert_allclose(frac, np.array([6.0, 3.0, 2.0]) / 11.0, atol=0.02, err_msg=ext)


def test_sample_points_validation():
    with pytest.raises(ValueError, match="positive"):
        sample_points(np.zeros((3, 3), np.float32), 0)
