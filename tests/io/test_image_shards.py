"""Image files as compress input: grouped into shards per folder, one sample per file with a stable key."""

from ncpipe.io import image_shards
from ncpipe.io.image_shards import InputShard, input_shards, iter_shard_samples, with_grouping
from tests.helpers import put_bytes, tar_bytes


def test_image_files_are_grouped_per_folder_and_tar_shards_stay_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(image_shards, "IMAGES_PER_SHARD", 2)
    a, b, c, d = (str(tmp_path / name) for name in ("p/a.jpg", "p/b.jpg", "p/c.png", "q/d.jpg"))
    shard = str(tmp_path / "s.tar")
    assert input_shards([a, b, c, shard, d]) == [
        InputShard(str(tmp_path / "p/images-000000"), (a, b)),
        InputShard(str(tmp_path / "p/images-000001"), (c,)),
        InputShard(shard),
        InputShard(str(tmp_path / "q/images-000000"), (d,)),
    ]
    assert input_shards(["s3://b/x/a.jpg"]) == [InputShard("s3://b/x/images-000000", ("s3://b/x/a.jpg",))]


def test_each_file_is_a_sample_keyed_by_its_name(tmp_path):
    files = [str(tmp_path / name) for name in ("IMG.0001.JPG", "b.png", "b.jpg")]
    for i, url in enumerate(files):
        put_bytes(url, b"image %d" % i)
    group = str(tmp_path / "images-000000")
    samples = list(iter_shard_samples(group, (*files, str(tmp_path / "gone.png"))))
    assert [(s.key, [m.name for m in s.members], s.index) for s in samples] == [
        ("IMG_0001", ["IMG_0001.JPG"], 0), ("b", ["b.png"], 1), ("b", ["b.jpg"], 2), ("gone", [], 3),
    ]
    assert samples[0].members[0].data == b"image 0" and samples[0].members[0].extension == "jpg"
    assert samples[0].source_url == group and samples[0].error is None
    assert "duplicate key 'b'" in samples[2].error
    assert samples[3].error.startswith(f"cannot read {tmp_path / 'gone.png'}")


def test_a_tar_shard_reads_as_before(tmp_path):
    (tmp_path / "s.tar").write_bytes(tar_bytes([("k.jpg", b"x"), ("k.cls", b"1")]))
    (sample,) = iter_shard_samples(str(tmp_path / "s.tar"))
    assert sample.key == "k" and [m.name for m in sample.members] == ["k.jpg", "k.cls"]


def test_the_grouping_of_image_files_is_part_of_the_fingerprint():
    tars = [InputShard("s3://b/a.tar")]
    photos = [InputShard("/p/images-000000", ("/p/a.jpg", "/p/b.jpg"))]
    assert with_grouping("f" * 16, tars) == "f" * 16  # tar shards: fingerprints as before
    grouped = with_grouping("f" * 16, photos)
    assert grouped != "f" * 16 and len(grouped) == 16
    assert with_grouping("f" * 16, [InputShard("/p/images-000000", ("/p/0.jpg", "/p/a.jpg"))]) != grouped


def test_a_prefix_of_images_on_s3_reads_as_one_shard(s3_bucket):
    from ncpipe.io.urls import expand_inputs

    for name in ("p/b.jpg", "p/a.png", "p/notes.txt"):
        put_bytes(f"{s3_bucket}/{name}", name.encode())
    (shard,) = input_shards(expand_inputs([f"{s3_bucket}/p"]))
    assert shard == InputShard(f"{s3_bucket}/p/images-000000", (f"{s3_bucket}/p/a.png", f"{s3_bucket}/p/b.jpg"))
    samples = list(iter_shard_samples(shard.url, shard.files))
    assert [(s.key, s.members[0].name, s.members[0].data) for s in samples] == [
        ("a", "a.png", b"p/a.png"), ("b", "b.jpg", b"p/b.jpg")]
