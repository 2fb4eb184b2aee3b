"""Fused distillation losses. Triton kernels for CUDA tensors, plain PyTorch (``kernels.reference``)
elsewhere. This package never imports ``skd``."""
from kernels.reference import pskd_loss, softmax_kl

__all__ = ["softmax_kl", "pskd_loss"]
