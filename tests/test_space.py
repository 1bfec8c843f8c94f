import numpy as np
import pytest
import torch

import pairfree as pf
from pairfree.space import check_overlap
from pf_testing import unit


def test_normalises_and_keeps_memmap_without_copy(tmp_path, rng):
    x = rng.standard_normal((50, 8)).astype(np.float64) * 3
    s = pf.Space("s", {"text": x})
    assert s["text"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(s["text"], axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(s["text"], x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    u = unit(rng, 40, 8)
    np.save(tmp_path / "u.npy", u)
    s2 = pf.Space("s2", {"image": tmp_path / "u.npy", "text": torch.from_numpy(u)})
    assert isinstance(s2["image"], np.memmap)  # already unit float32: no copy
    assert s2.count("image") == 40 and s2.dim == 8


@pytest.mark.parametrize(
    "arr, msg",
    [
        (np.zeros((0, 4), np.float32), "empty"),
        (np.ones(4, np.float32), "2-D"),
        (np.array([[1.0, np.nan], [1, 0]], np.float32), "row 0 contains NaN"),
        (np.array([[1.0, 0], [np.inf, 0]], np.float32), "row 1 contains NaN or inf"),
        (np.array([[1.0, 0], [0, 0]], np.float32), "row 1 is all zeros"),
        (np.array([[1, 0]], np.int64), "floating-point"),
    ],
)
def test_bad_input_is_named(arr, msg):
    with pytest.raises(pf.SpaceError, match=msg) as e:
        pf.Space("clip", {"image": arr})
    assert "'clip'" in str(e.value) and "'image'" in str(e.value)


def test_mismatched_dims_and_overlap(rng, tmp_path):
    with pytest.raises(pf.SpaceError, match="different dimensions"):
        pf.Space("clip", {"image": unit(rng, 5, 8), "text": unit(rng, 5, 6)})
    a = pf.Space("a", {"text": unit(rng, 5, 8), "image": unit(rng, 3, 8)})
    b = pf.Space("b", {"text": unit(rng, 6, 4), "audio": unit(rng, 3, 4)})
    with pytest.raises(pf.SpaceError, match="not aligned: space 'a' has 5 rows, space 'b' has 6"):
        check_overlap(a, b, "text")
    with pytest.raises(pf.SpaceError, match="missing from space 'b'"):
        check_overlap(a, b, "image")
    with pytest.raises(pf.SpaceError, match="does not exist"):
        pf.Space("c", {"text": tmp_path / "nope.npy"})
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(pf.SpaceError, match="not a plain numeric"):
        pf.Space("c", {"text": tmp_path / "obj.npy"})
