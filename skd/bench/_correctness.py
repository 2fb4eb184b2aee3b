"""Correctness checks for ``python -m skd.bench gpu``: the kernel tests run by pytest in a child
process, and the kernels against their float64 reference at the benchmark's sizes and beyond
2^31 elements (int64 offsets), which the test grid does not reach."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

import skd_kernels
from skd_kernels import reference

# ‖out − ref‖ / ‖ref‖ allowed against the float64 reference on the same (rounded) inputs: losses
# accumulate in fp32 whatever the input dtype; gradients and probabilities are rounded to their
# storage dtype.
LOSS_TOL = 1e-5
STORED_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TEMPERATURE = 4.0


def run_pytest(args: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float,
               log_path: Path, junit_path: Path) -> dict[str, Any]:
    """``python -m pytest -q ARGS`` in a child process (its own session, killed whole on timeout);
    the output goes to ``log_path``. Returns the counts from the JUnit report, the failing tests
    with the first line of their message, the exit status and the duration."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
           f"--junitxml={junit_path}"]
    junit_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode: int | None = proc.wait(
                timeout=None if timeout_s == float("inf") else max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            returncode = None
        except BaseException:  # interrupted: never leave pytest and its workers running
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        if returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result: dict[str, Any] = {"command": "pytest " + " ".join(args), "returncode": returncode,
                              "seconds": time.perf_counter() - start}
    if returncode is None:
        result["timed_out_after_s"] = timeout_s
    if junit_path.exists():
        result.update(_junit_summary(junit_path))
    return result


def _junit_summary(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in root.iter("testcase"):
        for problem in list(case.findall("failure")) + list(case.findall("error")):
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failing.append(f"{case.get('classname')}::{case.get('name')}: "
                           f"{message[0][:300] if message else problem.tag}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failing}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; inf when ``actual`` holds NaN or inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _row_weights(B: int, device: torch.device) -> torch.Tensor:
    """Per-row weights of the summed loss, so the incoming gradient is not 1 everywhere."""
    return torch.linspace(-1.0, 2.0, B, device=device)


def check_softmax_kl(B: int, C: int, dtype: torch.dtype, device: torch.device,
                     rows: slice = slice(None)) -> dict[str, Any]:
    """``softmax_kl`` with fused CE (per-row losses, weighted rows) against the float64 reference
    on ``rows`` of a fresh random ``[B, C]`` batch: relative errors of loss and gradient."""
    s = (torch.randn(B, C, device=device, dtype=dtype) * 3).requires_grad_()
    t = torch.randn(B, C, device=device, dtype=dtype) * 3
    labels = torch.randint(0, C, (B,), device=device)
    weights = _row_weights(B, device)
    loss = skd_kernels.softmax_kl(s, t, TEMPERATURE, "none", labels=labels, ce_weight=0.5)
    (loss * weights).sum().backward()

    s64 = s.detach()[rows].double().requires_grad_()
    ref = reference.softmax_kl(s64, t[rows].double(), TEMPERATURE, "none", labels=labels[rows],
                               ce_weight=0.5)
    (ref * weights[rows]).sum().backward()
    return _verdict({"loss": (_rel_err(loss[rows], ref), LOSS_TOL),
                     "grad": (_rel_err(s.grad[rows], s64.grad), STORED_TOL[dtype])})


def check_pskd_loss(B: int, C: int, dtype: torch.dtype, device: torch.device,
                    rows: slice = slice(None)) -> dict[str, Any]:
    """``pskd_loss`` with an fp16 memory and ``probs_out`` in the logits' dtype (poisoned with NaN
    first) against the float64 reference on ``rows``: loss, gradient and probabilities."""
    N = 1024
    z = (torch.randn(B, C, device=device, dtype=dtype) * 3).requires_grad_()
    labels = torch.randint(0, C, (B,), device=device)
    memory = torch.softmax(torch.randn(N, C, device=device) * 2, -1).half()
    index = torch.randint(0, N, (B,), device=device)
    alpha = torch.tensor(0.35, device=device)
    probs = torch.full((B, C), float("nan"), device=device, dtype=dtype)
    weights = _row_weights(B, device)
    loss = skd_kernels.pskd_loss(z, labels, memory, index, alpha, "none", probs_out=probs)
    (loss * weights).sum().backward()

    z64 = z.detach()[rows].double().requires_grad_()
    ref = reference.pskd_loss(z64, labels[rows], memory.double(), index[rows], 0.35, "none")
    (ref * weights[rows]).sum().backward()
    return _verdict({"loss": (_rel_err(loss[rows], ref), LOSS_TOL),
                     "grad": (_rel_err(z.grad[rows], z64.grad), STORED_TOL[dtype]),
                     "probs": (_rel_err(probs[rows], torch.softmax(z64.detach(), -1)),
                               STORED_TOL[dtype])})


def _verdict(errors: dict[str, tuple[float, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {f"{name}_rel_err": err for name, (err, _) in errors.items()}
    row["ok"] = all(err <= tol for err, tol in errors.values())
    return row


CHECKS = {"softmax_kl": check_softmax_kl, "pskd_loss": check_pskd_loss}


def large_offset_rows(C: int, extra_rows: int = 64) -> tuple[int, slice]:
    """``(B, rows)``: a batch whose last ``extra_rows`` rows start beyond 2^31 elements, and those
    rows: a 32-bit element offset would wrap there."""
    B = 2**31 // C + extra_rows
    return B, slice(B - extra_rows, B)
