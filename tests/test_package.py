"""The package: one version, `conceptevo --version`, an sdist and a wheel that install into a fresh venv and run the demo.

The build runs setuptools' PEP 517 hooks in this interpreter (what ``python -m build
--no-isolation`` does, without needing the ``build`` package or the network): the sdist
from a copy of the source tree, then the wheel from the unpacked sdist, so a file the sdist
forgot fails here. The fresh venv gets the wheel with ``--no-deps``; its dependencies
(torch first) come from this interpreter's site-packages through a ``.pth`` file, so torch
is not installed a second time. Unlike ``--system-site-packages``, that sees exactly this
environment's packages, whichever Python made it, and a plain path in a ``.pth`` file runs
none of that folder's own ``.pth`` files: the editable install of the checkout stays out,
and the new venv's own site-packages (the wheel) comes first on ``sys.path``.
"""
from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import conceptevo

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                              "artifacts", "demo-out", "out", ".hypothesis", ".whl", "*.pyc")


def test_the_version_is_written_in_one_place_and_the_command_says_it(capsys):
    from conceptevo.cli import main

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "conceptevo.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", conceptevo.__version__)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"conceptevo {conceptevo.__version__}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {conceptevo.__version__}" in changelog


def _hook(hook: str, src: Path, out: Path) -> Path:
    """Run a setuptools PEP 517 hook in ``src`` (in a subprocess: it changes the working folder's state)."""
    code = f"import sys; from setuptools import build_meta as b; print(b.{hook}(sys.argv[1]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src-copy"
    shutil.copytree(ROOT, src, ignore=SKIP)
    dist = tmp / "dist"
    dist.mkdir()
    sdist = _hook("build_sdist", src, dist)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    [unpacked] = (tmp / "unpacked").iterdir()
    wheel = _hook("build_wheel", unpacked, dist)
    return sdist, wheel


@pytest.mark.slow
def test_sdist_and_wheel_hold_the_package_its_data_and_metadata(built):
    sdist, wheel = built
    v = conceptevo.__version__
    assert sdist.name == f"conceptevo-{v}.tar.gz" and wheel.name == f"conceptevo-{v}-py3-none-any.whl"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for f in ("pyproject.toml", "README.md", "CHANGELOG.md", "src/conceptevo/py.typed",
              "src/conceptevo/explorer/static/index.html"):
        assert f in names, f
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        meta = email.message_from_bytes(z.read(f"conceptevo-{v}.dist-info/METADATA"))
        entry = z.read(f"conceptevo-{v}.dist-info/entry_points.txt").decode()
    assert {"conceptevo/py.typed", "conceptevo/explorer/static/index.html", "conceptevo/cli.py"} <= files
    assert not [f for f in files if f.startswith(("tests/", "bench/", "docs/"))]
    assert meta["Version"] == v
    assert {"vision", "text", "tensorboard", "wandb", "test"} <= set(meta.get_all("Provides-Extra"))
    assert "conceptevo = conceptevo.cli:main" in entry


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(built, tmp_path):
    _, wheel = built
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages (torch, numpy, ...) after the venv's own: nothing is installed twice
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "zz-dependencies.pth").write_text("".join(p + "\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"   # not the checkout: its src/ must not be what runs
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import conceptevo, torch; print(conceptevo.__file__); print(torch.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    pkg, torch_file = where.stdout.split()
    assert Path(pkg).is_relative_to(Path(site)), pkg
    assert not Path(torch_file).is_relative_to(env_dir), "torch was installed again"
    cli = env_dir / "bin" / "conceptevo"
    version = subprocess.run([str(cli), "--version"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == f"conceptevo {conceptevo.__version__}"
    demo = subprocess.run([str(cli), "demo", "--quick", "--out", str(tmp_path / "demo")], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    study = tmp_path / "demo" / "study"
    assert (study / "manifest.json").exists()
    assert {p.name for p in (study / "figures").glob("*.png")} >= {"space.png", "groups.png", "evolution.png"}
