"""Fused distillation losses: Triton kernels for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1``), plain PyTorch (``skd_kernels.reference``) elsewhere. Installed as the import
package ``skd_kernels`` (the folder is ``kernels/``); it never imports ``skd``."""
try:
    from .pskd import mixup_cross_entropy, pskd_loss
    from .pskd_topk import pskd_topk_loss
    from .softmax_kl import softmax_kl
except ModuleNotFoundError as e:  # no Triton on this platform: the plain-PyTorch path only
    if e.name != "triton":
        raise
    from .reference import mixup_cross_entropy, pskd_loss, pskd_topk_loss, softmax_kl

__all__ = ["softmax_kl", "pskd_loss", "mixup_cross_entropy", "pskd_topk_loss"]
