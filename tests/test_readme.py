"""README's Python snippets run as written, each in a fresh interpreter."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import skd.models  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _demo_weights(folder: Path) -> dict[str, torch.Tensor]:
    """What the snippet loading an exported model expects to find: runs/demo/model.safetensors."""
    model = timm.create_model("resnet8_cifar", num_classes=10)
    for p in model.parameters():
        p.data.normal_()
    (folder / "runs" / "demo").mkdir(parents=True)
    save_file(model.state_dict(), folder / "runs" / "demo" / "model.safetensors")
    return model.state_dict()


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(block, tmp_path):
    code = BLOCKS[block]
    if "runs/demo/model.safetensors" in code:
        _demo_weights(tmp_path)
        code += ("\nfrom safetensors.torch import load_file\n"
                 "saved = load_file('runs/demo/model.safetensors')\n"
                 "assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())\n")
        code = "import torch\n" + code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_there_are_readme_python_blocks():
    assert len(BLOCKS) >= 2 and any("pretrained_cfg_overlay" in b for b in BLOCKS)
