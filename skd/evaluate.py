"""Evaluation over the whole validation set, across ranks, and the ``skd eval`` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from safetensors.torch import load_file

from skd.checkpoint import latest_checkpoint, load_checkpoint
from skd.config import ConfigError, build_config, load_yaml, merge, parse_overrides
from skd.data import DatasetInfo, create_loader, digits_shards
from skd.metrics import SampleStats, sample_stats_from_log_probs, summarize
from skd.models.factory import create_model
from skd.transforms import create_eval_transform


def resolve_shard_dir(value: str, split: str, key: str) -> Path:
    """A shard directory from the config: ``digits`` is the built-in demo data."""
    if value == "digits":
        return digits_shards() / split
    if not value:
        raise FileNotFoundError(f"config key '{key}' is not set: pass {key}=SHARD_DIR")
    path = Path(value)
    if not (path / "dataset.json").is_file():
        raise FileNotFoundError(f"config key '{key}' = {value!r}: no dataset.json in {path} "
                                f"(make shards with `skd shard` or index them with `skd shard --index-only`)")
    return path


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool = False) -> dict[str, Any]:
    """Metrics of ``model`` over every sample of ``loader``'s dataset, each counted once.

    Each rank evaluates its own disjoint part of the validation shards; per-sample statistics
    (4 numbers per sample) are gathered, so every rank returns the same metrics.
    """
    was_training = model.training
    model.eval()
    rows = []
    for batch in loader:
        images = batch["image"].to(accelerator.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        stats = sample_stats_from_log_probs(logits.float().log_softmax(dim=1), labels)
        rows.append(torch.cat([stats.stack(), torch.ones_like(labels, dtype=torch.float)[:, None]], 1))
    local = torch.cat(rows) if rows else torch.zeros(0, 5, device=accelerator.device)
    # Ranks may hold different numbers of samples: pad, gather, then drop the padding rows.
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
    gathered = gathered[gathered[:, 4] > 0]
    model.train(was_training)
    return summarize(SampleStats.unstack(gathered[:, :4]))


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """The PS-KD README layout: top-1 err, top-5 err, NLL, ECE (%), AURC (×1000)."""
    head = f"{'':<10}{'Top-1 Err':>10}{'Top-5 Err':>10}{'NLL':>8}{'ECE':>8}{'AURC':>9}{'E-AURC':>9}"
    lines = [title, head] if title else [head]
    rows = [("model", metrics)] + ([("ema", metrics["ema"])] if "ema" in metrics else [])
    for name, m in rows:
        lines.append(f"{name:<10}{100 - m['top1']:>10.2f}{100 - m['top5']:>10.2f}{m['nll']:>8.3f}"
                     f"{m['ece']:>8.2f}{m['aurc']:>9.2f}{m['eaurc']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skd eval", description="Evaluate a run directory, a checkpoint (.pt) or exported "
        "weights (.safetensors, with config.yaml beside it) on its validation shards.")
    parser.add_argument("target", help="run directory, checkpoint file or model.safetensors")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.val=DIR data.eval_batch_size=256")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this file")
    args = parser.parse_args(argv)

    try:
        metrics = evaluate_target(args.target, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"skd eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics, title=str(args.target)))
    print(json.dumps(metrics))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def evaluate_target(target: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Load the model of a run directory / checkpoint / safetensors file and evaluate it."""
    target = Path(target)
    if target.is_dir():
        raw = load_yaml(target / "config.yaml")
        weights_file = target / "model.safetensors"
        ckpt = None if weights_file.is_file() else latest_checkpoint(target)
        if ckpt is None and not weights_file.is_file():
            raise FileNotFoundError(f"{target} holds neither model.safetensors nor a checkpoint")
    elif target.suffix == ".safetensors":
        raw, weights_file, ckpt = load_yaml(target.parent / "config.yaml"), target, None
    else:
        ckpt = target
        raw = None
    state = load_checkpoint(ckpt) if ckpt is not None else None
    if state is not None:
        raw = state["config"]
    cfg = build_config(merge(raw, parse_overrides(list(overrides))), str(target))

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="no" if not torch.cuda.is_available() else
                              ("bf16" if cfg.precision == "auto" else cfg.precision))
    val_dir = resolve_shard_dir(cfg.data.val, "val", "data.val")
    info = DatasetInfo.load(val_dir)
    model = create_model(cfg.model, info.num_classes)
    if state is not None:
        prefix = "model."
        model.load_state_dict({k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)})
    else:
        model.load_state_dict(load_file(weights_file))
    model.to(accelerator.device)
    loader = create_loader(val_dir, train=False, transform=create_eval_transform(cfg.data),
                           batch_size=max(1, (cfg.data.eval_batch_size or cfg.data.batch_size)
                                          // accelerator.num_processes),
                           rank=accelerator.process_index, world_size=accelerator.num_processes,
                           num_workers=cfg.data.num_workers)
    return evaluate(model, loader, accelerator, channels_last=cfg.model.channels_last)
