"""One listing rule for local images: files, folders (recursive, sorted) and globs."""

from pathlib import Path

import pytest

from ncpipe.io.image_files import list_image_files
from ncpipe.io.urls import InputError


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    for name in ["b.png", "a.JPG", "sub/c.webp", "notes.txt", "sub/d.tar"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folder_is_searched_recursively_in_path_order(photos: Path) -> None:
    names = [p.relative_to(photos).as_posix() for p in list_image_files([photos])]
    assert names == ["a.JPG", "b.png", "sub/c.webp"]


def test_file_glob_and_limit(photos: Path) -> None:
    assert list_image_files([photos / "b.png"]) == [photos / "b.png"]
    assert list_image_files([f"{photos}/**/*.webp"]) == [photos / "sub" / "c.webp"]
    assert len(list_image_files([photos], limit=2)) == 2


def test_missing_root_and_imageless_folder_are_one_line_errors(photos: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        list_image_files([photos / "nowhere"])
    with pytest.raises(InputError, match="no image files"):
        list_image_files([f"{photos}/*.txt"])
