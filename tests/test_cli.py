import numpy as np
import pytest

from pairfree.cli import main
from pairfree.space import normalized
from pf_testing import unit


@pytest.fixture
def files(tmp_path, rng):
    t1 = unit(rng, 300, 16)
    np.save(tmp_path / "T1.npy", t1)
    np.save(tmp_path / "T2.npy", t1 @ rng.standard_normal((16, 12)).astype(np.float32))
    np.save(tmp_path / "V.npy", unit(rng, 200, 16))
    np.save(tmp_path / "A.npy", unit(rng, 150, 12))
    return tmp_path


def fit_args(d, out, *extra):
    return ["fit", "--space", "clip", f"text={d / 'T1.npy'}", f"image={d / 'V.npy'}",
            "--space", "clap", f"text={d / 'T2.npy'}", f"audio={d / 'A.npy'}",
            "--overlap", "text", "--out", str(out), "--batch-size", "64", "--quiet",
            "--cache-dir", str(d / "cache"), *extra]


def test_fit_then_embed(files, capsys):
    (files / "cfg.yaml").write_text("epochs: 3\nlam: 0.2\n")
    assert main(fit_args(files, files / "run", "--config", str(files / "cfg.yaml"), "--epochs", "2")) == 0
    saved = (files / "run" / "config.yaml").read_text()
    assert "epochs: 2" in saved and "lam: 0.2" in saved  # flag beats YAML beats default
    assert main(["embed", "--model", str(files / "run"), "--space", "clap", "--modality", "audio",
                 "--input", str(files / "A.npy"), "--output", str(files / "z.npy")]) == 0
    z = np.load(files / "z.npy")
    assert z.shape == (150, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)


def test_fit_a_training_free_method(files, capsys):
    """--method relative: the saved model embeds exactly what RelativeMap fitted in Python embeds; an
    existing model is not replaced without --restart, and --select is refused (nothing is trained)."""
    import pairfree as pf
    from pairfree.baselines import RelativeMap

    assert main(fit_args(files, files / "rel", "--method", "relative")) == 0
    assert sorted(p.name for p in (files / "rel").iterdir()) == ["model"]
    assert main(["embed", "--model", str(files / "rel"), "--space", "clap", "--modality", "audio",
                 "--input", str(files / "A.npy"), "--output", str(files / "z.npy")]) == 0
    x = pf.Space("clip", {"text": np.load(files / "T1.npy"), "image": np.load(files / "V.npy")})
    y = pf.Space("clap", {"text": np.load(files / "T2.npy"), "audio": np.load(files / "A.npy")})
    want = RelativeMap().fit(x, y, "text").embed("clap", "audio", y["audio"])
    np.testing.assert_allclose(np.load(files / "z.npy"), want, atol=1e-6)
    assert main(fit_args(files, files / "rel", "--method", "procrustes")) == 2
    assert "pass --restart" in capsys.readouterr().err
    assert main(fit_args(files, files / "rel", "--method", "procrustes", "--restart")) == 0
    # replacing a trained run leaves no config or checkpoints of the old model beside the new one
    assert main(fit_args(files, files / "run", "--epochs", "1")) == 0
    assert main(fit_args(files, files / "run", "--method", "relative", "--restart")) == 0
    assert sorted(p.name for p in (files / "run").iterdir()) == ["model"]
    assert main(fit_args(files, files / "rel2", "--method", "relative", "--select", "anchored")) == 2
    assert not (files / "rel2").exists()


def test_user_errors_exit_2_with_message(files, capsys):
    np.save(files / "bad.npy", np.zeros((4, 12), np.float32))
    args = fit_args(files, files / "run")
    args[args.index(f"audio={files / 'A.npy'}")] = f"audio={files / 'bad.npy'}"
    assert main(args) == 2
    assert "modality 'audio': row 0 is all zeros" in capsys.readouterr().err
    assert not (files / "run" / "model").exists()
    (files / "cfg.yaml").write_text("epochz: 3\n")
    assert main(fit_args(files, files / "run", "--config", str(files / "cfg.yaml"))) == 2
    assert "unknown CMCRConfig fields ['epochz']" in capsys.readouterr().err


def test_extend_then_embed(files, capsys):
    """Ex-MCR from the command line: the base passes through unchanged, the leaf is projected."""
    args = ["extend", "--base", "clip", f"image={files / 'V.npy'}", f"text={files / 'T1.npy'}",
            "--leaf", "clap:text", f"text={files / 'T2.npy'}", f"audio={files / 'A.npy'}",
            "--out", str(files / "ex"), "--epochs", "2", "--batch-size", "64", "--quiet",
            "--cache-dir", str(files / "pool"), "--passes", "T,A"]
    assert main(args) == 0
    assert "passes: overlap,leaf" in (files / "ex" / "config.yaml").read_text()
    for space, mod, src, dim in (("clap", "audio", "A.npy", 16), ("clip", "image", "V.npy", 16)):
        assert main(["embed", "--model", str(files / "ex"), "--space", space, "--modality", mod,
                     "--input", str(files / src), "--output", str(files / "z.npy")]) == 0
        z = np.load(files / "z.npy")
        assert z.shape == (len(np.load(files / src)), dim)
    np.testing.assert_array_equal(z, normalized(np.load(files / "V.npy"), "V"))  # the base, bit for bit
    bad = args[:]
    bad[bad.index("clap:text")] = "clap:image"
    assert main(bad) == 2
    assert "image" in capsys.readouterr().err


def test_every_commands_help_renders(capsys):
    """argparse %-formats help text: a "%" in an option's prose once broke `fit --help` and `extend --help`."""
    from pairfree.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"fit", "extend", "eval", "search"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage: pairfree" in capsys.readouterr().out


def test_fit_prints_the_measured_accuracy_of_approximate_pseudo_pairs(files, capsys):
    """An approximate aggregation's measured cosine to exact is shown on the terminal, one line per hop
    (the same figures as the model's report); exact hops print nothing."""
    import json

    assert main(fit_args(files, files / "exact", "--epochs", "1")) == 0
    assert "cosine to exact" not in capsys.readouterr().out
    assert main(fit_args(files, files / "ivf", "--epochs", "1", "--aggregation", "ivf",
                         "--aggregation-min-cosine", "0.99")) == 0
    out = capsys.readouterr().out
    reports = json.loads((files / "ivf" / "model" / "config.json").read_text())["aggregation"]
    assert len(reports) == 2 and "cosine to exact: mean / 1st pct / min" in out
    for hop, r in reports.items():
        c = r["cosine_to_exact"]
        line = next(x for x in out.splitlines() if x.startswith(hop))
        assert "ivf" in line and f"{c['mean']:.5f} / {c['p1']:.4f} / {c['min']:.4f}" in line, (line, r)
