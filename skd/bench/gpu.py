"""The GPU check: every number skd needs from a GPU, in one run of a few minutes.

    python -m skd.bench gpu --out DIR [--stages ...] [--time-budget S] [--commit SHA]
    python -m skd.bench gpu --out DIR --smoke     # the same code paths on a CPU, tiny sizes

Stages, in order; each writes its results before the next starts (``DIR/gpu_check.json`` and
``DIR/gpu_check.md`` are rewritten after every measured row), so a run stopped at any point keeps
what it finished:

1. ``correctness``: ``tests/test_kernels.py`` on CUDA (the whole grid: every dtype, C up to 21,841
   and beyond one block, extreme logits, ``torch.compile(fullgraph=True)``, CUDA-graph capture and
   replay), then the other tests marked ``gpu``, then both kernels against their float64
   reference at the benchmark's shapes and past 2^31 elements.
2. ``kernels``: ``skd_kernels.bench`` at B×C = 1024×21,841, 256×1000, 1024×1000 and 4096×1000,
   bf16 and fp32 (then PS-KD with a Mixup target and top-k PS-KD at the goal shapes, bf16):
   forward, backward, forward+backward, peak memory, against eager, ``torch.compile(reference)``
   and Liger-Kernel (when installed), beside the copy bandwidth of the same run.
3. ``syncs``: host synchronisations per training step of every method, counted with the
   profiler and with ``torch.cuda.set_sync_debug_mode``, beside a control step that synchronises
   once.
4. ``steps``: images/s of training steps of every method, built from skd's own components, on a
   synthetic batch already on the GPU: ResNet-50 (and ResNet-18 for KD from a ResNet-50
   teacher), 224 px, bf16 autocast, channels_last, eager and ``model.compile()``; the ratio to
   ``ce``, peak memory, the loss alone, and the same step with the kernels replaced by their
   PyTorch reference.
5. ``loaders``: ``skd.bench.loader`` (torch and DALI backends, alone and feeding ResNet-50) when
   that module and the backends' packages are installed; otherwise the stage says what is missing.

The issue's goals (``evaluate_goals``) are computed from the run's own numbers: measured value,
target, met or missed. ``--time-budget`` (default 300 s) is shared among the stages; a stage that
runs out of time records what it skipped, and an interrupt (Ctrl-C, ``timeout --signal=INT``) marks the stage it
stopped. Only the loader stage needs a package the bare GPU machine lacks (webdataset, DALI);
``launch/gpu_check.sh`` runs this on such a machine with the wheels ``launch/fetch_wheels.sh``
fetched.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

STAGES = ("correctness", "kernels", "syncs", "steps", "loaders")
# Shares of the time budget; a stage's deadline is its share of what is left when it starts, so
# time a stage leaves unused goes to the stages after it.
STAGE_SHARES = {"correctness": 0.25, "kernels": 0.25, "syncs": 0.06, "steps": 0.32, "loaders": 0.12}
DEFAULT_TIME_BUDGET_S = 300.0
REPO_ROOT = Path(__file__).resolve().parents[2]

TITLES = {"correctness": "1. Correctness on CUDA", "kernels": "2. Kernels",
          "syncs": "3. Host synchronisation in a training step", "steps": "4. Training steps",
          "loaders": "5. Loaders"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every size of a run: the GPU plan, or the smoke plan (CPU, Triton interpreter)."""

    kernel_cases: list[tuple[str, str, tuple[int, int]]]
    """(op, dtype, (B, C)) of the kernel benchmark, most important first."""
    bandwidth_shape: tuple[int, int]
    """The shape of the bandwidth goal (fused softmax-KL fwd+bwd, bf16)."""
    launch_shape: tuple[int, int]
    """The small shape of the speed-up goals."""
    grid_shapes: list[tuple[int, int]]
    grid_dtypes: tuple[str, ...]
    large_offset_classes: int | None
    """C of the check past 2^31 elements (None: not run)."""
    kernel_test_args: list[str]
    """pytest arguments for ``tests/test_kernels.py``."""
    other_gpu_tests: bool
    """Also run the tests marked ``gpu`` in the other test files."""
    large_model: str
    small_model: str
    teacher_model: str
    # _steps.StepSizes: skd.bench._steps imports skd_kernels, which must wait until main has set
    # TRITON_INTERPRET for a smoke run.
    step_sizes: Any
    sync_sizes: Any
    warmup: int
    windows: int
    calls: int
    sync_calls: int
    """Training steps per count of the syncs stage (after ``sync_calls`` warm-up steps)."""
    compile_kwargs: dict[str, Any]
    compile_limit: int | None
    """How many configurations (most important first) also run with ``model.compile()``."""
    loader_feed_model: str
    loader_images: int
    loader_batch: int
    loader_workers: int

    def step_specs(self) -> list[Any]:
        from skd.bench._steps import StepSpec

        methods = ("ce", "pskd", "cskd", "tfkd", "ls", "uskd")
        # PS-KD's other memory layouts (docs/scaling.md): on one GPU the sharded memory
        # routes, gathers and dedups its rows but exchanges nothing (python -m skd.bench
        # memory-plan computes the exchange); the top-k memory runs its own kernel.
        k = min(32, self.step_sizes.num_classes)
        memories = [(("memory", "sharded"),), (("memory", "topk"), ("memory_k", k))]
        return [StepSpec(self.large_model, m) for m in methods] + [
                StepSpec(self.large_model, "pskd", options=o) for o in memories] + [
                StepSpec(self.small_model, "ce"),
                        StepSpec(self.small_model, "kd", teacher=self.teacher_model)] + [
                StepSpec(self.large_model, m) for m in ("dlb", "byot", "zipf_ls", "bake")]


def _kernel_cases(shapes: list[tuple[int, int]], first: list[tuple[int, int]],
                  dtypes: tuple[str, ...] = ("bf16", "fp32")):
    """The two training losses at the goal shapes first (bf16, then fp32), then at the other
    shapes; last, the Mixup and top-k PS-KD variants at the goal shapes in the first dtype."""
    rest = [s for s in shapes if s not in first]
    main = [(op, dtype, shape) for group in (first, rest) for dtype in dtypes
            for op in ("softmax_kl", "pskd_loss") for shape in group]
    return main + [(op, dtypes[0], shape) for op in ("pskd_loss_mixed", "pskd_topk_loss")
                   for shape in first]


def make_plan(smoke: bool) -> Plan:
    from skd.bench._steps import StepSizes

    if smoke:
        return Plan(
            kernel_cases=_kernel_cases([(8, 100)], [(8, 100)], ("bf16",)),
            bandwidth_shape=(8, 100), launch_shape=(8, 100),
            grid_shapes=[(2, 5000)], grid_dtypes=("bf16",), large_offset_classes=None,
            kernel_test_args=["-k", "leading_dims_and_errors or cuda_graph_capture"],
            other_gpu_tests=False,
            large_model="resnet8_cifar", small_model="test_resnet", teacher_model="resnet8_cifar",
            step_sizes=StepSizes(batch_size=4, img_size=32, num_classes=10, num_samples=64),
            sync_sizes=StepSizes(batch_size=2, img_size=32, num_classes=10, num_samples=16),
            warmup=0, windows=2, calls=1, sync_calls=1,
            # Inductor would compile C++ for the CPU for minutes; aot_eager traces the same graphs.
            compile_kwargs={"backend": "aot_eager"}, compile_limit=1,
            loader_feed_model="test_resnet", loader_images=32, loader_batch=8, loader_workers=1)
    xdist = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    return Plan(
        kernel_cases=_kernel_cases([(256, 1000), (1024, 1000), (4096, 1000), (1024, 21841)],
                                   [(1024, 21841), (256, 1000)]),
        bandwidth_shape=(1024, 21841), launch_shape=(256, 1000),
        grid_shapes=[(256, 1000), (1024, 1000), (4096, 1000), (1024, 21841)],
        grid_dtypes=("fp32", "bf16", "fp16"),
        large_offset_classes=21841,
        kernel_test_args=xdist, other_gpu_tests=True,
        large_model="resnet50", small_model="resnet18", teacher_model="resnet50",
        step_sizes=StepSizes(batch_size=256, img_size=224, num_classes=1000,
                             num_samples=1_281_167),  # ImageNet-1k: PS-KD memory 2.56 GB in fp16
        sync_sizes=StepSizes(batch_size=32, img_size=64, num_classes=1000, num_samples=10_000),
        warmup=5, windows=3, calls=10, sync_calls=3, compile_kwargs={}, compile_limit=None,
        loader_feed_model="resnet50", loader_images=4096, loader_batch=256,
        loader_workers=os.cpu_count() or 1)


@dataclasses.dataclass
class Context:
    device: Any  # torch.device
    plan: Plan
    smoke: bool
    out_dir: Path
    work_dir: Path
    save: Callable[[], None]
    deadline: float = float("inf")
    _accelerator: Any = None

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def accelerator(self):
        """One accelerate ``Accelerator`` (bf16) for the process: its state is process-wide."""
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision="bf16")
        return self._accelerator


# ------------------------------------------------------------------------------------------------
# stage 1: correctness
# ------------------------------------------------------------------------------------------------
def stage_correctness(ctx: Context, record: dict[str, Any]) -> None:
    import torch

    from skd.bench import _correctness

    tests = REPO_ROOT / "tests" / "test_kernels.py"
    if not tests.exists():
        record.update(status="skipped", reason=f"{tests} not found: run from a source checkout")
        return
    env = dict(os.environ)
    if ctx.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:  # the kernels compiled for the GPU, never interpreted
        env.pop("TRITON_INTERPRET", None)
    record["pytest"] = []
    log_path = ctx.out_dir / "correctness_pytest.log"
    log_path.unlink(missing_ok=True)
    record["skipped"] = []
    runs = [["tests/test_kernels.py", *ctx.plan.kernel_test_args]]
    if ctx.plan.other_gpu_tests:  # only the files that mark a test gpu: the others are not imported
        marked = [f"tests/{p.name}" for p in sorted(tests.parent.glob("test_*.py"))
                  if p != tests and "mark.gpu" in p.read_text()]
        runs += [[*marked, "-m", "gpu"]] if marked else []
    for args in runs:
        timeout_s = ctx.time_left() - 15  # the checks below take seconds
        if timeout_s < 10:
            record["skipped"].append(f"pytest {' '.join(args)}: time budget")
            continue
        result = _correctness.run_pytest(args, cwd=REPO_ROOT, env=env, timeout_s=timeout_s,
                                         log_path=log_path, junit_path=ctx.work_dir / "junit.xml")
        record["pytest"].append(result)
        ctx.save()
    record["log"] = log_path.name

    record["grid"] = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for op, check in _correctness.CHECKS.items():
        for dtype_name in ctx.plan.grid_dtypes:
            dtype = dtypes[dtype_name]
            for B, C in ctx.plan.grid_shapes:
                torch.manual_seed(0)
                row = {"op": op, "dtype": dtype_name, "B": B, "C": C}
                row.update(check(B, C, dtype, ctx.device))
                record["grid"].append(row)
    ctx.save()

    C = ctx.plan.large_offset_classes
    if ctx.device.type != "cuda" or C is None:
        record["large_offsets"] = {"status": "skipped",
                                   "reason": "no CUDA (needs 13 GB of device memory)"}
    else:
        B, rows = _correctness.large_offset_rows(C)
        record["large_offsets"] = {"B": B, "C": C, "elements": B * C,
                                   "rows_checked": rows.stop - rows.start}
        for op, check in _correctness.CHECKS.items():
            torch.manual_seed(0)
            record["large_offsets"][op] = check(B, C, torch.bfloat16, ctx.device, rows)
            torch.cuda.empty_cache()
    pytest_ok = all(r["returncode"] == 0 for r in record["pytest"])
    large = record["large_offsets"]
    large_ok = large.get("status") == "skipped" or all(large[op]["ok"] for op in _correctness.CHECKS)
    grid_ok = all(r["ok"] for r in record["grid"])
    record["status"] = "ok" if pytest_ok and grid_ok and large_ok and not record["skipped"] else "failed"
    if record["skipped"]:
        record["reason"] = "not every test ran"


# ------------------------------------------------------------------------------------------------
# stage 2: kernels
# ------------------------------------------------------------------------------------------------
def stage_kernels(ctx: Context, record: dict[str, Any]) -> None:
    from skd_kernels import bench

    # The smoke run leaves out the compiled reference (inductor would build C++ for minutes) and
    # Liger (its kernels do not run in the Triton interpreter).
    providers = [p for p in bench.PROVIDERS if not (ctx.smoke and p in ("compile", "liger"))]
    record.update(providers=providers, liger=_liger_status(), rows=[], skipped=[])
    record["copy_GBps"] = bench.copy_bandwidth_gbps(ctx.device, ctx.smoke)
    ctx.save()
    for op, dtype, (B, C) in ctx.plan.kernel_cases:
        if ctx.time_left() <= 0:
            record["skipped"].append(f"{op} {dtype} {B}x{C}: time budget")
            continue
        record["rows"].extend(bench.run_case(op, B, C, dtype, ctx.device, providers, ctx.smoke))
        ctx.save()
    errors = [r for r in record["rows"] if "error" in r]
    record["status"] = "failed" if errors else "ok"
    if errors:
        record["reason"] = f"{len(errors)} provider runs failed (see rows)"


def _liger_status() -> str:
    """Liger-Kernel's version, or why the benchmark cannot use it."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "not installed"
    try:
        from liger_kernel.transformers import LigerKLDIVLoss  # noqa: F401
    except Exception as e:  # noqa: BLE001  a broken optional install must not stop the run
        return f"import failed: {type(e).__name__}: {e}"
    return importlib.metadata.version("liger_kernel")


# ------------------------------------------------------------------------------------------------
# stage 3: host synchronisation
# ------------------------------------------------------------------------------------------------
def stage_syncs(ctx: Context, record: dict[str, Any]) -> None:
    from skd.bench import _steps

    sizes, device, calls = ctx.plan.sync_sizes, ctx.device, ctx.plan.sync_calls
    record.update(steps_per_count=calls, batch_size=sizes.batch_size, img_size=sizes.img_size,
                  events=list(_steps.SYNC_EVENTS), rows=[], skipped=[])

    def count(step: Callable[[], Any]) -> dict[str, Any]:
        for _ in range(calls):  # warm-up: allocator, cuDNN, first-call work
            step()
        events = _steps.profiled_event_counts(step, device, calls)
        syncs = {n: events[n] for n in _steps.SYNC_EVENTS if events[n] > 0}
        return {"syncs": syncs,
                # On a GPU the runtime calls are what block; on a CPU only the op exists.
                "syncs_per_step": sum(v for n, v in syncs.items() if n.startswith("cuda") or
                                      device.type != "cuda") / calls,
                "sync_debug_warnings_per_step": (_steps.sync_debug_warnings(step, calls) / calls
                                                 if device.type == "cuda" else None),
                "kernel_ops": sorted(n for n in events if n.startswith(_steps.KERNEL_OP_PREFIX))}

    for spec in ctx.plan.step_specs():
        if ctx.time_left() <= 0:
            record["skipped"].append(f"{spec.model} {spec.label}: time budget")
            continue
        train_step = _steps.TrainStep(ctx.accelerator, spec, sizes, work_dir=ctx.work_dir)
        record["rows"].append({"model": spec.model, "method": spec.name, "teacher": spec.teacher,
                               **count(train_step)})
        if spec == ctx.plan.step_specs()[0]:
            # The control: the same step plus one .item(); a counter that misses it proves nothing.
            record["control"] = {"model": spec.model, "method": f"{spec.name} + loss.item()",
                                 **count(lambda: train_step()["loss"].item())}
        train_step.close()
        ctx.save()
    record["status"] = "ok"


# ------------------------------------------------------------------------------------------------
# stage 4: training steps
# ------------------------------------------------------------------------------------------------
def stage_steps(ctx: Context, record: dict[str, Any]) -> None:
    import torch

    from skd.bench import _steps

    plan, device = ctx.plan, ctx.device
    sizes = plan.step_sizes
    record.update(batch_size=sizes.batch_size, img_size=sizes.img_size,
                  num_classes=sizes.num_classes, num_samples=sizes.num_samples,
                  optimizer=dataclasses.asdict(_steps.OPTIM), rows=[], skipped=[])
    timing = dict(warmup=plan.warmup, windows=plan.windows, calls=plan.calls)

    def measure(step: Callable[[], Any], **row: Any) -> dict[str, Any]:
        _steps.reset_peak_memory(device)
        start = time.perf_counter()
        step()  # the first call: cuDNN algorithm choice, compilation
        first_s = time.perf_counter() - start
        per_step = _steps.seconds_per_call(step, device, **timing)
        ms = sorted(1e3 * s for s in per_step)
        row.update(batch=sizes.batch_size, first_step_s=first_s, step_ms=ms[len(ms) // 2],
                   step_ms_min=ms[0], step_ms_max=ms[-1],
                   img_per_s=sizes.batch_size / (ms[len(ms) // 2] / 1e3),
                   peak_memory_GB=_steps.peak_memory_gb(device))
        return row

    def loss_alone(train_step: Any) -> tuple[float, list[str]]:
        """Median ms of a step of the loss alone, and the kernel ops it called."""
        with train_step.loss_only() as step:
            step()  # records the model's outputs
            per_step = _steps.seconds_per_call(step, device, **timing)
            ops = _steps.profiled_event_counts(step, device, calls=1)
        kernel_ops = sorted(n for n in ops if n.startswith(_steps.KERNEL_OP_PREFIX))
        return 1e3 * sorted(per_step)[len(per_step) // 2], kernel_ops

    def add(row: dict[str, Any]) -> None:
        record["rows"].append(row)
        _add_ratios(record["rows"])
        ctx.save()

    specs = plan.step_specs()
    # Eager: the step with the kernels, the loss alone; then, if the method calls the kernels,
    # both again with the reference losses, on the same model and batch.
    for spec in specs:
        if ctx.time_left() <= 0:
            record["skipped"].append(f"{spec.model} {spec.label} eager: time budget")
            continue
        train_step = _steps.TrainStep(ctx.accelerator, spec, sizes, work_dir=ctx.work_dir)
        base = dict(model=spec.model, method=spec.name, teacher=spec.teacher, mode="eager")
        row = measure(train_step, **base, losses="kernels")
        row["loss_ms"], row["kernel_ops"] = loss_alone(train_step)
        add(row)
        if row["kernel_ops"] and ctx.time_left() > 0:
            with _steps.reference_losses():
                ref = measure(train_step, **base, losses="reference")
                ref["loss_ms"], _ = loss_alone(train_step)
            add(ref)
        train_step.close()

    # cuDNN autotuning, which the trainer leaves off: is it worth turning on?
    if ctx.time_left() > 0:
        torch.backends.cudnn.benchmark = True
        try:
            train_step = _steps.TrainStep(ctx.accelerator, specs[0], sizes, work_dir=ctx.work_dir)
            add(measure(train_step, model=specs[0].model, method=specs[0].method, teacher="",
                        mode="eager+cudnn.benchmark", losses="kernels"))
            train_step.close()
        finally:
            torch.backends.cudnn.benchmark = False

    # model.compile(), as the trainer's model.compile=true: the first step compiles.
    compile_order = sorted(specs, key=lambda s: (s.method not in ("ce", "pskd"),
                                                 s.model != plan.large_model))
    for spec in compile_order[:plan.compile_limit]:
        if ctx.time_left() < (0 if ctx.smoke else 30):  # a compilation takes tens of seconds
            record["skipped"].append(f"{spec.model} {spec.label} compile: time budget")
            continue
        torch._dynamo.reset()
        train_step = _steps.TrainStep(ctx.accelerator, spec, sizes, work_dir=ctx.work_dir,
                                      compile_kwargs=plan.compile_kwargs)
        add(measure(train_step, model=spec.model, method=spec.name, teacher=spec.teacher,
                    mode="compile", losses="kernels"))
        train_step.close()
    record["status"] = "ok"


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_to_ce``: img/s over that of ``ce`` on the same model and mode (and losses, where
    ``ce`` has a reference row; it calls no kernel, so it has none); ``loss_share``: the loss alone
    over the whole step; ``gain_of_kernels`` (on kernel rows): reference over kernel step time."""
    by_key = {(r["model"], r["method"], r["mode"], r["losses"]): r for r in rows}
    for r in rows:
        ce = (by_key.get((r["model"], "ce", r["mode"], r["losses"]))
              or by_key.get((r["model"], "ce", r["mode"], "kernels")))
        r["ratio_to_ce"] = r["img_per_s"] / ce["img_per_s"] if ce else None
        r["loss_share"] = r["loss_ms"] / r["step_ms"] if r.get("loss_ms") is not None else None
        ref = by_key.get((r["model"], r["method"], r["mode"], "reference"))
        if r["losses"] == "kernels" and ref:
            r["gain_of_kernels"] = ref["step_ms"] / r["step_ms"]


# ------------------------------------------------------------------------------------------------
# stage 5: loaders
# ------------------------------------------------------------------------------------------------
# The packages each backend of skd.bench.loader needs beyond the GPU machine's image (skd's
# shard reader uses webdataset's key splitting, so skd's DALI backend needs it too).
LOADER_REQUIREMENTS = {"torch": ("webdataset",), "dali": ("nvidia.dali", "webdataset"),
                       "dali-reader": ("nvidia.dali",), "webdataset": ("webdataset",)}


def stage_loaders(ctx: Context, record: dict[str, Any]) -> None:
    try:
        from skd.bench import loader
    except ModuleNotFoundError as e:
        missing = ("is not in this checkout" if e.name == "skd.bench.loader"
                   else f"needs {e.name}, not installed")
        record.update(status="skipped", reason=f"skd.bench.loader {missing}")
        return
    backends, missing = [], {}
    for backend in getattr(loader, "BACKENDS", tuple(LOADER_REQUIREMENTS)):
        absent = [m for m in LOADER_REQUIREMENTS.get(backend, ()) if not _module_available(m)]
        if absent:
            missing[backend] = f"{', '.join(absent)} not installed (launch/fetch_wheels.sh fetches it)"
        else:
            backends.append(backend)
    record.update(backends=backends, missing=missing, rows=[], skipped=[])
    if not backends:
        record.update(status="skipped", reason="; ".join(f"{b}: {m}" for b, m in missing.items()))
        return
    plan = ctx.plan
    for feed_model in (None, plan.loader_feed_model):
        if ctx.time_left() <= 0:
            record["skipped"].append(f"feeding {feed_model or 'nothing'}: time budget")
            continue
        rows = loader.run_loader_bench(ctx.work_dir / "loader", backends=backends,
                                       num_images=plan.loader_images, batch_size=plan.loader_batch,
                                       num_workers=plan.loader_workers, device=str(ctx.device),
                                       feed_model=feed_model, smoke=ctx.smoke)
        record["rows"].extend(rows)
        ctx.save()
    record["status"] = "ok"


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package (nvidia) is missing
        return False


STAGE_FUNCTIONS = {"correctness": stage_correctness, "kernels": stage_kernels,
                   "steps": stage_steps, "syncs": stage_syncs, "loaders": stage_loaders}


# ------------------------------------------------------------------------------------------------
# goals
# ------------------------------------------------------------------------------------------------
def _goal(name: str, target: str, measured: str | None, met: bool | None, detail: str = "",
          missing: str = "") -> dict[str, Any]:
    status = ("met" if met else "missed") if met is not None else f"not measured: {missing}"
    return {"goal": name, "target": target, "measured": measured, "status": status,
            "detail": detail}


def _stage(data: dict[str, Any], name: str) -> dict[str, Any]:
    return data["stages"].get(name, {})


def _kernel_row(rows: list[dict[str, Any]], op: str, dtype: str, shape: list[int] | tuple,
                provider: str, mode: str = "full") -> dict[str, Any] | None:
    for r in rows:
        if (r["op"], r["dtype"], r["B"], r["C"], r["provider"], r.get("mode")) == (
                op, dtype, shape[0], shape[1], provider, mode):
            return r
    return None


def goal_correctness(data: dict[str, Any]) -> dict[str, Any]:
    stage = _stage(data, "correctness")
    target = "every kernel test and check passes on CUDA"
    if stage.get("status") not in ("ok", "failed"):
        return _goal("CUDA correctness", target, None, None,
                     missing=stage.get("reason") or stage.get("status", "stage not run"))
    failing = sum(r.get("failures", 0) + r.get("errors", 0) for r in stage["pytest"])
    bad_grid = sum(not r["ok"] for r in stage["grid"])
    measured = (f"pytest: {sum(r.get('passed', 0) for r in stage['pytest'])} passed, "
                f"{failing} failed; grid: {len(stage['grid']) - bad_grid}/{len(stage['grid'])} ok")
    return _goal("CUDA correctness", target, measured, stage["status"] == "ok")


def goal_bandwidth(data: dict[str, Any]) -> dict[str, Any]:
    stage = _stage(data, "kernels")
    shape = data["meta"]["plan"]["bandwidth_shape"]
    name = f"softmax_kl fwd+bwd {shape[0]}×{shape[1]} bf16: share of copy bandwidth"
    row = _kernel_row(stage.get("rows", []), "softmax_kl", "bf16", shape, "triton")
    if row is None or "copy_GBps" not in stage:
        return _goal(name, "≥ 85%", None, None, missing="kernels stage did not reach this shape")
    share = row["GBps"] / stage["copy_GBps"]
    return _goal(name, "≥ 85%", f"{100 * share:.0f}%", share >= 0.85,
                 f"{row['GBps']:.0f} GB/s effective vs copy {stage['copy_GBps']:.0f} GB/s; "
                 f"{1e3 * row['ms']:.1f} µs")


def goal_launch_speedups(data: dict[str, Any]) -> list[dict[str, Any]]:
    stage = _stage(data, "kernels")
    shape = data["meta"]["plan"]["launch_shape"]
    rows = stage.get("rows", [])
    goals = []
    for provider, factor, label in (("eager", 3.0, "eager"),
                                    ("compile", 1.2, "torch.compile(reference)")):
        name = f"softmax_kl fwd+bwd {shape[0]}×{shape[1]} bf16: speed-up over {label}"
        ours = _kernel_row(rows, "softmax_kl", "bf16", shape, "triton")
        other = _kernel_row(rows, "softmax_kl", "bf16", shape, provider)
        if ours is None or other is None or "ms" not in other:
            goals.append(_goal(name, f"≥ {factor}×", None, None,
                               missing=f"no {provider} row at this shape"))
            continue
        speedup = other["ms"] / ours["ms"]
        # A launch-bound shape: compare the time with what its bytes cost at copy bandwidth.
        bytes_us = ours["bytes"] / (stage["copy_GBps"] * 1e9) * 1e6 if ours.get("bytes") else None
        detail = (f"ours {1e3 * ours['ms']:.1f} µs, {label} {1e3 * other['ms']:.1f} µs"
                  + (f"; the bytes alone take {bytes_us:.1f} µs at copy bandwidth" if bytes_us else ""))
        goals.append(_goal(name, f"≥ {factor}×", f"{speedup:.2f}×", speedup >= factor, detail))
    return goals


def goal_liger(data: dict[str, Any]) -> dict[str, Any]:
    stage = _stage(data, "kernels")
    name = "softmax_kl never slower than Liger-Kernel (every shape, dtype, mode both ran)"
    pairs = []
    for r in stage.get("rows", []):
        if r["provider"] == "liger" and "ms" in r and r["op"] == "softmax_kl":
            ours = _kernel_row(stage["rows"], r["op"], r["dtype"], (r["B"], r["C"]), "triton",
                               r["mode"])
            if ours is not None:
                pairs.append((ours["ms"] / r["ms"], f"{r['dtype']} {r['B']}×{r['C']} {r['mode']}"))
    if not pairs:
        return _goal(name, "≤ 1.00× Liger's time", None, None,
                     missing=f"no Liger row (Liger-Kernel: {stage.get('liger', 'stage not run')})")
    worst, where = max(pairs)
    return _goal(name, "≤ 1.00× Liger's time", f"worst {worst:.2f}× ({where})", worst <= 1.0,
                 f"{len(pairs)} comparisons")


def goal_pskd_overhead(data: dict[str, Any]) -> dict[str, Any]:
    stage = _stage(data, "steps")
    model = data["meta"]["plan"]["large_model"]
    name = f"PS-KD step time over CE step time, {model}"
    rows = {(r["method"], r["mode"]): r for r in stage.get("rows", [])
            if r["model"] == model and r["losses"] == "kernels"}
    measured, details, met = None, [], None
    for mode in ("eager", "compile"):
        ce, pskd = rows.get(("ce", mode)), rows.get(("pskd", mode))
        if ce and pskd:
            ratio = pskd["step_ms"] / ce["step_ms"]
            spread = (ce["step_ms_max"] - ce["step_ms_min"]) / ce["step_ms"]
            details.append(f"{mode}: {ratio:.3f}× (CE windows spread {100 * spread:.1f}%)")
            if mode == "eager":
                measured, met = f"{ratio:.3f}×", ratio <= 1.01
    return _goal(name, "≤ 1.01×", measured, met, "; ".join(details),
                 missing="the steps stage did not reach CE and PS-KD")


def goal_throughput(data: dict[str, Any]) -> dict[str, Any]:
    stage = _stage(data, "steps")
    model = data["meta"]["plan"]["large_model"]
    name = f"{model} bf16 channels_last training, synthetic data on the GPU"
    device = data["meta"].get("device", "")
    ce = [r for r in stage.get("rows", []) if r["model"] == model and r["method"] == "ce"
          and r["losses"] == "kernels"]
    if not ce:
        return _goal(name, "≥ 3,500 img/s on one H200", None, None,
                     missing="the steps stage did not reach CE")
    best = max(ce, key=lambda r: r["img_per_s"])
    detail = "; ".join(f"{r['mode']}: {r['img_per_s']:,.0f}" for r in ce)
    if "H200" not in device:
        detail += f"; measured on {device}, not an H200"
    return _goal(name, "≥ 3,500 img/s on one H200",
                 f"{best['img_per_s']:,.0f} img/s ({best['mode']})", best["img_per_s"] >= 3500, detail)


def goal_no_sync(data: dict[str, Any]) -> dict[str, Any]:
    stage = _stage(data, "syncs")
    name = "host synchronisations inside a training step (no logging step)"
    control = stage.get("control")
    rows = stage.get("rows", [])
    if not rows or control is None:
        return _goal(name, "0", None, None, missing=stage.get("reason", "the syncs stage did not run"))
    if control["syncs_per_step"] < 1:
        return _goal(name, "0", None, None,
                     missing="the profiler missed the control step's .item(): counts unreliable")
    worst = max(rows, key=lambda r: (r["syncs_per_step"], r["sync_debug_warnings_per_step"] or 0))
    debug = worst["sync_debug_warnings_per_step"]
    measured = (f"{worst['syncs_per_step']:g} per step" + (f" ({debug:g} in sync debug mode)"
                                                           if debug is not None else "")
                + f", worst of {len(rows)} methods ({worst['method']})")
    offenders = "; ".join(f"{r['method']}: {r['syncs']}" for r in rows
                          if r["syncs_per_step"] or r["sync_debug_warnings_per_step"])
    return _goal(name, "0", measured, worst["syncs_per_step"] == 0 and not debug,
                 offenders or f"the control step counted {control['syncs_per_step']:g} per step")


def evaluate_goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [goal_correctness(data), goal_bandwidth(data), *goal_launch_speedups(data),
            goal_liger(data), goal_pskd_overhead(data), goal_throughput(data), goal_no_sync(data)]


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def render(data: dict[str, Any]) -> str:
    from skd.bench._report import markdown_table

    meta = data["meta"]
    parts = ["# skd GPU check", ""]
    if meta.get("smoke"):
        parts += ["**Smoke run (CPU, Triton interpreter, tiny sizes): the numbers mean nothing.**", ""]
    keys = ("device", "driver", "cuda", "torch", "triton", "timm", "accelerate", "liger_kernel",
            "python", "cpu_count", "git_commit", "date")
    parts += [markdown_table(["", ""], [[k, meta.get(k)] for k in keys]), ""]
    parts += ["## Goals", "", markdown_table(
        ["goal", "target", "measured", "status", "detail"],
        [[g["goal"], g["target"], g["measured"], g["status"], g["detail"]] for g in data["goals"]]), ""]
    for name in STAGES:
        if name in data["stages"]:
            parts += [render_stage(name, data["stages"][name]), ""]
    return "\n".join(parts)


def render_stage(name: str, record: dict[str, Any]) -> str:
    head = f"## {TITLES[name]}\n\n{record['status']}, {record['seconds']:.0f} s"
    if record.get("reason"):
        head += f": {record['reason']}"
    body = {"correctness": _render_correctness, "kernels": _render_kernels, "steps": _render_steps,
            "syncs": _render_syncs, "loaders": _render_loaders}[name](record)
    skipped = record.get("skipped") or []
    tail = f"\n\nSkipped ({len(skipped)}): " + "; ".join(skipped) if skipped else ""
    return head + ("\n\n" + body if body else "") + tail


def _e(x: float | None) -> str | None:
    return None if x is None else f"{x:.1e}"


def _render_correctness(r: dict[str, Any]) -> str:
    from skd.bench._report import markdown_table

    out = []
    for p in r.get("pytest", []):
        if "tests" in p:
            line = (f"`{p['command']}`: {p['passed']} passed, "
                    f"{p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped "
                    f"({p['seconds']:.0f} s)")
        else:
            line = f"`{p['command']}`: exit status {p['returncode']} ({p['seconds']:.0f} s)"
        if p.get("timed_out_after_s"):
            line += f", stopped after {p['timed_out_after_s']:.0f} s"
        out.append(line + "".join(f"\n- {f}" for f in p.get("failing", [])))
    if r.get("grid"):
        table = markdown_table(
            ["op", "dtype", "B×C", "loss", "grad", "probs", "ok"],
            [[g["op"], g["dtype"], f"{g['B']}×{g['C']}", _e(g["loss_rel_err"]),
              _e(g["grad_rel_err"]), _e(g.get("probs_rel_err")), g["ok"]] for g in r["grid"]])
        out.append(f"Kernels against the float64 reference (‖out − ref‖ / ‖ref‖):\n\n{table}")
    large = r.get("large_offsets")
    if large:
        if large.get("status") == "skipped":
            out.append(f"Past 2^31 elements: skipped: {large['reason']}")
        else:
            out.append(f"Past 2^31 elements ({large['B']}×{large['C']} bf16, last "
                       f"{large['rows_checked']} rows): " + "; ".join(
                           f"{op} {'ok' if v['ok'] else 'FAILED'} (grad {_e(v['grad_rel_err'])})"
                           for op, v in large.items() if isinstance(v, dict)))
    return "\n\n".join(out)


def _render_kernels(r: dict[str, Any]) -> str:
    from skd.bench._report import fmt, markdown_table

    if "copy_GBps" not in r:
        return ""
    rows = r["rows"]
    table = []
    seen = []
    for row in rows:
        key = (row["op"], row["dtype"], row["B"], row["C"], row.get("mode"))
        if row["provider"] != "triton" or "ms" not in row or key in seen:
            continue
        seen.append(key)
        shape = (row["B"], row["C"])
        others = {p: _kernel_row(rows, row["op"], row["dtype"], shape, p, row["mode"])
                  for p in ("eager", "compile", "liger")}
        us = {p: (1e3 * o["ms"] if o and "ms" in o else None) for p, o in others.items()}
        table.append([row["op"], row["dtype"], f"{row['B']}×{row['C']}", row["mode"],
                      fmt(1e3 * row["ms"], 1), *(fmt(v, 1) for v in us.values()),
                      *(fmt(v / (1e3 * row["ms"])) if v else None for v in us.values()),
                      fmt(row["GBps"], 0),
                      fmt(100 * row["GBps"] / r["copy_GBps"], 0) if row["GBps"] else None,
                      fmt(row["peak_MB"], 1)])
    errors = [f"{e['op']} {e['dtype']} {e['B']}×{e['C']} {e['provider']}: {e['error']}"
              for e in rows if "error" in e]
    text = (f"Copy bandwidth (`y.copy_(x)`, read + write): {r['copy_GBps']:,.0f} GB/s. "
            f"Liger-Kernel: {r['liger']}. Times in µs (medians); × = their time over ours; "
            f"GB/s = bytes that must move ÷ our time.\n\n" + markdown_table(
                ["op", "dtype", "B×C", "mode", "ours µs", "eager µs", "compile µs", "Liger µs",
                 "× eager", "× compile", "× Liger", "GB/s", "% copy", "peak MB"], table))
    return text + ("\n\nErrors:\n" + "\n".join(f"- {e}" for e in errors) if errors else "")


def _render_steps(r: dict[str, Any]) -> str:
    from skd.bench._report import fmt, markdown_table

    if "rows" not in r:
        return ""
    intro = (f"Per-device batch {r['batch_size']} at {r['img_size']} px, {r['num_classes']} classes, "
             f"PS-KD memory {r['num_samples']:,} rows; bf16 autocast, channels_last, "
             f"{r['optimizer']['opt']} SGD. img/s from the median of the timed windows; "
             f"loss ms = a step of the loss alone (model outputs replayed; synchronised wall "
             f"time, so an upper bound of what it adds to a GPU-bound step).")
    table = [[x["model"], x["method"] + (f" ← {x['teacher']}" if x["teacher"] else ""), x["mode"],
              x["losses"], fmt(x["img_per_s"], 0), fmt(x["ratio_to_ce"], 3),
              f"{x['step_ms']:.1f} [{x['step_ms_min']:.1f}, {x['step_ms_max']:.1f}]",
              fmt(x["peak_memory_GB"], 1), fmt(x.get("loss_ms"), 2),
              fmt(100 * x["loss_share"], 1) if x.get("loss_share") is not None else None,
              fmt(x.get("gain_of_kernels"), 3), fmt(x["first_step_s"], 1)] for x in r["rows"]]
    return intro + "\n\n" + markdown_table(
        ["model", "method", "mode", "losses", "img/s", "÷ ce", "step ms [min, max]", "peak GB",
         "loss ms", "loss % of step", "gain of kernels", "first step s"], table)


def _render_syncs(r: dict[str, Any]) -> str:
    from skd.bench._report import markdown_table

    if "rows" not in r:
        return ""
    rows = r["rows"] + ([r["control"]] if "control" in r else [])
    return (f"Per training step, counted over {r['steps_per_count']} steps (batch {r['batch_size']}, "
            f"{r['img_size']} px) after as many warm-up steps; the last row is the control."
            "\n\n"
            + markdown_table(["model", "method", "syncs/step (profiler)", "sync debug mode",
                              "sync events", "kernel ops"],
                             [[x["model"], x["method"], f"{x['syncs_per_step']:g}",
                               x["sync_debug_warnings_per_step"],
                               ", ".join(f"{k} ×{v}" for k, v in x["syncs"].items()) or "none",
                               ", ".join(x["kernel_ops"]) or "none"] for x in rows]))


def _render_loaders(r: dict[str, Any]) -> str:
    from skd.bench._report import markdown_table

    text = "; ".join(f"{b}: {m}" for b, m in r.get("missing", {}).items())
    rows = r.get("rows", [])
    if rows:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        text += ("\n\n" if text else "") + markdown_table(
            keys, [[_short(row.get(k)) for k in keys] for row in rows])
    return text


def _short(value: Any) -> Any:
    return f"{value:,.1f}" if isinstance(value, float) else value


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------
def metadata(device: Any, commit: str | None, smoke: bool, budget_s: float) -> dict[str, Any]:
    import torch

    from skd_kernels import bench

    meta = bench._metadata(device)  # device, torch, triton, liger_kernel, git_commit, date
    meta.update(cuda=torch.version.cuda, driver=_driver_version() if device.type == "cuda" else None,
                python=platform.python_version(), cpu_count=os.cpu_count(), smoke=smoke,
                time_budget_s=budget_s)
    for dist in ("timm", "accelerate", "webdataset", "nvidia-dali-cuda130"):
        try:
            meta[dist] = importlib.metadata.version(dist)  # the version, without importing it
        except importlib.metadata.PackageNotFoundError:
            meta[dist] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu_memory_GB=props.total_memory / 1e9, multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    if commit:
        meta["git_commit"] = commit
    return meta


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skd.bench gpu",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for gpu_check.json, gpu_check.md and the pytest log")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                        help=f"stages to run, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU, kernels in the Triton interpreter: checks "
                             "this script, measures nothing")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help=f"seconds for all stages (default {DEFAULT_TIME_BUDGET_S:.0f}; "
                             f"none with --smoke)")
    parser.add_argument("--commit", help="git commit to record when the checkout has no .git")
    args = parser.parse_args(argv)

    if args.smoke:  # before skd_kernels is imported: Triton reads it when the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from skd.bench._report import Report
    from skd_kernels import _dispatch

    if args.smoke:
        if not _dispatch.INTERPRET:
            print("skd.bench gpu --smoke: skd_kernels was imported without TRITON_INTERPRET=1",
                  file=sys.stderr)
            return 2
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("skd.bench gpu: no CUDA device is visible (use --smoke to check the script on a CPU)",
              file=sys.stderr)
        return 2
    elif _dispatch.INTERPRET:
        print("skd.bench gpu: TRITON_INTERPRET is set, so the kernels would be interpreted; unset it",
              file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    budget = args.time_budget if args.time_budget is not None else (
        float("inf") if args.smoke else DEFAULT_TIME_BUDGET_S)

    plan = make_plan(args.smoke)
    meta = metadata(device, args.commit, args.smoke, budget)
    meta["plan"] = {"bandwidth_shape": plan.bandwidth_shape, "launch_shape": plan.launch_shape,
                    "large_model": plan.large_model, "small_model": plan.small_model}
    report = Report(args.out, meta, render, evaluate_goals)
    report.save()
    print(f"skd GPU check: {report.data['meta']['device']}, torch {report.data['meta']['torch']}, "
          f"triton {report.data['meta']['triton']}; writing {report.json_path}", flush=True)
    end = time.monotonic() + budget
    with tempfile.TemporaryDirectory(prefix="skd-gpu-check-") as work:
        ctx = Context(device=device, plan=plan, smoke=args.smoke,
                      out_dir=args.out, work_dir=Path(work), save=report.save)
        selected = [s for s in STAGES if s in args.stages]
        interrupted = False
        for i, name in enumerate(selected):
            now = time.monotonic()
            shares = sum(STAGE_SHARES[s] for s in selected[i:])
            ctx.deadline = now + (end - now) * STAGE_SHARES[name] / shares
            record = report.stage(name)
            report.save()
            try:
                STAGE_FUNCTIONS[name](ctx, record)
            except KeyboardInterrupt:  # the time limit of launch/gpu_check.sh, or Ctrl-C
                record.update(status="error", reason="interrupted")
                interrupted = True
            except Exception as e:  # noqa: BLE001  one broken stage must not cost the others
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                record.update(status="error", reason=reason, traceback=traceback.format_exc()[-4000:])
            record["seconds"] = time.monotonic() - now
            report.save()
            print("\n" + render_stage(name, record), flush=True)
            if interrupted:
                break
    from skd.bench._report import markdown_table

    print("\n## Goals\n\n" + markdown_table(
        ["goal", "target", "measured", "status"],
        [[g["goal"], g["target"], g["measured"], g["status"]] for g in report.data["goals"]]))
    print(f"\nwrote {report.json_path} and {report.markdown_path}")
    failed = [n for n, r in report.data["stages"].items() if r["status"] in ("failed", "error")]
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
