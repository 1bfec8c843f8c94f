"""The FastAPI application of `pairfree serve` (endpoints: `pairfree.search.service`). Imported only
when serving, so the library does not need FastAPI; no `from __future__ import annotations` here,
because FastAPI reads the endpoint annotations at runtime."""

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from pairfree.media import MediaError
from pairfree.search.query import MAX_K, QueryError, modality_of_file
from pairfree.search.service import _MAGIC, CONTENT_TYPES, STATIC, WEB, Service


class KnnRequest(BaseModel):
    """A JSON query, as clip-retrieval's knn service takes it (plus `id` and target modalities)."""

    indice_name: str
    text: Optional[str] = Field(None, max_length=2000)
    embedding_input: Optional[List[float]] = None
    id: Optional[str] = None
    id_modality: Optional[str] = None
    modalities: Optional[List[str]] = None
    num_results: int = Field(10, ge=1, le=MAX_K)


def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="pairfree search", docs_url="/docs", redoc_url=None)

    async def answer(fn, *args):
        try:
            return await asyncio.wait_for(run_in_threadpool(fn, *args), timeout=service.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the query took longer than {service.timeout_s:g} s") from None
        except (QueryError, MediaError) as e:
            raise HTTPException(422, str(e)) from None
        except HTTPException:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise HTTPException(400, str(e).strip('"')) from None

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # the server keeps serving
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((WEB / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name])

    @app.get("/indices-list")
    async def indices_list():
        return sorted(service.searchers)

    @app.get("/indices/{name}")
    async def index_info(name: str):
        s = service.searcher(name)
        info = s.index.info
        return {"name": name, "modalities": {m: {"count": e["count"], "kind": e["kind"], "recall@10": e.get("recall@10")}
                                            for m, e in info["modalities"].items()},
                "query_modalities": list(s.model.modalities) if s.model is not None else [],
                "dim": s.index.dim, "model": {k: v for k, v in info["model"].items() if k != "meta"}}

    @app.post("/knn-service")
    async def knn(req: KnnRequest):
        given = [k for k in ("text", "embedding_input", "id") if getattr(req, k) is not None]
        if len(given) != 1:
            raise HTTPException(422, f"give exactly one of text, embedding_input, id (got {given or 'none'})")
        if req.text is not None:
            if not req.text.strip():
                raise HTTPException(422, "text is empty")
            query: Any = {"text": req.text}
        elif req.embedding_input is not None:
            query = {"embedding": req.embedding_input}
        else:
            query = {"id": req.id, "modality": req.id_modality}
        return await answer(service.query, req.indice_name, query, req.modalities, req.num_results)

    @app.post("/knn-service/upload")
    async def knn_upload(request: Request, file: UploadFile = File(...), indice_name: str = Form(...),
                         modalities: str = Form(""), num_results: int = Form(10), modality: str = Form("")):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > service.max_upload_bytes + (64 << 10):
            raise HTTPException(413, f"upload larger than {service.max_upload_bytes} bytes")
        if not 1 <= num_results <= MAX_K:
            raise HTTPException(422, f"num_results must be in [1, {MAX_K}]")
        name = os.path.basename(file.filename or "")
        try:
            mod = modality or modality_of_file(name)
        except QueryError as e:
            raise HTTPException(415, str(e)) from None
        if mod not in CONTENT_TYPES:
            raise HTTPException(415, f"uploads are images, audio or 3D files, not {mod!r}")
        ctype = (file.content_type or "application/octet-stream").lower()
        if ctype != "application/octet-stream" and not ctype.startswith(CONTENT_TYPES[mod]):
            raise HTTPException(415, f"content type {ctype!r} does not fit a {mod} file ({name})")
        data = await file.read(service.max_upload_bytes + 1)
        if len(data) > service.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {service.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, f"{name}: empty upload")
        if mod in _MAGIC and not data.startswith(_MAGIC[mod]):
            raise HTTPException(415, f"{name}: the content is not in a known {mod} format")
        suffix = Path(name).suffix.lower()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"upload{suffix}"
            path.write_bytes(data)
            mods = [m for m in modalities.split(",") if m] or None
            return await answer(service.query, indice_name, {"file": path}, mods, num_results, mod)

    @app.get("/media/{name}/{modality}/{row}")
    async def media(name: str, modality: str, row: str):
        return FileResponse(service.media_path(name, modality, row))

    @app.get("/preview/{name}/{modality}/{row}")
    async def preview(name: str, modality: str, row: str):
        path = service.media_path(name, modality, row)
        if modality != "3d":
            raise HTTPException(404, "previews are for 3D items")
        from pairfree.media import load_points

        def points():
            pts = load_points(path)
            idx = np.linspace(0, len(pts) - 1, min(len(pts), 600)).astype(int)
            return {"points": np.round(pts[idx], 4).tolist()}

        return await answer(points)

    return app


