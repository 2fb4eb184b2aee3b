"""Mixup/CutMix: the batch mixer against timm's own ``Mixup``, its seeding, every method's loss on a
mixed batch against a float64 computation of the mixed target, the refusals, and training runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data.mixup import Mixup

from skd import losses, mixup
from skd.config import ConfigError, MixupConfig, load_config
from skd.features import forward_with_pooled_feature
from skd.methods import DataSpec, create_method, get_method_class, list_methods
from skd.train import train

C, B = 10, 8
MIXING = ["mixup.alpha=0.8", "mixup.cutmix_alpha=1.0", "mixup.label_smoothing=0.1"]
SUPPORTING = {"ce", "kd", "nkd", "pskd", "uskd"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(batch_size: int = B, size: int = 16) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(batch_size, 3, size, size),
            "label": torch.randint(0, C, (batch_size,)),
            "index": torch.randperm(100)[:batch_size]}


# ------------------------------------------------------------------------------------ the mixer
MIXER_CASES = {
    "mixup": MixupConfig(alpha=0.8),
    "cutmix": MixupConfig(cutmix_alpha=1.0, correct_lam=False),
    "both": MixupConfig(alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.2),
    "minmax": MixupConfig(cutmix_minmax=[0.2, 0.8]),
    "half-mixed": MixupConfig(alpha=0.8, prob=0.5),
}


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_is_timms_batch_mode(case):
    """Given the generator state the mixer seeds, timm's Mixup(mode="batch") makes the same images
    and the same target; λ and the partner rows in the batch describe that target."""
    cfg = MIXER_CASES[case]
    mixer = mixup.BatchMixer(cfg, C, seed=7, rank=1)
    reference = Mixup(mixup_alpha=cfg.alpha, cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
                      prob=cfg.prob, switch_prob=cfg.switch_prob, mode="batch",
                      correct_lam=cfg.correct_lam, label_smoothing=cfg.label_smoothing, num_classes=C)
    kinds = set()
    for j in range(12):
        batch = make_batch()
        images = batch["image"].clone()
        with mixup._numpy_seeded(7, 3, 1, j, mixup._MIX_STREAM):
            images, target = reference(images, batch["label"])
        lam, box = mixer.draw(3, j, batch["image"].shape)
        kinds.add("none" if lam == 1.0 else "cutmix" if box else "mixup")
        mixed = mixer(batch, 3, j)
        assert torch.equal(mixed["image"], images)
        assert torch.equal(mixed["target"], target)
        assert mixed["mix_lam"].dim() == 0 and mixed["mix_lam"].item() == pytest.approx(lam, abs=1e-7)
        assert mixed["mix_smoothing"].item() == pytest.approx(cfg.label_smoothing)
        assert mixed["mix_partner"].tolist() == list(range(B - 1, -1, -1))
        onehot = F.one_hot(batch["label"], C).double()
        smooth = (1 - cfg.label_smoothing) * onehot + cfg.label_smoothing / C
        expected = lam * smooth + (1 - lam) * smooth.flip(0)
        torch.testing.assert_close(mixed["target"].double(), expected, rtol=0, atol=1e-6)
    expected_kinds = {"mixup": {"mixup"}, "cutmix": {"cutmix"}, "both": {"mixup", "cutmix"},
                      "minmax": {"cutmix"}, "half-mixed": {"mixup", "none"}}[case]
    assert kinds == expected_kinds


def test_mixer_draws_are_seeded_by_seed_epoch_rank_and_batch():
    """The same (seed, epoch, rank, batch) draws the same λ and box (a resumed run mixes as the
    uninterrupted one); other ranks and batches draw differently; NumPy's global state is untouched."""
    cfg = MixupConfig(alpha=0.8, cutmix_alpha=1.0)
    shape = torch.Size([B, 3, 32, 32])
    mixer = mixup.BatchMixer(cfg, C, seed=0, rank=0)
    state = np.random.get_state()
    draws = [mixer.draw(2, j, shape) for j in range(20)]
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]
    assert draws == [mixup.BatchMixer(cfg, C, seed=0, rank=0).draw(2, j, shape) for j in range(20)]
    assert len({lam for lam, _ in draws}) == 20
    for other in (mixup.BatchMixer(cfg, C, seed=0, rank=1), mixup.BatchMixer(cfg, C, seed=1, rank=0)):
        assert all(other.draw(2, j, shape) != draws[j] for j in range(20))
    assert all(mixer.draw(3, j, shape) != draws[j] for j in range(20))


def test_mixup_config_is_checked():
    assert not MixupConfig().enabled
    assert MixupConfig(cutmix_minmax=[0.2, 0.8]).enabled
    with pytest.raises(ConfigError, match="mixup.cutmix_minmax"):
        load_config(None, ["method.name=ce", "mixup.cutmix_minmax=[0.8, 0.2]"])
    with pytest.raises(ConfigError, match="mixup.label_smoothing"):
        load_config(None, ["method.name=ce", "mixup.label_smoothing=1.0"])


# ---------------------------------------------------------------------------- which methods mix
def test_methods_that_accept_mixed_targets():
    assert {m for m in list_methods() if get_method_class(m).supports_mixup} == SUPPORTING


@pytest.mark.parametrize("name", sorted(set(list_methods()) - SUPPORTING))
def test_methods_without_mixup_are_refused(name):
    with pytest.raises(ConfigError, match=rf"method.name' = '{name}': cannot train with Mixup/CutMix.*"
                                          r"methods that can: ce, kd, nkd, pskd, uskd"):
        load_config(None, [f"method.name={name}", "mixup.cutmix_alpha=1.0"])
    load_config(None, [f"method.name={name}"])  # without mixing the method is fine


def test_refusals_say_what_to_do():
    with pytest.raises(ConfigError, match="mixup.label_smoothing with method.name=ce"):
        load_config(None, ["method.name=ls", "mixup.alpha=0.2"])
    for memory in ("topk", "sharded_topk"):
        with pytest.raises(ConfigError, match=f"method.memory={memory} cannot mix"):
            load_config(None, ["method.name=pskd", f"method.memory={memory}", "mixup.alpha=0.2"])
    load_config(None, ["method.name=pskd", "method.memory=sharded", "mixup.alpha=0.2"])


# -------------------------------------------------- every supporting method against float64 math
@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=C).state_dict(), path)
    return path


def mixed_batch(cfg: MixupConfig, kind: str) -> tuple[dict[str, torch.Tensor], float]:
    """A batch mixed by ``kind`` ("mixup" or "cutmix") with 0.1 < λ < 0.9, and its λ."""
    mixer = mixup.BatchMixer(cfg, C, seed=0, rank=0)
    for j in range(100):
        batch = make_batch()
        lam, box = mixer.draw(0, j, batch["image"].shape)
        if 0.1 < lam < 0.9 and (box is not None) == (kind == "cutmix"):
            return mixer(batch, 0, j), lam
    raise AssertionError("no such draw")


def soft_ce64(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits.double(), 1)).sum(1).mean()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("name", sorted(SUPPORTING))
def test_method_loss_on_a_mixed_batch(name, kind, teacher_file):
    overrides = [f"method.name={name}", *MIXING]
    if name in ("kd", "nkd"):
        overrides += ["method.teacher=test_resnet", f"method.teacher_checkpoint={teacher_file}"]
    if name == "pskd":
        overrides.append("method.memory_dtype=float32")
    cfg = load_config(None, overrides)
    method = create_method(cfg.method, timm.create_model("test_resnet", num_classes=C),
                           DataSpec(num_classes=C, num_samples=100, batch_size=B))
    method.train()
    batch, lam = mixed_batch(cfg.mixup, kind)
    eps = cfg.mixup.label_smoothing
    onehot = F.one_hot(batch["label"], C).double()
    mixed = lam * onehot + (1 - lam) * onehot.flip(0)  # the partner of row i is row B-1-i
    target = (1 - eps) * mixed + eps / C  # label smoothing inside the mixed target
    if name == "pskd":
        past = torch.softmax(torch.randn(100, C) * 2, 1)
        method.memory.rows.copy_(past)
        method.start_epoch(4, 10)
        alpha = method.alpha_t
        assert alpha == pytest.approx(0.8 * 5 / 10)
        rows = past.double()[batch["index"]]
        target = (1 - alpha) * target + alpha * (lam * rows + (1 - lam) * rows.flip(0))

    out = method(batch)
    logits = out["logits"].detach().double()
    head = soft_ce64(logits, target)
    if name in ("ce", "pskd"):
        expected = head
    elif name == "kd":
        T = cfg.method.temperature
        with torch.no_grad():
            t = method.teacher(batch["image"]).double()
        log_p, log_q = torch.log_softmax(t / T, 1), torch.log_softmax(logits / T, 1)
        kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
        expected = cfg.method.ce_weight * head + cfg.method.kd_weight * T * T * kl
        torch.testing.assert_close(out["parts"]["ce"].double(), cfg.method.ce_weight * head,
                                   rtol=1e-5, atol=0)
    elif name == "nkd":
        with torch.no_grad():
            t = method.teacher(batch["image"]).double()
        expected = head + losses.nkd_loss(logits, t, target.argmax(1), cfg.method.temperature,
                                          cfg.method.gamma)
        torch.testing.assert_close(out["parts"]["ce"].double(), head, rtol=1e-5, atol=0)
    else:  # uskd: its soft labels are the mixed labels without smoothing
        with torch.no_grad():  # the same train-mode forward again, for the weak head's logits
            again, feature = forward_with_pooled_feature(method.model, batch["image"], method.feature_index)
            weak = method.weak_head(feature).double()
        torch.testing.assert_close(again.double(), logits)
        m = cfg.method
        expected = head + losses.uskd_loss(logits, weak, mixed, m.alpha, m.beta, m.mu, m.rank)
        torch.testing.assert_close(out["parts"]["ce"].double(), head, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=0)
    out["loss"].backward()  # the fused kernel's gradient path runs


# ------------------------------------------------------------------------- through the trainer
FAST = ["model.name=test_resnet", "log_with=[]", "data.batch_size=128", "data.num_workers=0",
        "data.img_size=16", "epochs=1", "log_every=5", "sched.warmup_epochs=0"]


@pytest.mark.parametrize("name", ["ce", "pskd"])
def test_training_with_mixup_on_the_digits(tmp_path, monkeypatch, name):
    """Every training batch is mixed once, numbered as the loader counts it, before the method
    sees it, and the run trains to the end."""
    calls = []
    real_call = mixup.BatchMixer.__call__

    def spy(self, batch, epoch, batch_number):
        calls.append((epoch, batch_number))
        return real_call(self, batch, epoch, batch_number)

    monkeypatch.setattr(mixup.BatchMixer, "__call__", spy)
    seen = []
    method_cls = get_method_class(name)
    real_forward = method_cls.forward
    monkeypatch.setattr(method_cls, "forward",
                        lambda self, batch: seen.append(set(batch)) or real_forward(self, batch))
    run = tmp_path / "run"
    metrics = train(load_config(None, FAST + [f"method.name={name}", f"output_dir={run}", *MIXING]))
    assert calls == [(0, j) for j in range(12)]  # 1,437 digits in batches of 128
    assert all({"target", "mix_lam", "mix_partner", "mix_smoothing"} <= keys for keys in seen)
    assert len(seen) == 12
    (epoch,) = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert np.isfinite(epoch["train_loss"]) and 0 <= metrics["top1"] <= 100
