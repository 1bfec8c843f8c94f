"""benchmarks/gpu.sh's own logic, on a CPU: a lent GPU is minutes, so the wrapper must pass the options
through and install `--wheels` (faiss: the device image has none) before the first call. A stand-in
`python3` answers the CUDA check and reports what gpu.py would have been given; pip is the real one."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheel(folder: Path) -> Path:
    """A minimal wheel of a module named `faiss` (what --wheels would carry)."""
    path = folder / "faiss-0.0.1-py3-none-any.whl"
    files = {"faiss/__init__.py": "FROM_WHEEL = True\n",
             "faiss-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: faiss\nVersion: 0.0.1\n",
             "faiss-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["faiss-0.0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + "faiss-0.0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_gpu_sh_installs_wheels_and_passes_the_options(tmp_path):
    bin_dir, wheels = tmp_path / "bin", tmp_path / "wheels"
    bin_dir.mkdir()
    wheels.mkdir()
    _wheel(wheels)
    stand_in = bin_dir / "python3"
    stand_in.write_text(f"""#!/usr/bin/env bash
if [[ "$*" == *"cuda.is_available"* ]]; then echo "stand-in GPU"; exit 0; fi
if [[ "$1" == benchmarks/gpu.py ]]; then
  echo "gpu.py given: $*"
  exec {sys.executable} -c "import faiss; print('faiss from the wheel:', getattr(faiss, 'FROM_WHEEL', False))"
fi
exec {sys.executable} "$@"
""")
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--memory", "10", "--wheels", str(wheels),
                          "--queries", "5"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stand-in GPU" in run.stdout
    assert "gpu.py given: benchmarks/gpu.py --device cuda --memory 10 --queries 5" in run.stdout
    assert "faiss from the wheel: True" in run.stdout and "faiss is not importable" not in run.stdout
    # without --wheels, faiss is this interpreter's, if it has one; if not, the script says the IVF parts
    # will be skipped, and goes on
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "gpu.py given: benchmarks/gpu.py --device cuda\n" in run.stdout
    has_faiss = importlib.util.find_spec("faiss") is not None
    assert ("faiss is not importable: the IVF parts will be skipped" in run.stdout) == (not has_faiss), run.stdout
    assert ("faiss from the wheel: False" in run.stdout) == has_faiss, run.stdout
