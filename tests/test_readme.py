"""The README's Python API block runs as written (in a scratch folder, on the small toy world)."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no <!-- readme-example --> python block"
    return m.group(1)


def test_readme_python_block_runs(tmp_path, monkeypatch, capsys, request):
    code = readme_example()
    # the block builds the small world without a cache; give it the test session's cache instead
    cache = request.config.cache.mkdir("pairfree-cache") / "toy"
    code = code.replace('make_world(ToyWorldConfig(preset="small"))',
                        f'make_world(ToyWorldConfig(preset="small"), cache_dir={str(cache)!r}, progress=False)')
    assert "cache_dir=" in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAIRFREE_PROGRESS", "off")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    print(out)
    r1 = float(re.search(r"C-MCR audio->image R@1 ([0-9.]+)", out).group(1))
    assert r1 > 0.03  # chance is 1/400
    assert os.path.isdir(tmp_path / "runs" / "readme-cmcr")
    assert float(re.search(r"Ex-MCR audio->3D R@1 ([0-9.]+)", out).group(1)) > 0.01
