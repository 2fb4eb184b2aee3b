"""The loss of every method, as pure functions (formulas and conventions: ``docs/methods.md``).

Logits are ``[N, C]`` of any float dtype, labels int64 ``[N]``. Each function computes in fp32
(fp64 when its inputs are fp64) and returns a scalar averaged over rows ("batchmean": summed over
classes, averaged over rows) unless the official code reduces otherwise, which is then stated.
Defaults reproduce the official code ("parity"); cleaner variants are keyword opt-ins.

The softmax-KL parts go through ``skd_kernels.softmax_kl`` (Triton on CUDA, plain PyTorch elsewhere),
which detaches its teacher argument.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import skd_kernels
from skd_kernels import mixup_cross_entropy, pskd_loss

__all__ = [
    "cross_entropy", "kd_loss", "cskd_loss", "tfkd_reg_loss", "tfkd_self_loss", "nkd_loss",
    "uskd_loss", "dense_votes", "zipf_ls_loss", "bake_soft_targets", "bake_loss", "ickd_loss", "dlb_loss",
    "byot_loss", "pskd_loss", "mixup_cross_entropy",
]

_KL_REDUCTIONS = ("mean", "batchmean")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp64 stays fp64 (for gradcheck), everything else computes in fp32."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _drop_columns(x_NC: torch.Tensor, label_NK: torch.Tensor) -> torch.Tensor:
    """``x`` without the label columns of each row: ``[N, C − K]``, order of the rest kept."""
    # Static output shapes (no boolean indexing), so no host synchronisation.
    N, C = x_NC.shape
    if label_NK.shape[1] == 1:  # column i of the result is i, or i + 1 from the label on
        cols = torch.arange(C - 1, device=x_NC.device).expand(N, -1)
        return x_NC.gather(1, cols + (cols >= label_NK).long())
    # Several labels: a stable sort of the keep-mask puts the kept columns first, in order.
    keep_NC = torch.ones_like(x_NC, dtype=torch.uint8).scatter_(1, label_NK, 0)
    order_NC = torch.sort(keep_NC, dim=1, descending=True, stable=True).indices
    return x_NC.gather(1, order_NC[:, : C - label_NK.shape[1]])


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    smoothing_mode: str = "uniform",
) -> torch.Tensor:
    """Cross-entropy against a (label-smoothed) one-hot target, batchmean.

    ``"uniform"``: q = (1−ε)·onehot + ε/C, the PS-KD baseline (``lgcnsai/PS-KD-Pytorch#6``).
    ``"others"``: q = 1−ε on the label and ε/(C−1) elsewhere, TF-KD
    ``my_loss_function.py::loss_label_smoothing`` (docs/methods.md §1.1).
    """
    if smoothing_mode not in ("uniform", "others"):
        raise ValueError(f"smoothing_mode must be 'uniform' or 'others', got {smoothing_mode!r}")
    z_NC = _acc(logits)
    num_classes = z_NC.shape[-1]
    if smoothing_mode == "uniform" or smoothing == 0.0:
        return F.cross_entropy(z_NC, labels, label_smoothing=smoothing)
    if num_classes < 2:
        raise ValueError("smoothing_mode='others' needs at least two classes")
    off = smoothing / (num_classes - 1)
    target_NC = torch.full_like(z_NC, off).scatter_(1, labels[:, None], 1.0 - smoothing)
    return -(target_NC * F.log_softmax(z_NC, dim=-1)).sum(-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Hinton KD: T²·KL(softmax(t/T) ‖ softmax(s/T)), batchmean; the teacher gets no gradient.

    RepDistiller ``distiller_zoo/KD.py::DistillKL`` (sum ÷ N, times T²), docs/methods.md §1.2.
    """
    return skd_kernels.softmax_kl(student_logits, teacher_logits, temperature)


def cskd_loss(
    anchor_logits: torch.Tensor,
    partner_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    lam: float = 1.0,
) -> torch.Tensor:
    """CS-KD: CE(anchor, y) + lam·T²·KL(softmax(partner/T) ‖ softmax(anchor/T)), batchmean.

    The partner is detached (no gradient) and carries no CE. ``alinlab/cs-kd`` ``train.py``
    L95-139 (``KDLoss``: sum ÷ B times T²), docs/methods.md §2.1. CE and KL are one fused call.
    """
    return skd_kernels.softmax_kl(anchor_logits, partner_logits, temperature, labels=labels,
                              ce_weight=1.0, kl_weight=lam)


def _kl_weight(kl_reduction: str, num_classes: int) -> float:
    """The factor that turns a per-row (batchmean) KL into the requested reduction."""
    if kl_reduction not in _KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {_KL_REDUCTIONS}, got {kl_reduction!r}")
    # nn.KLDivLoss() defaults to 'mean': the sum over N·C elements ÷ (N·C), i.e. batchmean ÷ C.
    return 1.0 / num_classes if kl_reduction == "mean" else 1.0


def tfkd_reg_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    multiplier: float,
    correct_prob: float = 0.99,
    *,
    kl_reduction: str = "mean",
) -> torch.Tensor:
    """TF-KD_reg, ``yuanli2333/Teacher-free-Knowledge-Distillation`` ``my_loss_function.py::
    loss_kd_regularization`` (docs/methods.md §4.1)::

        p^d = correct_prob on the label, (1 − correct_prob)/(C−1) elsewhere
        q   = softmax(p^d / T)                      # softmax of *probabilities* over T
        L   = (1−α)·CE(z, y) + α·m·KL(q ‖ softmax(z)) / C     # student at T = 1, no T²

    The ÷C is ``nn.KLDivLoss()``'s default 'mean' reduction (÷N·C); ``kl_reduction="batchmean"``
    (÷N) is the clean opt-in (docs/methods.md §10).
    """
    z_NC = _acc(logits)
    num_classes = z_NC.shape[-1]
    off = (1.0 - correct_prob) / (num_classes - 1)
    virtual_NC = torch.full_like(z_NC, off).scatter_(1, labels[:, None], correct_prob)
    # softmax(p^d / T) is the T = 1 softmax of the "logits" p^d / T.
    return skd_kernels.softmax_kl(
        z_NC, virtual_NC / temperature, 1.0, labels=labels, ce_weight=1.0 - alpha,
        kl_weight=alpha * multiplier * _kl_weight(kl_reduction, num_classes),
    )


def tfkd_self_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    multiplier: float,
    *,
    kl_reduction: str = "mean",
) -> torch.Tensor:
    """TF-KD_self, ``my_loss_function.py::loss_kd_self`` (docs/methods.md §4.2)::

        L = (1−α)·CE(s, y) + α·m·T²·KL(softmax(t/T) ‖ softmax(s/T)) / C

    ÷C again from ``nn.KLDivLoss()``'s 'mean'; ``kl_reduction="batchmean"`` drops it. The teacher
    gets no gradient.
    """
    num_classes = student_logits.shape[-1]
    return skd_kernels.softmax_kl(
        student_logits, teacher_logits, temperature, labels=labels, ce_weight=1.0 - alpha,
        kl_weight=alpha * multiplier * _kl_weight(kl_reduction, num_classes),
    )


def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
) -> torch.Tensor:
    """NKD, ``yzd-v/cls_KD`` ``mmcls/models/dis_losses/nkd.py`` after the mask fix 9466b3f
    (docs/methods.md §5.1); t is the label (``argmax`` of soft ``[N, C]`` labels), λ the temperature::

        L_target = −mean_n τ_t · log s_t            # T = 1, τ = softmax(teacher), detached
        L_non    = −γ·λ²·mean_n Σ_{i≠t} softmax(t_¬t/λ)_i · log softmax(s_¬t/λ)_i
        L        = L_target + L_non                           # the head CE is NOT included

    The target column is removed before the tempered softmaxes (the fixed mask). L_non is
    computed as γ·λ²·(KL + H(teacher)): the value and gradient of the cross-entropy form.
    """
    if labels.dim() > 1:
        labels = labels.argmax(dim=1)
    label_N1 = labels.view(-1, 1)
    s_NC = _acc(student_logits)
    t_NC = _acc(teacher_logits).detach()
    lam = float(temperature)

    log_s_t_N1 = F.log_softmax(s_NC, dim=1).gather(1, label_N1)
    tau_t_N1 = F.softmax(t_NC, dim=1).gather(1, label_N1)
    loss_target = -(tau_t_N1 * log_s_t_N1).mean()

    s_nt = _drop_columns(s_NC, label_N1)
    t_nt = _drop_columns(t_NC, label_N1)
    kl = skd_kernels.softmax_kl(s_nt, t_nt, lam)
    log_p_nt = F.log_softmax(t_nt / lam, dim=1)
    entropy = -(log_p_nt.exp() * log_p_nt).sum(1).mean()
    loss_non = gamma * (kl + lam * lam * entropy)
    return loss_target + loss_non


def uskd_loss(
    logits: torch.Tensor,
    weak_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank: str = "prob",
) -> torch.Tensor:
    """USKD, ``yzd-v/cls_KD`` ``uskd.py`` (docs/methods.md §6.2): ``α·L_t + β·L_nt + L_weak``, without the
    head CE. ``weak_logits`` come from the weak head on the GAP'd intermediate feature.

    ``labels``: int ``[N]``, or soft ``[N, C]`` (mixup/cutmix: the top-2 classes and their
    values are used, as in the official code)::

        p_t    = s_t² + value − mean_batch(s_t²)   (0 where value = 0), detached
        L_t    = −mean_n Σ_labels p_t·log softmax(z)_label
        L_weak = −mean_n Σ_c μ·q_c·log softmax(w)_c,  q = 0.9·onehot + 0.1/C  (0.9·y + 0.1/C)
        score  = softmax(w)/(1 − Σ_labels softmax(w) + 1e−6) + S/(1 − Σ_labels S + 1e−6)
        zipf   = 1/rank of each class in the score (target classes included), restricted to the
                 non-targets and renormalised, detached
        L_nt   = −mean_n Σ_{i≠t} zipf_i·log softmax(z_¬t)_i

    ``rank="prob"``: S = softmax(z), the paper-era code (master 87a7197, the default);
    ``rank="logprob"``: S = log_softmax(z), the current official HEAD (1.0 branch).
    """
    if rank not in ("prob", "logprob"):
        raise ValueError(f"rank must be 'prob' or 'logprob', got {rank!r}")
    z_NC = _acc(logits)
    w_NC = _acc(weak_logits)
    N, C = z_NC.shape
    if labels.dim() > 1:
        # Soft labels (Mixup): the top-2 classes and values, as cls_KD takes them. A row with one
        # class (λ = 1, or both mixed samples of one class) still yields a second, zero-valued
        # "label", the lowest-numbered other class (stable sort: the same on every device), which
        # is then left out of L_nt as in the official code.
        soft_NC = labels.to(z_NC.dtype)
        value_NK, label_NK = soft_NC.sort(dim=1, descending=True, stable=True)
        value_NK, label_NK = value_NK[:, :2], label_NK[:, :2]
        weak_target_NC = 0.9 * soft_NC + 0.1 / C
    else:
        label_NK = labels.view(-1, 1)
        value_NK = torch.ones(N, 1, dtype=z_NC.dtype, device=z_NC.device)
        weak_target_NC = torch.full_like(z_NC, 0.1 / C).scatter_add_(
            1, label_NK, torch.full_like(value_NK, 0.9))

    log_s_NC = F.log_softmax(z_NC, dim=1)
    log_s_t_NK = log_s_NC.gather(1, label_NK)
    with torch.no_grad():
        s_NC = log_s_NC.exp()
        s_t_NK = s_NC.gather(1, label_NK)
        p_t_NK = s_t_NK ** 2
        p_t_NK = p_t_NK + value_NK - p_t_NK.mean(0, keepdim=True)
        p_t_NK = p_t_NK.masked_fill(value_NK == 0, 0.0)
    loss_t = -(p_t_NK * log_s_t_NK).sum(1).mean()

    log_w_NC = F.log_softmax(w_NC, dim=1)
    loss_weak = -(mu * weak_target_NC * log_w_NC).sum(1).mean()

    with torch.no_grad():
        w_prob_NC = log_w_NC.exp()
        w_t_N1 = w_prob_NC.gather(1, label_NK).sum(1, keepdim=True)
        S_NC, S_t_NK = (s_NC, s_t_NK) if rank == "prob" else (log_s_NC, log_s_t_NK)
        score_NC = (w_prob_NC / (1 - w_t_N1 + 1e-6)
                    + S_NC / (1 - S_t_NK.sum(1, keepdim=True) + 1e-6))
        order_NC = score_NC.argsort(dim=1, descending=True)
        position_NC = order_NC.argsort(dim=1)  # 0-based rank of each class
        zipf_NC = 1.0 / (position_NC + 1).to(z_NC.dtype)
        zipf_nt = _drop_columns(zipf_NC, label_NK)
        zipf_nt = zipf_nt / zipf_nt.sum(1, keepdim=True)
    log_s_nt = F.log_softmax(_drop_columns(z_NC, label_NK), dim=1)
    loss_nt = -(zipf_nt * log_s_nt).sum(1).mean()

    return alpha * loss_t + beta * loss_nt + loss_weak


def _min_ranks(scores_NC: torch.Tensor) -> torch.Tensor:
    """1-based rank of each class by descending score, ties sharing their lowest rank (scipy's
    ``rankdata(-scores, method="min")``): 1 + the number of strictly larger scores in the row."""
    N, C = scores_NC.shape
    values, order = scores_NC.sort(dim=1, descending=True)
    positions = torch.arange(C, device=scores_NC.device).expand(N, C)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    # Each sorted slot takes the position where its run of equal scores starts.
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    return torch.empty_like(first).scatter_(1, order, first) + 1


def dense_votes(location_logits: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: how many locations of each sample (``location_logits`` ``[N, L, C]``) predict
    each class (argmax per location), as float counts. Zipf's LS ranks the classes by these votes
    (the official ``--dense``)."""
    N, L, C = location_logits.shape
    winners_NL = location_logits.argmax(dim=2)
    votes_NC = torch.zeros(N, C, device=location_logits.device)
    return votes_NC.scatter_add_(1, winners_NL, torch.ones_like(winners_NL, dtype=votes_NC.dtype))


def zipf_ls_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rank_scores: torch.Tensor | None = None,
    power: float = 1.0,
) -> torch.Tensor:
    """Zipf's LS non-target term, ``megvii-research/zipfls`` ``pytorch_zipfls/losses.py::zipf_loss``
    (docs/methods.md §13.1)::

        rank   = 1-based rank of each class by descending ``rank_scores`` (target included; ties
                 share the lowest rank), from the dense votes or, without them, the logits
        zipf_c = rank_c^(−power) over the non-target classes, renormalised; detached
        L      = mean_n KL(zipf ‖ softmax(z_¬t))           # the target column removed, T = 1

    The CE is not included. The KL goes through ``skd_kernels.softmax_kl`` with the Zipf weights as
    teacher logits ``−power·log rank`` (their softmax is the renormalised Zipf distribution).
    """
    label_N1 = labels.view(-1, 1)
    with torch.no_grad():
        scores_NC = (logits if rank_scores is None else rank_scores).detach()
        ranks_NC = _min_ranks(_acc(scores_NC)).to(_acc(logits).dtype)
        zipf_logits = -power * torch.log(_drop_columns(ranks_NC, label_N1))
    return skd_kernels.softmax_kl(_drop_columns(logits, label_N1), zipf_logits, 1.0)


def bake_soft_targets(
    features: torch.Tensor,
    logits: torch.Tensor,
    temperature: float = 4.0,
    omega: float = 0.5,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """BAKE's batch knowledge ensembling, ``yxgeee/BAKE`` ``imagenet/pycls/core/trainer.py::
    knowledge_ensemble`` (docs/methods.md §14.1), over the ``B`` rows given (the global batch)::

        f̂ = L2-normalised features,   P = softmax(z/T)
        A = row-softmax of f̂ f̂ᵀ − 10⁹·I                 (no affinity to itself)
        Q = (1 − ω)·(I − ω·A)⁻¹ · P                      (the propagation summed to infinity)

    ``valid`` (bool ``[B]``) marks real rows among padded ones: padded rows neither give nor get
    any affinity, so the real rows' targets equal those of the batch without them. Computed in
    fp32 (fp64 for fp64 inputs) with autocast off and without gradients. ``(I − ω·A)⁻¹ P`` is the
    series ``Σ_k (ω·A)^k P``, summed by doubling (``_propagate``) until the terms left are below
    the dtype's rounding: the official inverse to rounding, in matrix products only, so without
    the host reads a solver makes (LAPACK's pivot checks on the CPU).
    """
    with torch.no_grad(), _no_autocast(logits):
        f_BD = F.normalize(_acc(features), dim=1)
        p_BC = F.softmax(_acc(logits) / temperature, dim=1)
        B = p_BC.shape[0]
        eye_BB = torch.eye(B, dtype=p_BC.dtype, device=p_BC.device)
        affinity_BB = f_BD @ f_BD.t() - eye_BB * 1e9
        if valid is not None:
            affinity_BB = affinity_BB.masked_fill(~valid[None, :], float("-inf"))
        a_BB = F.softmax(affinity_BB, dim=1)
        if valid is not None:
            a_BB = a_BB * valid[:, None]
        return (1 - omega) * _propagate(omega * a_BB, p_BC, omega)


def _propagate(m_BB: torch.Tensor, p_BC: torch.Tensor, omega: float) -> torch.Tensor:
    """``(I − M)⁻¹ P = Σ_k M^k P`` for ``M = ω·A`` with ``A`` row-stochastic (or rows of zeros),
    so ``‖M^k‖∞ ≤ ω^k``. Round r adds ``M^(2^r)`` times the sum so far: after R rounds the sum
    holds the terms k < 2^R, and what is left, ``≤ ω^(2^R)/(1 − ω)`` of ``‖P‖∞`` (1 for rows of
    probabilities), is below half the dtype's epsilon (R = 5 for ω = 0.5 in fp32, 6 in fp64)."""
    if omega == 0:
        return p_BC
    eps = torch.finfo(p_BC.dtype).eps
    rounds = max(1, math.ceil(math.log2(math.log(eps / 2 * (1 - omega)) / math.log(omega))))
    x_BC, power_BB = p_BC, m_BB
    for r in range(rounds):
        x_BC = x_BC + power_BB @ x_BC
        if r + 1 < rounds:
            power_BB = power_BB @ power_BB
    return x_BC


def bake_loss(logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """BAKE's distillation term, the official ``KDLoss``: ``T²·KL(Q ‖ softmax(z/T))``, summed over
    classes and averaged over rows; ``soft_targets`` Q (``bake_soft_targets``) get no gradient.

    Through ``skd_kernels.softmax_kl`` with teacher logits ``T·log Q`` (their tempered softmax is
    Q; a zero of Q, which the official ``KLDivLoss`` counts as 0, is clamped to the smallest
    positive float, whose term is as good as 0)."""
    q_BC = _acc(soft_targets).detach()
    return skd_kernels.softmax_kl(logits, temperature * q_BC.clamp_min(torch.finfo(q_BC.dtype).tiny).log(),
                                  temperature)


def ickd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
              norm: str = "cifar") -> torch.Tensor:
    """ICKD inter-channel correlation, ``ADLab-AutoDrive/ICKD`` ``Cifar100/distiller_zoo/ICKD.py``
    (docs/methods.md §7)::

        G = F Fᵀ per sample (C×C, F = [C, H·W]),  Ĝ = G with each row L2-normalised
        L = Σ_b Σ_ij (Ĝ_s − Ĝ_t)² / (C·B)      norm="cifar"
                                   / (C·B²)     norm="imagenet" (torchdistill ``ChSimLoss``)

    ``student_feat`` is already embedded to the teacher's channels (``[B, C, H, W]``, same shape
    as ``teacher_feat``); the teacher gets no gradient.
    """
    if norm not in ("cifar", "imagenet"):
        raise ValueError(f"norm must be 'cifar' or 'imagenet', got {norm!r}")
    if student_feat.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(f"student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} features differ in batch or channels")
    B, C = student_feat.shape[:2]
    f_s = _acc(student_feat).reshape(B, C, -1)
    f_t = _acc(teacher_feat).detach().reshape(B, C, -1)
    with _no_autocast(f_s):
        g_s = F.normalize(torch.bmm(f_s, f_s.transpose(1, 2)), dim=2)
        g_t = F.normalize(torch.bmm(f_t, f_t.transpose(1, 2)), dim=2)
    denom = C * B * (B if norm == "imagenet" else 1)
    return (g_s - g_t).pow(2).sum() / denom


def dlb_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    repeat_logits: torch.Tensor,
    repeat_labels: torch.Tensor,
    target_logits: torch.Tensor,
    target_found: torch.Tensor,
    temperature: float = 3.0,
    alpha: float = 1.0,
) -> dict[str, torch.Tensor]:
    """DLB, ``Meta-knowledge-Lab/DLB`` ``dlb.py::train_one_epoch`` (docs/methods.md §11)::

        ce = CE over the B' + B rows [repeated ; new], averaged over all of them
        kl = α·T²·KL(softmax(t/T) ‖ softmax(z_r/T)), averaged over the repeated rows with a target

    ``logits``/``labels``: the batch's new samples; ``repeat_logits``/``repeat_labels``: the
    samples of the previous batch, seen again; ``target_logits`` ``[B', C]``: their logits from
    the previous step (the teacher, detached); ``target_found`` bool ``[B']``: which repeated rows
    have such logits (all of them in an uninterrupted run). A row without one gets CE only. The
    loss is ``ce + kl``; both parts are returned. No host synchronisation.
    """
    ce = cross_entropy(torch.cat([repeat_logits, logits]), torch.cat([repeat_labels, labels]))
    kl_rows = skd_kernels.softmax_kl(repeat_logits, target_logits, temperature, reduction="none")
    found = target_found.to(kl_rows.dtype)
    kl = (kl_rows * found).sum() / found.sum().clamp(min=1)
    return {"ce": ce, "kl": alpha * kl}


def byot_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    head_logits: list[torch.Tensor],
    head_features: list[torch.Tensor],
    feature: torch.Tensor,
    temperature: float = 3.0,
    alpha: float = 0.5,
    feature_weight: float = 6.4e-5,
) -> dict[str, torch.Tensor]:
    """BYOT as its first author's code trains it (``ArchipLab-LinfengZhang/
    pytorch-scalable-neural-networks`` ``train.py``; docs/methods.md §12)::

        ce    = CE(z, y)                                            the deepest classifier
        heads = Σ_i (1 − α)·CE(z_i, y) + α·T²·KL(softmax(z/T) ‖ softmax(z_i/T))
        hint  = λ·Σ_i mean_rows ‖f_i − F‖²

    ``logits`` z and ``feature`` F ``[N, D]``: the model's classifier and the pooled vector it
    reads; ``head_logits`` z_i and ``head_features`` f_i ``[N, D]``: the auxiliary classifiers'.
    z and F are the teacher of the KL and of the hints, detached there. The loss is
    ``ce + heads + hint``; the three parts are returned.
    """
    ce = cross_entropy(logits, labels)
    # One kernel call for every head: n × the mean over the n·N stacked rows is the sum of the means.
    n = len(head_logits)
    heads = n * skd_kernels.softmax_kl(torch.cat(list(head_logits)), logits.repeat(n, 1), temperature,
                                       labels=labels.repeat(n), ce_weight=1.0 - alpha, kl_weight=alpha)
    target_ND = _acc(feature).detach()
    with _no_autocast(target_ND):
        hint = sum((_acc(f_i) - target_ND).pow(2).sum(1).mean() for f_i in head_features)
    return {"ce": ce, "heads": heads, "hint": feature_weight * hint}


# =================================================================================================
# Feature distillation: the baselines of RepDistiller (``HobbitLong/RepDistiller``: FitNet, AT, SP,
# CC, VID, RKD, PKT, FSP, NST in ``distiller_zoo/``, CRD in ``crd/``).
#
# Each function receives the features as the official criterion does (after the method's connector
# module, if any) and returns an fp32 scalar (fp64 for fp64 inputs), computed with autocast off.
# Maps are ``[B, C, H, W]``, embeddings (the pooled pre-logits vector, RepDistiller's ``feat[-1]``)
# ``[B, D]``. Teacher features are detached, except where the teacher side has gone through a
# trainable embedding (CC, CRD), whose weights must learn.
# =================================================================================================

__all__ += [
    "match_size", "hint_loss", "at_loss", "sp_loss", "cc_loss", "vid_loss", "rkd_loss", "pkt_loss",
    "fsp_matrix", "fsp_loss", "nst_loss", "crd_scores", "crd_nce_loss",
]


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """Autocast would put matmuls back in bf16/fp16; these losses compute in fp32 (or fp64)."""
    return torch.autocast(x.device.type, enabled=False)


def match_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's size matching of two maps (AT, VID, FSP, NST): the one with the larger height
    is adaptive-average-pooled to the other's size; maps of equal height pass unchanged.

    The official code pools to ``(H, H)`` of the smaller map; here to its ``(H, W)``, which is the
    same for square maps."""
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, b.shape[2:])
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, a.shape[2:])
    return a, b


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNet, ``distiller_zoo/FitNet.py::HintLoss``: ``nn.MSELoss()`` (mean over every element)
    between the regressed student map and the teacher's map at the hint layer."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"hint_loss: student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} maps differ; regress the student first")
    with _no_autocast(student_feat):
        return F.mse_loss(_acc(student_feat), _acc(teacher_feat).detach())


def at_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer, ``distiller_zoo/AT.py::Attention.at_loss`` (one pair of maps)::

        a(F) = L2-normalise_over_HW( mean_c F^p )          # one [H·W] attention map per sample
        L    = mean_{b, hw} (a(F_s) − a(F_t))²

    after ``match_size``; channel counts may differ. RepDistiller sums L over its maps."""
    with _no_autocast(student_map):
        f_s, f_t = match_size(_acc(student_map), _acc(teacher_map).detach())
        a_s = F.normalize(f_s.pow(p).mean(1).flatten(1), dim=1)
        a_t = F.normalize(f_t.pow(p).mean(1).flatten(1), dim=1)
        return (a_s - a_t).pow(2).mean()


def sp_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Similarity preserving, ``distiller_zoo/SP.py::Similarity.similarity_loss``::

        G = F Fᵀ over the batch (F = [B, C·H·W]),  Ĝ = G with each row L2-normalised
        L = Σ_ij (Ĝ_t − Ĝ_s)² / B²

    Student and teacher maps may differ in every dimension but the batch."""
    B = student_map.shape[0]
    with _no_autocast(student_map):
        f_s = _acc(student_map).reshape(B, -1)
        f_t = _acc(teacher_map).detach().reshape(B, -1)
        g_s = F.normalize(f_s @ f_s.t(), dim=1)
        g_t = F.normalize(f_t @ f_t.t(), dim=1)
        return (g_t - g_s).pow(2).sum() / (B * B)


def cc_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
    """Correlation congruence, ``distiller_zoo/CC.py::Correlation`` (the CC authors' code)::

        δ_b = |e_s,b − e_t,b|,    L = mean_{b < B−1} Σ_d δ_b,d · δ_{b+1},d

    i.e. the correlation of neighbouring samples in batch order. Both inputs are the outputs of
    trainable linear embeddings (``feat_dim`` 128); the teacher side is *not* detached."""
    if student_embed.shape[0] < 2:
        raise ValueError("cc_loss needs at least two samples (it correlates neighbours in the batch)")
    with _no_autocast(student_embed):
        delta = (_acc(student_embed) - _acc(teacher_embed)).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()


def vid_loss(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation, ``distiller_zoo/VID.py::VIDLoss.forward``: the
    negative Gaussian log-likelihood (without the constant) of the teacher map under the mean
    that the regressor predicts from the student map, with one variance per channel::

        σ²_c = softplus(log_scale_c) + eps
        L    = mean_{b,c,h,w} ½·((μ − F_t)² / σ²_c + log σ²_c)

    ``pred_mean`` is the regressor's output (same shape as ``target``); ``log_scale`` ``[C]`` is
    trained with it. softplus is the official ``log(1 + exp(·))``."""
    if pred_mean.shape != target.shape or target.shape[1] != log_scale.shape[0]:
        raise ValueError(f"vid_loss: prediction {tuple(pred_mean.shape)}, target "
                         f"{tuple(target.shape)} and log_scale {tuple(log_scale.shape)} do not match")
    with _no_autocast(pred_mean):
        var = (F.softplus(_acc(log_scale)) + eps).view(1, -1, *([1] * (target.dim() - 2)))
        diff = _acc(pred_mean) - _acc(target).detach()
        return (0.5 * (diff.pow(2) / var + var.log())).mean()


def _rkd_distances(e_BD: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances divided by their mean over the distinct pairs
    (``RKDLoss.pdist``: squared distances clamped at 1e-12, diagonal zeroed)."""
    sq_B = e_BD.pow(2).sum(1)
    d_BB = (sq_B[:, None] + sq_B[None, :] - 2 * e_BD @ e_BD.t()).clamp(min=1e-12).sqrt()
    d_BB = d_BB * (1 - torch.eye(len(e_BD), dtype=d_BB.dtype, device=d_BB.device))
    # The official d[d > 0].mean() with a static shape: the zeroed diagonal adds nothing to the sum.
    return d_BB / (d_BB.sum() / (d_BB > 0).sum())


def _rkd_angles(e_BD: torch.Tensor) -> torch.Tensor:
    """cos of the angle at sample i between samples j and k, for every (i, j, k): ``[B³]``."""
    diff_BBD = F.normalize(e_BD[None, :, :] - e_BD[:, None, :], dim=2)
    return torch.bmm(diff_BBD, diff_BBD.transpose(1, 2)).flatten()


def rkd_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD, ``distiller_zoo/RKD.py::RKDLoss`` (``w_d`` 25, ``w_a`` 50)::

        L = w_d · smooth_l1(ψ_D(s), ψ_D(t)) + w_a · smooth_l1(ψ_A(s), ψ_A(t))

    ψ_D: pairwise distances over the batch divided by their mean over distinct pairs; ψ_A: the
    cosines of all B³ angles; smooth-L1 with β = 1, mean. Inputs are flattened to ``[B, −1]``."""
    with _no_autocast(student_embed):
        s = _acc(student_embed).flatten(1)
        t = _acc(teacher_embed).detach().flatten(1)
        loss_d = F.smooth_l1_loss(_rkd_distances(s), _rkd_distances(t))
        loss_a = F.smooth_l1_loss(_rkd_angles(s), _rkd_angles(t))
        return distance_weight * loss_d + angle_weight * loss_a


def _pkt_probabilities(e_BD: torch.Tensor, eps: float) -> torch.Tensor:
    e_BD = e_BD / (e_BD.pow(2).sum(1, keepdim=True).sqrt() + eps)
    sim_BB = (e_BD @ e_BD.t() + 1.0) / 2.0  # cosine similarity moved to [0, 1]
    return sim_BB / sim_BB.sum(1, keepdim=True)


def pkt_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor,
             eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer, ``distiller_zoo/PKT.py::cosine_similarity_loss``::

        P_ij = (1 + cos(e_i, e_j)) / 2, normalised over j      (e_i / (‖e_i‖ + eps))
        L    = mean_ij P^t_ij · log((P^t_ij + eps) / (P^s_ij + eps))

    a KL over each row's similarities, averaged over all B² entries (not summed over j). The
    official NaN-to-0 guard after the normalisation never fires for finite inputs (‖e‖ + eps > 0),
    so it is left out."""
    with _no_autocast(student_embed):
        p_s = _pkt_probabilities(_acc(student_embed).flatten(1), eps)
        p_t = _pkt_probabilities(_acc(teacher_embed).detach().flatten(1), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The FSP ("flow of solution procedure") matrix of two maps, ``FSP.compute_fsp``::

        G_b[j, i] = mean_hw top_j(h, w) · bottom_i(h, w)        → [B, C_top, C_bottom]

    after ``match_size``."""
    with _no_autocast(bottom):
        bottom, top = match_size(_acc(bottom), _acc(top))
        hw = bottom.shape[2] * bottom.shape[3]
        return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / hw


def fsp_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """FSP, ``distiller_zoo/FSP.py``: for each pair of consecutive maps (0, 1), (1, 2), ... the
    mean squared difference of the student's and the teacher's FSP matrices, summed over pairs
    (RepDistiller's init stage sums the group). Channel counts must match map by map."""
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise ValueError(f"fsp_loss needs two equally long lists of at least two maps, got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    total = None
    for i in range(len(student_maps) - 1):
        g_s = fsp_matrix(student_maps[i], student_maps[i + 1])
        g_t = fsp_matrix(teacher_maps[i].detach(), teacher_maps[i + 1].detach())
        if g_s.shape != g_t.shape:
            raise ValueError(f"fsp_loss: maps {i}, {i + 1} have channels {tuple(g_s.shape[1:])} "
                             f"(student) and {tuple(g_t.shape[1:])} (teacher); FSP needs equal ones")
        term = (g_s - g_t).pow(2).mean()
        total = term if total is None else total + term
    return total


def nst_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer, ``distiller_zoo/NST.py::NSTLoss.nst_loss`` (``full_loss``)::

        f_c = F_c / ‖F_c‖ over H·W (each channel's activation pattern),  k(a, b) = (a · b)²
        L   = mean k(t, t) + mean k(s, s) − 2·mean k(s, t)      (means over b and channel pairs)

    the squared MMD with the degree-2 polynomial kernel, after ``match_size``; channel counts may
    differ. The official code broadcasts a [B, C, C, H·W] product; this is the same sum as a bmm."""
    with _no_autocast(student_map):
        f_s, f_t = match_size(_acc(student_map), _acc(teacher_map).detach())
        f_s = F.normalize(f_s.flatten(2), dim=2)
        f_t = F.normalize(f_t.flatten(2), dim=2)

        def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.bmm(b, a.transpose(1, 2)).pow(2)

        return kernel(f_t, f_t).mean() + kernel(f_s, f_s).mean() - 2 * kernel(f_s, f_t).mean()


def crd_scores(anchor: torch.Tensor, memory_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """CRD's unnormalised scores, ``crd/memory.py::ContrastMemory.forward``::

        score_bk = exp(⟨m_bk, v_b⟩ / T)        → [B, K+1]

    ``anchor`` ``[B, D]`` is one network's L2-normalised embedding; ``memory_rows`` ``[B, K+1, D]``
    are the *other* network's memory rows for the positive (column 0) and the K negatives, and
    get no gradient."""
    with _no_autocast(anchor):
        v = _acc(anchor)
        rows = _acc(memory_rows).detach()
        return torch.exp(torch.bmm(rows, v.unsqueeze(2)).squeeze(2) / temperature)


def crd_nce_loss(scores: torch.Tensor, normalizer: torch.Tensor | float, num_samples: int,
                 eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss, ``crd/criterion.py::ContrastLoss`` (the paper's Eq. 18)::

        P = score / Z,   m = K (negatives per positive),   P_n = 1 / N (uniform noise)
        L = −(1/B) Σ_b [ log(P_b0 / (P_b0 + m·P_n + eps)) + Σ_k log(m·P_n / (P_bk + m·P_n + eps)) ]

    ``scores`` ``[B, K+1]`` from ``crd_scores`` (positive first); ``normalizer`` Z is the constant
    that RepDistiller fixes at the first step (mean score × N); ``num_samples`` is N."""
    with _no_autocast(scores):
        p = _acc(scores) / normalizer
        noise = (p.shape[1] - 1) / num_samples
        log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
        log_neg = torch.log(noise / (p[:, 1:] + noise + eps))
        return -(log_pos.sum() + log_neg.sum()) / p.shape[0]
