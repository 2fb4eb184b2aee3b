"""A memory sharded over the processes: each owns a contiguous block of rows, and the rows of a
batch travel to and from their owners with ``all_to_all_single``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from skd.collectives import world
from skd.errors import CheckpointError
from skd.memory.rows import Fields, FetchedRows, check_state, last_write_wins, on_device


_PART_META = ("row_start", "num_samples")


def shard_bounds(num_samples: int, world_size: int) -> list[int]:
    """Rank ``r`` owns rows ``[bounds[r], bounds[r + 1])``, ``bounds[r] = r·N // world``: blocks
    differ by at most one row, and a checkpoint saved on one world size is re-sharded on another
    by slice copies."""
    return [r * num_samples // world_size for r in range(world_size + 1)]


@dataclass
class _Route:
    """Where the rows of one batch live: kept from the fetch for the write after the step."""

    order: torch.Tensor  # [b] batch positions sorted by owner (stable: positions ascend per owner)
    send: list[int]  # ids this rank requests from (and rows it writes to) each owner
    recv: list[int]  # ids each rank requests from this one
    local: torch.Tensor  # [sum(recv)] local rows requested from this rank, by (rank, position)
    index: torch.Tensor  # the fetched batch's ids, to check the write is of the same batch


class ShardedRows(nn.Module):
    """Process ``r`` of ``world`` holds rows ``shard_bounds(N, world)[r:r + 2]`` of each field,
    ``N·width·bytes / world`` per process, plus a scratch row.

    ``fetch`` (before the forward) sends the batch's ids to their owners and gets their rows back;
    ``write_rows`` (after the step) sends the new rows to their owners along the same route, where
    ``last_write_wins`` orders the writes of one row exactly as ``ReplicatedRows`` does, so both
    placements hold the same values. Uneven ``all_to_all_single`` splits are host integers: the
    fetch exchanges the per-owner counts and reads them on the host, the one host synchronisation
    per step (the write reuses them; with a single process there is none).

    ``rank`` and ``world_size`` default to the process group's; the checkpoint state is this
    rank's block alone (``rank_state`` / ``load_rank_states``), never gathered.
    """

    def __init__(self, num_samples: int, fields: Fields, *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__()
        group_rank, group_world = world()
        self.rank = group_rank if rank is None else rank
        self.world_size = group_world if world_size is None else world_size
        self.num_samples = num_samples
        self.fields = dict(fields)
        self.bounds = shard_bounds(num_samples, self.world_size)
        self.start, self.stop = self.bounds[self.rank], self.bounds[self.rank + 1]
        self._tensors: dict[str, torch.Tensor] | None = None
        self._bounds_t: torch.Tensor | None = None
        self._route: _Route | None = None

    @property
    def num_local_rows(self) -> int:
        return self.stop - self.start

    def tensors_on(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """This rank's ``[stop − start + 1, width]`` tensors (the last row is scratch), allocated
        (zeros) or moved to ``device`` when needed."""
        self._tensors = on_device(self._tensors, self.num_local_rows + 1, self.fields, device)
        return self._tensors

    @torch.no_grad()
    def fetch(self, index: torch.Tensor) -> FetchedRows:
        """Ask the owners for the rows of the batch ``index``; the rows come back in owner order,
        and ``FetchedRows.index`` says where each batch row is among them."""
        tensors = self.tensors_on(index.device)
        self._route = route = self._route_of(index)
        pending, fetched = [], {}
        for name, t in tensors.items():
            fetched[name], work = self._exchange(t[route.local], route.recv, route.send, async_op=True)
            pending.append(work)
        position = torch.empty_like(route.order)
        position[route.order] = torch.arange(len(route.order), device=index.device)
        return FetchedRows(fetched, position, [w for w in pending if w is not None])

    @torch.no_grad()
    def write_rows(self, index: torch.Tensor, rows: dict[str, torch.Tensor],
                   capacity: int | None = None) -> None:
        """Send ``rows[name][i]``, the new row of ``index[i]``, to its owner, which stores it. Uses
        the route of the last ``fetch`` (it must have been this batch's); without one, finds it
        again. ``capacity`` is unused (the exchange needs no padding)."""
        tensors = self.tensors_on(index.device)
        route = self._route if self._route is not None else self._route_of(index)
        self._route = None
        if route.index is not index and (route.index.shape != index.shape
                                          or route.index.data_ptr() != index.data_ptr()):
            raise RuntimeError("write_rows of another batch than the last fetch: a write must follow the fetch "
                               "of its own batch (its route says where the rows live)")
        local = last_write_wins(route.local, scratch=self.num_local_rows)
        for name, t in tensors.items():
            received, _ = self._exchange(rows[name].to(t.dtype)[route.order], route.send, route.recv)
            t[local] = received

    def _route_of(self, index: torch.Tensor) -> _Route:
        if self._bounds_t is None or self._bounds_t.device != index.device:
            self._bounds_t = torch.tensor(self.bounds[1:-1], dtype=index.dtype, device=index.device)
        owner = torch.searchsorted(self._bounds_t, index, right=True)
        order = torch.argsort(owner, stable=True)
        if self.world_size == 1:
            send = recv = [index.shape[0]]
        else:
            # Not bincount: on CUDA it reads the largest id on the host first.
            send_t = owner.new_zeros(self.world_size).index_add_(0, owner, torch.ones_like(owner))
            recv_t = torch.empty_like(send_t)
            dist.all_to_all_single(recv_t, send_t)
            # The one host synchronisation: all_to_all_single takes uneven splits as host ints.
            counts = torch.cat([send_t, recv_t]).tolist()
            send, recv = counts[: self.world_size], counts[self.world_size:]
        requested, _ = self._exchange(index[order], send, recv)
        return _Route(order, send, recv, requested - self.start, index)

    def _exchange(self, x: torch.Tensor, send: list[int], recv: list[int],
                  async_op: bool = False) -> tuple[torch.Tensor, Any]:
        """Rows ``x`` (grouped by destination, ``send[r]`` for rank r) → the rows every rank sent
        here (``recv[r]`` from rank r, in rank order), and the pending work if ``async_op``."""
        if self.world_size == 1:
            return x, None
        out = x.new_empty(sum(recv), *x.shape[1:])
        work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                                      input_split_sizes=send, async_op=async_op)
        return out, work

    # --------------------------------------------------------------------------- checkpoints
    def rank_state(self) -> dict[str, torch.Tensor]:
        """This rank's rows (views, scratch row excluded) and where they start."""
        tensors = self.tensors_on()
        return {"row_start": torch.tensor(self.start), "num_samples": torch.tensor(self.num_samples),
                **{name: t[: self.num_local_rows] for name, t in tensors.items()}}

    @torch.no_grad()
    def load_rank_states(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """Rebuild this rank's rows from the ``rank_state()`` of every rank of a saved run, of any
        world size: only the slices that overlap this rank's block are read (parts loaded with
        ``torch.load(mmap=True)`` read nothing else from disk)."""
        blocks = []
        for i, part in enumerate(parts):
            rows = {k: v for k, v in part.items() if k not in _PART_META}
            if "row_start" not in part or not rows:
                raise CheckpointError(f"saved part {i} holds no sharded memory rows (keys {sorted(part)})")
            length = next(iter(rows.values())).shape[0]
            check_state(rows, self.fields, length, f"saved memory part {i}")
            if int(part["num_samples"]) != self.num_samples:
                raise CheckpointError(f"saved memory part {i} has {int(part['num_samples'])} rows in all, "
                                      f"expected {self.num_samples}")
            blocks.append((int(part["row_start"]), length, rows))
        blocks.sort(key=lambda block: block[0])
        end = 0
        for start, length, _ in blocks:
            if start != end:
                raise CheckpointError(f"saved memory parts do not tile the {self.num_samples} rows: a part "
                                      f"starts at row {start}, expected {end}")
            end += length
        if end != self.num_samples:
            raise CheckpointError(f"saved memory parts cover rows [0, {end}), expected [0, {self.num_samples})")
        tensors = self.tensors_on()
        for start, length, rows in blocks:
            lo, hi = max(start, self.start), min(start + length, self.stop)
            if lo < hi:
                for name, t in tensors.items():
                    t[lo - self.start: hi - self.start] = rows[name][lo - start: hi - start]
