"""slmembed installs as a package: the wheel built from this tree carries the recipes, and a fresh virtual
environment with only that wheel installed loads every shipped recipe by name (no source checkout involved)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from slmembed.config import shipped_recipes

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path
import slmembed
from slmembed.cli import main
from slmembed.config import load_recipe, shipped_recipes

assert Path(slmembed.__file__).is_relative_to(sys.prefix), slmembed.__file__  # the wheel's copy, not the checkout
names = shipped_recipes()
for name in names:
    assert load_recipe(name).name, name
print(" ".join(names))
sys.exit(main(["train", "--recipe", "no-such-recipe", "--output", "x"]))
"""


def test_wheel_installs_into_a_fresh_venv_with_its_recipes(tmp_path) -> None:
    # Build from a copy of the tree so the build leaves nothing in the checkout; the locked setuptools builds it.
    src = tmp_path / "src-tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("slmembed-*.whl"))
    packed = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/recipes/" in n}
    assert packed == {f"{name}.yaml" for name in shipped_recipes()}

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    # slmembed's dependencies (torch, transformers, ...) come from this test's own path, less the checkout: its folders
    # go on the new environment's path without their .pth files, so an editable install of the checkout stays
    # invisible, and PYTHONPATH is unset.
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    checkout = {ROOT, ROOT / "src", ROOT / "tests"}
    deps = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() not in checkout]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.split() == shipped_recipes()
    assert proc.stderr.strip().startswith("slmembed: error: no recipe 'no-such-recipe'") and "gemma-2b" in proc.stderr
