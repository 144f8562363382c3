"""Plumbing shared by the distributed losses: process-group checks, the ring of neighbours,
size exchange and variable-length all-gather. Every function is SPMD: all ranks of the group must
make the same calls in the same order."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def require_initialized(what: str) -> None:
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised default process group "
                           "(torch.distributed.init_process_group) when world_size > 1")


def check_rank_world(rank: int, world_size: int, group=None, what: str = "ClipLoss") -> None:
    """Raise ``ValueError`` when (rank, world_size) disagree with the process group."""
    require_initialized(what)
    real_w, real_r = dist.get_world_size(group), dist.get_rank(group)
    if (real_r, real_w) != (rank, world_size):
        raise ValueError(f"{what}(rank={rank}, world_size={world_size}) does not match the process "
                         f"group: this process is rank {real_r} of {real_w}")


def collective_device(like: Tensor, group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones for a few collectives).
    return like.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


_HOST_GROUPS: dict = {}


def host_group(group):
    """A group whose collectives move CPU tensors, for host-side facts (batch sizes).

    Under NCCL a collective moves CUDA tensors, and reading the gathered sizes back on the host
    would make every training step wait for the GPU. For the default NCCL group a gloo twin is
    made once (``new_group`` is collective: every rank makes it at the same first call, as every
    rank calls the loss in lockstep); sizes then travel host to host, the GPU queue untouched. A
    user subgroup keeps its own backend (making a twin would need every rank of the world to take
    part), and so do gloo groups, which move CPU tensors already."""
    if group is not None or dist.get_backend(group) != "nccl":
        return group
    if "default" not in _HOST_GROUPS:
        _HOST_GROUPS["default"] = dist.new_group(backend="gloo")
    return _HOST_GROUPS["default"]


def exchange_sizes(query: Tensor, keys: Tensor, group) -> list[tuple[int, int, int]]:
    """(N_q, M_k, D) of every rank: one tiny all_gather, so receive buffers have the right size and a
    mismatch fails with a clear error on every rank instead of hanging or corrupting a receive.
    Host to host where it can be (:func:`host_group`), so the GPU never waits for it."""
    w = dist.get_world_size(group)
    sizes_group = host_group(group)
    dev = torch.device("cpu") if sizes_group is not group else collective_device(query, group)
    mine = torch.tensor([query.shape[0], keys.shape[0], query.shape[1]], dtype=torch.int64,
                        device=dev)
    allsz = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(allsz, mine, group=sizes_group)
    sizes = [tuple(int(v) for v in t.tolist()) for t in allsz]
    dims = {d for _, _, d in sizes}
    if len(dims) != 1:
        raise ValueError(f"feature dimension differs across ranks: (N, M, D) per rank = {sizes}")
    return sizes


class Ring:
    """Point-to-point neighbours of this rank: blocks arrive from ``prev`` and leave to ``next``.

    Ordering contract (needed for NCCL, which matches a pair's messages in posting order, and
    harmless for gloo): every rank posts its sends to ``next`` in the same sequence as it posts
    its receives from ``prev``, and each stream has its own tag."""

    ACC, PACKET = 1, 2  # tags: the accumulator stream; packet element i uses PACKET + i

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = to_global((self.rank + 1) % self.world)
        self.prev = to_global((self.rank - 1) % self.world)

    def exchange(self, pairs: Sequence[tuple[Tensor, Tensor, int]]):
        """For each (send, recv, tag): send ``send`` to ``next`` and receive ``recv`` from ``prev``,
        all posted as one batch; returns the works (wait on all of them before touching either)."""
        ops_ = []
        for send, recv, tag in pairs:
            ops_.append(dist.P2POp(dist.isend, send, self.next, self.group, tag))
            ops_.append(dist.P2POp(dist.irecv, recv, self.prev, self.group, tag))
        return dist.batch_isend_irecv(ops_) if ops_ else []


def wait_all(works) -> None:
    for w in works:
        w.wait()


def all_gather_varlen(t: Tensor, lengths: Sequence[int], group) -> Tensor:
    """Concatenation over ranks (rank order) of 1-D tensors whose lengths differ per rank."""
    dev = collective_device(t, group)
    longest = max(lengths)
    padded = t.new_zeros((longest,), device=dev)
    padded[:t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]).to(t.device)


def ring_visit(ring: Ring, packet: Sequence[Tensor], receive, visit) -> None:
    """Visit every rank's block once around the ring.

    ``packet``: this rank's own block, a list of tensors (the keys, and whatever travels with
    them); ``receive(b)`` returns empty tensors shaped like rank b's packet. At step k this rank
    holds the packet of rank ``b = r − k`` and calls ``visit(b, *packet_b)`` while the next packet
    is already being received from ``prev`` (one in flight: O(M_b·D) memory).
    """
    cur = list(packet)
    for k in range(ring.world):
        b = (ring.rank - k) % ring.world
        works, nxt = [], None
        if k < ring.world - 1:
            nxt = receive((b - 1) % ring.world)
            works = ring.exchange([(c, x, Ring.PACKET + i)
                                   for i, (c, x) in enumerate(zip(cur, nxt))])
        visit(b, *cur)
        wait_all(works)
        if nxt is not None:
            cur = nxt


def ring_visit_accumulating(ring: Ring, packet: Sequence[Tensor], receive, visit, receive_acc,
                            combine) -> Tensor:
    """:func:`ring_visit` with an accumulator per block travelling behind it.

    ``visit(b, *packet_b)`` returns this rank's contribution to block b's accumulator;
    ``combine(incoming, contribution)`` merges it with what the ranks that held block b before
    contributed (a sum for key gradients, a ``logaddexp`` for column statistics);
    ``receive_acc(b)`` returns an empty accumulator of block b. After W hops every accumulator is
    home: returns this rank's own, complete over every rank's contribution.
    """
    acc_in, acc_works = None, []

    def visit_and_pass(b, *blocks):
        nonlocal acc_in, acc_works
        contribution = visit(b, *blocks)
        if acc_in is not None:
            wait_all(acc_works)
            contribution = combine(acc_in, contribution)
        acc_in = receive_acc((b - 1) % ring.world)
        acc_works = ring.exchange([(contribution, acc_in, Ring.ACC)])

    ring_visit(ring, packet, receive, visit_and_pass)
    wait_all(acc_works)
    return acc_in


def key_blocks(sizes: Sequence[tuple[int, int, int]], keys: Tensor, dtype=None):
    """``receive_acc`` for an accumulator shaped like rank b's keys: an empty (M_b, D) tensor.
    ``sizes``: (N, M, D) of every rank (:func:`exchange_sizes`)."""
    return lambda b: keys.new_empty((sizes[b][1], keys.shape[1]), dtype=dtype)


def key_packets(sizes: Sequence[tuple[int, int, int]], keys: Tensor):
    """``receive`` for a packet of keys alone: ``[empty (M_b, D)]`` of rank b."""
    block = key_blocks(sizes, keys)
    return lambda b: [block(b)]


def keys_and_factors(keys: Tensor, col_scale) -> list:
    """The packet of this rank's block: its keys and, with Matryoshka, their (M, k) per-prefix
    column factors, which travel with them."""
    return [keys] if col_scale is None else [keys, col_scale.contiguous()]


def receive_keys_and_factors(sizes: Sequence[tuple[int, int, int]], keys: Tensor, col_scale):
    """``receive`` for :func:`keys_and_factors` packets: empty tensors shaped like rank b's."""
    blocks = key_packets(sizes, keys)
    if col_scale is None:
        return blocks
    return lambda b: blocks(b) + [col_scale.new_empty((sizes[b][1], col_scale.shape[1]))]
