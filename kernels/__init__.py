"""Fused distillation losses: Triton kernels for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1``), plain PyTorch (``kernels.reference``) elsewhere. This package never
imports ``skd``."""
try:
    from kernels.pskd import pskd_loss
    from kernels.softmax_kl import softmax_kl
except ModuleNotFoundError as e:  # no Triton on this platform: the plain-PyTorch path only
    if e.name != "triton":
        raise
    from kernels.reference import pskd_loss, softmax_kl

__all__ = ["softmax_kl", "pskd_loss"]
