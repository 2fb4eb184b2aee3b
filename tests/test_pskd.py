"""PS-KD semantics (docs/methods.md §3): α schedule, one-hot epoch 0, memory read before / written after."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skd.methods import DataSpec, create_method, get_method_config_class
from skd.methods.pskd import pskd_alpha

N, C, B = 40, 5, 8


def _pskd(memory_dtype="float32", alpha_T=0.8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, C))
    cfg = get_method_config_class("pskd")(name="pskd", alpha_T=alpha_T, memory_dtype=memory_dtype)
    return create_method(cfg, model, DataSpec(num_classes=C, num_samples=N, batch_size=B))


def _batches(epoch):
    g = torch.Generator().manual_seed(epoch)
    order = torch.randperm(N, generator=g)
    images = torch.randn(N, 3, 2, 2, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(N) % C
    for idx in order.split(B):
        yield {"image": images[idx], "label": labels[idx], "index": idx}


def test_alpha_schedule_is_linear_in_epoch_plus_one():
    assert pskd_alpha(0, 300, 0.8) == pytest.approx(0.8 / 300)
    assert pskd_alpha(149, 300, 0.8) == pytest.approx(0.4)
    assert pskd_alpha(299, 300, 0.8) == pytest.approx(0.8)
    method = _pskd()
    method.start_epoch(0, 10)
    assert method.alpha_t == 0.0  # epoch 0: the official code forces one-hot targets
    method.start_epoch(4, 10)
    assert method.alpha_t == pytest.approx(0.8 * 5 / 10)


def test_epoch0_target_is_one_hot_whatever_the_memory_holds():
    method = _pskd()
    method.memory.table.uniform_()  # junk that a wrong epoch-0 target would pick up
    method.start_epoch(0, 10)
    batch = next(_batches(0))
    out = method(batch)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(out["logits"], batch["label"]).item(), rel=1e-6)


def test_later_epoch_target_mixes_one_hot_and_memory():
    method = _pskd()
    method.memory.table.copy_(torch.softmax(torch.randn(N + 1, C), 1))
    method.start_epoch(3, 10)
    batch = next(_batches(3))
    out = method(batch)
    alpha = 0.8 * 4 / 10
    target = (1 - alpha) * F.one_hot(batch["label"], C) + alpha * method.memory.rows[batch["index"]]
    expected = -(target * out["logits"].log_softmax(1)).sum(1).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("memory_dtype", ["float32", "float16"])
def test_memory_holds_each_samples_pre_step_softmax_after_an_epoch(memory_dtype):
    method = _pskd(memory_dtype)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    method.train()
    method.start_epoch(0, 10)
    expected = torch.zeros(N, C)
    for batch in _batches(0):
        before = method.memory.table.clone()
        out = method(batch)
        assert torch.equal(method.memory.table, before)  # read before the forward, not written by it
        expected[batch["index"]] = out["logits"].detach().float().softmax(1)  # this step, pre-update
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        method.after_step(batch, out)
    tol = 1e-6 if memory_dtype == "float32" else 1e-3
    torch.testing.assert_close(method.memory.rows.float(), expected, atol=tol, rtol=0)
    # ...which is not what the updated model gives the same batch (same train-mode BN).
    batch = next(_batches(0))
    with torch.no_grad():
        post = method.model(batch["image"]).softmax(1)
    assert not torch.allclose(post, expected[batch["index"]], atol=1e-3)


def test_memory_travels_in_the_state_dict():
    method = _pskd("float16")
    method.memory.table.uniform_()
    other = _pskd("float16")
    other.load_trainable_state_dict(method.trainable_state_dict())
    assert torch.equal(other.memory.table, method.memory.table)
