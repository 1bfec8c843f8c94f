"""`pairfree serve`: an HTTP JSON API in the shape of clip-retrieval's knn service, plus a web page.

    GET  /                               the search page (plain HTML/JS, works offline)
    GET  /indices-list                   ["toy", ...]
    GET  /indices/{name}                 modalities, counts, what can be queried
    POST /knn-service                    JSON {"indice_name", one of "text" / "embedding_input" / "id"
                                         (+ "id_modality"), "modalities": [...], "num_results": k}
    POST /knn-service/upload             multipart: file, indice_name, modalities, num_results, modality
    GET  /media/{name}/{modality}/{row}  the item's media file (only files under the indexed roots)
    GET  /preview/{name}/{modality}/{row}  a 3D item's points, subsampled, for the page's preview

Every bad request gets a 4xx with {"detail": message} and the server keeps serving; a query that
runs longer than `timeout_s` gets 504. Indices and encoders are loaded once; encoding is serialised
(some upstream preprocessing uses numpy's global RNG), index searches run concurrently.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from pairfree.search.query import Searcher

WEB = Path(__file__).parent / "web"
STATIC = {"app.js": "application/javascript", "style.css": "text/css"}
#: declared content types accepted per modality (browsers send octet-stream for unknown types)
CONTENT_TYPES = {
    "image": ("image/",),
    "audio": ("audio/", "video/ogg", "application/ogg"),
    "3d": ("model/", "application/x-npy", "text/plain", "application/x-ply"),
}
#: leading bytes of the image and audio formats the loaders read (3D files are checked by parsing)
_MAGIC = {
    "image": (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"P6", b"P5"),
    "audio": (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),
}


class Service:
    """What the app serves: searchers by index name, limits."""

    def __init__(self, searchers: dict[str, Searcher], *, max_upload_bytes: int = 20 << 20, timeout_s: float = 30.0):
        if not searchers:
            raise ValueError("serve needs at least one index")
        self.searchers = searchers
        self.max_upload_bytes = int(max_upload_bytes)
        self.timeout_s = float(timeout_s)
        self._encode_lock = threading.Lock()

    def searcher(self, name: str) -> Searcher:
        from fastapi import HTTPException

        if name not in self.searchers:
            raise HTTPException(404, f"unknown index {name!r}; indices: {sorted(self.searchers)}")
        return self.searchers[name]

    def query(self, name: str, query: Any, modalities: list[str] | None, k: int, query_modality: str | None = None):
        s = self.searcher(name)
        if modalities is not None and not modalities:
            modalities = None
        vec_lock = self._encode_lock if not (isinstance(query, dict) and ("id" in query or "embedding" in query)) else None
        if vec_lock:
            with vec_lock:
                vec, qmod = s.query_vector(query, query_modality)
        else:
            vec, qmod = s.query_vector(query, query_modality)
        exclude = query if isinstance(query, dict) and "id" in query else None
        blocks = s.search_vectors(vec[None], modalities, k, exclude=exclude, query_modality=qmod)[0]
        for block in blocks:
            for r in block["results"]:
                r["url"] = f"/media/{name}/{block['modality']}/{r['row']}" if r.pop("path", None) else None
                if block["modality"] == "3d" and r["url"]:
                    r["preview"] = f"/preview/{name}/3d/{r['row']}"
        return {"indice_name": name, "query_modality": qmod, "results": blocks}

    def media_path(self, name: str, modality: str, row: str) -> Path:
        from fastapi import HTTPException

        s = self.searcher(name)
        if modality not in s.modalities:
            raise HTTPException(404, f"index {name!r} has no {modality!r} items")
        if not re.fullmatch(r"\d{1,12}", row) or int(row) >= s.index.count(modality):
            raise HTTPException(404, f"no row {row!r} in the {modality} index of {name!r}")
        path = s.index.row(modality, int(row)).get("path") or ""
        if not path:
            raise HTTPException(404, f"row {row} of {modality} has no media file")
        resolved = Path(path).resolve()
        roots = [Path(r).resolve() for r in s.index.info.get("media_roots", [])]
        if not any(resolved.is_relative_to(r) for r in roots) or not resolved.is_file():
            raise HTTPException(404, "media file not available")
        return resolved


def create_app(service: Service):
    """The FastAPI application (module docstring); FastAPI is imported only here."""
    from pairfree.search.app import build_app

    return build_app(service)


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
