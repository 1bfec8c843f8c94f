"""Search service load test and index build cost (README "Search").

1. `pairfree serve --demo` in a subprocess on loopback; text queries (random concept names) from 1, 4
   and 16 concurrent keep-alive clients, a fixed number of requests per level (bounded by a time
   limit): queries/s and p50 / p99 latency.
2. Index build time and memory per million vectors on synthetic clustered unit vectors (d = 512):
   exact (flat), HNSW and IVF-PQ (no re-ranking), measured at --n vectors and scaled per million
   (memory = the serialised index, what a memory map holds); recall@10 of the approximate ones
   against exact on 1,000 held-out queries from the same distribution.

    python benchmarks/serve.py [--requests 200] [--n 200000] [--out runs/bench/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(requests: int, max_seconds: float) -> list[dict]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pairfree.cli", "serve", "--demo", "--port", str(port), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the demo assets may be built on first use
            try:
                if httpx.get(f"{url}/indices-list", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start: " + (proc.stdout.read() if proc.stdout else ""))
        rows = []
        for clients in (1, 4, 16):
            latencies: list[float] = []
            lock = threading.Lock()
            deadline = time.perf_counter() + max_seconds
            per_client = max(1, requests // clients)
            rng = np.random.default_rng(clients)
            names = [f"c{i:03d}" for i in rng.integers(0, 100, size=requests)]

            def client(k: int) -> None:
                with httpx.Client(base_url=url, timeout=30) as c:
                    for j in range(per_client):
                        if time.perf_counter() > deadline:
                            return
                        t0 = time.perf_counter()
                        r = c.post("/knn-service", json={"indice_name": "toy", "text": names[(k * per_client + j) % len(names)],
                                                         "num_results": 10})
                        r.raise_for_status()
                        with lock:
                            latencies.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            lat = sorted(latencies)
            rows.append({"clients": clients, "requests": len(lat), "seconds": round(elapsed, 2),
                         "qps": round(len(lat) / elapsed, 1), "p50_ms": round(1000 * statistics.median(lat), 1),
                         "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)})
            print(f"  {clients:2d} clients: {rows[-1]}", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def clustered(n: int, d: int, rng: np.random.Generator, latent: int = 48, centres: int = 1000) -> np.ndarray:
    """Unit vectors with the neighbour structure of real embeddings: a clustered 48-d latent (1,000
    topics, each a Gaussian blob) mapped into d dims by a fixed random linear map, plus a little
    noise. Neighbours are then graded by latent distance; isotropic noise in 512 dims would make
    every point nearly equidistant from every other and top-10 meaningless. The map and topics are
    fixed (seed 1234) so that queries drawn later come from the same distribution."""
    fixed = np.random.default_rng(1234)
    w = fixed.standard_normal((latent, d)).astype(np.float32) / np.sqrt(latent)
    topics = fixed.standard_normal((centres, latent)).astype(np.float32) * 1.5
    z = topics[rng.integers(0, centres, size=n)] + rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ w + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ivfpq(d: int):
    """IVF1024,PQ64 as pairfree builds it: without the polysemous training index_factory turns on
    (codes ordered for Hamming filtering, which neither searches with; most of the build time)."""
    import faiss

    idx = faiss.index_factory(d, "IVF1024,PQ64", faiss.METRIC_INNER_PRODUCT)
    idx.do_polysemous_training = False
    return idx


def build_cost(n: int, d: int = 512) -> list[dict]:
    import faiss

    rng = np.random.default_rng(0)
    x = clustered(n, d, rng)
    q = clustered(1000, d, rng)
    exact_idx = faiss.IndexFlatIP(d)
    rows = []
    kinds = (("flat (exact)", lambda: faiss.IndexFlatIP(d), None),
             ("hnsw (M=32)", lambda: faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT), ("efSearch", (32, 64, 128))),
             ("ivfpq (IVF1024,PQ64)", lambda: ivfpq(d), ("nprobe", (8, 32, 128))))
    for name, make, knob in kinds:
        t0 = time.perf_counter()
        idx = make()
        if not idx.is_trained:
            idx.train(x[: min(n, 100_000)])
        idx.add(x)
        build_s = time.perf_counter() - t0
        size = len(faiss.serialize_index(idx))
        row = {"index": name, "n": n, "build_s": round(build_s, 2), "build_s_per_million": round(build_s * 1e6 / n, 1),
               "bytes_per_vector": round(size / n, 1), "MiB_per_million": round(size / n * 1e6 / 2**20, 1)}
        if knob is None:
            exact_idx = idx
        else:
            _, want = exact_idx.search(q, 10)
            param, values = knob
            row["recall@10"] = {}
            for v in values:
                faiss.ParameterSpace().set_index_parameter(idx, param, v)
                t0 = time.perf_counter()
                _, got = idx.search(q, 10)
                row["recall@10"][f"{param}={v}"] = round(float(np.mean([len(set(a) & set(b)) / 10
                                                                        for a, b in zip(want, got)])), 3)
                row[f"query_ms_{param}={v}"] = round(1000 * (time.perf_counter() - t0) / len(q), 3)
        rows.append(row)
        print(f"  {row}", flush=True)
    t0 = time.perf_counter()
    exact_idx.search(q, 10)
    rows[0]["query_ms"] = round(1000 * (time.perf_counter() - t0) / len(q), 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time limit per level")
    ap.add_argument("--n", type=int, default=200_000, help="synthetic vectors for the build-cost part")
    ap.add_argument("--out", default="runs/bench/serve.json")
    args = ap.parse_args()
    print(f"load test on loopback ({os.cpu_count()} CPUs):", flush=True)
    load = load_test(args.requests, args.max_seconds)
    print(f"index build on {args.n} synthetic 512-d vectors:", flush=True)
    build = build_cost(args.n)
    print("\n| clients | requests | queries/s | p50 ms | p99 ms |\n| ---: | ---: | ---: | ---: | ---: |")
    for r in load:
        print(f"| {r['clients']} | {r['requests']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} |")
    print("\n| index | build s / million | MiB / million | recall@10 against exact |\n| --- | ---: | ---: | --- |")
    for r in build:
        rec = ", ".join(f"{k}: {v}" for k, v in r["recall@10"].items()) if "recall@10" in r else "1 (exact)"
        print(f"| {r['index']} | {r['build_s_per_million']} | {r['MiB_per_million']} | {rec} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load": load, "build": build, "cpus": os.cpu_count(),
                                          "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
