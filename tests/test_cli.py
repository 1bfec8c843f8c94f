import numpy as np
import pytest

from pairfree.cli import main
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
