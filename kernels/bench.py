"""Benchmark of the fused losses: forward, backward and forward+backward time, effective bandwidth
and peak memory, against the eager reference, ``torch.compile(reference)`` and Liger-Kernel's
KL divergence (when ``liger_kernel`` is importable), beside a plain copy bandwidth.

    python -m skd_kernels.bench [--out results.json] [--ops softmax_kl pskd_loss] [--dtypes bf16 fp32]

Ops (``CASES``): ``softmax_kl`` (T = 4), ``pskd_loss`` (with ``probs_out``), ``pskd_loss_mixed``
(the same with a Mixup/CutMix target: λ, partner, label smoothing) and ``pskd_topk_loss`` (a top-k
memory of k = 32 classes, the new top-k written).

Effective bandwidth = the bytes any implementation must move ÷ the median time: the inputs read
once and the outputs (gradient, ``probs_out``, the new top-k) written once. ``% copy`` compares
it with ``y.copy_(x)`` measured in the same run. Times are ``triton.testing.do_bench`` medians with
20 % / 80 % quantiles. Needs a CUDA GPU; ``--smoke`` only checks this harness on CPU under
``TRITON_INTERPRET=1`` (tiny shapes, wall-clock timer, numbers meaningless).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import skd_kernels
from skd_kernels import _dispatch, reference

SHAPES = [(256, 100), (256, 1000), (1024, 1000), (4096, 1000), (256, 21841), (1024, 21841)]
SMOKE_SHAPES = [(8, 100), (2, 5000)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("triton", "eager", "compile", "liger")
MODES = ("fwd", "bwd", "full")
QUANTILES = [0.5, 0.2, 0.8]
TEMPERATURE = 4.0
PSKD_ALPHA = 0.5
MIX_LAM, MIX_SMOOTHING = 0.7, 0.1  # a Mixup/CutMix batch: λ, label smoothing
TOPK_K = 32  # classes per top-k memory row


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _time_ms(fn, grad_to_none, smoke):
    """(median, p20, p80) in ms."""
    if not smoke:
        from triton.testing import do_bench

        return tuple(do_bench(fn, grad_to_none=grad_to_none, quantiles=QUANTILES))
    times = []
    for _ in range(5):
        for x in grad_to_none:
            x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def _peak_mb(fn, grad_to_none, device):
    if device.type != "cuda":
        return None
    for x in grad_to_none:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbps(device, smoke):
    """``y.copy_(x)`` of 1 GiB (4 MiB with --smoke): read + write bytes ÷ median time."""
    nbytes = 2**22 if smoke else 2**30
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), [], smoke)[0]
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# cases: each builds its inputs, its providers and the bytes that must move
# ------------------------------------------------------------------------------------------------
def _liger_kl():
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:  # not installed, or does not import here
        return None
    return LigerKLDIVLoss(reduction="batchmean", log_target=True)


def softmax_kl_case(B, C, dtype, device, providers):
    s = (torch.randn(B, C, device=device) * 3).to(dtype).requires_grad_()
    t = (torch.randn(B, C, device=device) * 3).to(dtype)
    T = TEMPERATURE
    fns = {
        "triton": lambda: skd_kernels.softmax_kl(s, t, T),
        "eager": lambda: reference.softmax_kl(s, t, T),
    }
    if "compile" in providers:
        compiled = torch.compile(reference.softmax_kl, dynamic=False)
        fns["compile"] = lambda: compiled(s, t, T)
    liger = _liger_kl() if "liger" in providers else None
    if liger is not None:  # Liger takes log-probabilities: the two log_softmax are part of its cost
        fns["liger"] = lambda: liger(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * (T * T)
    es = s.element_size()
    nbytes = {"fwd": 2 * es * B * C, "full": 3 * es * B * C}  # read s, t; write ds
    return fns, [s], nbytes


def _pskd_case(B, C, dtype, device, providers, mixed):
    """Memory and probs_out in the logits' dtype; 2·B memory rows, B distinct ones read. Mixed:
    λ and ε as device tensors, each row paired with row B − 1 − i (timm's batch mode), so every
    row also reads its partner's label and memory row."""
    z = (torch.randn(B, C, device=device) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), device=device)
    memory = torch.softmax(torch.randn(2 * B, C, device=device), -1).to(dtype)
    index = torch.randperm(2 * B, device=device)[:B]
    alpha = torch.tensor(PSKD_ALPHA, device=device)
    probs = torch.empty(B, C, dtype=dtype, device=device)
    mixing = {}
    if mixed:
        mixing = dict(lam=torch.tensor(MIX_LAM, device=device),
                      partner=torch.arange(B, device=device).flip(0),
                      smoothing=torch.tensor(MIX_SMOOTHING, device=device))
    fns = {
        "triton": lambda: skd_kernels.pskd_loss(z, labels, memory, index, alpha, probs_out=probs,
                                                **mixing),
        "eager": lambda: reference.pskd_loss(z, labels, memory, index, alpha, probs_out=probs,
                                             **mixing),
    }
    if "compile" in providers:
        compiled = torch.compile(reference.pskd_loss, dynamic=False)
        fns["compile"] = lambda: compiled(z, labels, memory, index, alpha, probs_out=probs,
                                          **mixing)
    es = z.element_size()
    # read z and the memory rows (a partner's row is one of the same B), write probs (and dz)
    nbytes = {"fwd": 3 * es * B * C, "full": 4 * es * B * C}
    return fns, [z], nbytes


def pskd_case(B, C, dtype, device, providers):
    return _pskd_case(B, C, dtype, device, providers, mixed=False)


def pskd_mixed_case(B, C, dtype, device, providers):
    return _pskd_case(B, C, dtype, device, providers, mixed=True)


def pskd_topk_case(B, C, dtype, device, providers):
    """A top-k memory of ``TOPK_K`` classes per row (fewer when C is smaller) in the logits'
    dtype, 2·B rows, B distinct ones read; the new top-k written. The selection of the new top-k
    is data-dependent: random logits replace few kept classes after the first block."""
    k = min(TOPK_K, C)
    z = (torch.randn(B, C, device=device) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), device=device)
    values, ids = torch.softmax(torch.randn(2 * B, C, device=device), -1).topk(k, dim=-1)
    values, ids = values.to(dtype), ids.int()
    index = torch.randperm(2 * B, device=device)[:B]
    alpha = torch.tensor(PSKD_ALPHA, device=device)
    values_out = torch.empty(B, k, dtype=dtype, device=device)
    ids_out = torch.empty(B, k, dtype=torch.int32, device=device)
    args = (labels, values, ids, index, alpha)
    out = dict(values_out=values_out, ids_out=ids_out)
    fns = {
        "triton": lambda: skd_kernels.pskd_topk_loss(z, *args, **out),
        "eager": lambda: reference.pskd_topk_loss(z, *args, **out),
    }
    if "compile" in providers:
        compiled = torch.compile(reference.pskd_topk_loss, dynamic=False)
        fns["compile"] = lambda: compiled(z, *args, **out)
    es = z.element_size()
    # read z and the memory rows (values and int32 ids), write the new rows (and dz)
    topk_rows = 2 * B * k * (es + 4)
    nbytes = {"fwd": es * B * C + topk_rows, "full": 2 * es * B * C + topk_rows}
    return fns, [z], nbytes


CASES = {"softmax_kl": softmax_kl_case, "pskd_loss": pskd_case,
         "pskd_loss_mixed": pskd_mixed_case, "pskd_topk_loss": pskd_topk_case}


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------
def _git_commit():
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _metadata(device):
    import triton

    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        liger = version("liger_kernel")
    except Exception:
        liger = None
    return {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu (interpreter)"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger_kernel": liger,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(op, B, C, dtype_name, device, providers, smoke):
    torch._dynamo.reset()  # a fresh torch.compile per shape, never the recompile limit
    fns, grad_inputs, nbytes = CASES[op](B, C, DTYPES[dtype_name], device, providers)
    rows = []
    for provider in providers:
        if provider not in fns:
            continue
        fn = fns[provider]
        try:
            fn().backward()  # warm-up: compile, autotune, allocate
            out = fn()
            timings = {
                "fwd": _time_ms(fn, grad_inputs, smoke),
                "bwd": _time_ms(lambda: out.backward(retain_graph=True), grad_inputs, smoke),
                "full": _time_ms(lambda: fn().backward(), grad_inputs, smoke),
            }
            peak = _peak_mb(lambda: fn().backward(), grad_inputs, device)
        except Exception as e:  # one provider failing (OOM, compile error) does not stop the run
            first_line = str(e).splitlines()[0] if str(e) else ""
            rows.append(dict(op=op, dtype=dtype_name, B=B, C=C, provider=provider,
                             error=f"{type(e).__name__}: {first_line}"))
            continue
        for mode, (ms, p20, p80) in timings.items():
            gbps = nbytes[mode] / (ms * 1e-3) / 1e9 if mode in nbytes else None
            rows.append(dict(op=op, dtype=dtype_name, B=B, C=C, provider=provider, mode=mode,
                             ms=ms, ms_p20=p20, ms_p80=p80, bytes=nbytes.get(mode), GBps=gbps,
                             peak_MB=peak if mode == "full" else None))
    return rows


def _print_row(row, copy_gbps):
    head = f"{row['op']:<16}{row['dtype']:<6}{row['B']:>6}{row['C']:>7}  {row['provider']:<9}"
    if "error" in row:
        print(f"{head}error: {row['error']}")
        return
    if row["GBps"]:
        gbps = f"{row['GBps']:8.0f}{100 * row['GBps'] / copy_gbps:7.0f}%"
    else:
        gbps = f"{'-':>8}{'-':>8}"
    peak = f"{row['peak_MB']:9.1f}" if row["peak_MB"] is not None else f"{'':>9}"
    print(f"{head}{row['mode']:<5}{row['ms']:9.4f} [{row['ms_p20']:.4f}, {row['ms_p80']:.4f}]"
          f"{gbps}{peak}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m skd_kernels.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--ops", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--shapes", nargs="+", metavar="BxC",
                        help=f"e.g. 256x1000 (default: {' '.join(f'{b}x{c}' for b, c in SHAPES)})")
    parser.add_argument("--smoke", action="store_true",
                        help="check the harness on CPU under TRITON_INTERPRET=1 "
                             "(meaningless numbers)")
    args = parser.parse_args(argv)

    if args.smoke:
        if not _dispatch.INTERPRET:
            sys.exit("skd_kernels.bench --smoke runs the kernels on CPU: set TRITON_INTERPRET=1.")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("skd_kernels.bench needs a CUDA GPU and none is visible: nothing was measured.")
    elif _dispatch.INTERPRET:
        sys.exit("skd_kernels.bench: TRITON_INTERPRET is set, so the kernels would be interpreted; "
                 "unset it.")
    else:
        device = torch.device("cuda")
    shapes = ([tuple(int(n) for n in s.lower().split("x")) for s in args.shapes] if args.shapes
              else SMOKE_SHAPES if args.smoke else SHAPES)
    providers = [p for p in args.providers if not (args.smoke and p == "compile")]

    meta = _metadata(device)
    copy_gbps = copy_bandwidth_gbps(device, args.smoke)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"liger {meta['liger_kernel'] or 'not installed'} | {meta['git_commit'][:12]} | "
          f"{meta['date']}")
    print(f"copy bandwidth (y.copy_(x)): {copy_gbps:.0f} GB/s")
    print(f"{'op':<16}{'dtype':<6}{'B':>6}{'C':>7}  {'provider':<9}{'mode':<5}{'ms':>9} [p20, p80]"
          f"{'GB/s':>10}{'% copy':>8}{'peak MB':>9}")
    rows = []
    for op in args.ops:
        for dtype_name in args.dtypes:
            for B, C in shapes:
                for row in run_case(op, B, C, dtype_name, device, providers, args.smoke):
                    _print_row(row, copy_gbps)
                    rows.append({**row, **meta})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "copy_GBps": copy_gbps, "results": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
