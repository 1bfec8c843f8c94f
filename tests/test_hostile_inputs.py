"""Hostile and broken inputs (issue: hardening before growth). One test per defect: no code runs,
nothing outside the folder changes, the error names the file and the field, the CLI exits 2 with
one line and no traceback."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pairfree as pf
from pairfree.baselines import ProcrustesMap, RidgeMap
from pairfree.cli import main
from pairfree.config import ConfigError
from pairfree.space import SpaceError
from pairfree.store import EmbeddingStore, StoreError, StoreWriter, _read_manifest
from pf_testing import unit
from test_encode import SPEC, _images  # noqa: F401  (the `tiny` fixture registers SPEC)
from test_encode import tiny  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`pairfree ...` in a fresh interpreter, as a user runs it (stderr is a pipe, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "pairfree.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)


def assert_one_line_error(capsys_or_proc, rc: int, *needles: str) -> str:
    err = capsys_or_proc.stderr if hasattr(capsys_or_proc, "stderr") else capsys_or_proc.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. manifests cannot reach outside the store


def _store(path: Path, rng, n: int = 6) -> Path:
    w = StoreWriter(path, encoder=SPEC, modality="image", dim=8, shard_size=4)
    w.add([f"x{i}" for i in range(n)], unit(rng, n, 8))
    w.finish()
    return path


def _edit_manifest(store: Path, change) -> None:
    m = json.loads((store / "manifest.json").read_text())
    change(m)
    (store / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("target", ["../victim.txt", "ABSOLUTE"])
def test_manifest_cannot_make_encode_delete_outside(tmp_path, rng, tiny, capsys, target):  # noqa: F811
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = _store(tmp_path / "store", rng)
    name = str(victim) if target == "ABSOLUTE" else target
    _edit_manifest(store, lambda m: m.update(consolidated={"file": name, "rows": 6, "sha256": "0" * 64}))
    _images(tmp_path / "imgs", 2)
    rc = main(["encode", "--encoder", SPEC, "--modality", "image", str(tmp_path / "imgs"), "--out", str(store), "--quiet"])
    assert_one_line_error(capsys, rc, "manifest.json", "consolidated.file")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("inside", [False, True])
def test_errors_jsonl_symlink_is_not_followed(tmp_path, rng, tiny, capsys, inside):  # noqa: F811
    store = _store(tmp_path / "store", rng)
    victim = store / "shard-00000.npy" if inside else tmp_path / "victim.txt"
    if not inside:
        victim.write_text("precious")
    before = victim.read_bytes()
    (store / "errors.jsonl").symlink_to(victim)
    _images(tmp_path / "imgs", 2, bad=(1,))
    rc = main(["encode", "--encoder", SPEC, "--modality", "image", str(tmp_path / "imgs"), "--out", str(store), "--quiet"])
    assert_one_line_error(capsys, rc, "errors.jsonl", "symbolic link" if inside else "outside")
    assert victim.read_bytes() == before


@pytest.mark.parametrize("field,value", [("file", "../x.npy"), ("file", "/etc/passwd"), ("ids_file", "../ids.txt"),
                                         ("file", "manifest.json"), ("file", 7)])
def test_shard_names_are_confined(tmp_path, rng, field, value):
    store = _store(tmp_path / "store", rng)
    _edit_manifest(store, lambda m: m["shards"][0].update({field: value}))
    with pytest.raises(StoreError, match=rf"manifest.json: field 'shards\[0\].{field}'"):
        EmbeddingStore.open(store)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) |
                     st.text(max_size=12), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["format", "format_version", "encoder", "modality", "dim", "dtype", "count", "shards",
                            "errors", "consolidated", "complete"]), value=_JSON, shard_key=st.sampled_from(
    ["file", "ids_file", "rows", "sha256", "ids_sha256", None]))
def test_manifest_parsing_property(tmp_path_factory, key, value, shard_key):
    """Whatever a manifest field holds, reading it either succeeds with sane fields or raises
    StoreError naming manifest.json; never another exception, never a path outside the store."""
    rng = np.random.default_rng(0)
    store = _store(tmp_path_factory.mktemp("s") / "store", rng)

    def change(m):
        if shard_key is not None and key == "shards":
            m["shards"][0][shard_key] = value
        else:
            m[key] = value

    _edit_manifest(store, change)
    try:
        m = _read_manifest(store)
    except StoreError as e:
        assert "manifest.json" in str(e)
        return
    for s in m["shards"]:
        for k in ("file", "ids_file"):
            assert (store / s[k]).resolve().parent == store.resolve()
    assert isinstance(m["dim"], int) and m["dim"] > 0 and m["count"] == sum(s["rows"] for s in m["shards"])


# ------------------------------------------------------------------ 2. every embed validates its rows the same way


def _models(rng):
    clip = pf.Space("clip", {"text": unit(rng, 200, 16), "image": unit(rng, 150, 16)})
    clap = pf.Space("clap", {"text": clip["text"] @ unit(rng, 16, 12), "audio": unit(rng, 120, 12)})
    cfg = dict(epochs=1, batch_size=64)
    return {
        "cmcr": pf.CMCR(pf.CMCRConfig(**cfg)).fit(clip, clap, "text", progress=False),
        "exmcr": pf.ExMCR(pf.ExMCRConfig(**cfg)).fit(clip, {"clap": (clap, "text")}, progress=False),
        "ridge": RidgeMap().fit(clip, clap, "text"),
        "procrustes": ProcrustesMap().fit(clip, clap, "text"),
    }


def test_every_embed_refuses_bad_rows_the_same_way(rng, tmp_path):
    for name, model in _models(rng).items():
        x = unit(rng, 4, 12)
        for bad, msg in ((np.nan, r"row 2 contains NaN or inf"), (np.inf, r"row 2 contains NaN or inf"),
                         (0.0, r"row 2 is all zeros")):
            y = x.copy()
            y[2] = bad
            with pytest.raises(SpaceError, match=r"embed\('clap', 'audio'\): " + msg):
                model.embed("clap", "audio", y)
        with pytest.raises(SpaceError, match="expected floating-point embeddings, got dtype int64"):
            model.embed("clap", "audio", np.ones((3, 12), dtype=np.int64))
        np.save(tmp_path / "a.npy", x)  # a .npy path works for every model
        np.testing.assert_allclose(model.embed("clap", "audio", tmp_path / "a.npy"), model.embed("clap", "audio", x))
        assert model.embed("clap", "audio", np.zeros((0, 12), np.float32)).shape[0] == 0, name


# ------------------------------------------------------------------ 3. config values are typed and ranged


def _fit_files(d: Path, rng) -> list[str]:
    t1 = unit(rng, 300, 16)
    np.save(d / "T1.npy", t1)
    np.save(d / "T2.npy", t1 @ rng.standard_normal((16, 12)).astype(np.float32))
    np.save(d / "V.npy", unit(rng, 200, 16))
    np.save(d / "A.npy", unit(rng, 150, 12))
    return ["fit", "--space", "clip", f"text={d / 'T1.npy'}", f"image={d / 'V.npy'}",
            "--space", "clap", f"text={d / 'T2.npy'}", f"audio={d / 'A.npy'}", "--overlap", "text",
            "--batch-size", "64", "--epochs", "1", "--quiet", "--cache-dir", str(d / "cache")]


def test_yaml_values_are_coerced_or_refused(tmp_path, rng, capsys):
    args = _fit_files(tmp_path, rng)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nsemantic_consistency: 'false'\n")  # PyYAML reads both as strings
    assert main([*args, "--out", str(tmp_path / "ok"), "--config", str(cfg)]) == 0
    saved = (tmp_path / "ok" / "config.yaml").read_text()
    assert "lr: 0.001" in saved and "semantic_consistency: false" in saved
    model = pf.CMCR.load(tmp_path / "ok")
    assert model.config.lr == 0.001 and model.config.semantic_consistency is False
    assert "inter_pseudo" not in model.history[0]  # really trained without pseudo pairs
    for text, needle in (("epochs: ten\n", "'epochs': expected an integer >= 1, got 'ten'"),
                         ("epochs: 1.5\n", "CMCRConfig.epochs: expected an integer >= 1, got 1.5"),
                         ("semantic_consistency: maybe\n", "semantic_consistency: expected true or false, got 'maybe'"),
                         ("temperature: .inf\n", "temperature: expected a finite number > 0, got inf"),
                         ("projector: mlp9\n", "projector: expected one of ['mlp1', 'mlp2'], got 'mlp9'")):
        cfg.write_text(text)
        rc = main([*args, "--out", str(tmp_path / "bad"), "--config", str(cfg)])
        assert_one_line_error(capsys, rc, str(cfg), needle.split(":")[0].strip("'"), needle.split(": ", 1)[-1])
        assert not (tmp_path / "bad").exists()
    for flag, value, needle in (("--noise-variance", "-1", "expected a finite number >= 0, got '-1'"),
                                ("--temperature", "inf", "expected a finite number > 0, got 'inf'"),
                                ("--epochs", "1.5", "expected an integer >= 1, got '1.5'")):
        rc = main([*args, "--out", str(tmp_path / "bad"), flag, value])
        assert_one_line_error(capsys, rc, f"command line {flag}: {needle}")
    # a saved model whose config.json holds a wrong type
    meta = json.loads((tmp_path / "ok" / "model" / "config.json").read_text())
    meta["config"]["epochs"] = "ten"
    (tmp_path / "ok" / "model" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"ok/model/config.json: CMCRConfig.epochs: expected an integer >= 1, got 'ten'"):
        pf.CMCR.load(tmp_path / "ok")


@settings(max_examples=200, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["epochs", "lr", "lam", "semantic_completion", "projector", "out_dim",
                                               "tau1", "seed", "bn", "hidden_mult"]), _JSON, max_size=4))
def test_config_parsing_property(values):
    """Any mapping either builds a config whose every field has its declared type and range, or
    raises ConfigError naming the source and a field; nothing else escapes."""
    try:
        cfg = pf.CMCRConfig.from_dict(values, "c.yaml")
    except ConfigError as e:
        assert str(e).startswith("c.yaml: ") and "CMCRConfig." in str(e)
        return
    assert isinstance(cfg.epochs, int) and cfg.epochs >= 1 and not isinstance(cfg.epochs, bool)
    assert isinstance(cfg.lr, float) and np.isfinite(cfg.lr) and cfg.lr > 0
    assert isinstance(cfg.semantic_completion, bool) and cfg.projector in ("mlp1", "mlp2")
    assert cfg.out_dim is None or (isinstance(cfg.out_dim, int) and cfg.out_dim >= 1)


# ------------------------------------------------------------------ 4. a refused or failing run leaves the folder alone


def test_refused_or_failing_runs_leave_the_run_folder_alone(tmp_path, rng, capsys):
    args = _fit_files(tmp_path, rng)
    run = tmp_path / "run"
    assert main([*args, "--out", str(run)]) == 0
    before = snapshot(run)
    # a resume with other settings is refused: config.yaml still describes the model in the folder
    rc = main([*args, "--out", str(run), "--lam", "0.3"])
    assert_one_line_error(capsys, rc, "holds a model trained on other data or settings", "--restart")
    shutil_free = snapshot(run)
    assert shutil_free == before
    (run / "model" / "config.json").rename(run / "model" / "config.bak")  # only the checkpoint remains to refuse
    rc = main([*args, "--out", str(run), "--lam", "0.3"])
    assert_one_line_error(capsys, rc, "checkpoints/last.safetensors", "different data or settings")
    (run / "model" / "config.bak").rename(run / "model" / "config.json")
    assert snapshot(run) == before
    # --restart with an input error: nothing is deleted
    bad = [a.replace(str(tmp_path / "A.npy"), str(tmp_path / "missing.npy")) for a in args]
    rc = main([*bad, "--out", str(run), "--restart"])
    assert_one_line_error(capsys, rc, "missing.npy", "does not exist")
    assert snapshot(run) == before
    # a fit that fails validation creates no folder at all
    rc = main([*bad, "--out", str(tmp_path / "new")])
    assert rc == 2 and not (tmp_path / "new").exists()
    # --restart with valid inputs replaces everything consistently
    assert main([*args, "--out", str(run), "--restart", "--lam", "0.3"]) == 0
    assert "lam: 0.3" in (run / "config.yaml").read_text()
    assert pf.CMCR.load(run).config.lam == 0.3


# ------------------------------------------------------------------ 5. tampered model files


def _saved_cmcr(tmp_path, rng) -> Path:
    clip = pf.Space("clip", {"text": unit(rng, 100, 16), "image": unit(rng, 80, 16)})
    clap = pf.Space("clap", {"text": unit(rng, 100, 12), "audio": unit(rng, 60, 12)})
    pf.CMCR(pf.CMCRConfig(epochs=1, batch_size=32)).fit(clip, clap, "text", progress=False).save(tmp_path / "m")
    return tmp_path / "m"


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("dim,needle", [(16000, "checkpoint does not match the model"),
                                        (-4, "field 'dim' must be an embedding dimension"),
                                        ("16", "field 'dim' must be int"), (10**9, "must be an embedding dimension")])
def test_tampered_header_is_refused_before_allocating(tmp_path, rng, dim, needle):
    m = _saved_cmcr(tmp_path, rng)
    meta = json.loads((m / "config.json").read_text())
    meta["spaces"]["clip"]["dim"] = dim
    (m / "config.json").write_text(json.dumps(meta))
    peak = _rss_mib()
    with pytest.raises(ValueError, match=needle):
        pf.CMCR.load(m)
    assert _rss_mib() - peak < 500  # a 16000-d head would be 4 GB: nothing of the kind was allocated


def test_non_finite_weights_are_refused(tmp_path, rng):
    from safetensors.torch import load_file, save_file

    m = _saved_cmcr(tmp_path, rng)
    state = load_file(str(m / "model.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key].clone().fill_(float("nan"))
    save_file(state, str(m / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' holds NaN or infinite values"):
        pf.CMCR.load(m)
    official = {"Head1.weight": torch.eye(4), "Head1.bias": torch.zeros(4)}
    official["Head1.bias"][1] = float("inf")
    torch.save(official, tmp_path / "ex_clap.pt")
    with pytest.raises(ValueError, match=r"ex_clap.pt: tensor 'Head1.bias' holds NaN or infinite values"):
        pf.ExMCR.from_official(tmp_path / "ex_clap.pt", leaf="clap")


# ------------------------------------------------------------------ 6. one bad text file does not abort a text encode


def test_bad_text_files_go_to_errors_jsonl(tmp_path, tiny):  # noqa: F811
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("a dog barks\na cat\n")
    (d / "b_empty.txt").write_text("")
    (d / "c_blank.txt").write_text("  \n\t\n")
    (d / "d_latin1.txt").write_bytes("caf\xe9 au lait\nplain line\n".encode("latin-1"))
    (d / "e.jsonl").write_text('{"text": "rain on a roof"}\n{broken\n"thunder"\n')
    from pairfree.encode import encode

    res = encode([d], encoder=SPEC, modality="text", out=tmp_path / "s", progress=False)
    store = EmbeddingStore.open(tmp_path / "s")
    assert store.complete and sorted(store.ids) == sorted(
        [f"{d / 'a.txt'}#0", f"{d / 'a.txt'}#1", f"{d / 'd_latin1.txt'}#0", f"{d / 'e.jsonl'}#0", f"{d / 'e.jsonl'}#1"])
    errors = {e["id"]: e["reason"] for e in store.errors()}
    assert set(errors) == {str(d / "b_empty.txt"), str(d / "c_blank.txt"), f"{d / 'd_latin1.txt'}#line1",
                           f"{d / 'e.jsonl'}#line2"}
    assert "not UTF-8" in errors[f"{d / 'd_latin1.txt'}#line1"] and "not JSON" in errors[f"{d / 'e.jsonl'}#line2"]
    assert (res.encoded, res.errors) == (5, 4)


def test_all_unreadable_leaves_no_store(tmp_path, tiny, capsys):  # noqa: F811
    d = tmp_path / "texts"
    d.mkdir()
    (d / "x.txt").write_bytes(b"\xff\xfe\xfa")
    rc = main(["encode", "--encoder", SPEC, "--modality", "text", str(d), "--out", str(tmp_path / "s"), "--quiet"])
    assert_one_line_error(capsys, rc, "none of the 1 inputs could be read", "not UTF-8")
    assert not (tmp_path / "s").exists()
    w = StoreWriter(tmp_path / "empty", encoder="e", modality="text", dim=4)
    with pytest.raises(StoreError, match="no rows were added"):
        w.finish()
    assert not json.loads((tmp_path / "empty" / "manifest.json").read_text())["complete"]


# ------------------------------------------------------------------ 7. the CLI reads what the README says it reads


def test_cli_reads_stores_npz_and_npy_paths(tmp_path, rng, capsys):
    args = _fit_files(tmp_path, rng)
    w = StoreWriter(tmp_path / "img_store", encoder="clip", modality="image", dim=16, shard_size=64)
    V = np.load(tmp_path / "V.npy")
    w.add([f"v{i}" for i in range(len(V))], V)
    w.finish()
    np.savez(tmp_path / "A.npz", audio=np.load(tmp_path / "A.npy"))
    args = [a.replace(f"image={tmp_path / 'V.npy'}", f"image={tmp_path / 'img_store'}")
            .replace(f"audio={tmp_path / 'A.npy'}", f"audio={tmp_path / 'A.npz'}") for a in args]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    model = pf.CMCR.load(tmp_path / "run")
    np.testing.assert_allclose(model.embed("clip", "image", tmp_path / "img_store"), model.embed("clip", "image", V),
                               atol=1e-6)
    np.savez(tmp_path / "two.npz", a=V, b=V)
    with pytest.raises(SpaceError, match=r"two.npz holds 2 arrays \['a', 'b'\]; name one as .*two.npz:KEY"):
        pf.Space("x", {"image": tmp_path / "two.npz"})
    assert pf.Space("x", {"image": f"{tmp_path / 'two.npz'}:b"})["image"].shape == V.shape


# ------------------------------------------------------------------ 8. one-line errors instead of tracebacks


def test_cli_errors_are_one_line(tmp_path, rng, capsys):
    args = _fit_files(tmp_path, rng)
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "afile").write_text("x")
    for extra, needles in ((["--out", str(tmp_path / "afile")], ["afile", "is not a folder"]),
                           (["--out", str(tmp_path / "r2"), "--device", "foo"], ["device 'foo'", "not a torch device"]),
                           (["--out", str(tmp_path / "r2"), "--device", "cuda:0"], ["device 'cuda:0'"])):
        if extra[-1] == "cuda:0" and torch.cuda.is_available():
            continue
        assert_one_line_error(capsys, main([*args, *extra]), *needles)
    embed = ["embed", "--model", str(tmp_path / "run"), "--space", "clap", "--modality", "audio",
             "--input", str(tmp_path / "A.npy")]
    (tmp_path / "outdir").mkdir()
    assert_one_line_error(capsys, main([*embed, "--output", str(tmp_path / "outdir")]), "outdir", "is a folder")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = [*embed[:-1], str(tmp_path / "pickled.npy"), "--output", str(tmp_path / "z.npy")]
    assert_one_line_error(capsys, main(bad), "pickled.npy", "not a plain numeric")
    cfg = tmp_path / "run" / "model" / "config.json"
    cfg.write_text("{not json")
    assert_one_line_error(capsys, main([*embed, "--output", str(tmp_path / "z.npy")]), "config.json", "invalid JSON")
    # a tampered training checkpoint
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    cfg.unlink()
    assert_one_line_error(capsys, main([*args, "--out", str(tmp_path / "run")]), "last.safetensors",
                          "not a pairfree training checkpoint")


def test_debug_shows_the_traceback(tmp_path):
    done = run_cli("embed", "--model", str(tmp_path / "none"), "--space", "a", "--modality", "audio", "--input", "x.npy",
                   "--output", str(tmp_path / "z.npy"), "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "config.json missing" in done.stderr


def test_offline_hub_encoder_fails_fast(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    t0 = time.perf_counter()
    done = run_cli("encode", "--encoder", "hf-clip:openai/clip-vit-base-patch32", "--modality", "text",
                   str(tmp_path / "t.txt"), "--out", str(tmp_path / "s"), "--quiet", env=env)
    elapsed = time.perf_counter() - t0
    line = assert_one_line_error(done, done.returncode, "openai/clip-vit-base-patch32", "is not in the Hugging Face cache",
                                 "hf download")
    assert elapsed < 30, f"took {elapsed:.0f} s: {line}"  # the import of transformers is most of it
    assert not (tmp_path / "s").exists()


def test_refused_local_checkpoint_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "clip", "projection_dim": "x"}')
    (tmp_path / "t.txt").write_text("hello\n")
    done = run_cli("encode", "--encoder", f"hf-clip:{tmp_path / 'ckpt'}", "--modality", "text", str(tmp_path / "t.txt"),
                   "--out", str(tmp_path / "s"), "--quiet")
    assert_one_line_error(done, done.returncode, f"hf-clip checkpoint {tmp_path / 'ckpt'}", "cannot be loaded")


# ------------------------------------------------------------------ 9. broken cache entries are rebuilt


def test_broken_aggregation_cache_is_rebuilt(tmp_path, rng):
    from pairfree.memory import cached_aggregate

    q, m = unit(rng, 50, 8), unit(rng, 70, 8)
    good = np.array(cached_aggregate(tmp_path, q, m, tau=0.05))  # a copy: results come back memory-mapped
    (entry,) = tmp_path.glob("agg-*.npy")
    entry.write_bytes(entry.read_bytes()[:200])  # truncated
    np.testing.assert_array_equal(cached_aggregate(tmp_path, q, m, tau=0.05), good)
    np.save(entry, good[:10])  # wrong shape
    np.testing.assert_array_equal(cached_aggregate(tmp_path, q, m, tau=0.05), good)
    assert np.load(entry).shape == good.shape


# ------------------------------------------------------------------ 10-11. permissions follow the umask; caches go to the user cache


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, rng, mask):
    old = os.umask(mask)
    try:
        m = _saved_cmcr(tmp_path, rng)
        from pairfree.fileio import write_json

        write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(m.stat().st_mode) == 0o777 & ~mask
    for f in (m / "model.safetensors", m / "config.json", tmp_path / "r.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_caches_go_to_the_user_cache_not_the_working_folder(tmp_path, rng):
    args = [a for a in _fit_files(tmp_path, rng)]
    i = args.index("--cache-dir")
    del args[i : i + 2]
    work = tmp_path / "elsewhere"
    work.mkdir()
    cache = tmp_path / "usercache"
    done = subprocess.run([sys.executable, "-m", "pairfree.cli", *args, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=work, env={**os.environ, "PAIRFREE_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    assert list((cache / "aggregate").glob("agg-*.npy"))
    assert f"aggregation cache: {cache / 'aggregate'}" in (tmp_path / "run" / "config.yaml").read_text()
    helptext = run_cli("fit", "--help", env={"PAIRFREE_CACHE": str(cache)}).stdout
    assert str(cache / "aggregate") in "".join(helptext.split())  # argparse wraps long paths


# ------------------------------------------------------------------ 12. the thread count is part of what a resume checks; logs


def test_resume_with_another_thread_count_is_refused(tmp_path, rng):
    args = _fit_files(tmp_path, rng)
    run = ["--out", str(tmp_path / "run")]
    first = run_cli(*args, *run, "--threads", "1")
    assert first.returncode == 0, first.stderr
    (tmp_path / "run" / "model" / "config.json").unlink()  # as if killed after the last checkpoint
    again = run_cli(*args, *run, "--threads", "2")
    assert_one_line_error(again, again.returncode, "written with 1 CPU threads", "--threads 1")
    same = run_cli(*args, *run, "--threads", "1")
    assert same.returncode == 0, same.stderr


def test_progress_in_a_log_is_a_few_lines(tmp_path, rng):
    args = [a for a in _fit_files(tmp_path, rng) if a != "--quiet"]
    args[args.index("--epochs") + 1] = "6"
    done = run_cli(*args, "--out", str(tmp_path / "run"), "--batch-size", "16")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert any("C-MCR clip+clap: started" in line for line in lines) and any(": done" in line for line in lines)
    assert len(lines) <= 20, done.stderr
