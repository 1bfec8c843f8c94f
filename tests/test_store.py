"""pairfree.store: sharded embedding store, commit protocol, validation, Space integration."""

import json

import numpy as np
import pytest

from pairfree import Space
from pairfree.store import EmbeddingStore, StoreError, StoreWriter


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _writer(path, **kw):
    args = dict(encoder="test:enc", modality="image", dim=8, dtype="float32", shard_size=5)
    args.update(kw)
    return StoreWriter(path, **args)


def test_write_read_roundtrip_and_space(tmp_path, rng):
    x = _unit(rng, 12, 8)
    ids = [f"img/{i:03d}.jpg" for i in range(12)]
    w = _writer(tmp_path / "s")
    w.add(ids[:3], x[:3] * 7.0)  # rows are (re-)normalised on the way in
    w.add(ids[3:], x[3:])
    store = w.finish()
    assert [s["rows"] for s in store.manifest["shards"]] == [5, 5, 2]
    s = EmbeddingStore.open(tmp_path / "s")
    assert (s.encoder, s.modality, s.dim, s.dtype, s.count, s.complete) == ("test:enc", "image", 8, "float32", 12, True)
    assert s.ids == ids and len(s) == 12
    np.testing.assert_allclose(s.array(), x, atol=1e-6)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["pairfree_version"] and all(len(sh["sha256"]) == 64 for sh in m["shards"])
    space = Space("clip", {"image": s.array()})
    np.testing.assert_allclose(space["image"], x, atol=1e-6)

    path = s.consolidate()
    assert path.name == "embeddings.npy"
    s2 = EmbeddingStore.open(tmp_path / "s")
    a = s2.array()
    assert isinstance(a, np.memmap) and a.dtype == np.float32
    sp = Space("clip", {"image": a})
    assert sp["image"] is a  # float32 unit rows: the Space keeps the memory map, no copy
    np.testing.assert_allclose(a, x, atol=1e-6)


def test_float16_store_and_single_shard_memmap(tmp_path, rng):
    x = _unit(rng, 7, 8)
    w = _writer(tmp_path / "h", dtype="float16", shard_size=100)
    w.add([str(i) for i in range(7)], x)
    w.finish()
    s = EmbeddingStore.open(tmp_path / "h")
    a = s.array()
    assert isinstance(a, np.memmap) and a.dtype == np.float16 and a.shape == (7, 8)
    sp = s.to_space("clip")
    # unit float16 rows are kept as they are, memory-mapped (paper-scale memories are not copied)
    assert sp["image"].dtype == np.float16 and isinstance(sp["image"], np.memmap)
    np.testing.assert_allclose(np.linalg.norm(sp["image"].astype(np.float32), axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(sp["image"], x, atol=2e-3)


def test_errors_committed_with_shards(tmp_path, rng):
    w = _writer(tmp_path / "e")
    w.add_errors([("bad1.jpg", "not a readable image")])
    w.add([f"{i}" for i in range(6)], _unit(rng, 6, 8))  # commits shard 0 (5 rows) and the error
    assert EmbeddingStore.open(tmp_path / "e").errors() == [{"id": "bad1.jpg", "reason": "not a readable image"}]
    w.add_errors([("bad2.jpg", "truncated")])  # pending, not committed
    again = _writer(tmp_path / "e")  # reopen = resume after a kill
    assert again.done == {"0", "1", "2", "3", "4", "bad1.jpg"}
    assert [e["id"] for e in EmbeddingStore.open(tmp_path / "e").errors()] == ["bad1.jpg"]
    assert (tmp_path / "e" / "errors.jsonl").read_text().count("\n") == 1


def test_resume_removes_uncommitted_files(tmp_path, rng):
    x = _unit(rng, 8, 8)
    w = _writer(tmp_path / "r")
    w.add([f"{i}" for i in range(8)], x)  # shard 0 committed, 3 rows buffered (lost on "kill")
    d = tmp_path / "r"
    # what a kill in the middle of committing shard 1 leaves behind
    (d / "shard-00001.npy").write_bytes(b"partial")
    (d / ".ids-00001.txt.abc123.tmp").write_text("5\n")
    (d / ".manifest.json.x.tmp").write_text("{")
    with open(d / "errors.jsonl", "a") as f:
        f.write('{"id": "uncommitted", "reason": "x"}\n')
    (d / "notes.md").write_text("user file, not ours")
    w2 = _writer(d)
    assert sorted(p.name for p in d.iterdir()) == ["errors.jsonl", "ids-00000.txt", "manifest.json", "notes.md", "shard-00000.npy"]
    assert (d / "errors.jsonl").read_bytes() == b""
    assert w2.done == {str(i) for i in range(5)}
    w2.add([f"{i}" for i in range(5, 8)], x[5:])
    s = w2.finish()
    np.testing.assert_allclose(EmbeddingStore.open(d).array(), x, atol=1e-6)
    assert s.ids == [str(i) for i in range(8)]


def test_resume_refuses_other_settings(tmp_path, rng):
    w = _writer(tmp_path / "x")
    w.add(["a"], _unit(rng, 1, 8))
    w.finish()
    for kw, field in (({"encoder": "other"}, "encoder"), ({"dim": 4}, "dim"), ({"dtype": "float16"}, "dtype"),
                      ({"modality": "text"}, "modality")):
        with pytest.raises(StoreError, match=f"manifest.json: field '{field}'"):
            _writer(tmp_path / "x", **kw)
    w = _writer(tmp_path / "x")
    with pytest.raises(StoreError, match="duplicate id 'a'"):
        w.add(["a"], _unit(rng, 1, 8))
    with pytest.raises(StoreError, match="without newlines"):
        w.add(["b\nc"], _unit(rng, 1, 8))
    with pytest.raises(StoreError, match="all zeros"):
        w.add(["z"], np.zeros((1, 8), np.float32))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "data.csv").write_text("x")
    with pytest.raises(StoreError, match="not empty and has no manifest.json"):
        _writer(tmp_path / "occupied")


def test_bad_stores_name_file_and_field(tmp_path, rng):
    d = tmp_path / "b"
    w = _writer(d)
    w.add([f"{i}" for i in range(7)], _unit(rng, 7, 8))
    w.finish()
    with pytest.raises(StoreError, match=r"nostore/manifest.json: missing"):
        (tmp_path / "nostore").mkdir()
        EmbeddingStore.open(tmp_path / "nostore")

    shard = d / "shard-00001.npy"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    shard.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=r"shard-00001.npy: field 'sha256' mismatch"):
        EmbeddingStore.open(d)
    assert EmbeddingStore.open(d, verify=False).count == 7  # checksums can be skipped
    shard.write_bytes(good)

    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "dim": 16}))
    with pytest.raises(StoreError, match=r"shard-00000.npy: field 'dim': manifest says 16"):
        EmbeddingStore.open(d)
    (d / "manifest.json").write_text(json.dumps({**m, "count": 9}))
    with pytest.raises(StoreError, match=r"manifest.json: field 'count' is 9 but the shards hold 7"):
        EmbeddingStore.open(d)
    del m["dtype"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"manifest.json: missing field 'dtype'"):
        EmbeddingStore.open(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json: not valid JSON"):
        EmbeddingStore.open(d)


def test_ids_count_checked(tmp_path, rng):
    d = tmp_path / "i"
    w = _writer(d, shard_size=10)
    w.add(["a", "b", "c"], _unit(rng, 3, 8))
    w.finish()
    (d / "ids-00000.txt").write_text("a\nb\n")
    with pytest.raises(StoreError, match="ids-00000.txt: field 'ids_sha256' mismatch"):
        EmbeddingStore.open(d)
    with pytest.raises(StoreError, match="ids-00000.txt: field 'rows': manifest says 3, the file has 2 ids"):
        EmbeddingStore.open(d, verify=False)
