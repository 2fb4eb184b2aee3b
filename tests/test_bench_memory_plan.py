"""``python -m skd.bench memory-plan``: a few numbers of its table worked out by hand."""
import pytest

from skd.bench import memory_plan


def test_numbers_by_hand():
    rows = {(r.dataset, r.gpus, r.layout, r.k): r
            for r in memory_plan.make_plan(memory_plan.DATASETS, [8, 512], [16], batch=128, dense_bytes=2)}
    # ImageNet-1k replicated, fp16: (1,281,167 + 1 scratch) rows × 1000 classes × 2 B on every GPU;
    # a ring all-gather sends 7 × 128 × (2000 B of row + 8 B of id) from each of 8 GPUs.
    r = rows["ImageNet-1k", 8, "replicated", None]
    assert r.memory_bytes == 1_281_168 * 2000 and r.step_bytes == 7 * 128 * 2008
    assert r.step_ms(25) == pytest.approx(1_799_168 / 25e9 * 1e3)
    # Sharded: 7/8 of the 128 ids (8 B) go out, their rows come back and go out again (2 × 2000 B),
    # plus the 8 counts.
    assert rows["ImageNet-1k", 8, "sharded", None].step_bytes == pytest.approx(112 * 4008 + 64)
    # ImageNet-21k sharded on 512 GPUs: ceil(14,197,122 / 512) = 27,729 rows + 1 of 21,841 × 2 B.
    assert rows["ImageNet-21k", 512, "sharded", None].memory_bytes == 27_730 * 43_682
    # Top-k, k = 16: 16 × (2 + 4) B per row, whatever the number of classes.
    assert rows["ImageNet-21k", 8, "topk", 16].memory_bytes == 14_197_123 * 96


def test_prints_the_table(capsys):
    assert memory_plan.main(["--gpus", "8", "--k", "32", "--bandwidth", "25", "200"]) == 0
    out = capsys.readouterr().out
    assert "| ImageNet-21k | 8 | sharded_topk k=32 | 341 MB |" in out  # (ceil(N / 8) + 1) × 32 × 6 B
    assert out.count("\n| ImageNet") == 2 * 4  # 2 datasets × 4 layouts (one k)
