"""The training transforms' additions to timm: PS-KD's and pycls's PCA lighting, random-erasing
modes."""
from __future__ import annotations

import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from skd.config import ConfigError, build_config, load_config, parse_overrides
from skd.environment import check_environment
from skd.transforms import PCALighting, create_train_transform

# PS-KD utils/custom_transform.py / loader/custom_dataloader.py, pycls datasets/transforms.py
EIGVAL = [0.2175, 0.0188, 0.0045]
EIGVEC = [[-0.5675, 0.7192, 0.4009],
          [-0.5808, -0.0045, -0.8140],
          [-0.5836, -0.6948, 0.4203]]


def test_pca_lighting_adds_the_official_rgb_shift():
    """Each image gets one RGB shift, eigvec @ (α·eigval) with α ~ N(0, 0.1²) from torch's
    generator (PS-KD's formula, computed here in float64 from the published constants)."""
    img = torch.rand(3, 5, 7)
    torch.manual_seed(3)
    out = PCALighting(0.1)(img)
    torch.manual_seed(3)
    alpha = torch.randn(3, dtype=torch.float64) * 0.1
    shift = torch.tensor(EIGVEC, dtype=torch.float64) @ (alpha * torch.tensor(EIGVAL, dtype=torch.float64))
    torch.testing.assert_close((out - img).double(), shift.view(3, 1, 1).expand(3, 5, 7), rtol=0, atol=1e-6)
    assert shift.abs().max() > 1e-3  # a real shift, not a no-op


def test_pca_lighting_noise_has_the_eigen_covariance():
    """Over many images, the shifts' covariance is Σ_j eigval_j²·0.1²·v_j v_jᵀ."""
    torch.manual_seed(0)
    lighting = PCALighting(0.1)
    shifts = torch.stack([lighting(torch.zeros(3, 1, 1)).flatten() for _ in range(20000)]).double()
    vec, val = torch.tensor(EIGVEC, dtype=torch.float64), torch.tensor(EIGVAL, dtype=torch.float64)
    expected = vec @ torch.diag((0.1 * val) ** 2) @ vec.T
    torch.testing.assert_close(shifts.T.cov(), expected, rtol=0, atol=1.5e-5)


@pytest.mark.parametrize("crop", ["rrc", "pad_crop"])
def test_pca_lighting_sits_between_to_tensor_and_normalize(crop):
    cfg = load_config(None, [f"data.train_crop={crop}", "data.pca_lighting=0.1", "data.re_prob=0.25"]).data
    ops = create_train_transform(cfg).transforms
    i = next(i for i, t in enumerate(ops) if isinstance(t, PCALighting))
    assert ops[i].alphastd == 0.1
    assert isinstance(ops[i + 1], T.Normalize) and "ToTensor" in type(ops[i - 1]).__name__
    off = create_train_transform(load_config(None, [f"data.train_crop={crop}"]).data).transforms
    assert not any(isinstance(t, PCALighting) for t in off)


def test_random_erasing_mode_reaches_timm():
    cfg = load_config(None, ["data.train_crop=rrc", "data.re_prob=0.25", "data.re_mode=pixel"]).data
    (erasing,) = [t for t in create_train_transform(cfg).transforms if isinstance(t, RandomErasing)]
    assert erasing.mode == "pixel" and erasing.probability == 0.25


def test_dali_refuses_pca_lighting():
    pytest.importorskip("nvidia.dali")  # without DALI the run stops earlier, at "not installed"
    overrides = ["data.backend=dali", "data.dali_device=cpu", "data.pca_lighting=0.1"]
    with pytest.raises(ConfigError, match="data.pca_lighting.*use data.backend=torch"):
        check_environment(build_config(parse_overrides(overrides)))
