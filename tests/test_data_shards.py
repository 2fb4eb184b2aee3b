"""`skd shard`: image folder → shards + dataset.json + samples.npz; --index-only; the digits source."""
import hashlib
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from skd.data import DatasetInfo, DatasetInfoError, SampleIndex, digits_shards
from skd.data.sample_index import EXT_NAMES, scan_shard
from skd.data.shard_cmd import main as shard_main
from skd.data.shard_writer import encode_image

PER_CLASS = 6  # 10 classes x 6 real digit images


def _digit_png(img8, size=16, fmt="PNG"):
    img = Image.fromarray(np.uint8(img8 * 255 / 16)).resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root, per_class=PER_CLASS, size=16):
    """ImageFolder of real sklearn digits: root/digit_k/NN.png (every third one a JPEG)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    truth = {}
    for k in range(10):
        folder = root / f"digit_{k}"
        folder.mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(d.target == k)[:per_class]):
            ext, fmt = ("jpg", "JPEG") if n % 3 == 2 else ("png", "PNG")
            (folder / f"{n:02d}.{ext}").write_bytes(_digit_png(d.images[i], size, fmt))
            truth[f"digit_{k}/{n:02d}.{ext}"] = k
    return truth


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    make_image_folder(root)
    return root


def test_folder_to_shards_round_trip(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert shard_main([str(folder), str(out), "--max-per-shard", "25", "--workers", "2", "--no-progress",
                       "--keep-order"]) == 0
    info = DatasetInfo.load(out)
    assert info.num_samples == 10 * PER_CLASS and info.num_classes == 10
    assert info.class_names == [f"digit_{k}" for k in range(10)]
    assert [s.name for s in info.shards] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert [s.num_samples for s in info.shards] == [25, 25, 10]
    assert list(info.shard_offsets) == [0, 25, 50, 60]
    # Keys are the global ids, images keep their real format, labels follow sorted class folders.
    index = SampleIndex.load(out)
    with tarfile.open(out / "data-000001.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000025.cls", "000000025.jpg"] or names[:2] == ["000000025.cls", "000000025.png"]
    assert list(index.labels) == [k for k in range(10) for _ in range(PER_CLASS)]
    for sid in (0, 2, 31, 59):  # random access returns the original file bytes
        k, n = divmod(sid, PER_CLASS)
        ext = "jpg" if n % 3 == 2 else "png"
        assert EXT_NAMES[index["image_ext"][sid]] == ext
        assert index.read_image_bytes(sid) == (folder / f"digit_{k}" / f"{n:02d}.{ext}").read_bytes()
    # The arithmetic offsets written with the shards equal a scan of the tar files.
    for i, shard in enumerate(info.shards):
        scanned = scan_shard(out / shard.name, i)
        lo, hi = info.shard_offsets[i], info.shard_offsets[i + 1]
        for key, column in scanned.items():
            assert np.array_equal(np.asarray(index[key][lo:hi]), column), key
    assert "60 samples, 10 classes, 3 shards" in capsys.readouterr().out


def test_shards_readable_by_webdataset(folder, tmp_path):
    import webdataset as wds
    shard_main([str(folder), str(tmp_path), "--max-per-shard", "40", "--workers", "1", "--no-progress",
                "--keep-order"])
    ds = wds.WebDataset(str(tmp_path / "data-{000000..000001}.tar"), shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(60)]
    assert all(int(s["cls"]) == i // PER_CLASS for i, s in enumerate(samples))


def test_default_order_is_a_seeded_shuffle_that_mixes_classes(folder, tmp_path):
    by_bytes = {p.read_bytes(): int(p.parent.name.split("_")[1]) for p in folder.rglob("*.*")}
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        shard_main([str(folder), str(tmp_path / name), "--max-per-shard", "25", "--workers", "1",
                    "--no-progress", "--seed", seed])
        index = SampleIndex.load(tmp_path / name)
        runs[name] = [index.read_image_bytes(i) for i in range(len(index))]
        labels = list(index.labels)
        # Every image once, under its own class's label, in an order that is not class-sorted.
        assert sorted(runs[name]) == sorted(by_bytes)
        assert labels == [by_bytes[b] for b in runs[name]]
        assert labels != sorted(labels)
        assert len(set(labels[:25])) >= 8  # the first shard holds most classes, not two
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_byte_identical_shards(folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shard_main([str(folder), str(a), "--max-per-shard", "16", "--workers", "2", "--no-progress"])
    shard_main([str(folder), str(b), "--max-per-shard", "16", "--workers", "1", "--no-progress"])
    assert _digest(a) == _digest(b)
    c, d = tmp_path / "c", tmp_path / "d"  # deterministic re-encoding too
    shard_main([str(folder), str(c), "--max-side", "12", "--quality", "80", "--workers", "2", "--no-progress"])
    shard_main([str(folder), str(d), "--max-side", "12", "--quality", "80", "--workers", "1", "--no-progress"])
    assert _digest(c) == _digest(d)


def test_reencode_max_side_and_quality():
    big = io.BytesIO()
    Image.new("RGB", (300, 120), (10, 200, 30)).save(big, format="PNG")
    data = big.getvalue()
    assert encode_image(data) == (data, "png")  # no option: bytes kept
    small, ext = encode_image(data, max_side=100)
    assert ext == "png" and Image.open(io.BytesIO(small)).size == (100, 40)
    jpg, ext = encode_image(data, max_side=50, quality=70)
    assert ext == "jpg" and Image.open(io.BytesIO(jpg)).size == (50, 20)
    bmp = io.BytesIO()
    Image.new("L", (8, 8), 7).save(bmp, format="BMP")
    assert encode_image(bmp.getvalue())[1] == "png"  # formats other than jpg/png/webp become png


def test_split_layout_and_skipped_files(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src / "train", per_class=4)
    make_image_folder(src / "val", per_class=2)
    (src / "train" / "digit_3" / "empty.png").write_bytes(b"")
    (src / "train" / "digit_5" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (src / "val" / "digit_0" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert shard_main([str(src), str(out), "--workers", "2", "--no-progress"]) == 0
    train, val = DatasetInfo.load(out / "train"), DatasetInfo.load(out / "val")
    assert train.num_samples == 40 and val.num_samples == 20
    assert train.class_names == val.class_names
    assert train.shards[0].name == "train-000000.tar" and val.shards[0].name == "val-000000.tar"
    assert (out / "train" / "samples.npz").is_file() and (out / "val" / "samples.npz").is_file()
    report = capsys.readouterr().out
    assert "skipped 2 unreadable image files" in report
    assert "empty.png: empty file" in report and "broken.jpg: cannot decode" in report
    assert "ignored 1 files" in report


def test_split_class_lists_must_agree(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src / "train", per_class=1)
    make_image_folder(src / "val", per_class=1)
    (src / "val" / "digit_9" / "00.png").rename(src / "val" / "digit_8" / "99.png")
    (src / "val" / "digit_9").rmdir()
    assert shard_main([str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "only in train: ['digit_9']" in capsys.readouterr().err


@pytest.mark.parametrize("layout, message", [
    ("empty", "no class folders"),
    ("stray_image", "holds image files directly"),
    ("no_images", "holds no images"),
])
def test_bad_folders_are_clear_errors(tmp_path, capsys, layout, message):
    src = tmp_path / "src"
    src.mkdir()
    if layout == "stray_image":
        (src / "a").mkdir()
        (src / "a" / "x.png").write_bytes(_digit_png(np.ones((8, 8))))
        (src / "loose.png").write_bytes(_digit_png(np.ones((8, 8))))
    elif layout == "no_images":
        (src / "a").mkdir()
        (src / "a" / "x.png").write_bytes(_digit_png(np.ones((8, 8))))
        (src / "b").mkdir()
        (src / "b" / "readme.txt").write_text("no images here")
    assert shard_main([str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_all_images_corrupt_is_an_error(tmp_path, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(b"")
    assert shard_main([str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "none of the 1 image files could be decoded" in capsys.readouterr().err


def write_foreign_shards(directory, labels, maxcount):
    """Shards as another tool writes them: webdataset.ShardWriter, non-numeric keys, cls labels."""
    import webdataset as wds
    from sklearn.datasets import load_digits
    images = load_digits().images
    directory.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(directory / "foreign-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, label in enumerate(labels):
            sink.write({"__key__": f"img_{label}_{chr(97 + i % 26)}{i}", "png": _digit_png(images[i]),
                        "cls": int(label)})


def test_index_only_foreign_shards(tmp_path):
    labels = [i % 7 for i in range(23)]
    write_foreign_shards(tmp_path, labels, maxcount=10)
    assert shard_main(["--index-only", str(tmp_path), "--no-progress"]) == 0
    info = DatasetInfo.load(tmp_path)
    assert info.num_samples == 23 and info.num_classes == 7
    assert [(s.name, s.num_samples) for s in info.shards] == [
        ("foreign-000000.tar", 10), ("foreign-000001.tar", 10), ("foreign-000002.tar", 3)]
    index = SampleIndex.load(tmp_path)
    assert list(index.labels) == labels
    assert Image.open(io.BytesIO(index.read_image_bytes(17))).size == (16, 16)
    # Samples are grouped exactly as webdataset groups them: same keys, same order.
    import webdataset as wds
    from skd.data.sample_index import iter_shard
    ours = [s.key for shard in [tmp_path / s.name for s in info.shards] for s in iter_shard(shard)]
    theirs = [s["__key__"] for s in wds.WebDataset([str(p) for p in [tmp_path / s.name for s in info.shards]],
                                                    shardshuffle=False, empty_check=False)]
    assert ours == theirs and len(ours) == 23


def test_index_only_errors(tmp_path, capsys):
    assert shard_main(["--index-only", str(tmp_path), "--no-progress"]) == 2
    assert "no *.tar shards" in capsys.readouterr().err
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        sink.write({"__key__": "a", "png": _digit_png(np.ones((8, 8))), "cls": 1})
        sink.write({"__key__": "b", "png": _digit_png(np.ones((8, 8)))})
    assert shard_main(["--index-only", str(tmp_path), "--no-progress"]) == 2
    assert "x.tar: sample 'b' has no 'cls' label" in capsys.readouterr().err


def test_index_only_refuses_a_shard_with_a_damaged_header_midway(tmp_path, capsys):
    import webdataset as wds
    shard = tmp_path / "x.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(10):
            sink.write({"__key__": f"s{i}", "png": _digit_png(np.full((8, 8), i)), "cls": i % 2})
    with tarfile.open(shard) as tar:
        offset = next(m.offset for m in tar.getmembers() if m.name.startswith("s5."))
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0xFF  # the header checksum no longer matches: tarfile would just stop here
    shard.write_bytes(bytes(data))
    assert shard_main(["--index-only", str(tmp_path), "--no-progress"]) == 2
    assert f"x.tar: damaged tar header at byte {offset}" in capsys.readouterr().err


def test_dataset_info_validation_names_file_and_key(tmp_path):
    good = {"num_samples": 3, "num_classes": 2, "class_names": ["a", "b"],
            "shards": [{"name": "s-0.tar", "num_samples": 1}, {"name": "s-1.tar", "num_samples": 2}]}
    (tmp_path / "dataset.json").write_text(json.dumps(good))
    assert DatasetInfo.load(tmp_path).shard_offsets.tolist() == [0, 1, 3]
    for key, bad in [("num_samples", {**good, "num_samples": 4}),
                     ("shards[1].num_samples",
                      {**good, "shards": [good["shards"][0], {"name": "s", "num_samples": -1}]}),
                     ("class_names", {**good, "class_names": ["a"]}),
                     ("num_classes", {k: v for k, v in good.items() if k != "num_classes"})]:
        (tmp_path / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(DatasetInfoError, match=r"dataset\.json.*'" + re.escape(key) + "'"):
            DatasetInfo.load(tmp_path)
    with pytest.raises(DatasetInfoError, match="not found"):
        DatasetInfo.load(tmp_path / "nowhere")


def test_digits_shards_cached_and_concurrent(tmp_path, monkeypatch):
    import threading
    monkeypatch.setenv("SKD_CACHE", str(tmp_path))
    roots = []
    threads = [threading.Thread(target=lambda: roots.append(digits_shards())) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(roots) == 2 and roots[0] == roots[1] and roots[0].parent == tmp_path
    train, val = DatasetInfo.load(roots[0] / "train"), DatasetInfo.load(roots[0] / "val")
    assert (train.num_samples, val.num_samples, train.num_classes) == (1437, 360, 10)
    assert [p.name for p in tmp_path.iterdir()] == [roots[0].name]  # no temporary leftovers
    counts = np.bincount(SampleIndex.load(roots[0] / "val").labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    img = Image.open(io.BytesIO(SampleIndex.load(roots[0] / "train").read_image_bytes(0)))
    assert img.size == (32, 32) and img.format == "PNG"
    before = _digest(roots[0] / "train")
    assert digits_shards() == roots[0] and _digest(roots[0] / "train") == before


def test_a_jpeg_with_a_multi_picture_marker_is_stored_as_the_jpeg_it_is():
    """PIL calls it MPO (camera stereo pairs, phone photos with a gain map): its bytes are kept,
    as a .jpg, not re-encoded as a much larger PNG."""
    import io

    from PIL import Image

    from skd.data.shard_writer import encode_image
    image, buf = Image.new("RGB", (20, 10), (200, 10, 10)), io.BytesIO()
    image.save(buf, format="MPO", append_images=[image])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    assert encode_image(buf.getvalue()) == (buf.getvalue(), "jpg")
    data, ext = encode_image(buf.getvalue(), max_side=10)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (10, 5)


def test_digits_cache_with_a_missing_shard_is_rebuilt(tmp_path):
    root = digits_shards(tmp_path)
    shard = next((root / "train").glob("*.tar"))
    size = shard.stat().st_size
    shard.unlink()
    assert digits_shards(tmp_path) == root and shard.stat().st_size == size
