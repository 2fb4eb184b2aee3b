"""Evaluation over the whole validation set, across ranks, and the ``skd eval`` command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from torch import nn

from skd.checkpoint import latest_checkpoint, load_checkpoint
from skd.config import build_config, load_yaml, merge, parse_overrides
from skd.data import CorruptDataError, DatasetInfo, resolve_shard_dir
from skd.data.factory import create_data_loader
from skd.environment import check_environment
from skd.errors import MissingFileError, run_command
from skd.metrics import Predictions, sample_stats_from_log_probs
from skd.models.factory import create_model
from skd.weights import extract_state_dict, load_state_dict_file, load_weights


@torch.no_grad()
def predict(model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool = False,
            max_corrupt_fraction: float = 1.0, with_probs: bool = False) -> Predictions:
    """Per-sample predictions of ``model`` for every sample of ``loader``'s dataset, each once,
    sorted by sample id, identical on every rank (``with_probs``: with all softmax probabilities).

    Each rank evaluates its own disjoint part of the validation shards; six numbers per sample
    (id, label, predicted class, confidence, top-5 hit, NLL) are gathered, plus C probabilities
    with ``with_probs``. Sorting by id makes the metrics independent of the number of ranks. More
    corrupt samples than ``max_corrupt_fraction`` of the dataset raise ``CorruptDataError``.
    """
    was_training = model.training
    model.eval()
    corrupt_before = loader.num_corrupt
    rows, probs = [], []
    for batch in loader:
        images = batch["image"].to(accelerator.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(accelerator.device, non_blocking=True)
        index = batch["index"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        log_probs = logits.float().log_softmax(dim=1)
        stats = sample_stats_from_log_probs(log_probs, labels)
        pred = log_probs.max(dim=1).indices  # the same call as the statistics' correctness
        # float64 holds the int64 ids, labels and classes exactly (below 2**53) and the float32
        # statistics losslessly: one tensor, one gather.
        rows.append(torch.stack([index, labels, pred, stats.confidence, stats.correct5, stats.nll], 1).double())
        if with_probs:
            probs.append(log_probs.exp())
    local = torch.cat(rows) if rows else torch.zeros(0, 6, dtype=torch.float64, device=accelerator.device)
    # Ranks may hold different numbers of samples: pad (id -1), gather, then drop the padding.
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1))
    keep = gathered[:, 0] >= 0
    order = gathered[keep, 0].argsort()
    table = gathered[keep][order].cpu().numpy()
    all_probs = None
    if with_probs:
        local_probs = (torch.cat(probs) if probs else
                       torch.zeros(0, loader.info.num_classes, device=accelerator.device))
        all_probs = accelerator.gather(accelerator.pad_across_processes(local_probs, dim=0))
        all_probs = all_probs[keep][order].cpu().numpy()
    model.train(was_training)
    corrupt = int(accelerator.reduce(torch.tensor([loader.num_corrupt - corrupt_before],
                                                  device=accelerator.device), "sum").item())
    if corrupt > max_corrupt_fraction * loader.info.num_samples:
        raise CorruptDataError(f"{corrupt} of the {loader.info.num_samples} evaluation samples are corrupt "
                               f"(more than data.max_corrupt_fraction={max_corrupt_fraction}); the warnings "
                               f"above name them")
    confidence = table[:, 3].astype(np.float32)
    nll = table[:, 5].astype(np.float32)
    return Predictions(index=table[:, 0].astype(np.int64), label=table[:, 1].astype(np.int64),
                       pred=table[:, 2].astype(np.int64), confidence=confidence,
                       true_prob=np.exp(-nll), nll=nll, in_top5=table[:, 4] > 0,
                       num_corrupt=corrupt, probs=all_probs)


def evaluate(model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool = False,
             max_corrupt_fraction: float = 1.0) -> dict[str, Any]:
    """Metrics of ``model`` over every sample of ``loader``'s dataset, each counted once (see
    ``predict``), and ``num_corrupt``: the samples skipped because their image did not decode."""
    return predict(model, loader, accelerator, channels_last, max_corrupt_fraction).metrics()


_COLUMNS = (("Top-1 Err", 10, 2), ("Top-5 Err", 10, 2), ("NLL", 9, 3), ("ECE", 8, 2), ("AURC", 9, 2),
            ("E-AURC", 9, 2))
"""Header, width and decimals of each column of ``format_table``."""


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """The PS-KD README layout: top-1 err, top-5 err, NLL, ECE (%), AURC, E-AURC (×1000); a row
    for the model (the last epoch), its EMA and the best epoch when ``metrics`` has them. Columns
    stay aligned for any value: one too wide for its column (a diverged run's NLL of 2.3e11) is
    written in scientific notation."""
    head = f"{'':<14}" + "".join(f"{name:>{width}}" for name, width, _ in _COLUMNS)
    lines = [title, head] if title else [head]
    rows = [("model", metrics)] + ([("ema", metrics["ema"])] if "ema" in metrics else [])
    if "best" in metrics:
        rows.append((f"best (ep {metrics['best']['epoch']})", metrics["best"]))
    for name, m in rows:
        values = (100 - m["top1"], 100 - m["top5"], m["nll"], m["ece"], m["aurc"], m["eaurc"])
        lines.append(f"{name:<14}" + "".join(_cell(v, width, decimals) for v, (_, width, decimals)
                                              in zip(values, _COLUMNS)))
    return "\n".join(lines)


def _cell(value: float, width: int, decimals: int) -> str:
    """``value`` right-aligned in ``width`` characters with a space before it."""
    text = f"{value:.{decimals}f}"
    digits = width
    while len(text) >= width and digits > 0:  # scientific, with as many digits as fit
        digits -= 1
        text = f"{value:.{digits}e}"
    return f"{text:>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skd eval", description="Evaluate a run directory, a checkpoint (.pt) or exported "
        "weights (.safetensors, with config.yaml beside it) on its validation shards. The loader is "
        "the torch backend unless data.backend is given here (a run trained with data.backend=dali "
        "evaluates anywhere).")
    parser.add_argument("target", help="run directory, checkpoint file or model.safetensors")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.val=DIR data.eval_batch_size=256 save_probs=true")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this file")
    parser.add_argument("--predictions", metavar="FILE",
                        help="also write the per-sample predictions to this .npz file (the format of a "
                             "run's predictions.npz; all probabilities too with save_probs=true)")
    args = parser.parse_intermixed_args(argv)

    def run() -> int:
        predictions = predict_target(args.target, args.overrides)
        metrics = predictions.metrics()
        if PartialState().is_main_process:  # every process holds the same metrics: one report
            print(format_table(metrics, title=str(args.target)))
            print(json.dumps(metrics))
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n")
            if args.predictions:
                predictions.save(args.predictions)
        return 0

    return run_command("skd eval", run)


def evaluate_target(target: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Load the model of a run directory / checkpoint / safetensors file and evaluate it."""
    return predict_target(target, overrides).metrics()


def predict_target(target: str | Path, overrides: list[str] = ()) -> Predictions:
    """The per-sample predictions of a run directory / checkpoint / safetensors file's model
    (with all probabilities when the resolved config has ``save_probs``).

    The loader is the torch backend unless ``overrides`` set ``data.backend``: evaluation needs
    no augmentation, so a run trained with DALI is evaluated where DALI is absent. Bad input (a
    missing or damaged file, weights that do not fit the model, bad shards) is an ``SkdError``."""
    raw, weights, source = _read_target(Path(target))
    update = parse_overrides(list(overrides))
    cfg = build_config(merge(merge(raw, {"data": {"backend": "torch"}}), update), str(target))
    check_environment(cfg, evaluation=True)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="no" if not torch.cuda.is_available() else
                              ("bf16" if cfg.precision == "auto" else cfg.precision))
    val_dir = resolve_shard_dir(cfg.data.val, "val", "data.val")
    info = DatasetInfo.load(val_dir)
    model = create_model(cfg.model, info.num_classes, initial_weights=False)
    load_weights(model, weights, source, f"model {cfg.model.name!r} with {info.num_classes} classes "
                 f"(model.name, model.kwargs and data.val must be the run's)")
    model.to(accelerator.device)
    loader = create_data_loader(cfg.data, val_dir, train=False,
                                batch_size=max(1, (cfg.data.eval_batch_size or cfg.data.batch_size)
                                               // accelerator.num_processes),
                                rank=accelerator.process_index, world_size=accelerator.num_processes,
                                device=accelerator.device, channels_last=cfg.model.channels_last)
    return predict(model, loader, accelerator, channels_last=cfg.model.channels_last,
                   max_corrupt_fraction=cfg.data.max_corrupt_fraction, with_probs=cfg.save_probs)


def _read_target(target: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """The run's config (as a dict), the student's weights and a name for them, from a run
    directory (its ``model.safetensors``, else its newest checkpoint), a checkpoint, or exported
    weights with the run's ``config.yaml`` beside them."""
    if not target.exists():
        raise MissingFileError(f"{target} does not exist (expected a run directory, a checkpoint or "
                               f"a .safetensors export)")
    if target.is_dir():
        run_dir, export = target, target / "model.safetensors"
        target = export if export.is_file() else latest_checkpoint(run_dir)
        if target is None:
            raise MissingFileError(f"{run_dir} is not a run directory: it holds neither model.safetensors "
                                   f"nor checkpoints/step-*.pt")
    if target.suffix == ".safetensors":
        config = target.parent / "config.yaml"
        if not config.is_file():
            raise MissingFileError(f"{config} is missing: exported weights ({target.name}) are evaluated "
                                   f"with the config.yaml of their run beside them")
        return load_yaml(config), load_state_dict_file(target, "exported model"), str(target)
    state = load_checkpoint(target, mmap=True)  # only the model's tensors are read
    return state["config"], extract_state_dict(state, f"checkpoint {target}"), f"checkpoint {target}"
