"""README's Python snippets run as written, each in a fresh interpreter, against a real run."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)

# What the snippets may use, appended to them: the run's own files to compare against.
CHECKS = {
    "pretrained_cfg_overlay": "\nfrom safetensors.torch import load_file\n"
                              "saved = load_file('runs/demo/model.safetensors')\n"
                              "assert all(model.state_dict()[k].equal(v) for k, v in saved.items())\n",
    "Predictions.load": "\nimport json\n"
                        "expected = json.load(open('runs/demo/metrics.json'))\n"
                        "assert p.metrics() == {k: v for k, v in expected.items() if k not in ('best', 'ema')}\n",
}


@pytest.fixture(scope="module")
def workdir(demo_run):
    """A folder holding runs/demo, the demo run as README's first command makes it."""
    return demo_run.folder


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(block, workdir):
    code = BLOCKS[block] + "".join(check for marker, check in CHECKS.items() if marker in BLOCKS[block])
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_snippet_that_reads_a_run_is_checked_against_it():
    assert len(BLOCKS) >= 3
    for marker in CHECKS:
        assert any(marker in b for b in BLOCKS), marker
    assert all(any(m in b for m in CHECKS) for b in BLOCKS if "runs/demo" in b)
