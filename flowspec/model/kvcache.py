"""A preallocated KV cache whose slots are addressed by stable tree-node ids.

Every token the target processes is a *node* with an id chosen by the source and a
parent id (-1 for the very first token of a sequence). Committed nodes form the prefix
that every later token attends to; uncommitted nodes are speculative tree nodes that
attend to the prefix, to their own uncommitted ancestors and to themselves.

The physical order of slots does not matter to attention (rotary embeddings are applied
before keys are cached, and the mask says who sees whom), so the cache is free to
compact: it moves live slots to the front whenever dropped nodes leave too many holes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import CausalityError, ContextOverflowError

NO_PARENT = -1


@dataclass
class SegmentPlan:
    """How one incoming segment maps onto the cache."""

    keep: list[int]  # indices (into the segment) of the rows that are computed
    slots: torch.Tensor  # long [len(keep)]: cache slot of each kept row
    span: int  # attention runs over cache slots [0, span)
    mask: torch.Tensor  # bool [len(keep), span]: True where a row may attend


class KVCache:
    """Keys and values of several layers, for one sequence, in `capacity` slots."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype
    ) -> None:
        self.capacity = capacity
        self.keys = [torch.zeros(num_kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(num_kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]
        self._committed_mask = torch.zeros(capacity, dtype=torch.bool)
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the sequence (a new request starts)."""
        self.slot_of: dict[int, int] = {}  # live node id -> slot
        self.parent_of: dict[int, int] = {}  # uncommitted live node id -> parent id
        self.committed: list[int] = []  # committed node ids, in sequence order
        self.dropped: set[int] = set()  # ids dropped (or skipped because an ancestor was)
        self.span = 0  # slots [0, span) have been handed out
        self._committed_mask.zero_()

    @property
    def num_committed(self) -> int:
        return len(self.committed)

    @property
    def num_live(self) -> int:
        return len(self.slot_of)

    @property
    def last_committed(self) -> int:
        return self.committed[-1] if self.committed else NO_PARENT

    def is_committed(self, node: int) -> bool:
        s = self.slot_of.get(node)
        return s is not None and node not in self.parent_of

    # ---------------------------------------------------------------- segments
    def plan(self, node_ids: list[int], parent_ids: list[int]) -> SegmentPlan:
        """Allocate slots for a segment and build its attention mask from parent ids.

        Rows whose parent was dropped (or skipped) are skipped and recorded as dropped:
        a segment that was in flight when its branch was pruned costs nothing here.
        """
        if len(node_ids) != len(parent_ids):
            raise CausalityError("a segment needs one parent id per node id")
        keep: list[int] = []
        row_of: dict[int, int] = {}
        roots = 0
        for i, (nid, pid) in enumerate(zip(node_ids, parent_ids)):
            if nid in self.slot_of or nid in row_of or nid < 0:
                raise CausalityError(f"node id {nid} is already in use (or negative)")
            if pid in self.dropped or nid in self.dropped:
                self.dropped.add(nid)
                continue
            if pid == NO_PARENT:
                roots += 1
                if self.committed or self.parent_of or roots > 1:
                    raise CausalityError(f"node {nid} has no parent but the sequence has started")
            elif pid not in self.slot_of and pid not in row_of:
                raise CausalityError(
                    f"node {nid} names parent {pid}, which this stage has never seen: "
                    "ancestors must arrive in an earlier segment or earlier in the same one"
                )
            row_of[nid] = len(keep)
            keep.append(i)
        slots = self._allocate(len(keep))
        span = self.span
        m = len(keep)
        mask = self._committed_mask[:span].expand(m, span).clone()
        for r, i in enumerate(keep):
            pid = parent_ids[i]
            if pid in row_of:
                mask[r] |= mask[row_of[pid]]
            else:
                a = pid
                while a in self.parent_of:  # uncommitted ancestors already cached
                    mask[r, self.slot_of[a]] = True
                    a = self.parent_of[a]
            mask[r, slots[r]] = True
        for r, i in enumerate(keep):
            self.slot_of[node_ids[i]] = int(slots[r])
            self.parent_of[node_ids[i]] = parent_ids[i]
        return SegmentPlan(keep=keep, slots=slots, span=span, mask=mask)

    def _allocate(self, n: int) -> torch.Tensor:
        holes = self.span - self.num_live
        if self.span + n > self.capacity or (holes > 64 and holes * 4 > self.span):
            self.compact()
        if self.span + n > self.capacity:
            raise ContextOverflowError(
                f"the KV cache is full: {self.num_live} tokens are cached and {n} more were sent, "
                f"but max_context is {self.capacity}; raise model.max_context in the topology "
                "(or --max-context), or use a shorter prompt / fewer new tokens"
            )
        slots = torch.arange(self.span, self.span + n, dtype=torch.long)
        self.span += n
        return slots

    # ------------------------------------------------------------ tree updates
    def commit(self, ids: list[int]) -> None:
        """The accepted path: `ids`, in order, extend the committed prefix."""
        for nid in ids:
            if nid not in self.parent_of:
                state = "already committed" if nid in self.slot_of else (
                    "dropped" if nid in self.dropped else "unknown")
                raise CausalityError(f"cannot commit node {nid}: it is {state}")
            if self.parent_of[nid] != self.last_committed:
                raise CausalityError(
                    f"cannot commit node {nid}: its parent {self.parent_of[nid]} is not the last "
                    f"committed node {self.last_committed}"
                )
            del self.parent_of[nid]
            self.committed.append(nid)
            self._committed_mask[self.slot_of[nid]] = True

    def reparent(self, old: int, new: int) -> None:
        """The cached children of node `old` hang from node `new` from now on (`new` takes
        `old`'s place in the sequence). A row's keys and values depend on its own input only,
        so the children stay valid; rows added below them attend to `new`, not `old`."""
        for nid, pid in self.parent_of.items():
            if pid == old:
                self.parent_of[nid] = new

    def drop(self, ids: list[int]) -> None:
        """Rejected nodes and their cached descendants: their slots become free (reclaimed
        at the next compaction)."""
        for nid in ids:
            if nid not in self.parent_of and nid in self.slot_of:
                raise CausalityError(f"cannot drop node {nid}: it is committed")
        gone = set(ids)
        for nid, pid in list(self.parent_of.items()):  # parents were inserted before children
            if nid in gone or pid in gone:
                gone.add(nid)
                del self.parent_of[nid]
                del self.slot_of[nid]
        self.dropped |= gone

    def compact(self) -> None:
        """Move live slots to the front (committed in order, then tree nodes); results unchanged."""
        order = list(self.committed) + sorted(self.parent_of, key=self.slot_of.__getitem__)
        old = [self.slot_of[n] for n in order]
        start = 0
        while start < len(old) and old[start] == start:
            start += 1
        if start < len(old):
            src = torch.tensor(old[start:], dtype=torch.long)
            for t in self.keys + self.values:
                t[:, start : len(old)] = t[:, src]
            for j in range(start, len(order)):
                self.slot_of[order[j]] = j
        self.span = len(order)
        self._committed_mask.zero_()
        self._committed_mask[: len(self.committed)] = True


class CachePool:
    """KV caches for the requests a stage serves at once, allocated up front.

    A request opens a cache (RESET), uses it by its id, and closes it (FREE) when it ends.
    When every cache is taken and another request opens one, the cache used least
    recently is taken over: the source admits at most as many requests as a pool holds,
    so such a cache belongs to a request that ended without a FREE (a source that
    restarted, a link that broke), and reusing it keeps the stage from filling up."""

    def __init__(self, caches: list[KVCache]) -> None:
        if not caches:
            raise ValueError("a cache pool needs at least one cache")
        self.size = len(caches)
        self._free = list(reversed(caches))  # the first one is handed out first
        self._used: OrderedDict[int, KVCache] = OrderedDict()  # request id -> cache, least recent first

    def open(self, rid: int) -> tuple[KVCache, int | None]:
        """A fresh cache for request `rid`; also returns the id of a request whose cache was taken over."""
        evicted = None
        cache = self._used.pop(rid, None)
        if cache is None:
            if self._free:
                cache = self._free.pop()
            else:
                evicted, cache = self._used.popitem(last=False)
        cache.reset()
        self._used[rid] = cache
        return cache, evicted

    def get(self, rid: int) -> KVCache | None:
        cache = self._used.get(rid)
        if cache is not None:
            self._used.move_to_end(rid)
        return cache

    def close(self, rid: int) -> bool:
        """Free request `rid`'s cache; False when it had none."""
        cache = self._used.pop(rid, None)
        if cache is None:
            return False
        cache.reset()
        self._free.append(cache)
        return True

    @property
    def active(self) -> list[int]:
        """Request ids holding a cache, least recently used first."""
        return list(self._used)
