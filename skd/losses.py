"""The loss of every method, as pure functions (formulas and conventions: ``METHODS.md``).

Logits are ``[N, C]`` of any float dtype, labels int64 ``[N]``. Each function computes in fp32
(fp64 when its inputs are fp64) and returns a scalar averaged over rows ("batchmean": summed over
classes, averaged over rows) unless the official code reduces otherwise, which is then stated.
Defaults reproduce the official code ("parity"); cleaner variants are keyword opt-ins.

The softmax-KL parts go through ``skd_kernels.softmax_kl`` (Triton on CUDA, plain PyTorch elsewhere),
which detaches its teacher argument.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import skd_kernels
from skd_kernels import pskd_loss

__all__ = [
    "cross_entropy", "kd_loss", "cskd_loss", "tfkd_reg_loss", "tfkd_self_loss", "nkd_loss",
    "uskd_loss", "ickd_loss", "pskd_loss",
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
    ``my_loss_function.py::loss_label_smoothing`` (METHODS §1.1).
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

    RepDistiller ``distiller_zoo/KD.py::DistillKL`` (sum ÷ N, times T²), METHODS §1.2.
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
    L95-139 (``KDLoss``: sum ÷ B times T²), METHODS §2.1. CE and KL are one fused call.
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
    loss_kd_regularization`` (METHODS §4.1)::

        p^d = correct_prob on the label, (1 − correct_prob)/(C−1) elsewhere
        q   = softmax(p^d / T)                      # softmax of *probabilities* over T
        L   = (1−α)·CE(z, y) + α·m·KL(q ‖ softmax(z)) / C     # student at T = 1, no T²

    The ÷C is ``nn.KLDivLoss()``'s default 'mean' reduction (÷N·C); ``kl_reduction="batchmean"``
    (÷N) is the clean opt-in (METHODS §10).
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
    """TF-KD_self, ``my_loss_function.py::loss_kd_self`` (METHODS §4.2)::

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
    (METHODS §5.1); t is the label (``argmax`` of soft ``[N, C]`` labels), λ the temperature::

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
    """USKD, ``yzd-v/cls_KD`` ``uskd.py`` (METHODS §6.2): ``α·L_t + β·L_nt + L_weak``, without the
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
        soft_NC = labels.to(z_NC.dtype)
        value_NK, label_NK = soft_NC.sort(dim=1, descending=True)
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


def ickd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
              norm: str = "cifar") -> torch.Tensor:
    """ICKD inter-channel correlation, ``ADLab-AutoDrive/ICKD`` ``Cifar100/distiller_zoo/ICKD.py``
    (METHODS §7)::

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
    with torch.autocast(f_s.device.type, enabled=False):  # autocast would put bmm back in bf16
        g_s = F.normalize(torch.bmm(f_s, f_s.transpose(1, 2)), dim=2)
        g_t = F.normalize(torch.bmm(f_t, f_t.transpose(1, 2)), dim=2)
    denom = C * B * (B if norm == "imagenet" else 1)
    return (g_s - g_t).pow(2).sum() / denom
