"""Every module of ``skd`` and ``skd_kernels`` imports on its own (no import cycles), and every
package is listed in pyproject.toml (a wheel holds only the listed packages)."""
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import skd
import skd_kernels

ROOT = Path(__file__).resolve().parents[1]

# In one interpreter: before each module, forget every skd/skd_kernels module (torch and timm stay
# loaded, they are not part of any cycle of ours), so each import starts as in a fresh process.
_SCRIPT = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("skd", "skd_kernels")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules(package) -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return [package.__name__] + [n for n in found if not n.endswith(".__main__")]  # entry points run


def test_every_module_imports_alone():
    names = _modules(skd) + _modules(skd_kernels)
    assert "skd.teacher" in names and "skd_kernels.reference" in names
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *names], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "skd").rglob("__init__.py")}
    found.add("skd_kernels")
    assert listed == found
