"""Reading weights files without running code, and loading weights into a model strictly.

Every torch file skd reads (run checkpoints and their parts, teacher weights, ``model.checkpoint``,
``skd convert``'s input, the checkpoint given to ``skd eval``) goes through ``read_torch_file``:
``torch.load(weights_only=True)``, which builds tensors and plain containers and nothing else. A
file that does not load that way is a ``CheckpointError`` that names it, says why (damaged, or it
holds Python objects) and what skd expected. torch's own message is never shown: it suggests
``weights_only=False``, which for an untrusted file is the one unsafe thing to do.

``load_state_dict_file`` reads the model weights inside a safetensors or torch file, whatever the
layout (see ``extract_state_dict``); ``load_weights`` loads them into a model, and a file that does
not fit is an error listing the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from skd.errors import CheckpointError, CheckpointUnreadable, MissingFileError

__all__ = ["read_torch_file", "load_state_dict_file", "extract_state_dict", "load_weights",
           "WEIGHTS_EXPECTED"]

WEIGHTS_EXPECTED = ("a safetensors file, or a torch file of tensors (a state_dict, possibly under "
                    "'state_dict', 'model', 'net' or 'module', or an skd checkpoint)")
"""What a weights file (teacher, ``model.checkpoint``, ``skd convert``'s input) may be."""

_WRAPPER_KEYS = ("state_dict", "model", "net", "module")


def read_torch_file(path: str | Path, what: str, expected: str, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (``mmap``: tensors memory-mapped).

    A missing file is a ``MissingFileError``; a file that does not load is a ``CheckpointError``
    naming ``what`` and ``path``, the reason and ``expected`` (what the file should have been)."""
    path = Path(path)
    _check_is_file(path, what)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  torch raises many types for a file it cannot read
        kind = CheckpointUnreadable if isinstance(e, OSError) else CheckpointError  # I/O: maybe fine later
        raise kind(f"{what} {path} {_why_not_loadable(path, e)}; expected {expected}") from None


def _check_is_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")


def _why_not_loadable(path: Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in skd's words (never torch's)."""
    unsafe: list[str] = []
    if zipfile.is_zipfile(path):
        with contextlib.suppress(Exception):  # a damaged archive: no list, the generic reason below
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    if unsafe:
        return (f"is not a file skd can load safely: it holds Python objects ({', '.join(unsafe[:3])}), "
                f"and skd never unpickles objects, which can run code")
    if isinstance(error, pickle.UnpicklingError):
        return ("is not a file skd can load safely: it is a pickle of Python objects, not a torch "
                "file of tensors, and skd never unpickles objects, which can run code")
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or type(error).__name__})"
    return "does not load: it is damaged (e.g. truncated) or not a torch file"


def load_state_dict_file(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The model ``state_dict`` inside a safetensors or torch file (see ``extract_state_dict``);
    errors name ``what`` (e.g. ``teacher checkpoint``) and the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        # Memory-mapped when torch's zip format allows (an skd checkpoint's optimizer state and
        # PS-KD memory are never read); the legacy format cannot be mapped.
        mmap = path.is_file() and zipfile.is_zipfile(path)
        return extract_state_dict(read_torch_file(path, what, WEIGHTS_EXPECTED, mmap=mmap), f"{what} {path}")
    _check_is_file(path, what)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{what} {path} is not a valid safetensors file ({e}); "
                              f"expected {WEIGHTS_EXPECTED}") from None


def extract_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded file: an skd run checkpoint (the student, the
    ``model.`` entries of ``state["method"]``), a plain ``state_dict``, or one held under
    ``state_dict``, ``model`` (RepDistiller, ICKD), ``net`` (CS-KD, PS-KD) or ``module``; a DDP
    ``module.`` prefix is dropped. ``source`` names the file in errors."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state_dict; "
                              f"expected {WEIGHTS_EXPECTED}")
    if isinstance(state.get("method"), dict):  # skd run checkpoint: the student is "model.*"
        state = {k.removeprefix("model."): v for k, v in state["method"].items() if k.startswith("model.")}
    else:
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} contains no tensors (top-level keys: {sorted(map(str, state))[:8]}); "
                              f"expected {WEIGHTS_EXPECTED}")
    return tensors


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """Load ``state`` into ``model`` strictly. If it does not fit, a ``CheckpointError``
    "``source`` does not fit ``target``" with the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} (model: {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label} {_some(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit {target}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _some(items: list[str], n: int = 3) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
