"""`skd shard` on the seeds' dataset formats: the CIFAR-10/100 binary archives (tiny archives of
the same record format) and TinyImageNet's folder layout; round trips of labels, pixels, class
names and counts, and determinism."""
from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from skd.data import DatasetInfo, SampleIndex
from skd.data.sample_index import EXT_NAMES
from skd.data.shard_cmd import main as shard_main

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = [f"fine_{i:02d}" for i in range(100)]


def _records(rng, n, num_classes, coarse=False):
    """``n`` records in the binary format and, per record, (label, [32, 32, 3] image)."""
    labels = rng.integers(0, num_classes, n)
    planes = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    prefix = [[(lab + 7) % 20, lab] if coarse else [lab] for lab in labels]  # coarse byte differs
    data = b"".join(bytes(p) + planes[i].tobytes() for i, p in enumerate(prefix))
    images = []
    for i in range(n):  # record bytes: 1024 red, 1024 green, 1024 blue, each 32 rows of 32
        img = np.zeros((32, 32, 3), np.uint8)
        for c in range(3):
            for y in range(32):
                img[y, :, c] = planes[i, c * 1024 + y * 32: c * 1024 + y * 32 + 32]
        images.append(img)
    return data, list(zip(labels.tolist(), images))


def _tar_gz(path, folder, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """A cifar-10-binary.tar.gz with 5 train batches of 3 records and a test batch of 4, and the
    expected (label, image) of each split in archive order."""
    rng = np.random.default_rng(10)
    members, truth = {}, {"train": [], "test": []}
    files = [*((f"data_batch_{i}.bin", "train", 3) for i in range(1, 6)), ("test_batch.bin", "test", 4)]
    for name, split, n in files:
        members[name], samples = _records(rng, n, 10)
        truth[split] += samples
    members["batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n\n").encode()
    members["readme.html"] = b"<html></html>"
    root = tmp_path_factory.mktemp("cifar10")
    _tar_gz(root / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", members)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    return root / "cifar-10-binary.tar.gz", folder, truth


def _read_back(directory):
    info, index = DatasetInfo.load(directory), SampleIndex.load(directory)
    samples = []
    for i in range(len(index)):
        assert EXT_NAMES[index["image_ext"][i]] == "png"
        with Image.open(io.BytesIO(index.read_image_bytes(i))) as img:
            assert img.mode == "RGB"
            samples.append((int(index.labels[i]), np.asarray(img)))
    return info, samples


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _same(a, b):
    return len(a) == len(b) and all(la == lb and np.array_equal(ia, ib) for (la, ia), (lb, ib) in zip(a, b))


def test_cifar10_archive_round_trip(cifar10, tmp_path, capsys):
    archive, _, truth = cifar10
    out = tmp_path / "out"
    assert shard_main([str(archive), str(out), "--keep-order", "--max-per-shard", "4", "--workers", "1",
                       "--no-progress"]) == 0
    assert "CIFAR-10 binary archive" in capsys.readouterr().out
    for split, count in (("train", 15), ("test", 4)):
        info, samples = _read_back(out / split)
        assert info.num_samples == count and info.num_classes == 10 and info.class_names == CIFAR10_NAMES
        assert [s.name for s in info.shards][0] == f"{split}-000000.tar"
        assert _same(samples, truth[split])  # archive order, exact pixels, label bytes


def test_cifar100_archive_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(100)
    train, train_truth = _records(rng, 6, 100, coarse=True)
    test, test_truth = _records(rng, 3, 100, coarse=True)
    members = {"train.bin": train, "test.bin": test, "fine_label_names.txt": "\n".join(CIFAR100_NAMES).encode(),
               "coarse_label_names.txt": "\n".join(f"coarse_{i}" for i in range(20)).encode()}
    _tar_gz(tmp_path / "cifar-100-binary.tar.gz", "cifar-100-binary", members)
    out = tmp_path / "out"
    assert shard_main([str(tmp_path / "cifar-100-binary.tar.gz"), str(out), "--keep-order", "--no-progress",
                       "--workers", "1"]) == 0
    for split, truth in (("train", train_truth), ("test", test_truth)):
        info, samples = _read_back(out / split)
        assert info.num_classes == 100 and info.class_names == CIFAR100_NAMES
        assert _same(samples, truth)


def test_cifar_shuffle_determinism_and_extracted_folder(cifar10, tmp_path):
    archive, folder, truth = cifar10
    runs = {}
    for name, source, seed, workers in (("a", archive, "0", "1"), ("b", archive, "0", "2"),
                                        ("folder", folder, "0", "1"), ("c", archive, "1", "1")):
        assert shard_main([str(source), str(tmp_path / name), "--seed", seed, "--workers", workers,
                           "--max-per-shard", "4", "--no-progress"]) == 0
        runs[name] = _digest(tmp_path / name / "train")
    # Same seed: byte-identical shards, whatever the workers, from the archive or its folder.
    assert runs["a"] == runs["b"] == runs["folder"] and runs["a"] != runs["c"]
    _, shuffled = _read_back(tmp_path / "a" / "train")
    assert not _same(shuffled, truth["train"])
    key = lambda s: (s[0], s[1].tobytes())  # noqa: E731
    assert sorted(map(key, shuffled)) == sorted(map(key, truth["train"]))  # every record once


def test_cifar_bad_archives_are_clear_errors(cifar10, tmp_path, capsys):
    _tar_gz(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py",
            {"data_batch_1": b"\x80\x04pickle", "batches.meta": b"\x80\x04pickle"})
    assert shard_main([str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "o1"), "--no-progress"]) == 2
    assert "python (pickle) version of CIFAR" in capsys.readouterr().err
    _, folder, _ = cifar10
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in folder.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "data_batch_3.bin").write_bytes((folder / "data_batch_3.bin").read_bytes()[:-5])
    assert shard_main([str(broken), str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "data_batch_3.bin: 9214 bytes is not a whole number of 3073-byte records" in capsys.readouterr().err
    (broken / "data_batch_3.bin").write_bytes(b"\x0c" + bytes(3072))
    assert shard_main([str(broken), str(tmp_path / "o3"), "--no-progress"]) == 2
    assert "data_batch_3.bin: record 0 has label 12, outside [0, 10)" in capsys.readouterr().err


# ------------------------------------------------------------------------------- TinyImageNet
WNIDS = ["n02124075", "n01443537", "n01629819"]  # wnids.txt order is not sorted
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
         "n02124075": "Egyptian cat", "n09999999": "not in the dataset"}


def _jpeg(rng, size=8):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def tiny(tmp_path):
    """tiny-imagenet-200/ with 3 classes × 3 train images, 5 val images, 2 test images; and the
    expected label of every image's bytes, per split."""
    rng = np.random.default_rng(200)
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in WORDS.items()))
    label = {w: i for i, w in enumerate(sorted(WNIDS))}
    truth = {"train": {}, "val": {}}
    for w in WNIDS:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t7\t7\n")
        for k in range(3):
            data = _jpeg(rng)
            (root / "train" / w / "images" / f"{w}_{k}.JPEG").write_bytes(data)
            truth["train"][data] = label[w]
    lines = []
    for k, w in enumerate(["n01629819", "n02124075", "n01443537", "n01629819", "n01629819"]):
        data = _jpeg(rng)
        (root / "val" / "images" / f"val_{k}.JPEG").write_bytes(data)
        lines.append(f"val_{k}.JPEG\t{w}\t0\t1\t6\t7")
        truth["val"][data] = label[w]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for k in range(2):
        (root / "test" / "images" / f"test_{k}.JPEG").write_bytes(_jpeg(rng))
    return root, truth


def test_tinyimagenet_round_trip(tiny, tmp_path, capsys):
    root, truth = tiny
    out = tmp_path / "out"
    assert shard_main([str(root), str(out), "--max-per-shard", "4", "--workers", "1", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "TinyImageNet folder" in report and "ignored 3 files" in report  # the *_boxes.txt
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    names = ["goldfish, Carassius auratus", "European fire salamander", "Egyptian cat"]  # sorted wnids
    for split, count in (("train", 9), ("val", 5)):
        info, index = DatasetInfo.load(out / split), SampleIndex.load(out / split)
        assert info.num_samples == count and info.class_names == names
        got = {index.read_image_bytes(i): int(index.labels[i]) for i in range(len(index))}
        assert got == truth[split]  # JPEG bytes unchanged, each under its class
        assert all(EXT_NAMES[e] == "jpg" for e in index["image_ext"])
    first = _digest(out / "val")
    assert shard_main([str(root), str(tmp_path / "again"), "--max-per-shard", "4", "--workers", "2",
                       "--no-progress"]) == 0
    assert _digest(tmp_path / "again" / "val") == first


@pytest.mark.parametrize("damage, message", [
    ("missing_val_image", "val_3.JPEG is annotated but not in"),
    ("unannotated", "extra.JPEG has no line in"),
    ("unknown_wnid", "val_annotations.txt:1: expected 'FILE<TAB>WNID<TAB>...' with a wnid of wnids.txt"),
    ("unnamed", "words.txt: no entry for class n01443537"),
    ("extra_class_folder", "class folders differ from wnids.txt: not listed ['n03000000']"),
])
def test_tinyimagenet_damage_is_a_clear_error(tiny, tmp_path, capsys, damage, message):
    root, _ = tiny
    if damage == "missing_val_image":
        (root / "val" / "images" / "val_3.JPEG").unlink()
    elif damage == "unannotated":
        (root / "val" / "images" / "extra.JPEG").write_bytes(b"")
    elif damage == "unknown_wnid":
        text = (root / "val" / "val_annotations.txt").read_text()
        (root / "val" / "val_annotations.txt").write_text(text.replace("n01629819", "n07777777", 1))
    elif damage == "unnamed":
        (root / "words.txt").write_text("n01629819\tsalamander\nn02124075\tcat\n")
    else:
        (root / "train" / "n03000000" / "images").mkdir(parents=True)
        (root / "train" / "n03000000" / "images" / "x.JPEG").write_bytes(_jpeg(np.random.default_rng(0)))
    assert shard_main([str(root), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
