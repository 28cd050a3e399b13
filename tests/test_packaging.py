"""Packaging: the top-level ``kernels/`` folder is ours only as ``embedattn.kernels``.

Hugging Face's ``kernels`` package (which transformers imports) must win ``import kernels`` from the
repository root too, and a wheel built from the tree must carry the kernels as ``embedattn/kernels``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd: pathlib.Path, python: str = sys.executable) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_kernels_folder_is_not_a_regular_package():
    # an __init__.py would make the folder outrank every installed `kernels` when the root is on sys.path
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "embedattn" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_import_kernels_from_root_is_hugging_face():
    pytest.importorskip("kernels")
    where = _run("import kernels; print(kernels.__file__)", ROOT)
    assert "site-packages" in where and not where.startswith(str(ROOT / "kernels")), where
    # transformers' hub-kernels integration reaches names only Hugging Face's package has
    assert _run("from kernels import CUDAProperties; import transformers.integrations.hub_kernels; print('ok')",
                ROOT) == "ok"


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_embedattn_kernels_import(cwd, tmp_path):
    where = _run("import embedattn.kernels.attention as a; print(a.__file__)", ROOT if cwd == "root" else tmp_path)
    assert pathlib.Path(where).resolve() == (ROOT / "kernels" / "attention.py").resolve()


def test_wheel_carries_kernels_and_imports_outside_the_tree(tmp_path):
    """Build a wheel from the tree, install it into a fresh venv and import the kernels from outside the tree."""
    pytest.importorskip("triton")
    # a copy of what git tracks (links kept as links): setuptools builds in the tree it is given
    src = tmp_path / "src"
    src.mkdir()
    for entry in ("pyproject.toml", "MANIFEST.in", "README.md", "embedattn", "kernels"):
        if (ROOT / entry).is_dir():
            shutil.copytree(ROOT / entry, src / entry, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / entry, src / entry)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("embedattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    ours = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("embedattn/kernels/")) == ours
    assert not any(n.startswith("kernels/") for n in names)
    # package data: the word2vec C trainer's source (built at first use) and the tuned-config tables
    assert "embedattn/word2vec/_w2v.c" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    # torch and triton come from this environment, after the fresh venv's own site-packages (which holds the
    # wheel's embedattn); a path in a .pth line does not run that folder's own .pth files (the editable hook)
    fresh_site = _run("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, py)
    (pathlib.Path(fresh_site) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run("import embedattn.kernels.attention as a, embedattn; print(a.__file__)", tmp_path, py)
    assert where.startswith(fresh_site), where
