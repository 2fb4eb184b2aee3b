"""The torch loader: exact per-rank splits, determinism, resume, corrupt data, CS-KD partners."""
import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from skd.data import PartnerSampler, SampleIndex, ShardFormatError, create_loader, index_shards, plan_epoch
from skd.data.shard_cmd import main as shard_main

SIZE = 16


class Augment:
    """A picklable random transform that draws from torch, random and numpy."""

    def __call__(self, img):
        t = TF.to_tensor(img)
        return torch.roll(t, random.randint(0, 3), dims=2) + 0.01 * torch.rand(1) + 0.01 * float(np.random.rand())


def to_tensor(img):
    return TF.to_tensor(img)


def _png(img8):
    img = Image.fromarray(np.uint8(img8 * 255 / 16)).resize((SIZE, SIZE), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(directory, counts, corrupt=(), num_classes=10):
    """Tar shards with the given sample counts, indexed as shards made elsewhere are (`skd shard
    --index-only`); digit i has label i % 10; ids in ``corrupt`` get junk instead of a PNG."""
    import tarfile

    from sklearn.datasets import load_digits
    d = load_digits()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sid = 0
    for k, count in enumerate(counts):
        with tarfile.open(directory / f"train-{k:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                i = int(np.flatnonzero(d.target == sid % 10)[sid // 10])
                image = b"\x89PNG\r\n\x1a\n junk" if sid in corrupt else _png(d.images[i])
                for name, data in ((f"{sid:09d}.cls", str(sid % 10).encode()), (f"{sid:09d}.png", image)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sid += 1
    index_shards(directory, progress=False, class_names=[str(c) for c in range(num_classes)])
    return directory


def collect(loader):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]


def ids_of(batches):
    return [i for b in batches for i in b["index"].tolist()]


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory):
    """ImageFolder of real digits (10 classes x 6) → `skd shard` → 4 shards (16, 16, 16, 12)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    root = tmp_path_factory.mktemp("loader")
    for k in range(10):
        (root / "folder" / f"digit_{k}").mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(d.target == k)[:6]):
            (root / "folder" / f"digit_{k}" / f"{n:02d}.png").write_bytes(_png(d.images[i]))
    assert shard_main([str(root / "folder"), str(root / "shards"), "--max-per-shard", "16",
                       "--workers", "1", "--no-progress"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def unequal(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("unequal"), [7, 23, 11, 19])


def test_round_trip_every_id_once(folder_shards):
    loader = create_loader(folder_shards, train=True, batch_size=8, transform=to_tensor, num_workers=2,
                           drop_last=False, shuffle_buffer=16)
    assert len(loader) == 8 and loader.info.num_samples == 60
    batches = collect(loader)
    folder_labels: dict[bytes, set[int]] = {}
    for path in (folder_shards.parent / "folder").rglob("*.png"):
        pixels = to_tensor(Image.open(path).convert("RGB")).numpy().tobytes()
        folder_labels.setdefault(pixels, set()).add(int(path.parent.name.split("_")[1]))
    assert [len(b["index"]) for b in batches] == [8] * 7 + [4]
    assert sorted(ids_of(batches)) == list(range(60))
    for b in batches:
        assert b["image"].shape[1:] == (3, SIZE, SIZE) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
        for image, label in zip(b["image"], b["label"].tolist()):  # its folder digit_k is class k
            assert label in folder_labels[image.numpy().tobytes()]
    assert loader.num_corrupt == 0
    assert loader.state_dict() == {"epoch": 0, "batches": 8, "start": 0, "world_size": 1, "batch_size": 8,
                                   "window": 16, "drop_last": False}


def test_eval_single_rank_in_order_without_workers(folder_shards):
    loader = create_loader(folder_shards, train=False, batch_size=7, transform=to_tensor, num_workers=0)
    assert ids_of(collect(loader)) == list(range(60))


def test_plan_exact_counts_any_shard_count():
    rng = np.random.default_rng(0)
    for _ in range(60):
        counts = rng.integers(0, 30, size=rng.integers(1, 7)).tolist()
        counts[0] += 1
        n = sum(counts)
        world, bs, window = int(rng.integers(1, 6)), int(rng.integers(1, 9)), int(rng.integers(0, 20))
        for train, drop_last in ((True, False), (True, True), (False, False)):
            plans = [plan_epoch(counts, epoch=3, seed=1, rank=r, world_size=world, batch_size=bs, train=train,
                                drop_last=drop_last, window=window) for r in range(world)]
            covered = [int(i) for p in plans for j in range(p.num_batches) for i in p.sample_ids(j)]
            if train:
                assert len({p.num_batches for p in plans}) == 1  # every rank the same batch count
            if train and not drop_last:
                assert sorted(set(covered)) == list(range(n)) and len(covered) == world * -(-n // world)
            elif train:
                assert len(covered) == len(set(covered)) == world * (n // (world * bs)) * bs
            else:
                assert sorted(covered) == list(range(n))  # evaluation: every sample exactly once


def test_simulated_ranks_3x2_over_4_unequal_shards(unequal):
    for drop_last, batches_per_rank in ((False, 5), (True, 5)):
        seen, lengths = [], []
        for rank in range(3):
            loader = create_loader(unequal, train=True, batch_size=4, transform=to_tensor, rank=rank,
                                   world_size=3, num_workers=2, drop_last=drop_last, seed=5)
            batches = collect(loader)
            lengths.append((len(loader), len(batches)))
            seen += ids_of(batches)
        assert lengths == [(batches_per_rank, batches_per_rank)] * 3
        assert sorted(seen) == list(range(60))
    # 61 samples over 3 ranks: 21 each, the shortfall of 2 filled by wrapping around.
    odd = write_shards(unequal.parent / "odd", [7, 23, 11, 20])
    seen = []
    for rank in range(3):
        batches = collect(create_loader(odd, train=True, batch_size=4, transform=to_tensor, rank=rank,
                                        world_size=3, num_workers=2, drop_last=False))
        assert [len(b["index"]) for b in batches] == [4, 4, 4, 4, 4, 1]
        seen += ids_of(batches)
    assert set(seen) == set(range(61)) and len(seen) == 63


def test_eval_ranks_cover_every_sample_once(unequal):
    seen, counts = [], []
    for rank in range(4):
        loader = create_loader(unequal, train=False, batch_size=4, transform=to_tensor, rank=rank,
                               world_size=4, num_workers=2)
        batches = collect(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader)
        seen += ids_of(batches)
    assert sorted(seen) == list(range(60)) and max(counts) - min(counts) <= 1


def test_same_seed_same_batches_other_epoch_other_order(unequal):
    def run(epoch, workers=2):
        loader = create_loader(unequal, train=True, batch_size=8, transform=Augment(), seed=3,
                               num_workers=workers, shuffle_buffer=10, drop_last=True)
        loader.set_epoch(epoch)
        return collect(loader)

    a, b = run(1), run(1)
    assert ids_of(a) == ids_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    other = ids_of(run(2))
    assert other != ids_of(a)
    # drop_last: 7 batches of 8 of the 60 samples, and which 4 are dropped changes with the epoch
    assert len(set(other)) == len(set(ids_of(a))) == 56 and set(other) != set(ids_of(a))
    c, d = run(1, workers=0), run(1, workers=0)
    assert ids_of(c) == ids_of(d) and all(torch.equal(x["image"], y["image"]) for x, y in zip(c, d))


@pytest.mark.parametrize("workers, k", [(2, 3), (0, 2)])
def test_resume_mid_epoch_gives_the_remaining_batches(unequal, workers, k):
    kwargs = dict(train=True, batch_size=6, transform=Augment(), seed=7, num_workers=workers,
                  shuffle_buffer=8, world_size=2, rank=1, drop_last=False)
    full = create_loader(unequal, **kwargs)
    full.set_epoch(4)
    expected = collect(full)
    first = create_loader(unequal, **kwargs)
    first.set_epoch(4)
    for n, _ in enumerate(first, 1):
        if n == k:
            break
    state = first.state_dict()
    assert state == {"epoch": 4, "batches": k, "start": 0, "world_size": 2, "batch_size": 6, "window": 8,
                     "drop_last": False}
    again = create_loader(unequal, **kwargs)
    again.load_state_dict(state)
    again.set_epoch(4)  # what the trainer does: the same epoch keeps the position
    assert again.state_dict() == state
    rest = collect(again)
    assert len(rest) == len(expected) - k
    for x, y in zip(rest, expected[k:]):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    assert again.state_dict() == {**state, "batches": len(expected)}
    assert ids_of(collect(again)) == ids_of(expected)  # the next iter() starts the epoch over
    again.set_epoch(5)
    assert again.state_dict() == {**state, "epoch": 5, "batches": 0}


@pytest.mark.parametrize("before, after", [((2, 6, 2), (1, 6, 0)), ((1, 4, 0), (3, 4, 2)), ((2, 10, 2), (2, 5, 1))])
def test_resume_with_other_processes_workers_or_batch_reads_every_sample_once(unequal, before, after):
    """(world, batch, workers) change mid-epoch: the union over the ranks of both parts of the
    epoch is every sample once, plus fewer than the new world size of wrap-around repeats."""
    def loaders(world, batch, workers):
        return [create_loader(unequal, train=True, batch_size=batch, transform=to_tensor, seed=7, rank=r,
                              world_size=world, num_workers=workers, shuffle_buffer=8, drop_last=False)
                for r in range(world)]

    first, seen = loaders(*before), []
    for loader in first:
        loader.set_epoch(2)
        for n, batch in enumerate(loader, 1):
            seen += batch["index"].tolist()
            if n == 2:
                break
    state = first[0].state_dict()
    assert state["batches"] == 2 and all(loader.state_dict() == state for loader in first)
    for loader in loaders(*after):
        loader.load_state_dict(state)
        loader.set_epoch(2)
        seen += ids_of(collect(loader))
    counts = np.bincount(seen, minlength=60)
    assert counts.min() == 1 and counts.sum() - 60 < after[0]


def test_in_process_loading_leaves_global_rngs_alone(unequal):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    collect(create_loader(unequal, train=True, batch_size=16, transform=Augment(), num_workers=0))
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected


def test_corrupt_sample_in_shard_skipped_and_counted(tmp_path, caplog):
    shards = write_shards(tmp_path, [10, 10], corrupt={13})
    loader = create_loader(shards, train=False, batch_size=5, transform=to_tensor, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="skd.data"):
        batches = collect(loader)
    assert [len(b["index"]) for b in batches] == [5, 5, 4, 5]
    assert ids_of(batches) == [i for i in range(20) if i != 13]
    assert loader.num_corrupt == 1
    assert "train-000001.tar: sample 3 (id 13)" in caplog.text
    workers = create_loader(shards, train=True, batch_size=5, transform=to_tensor, num_workers=2)
    assert len(ids_of(collect(workers))) == 19 and workers.num_corrupt == 1


def test_missing_shard_is_named_before_training(tmp_path):
    shards = write_shards(tmp_path, [5, 5, 5])
    (shards / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        create_loader(shards, train=True, batch_size=4, transform=to_tensor)


def test_truncated_shard_is_named_with_its_complete_samples_before_reading(tmp_path):
    import os
    shards = write_shards(tmp_path, [10, 10])
    size = (shards / "train-000001.tar").stat().st_size
    os.truncate(shards / "train-000001.tar", size // 2)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: the file is truncated \(\d+ bytes\): "
                                               r"[1-9] of its 10 samples are complete"):
        create_loader(shards, train=True, batch_size=4, transform=to_tensor)


def test_label_out_of_range_is_named_before_reading(tmp_path):
    shards = write_shards(tmp_path, [6, 6])
    meta = json.loads((shards / "dataset.json").read_text())
    meta["num_classes"], meta["class_names"] = 8, meta["class_names"][:8]
    (shards / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: sample 2 \(id 8\) has label 8, outside "
                                               r"\[0, num_classes=8\) of dataset.json \(2 such samples\)"):
        create_loader(shards, train=False, batch_size=4, transform=to_tensor, num_workers=0)


def test_foreign_shards_load_after_index_only(tmp_path):
    import webdataset as wds
    from sklearn.datasets import load_digits
    images = load_digits().images
    labels = [(3 * i) % 5 for i in range(17)]
    with wds.ShardWriter(str(tmp_path / "other-%06d.tar"), maxcount=6, verbose=0) as sink:
        for i, label in enumerate(labels):
            sink.write({"__key__": f"photo_{chr(97 + i)}", "png": _png(images[i]), "cls": label})
    assert shard_main(["--index-only", str(tmp_path), "--no-progress"]) == 0
    loader = create_loader(tmp_path, train=True, batch_size=5, transform=to_tensor, num_workers=2,
                           drop_last=False, world_size=2, rank=0)
    other = create_loader(tmp_path, train=True, batch_size=5, transform=to_tensor, num_workers=2,
                          drop_last=False, world_size=2, rank=1)
    batches = collect(loader) + collect(other)
    assert sorted(set(ids_of(batches))) == list(range(17))
    for b in batches:
        assert b["label"].tolist() == [labels[i] for i in b["index"].tolist()]


# ------------------------------------------------------------------------------- partners
def test_partner_sampler_same_class_uniform_anchor_possible():
    labels = np.array([0, 1, 2, 1, 0, 1, 1, 2, 0, 1, 2, 2, 2, 2])
    sampler = PartnerSampler(labels)
    gen = np.random.default_rng(0)
    anchors = np.tile(np.arange(len(labels)), 2000)
    partners = sampler.draw(labels[anchors], gen)
    assert (labels[partners] == labels[anchors]).all()
    assert (partners == anchors).any()  # the anchor itself can be drawn
    from scipy.stats import chisquare
    for c in range(3):
        members = np.flatnonzero(labels == c)
        drawn = partners[labels[anchors] == c]
        observed = np.array([(drawn == m).sum() for m in members])
        assert observed.sum() == len(drawn)
        assert chisquare(observed).pvalue > 1e-3, (c, observed)
    with pytest.raises(ValueError, match="no training samples of class"):
        PartnerSampler(labels, num_classes=4).draw([3], gen)


def test_partner_sampler_exclude_self_uniform_over_the_others():
    labels = np.array([0, 1, 2, 1, 0, 1, 1, 2, 0, 1, 2, 2, 2, 2, 3])  # class 3 has one sample
    sampler = PartnerSampler(labels, exclude_self=True)
    gen = np.random.default_rng(1)
    anchors = np.tile(np.arange(len(labels)), 2000)
    partners = sampler.draw(labels[anchors], gen, anchors)
    assert (labels[partners] == labels[anchors]).all()
    singleton = labels[anchors] == 3
    assert (partners[singleton] == anchors[singleton]).all()  # nobody else to pair with
    assert not (partners[~singleton] == anchors[~singleton]).any()
    from scipy.stats import chisquare
    for a in np.flatnonzero(labels != 3):
        others = np.flatnonzero((labels == labels[a]) & (np.arange(len(labels)) != a))
        drawn = partners[anchors == a]
        observed = np.array([(drawn == m).sum() for m in others])
        assert observed.sum() == len(drawn)
        assert chisquare(observed).pvalue > 1e-4, (a, observed)
    with pytest.raises(ValueError, match="anchors"):
        sampler.draw(labels[:3], gen)


def test_loader_with_partner(unequal):
    index = SampleIndex.load(unequal)
    loader = create_loader(unequal, train=True, batch_size=8, transform=to_tensor, num_workers=2,
                           with_partner=True, seed=2)
    batches = collect(loader)
    assert len(batches) == 8
    for b in batches:
        assert b["partner"].shape == b["image"].shape
        assert (index.labels[b["partner_index"].numpy()] == b["label"].numpy()).all()
        pid = int(b["partner_index"][0])
        expected = to_tensor(Image.open(io.BytesIO(index.read_image_bytes(pid))).convert("RGB"))
        assert torch.equal(b["partner"][0], expected)
    again = collect(create_loader(unequal, train=True, batch_size=8, transform=to_tensor, num_workers=2,
                                  with_partner=True, seed=2))
    assert all(torch.equal(x["partner_index"], y["partner_index"]) for x, y in zip(batches, again))
    others = collect(create_loader(unequal, train=True, batch_size=8, transform=to_tensor, num_workers=2,
                                   with_partner=True, exclude_self_pair=True, seed=2))
    assert sum(len(b["index"]) for b in others) == sum(len(b["index"]) for b in batches)
    for b in others:
        assert (index.labels[b["partner_index"].numpy()] == b["label"].numpy()).all()
        assert not (b["partner_index"] == b["index"]).any()


def test_missing_samples_npz_is_named_before_reading(unequal, tmp_path):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(unequal, bare)
    (bare / "samples.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"samples.npz is missing .*skd shard --index-only"):
        create_loader(bare, train=True, batch_size=8, transform=to_tensor)


def test_open_shards_are_bounded_and_file_system_errors_are_not_corrupt_samples(unequal, monkeypatch):
    """A process keeps at most MAX_OPEN_SHARDS shard files open (thousands of shards would exhaust
    the descriptor limit), and an OSError of the file system stops the run instead of being
    counted as corrupt data."""
    import errno

    import skd.data.sample_index as sample_index
    monkeypatch.setattr(sample_index, "MAX_OPEN_SHARDS", 2)
    index = SampleIndex.load(unequal)
    expected = [Image.open(io.BytesIO(index.read_image_bytes(i))).tobytes() for i in range(60)]
    assert len(index._fds) <= 2
    again = SampleIndex.load(unequal)
    assert [Image.open(io.BytesIO(again.read_image_bytes(i))).tobytes() for i in range(59, -1, -7)] == \
        expected[59::-7]
    loader = create_loader(unequal, train=True, batch_size=8, transform=to_tensor, num_workers=0)
    monkeypatch.setattr(sample_index.os, "open", lambda *a: (_ for _ in ()).throw(OSError(errno.EMFILE, "Too many")))
    with pytest.raises(OSError, match="Too many"):
        collect(loader)
    assert loader.num_corrupt == 0


def test_drop_last_with_fewer_samples_than_a_global_batch_is_an_error(unequal):
    with pytest.raises(ValueError, match=r"data.drop_last=true: 60 training samples .* fewer than 2 processes x 32"):
        create_loader(unequal, train=True, batch_size=32, transform=to_tensor, world_size=2, drop_last=True)


def test_elastic_resume_replans_with_the_saved_drop_last(unequal):
    first = create_loader(unequal, train=True, batch_size=16, transform=to_tensor, num_workers=0, drop_last=True)
    assert len(collect(first)) == 3  # 48 of the 60 samples: the epoch is over
    state = first.state_dict()
    assert state["drop_last"] is True
    rest = create_loader(unequal, train=True, batch_size=8, transform=to_tensor, num_workers=0)
    rest.load_state_dict(state)
    assert collect(rest) == []


def test_random_interpolation_evaluates_with_bilinear():
    from skd.config import DataConfig
    from skd.transforms import create_eval_transform
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    out = create_eval_transform(DataConfig(img_size=16, interpolation="random"))(image)
    assert torch.equal(out, create_eval_transform(DataConfig(img_size=16, interpolation="bilinear"))(image))


# ------------------------------------------------------------------------------ DLB's repeats
@pytest.mark.parametrize("workers", [2, 0])
def test_repeat_previous_holds_each_ranks_batch_before_augmented_anew(unequal, workers):
    """Every batch of a rank repeats the samples of its batch before (the previous epoch's last
    one at an epoch's start), with another augmentation, under any number of workers; the new
    samples are the very batches of a loader without repeats, and a resume gives the same repeats."""
    kwargs = dict(train=True, batch_size=6, transform=Augment(), seed=7, num_workers=workers, shuffle_buffer=8,
                  world_size=2, drop_last=False)
    for rank in (0, 1):
        plain = create_loader(unequal, rank=rank, **kwargs)
        loader = create_loader(unequal, rank=rank, repeat_previous=True, **kwargs)
        batches = []
        for epoch in (0, 1):
            plain.set_epoch(epoch)
            loader.set_epoch(epoch)
            ours = collect(loader)
            for x, y in zip(collect(plain), ours, strict=True):
                assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
            batches += ours
        assert len(batches[0]["repeat"]) == batches[0]["repeat_index"].numel() == 0
        for before, batch in zip(batches, batches[1:]):
            assert torch.equal(batch["repeat_index"], before["index"])
            assert torch.equal(batch["repeat_label"], before["label"])
            assert batch["repeat"].shape == before["image"].shape
            assert not torch.equal(batch["repeat"], before["image"])
        resumed = create_loader(unequal, rank=rank, repeat_previous=True, **kwargs)
        resumed.load_state_dict({**loader.state_dict(), "batches": 2})
        resumed.set_epoch(1)
        for x, y in zip(collect(resumed), batches[len(batches) // 2 + 2:], strict=True):
            assert torch.equal(x["repeat_index"], y["repeat_index"]) and torch.equal(x["repeat"], y["repeat"])
