"""RepDistiller's feature-distillation baselines: FitNet, AT, SP, CC, VID, RKD, PKT, FSP, NST, CRD.

Each loss against a float64 reference written here from the official formula (explicit loops,
block-average pooling by reshaping) in value and gradient, plus a numerical gradient check and a
hand-computed case; the feature taps; each method's connectors, defaults and loss; FSP's two
stages; CRD's memories; the presets of every table cell.
(The registry-wide test in test_methods.py trains every method end to end on the digits.)
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from skd import losses
from skd.config import load_config
from skd.features import forward_with_maps, probe_features
from skd.methods import DataSpec, create_method, get_method_config_class
from skd.methods.feature_kd import stages_after_stem
from skd.methods.fitnet import make_regressor
from skd.methods.vid import VariationalRegressor

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape, seed=0, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def _ref_grad(fn, *inputs):
    """Value and gradients of ``fn`` at fp64 copies of ``inputs``."""
    xs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    value = fn(*xs)
    grads = torch.autograd.grad(value, [x for x in xs if x.requires_grad])
    return value.detach(), grads


def _check(fn, *inputs):
    """``fn`` on fp32 inputs against the fp64 reference ``REF[fn]``: value and gradients."""
    want, want_grads = _ref_grad(REF[fn], *inputs)
    got = fn(*inputs)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.detach().double(), want, **TOL)
    got_grads = torch.autograd.grad(got, [x for x in inputs if x.requires_grad])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, **TOL)


def _block_pool(x, h):
    """Average pooling by an integer factor, by reshaping (the adaptive pool's result then)."""
    b, c, H, W = x.shape
    k = H // h
    return x.reshape(b, c, h, k, W // k, k).mean((3, 5))


def _same_size(s, t):
    if s.shape[2] > t.shape[2]:
        return _block_pool(s, t.shape[2]), t
    if s.shape[2] < t.shape[2]:
        return s, _block_pool(t, s.shape[2])
    return s, t


def _smooth_l1(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


# ---- references, from distiller_zoo/*.py and crd/*.py, per sample / per element --------------

def _hint_ref(s, t):
    return ((s - t.detach()) ** 2).sum() / s.numel()


def _at_ref(s, t):  # AT.py: at(f) = normalize(f.pow(2).mean(1).view(B, -1)); (a_s − a_t)².mean()
    s, t = _same_size(s, t.detach())
    total = 0.0
    for b in range(s.shape[0]):
        a_s, a_t = (s[b] ** 2).mean(0).flatten(), (t[b] ** 2).mean(0).flatten()
        total = total + ((a_s / a_s.norm() - a_t / a_t.norm()) ** 2).sum()
    return total / (s.shape[0] * s.shape[2] * s.shape[3])


def _sp_ref(s, t):  # SP.py: G = f fᵀ, rows normalised, Σ (G_t − G_s)² / B²
    B = s.shape[0]
    total = 0.0
    for i in range(B):
        g_s = torch.stack([(s[i] * s[j]).sum() for j in range(B)])
        g_t = torch.stack([(t[i] * t[j]).sum() for j in range(B)]).detach()
        total = total + ((g_t / g_t.norm() - g_s / g_s.norm()) ** 2).sum()
    return total / (B * B)


def _cc_ref(s, t):  # CC.py: mean over b of Σ_d |δ_b|·|δ_{b+1}|
    B = s.shape[0]
    return sum(((s[b] - t[b]).abs() * (s[b + 1] - t[b + 1]).abs()).sum() for b in range(B - 1)) / (B - 1)


def _vid_ref(mu, t, log_scale):  # VID.py: ½((μ − t)²/σ² + log σ²), σ² = log(1 + exp(s)) + 1e-5
    total = 0.0
    for c in range(t.shape[1]):
        var = torch.log(1 + torch.exp(log_scale[c])) + 1e-5
        total = total + (0.5 * ((mu[:, c] - t[:, c].detach()) ** 2 / var + torch.log(var))).sum()
    return total / t.numel()


def _rkd_ref(s, t):  # RKD.py: 25·smooth_l1(distances) + 50·smooth_l1(angles)
    t = t.detach()
    B = s.shape[0]

    def distances(e):
        d = torch.stack([torch.stack([(e[i] - e[j]).norm() if i != j else e.new_zeros(())
                                      for j in range(B)]) for i in range(B)])
        return d / (d.sum() / (B * (B - 1)))

    def angles(e):
        out = []
        for i in range(B):
            for j in range(B):
                for k in range(B):
                    u = (e[j] - e[i]) / (e[j] - e[i]).norm() if j != i else e.new_zeros(e.shape[1])
                    v = (e[k] - e[i]) / (e[k] - e[i]).norm() if k != i else e.new_zeros(e.shape[1])
                    out.append((u * v).sum())
        return torch.stack(out)

    return 25 * _smooth_l1(distances(s), distances(t)) + 50 * _smooth_l1(angles(s), angles(t))


def _pkt_ref(s, t):  # PKT.py: rows of (1 + cos)/2 normalised, mean t·log((t + ε)/(s + ε))
    eps, B = 1e-7, s.shape[0]

    def probs(e):
        e = torch.stack([e[i] / (e[i].norm() + eps) for i in range(B)])
        sim = torch.stack([torch.stack([((e[i] * e[j]).sum() + 1) / 2 for j in range(B)])
                           for i in range(B)])
        return torch.stack([sim[i] / sim[i].sum() for i in range(B)])

    p_s, p_t = probs(s), probs(t.detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum() / (B * B)


def _fsp_matrix_ref(bot, top):  # FSP.py compute_fsp: fsp[b, j, i] = mean_hw top_j · bot_i
    bot, top = _same_size(bot, top)
    return torch.stack([torch.stack([torch.stack([(top[b, j] * bot[b, i]).mean()
                                                  for i in range(bot.shape[1])])
                                     for j in range(top.shape[1])]) for b in range(bot.shape[0])])


def _fsp_ref(s0, s1, s2, t0, t1, t2):
    s, t = [s0, s1, s2], [m.detach() for m in (t0, t1, t2)]
    return sum(((_fsp_matrix_ref(s[i], s[i + 1]) - _fsp_matrix_ref(t[i], t[i + 1])) ** 2).mean()
               for i in range(2))


def _nst_ref(s, t):  # NST.py: mean k(t,t) + mean k(s,s) − 2 mean k(s,t), k(a,b) = (a·b)²
    s, t = _same_size(s, t.detach())
    s = s.flatten(2) / s.flatten(2).norm(dim=2, keepdim=True)
    t = t.flatten(2) / t.flatten(2).norm(dim=2, keepdim=True)

    def k(a, b):
        return torch.stack([((a[n, i] * b[n, j]).sum()) ** 2 for n in range(a.shape[0])
                            for i in range(a.shape[1]) for j in range(b.shape[1])]).mean()

    return k(t, t) + k(s, s) - 2 * k(s, t)


def _crd_ref(v, rows):  # memory.py: exp(⟨m, v⟩ / T) then criterion.py's NCE with Z = 2.5, N = 50
    T, Z, N, eps = 0.07, 2.5, 50, 1e-7
    B, K1 = rows.shape[:2]
    m_pn = (K1 - 1) / N
    total = 0.0
    for b in range(B):
        for k in range(K1):
            p = torch.exp((rows[b, k].detach() * v[b]).sum() / T) / Z
            total = total + (torch.log(p / (p + m_pn + eps)) if k == 0
                             else torch.log(m_pn / (p + m_pn + eps)))
    return -total / B


def _crd(v, rows):
    return losses.crd_nce_loss(losses.crd_scores(v, rows, 0.07), 2.5, 50)


def _fsp(s0, s1, s2, t0, t1, t2):
    return losses.fsp_loss([s0, s1, s2], [t0, t1, t2])


REF = {losses.hint_loss: _hint_ref, losses.at_loss: _at_ref, losses.sp_loss: _sp_ref,
       losses.cc_loss: _cc_ref, losses.vid_loss: _vid_ref, losses.rkd_loss: _rkd_ref,
       losses.pkt_loss: _pkt_ref, losses.nst_loss: _nst_ref, _fsp: _fsp_ref, _crd: _crd_ref}


def _crd_inputs():
    v = F.normalize(_rand(3, 5, seed=1, grad=False), dim=1).requires_grad_()
    return v, F.normalize(_rand(3, 4, 5, seed=2, grad=False), dim=2)


CASES = {  # name: (function, inputs); pooled cases have maps of different sizes
    "hint": (losses.hint_loss, lambda: (_rand(2, 3, 4, 4), _rand(2, 3, 4, 4, seed=1, grad=False))),
    "at": (losses.at_loss, lambda: (_rand(2, 3, 4, 4), _rand(2, 5, 4, 4, seed=1, grad=False))),
    "at-pooled": (losses.at_loss, lambda: (_rand(2, 3, 4, 4), _rand(2, 5, 2, 2, seed=1, grad=False))),
    "at-pooled-teacher": (losses.at_loss,
                          lambda: (_rand(2, 3, 2, 2), _rand(2, 5, 4, 4, seed=1, grad=False))),
    "sp": (losses.sp_loss, lambda: (_rand(4, 3, 2, 2), _rand(4, 6, 2, 1, seed=1, grad=False))),
    "cc": (losses.cc_loss, lambda: (_rand(4, 5), _rand(4, 5, seed=1))),
    "vid": (losses.vid_loss, lambda: (_rand(2, 3, 2, 2), _rand(2, 3, 2, 2, seed=1, grad=False),
                                      _rand(3, seed=2))),
    "rkd": (losses.rkd_loss, lambda: (_rand(4, 3), _rand(4, 6, seed=1, grad=False))),
    "pkt": (losses.pkt_loss, lambda: (_rand(4, 3), _rand(4, 6, seed=1, grad=False))),
    "fsp": (_fsp, lambda: (_rand(2, 2, 4, 4), _rand(2, 3, 4, 4, seed=1), _rand(2, 2, 2, 2, seed=2),
                           _rand(2, 2, 4, 4, seed=3, grad=False), _rand(2, 3, 4, 4, seed=4, grad=False),
                           _rand(2, 2, 2, 2, seed=5, grad=False))),
    "nst": (losses.nst_loss, lambda: (_rand(2, 3, 4, 4), _rand(2, 4, 2, 2, seed=1, grad=False))),
    "crd": (_crd, _crd_inputs),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_official_formula_with_gradients(case):
    fn, inputs = CASES[case]
    _check(fn, *inputs())


@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradient_is_numerically_right(case):
    fn, inputs = CASES[case]
    xs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs()]
    assert torch.autograd.gradcheck(fn, xs)


@pytest.mark.parametrize("fn, teacher_shape", [
    (losses.hint_loss, (3, 3, 4, 4)), (losses.at_loss, (3, 3, 2, 2)), (losses.sp_loss, (3, 5)),
    (losses.rkd_loss, (3, 5)), (losses.pkt_loss, (3, 5)), (losses.nst_loss, (3, 3, 2, 2))])
def test_teacher_features_get_no_gradient(fn, teacher_shape):
    student = _rand(*((3, 3, 4, 4) if len(teacher_shape) == 4 else (3, 5)))
    teacher = _rand(*teacher_shape, seed=1)
    fn(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_losses_hand_computed():
    # FitNet: MSE of [1, 2, 3, 4] against zeros.
    assert losses.hint_loss(torch.arange(1.0, 5.0).view(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 7.5
    # AT: F = [√3, 2] gives F² = [3, 4] → [0.6, 0.8]; teacher [1, 0] → [1, 0]; mean of 0.4², 0.8².
    s, t = torch.tensor([[[[math.sqrt(3.0), 2.0]]]]), torch.tensor([[[[1.0, 0.0]]]])
    assert losses.at_loss(s, t).item() == pytest.approx(0.4)
    # CC: δ = [1, 2, 3] → (1·2 + 2·3) / 2.
    assert losses.cc_loss(torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3, 1)).item() == 4.0
    # VID: σ² = 1 (log_scale = softplus⁻¹(1 − eps)) and μ − t = 2 → ½·(4/1 + log 1).
    ls = torch.full((1,), math.log(math.expm1(1 - 1e-5)))
    vid = losses.vid_loss(torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1), ls)
    assert vid.item() == pytest.approx(2.0)
    # FSP of a one-channel pair: mean of [1, 2, 3, 4] · 1.
    assert losses.fsp_matrix(torch.arange(1.0, 5.0).view(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item() == 2.5
    # CRD NCE, one positive and one negative scored 1, Z = 1, N = 2: m·P_n = 1/2.
    want = -(math.log(1 / 1.5) + math.log(0.5 / 1.5))
    assert losses.crd_nce_loss(torch.ones(1, 2), 1.0, 2).item() == pytest.approx(want, rel=1e-6)


def test_relational_losses_ignore_scale_and_vanish_for_equal_features():
    e = _rand(5, 4, grad=False)
    assert losses.rkd_loss(e, 7 * e).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.pkt_loss(e, 7 * e).item() == pytest.approx(0.0, abs=1e-6)
    f = _rand(3, 4, 2, 2, grad=False)
    assert losses.sp_loss(f, 7 * f).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.at_loss(f, 7 * f).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.nst_loss(f, 7 * f).item() == pytest.approx(0.0, abs=1e-5)


def test_feature_losses_stay_fp32_under_bf16_autocast():
    s, t = _rand(4, 3, 4, 4, grad=False), _rand(4, 3, 4, 4, seed=1, grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (losses.sp_loss, losses.nst_loss):
            out = fn(s.bfloat16(), t.bfloat16())
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, fn(s.bfloat16().float(), t.bfloat16().float()))


def test_loss_shape_errors_are_clear():
    with pytest.raises(ValueError, match="regress the student"):
        losses.hint_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="equal ones"):
        losses.fsp_loss([torch.zeros(1, 2, 2, 2)] * 2, [torch.zeros(1, 3, 2, 2)] * 2)
    with pytest.raises(ValueError, match="two samples"):
        losses.cc_loss(torch.zeros(1, 3), torch.zeros(1, 3))


# ---- feature taps -----------------------------------------------------------------------------

def test_taps_by_index_and_by_module_in_one_pass():
    model = timm.create_model("wrn_16_2_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = forward_with_maps(model, x, [2, "block3", -1, 1], with_embedding=True)
    # RepDistiller's WRN feat: f1 = block1, f2 = block2, f3 = the raw block3 sum.
    f1 = model.block1(model.conv1(x))
    f2 = model.block2(f1)
    f3 = model.block3(f2)
    last = F.relu(model.bn1(f3))
    for got, want in zip(out.maps, [f2, f3, last, f1]):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(f3, last)  # why the WRN presets tap "block3", not index 3
    torch.testing.assert_close(out.logits, model(x))
    torch.testing.assert_close(out.embedding, last.mean((2, 3)))
    with pytest.raises(ValueError, match="out of range"):
        forward_with_maps(model, x, [4])
    with pytest.raises(ValueError, match="not a submodule"):
        forward_with_maps(model, x, ["block9"])


# ---- methods on the CIFAR nets -------------------------------------------------------------------

REPDISTILLER_B = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0, "rkd": 1.0,
                  "pkt": 30000.0, "nst": 50.0, "crd": 0.8}
"""``-b`` of each method in RepDistiller's scripts/run_cifar_distill.sh (FSP: see its tests)."""
DEFAULT_TAPS = {"fitnet": [2], "at": [1, 2, 3], "nst": [1, 2, 3], "vid": [1, 2, 3], "sp": [-1],
                "fsp": [0, 1, 2, 3], "rkd": [], "pkt": [], "cc": [], "crd": []}
DATA = DataSpec(num_classes=10, num_samples=50, batch_size=4)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """resnet8x4 (channels 32, 64, 128, 256), a wider teacher than resnet20 (16, 16, 32, 64)."""
    path = tmp_path_factory.mktemp("teacher") / "resnet8x4.safetensors"
    teacher = timm.create_model("resnet8x4_cifar", num_classes=10)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return path


def _method(name, teacher_file, student="resnet20_cifar", teacher="resnet8x4_cifar", **kwargs):
    cfg = get_method_config_class(name)(name=name, teacher=teacher,
                                        teacher_checkpoint=str(teacher_file), **kwargs)
    return create_method(cfg, timm.create_model(student, num_classes=10), DATA).train()


def _batch(n=4):
    return {"image": torch.randn(n, 3, 32, 32), "label": torch.arange(n) % 10,
            "index": torch.arange(n) * 7 % DATA.num_samples}


FORMULAS = {  # the unweighted feature loss from the features, the method's modules and skd.losses
    "fitnet": lambda m, s, t: losses.hint_loss(m.regressor(s.maps[0]), t.maps[0]),
    "at": lambda m, s, t: sum(losses.at_loss(a, b) for a, b in zip(s.maps, t.maps)),
    "nst": lambda m, s, t: sum(losses.nst_loss(a, b) for a, b in zip(s.maps, t.maps)),
    "sp": lambda m, s, t: losses.sp_loss(s.maps[0], t.maps[0]),
    "vid": lambda m, s, t: sum(losses.vid_loss(r.regressor(a), b, r.log_scale)
                               for a, b, r in zip(s.maps, t.maps, m.regressors)),
    "rkd": lambda m, s, t: losses.rkd_loss(s.embedding, t.embedding),
    "pkt": lambda m, s, t: losses.pkt_loss(s.embedding, t.embedding),
    "cc": lambda m, s, t: losses.cc_loss(m.embed_s(s.embedding), m.embed_t(t.embedding)),
}


@pytest.mark.parametrize("name", list(FORMULAS))
def test_method_loss_is_repdistillers_weighted_sum(teacher_file, name):
    method = _method(name, teacher_file)
    assert method.taps == DEFAULT_TAPS[name]
    assert (method.cfg.ce_weight, method.cfg.kd_weight) == (1.0, 0.0)  # -r 1 -a 0
    assert method.cfg.feat_weight == REPDISTILLER_B[name]
    batch = _batch()
    out = method(batch)
    assert set(out["parts"]) == {"ce", name}
    torch.testing.assert_close(out["loss"], sum(out["parts"].values()))

    student = forward_with_maps(method.model, batch["image"], method.taps, method.with_embedding)
    teacher = forward_with_maps(method.teacher, batch["image"], method.taps, method.with_embedding)
    torch.testing.assert_close(out["parts"]["ce"], F.cross_entropy(student.logits, batch["label"]))
    torch.testing.assert_close(out["parts"][name],
                               REPDISTILLER_B[name] * FORMULAS[name](method, student, teacher))

    out["loss"].backward()
    assert next(method.model.parameters()).grad.abs().sum() > 0
    extra = [p for n, p in method.named_parameters() if not n.startswith(("model.", "teacher."))]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra)
    assert all(p.grad is None for p in method.teacher.parameters())


def test_kd_weight_adds_the_kd_term(teacher_file):
    method = _method("at", teacher_file, kd_weight=0.9, temperature=4.0)
    batch = _batch()
    out = method(batch)
    assert set(out["parts"]) == {"ce", "kl", "at"}
    with torch.no_grad():
        teacher_logits = method.teacher(batch["image"])
    torch.testing.assert_close(out["parts"]["kl"], 0.9 * losses.kd_loss(out["logits"], teacher_logits, 4.0))


def test_default_stages_follow_the_model():
    # RepDistiller's feat[1:-1]: f1..f3 on its ResNets, f1..f4 on its VGGs (512 channels at 4x4).
    assert stages_after_stem(timm.create_model("resnet20_cifar")) == [1, 2, 3]
    vgg = timm.create_model("vgg8_cifar")
    assert stages_after_stem(vgg) == [1, 2, 3, 4]
    assert [m.shape[1:] for m in probe_features(vgg, [3, 4]).maps] == [(512, 4, 4)] * 2


@pytest.mark.parametrize("student_shape, teacher_shape, kind, kernel", [
    ((16, 16, 16), (32, 16, 16), torch.nn.Conv2d, (1, 1)),
    ((16, 16, 16), (32, 8, 8), torch.nn.Conv2d, (3, 3)),
    ((16, 8, 8), (32, 16, 16), torch.nn.ConvTranspose2d, (4, 4)),
    ((16, 8, 8), (32, 6, 5), torch.nn.Conv2d, (3, 4)),
])
def test_fitnet_regressor_is_convreg(student_shape, teacher_shape, kind, kernel):
    regressor = make_regressor(student_shape, teacher_shape)
    conv, bn, relu = regressor
    assert type(conv) is kind and conv.kernel_size == kernel and conv.bias is not None
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert regressor(torch.randn(2, *student_shape)).shape == (2, *teacher_shape)


def test_fitnet_regressor_rejects_a_much_larger_teacher_map():
    with pytest.raises(ValueError, match="FitNet"):
        make_regressor((16, 4, 4), (32, 16, 16))


def test_vid_regressors_match_repdistiller(teacher_file):
    method = _method("vid", teacher_file)
    assert len(method.regressors) == 3
    for r, (c_s, c_t) in zip(method.regressors, [(16, 64), (32, 128), (64, 256)]):
        convs = [m for m in r.regressor if isinstance(m, torch.nn.Conv2d)]
        assert [c.weight.shape[:2] for c in convs] == [(c_t, c_s), (c_t, c_t), (c_t, c_t)]
        assert all(c.bias is None and c.kernel_size == (1, 1) for c in convs)
        torch.testing.assert_close(F.softplus(r.log_scale) + 1e-5, torch.full((c_t,), 5.0))
    # A larger student map is pooled before the regressor.
    r = VariationalRegressor(3, 4, 4)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(r(s, t), losses.vid_loss(r.regressor(_block_pool(s, 2)), t, r.log_scale))


def test_bad_taps_fail_at_construction(teacher_file):
    with pytest.raises(ValueError, match="out of range"):
        _method("at", teacher_file, features=[7])
    with pytest.raises(ValueError, match="not a submodule"):
        _method("fitnet", teacher_file, hint_layer="block3")  # a WRN name on a ResNet
    with pytest.raises(ValueError, match="method.features"):
        load_config(None, ["method.name=sp", "method.features=[]"])


# ---- FSP: init stage, then the CE stage ---------------------------------------------------------

def test_fsp_trains_features_only_then_ce_only(teacher_file):
    method = _method("fsp", teacher_file, student="resnet8x4_cifar", init_epochs=2)
    assert method.taps == [0, 1, 2, 3] and method.init_stage
    calls = []
    method.teacher.register_forward_hook(lambda *a: calls.append(1))
    head = method.model.get_classifier()
    head_before = head.weight.detach().clone()
    optimizer = create_optimizer_v2(method, opt="momentum", lr=0.1, weight_decay=5e-4)

    method.start_epoch(1, 10)
    batch = _batch()
    out = method(batch)
    assert set(out["parts"]) == {"fsp"}
    student = forward_with_maps(method.model, batch["image"], method.taps)
    teacher = forward_with_maps(method.teacher, batch["image"], method.taps)
    torch.testing.assert_close(out["loss"], losses.fsp_loss(student.maps, teacher.maps))
    out["loss"].backward()
    assert head.weight.grad is None and method.model.conv1.weight.grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(head.weight, head_before)  # the classifier is idle, weight decay included
    optimizer.zero_grad()

    calls.clear()
    method.start_epoch(2, 10)
    out = method(batch)
    assert set(out["parts"]) == {"ce"} and not calls  # no teacher pass without KD
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], batch["label"]))
    method.cfg.kd_weight = 0.5
    assert set(method(batch)["parts"]) == {"ce", "kl"}


def test_fsp_needs_equal_channels_and_one_process(teacher_file, monkeypatch):
    with pytest.raises(ValueError, match="equal channel counts"):
        _method("fsp", teacher_file)  # resnet20 (16, 16, 32, 64) vs resnet8x4 (32, 64, 128, 256)
    import skd.methods.fsp as fsp_module
    monkeypatch.setattr(fsp_module, "world", lambda: (0, 2))  # as on the first of two processes
    with pytest.raises(ValueError, match="one process"):
        _method("fsp", teacher_file, student="resnet8x4_cifar")
    assert not _method("fsp", teacher_file, student="resnet8x4_cifar", init_epochs=0).init_stage


# ---- CRD: embeddings, memories, negatives, the normaliser ----------------------------------------

def test_crd_step_matches_repdistiller(teacher_file):
    method = _method("crd", teacher_file, nce_k=16384)
    assert method.num_negatives == DATA.num_samples - 1  # capped at N − 1
    stdv = 1 / math.sqrt(128 / 3)
    for memory in (method.memory_s, method.memory_t):
        assert memory.rows.shape == (50, 128) and memory.rows.abs().max() <= stdv
        assert memory.rows.std() > stdv / 3  # filled, not zeros
    assert torch.equal(method.normalizer, torch.tensor([-1.0, -1.0]))
    old_s, old_t = method.memory_s.rows.clone(), method.memory_t.rows.clone()

    batch = _batch()
    torch.manual_seed(1)
    out = method(batch)
    torch.manual_seed(1)
    contrast = method.contrast_index(batch["index"])  # the same draws
    assert torch.equal(contrast[:, 0], batch["index"])
    assert not (contrast[:, 1:] == batch["index"][:, None]).any()

    student = forward_with_maps(method.model, batch["image"], [], with_embedding=True)
    teacher = forward_with_maps(method.teacher, batch["image"], [], with_embedding=True)
    v_s = F.normalize(method.embed_s(student.embedding), dim=1)
    v_t = F.normalize(method.embed_t(teacher.embedding), dim=1)
    scores_s = losses.crd_scores(v_s, old_t[contrast], 0.07)
    scores_t = losses.crd_scores(v_t, old_s[contrast], 0.07)
    z = torch.stack([scores_s.mean(), scores_t.mean()]).detach() * 50  # Z at the first step
    torch.testing.assert_close(method.normalizer, z)
    want = losses.crd_nce_loss(scores_s, z[0], 50) + losses.crd_nce_loss(scores_t, z[1], 50)
    torch.testing.assert_close(out["parts"]["crd"], 0.8 * want)

    out["loss"].backward()
    assert method.embed_t.weight.grad.abs().sum() > 0  # the teacher's embedding learns
    assert all(p.grad is None for p in method.teacher.parameters())
    method.after_step(batch, out)
    i = batch["index"]
    for memory, old, v in ((method.memory_s, old_s, v_s), (method.memory_t, old_t, v_t)):
        want_rows = F.normalize(0.5 * old[i] + 0.5 * v.detach(), dim=1)
        torch.testing.assert_close(memory.rows[i], want_rows)
        untouched = torch.ones(50, dtype=torch.bool).index_fill_(0, i, False)
        assert torch.equal(memory.rows[untouched], old[untouched])

    method(_batch())  # Z stays what the first step set
    torch.testing.assert_close(method.normalizer, z)


def test_crd_state_round_trips_through_a_checkpoint(teacher_file):
    method = _method("crd", teacher_file, nce_k=8)
    out = method(_batch())
    method.after_step(_batch(), out)
    state = copy.deepcopy(method.trainable_state_dict())
    assert "normalizer" in state and "memory_s._extra_state" in state

    resumed = _method("crd", teacher_file, nce_k=8)
    resumed.load_trainable_state_dict(state)
    assert torch.equal(resumed.memory_s.rows, method.memory_s.rows)
    assert torch.equal(resumed.memory_t.rows, method.memory_t.rows)
    resumed(_batch())
    assert torch.equal(resumed.normalizer, method.normalizer)  # not set again after a resume


# ---- presets: one per cell of the table -----------------------------------------------------------

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "cifar100_repdistiller"
PAIRS = [("wrn_16_2", "wrn_40_2"), ("wrn_40_1", "wrn_40_2"), ("resnet20", "resnet56"),
         ("resnet20", "resnet110"), ("resnet32", "resnet110"), ("resnet8x4", "resnet32x4"),
         ("vgg8", "vgg13")]
METHODS = [*REPDISTILLER_B, "fsp"]


def test_every_table_cell_has_a_preset_with_repdistillers_recipe():
    count = 0
    for name in METHODS:
        for student, teacher in PAIRS:
            path = PRESETS / f"{name}_{student}_from_{teacher}.yaml"
            if name == "fsp" and student == "wrn_40_1":  # N/A in the table: channels differ
                assert not path.exists()
                continue
            count += 1
            cfg = load_config(path)
            kd = load_config(PRESETS / f"kd_{student}_from_{teacher}.yaml")
            m = cfg.method
            assert (m.name, cfg.model.name, m.teacher) == (name, f"{student}_cifar", f"{teacher}_cifar")
            assert (m.ce_weight, m.kd_weight) == (1.0, 0.0)
            assert m.feat_weight == (1.0 if name == "fsp" else REPDISTILLER_B[name])
            assert (cfg.data, cfg.optim) == (kd.data, kd.optim)
            if name == "fsp":  # 30 init epochs before RepDistiller's 240
                assert (cfg.epochs, m.init_epochs) == (270, 30)
                assert cfg.sched.decay_milestones == [m + 30 for m in kd.sched.decay_milestones]
            else:
                assert (cfg.epochs, cfg.sched) == (kd.epochs, kd.sched)
            if student.startswith("wrn") and hasattr(m, "features"):
                assert m.features[-1] == "block3"  # RepDistiller's WRN f3
    assert count == 69
