"""``python -m skd.bench gpu``: the smoke run end to end (CPU, Triton interpreter, tiny sizes), the
goals computed from a results document, the loader stage without its packages, the switch to the
reference losses, and the stand-in that times the loss alone."""
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import skd.bench
import skd_kernels
from skd.bench import gpu
from skd_kernels import _dispatch, bench, reference

ROOT = Path(__file__).resolve().parents[1]
LARGE_MODEL_METHODS = ("ce", "pskd", "cskd", "tfkd", "ls", "uskd", "pskd[memory=sharded]",
                       "pskd[memory=topk,memory_k=10]")


@pytest.mark.slow
def test_smoke_run_writes_every_stage_and_goal(tmp_path):
    # One thread: the smoke sizes gain nothing from more, and a shared CPU loses a lot.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "skd.bench", "gpu", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "## Goals" in done.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"device", "torch", "triton", "git_commit", "date", "driver", "plan"} <= data["meta"].keys()
    assert data["meta"]["smoke"] is True
    stages = data["stages"]
    assert list(stages) == list(gpu.STAGES)
    assert all(stages[s]["status"] == "ok" for s in ("correctness", "kernels", "steps", "syncs"))

    correctness = stages["correctness"]
    (pytest_run,) = correctness["pytest"]
    assert (pytest_run["passed"], pytest_run["failures"], pytest_run["errors"]) == (1, 0, 0)
    assert pytest_run["skipped"] == 1  # the CUDA-graph test
    assert correctness["grid"] and all(row["ok"] for row in correctness["grid"])
    assert correctness["large_offsets"]["status"] == "skipped"
    assert (tmp_path / "correctness_pytest.log").exists()

    kernels = stages["kernels"]
    assert kernels["copy_GBps"] > 0
    timed = {(r["op"], r["provider"], r["mode"]) for r in kernels["rows"] if r["ms"] > 0}
    assert timed == {(op, p, m) for op in bench.CASES for p in ("triton", "eager")
                     for m in ("fwd", "bwd", "full")}

    rows = stages["steps"]["rows"]
    large, small = data["meta"]["plan"]["large_model"], data["meta"]["plan"]["small_model"]
    eager = {(r["model"], r["method"], r["losses"]): r for r in rows if r["mode"] == "eager"}
    expected = [(large, m) for m in LARGE_MODEL_METHODS] + [(small, "ce"), (small, "kd")] + [
        (large, m) for m in ("dlb", "byot", "zipf_ls", "bake")]
    for model, method in expected:
        row = eager[(model, method, "kernels")]
        assert row["img_per_s"] > 0 and row["ratio_to_ce"] > 0 and row["loss_ms"] > 0
        # The reference comparison runs exactly for the methods whose step calls the kernels.
        assert ((model, method, "reference") in eager) == bool(row["kernel_ops"])
    assert eager[(large, "ce", "kernels")]["ratio_to_ce"] == 1.0
    assert eager[(large, "pskd", "kernels")]["kernel_ops"] == ["skd_kernels::pskd_bwd",
                                                               "skd_kernels::pskd_fwd"]
    assert eager[(large, "ce", "kernels")]["kernel_ops"] == []
    assert eager[(large, "pskd[memory=topk,memory_k=10]", "kernels")]["kernel_ops"] == [
        "skd_kernels::pskd_topk_bwd", "skd_kernels::pskd_topk_fwd"]
    assert eager[(large, "pskd", "kernels")]["gain_of_kernels"] > 0
    compiled = [r for r in rows if r["mode"] == "compile"]
    assert [(r["model"], r["method"]) for r in compiled] == [(large, "ce")]
    assert compiled[0]["img_per_s"] > 0

    syncs = stages["syncs"]
    assert {(r["model"], r["method"]) for r in syncs["rows"]} == set(expected)
    assert all(r["syncs_per_step"] == 0 for r in syncs["rows"])
    # The control calls .item() once per step: the counter must see exactly that.
    assert syncs["control"]["syncs_per_step"] == 1

    assert stages["loaders"]["status"] in ("ok", "skipped")
    goals = {g["goal"]: g["status"] for g in data["goals"]}
    assert len(goals) == 8
    assert goals["CUDA correctness"] == "met"
    assert goals["host synchronisations inside a training step (no logging step)"] == "met"
    assert all(s in ("met", "missed") or s.startswith("not measured: ") for s in goals.values())

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "Smoke run" in markdown and "## Goals" in markdown
    assert all(f"## {title}" in markdown for title in gpu.TITLES.values())


def _document(**stages) -> dict:
    meta = {"device": "NVIDIA H200", "plan": {"bandwidth_shape": [1024, 21841], "launch_shape": [256, 1000],
                                              "large_model": "resnet50", "small_model": "resnet18"}}
    return {"meta": meta, "stages": stages, "goals": []}


def _kernel(provider, B, C, ms, mode="full", GBps=None, dtype="bf16"):
    return {"op": "softmax_kl", "dtype": dtype, "B": B, "C": C, "provider": provider, "mode": mode,
            "ms": ms, "GBps": GBps, "bytes": 3 * 2 * B * C}


def _step(method, step_ms, mode="eager", batch=256):
    return {"model": "resnet50", "method": method, "teacher": "", "mode": mode, "losses": "kernels",
            "step_ms": step_ms, "step_ms_min": step_ms * 0.99, "step_ms_max": step_ms * 1.01,
            "img_per_s": batch / (step_ms / 1e3)}


def _sync(method, per_step, debug=0.0):
    return {"model": "resnet50", "method": method, "syncs_per_step": per_step,
            "sync_debug_warnings_per_step": debug, "syncs": {"cudaStreamSynchronize": per_step} if per_step else {}}


def test_goals_from_a_document():
    kernels = {"status": "ok", "copy_GBps": 4000.0, "liger": "0.5.10", "rows": [
        _kernel("triton", 1024, 21841, 0.03, GBps=3600.0),  # 90 % of copy
        _kernel("triton", 256, 1000, 0.010), _kernel("eager", 256, 1000, 0.025),  # 2.5× < 3×
        _kernel("compile", 256, 1000, 0.013),  # 1.3× ≥ 1.2×
        _kernel("liger", 256, 1000, 0.012), _kernel("liger", 1024, 21841, 0.0273)]}  # 1.10× Liger
    steps = {"status": "ok", "rows": [_step("ce", 70.0), _step("pskd", 70.35), _step("ce", 60.0, "compile"),
                                      _step("pskd", 61.2, "compile")]}
    syncs = {"status": "ok", "rows": [_sync("ce", 0), _sync("pskd", 0)], "control": _sync("ce", 1.0, 1.0)}
    correctness = {"status": "failed", "grid": [{"ok": True}], "pytest": [
        {"passed": 95, "failures": 1, "errors": 0, "skipped": 0}]}
    goals = gpu.evaluate_goals(_document(correctness=correctness, kernels=kernels, steps=steps,
                                         syncs=syncs))
    status = [g["status"] for g in goals]
    assert status == ["missed", "met", "missed", "met", "missed", "met", "met", "met"]
    by_name = {g["goal"]: g for g in goals}
    assert by_name["softmax_kl fwd+bwd 1024×21841 bf16: share of copy bandwidth"]["measured"] == "90%"
    assert by_name["softmax_kl fwd+bwd 256×1000 bf16: speed-up over eager"]["measured"] == "2.50×"
    assert "1024×21841 full" in goals[4]["measured"]  # where Liger was faster
    assert by_name["PS-KD step time over CE step time, resnet50"]["measured"] == "1.005×"
    assert "compile: 1.020×" in by_name["PS-KD step time over CE step time, resnet50"]["detail"]
    assert by_name["resnet50 bf16 channels_last training, synthetic data on the GPU"]["measured"] == (
        "4,267 img/s (compile)")

    # A sync found by either counter misses the goal; a counter that misses the control proves nothing.
    syncs["rows"][1] = _sync("pskd", 0, debug=1.0)
    assert gpu.evaluate_goals(_document(syncs=syncs))[-1]["status"] == "missed"
    syncs["control"] = _sync("ce", 0)
    assert gpu.evaluate_goals(_document(syncs=syncs))[-1]["status"].startswith("not measured: ")
    # Nothing run: every goal says it was not measured.
    assert all(g["status"].startswith("not measured: ") for g in gpu.evaluate_goals(_document()))


class _FakeLoaderModule(types.ModuleType):
    BACKENDS = ("torch", "dali")

    def __init__(self):
        super().__init__("skd.bench.loader")
        self.calls = []

    def run_loader_bench(self, work_dir, **kwargs):
        self.calls.append(kwargs)
        return [{"backend": b, "mode": kwargs["feed_model"] or "alone", "img_per_s": 1.0}
                for b in kwargs["backends"]]


def _loader_stage(tmp_path) -> dict:
    ctx = gpu.Context(device=torch.device("cpu"), plan=gpu.make_plan(smoke=True), smoke=True,
                      out_dir=tmp_path, work_dir=tmp_path, save=lambda: None)
    record = {"status": "running", "seconds": 0.0}
    gpu.stage_loaders(ctx, record)
    return record


def test_loader_stage_runs_the_backends_whose_packages_exist(tmp_path, monkeypatch):
    fake = _FakeLoaderModule()
    monkeypatch.setitem(sys.modules, "skd.bench.loader", fake)
    monkeypatch.setattr(skd.bench, "loader", fake, raising=False)
    monkeypatch.setattr(gpu, "_module_available", lambda name: name == "webdataset")
    record = _loader_stage(tmp_path)
    assert record["status"] == "ok"
    assert record["backends"] == ["torch"] and "nvidia.dali" in record["missing"]["dali"]
    plan = gpu.make_plan(smoke=True)
    assert [c["feed_model"] for c in fake.calls] == [None, plan.loader_feed_model]
    assert all(c["backends"] == ["torch"] and c["smoke"] for c in fake.calls)
    assert [r["mode"] for r in record["rows"]] == ["alone", plan.loader_feed_model]

    # The bare GPU machine: no webdataset, no DALI. The stage is skipped, with the reason.
    monkeypatch.setattr(gpu, "_module_available", lambda name: False)
    record = _loader_stage(tmp_path)
    assert record["status"] == "skipped" and "webdataset not installed" in record["reason"]


def test_loader_stage_without_the_loader_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skd.bench.loader", None)
    monkeypatch.delattr(skd.bench, "loader", raising=False)
    record = _loader_stage(tmp_path)
    assert record == {"status": "skipped", "seconds": 0.0,
                      "reason": "skd.bench.loader is not in this checkout"}


def test_reference_losses_switch(monkeypatch):
    """Inside ``reference_losses`` no kernel launches, and the loss is the reference's exactly."""
    from skd.bench._steps import reference_losses

    softmax_kl_mod = importlib.import_module("skd_kernels.softmax_kl")
    launches = []
    real_forward = softmax_kl_mod._forward
    monkeypatch.setattr(softmax_kl_mod, "_forward",
                        lambda *a, **k: launches.append(1) or real_forward(*a, **k))
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with reference_losses():
        inside = skd_kernels.softmax_kl(s, t, 2.0)
    assert launches == [] and not _dispatch.FORCE_REFERENCE
    assert torch.equal(inside, reference.softmax_kl(s, t, 2.0))
    if _dispatch.INTERPRET:  # outside the block the interpreter runs the kernel again
        skd_kernels.softmax_kl(s, t, 2.0)
        assert launches == [1]


def test_replay_returns_recorded_outputs_without_running_the_module():
    from skd.bench._steps import _Replay

    linear = nn.Linear(3, 2)
    runs = []
    linear.register_forward_hook(lambda *args: runs.append(1))
    replay = _Replay(linear)
    x = torch.randn(4, 3)
    replay.start_step()
    first = replay(x)
    with torch.no_grad():
        second_call = replay(x)
    assert len(runs) == 2 and first.requires_grad and not second_call.requires_grad
    replay.start_step()
    again, again_no_grad = replay(torch.zeros(4, 3)), replay(x)
    assert len(runs) == 2  # replayed: the module did not run
    assert torch.equal(again, first) and again.is_leaf and again.requires_grad
    assert not again_no_grad.requires_grad
    again.sum().backward()
    assert torch.equal(again.grad, torch.ones(4, 2)) and linear.weight.grad is None
    assert replay.out_features == 2  # other attributes are the module's
