"""DLB, Self-Distillation from the Last Mini-Batch (Shen et al., CVPR 2022), parity with
``Meta-knowledge-Lab/DLB`` ``dlb.py`` (docs/methods.md §11).

Every batch holds B new samples and, again, the B' samples this process read in its batch before,
augmented anew (``batch["repeat"]``; the loader reads them, ``skd.data.epoch_plan.
previous_batch_ids``). The logits the model gave those samples one step earlier, before that
step's optimizer update, are the soft targets of their second view::

    loss = CE([z_repeat ; z_new], [y_repeat ; y_new]) + α·T²·KL(softmax(z_prev/T) ‖ softmax(z_repeat/T))

Parity: two forward passes in train mode, both with gradients, the new samples first (BatchNorm
normalises each half with its own statistics and updates its running statistics twice). The
targets carry over from one epoch to the next; only the first step of a run has none (CE of the
new samples alone), as in the official code.

The targets are this process's state (``rank_state``): each rank keeps the ids and logits of its
last batch, and a checkpoint holds every rank's, so a resume continues exactly. A resume on
another number of processes gives every rank the targets of every saved rank; each takes the
rows of the samples it repeats, matched by sample id. A repeated sample without logits (another
global batch size across a resume) gets CE only; ``dlb_targets_found`` (an epoch value) says
which share of the repeated samples had a target.

Mixup/CutMix: refused (the official code has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skd import losses
from skd.batch import Batch
from skd.collectives import world
from skd.config_checks import bounded
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method


@register_method("dlb")
class DLB(Method):
    image_keys = ("image", "repeat")

    @dataclass
    class Config(MethodConfig):
        name: str = "dlb"
        temperature: float = bounded(3.0, gt=0)
        """T of the KL (official ``--T``, no default in ``dlb.py``; 3 in the paper)."""
        alpha: float = bounded(1.0, ge=0)
        """α, weight of the KL (official ``--alpha``, no default in ``dlb.py``; 1 in the paper)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        # The previous batch's sample ids [M] and logits [M, C] (None before the first step).
        # Plain attributes, not buffers: they are per-process state, saved through rank_state.
        self.previous_index: torch.Tensor | None = None
        self.previous_logits: torch.Tensor | None = None
        # dlb_targets_found's counts of the epoch `_epoch` (kept by a mid-epoch checkpoint).
        self._epoch, self._found, self._repeated = -1, torch.zeros((), dtype=torch.float64), 0

    @classmethod
    def train_loader_options(cls, cfg: Config) -> dict[str, Any]:
        return {"repeat_previous": True}

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        if epoch != self._epoch:  # a new epoch; a resume within one keeps its restored counts
            self._epoch, self._found, self._repeated = epoch, torch.zeros((), dtype=torch.float64), 0

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        logits = self.model(batch["image"])  # the new samples first, as the official step
        out: dict[str, Any] = {"logits": logits, "dlb_logits": logits.detach().float()}
        repeat = batch["repeat"]
        if repeat.shape[0] == 0:  # the run's first step: nothing to repeat yet
            ce = losses.cross_entropy(logits, batch["label"])
            out.update(loss=ce, parts={"ce": ce, "kl": torch.zeros_like(ce)})
            return out
        repeat_logits = self.model(repeat)
        target, found = self._targets(batch["repeat_index"], logits)
        parts = losses.dlb_loss(logits, batch["label"], repeat_logits, batch["repeat_label"], target, found,
                                cfg.temperature, cfg.alpha)
        out.update(loss=parts["ce"] + parts["kl"], parts=parts, dlb_found=found)
        return out

    def _targets(self, index: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept logits of the samples ``index`` ``[B']``, matched by sample id, and which rows
        have them (a ``[B', M]`` comparison on the device: no host synchronisation)."""
        if self.previous_index is None or self.previous_index.numel() == 0:
            return (like.new_zeros(index.shape[0], like.shape[1], dtype=torch.float32),
                    torch.zeros_like(index, dtype=torch.bool))
        same = index[:, None] == self.previous_index.to(index.device)[None, :]
        rows = same.int().argmax(1)  # the first match (ids repeat only across an epoch's wrap-around)
        return self.previous_logits.to(like.device)[rows], same.any(1)

    @torch.no_grad()
    def after_step(self, batch: Batch, out: dict[str, torch.Tensor]) -> None:
        self.previous_index, self.previous_logits = batch["index"], out["dlb_logits"]
        if "dlb_found" in out:  # summed on the device; read once per epoch by epoch_stats
            self._found = self._found + out["dlb_found"].sum()
            self._repeated += out["dlb_found"].numel()

    def epoch_stats(self) -> dict[str, float]:
        """``dlb_targets_found``: the share of this process's repeated samples in the epoch so
        far that had logits from the step before (1 unless a resume changed the global batch)."""
        if not self._repeated:
            return {}
        return {"dlb_targets_found": float(self._found) / self._repeated}

    def rank_state(self) -> dict[str, torch.Tensor]:
        if self.previous_index is None:
            return {}
        return {"previous_index": self.previous_index, "previous_logits": self.previous_logits,
                "found": torch.stack([self._found.to(torch.float64).cpu(), torch.tensor(float(self._repeated),
                                                                                        dtype=torch.float64)]),
                "epoch": torch.tensor(self._epoch)}

    def load_rank_states(self, parts: list[dict[str, torch.Tensor]]) -> None:
        rank, world_size = world()
        # Every saved rank's rows, this rank's own first: the next batch takes those of the samples
        # it repeats (the first match), so with the same layout it continues bit for bit, and with
        # another (more or fewer processes, another per-process batch) it finds the rows wherever
        # the saved run kept them.
        own = parts[rank] if len(parts) == world_size else {}
        kept = [p for p in [own, *(q for q in parts if q is not own)] if p]
        if not kept:
            self.previous_index = self.previous_logits = None
            return
        device = next(self.model.parameters()).device
        self.previous_index = torch.cat([p["previous_index"] for p in kept]).to(device)
        self.previous_logits = torch.cat([p["previous_logits"] for p in kept]).to(device)
        if own and "found" in own:  # the epoch's counts so far, on the same processes
            self._epoch = int(own["epoch"])
            self._found, self._repeated = own["found"][0].to(device), int(own["found"][1])
