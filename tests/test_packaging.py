"""The wheel is usable outside the checkout: it carries every ncpipe package, the default model and the
demo's sample shards (mapped from models/ and samples/, one copy in the tree)."""

import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from setuptools import find_packages

from ncpipe.config import DEFAULT_MODEL
from tests.factories import REPO_ROOT

SETUPTOOLS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PROBE = (
    "import ncpipe, pathlib\n"
    "from ncpipe.models.registry import resolve_model\n"
    "from ncpipe.resources import demo_shards_dir\n"
    "print(pathlib.Path(ncpipe.__file__).parent)\n"
    f"print(resolve_model({DEFAULT_MODEL!r}).checkpoint)\n"
    "print(sorted(p.name for p in demo_shards_dir().glob('*.tar')))\n"
)


def test_every_ncpipe_package_is_listed():
    listed = set(SETUPTOOLS["packages"]) - set(SETUPTOOLS["package-dir"])
    assert listed == set(find_packages(str(REPO_ROOT), include=["ncpipe", "ncpipe.*"]))


def test_the_default_model_is_package_data():
    assert SETUPTOOLS["package-data"]["ncpipe.shipped.models"] == [f"{DEFAULT_MODEL}/*"]
    assert (REPO_ROOT / SETUPTOOLS["package-dir"]["ncpipe.shipped.models"] / DEFAULT_MODEL / "card.json").is_file()


def _source_tree(root):
    """What the wheel is built from, copied (the build writes build/ beside pyproject.toml)."""
    root.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, root / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("ncpipe", f"models/{DEFAULT_MODEL}", "samples/shards"):
        shutil.copytree(REPO_ROOT / folder, root / folder, ignore=ignore)
    return root


@pytest.mark.slow
def test_the_wheel_runs_outside_the_checkout(tmp_path):
    source = _source_tree(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ncpipe-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env={"PYTHONPATH": str(site)},
                            capture_output=True, text=True, check=True)
    package, checkpoint, shards = result.stdout.strip().splitlines()[-3:]
    assert package == str(site / "ncpipe")
    assert checkpoint == str(site / "ncpipe" / "shipped" / "models" / DEFAULT_MODEL / "model.pt")
    assert shards == "['sample-000000.tar', 'sample-000001.tar']"
