"""The built wheel stands on its own: installed into a fresh virtual environment outside the repository,
its command works with nothing from the source tree.

To stay fast and offline, the new environment gets the third-party dependencies by pointing a `.pth`
line at the test interpreter's site-packages (a plain path line: the editable install of this repository
that lives there is *not* activated, since `.pth` files inside an added path are not executed), and the
wheel itself is installed with `--no-deps`. The test then checks that `thalia_ray` is imported from the
new environment, not from the repository.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment (≈ 40 s on a loaded machine)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (building in place would leave build/ in the worktree)."""
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "thalia_ray", src / "thalia_ray", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"),
                  str(src)], cwd=work)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (work / "dist").glob("thalia_ray-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> tuple[Path, dict[str, str]]:
    """(bin folder, environment) of a fresh venv holding the installed wheel; runs happen outside the repo."""
    root = tmp_path_factory.mktemp("venv") / "env"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    assert made.returncode == 0, made.stderr
    site = Path(_run([str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root.parent).stdout.strip())
    (site / "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "THALIA_CRDS")}
    installed = _run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--no-deps",
                      "--no-index", str(wheel)], cwd=root.parent, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return root / "bin", env


def test_the_wheel_holds_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("thalia_ray/", "thalia_ray-")) for n in names), names
    assert "thalia_ray/py.typed" in names and "thalia_ray/cli.py" in names


def test_the_installed_command_works_outside_the_repository(venv, tmp_path):
    bin_dir, env = venv
    where = _run([str(bin_dir / "python"), "-c", "import thalia_ray; print(thalia_ray.__file__)"], tmp_path, env)
    assert where.stdout.startswith(str(bin_dir.parent)), where.stdout + where.stderr  # not the repository's copy
    command = str(bin_dir / "thalia-ray")

    assert "cluster" in _run([command, "--help"], tmp_path, env).stdout
    shown = _run([command, "config", "show", "--set", "train.lr=3e-4"], tmp_path, env)
    assert shown.returncode == 0 and "lr: 0.0003" in shown.stdout, shown.stderr

    synth = _run([command, "synth", "--out", str(tmp_path / "data"), "--frames", "1", "--size", "32",
                  "--max-groups", "2"], tmp_path, env)
    assert synth.returncode == 0, synth.stderr
    assert (tmp_path / "data" / "annotations.json").is_file() and list((tmp_path / "data").glob("*.zarr"))


def test_the_installed_command_validates_manifests_with_given_crds(venv, tmp_path, kuberay_crds):
    bin_dir, env = venv
    command = str(bin_dir / "thalia-ray")
    manifest = REPO / "cluster" / "kuberay" / "raycluster.yaml"
    valid = _run([command, "cluster", "validate", str(manifest), "--crds", str(kuberay_crds)], tmp_path, env)
    assert valid.returncode == 0 and "valid" in valid.stdout, valid.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest.read_text().replace("rayStartParams:", "rayStartParamz:", 1))
    refused = _run([command, "cluster", "validate", str(bad), "--crds", str(kuberay_crds)], tmp_path, env)
    assert refused.returncode == 5 and "rayStartParamz" in refused.stderr and "Traceback" not in refused.stderr
    absent = _run([command, "cluster", "validate", str(manifest)], tmp_path, env)  # no --crds, no THALIA_CRDS
    assert absent.returncode == 5 and "--crds PATH or THALIA_CRDS" in absent.stderr, absent.stderr
