"""The tracked tree stays small enough to travel: a GPU job carries the tree, the training
dependencies and the training images in at most 64 MiB (docs/training.md has the budget)."""

import subprocess
from pathlib import Path

import pytest

from tests.factories import REPO_ROOT

TREE_LIMIT_MIB = 35


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO_ROOT / name for name in listed.decode().split("\0") if name]


def test_tracked_tree_is_at_most_35_mib():
    files = _tracked_files()
    total = sum(path.stat().st_size for path in files if path.is_file())
    largest = sorted(files, key=lambda p: p.stat().st_size if p.is_file() else 0)[-3:]
    assert total <= TREE_LIMIT_MIB * 2**20, (
        f"tracked tree is {total / 2**20:.1f} MiB, over {TREE_LIMIT_MIB} MiB; largest: "
        + ", ".join(f"{p.relative_to(REPO_ROOT)} ({p.stat().st_size / 2**20:.1f} MiB)" for p in largest))
