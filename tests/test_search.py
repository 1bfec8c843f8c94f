"""Search over a unified space: indices from stores, any-to-any queries against ground truth, exact
search against brute force, approximate kinds, clip-retrieval stores, the CLI."""

import json

import numpy as np
import pytest

import pairfree as pf
from pairfree.cli import main
from pairfree.search import IndexSet, QueryError, Searcher, build_index
from search_fixtures import labels

pytest.importorskip("faiss")

#: precision@10 of same-concept results, measured on the small world's 400 test items per modality
#: (chance 0.012): every query modality against every other one, asserted with a margin
MIN_PRECISION = 0.12


def test_any_to_any_precision_far_above_chance(searchable):
    world, media, um, stores, index = searchable
    s = Searcher(index, um)
    seen = {}
    for qm in index.modalities:
        ql = labels(index, qm)
        vecs = np.stack([index.vector(qm, i) for i in range(index.count(qm))])
        for tm in index.modalities:
            if tm == qm:
                continue
            tl = labels(index, tm)
            res = s.search_vectors(vecs, [tm], 10)
            prec = np.mean([np.mean([r["concept"] == ql[i] for r in res[i][0]["results"]]) for i in range(len(vecs))])
            chance = np.mean([np.mean(tl == ql[i]) for i in range(len(vecs))])
            seen[f"{qm}->{tm}"] = (round(float(prec), 3), round(float(chance), 4))
            assert prec > MIN_PRECISION and prec > 10 * chance, (qm, tm, prec, chance)
    assert len(seen) == 12, seen


def test_raw_queries_of_every_kind(searchable):
    world, media, um, stores, index = searchable
    s = Searcher(index, um)
    text = s.search("c017", k=5)
    assert [b["modality"] for b in text] == ["image", "audio", "3d", "text"]
    names = [f"c{i:03d}" for i in range(0, 100, 5)]  # queries by concept name (the toy text encoder's prompts)
    hits = [np.mean([r["concept"] == c for b in s.search(c, k=5) for r in b["results"]]) for c in names]
    assert np.mean(hits) > 0.15  # chance: ~4 of 400 items per concept and modality, 0.01
    wav = media / "test" / "audio" / "00003.wav"
    by_file = s.search(wav, modalities=["audio", "image"], k=3)
    assert by_file[0]["results"][0]["id"].endswith("00003.wav") and by_file[0]["results"][0]["score"] > 0.999
    row = index.find("audio", by_file[0]["results"][0]["id"])
    by_id = s.search({"id": by_file[0]["results"][0]["id"], "modality": "audio"}, modalities=["audio"], k=3)
    assert all(r["row"] != row for r in by_id[0]["results"])  # the item itself is left out
    by_vec = s.search({"embedding": index.vector("audio", row)}, modalities=["audio"], k=1)
    assert by_vec[0]["results"][0]["row"] == row
    assert s.search(np.asarray(index.vector("audio", row)), modalities=["audio"], k=1)[0]["results"][0]["row"] == row
    points = np.load(media / "test" / "3d" / "00007.npy")
    assert s.search({"file": media / "test" / "3d" / "00007.npy"}, modalities=["3d"], k=1)[0]["results"][0]["id"].endswith(
        "00007.npy")
    assert s.search(points, modalities=["3d"], k=1, query_modality="3d")[0]["results"][0]["id"].endswith("00007.npy")
    for bad, msg in (({"embedding": [1.0, 2.0]}, "embedding has 2 values"), ({"id": "nope"}, "no item 'nope'"),
                     ({"what": 1}, "needs one of"), ("x.xyz", None)):
        if msg:
            with pytest.raises(QueryError, match=msg):
                s.search(bad)
    with pytest.raises(QueryError, match=r"k must be an integer in \[1, 1000\]"):
        s.search("c001", k=0)
    with pytest.raises(QueryError, match="no index for"):
        s.search("c001", modalities=["video"])


def test_exact_search_equals_brute_force(searchable):
    world, media, um, stores, index = searchable
    s = Searcher(index, um)
    for tm, (space, mod, _) in zip(index.modalities, (("clip", "image", 0), ("clap", "audio", 0), ("ulip", "3d", 0),
                                                       ("clip", "text", 0))):
        store = [st for st in stores if st.endswith(f"{space}-{mod}")][0].split("=", 1)[1]
        gallery = um.embed(space, mod, store)
        q = np.stack([index.vector("text", i) for i in range(0, 400, 37)])
        scores, rows = index.search(q, tm, 10)
        brute = q.astype(np.float64) @ gallery.T.astype(np.float64)
        want = np.argsort(-brute, axis=1, kind="stable")[:, :10]
        np.testing.assert_allclose(scores, np.take_along_axis(brute, want, 1), atol=1e-5)
        np.testing.assert_array_equal(np.sort(rows, 1), np.sort(want, 1))  # same sets (ties aside)
        assert s.search_vectors(q[:1], [tm], 10)[0][0]["results"][0]["row"] == want[0, 0]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_reach_their_recall_for_every_query_modality(searchable, tmp_path, kind):
    world, media, um, stores, _ = searchable
    ix = build_index(um, stores, tmp_path / kind, kind=kind, progress=False, params={"nlist": 16} if kind != "hnsw" else {})
    for m, e in ix.info["modalities"].items():
        assert set(e["recall@10"]) == {"image", "audio", "3d", "text"}
        assert min(e["recall@10"].values()) >= 0.95, (m, e)
    opened = IndexSet.open(tmp_path / kind)
    assert opened.search(opened.vector("image", 5)[None], "image", 1)[1][0, 0] == 5


def test_ivfpq_skips_polysemous_training():
    """index_factory turns it on; unused by our searches, it made an IVF-PQ build 100x slower (2-4 s per
    sub-quantizer)."""
    import faiss

    from pairfree.search.index import _make_index

    idx = _make_index("ivfpq", 64, 1000, {"nlist": 4})
    assert faiss.downcast_index(idx.base_index).do_polysemous_training is False


def test_index_records_its_model_and_refuses_another(searchable, tmp_path):
    world, media, um, stores, index = searchable
    info = json.loads((index.path / "index.json").read_text())
    assert info["model"]["fingerprint"] == um.fingerprint and info["model"]["meta"]["source"].endswith("model")
    assert {s["space"] for e in info["modalities"].values() for s in e["stores"]} == {"clip", "clap", "ulip"}
    assert info["media_roots"] and all(str(media) in r for r in info["media_roots"])
    other = pf.UnifiedModel(pf.ExMCR(pf.ExMCRConfig(epochs=1, batch_size=512)).fit(
        world.spaces["clip"], {"clap": (world.spaces["clap"], "text")}, progress=False), {})
    with pytest.raises(ValueError, match="was built with another model"):
        Searcher(index, other)


def test_clip_retrieval_stores_open_as_stores(searchable, tmp_path):
    """The layout clip-retrieval / embedding-reader write: img_emb/img_emb_N.npy + metadata/metadata_N.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    world, media, um, stores, index = searchable
    root = tmp_path / "cr"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    V = world.test["clip/image"]
    paths = [str(media / "test" / "image" / f"{i:05d}.png") for i in range(len(V))]
    for part, (a, b) in enumerate(((0, 250), (250, len(V)))):
        np.save(root / "img_emb" / f"img_emb_{part}.npy", V[a:b].astype(np.float16))
        pq.write_table(pa.table({"image_path": paths[a:b], "caption": [f"item {i}" for i in range(a, b)]}),
                       root / "metadata" / f"metadata_{part}.parquet")
    ix = build_index(um, [f"clip={root / 'img_emb'}"], tmp_path / "ix", progress=False)
    assert ix.count("image") == 400 and ix.metadata("image")["id"][260] == paths[260]
    assert ix.metadata("image")["caption"][260] == "item 260" and ix.metadata("image")["path"][3] == paths[3]
    np.testing.assert_allclose(ix.vector("image", 7), um.embed("clip", "image", V[7:8].astype(np.float16))[0], atol=5e-5)


def test_search_cli_table_json_and_batch(searchable, tmp_path, capsys):
    world, media, um, stores, index = searchable
    assert main(["search", "--index", str(index.path), "c017", "--modality", "image", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "query: c017" in out and "== image (3 results)" in out
    (tmp_path / "q.txt").write_text(f"c001\n# a comment\n{media / 'test' / 'audio' / '00002.wav'}\n")
    assert main(["search", "--index", str(index.path), "--queries", str(tmp_path / "q.txt"), "-k", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in res] == ["c001", str(media / "test" / "audio" / "00002.wav")]
    assert res[1]["results"][1]["results"][0]["id"].endswith("00002.wav")  # audio block, the clip itself
    assert main(["index", "--pretrained", str(media.parent / "model"), "--store", stores[0], "--out",
                 str(tmp_path / "ix"), "--kind", "hnsw", "--quiet"]) == 0
    assert "recall@10 vs exact" in capsys.readouterr().out
