"""The HTTP service (ASGI test client): every endpoint, every bad input gets a 4xx, the server keeps serving."""

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from pairfree.search import Searcher  # noqa: E402
from pairfree.search.service import Service, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(searchable):
    world, media, um, stores, index = searchable
    service = Service({"toy": Searcher(index, um)}, max_upload_bytes=200_000, timeout_s=20)
    return TestClient(create_app(service)), media, index


def knn(c, **body):
    return c.post("/knn-service", json={"indice_name": "toy", **body})


def test_page_static_and_listing(client):
    c, media, index = client
    r = c.get("/")
    assert r.status_code == 200 and "/static/app.js" in r.text and "http" not in r.text.replace("http-equiv", "")
    assert c.get("/static/app.js").headers["content-type"].startswith("application/javascript")
    assert c.get("/static/../service.py").status_code == 404
    assert c.get("/indices-list").json() == ["toy"]
    info = c.get("/indices/toy").json()
    assert info["modalities"]["audio"]["count"] == 400 and set(info["query_modalities"]) == {"image", "text", "audio", "3d"}


def test_queries_by_text_embedding_id_and_upload(client):
    c, media, index = client
    r = knn(c, text="c017", modalities=["image", "3d"], num_results=3)
    assert r.status_code == 200
    blocks = r.json()["results"]
    assert [b["modality"] for b in blocks] == ["image", "3d"] and len(blocks[0]["results"]) == 3
    first = blocks[0]["results"][0]
    assert first["url"] == f"/media/toy/image/{first['row']}" and "path" not in first
    img = c.get(first["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content[:4] == b"\x89PNG"
    pts = c.get(blocks[1]["results"][0]["preview"]).json()["points"]
    assert np.asarray(pts).shape[1] == 3
    vec = index.vector("audio", 11).tolist()
    assert knn(c, embedding_input=vec, modalities=["audio"], num_results=1).json()["results"][0]["results"][0]["row"] == 11
    item = index.metadata("audio")["id"][11]
    rows = [x["row"] for x in knn(c, id=item, id_modality="audio", modalities=["audio"]).json()["results"][0]["results"]]
    assert 11 not in rows and len(rows) == 10
    wav = (media / "test" / "audio" / "00011.wav").read_bytes()
    r = c.post("/knn-service/upload", files={"file": ("clip.wav", wav, "audio/wav")},
               data={"indice_name": "toy", "modalities": "audio", "num_results": "2"})
    assert r.status_code == 200 and r.json()["results"][0]["results"][0]["row"] == 11
    ply = (media / "test" / "3d" / "00004.npy").read_bytes()
    r = c.post("/knn-service/upload", files={"file": ("obj.npy", ply, "application/octet-stream")},
               data={"indice_name": "toy", "modalities": "3d", "num_results": "1"})
    assert r.status_code == 200 and r.json()["results"][0]["results"][0]["row"] == 4


@pytest.mark.parametrize("case", ["malformed_json", "unknown_index", "no_query", "two_queries", "k_zero", "k_huge",
                                  "empty_text", "bad_embedding", "unknown_id", "unknown_target", "unsupported_type",
                                  "corrupt_image", "oversized", "wrong_content_type", "traversal", "traversal_encoded",
                                  "row_out_of_range", "row_not_a_number", "preview_not_3d", "unknown_media_modality"])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(client, case):
    c, media, index = client
    png = (media / "test" / "image" / "00001.png").read_bytes()

    def upload(name, data, ctype, **fields):
        return c.post("/knn-service/upload", files={"file": (name, data, ctype)},
                      data={"indice_name": "toy", **fields})

    r = {
        "malformed_json": lambda: c.post("/knn-service", content=b"{bad", headers={"content-type": "application/json"}),
        "unknown_index": lambda: c.post("/knn-service", json={"indice_name": "nope", "text": "c001"}),
        "no_query": lambda: knn(c),
        "two_queries": lambda: knn(c, text="c001", id="x"),
        "k_zero": lambda: knn(c, text="c001", num_results=0),
        "k_huge": lambda: knn(c, text="c001", num_results=10**6),
        "empty_text": lambda: knn(c, text="   "),
        "bad_embedding": lambda: knn(c, embedding_input=[1.0, 2.0]),
        "unknown_id": lambda: knn(c, id="no/such/item", id_modality="audio"),
        "unknown_target": lambda: knn(c, text="c001", modalities=["video"]),
        "unsupported_type": lambda: upload("x.docx", b"PK\x03\x04", "application/octet-stream"),
        "corrupt_image": lambda: upload("x.png", png[:40], "image/png"),
        "oversized": lambda: upload("x.png", png + b"\0" * 300_000, "image/png"),
        "wrong_content_type": lambda: upload("x.png", png, "audio/wav"),
        "traversal": lambda: c.get("/media/toy/image/../../../etc/passwd"),
        "traversal_encoded": lambda: c.get("/media/toy/image/..%2F..%2F..%2Fetc%2Fpasswd"),
        "row_out_of_range": lambda: c.get("/media/toy/image/400"),
        "row_not_a_number": lambda: c.get("/media/toy/image/1e3"),
        "preview_not_3d": lambda: c.get("/preview/toy/image/1"),
        "unknown_media_modality": lambda: c.get("/media/toy/video/1"),
    }[case]()
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert detail and "Traceback" not in str(detail)
    assert knn(c, text="c002", num_results=1).status_code == 200  # still serving


def test_concurrent_requests(client):
    c, media, index = client
    errors, done = [], []

    def worker(i):
        try:
            r = knn(c, text=f"c{i:03d}", num_results=3)
            assert r.status_code == 200
            done.append(i)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(done) == list(range(16))


def test_media_only_from_indexed_roots(client, tmp_path):
    c, media, index = client
    meta = index.metadata("image")
    outside = tmp_path / "secret.png"
    outside.write_bytes((media / "test" / "image" / "00000.png").read_bytes())
    meta["path"][0] = str(outside)  # as if the table pointed outside the media roots
    try:
        assert c.get("/media/toy/image/0").status_code == 404
    finally:
        meta["path"][0] = str(media / "test" / "image" / "00000.png")
    assert c.get("/media/toy/image/0").status_code == 200
