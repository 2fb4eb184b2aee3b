"""skd.losses against independent float64 computations written here (docs/methods.md §1-7).

Every loss is compared in value and in gradient with a reference that follows the official code
line by line (or an explicit per-row loop), never with skd.losses internals. Inputs are fp32, as
in training; the references run in fp64.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skd_kernels
from skd import losses

# nn.KLDivLoss(reduction="mean") warns that 'mean' is not 'batchmean': that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")

N, C = 6, 11
TOL = dict(rtol=1e-5, atol=1e-6)


def _logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).requires_grad_()


def _labels(n=N, c=C, seed=1):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _ref_grad(fn, *inputs):
    """Value and gradients of ``fn`` at fp64 copies of ``inputs``."""
    xs = [x.detach().double().requires_grad_() for x in inputs]
    value = fn(*xs)
    grads = torch.autograd.grad(value, xs, allow_unused=True)
    return value.detach(), grads


def _check(loss, inputs, ref_value, ref_grads):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach().double(), ref_value, **TOL)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got.double(), want, **TOL)


def _ce_ref(z, y):
    return -z.log_softmax(1)[torch.arange(len(y)), y].mean()


def _kl_rows_ref(p, log_q):
    """Σ_c p·(log p − log q) per row, 0·log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - log_q), torch.zeros_like(p)).sum(1)


# ---- cross_entropy ----------------------------------------------------------------------------

def test_cross_entropy_hand_computed():
    z = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    y = torch.tensor([1])
    assert losses.cross_entropy(z, y).item() == pytest.approx(-math.log(0.75))
    # uniform, ε = 0.2, C = 2: q = [0.1, 0.9]
    want = -(0.1 * math.log(0.25) + 0.9 * math.log(0.75))
    assert losses.cross_entropy(z, y, 0.2).item() == pytest.approx(want)
    # others, ε = 0.2, C = 2: q = [0.2, 0.8]
    want = -(0.2 * math.log(0.25) + 0.8 * math.log(0.75))
    assert losses.cross_entropy(z, y, 0.2, "others").item() == pytest.approx(want)


@pytest.mark.parametrize("mode", ["uniform", "others"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_reference(mode, eps):
    z, y = _logits(N, C), _labels()

    def ref(z):
        if mode == "uniform":
            q = torch.full_like(z, eps / C)
            q[torch.arange(N), y] += 1 - eps
        else:  # TF-KD loss_label_smoothing: ε/(C−1) off the label, sum ÷ N
            q = torch.full_like(z, eps / (C - 1))
            q[torch.arange(N), y] = 1 - eps
        return -(q * z.log_softmax(1)).sum() / N

    _check(losses.cross_entropy(z, y, eps, mode), [z], *_ref_grad(ref, z))


def test_cross_entropy_rejects_unknown_mode():
    with pytest.raises(ValueError, match="smoothing_mode"):
        losses.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.1, "other")


# ---- kd_loss ----------------------------------------------------------------------------------

def test_kd_loss_hand_computed():
    s = torch.zeros(1, 2)
    t = torch.tensor([[0.0, math.log(3.0)]])  # teacher [1/4, 3/4], student [1/2, 1/2]
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert losses.kd_loss(s, t, 1.0).item() == pytest.approx(kl)
    # T = 2 with doubled teacher logits: the same distributions, times T² = 4
    assert losses.kd_loss(s, 2 * t, 2.0).item() == pytest.approx(4 * kl)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_matches_repdistiller_distill_kl(T):
    s, t = _logits(N, C), _logits(N, C, seed=2)

    def ref(s, t):  # DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) · T² / N
        return F.kl_div((s / T).log_softmax(1), (t / T).softmax(1).detach(),
                        reduction="sum") * T * T / N

    _check(losses.kd_loss(s, t, T), [s, t], *_ref_grad(ref, s, t))


# ---- cskd_loss --------------------------------------------------------------------------------

def test_cskd_loss_matches_official_and_partner_gets_no_gradient():
    a, p, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    T, lam = 4.0, 3.0

    def ref(a, p):  # cs-kd train.py: CE(anchor) + lam·KLDivLoss(sum)(…, softmax(p/T)).detach·T²/B
        kl = (_kl_rows_ref((p.detach() / T).softmax(1), (a / T).log_softmax(1))).sum()
        return _ce_ref(a, y) + lam * kl * T * T / N

    loss = losses.cskd_loss(a, p, y, T, lam)
    value, grads = _ref_grad(ref, a, p)
    assert grads[1] is None
    _check(loss, [a, p], value, grads)


# ---- TF-KD ------------------------------------------------------------------------------------

def test_tfkd_reg_loss_uses_kldivloss_mean_reduction():
    z, y = _logits(N, C), _labels()
    T, alpha, m, a = 20.0, 0.1, 100.0, 0.99

    def ref(z, reduction="mean"):  # my_loss_function.py::loss_kd_regularization
        teacher = torch.full_like(z, (1 - a) / (C - 1))
        teacher[torch.arange(N), y] = a
        kl = nn.KLDivLoss(reduction=reduction)(z.log_softmax(1), (teacher / T).softmax(1))
        return (1 - alpha) * F.cross_entropy(z, y) + alpha * kl * m

    _check(losses.tfkd_reg_loss(z, y, T, alpha, m), [z], *_ref_grad(ref, z))
    _check(losses.tfkd_reg_loss(z, y, T, alpha, m, kl_reduction="batchmean"), [z],
           *_ref_grad(lambda z: ref(z, "batchmean"), z))


def test_tfkd_reg_virtual_teacher_is_nearly_uniform():
    # docs/methods.md §4.1: C = 100, T = 20 gives q_gt = 0.01050, q_other = 0.009995. At alpha = 1 the
    # loss is m·KL_mean(q ‖ softmax(z)); with z = log q it is 0, so q is the minimiser.
    q_gt = math.exp(0.99 / 20) / (math.exp(0.99 / 20) + 99 * math.exp(0.01 / 99 / 20))
    assert q_gt == pytest.approx(0.01050, abs=5e-6)
    q = torch.full((1, 100), (1 - q_gt) / 99)
    q[0, 3] = q_gt
    z = q.log()
    assert losses.tfkd_reg_loss(z, torch.tensor([3]), 20.0, 1.0, 100.0).item() == pytest.approx(
        0.0, abs=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_tfkd_self_loss_matches_official(reduction):
    s, t, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    T, alpha, m = 6.0, 0.95, 50.0

    def ref(s, t):  # loss_kd_self
        kl = nn.KLDivLoss(reduction=reduction)((s / T).log_softmax(1), (t.detach() / T).softmax(1))
        return (1 - alpha) * F.cross_entropy(s, y) + alpha * kl * T * T * m

    _check(losses.tfkd_self_loss(s, t, y, T, alpha, m, kl_reduction=reduction), [s, t],
           *_ref_grad(ref, s, t))


def test_tfkd_mean_is_batchmean_over_num_classes():
    s, t, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    mean = losses.tfkd_self_loss(s, t, y, 4.0, 1.0, 1.0)
    batchmean = losses.tfkd_self_loss(s, t, y, 4.0, 1.0, 1.0, kl_reduction="batchmean")
    torch.testing.assert_close(mean * C, batchmean)


# ---- NKD --------------------------------------------------------------------------------------

def _nkd_explicit(s, t, y, lam, gamma):
    """The pre-mask-removal form (cls_KD master 8a16562): tempered probabilities over all
    classes, non-target ones divided by (1 − p_t) — T_i/(1−T_t)."""
    rows = torch.arange(len(y))
    target = -(t.detach().softmax(1)[rows, y] * s.log_softmax(1)[rows, y]).mean()
    p_s, p_t = (s / lam).softmax(1), (t.detach() / lam).softmax(1)
    not_t = torch.ones_like(s, dtype=torch.bool)
    not_t[rows, y] = False
    ps_nt = p_s / (1 - p_s[rows, y])[:, None]
    pt_nt = p_t / (1 - p_t[rows, y])[:, None]
    non = -gamma * lam ** 2 * (pt_nt * ps_nt.log() * not_t).sum(1).mean()
    return target + non


@pytest.mark.parametrize("lam,gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_loss_equals_explicit_normalised_form(lam, gamma):
    s, t, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    value, grads = _ref_grad(lambda s, t: _nkd_explicit(s, t, y, lam, gamma), s, t)
    assert grads[1] is None
    _check(losses.nkd_loss(s, t, y, lam, gamma), [s, t], value, grads)


def test_nkd_removes_the_target_column():
    s, t, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    t2 = t.detach().clone()
    t2[torch.arange(N), y] += 5.0  # only the teacher's target logit changes

    def non_target(t):
        return losses.nkd_loss(s, t, y, 2.0, 1.5) - losses.nkd_loss(s, t, y, 2.0, 0.0)

    torch.testing.assert_close(non_target(t), non_target(t2))
    # …while the target part sees it, and a full-softmax KD (the 2023-07 bug) would too
    target_part = [losses.nkd_loss(s, t_, y, 2.0, 0.0) for t_ in (t, t2)]
    assert not torch.allclose(*target_part)
    assert not torch.allclose(losses.kd_loss(s, t, 2.0), losses.kd_loss(s, t2, 2.0))


def test_nkd_soft_labels_use_argmax():
    s, t, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    soft = 0.7 * F.one_hot(y, C) + 0.3 / C
    torch.testing.assert_close(losses.nkd_loss(s, t, soft), losses.nkd_loss(s, t, y))


# ---- USKD -------------------------------------------------------------------------------------

def _uskd_ref(z, w, labels, alpha, beta, mu, rank):
    """Per-row loop over the official uskd.py (1.0 HEAD for 'logprob', master 87a7197 for
    'prob'); integer or soft labels."""
    n, c = z.shape
    if labels.dim() > 1:
        vals, idx = labels.double().sort(1, descending=True)
        vals, idx = vals[:, :2], idx[:, :2]
        weak_q = 0.9 * labels.double() + 0.1 / c
    else:
        idx, vals = labels[:, None], torch.ones(n, 1, dtype=torch.float64)
        weak_q = 0.9 * F.one_hot(labels, c).double() + 0.1 / c
    log_s, log_w = z.log_softmax(1), w.log_softmax(1)
    s, wp = log_s.exp().detach(), log_w.exp().detach()
    s_t2 = torch.stack([s[i, idx[i]] ** 2 for i in range(n)])
    p_t = s_t2 + vals - s_t2.mean(0, keepdim=True)
    p_t = torch.where(vals == 0, torch.zeros_like(p_t), p_t)
    loss_t = -sum((p_t[i] * log_s[i, idx[i]]).sum() for i in range(n)) / n
    loss_weak = -(mu * weak_q * log_w).sum() / n
    loss_nt = 0.0
    for i in range(n):
        targets = idx[i].tolist()
        S = s[i] if rank == "prob" else log_s[i].detach()
        score = (wp[i] / (1 - wp[i, targets].sum() + 1e-6)
                 + S / (1 - S[targets].sum() + 1e-6)).tolist()
        order = sorted(range(c), key=lambda k: -score[k])
        zipf = {k: 1.0 / (pos + 1) for pos, k in enumerate(order)}
        others = [k for k in range(c) if k not in targets]
        total = sum(zipf[k] for k in others)
        log_nt = z[i, others].log_softmax(0)
        loss_nt = loss_nt - sum(zipf[k] / total * log_nt[j] for j, k in enumerate(others))
    return alpha * loss_t + beta * loss_nt / n + loss_weak


@pytest.mark.parametrize("rank", ["prob", "logprob"])
def test_uskd_loss_matches_reference(rank):
    z, w, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    alpha, beta, mu = 0.1, 0.1, 0.1
    value, grads = _ref_grad(lambda z, w: _uskd_ref(z, w, y, alpha, beta, mu, rank), z, w)
    _check(losses.uskd_loss(z, w, y, alpha, beta, mu, rank), [z, w], value, grads)


@pytest.mark.parametrize("rank", ["prob", "logprob"])
def test_uskd_loss_soft_labels_match_reference(rank):
    z, w, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    other = (y + 1 + torch.arange(N) % (C - 1)) % C  # a second class, never the first
    soft = 0.6 * F.one_hot(y, C).float() + 0.4 * F.one_hot(other, C).float()  # mixup
    value, grads = _ref_grad(lambda z, w: _uskd_ref(z, w, soft, 1.0, 0.1, 0.005, rank), z, w)
    _check(losses.uskd_loss(z, w, soft, 1.0, 0.1, 0.005, rank), [z, w], value, grads)


def _uskd_non_target(z, w, y, rank):
    """β·L_nt alone (β = 1, α = μ = 0)."""
    return losses.uskd_loss(z, w, y, alpha=0.0, beta=1.0, mu=0.0, rank=rank)


def _nt_loss(z, y, zipf_by_class):
    others = [k for k in range(z.shape[1]) if k != y]
    q = torch.tensor([zipf_by_class[k] for k in others], dtype=torch.float64)
    return -(q / q.sum() * z.double()[0, others].log_softmax(0)).sum()


def test_uskd_rank_modes_differ_and_weak_head_decides_under_prob():
    # label 0; final probabilities ≈ [.946, .047, .0064, .0003]; the weak head favours class 2.
    # prob:    class 1 scores .872 + .045, class 2 .118 + .909 → order 0, 2, 1, 3
    # logprob: the log-prob term (gap 2/(1 − log p0) ≈ 1.9) outweighs the weak one → 0, 1, 2, 3
    z = torch.tensor([[5.0, 2.0, 0.0, -3.0]])
    w = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    y = torch.tensor([0])
    ranked_weak_first = {1: 1 / 3, 2: 1 / 2, 3: 1 / 4}
    ranked_final_first = {1: 1 / 2, 2: 1 / 3, 3: 1 / 4}
    torch.testing.assert_close(_uskd_non_target(z, w, y, "prob").double(),
                               _nt_loss(z, 0, ranked_weak_first))
    torch.testing.assert_close(_uskd_non_target(z, w, y, "logprob").double(),
                               _nt_loss(z, 0, ranked_final_first))
    # a flat weak head: under "prob" the final logits decide again; "logprob" does not move
    flat = torch.zeros(1, 4)
    torch.testing.assert_close(_uskd_non_target(z, flat, y, "prob").double(),
                               _nt_loss(z, 0, ranked_final_first))
    torch.testing.assert_close(_uskd_non_target(z, flat, y, "logprob"),
                               _uskd_non_target(z, w, y, "logprob"))


def test_uskd_mu_is_inside_the_weak_loss_and_only_it_reaches_the_weak_head():
    z, w, y = _logits(N, C), _logits(N, C, seed=2), _labels()
    # L_weak = μ·CE(w, 0.9·onehot + 0.1/C): linear in μ, and the only term that depends on w
    # (the rank uses softmax(w) detached)
    l0, l1, l2 = (losses.uskd_loss(z, w, y, mu=mu) for mu in (0.0, 1.0, 2.0))
    torch.testing.assert_close(l2 - l0, 2 * (l1 - l0))
    torch.testing.assert_close(l1 - l0, losses.cross_entropy(w, y, 0.1))
    (grad_w,) = torch.autograd.grad(l0, w, allow_unused=True)
    assert grad_w is None or not grad_w.abs().any()


# ---- ICKD -------------------------------------------------------------------------------------

def _ickd_ref(fs, ft, norm):
    b, c = fs.shape[:2]
    total = 0.0
    for i in range(b):
        gs = fs[i].reshape(c, -1) @ fs[i].reshape(c, -1).T
        gt = ft[i].detach().reshape(c, -1) @ ft[i].detach().reshape(c, -1).T
        gs = gs / gs.norm(dim=1, keepdim=True)
        gt = gt / gt.norm(dim=1, keepdim=True)
        total = total + ((gs - gt) ** 2).sum()
    return total / (c * b * (b if norm == "imagenet" else 1))


@pytest.mark.parametrize("norm", ["cifar", "imagenet"])
def test_ickd_loss_matches_reference(norm):
    fs, ft = _logits(3, 5, 4, 4, scale=1.0), _logits(3, 5, 4, 4, scale=1.0, seed=2)
    value, grads = _ref_grad(lambda fs, ft: _ickd_ref(fs, ft, norm), fs, ft)
    assert grads[1] is None
    _check(losses.ickd_loss(fs, ft, norm), [fs, ft], value, grads)


def test_ickd_zero_for_identical_and_scaled_features():
    f = _logits(2, 3, 2, 2, scale=1.0).detach()
    assert losses.ickd_loss(f, f).item() == pytest.approx(0.0, abs=1e-7)
    # rows of the Gram matrix are L2-normalised, so a global scale cancels
    assert losses.ickd_loss(f, 7 * f).item() == pytest.approx(0.0, abs=1e-6)
    other = _logits(2, 3, 2, 2, scale=1.0, seed=2).detach()
    cifar, imagenet = losses.ickd_loss(f, other, "cifar"), losses.ickd_loss(f, other, "imagenet")
    assert cifar.item() > 0
    torch.testing.assert_close(imagenet, cifar / 2)  # ÷C·B² vs ÷C·B, B = 2


def test_ickd_rejects_unembedded_student():
    with pytest.raises(ValueError, match="channels"):
        losses.ickd_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 5, 3, 3))


# ---- DLB --------------------------------------------------------------------------------------

def _dlb_official(out, out_pre, pre_out, label, pre_label, T, alpha):
    """``Meta-knowledge-Lab/DLB`` ``dlb.py::train_one_epoch``, a step with a previous batch: CE of
    [repeated ; new], and the KL of the repeated samples against their logits one step earlier."""
    ce_loss = F.cross_entropy(torch.cat((out_pre, out), dim=0), torch.cat((pre_label, label), dim=0))
    dml_loss = F.kl_div(F.log_softmax(out_pre / T, dim=1), F.softmax(pre_out.detach() / T, dim=1),
                        reduction="batchmean") * T * T
    return ce_loss + alpha * dml_loss


@pytest.mark.parametrize("T, alpha", [(3.0, 1.0), (1.5, 0.3)])
def test_dlb_loss_matches_official_step(T, alpha):
    new, repeated, previous = _logits(N, C, seed=0), _logits(N - 2, C, seed=1), _logits(N - 2, C, seed=2)
    y, y_repeated = _labels(), _labels(N - 2, seed=3)
    ref = _ref_grad(lambda a, b, c: _dlb_official(a, b, c, y, y_repeated, T, alpha), new, repeated, previous)
    parts = losses.dlb_loss(new, y, repeated, y_repeated, previous, torch.ones(N - 2, dtype=torch.bool), T, alpha)
    _check(parts["ce"] + parts["kl"], [new, repeated, previous], *ref)  # no gradient to the targets


def test_dlb_loss_rows_without_target_get_ce_only():
    new, repeated, previous = _logits(N, C, seed=0), _logits(4, C, seed=1), _logits(4, C, seed=2)
    y, y_repeated = _labels(), _labels(4, seed=3)
    found = torch.tensor([True, False, True, True])
    T = 3.0

    def ref(a, b, c):
        ce = _ce_ref(torch.cat([b, a]), torch.cat([y_repeated, y]))
        rows = [T * T * _kl_rows_ref((c[i].detach() / T).softmax(0)[None], (b[i] / T).log_softmax(0)[None])
                for i in range(4) if found[i]]
        return ce + 0.5 * torch.cat(rows).mean()

    parts = losses.dlb_loss(new, y, repeated, y_repeated, previous, found, T, 0.5)
    _check(parts["ce"] + parts["kl"], [new, repeated, previous], *_ref_grad(ref, new, repeated, previous))
    none = losses.dlb_loss(new, y, repeated, y_repeated, previous, torch.zeros(4, dtype=torch.bool), T, 0.5)
    assert none["kl"].item() == 0.0


# ---- BYOT -------------------------------------------------------------------------------------

def _scan_official(outputs, features, y, lambda_kd, feature_weight):
    """BYOT's loss as its first author's code computes it (``ArchipLab-LinfengZhang/
    pytorch-scalable-neural-networks`` ``train.py`` and ``sresnet.py``): ``outputs``/``features``
    deepest first; a soft cross-entropy at T = 3 times 9, the hints summed over the batch."""
    teacher_output = outputs[0].detach()
    loss = F.cross_entropy(outputs[0], y)
    for output in outputs[1:]:
        soft = -(F.log_softmax(output / 3.0, dim=1) * F.softmax(teacher_output / 3.0, dim=1)).sum(dim=1).mean()
        loss = loss + soft * lambda_kd * 9 + F.cross_entropy(output, y) * (1 - lambda_kd)
    teacher_feature = features[0].detach()
    return loss + feature_weight * sum(((teacher_feature - f) ** 2).sum() for f in features[1:])


@pytest.mark.parametrize("lambda_kd", [0.5, 0.2])
def test_byot_loss_matches_the_official_code(lambda_kd):
    """The official soft cross-entropy is the KL plus the teacher's entropy, which has no gradient;
    the official 5e-7 on a sum over N rows is skd's per-row weight 5e-7·N."""
    D = 5
    z = [_logits(N, C, seed=s) for s in range(4)]  # deepest, then the three heads
    f = [_logits(N, D, scale=1.0, seed=10 + s) for s in range(4)]
    y = _labels()
    ref_value, ref_grads = _ref_grad(lambda *a: _scan_official(a[:4], a[4:], y, lambda_kd, 5e-7), *z, *f)
    p = (z[0].detach().double() / 3.0).softmax(1)
    entropy = -(p * p.log()).sum(1).mean()
    parts = losses.byot_loss(z[0], y, z[1:], f[1:], f[0], 3.0, lambda_kd, 5e-7 * N)
    _check(sum(parts.values()), [*z, *f], ref_value - 3 * lambda_kd * 9 * entropy, ref_grads)
    assert parts["hint"].item() == pytest.approx(5e-7 * sum(((f[0] - g) ** 2).sum().item() for g in f[1:]))


# ---- PS-KD ------------------------------------------------------------------------------------

def test_pskd_loss_is_the_kernel():
    assert losses.pskd_loss is skd_kernels.pskd_loss


@pytest.mark.parametrize("fn", [losses.kd_loss, losses.cskd_loss, losses.nkd_loss,
                                losses.uskd_loss, losses.tfkd_self_loss, losses.zipf_ls_loss,
                                losses.bake_loss])
def test_bf16_logits_give_fp32_loss(fn):
    z, t = (_logits(N, C, seed=seed).detach().bfloat16() for seed in (0, 2))
    y = _labels()
    args = {losses.kd_loss: (z, t, 4.0), losses.cskd_loss: (z, t, y), losses.nkd_loss: (z, t, y),
            losses.uskd_loss: (z, t, y), losses.tfkd_self_loss: (z, t, y, 4.0, 0.9, 1.0),
            losses.zipf_ls_loss: (z, y), losses.bake_loss: (z, losses.bake_soft_targets(t, t))}[fn]
    out = fn(*args)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_ickd_loss_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    fs, ft = (torch.randn(4, 8, 5, 5, generator=g) for _ in range(2))
    expected = losses.ickd_loss(fs, ft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.ickd_loss(fs.bfloat16(), ft.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, losses.ickd_loss(fs.bfloat16().float(), ft.bfloat16().float()))
    assert abs(out.item() - expected.item()) < 1e-2 * expected.item()


@pytest.mark.parametrize("k", [1, 2])
def test_drop_columns_removes_each_rows_labels_in_order(k):
    from skd.losses import _drop_columns
    g = torch.Generator().manual_seed(k)
    x = torch.randn(6, 7, generator=g)
    labels = torch.stack([torch.randperm(7, generator=g)[:k] for _ in range(6)])
    expected = torch.stack([x[i, [c for c in range(7) if c not in labels[i].tolist()]] for i in range(6)])
    assert torch.equal(_drop_columns(x, labels), expected)


# ---- Zipf's LS --------------------------------------------------------------------------------

def _zipf_ref(z, labels, dense_argmax=None, power=1.0):
    """megvii-research/zipfls pytorch_zipfls/losses.py: ``gen_pdf`` (distribution 'rank_zipf',
    rank 'hard': scipy's rankdata 'min' of the negated scores; with ``dense`` the scores are the
    per-location argmax votes, scattered as the official code does) and ``kl_loss`` (the target
    column masked out, ``F.kl_div(..., reduction='none').sum(1).mean()``)."""
    from scipy.stats import rankdata
    n, c = z.shape
    scores = z.detach()
    if dense_argmax is not None:
        count = dense_argmax.shape[1]
        scores = torch.zeros(n, max(c, count)).scatter_add(1, dense_argmax, torch.ones(n, count))[:, :c]
    rank = rankdata(-scores.numpy(), axis=1, method="min")
    dist = (1 / rank) ** power
    mask = torch.ones(n, c).scatter_(1, labels.unsqueeze(1), 0.0).bool()
    dist = dist[mask.numpy()].reshape(n, c - 1)
    pdf = torch.tensor(dist / dist.sum(axis=1, keepdims=True), dtype=torch.float64)
    res = F.log_softmax(z[mask].view(n, c - 1), dim=1)
    return F.kl_div(res, pdf, reduction="none").sum(1).mean()


def test_min_ranks_match_scipy_rankdata_with_ties():
    from scipy.stats import rankdata
    from skd.losses import _min_ranks
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (7, 300), generator=g).float()  # mostly ties
    assert torch.equal(_min_ranks(scores), torch.from_numpy(rankdata(-scores.numpy(), axis=1, method="min")))
    distinct = torch.randn(3, 50, generator=g)
    assert torch.equal(_min_ranks(distinct), torch.from_numpy(rankdata(-distinct.numpy(), axis=1, method="min")))


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_zipf_ls_loss_ranked_by_logits_matches_official(power):
    z, y = _logits(N, C), _labels()
    with torch.no_grad():
        z[0, 3] = z[0, 5]  # a tie: both classes share the lower rank
    value, grads = _ref_grad(lambda z: _zipf_ref(z, y, power=power), z)
    _check(losses.zipf_ls_loss(z, y, power=power), [z], value, grads)


@pytest.mark.parametrize("locations", [4, 16])
def test_zipf_ls_loss_ranked_by_dense_votes_matches_official(locations):
    """Few locations against 11 classes: most classes get no vote and share one rank."""
    z, y = _logits(N, C), _labels()
    location_logits = _logits(N, locations, C, seed=3).detach()
    votes = losses.dense_votes(location_logits)
    assert votes.shape == (N, C) and torch.equal(votes.sum(1), torch.full((N,), float(locations)))
    dense_argmax = location_logits.argmax(2)
    value, grads = _ref_grad(lambda z: _zipf_ref(z, y, dense_argmax), z)
    _check(losses.zipf_ls_loss(z, y, votes), [z], value, grads)


# ---- BAKE -------------------------------------------------------------------------------------

def _knowledge_ensemble_ref(feats, logits, temp, omega):
    """yxgeee/BAKE imagenet/pycls/core/trainer.py::knowledge_ensemble (one process), float64."""
    batch_size = logits.size(0)
    masks = torch.eye(batch_size, dtype=torch.float64)
    feats = F.normalize(feats, p=2, dim=1)
    logits = F.softmax(logits / temp, dim=1)
    W = torch.matmul(feats, feats.permute(1, 0)) - masks * 1e9
    W = F.softmax(W, dim=1)
    W = (1 - omega) * torch.inverse(masks - omega * W)
    return torch.matmul(W, logits)


def _bake_kd_ref(z, targets, temp):
    """The official KDLoss: KLDivLoss(reduction='sum')(log_softmax(z/T), Q)·T²/B."""
    log_p = torch.log_softmax(z / temp, dim=1)
    return nn.KLDivLoss(reduction="sum")(log_p, targets) * temp ** 2 / z.size(0)


@pytest.mark.parametrize("temp, omega", [(4.0, 0.5), (1.0, 0.9)])
def test_bake_soft_targets_and_loss_match_official(temp, omega):
    feats, z = _logits(N, 5, scale=1.0, seed=4), _logits(N, C)
    targets = losses.bake_soft_targets(feats, z, temp, omega)
    want = _knowledge_ensemble_ref(feats.detach().double(), z.detach().double(), temp, omega)
    assert targets.dtype == torch.float32 and not targets.requires_grad
    torch.testing.assert_close(targets.double(), want, **TOL)
    torch.testing.assert_close(targets.sum(1), torch.ones(N))  # each row a distribution
    value, grads = _ref_grad(lambda z: _bake_kd_ref(z, want, temp), z)
    _check(losses.bake_loss(z, targets, temp), [z], value, grads)


@pytest.mark.parametrize("omega", [0.0, 0.5, 0.9, 0.99])
def test_bake_soft_targets_in_float64_equal_the_official_inverse_without_host_reads(omega):
    """The series summed by doubling is the official ``torch.inverse`` to float64 rounding, for
    ω up to 0.99 (the slowest to converge), and reads nothing on the host (a solver would)."""
    from torch.profiler import profile

    feats, z = _logits(16, 5, scale=1.0, seed=4).detach().double(), _logits(16, C).detach().double()
    with profile() as prof:
        targets = losses.bake_soft_targets(feats, z, 4.0, omega)
    assert not [e.key for e in prof.key_averages() if e.key in ("aten::_local_scalar_dense", "aten::item")]
    assert targets.dtype == torch.float64
    torch.testing.assert_close(targets, _knowledge_ensemble_ref(feats, z, 4.0, omega), rtol=1e-12, atol=1e-14)


def test_bake_padded_rows_change_no_real_target():
    """Padded rows (zero features and logits) marked invalid give the real rows the targets of
    the batch without them, wherever they sit."""
    feats, z = _logits(N, 5, scale=1.0, seed=4).detach(), _logits(N, C).detach()
    valid = torch.tensor([True, True, False, True, True, False, True, True, False])
    padded_f, padded_z = torch.zeros(len(valid), 5), torch.zeros(len(valid), C)
    padded_f[valid], padded_z[valid] = feats[:valid.sum()], z[:valid.sum()]
    got = losses.bake_soft_targets(padded_f, padded_z, valid=valid)[valid]
    torch.testing.assert_close(got, losses.bake_soft_targets(feats, z), rtol=1e-6, atol=1e-7)
