"""3D inputs -> (N, 3) float32 xyz points (the item type of the 3d modality).

Formats: `.npy` (numeric (N, >=3) arrays, structured arrays with x/y/z fields, and the pickled
Objaverse record format read through `safe_pickle`), `.ply` (ascii, binary little/big endian;
vertices only = a point cloud, with faces = a mesh), `.obj` and `.off` (small built-in readers),
and any other mesh format `trimesh` reads (`.stl`, `.glb`, `.gltf`) when it is installed.
Meshes are sampled on their surface, area-weighted, with a seeded generator.
"""

from __future__ import annotations

import io

import numpy as np

from pairfree.media._common import MediaError, Source, label, missing_extra, read_bytes, suffix

POINT_EXTENSIONS = (".npy", ".ply", ".obj", ".off", ".stl", ".glb", ".gltf")

#: surface samples drawn from a mesh when `n_points` is not given (the Objaverse records hold 10000)
DEFAULT_MESH_POINTS = 10000


# ----------------------------------------------------------------------------- sampling helpers


def sample_points(points: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Exactly `n` rows of a point cloud: a seeded subset without replacement when there are
    enough points, otherwise all points followed by seeded duplicates."""
    if n <= 0:
        raise ValueError(f"n_points must be positive, got {n}")
    rng = np.random.default_rng(seed)
    m = len(points)
    if m == n:
        return points
    if m > n:
        return points[np.sort(rng.choice(m, size=n, replace=False))]
    return np.concatenate([points, points[rng.integers(0, m, size=n - m)]])


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` points uniformly distributed on a triangle mesh's surface (faces chosen by area)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = area.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("the mesh has zero surface area")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(f), size=n, p=area / total)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w0, w1, w2 = 1.0 - s, s * (1.0 - r2), s * r2
    pts = w0[:, None] * a[idx] + w1[:, None] * b[idx] + w2[:, None] * c[idx]
    return pts.astype(np.float32)


def _triangulate(polys: list[list[int]]) -> np.ndarray:
    tris = [(p[0], p[i], p[i + 1]) for p in polys if len(p) >= 3 for i in range(1, len(p) - 1)]
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


# ----------------------------------------------------------------------------- PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _read_ply(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(vertices (V, 3), triangles (F, 3) or None) from an ascii or binary PLY file."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise MediaError(f"{where}: not a PLY file (missing 'ply' magic or 'end_header')")
    nl = data.find(b"\n", end)
    body_start = len(data) if nl < 0 else nl + 1
    header = data[:end].decode("ascii", errors="replace").splitlines()
    fmt, elements = None, []  # elements: [name, count, [(prop, type) | (prop, ("list", count_t, item_t))]]
    for line in header[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append([tok[1], int(tok[2]), []])
        elif tok[0] == "property":
            if not elements:
                raise MediaError(f"{where}: PLY property before any element")
            if tok[1] == "list":
                elements[-1][2].append((tok[4], ("list", _PLY_TYPES[tok[2]], _PLY_TYPES[tok[3]])))
            else:
                elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise MediaError(f"{where}: unsupported PLY format {fmt!r}")
    vertices, faces = None, None
    if fmt == "ascii":
        tokens = data[body_start:].split()
        pos = 0
        for name, count, props in elements:
            if all(not isinstance(t, tuple) for _, t in props):
                k = len(props)
                block = np.array(tokens[pos : pos + count * k], dtype=np.float64)
                if block.size != count * k:
                    raise MediaError(f"{where}: PLY element {name!r} is truncated")
                table = block.reshape(count, k)
                pos += count * k
                if name == "vertex":
                    cols = [p for p, _ in props]
                    vertices = table[:, [cols.index(c) for c in ("x", "y", "z")]]
            else:
                rows = []
                for _ in range(count):
                    row = []
                    for pname, t in props:
                        if isinstance(t, tuple):
                            n = int(tokens[pos])
                            row.append([int(x) for x in tokens[pos + 1 : pos + 1 + n]])
                            pos += 1 + n
                        else:
                            pos += 1
                    rows.append(row)
                if name == "face":
                    li = [i for i, (_, t) in enumerate(props) if isinstance(t, tuple)][0]
                    faces = _triangulate([r[li] for r in rows])
                if pos > len(tokens):
                    raise MediaError(f"{where}: PLY element {name!r} is truncated")
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        buf = memoryview(data)[body_start:]
        pos = 0
        for name, count, props in elements:
            if all(not isinstance(t, tuple) for _, t in props):
                dt = np.dtype([(p, order + t) for p, t in props])
                nbytes = dt.itemsize * count
                if pos + nbytes > len(buf):
                    raise MediaError(f"{where}: PLY element {name!r} is truncated")
                table = np.frombuffer(buf[pos : pos + nbytes], dtype=dt, count=count)
                pos += nbytes
                if name == "vertex":
                    vertices = np.stack([table[c].astype(np.float64) for c in ("x", "y", "z")], axis=1)
            else:
                polys = []
                for _ in range(count):
                    for pname, t in props:
                        if isinstance(t, tuple):
                            ct, it = np.dtype(order + t[1]), np.dtype(order + t[2])
                            if pos + ct.itemsize > len(buf):
                                raise MediaError(f"{where}: PLY element {name!r} is truncated")
                            n = int(np.frombuffer(buf[pos : pos + ct.itemsize], dtype=ct)[0])
                            pos += ct.itemsize
                            if pos + n * it.itemsize > len(buf):
                                raise MediaError(f"{where}: PLY element {name!r} is truncated")
                            items = np.frombuffer(buf[pos : pos + n * it.itemsize], dtype=it, count=n)
                            pos += n * it.itemsize
                            if name == "face":
                                polys.append(items.astype(np.int64).tolist())
                        else:
                            pos += np.dtype(t).itemsize
                if name == "face":
                    faces = _triangulate(polys)
    if vertices is None:
        raise MediaError(f"{where}: PLY file has no vertex element with x, y, z")
    return vertices, (faces if faces is not None and len(faces) else None)


# ----------------------------------------------------------------------------- OBJ / OFF


def _read_obj(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    verts, polys = [], []
    for raw in data.decode("utf-8", errors="replace").splitlines():
        tok = raw.split()
        if not tok:
            continue
        if tok[0] == "v":
            verts.append([float(x) for x in tok[1:4]])
        elif tok[0] == "f":
            idx = []
            for t in tok[1:]:
                i = int(t.split("/")[0])
                idx.append(i - 1 if i > 0 else len(verts) + i)  # 1-based; negative = relative
            polys.append(idx)
    if not verts:
        raise MediaError(f"{where}: OBJ file has no vertices")
    return np.asarray(verts, dtype=np.float64), (_triangulate(polys) if polys else None)


def _read_off(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    lines = [ln.split("#")[0].strip() for ln in data.decode("utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("OFF"):
        raise MediaError(f"{where}: not an OFF file (missing 'OFF' header)")
    first = lines[0][3:].split()  # some writers put the counts on the OFF line itself
    rest = lines[1:]
    counts = first if first else rest.pop(0).split()
    nv, nf = int(counts[0]), int(counts[1])
    if len(rest) < nv + nf:
        raise MediaError(f"{where}: OFF file is truncated ({nv} vertices and {nf} faces declared)")
    verts = np.array([[float(x) for x in rest[i].split()[:3]] for i in range(nv)], dtype=np.float64)
    polys = []
    for i in range(nv, nv + nf):
        tok = rest[i].split()
        n = int(tok[0])
        polys.append([int(x) for x in tok[1 : 1 + n]])
    return verts, (_triangulate(polys) if polys else None)


def _read_trimesh(data: bytes, ext: str, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        import trimesh
    except ImportError as e:
        raise missing_extra("trimesh", f"reading {ext} meshes") from e
    try:
        mesh = trimesh.load(io.BytesIO(data), file_type=ext.lstrip("."), force="mesh", process=False)
    except Exception as e:
        raise MediaError(f"{where}: trimesh cannot read it ({type(e).__name__}: {e})") from e
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    return np.asarray(mesh.vertices, dtype=np.float64), (faces if len(faces) else None)


# ----------------------------------------------------------------------------- public


def _points_from_npy(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype.names:
        missing = [c for c in ("x", "y", "z") if c not in arr.dtype.names]
        if missing:
            raise MediaError(f"{where}: structured array has no fields {missing} (fields: {list(arr.dtype.names)})")
        return np.stack([arr[c] for c in ("x", "y", "z")], axis=-1).reshape(-1, 3)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise MediaError(f"{where}: expected a numeric (N, 3) array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise MediaError(f"{where}: expected an (N, 3) or (N, >=3) point array, got shape {arr.shape}")
    return arr[:, :3]


def load_points(
    src: Source, n_points: int | None = None, *, seed: int = 0, name: str | None = None
) -> np.ndarray:
    """Read a point cloud or mesh as (N, 3) float32 xyz.

    `n_points=None` keeps every point of a point cloud and samples `DEFAULT_MESH_POINTS` from a
    mesh; an integer returns exactly that many (see `sample_points` / `sample_surface`), seeded.
    """
    from pairfree.media.objaverse import is_record, record_from_array

    where = label(src, name)
    ext = suffix(src, name)
    data = read_bytes(src, name)
    faces = None
    try:
        if ext == ".npy" or data[:6] == b"\x93NUMPY":
            from pairfree.media.safe_pickle import load_npy

            arr = load_npy(data, name=where)
            if arr.dtype.hasobject:
                if not is_record(arr):
                    raise MediaError(f"{where}: object array is not an Objaverse record (a dict with 'xyz')")
                pts = record_from_array(arr, where)["xyz"]
            else:
                pts = _points_from_npy(arr, where)
            verts = np.asarray(pts, dtype=np.float64)
        elif ext == ".ply" or data[:3] == b"ply":
            verts, faces = _read_ply(data, where)
        elif ext == ".obj":
            verts, faces = _read_obj(data, where)
        elif ext == ".off" or data[:3] == b"OFF":
            verts, faces = _read_off(data, where)
        elif ext in (".stl", ".glb", ".gltf"):
            verts, faces = _read_trimesh(data, ext, where)
        else:
            raise MediaError(f"{where}: unknown 3D format {ext or '(no extension)'}; expected one of {POINT_EXTENSIONS}")
    except MediaError:
        raise
    except ImportError:
        raise
    except Exception as e:  # malformed numbers, bad indices, ...
        raise MediaError(f"{where}: cannot parse ({type(e).__name__}: {e})") from e
    if len(verts) == 0:
        raise MediaError(f"{where}: no points")
    if not np.isfinite(verts).all():
        raise MediaError(f"{where}: contains NaN or infinite coordinates")
    if faces is not None:
        if faces.min() < 0 or faces.max() >= len(verts):
            raise MediaError(f"{where}: face indices out of range for {len(verts)} vertices")
        try:
            return sample_surface(verts, faces, n_points or DEFAULT_MESH_POINTS, seed)
        except ValueError as e:
            raise MediaError(f"{where}: {e}") from e
    pts = verts.astype(np.float32)
    if n_points is not None:
        pts = sample_points(pts, n_points, seed)
    return np.ascontiguousarray(pts, dtype=np.float32)
