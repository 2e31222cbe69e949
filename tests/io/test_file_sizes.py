"""file_sizes: every file's size from one listing, locally and on S3, temporaries left out."""

from ncpipe.io.storage import file_sizes, list_files, write_bytes_atomic
from ncpipe.io.urls import join_url


def test_sizes_from_one_listing_match_the_files(storage_root):
    for name, size in (("a.tar", 3), ("sub/b.tar", 5), ("c.json", 7)):
        write_bytes_atomic(join_url(storage_root, name), b"x" * size)
    sizes = file_sizes(storage_root, suffix=".tar")
    assert sorted(sizes) == list_files(storage_root, suffix=".tar")
    assert sorted(sizes.values()) == [3, 5]
    assert file_sizes(join_url(storage_root, "missing")) == {}
