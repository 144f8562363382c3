"""Block helpers of the dense backends: the op families' formulas on one block of rows of S.

``reference`` applies them to all rows at once, ``chunked`` to one block of rows at a time, so the
two backends share them; that is why neither backend is ever a test oracle for the other — the
tests compare both with the independent dense formulas of ``contrastive_kernels.reference``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def excluded(rows: Tensor, m: int) -> Tensor:
    """(R, M) bool: the self pair (i, i) of each global row i (never true past column M − 1)."""
    return rows[:, None] == torch.arange(m, device=rows.device)[None, :]


def designated_positives(rows: Tensor, m: int, labels, row_classes, col_classes) -> Tensor:
    """(R, M) bool: the pairs named positive before any exclusion — same-class columns, or the
    labelled column (the diagonal without labels)."""
    if row_classes is not None:
        return row_classes[rows][:, None] == col_classes[None, :]
    cols = labels[rows] if labels is not None else rows
    return cols[:, None] == torch.arange(m, device=rows.device)[None, :]


def excluded_pairs(rows: Tensor, m: int, labels, row_classes, col_classes, exclude_self: bool,
                   row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
                   guide_threshold=None):
    """(R, M) bool of the excluded pairs of the global ``rows``, or None when nothing is excluded:
    the self pair, same-group pairs, and guided false negatives that are not designated positives.
    The guide similarities of the block are one (R, M) product in the statistic dtype."""
    out = excluded(rows, m) if exclude_self else None
    if row_groups is not None:
        same = row_groups[rows][:, None] == col_groups[None, :]
        out = same if out is None else out | same
    if guide_query is not None:
        guided = (guide_query[rows] @ guide_keys.T) > guide_threshold[rows, None]
        guided &= ~designated_positives(rows, m, labels, row_classes, col_classes)
        out = guided if out is None else out | guided
    return out


def block_stats(s: Tensor, rows: Tensor, labels, row_classes, col_classes, exclude_self: bool,
                **masks):
    """Row LSE, the block's column LSE, positives and their count for a block of rows of S.

    ``s`` (R, M) holds the rounded logits of the global ``rows``; returns ``(row_lse (R,),
    col_lse_part (M,), pos (R,), count (R,) or None)``. Positives are read from ``s`` itself: the
    same rounded elements that enter the log-sum-exp (docs/math.md §6, *Rounding*). An excluded
    element is never a positive: a label on an excluded pair gives pos 0. ``masks``: the op's
    optional ``row_groups``/``col_groups``/``guide_*`` (see ``excluded_pairs``).
    """
    out = excluded_pairs(rows, s.shape[1], labels, row_classes, col_classes, exclude_self, **masks)
    masked = s if out is None else s.masked_fill(out, float("-inf"))
    row = torch.logsumexp(masked, dim=1)
    col = torch.logsumexp(masked, dim=0)
    if row_classes is not None:
        hit = designated_positives(rows, s.shape[1], labels, row_classes, col_classes)
        if out is not None:
            hit &= ~out
        pos = torch.where(hit, s, 0.0).sum(dim=1)
        return row, col, pos, hit.sum(dim=1).to(s.dtype)
    cols = labels[rows] if labels is not None else rows
    pos = s.gather(1, cols[:, None]).squeeze(1)
    if out is not None:  # a labelled positive on an excluded pair: the row has none
        pos = torch.where(out.gather(1, cols[:, None]).squeeze(1), 0.0, pos)
    return row, col, pos, None


def block_grad(s: Tensor, rows: Tensor, labels, row_classes, col_classes, exclude_self: bool,
               row_lse, col_lse, grad_row, grad_col, grad_pos, **masks) -> Tensor:
    """G = ∂L/∂S for a block of rows of S (docs/math.md §2); ``s`` is left unchanged.

    Built in place (at most three S-sized blocks alive). Excluded elements get exactly 0 by a
    select: their exponential may be inf·0 = NaN when a row has nothing left (row_lse = −inf).
    Positives never lie on an excluded element: a label pointing at an excluded pair means the row
    has no positive (its ``pos`` is 0, its ``grad_pos`` unused).
    """
    out = excluded_pairs(rows, s.shape[1], labels, row_classes, col_classes, exclude_self, **masks)
    g = None
    if grad_row is not None:
        g = torch.sub(s, row_lse[rows, None]).exp_().mul_(grad_row[rows, None])
    if grad_col is not None:
        t = torch.sub(s, col_lse[None, :]).exp_().mul_(grad_col[None, :])
        g = t if g is None else g.add_(t)
    if g is None:
        g = torch.zeros_like(s)
    elif out is not None:
        g.masked_fill_(out, 0.0)
    if grad_pos is not None:
        if row_classes is not None:
            hit = designated_positives(rows, s.shape[1], labels, row_classes, col_classes)
            if out is not None:
                hit &= ~out
            g.add_(torch.where(hit, grad_pos[rows, None], 0.0))
        else:
            cols = labels[rows] if labels is not None else rows
            gp = grad_pos[rows]
            if out is not None:  # no positive on an excluded pair (see block_stats)
                gp = torch.where(out.gather(1, cols[:, None]).squeeze(1), 0.0, gp)
            g.index_put_((torch.arange(s.shape[0], device=s.device), cols), gp, accumulate=True)
    return g


# ---------------------------------------------------------------------------------------------
# sigmoid family (docs/math.md §7)
# ---------------------------------------------------------------------------------------------

def signs(rows: Tensor, m: int, row_classes, col_classes, diagonal: bool, dtype) -> Tensor:
    """z (R, M): +1 on positive pairs (equal classes, or the diagonal), −1 elsewhere."""
    if row_classes is not None:
        pos = row_classes[rows][:, None] == col_classes[None, :]
    elif diagonal:
        pos = excluded(rows, m)
    else:
        return torch.full((rows.shape[0], m), -1.0, dtype=dtype, device=rows.device)
    return torch.where(pos, 1.0, -1.0).to(dtype)


def sigmoid_block(s: Tensor, rows: Tensor, bias: Tensor, row_classes, col_classes, diagonal: bool):
    """(row sums of softplus(−z·L) (R,), x = −z·L (R, M), z) for a block of rows of S."""
    z = signs(rows, s.shape[1], row_classes, col_classes, diagonal, s.dtype)
    x = -z * (s + bias.to(s.dtype))
    # log(1 + e^x) exactly: F.softplus switches to x above 20 (an e^-20 error, 2e-9)
    return torch.logaddexp(x, torch.zeros_like(x)).sum(dim=1), x, z
