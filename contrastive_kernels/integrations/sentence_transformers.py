"""Fused twins of sentence-transformers' in-batch-negatives losses (sentence-transformers ≥ 6.3).

Same class names, constructor arguments, defaults, attributes, ``get_config_dict`` and
``citation`` as ``sentence_transformers.sentence_transformer.losses``; swap the import and nothing
else in a training script changes::

    # from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from contrastive_kernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

=================================================  ===============================================
twin                                               sentence-transformers' semantics kept
=================================================  ===============================================
``MultipleNegativesRankingLoss``                   ``directions`` (query_to_doc, query_to_query,
                                                   doc_to_query, doc_to_doc), ``partition_mode``
                                                   (joint / per_direction), hard-negative columns,
                                                   ``gather_across_devices``
``MultipleNegativesSymmetricRankingLoss``          (deprecated upstream) query_to_doc + doc_to_query,
                                                   per_direction
``CachedMultipleNegativesRankingLoss``             the above with GradCache mini-batches
``CachedMultipleNegativesSymmetricRankingLoss``    (deprecated upstream)
``GISTEmbedLoss``                                  guide model, ``margin_strategy``/``margin``,
                                                   ``contrast_anchors``/``contrast_positives``,
                                                   ``temperature``
``CachedGISTEmbedLoss``                            the above with GradCache mini-batches, any number
                                                   of negative columns
``ContrastiveTensionLossInBatchNegatives``         two encoders, learnable scale: the fused
                                                   ``clip_loss``
``MatryoshkaLoss``                                 around the MNRL twins: every selected prefix
                                                   dimension from one sweep per direction
=================================================  ===============================================

sentence-transformers builds the (queries × candidates) score matrix — B × B·(1+n) with n hard
negatives, times the number of directions — and its Cached losses walk it in mini-batches. Here
every direction is one call of the fused log-sum-exp op (``contrastive_kernels.lse_stats``): the
joint partition is the log-add-exp of the directions' row statistics, ``doc_to_doc``'s "not the
documents of my own query" is the op's same-group exclusion, and GISTEmbed's false-negative rule is
the op's guided mask (the guide similarities computed tile by tile). No score matrix exists; memory
beyond the embeddings is O(B·(1+n)). Differences from upstream are rounding only (float64 parity
≤ 1e-9, tests/test_sentence_transformers.py). A guide similarity within a few units in the last
place of its row's threshold counts as a tie and stays, as a duplicate of the positive does
upstream (``_tie_tolerance``).

``hardness_mode`` (upstream's ``strength·stopgrad(sim)`` on negative logits) is the op at scale
``scale + strength`` over whole groups of columns, its gradient scaled back to ``scale`` (the exact
stop-gradient), plus row-wise dot products for each query's own documents.

Not covered: ``similarity_fct`` other than ``util.cos_sim`` and ``util.dot_score`` (a ValueError
says so). ``mini_batch_num_tokens`` is upstream's own mini-batching of the encoder, kept as is.
Every twin takes one extra keyword, ``backend`` (``"auto"``; see ``contrastive_kernels.info()``).
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

try:
    import sentence_transformers
    from sentence_transformers.base.losses.gradcache import resolve_gradient_cache_loss
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer import losses as _st
    from sentence_transformers.util import (all_gather_with_grad, batch_to_device, cos_sim,
                                            dot_score, get_rank, normalize_embeddings)
except ImportError as exc:  # not installed, or a release without these modules
    raise ImportError(
        "contrastive_kernels.integrations.sentence_transformers needs sentence-transformers >= 6.3 "
        f"({exc}); install it with: pip install 'contrastive-kernels[sentence-transformers]'"
    ) from exc

from ..functional import clip_loss, lse_stats

__all__ = [
    "MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss", "CachedGISTEmbedLoss", "ContrastiveTensionLossInBatchNegatives",
    "MatryoshkaLoss", "mnrl_loss", "gist_loss",
]

_SIMILARITIES = "sentence_transformers.util.cos_sim or sentence_transformers.util.dot_score"


def _normalizes(similarity_fct) -> bool:
    """True for cos_sim (embeddings L2-normalised first), False for dot_score; else ValueError."""
    if similarity_fct is cos_sim:
        return True
    if similarity_fct is dot_score:
        return False
    name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    raise ValueError(
        f"the fused loss supports similarity_fct = {_SIMILARITIES}, got {name}: another similarity "
        "needs the score matrix the fused op never builds (use sentence-transformers' own class)")


def _log_partition(row_lses: list[Tensor], partition_mode: str) -> Tensor:
    """One softmax over every direction (log-add-exp of their row statistics), or the mean of
    one softmax per direction."""
    if len(row_lses) == 1:
        return row_lses[0]
    stacked = torch.stack(row_lses)
    return torch.logsumexp(stacked, dim=0) if partition_mode == "joint" else stacked.mean(dim=0)


def _exclude_own(local: Tensor, world: int, shared: bool) -> dict:
    """lse_stats arguments leaving out pair (r, offset + r): the self pair when the batch is one
    process's (offset 0), else a same-group exclusion."""
    if shared:
        return {"exclude_self": True}
    return {"query_groups": local, "key_groups": torch.arange(world, device=local.device)}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by a constant (``factor``) in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


def _hard_query_to_doc(local_queries: Tensor, docs: Sequence[Tensor], docs_all: Tensor,
                       local: Tensor, world: int, scale: float, strength: float, mode: str,
                       backend: str) -> tuple[Tensor, Tensor]:
    """(row statistic, positive logit) of query_to_doc with upstream's hardness penalty: the
    logit of a penalised pair is ``scale·s + strength·stopgrad(s)``.

    The penalised pairs are (in_batch_negatives) every column outside the query's own documents,
    (hard_negatives) its own hard negatives, (all_negatives) every column but its positive. A set
    of whole groups runs through the op at scale ``scale + strength`` — its value — with the
    gradient scaled back by ``scale / (scale + strength)``, which is exactly the stop-gradient
    (the op's feature gradient is linear in its scale); the few pairs of a query's own documents
    (1 + n per row) are row-wise dot products. No score matrix.
    """
    boosted = scale + strength
    own = torch.stack([(local_queries * d[local]).sum(dim=1) for d in docs], dim=1)  # (B, 1+n)
    keep_grad = scale / boosted
    if mode == "in_batch_negatives":
        groups = torch.arange(docs_all.shape[0], device=local.device) % world
        others = lse_stats(local_queries, docs_all, boosted, compute_col=False, query_groups=local,
                           key_groups=groups, backend=backend)[0]
        row = torch.logaddexp(_ScaleGrad.apply(others, keep_grad),
                              torch.logsumexp(scale * own, dim=1))
    elif mode == "hard_negatives":
        groups = torch.arange(docs_all.shape[0], device=local.device) % world
        others = lse_stats(local_queries, docs_all, scale, compute_col=False, query_groups=local,
                           key_groups=groups, backend=backend)[0]
        hard_negatives = scale * own[:, 1:] + strength * own[:, 1:].detach()
        own_logits = torch.cat([scale * own[:, :1], hard_negatives], dim=1)
        row = torch.logaddexp(others, torch.logsumexp(own_logits, dim=1))
    else:  # all_negatives: every column but the positive (column offset + i, a group of its own)
        columns = torch.arange(docs_all.shape[0], device=local.device)
        rest = lse_stats(local_queries, docs_all, boosted, compute_col=False, query_groups=local,
                         key_groups=columns, backend=backend)[0]
        row = torch.logaddexp(_ScaleGrad.apply(rest, keep_grad), scale * own[:, 0])
    return row, scale * own[:, 0]  # the positive is never penalised


def mnrl_loss(queries: Tensor, docs: Sequence[Tensor], scale: float, *, normalize: bool = True,
              directions: Sequence[str] = ("query_to_doc",), partition_mode: str = "joint",
              gather_across_devices: bool = False, hardness_mode: Optional[str] = None,
              hardness_strength: float = 0.0, matryoshka: Optional[tuple] = None,
              backend: str = "auto") -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss on embeddings, fused.

    Args:
        queries: (B, D) anchors. docs: one or more (B, D) document columns — the positives, then
            any hard negatives (column c, row j is a document of query j).
        scale: multiplies the similarity (1 / temperature). normalize: cosine similarity (True)
            or dot product.
        directions, partition_mode: as sentence-transformers (``query_to_doc`` always present).
        hardness_mode, hardness_strength: upstream's hardness weighting of the query_to_doc
            negatives (``strength·stopgrad(sim)`` added to their logits); None or 0 disables it.
        matryoshka: ``(dims, weights)`` — the loss is ``Σ_t w_t·loss(prefix d_t)`` with every
            prefix L2-normalised (sentence-transformers' ``MatryoshkaLoss``), all prefixes from one
            sweep per direction; dims strictly increasing. Not combined with ``hardness_mode``.
    Returns:
        The mean over the B queries of ``log Z_i − scale·sim(q_i, d_i)``, a 0-dim tensor.
    """
    hard = hardness_mode is not None and hardness_strength > 0.0
    if matryoshka is not None and hard:
        raise NotImplementedError("mnrl_loss: matryoshka together with hardness_mode is not fused")
    if normalize and matryoshka is None:
        queries = normalize_embeddings(queries)
        docs = [normalize_embeddings(d) for d in docs]
    b = queries.shape[0]
    offset = 0
    if gather_across_devices:
        queries = all_gather_with_grad(queries)
        docs = [all_gather_with_grad(d) for d in docs]
        offset = get_rank() * b
    world = queries.shape[0]
    shared = world == b
    docs_all = torch.cat(list(docs)) if len(docs) > 1 else docs[0]
    local = torch.arange(offset, offset + b, device=queries.device)
    local_queries, local_docs = queries[offset:offset + b], docs[0][offset:offset + b]
    prefix = {} if matryoshka is None else {"matryoshka_dims": matryoshka[0]}

    def stats(q, k, *args, **kw):
        return lse_stats(q, k, scale, *args, backend=backend, **prefix, **kw)

    # doc_to_query on one process's batch is the column statistic of the query_to_doc sweep
    # (column i < B holds doc i against every query): no second pass over the logits.
    col_too = "doc_to_query" in directions and shared and not hard
    if hard:
        row, pos = _hard_query_to_doc(local_queries, docs, docs_all, local, world, scale,
                                      hardness_strength, hardness_mode, backend)
    else:
        row, col, pos = stats(local_queries, docs_all, local, compute_col=col_too)
    lses = [row]
    if "query_to_query" in directions:
        lses.append(stats(local_queries, queries, compute_col=False,
                          **_exclude_own(local, world, shared))[0])
    if "doc_to_query" in directions:
        lses.append(col[..., :b] if col_too else stats(local_docs, queries, compute_col=False)[0])
    if "doc_to_doc" in directions:
        # a document is no negative of its own query's other documents (column j is query j % world's)
        groups = torch.arange(docs_all.shape[0], device=queries.device) % world
        lses.append(stats(local_docs, docs_all, compute_col=False, query_groups=local,
                          key_groups=groups)[0])
    per_prefix = (_log_partition(lses, partition_mode) - pos).mean(dim=-1)
    if matryoshka is None:
        return per_prefix
    weights = torch.tensor(matryoshka[1], dtype=per_prefix.dtype, device=per_prefix.device)
    return (weights * per_prefix).sum()


def _tie_tolerance(threshold: Tensor) -> Tensor:
    """A few units in the last place of the statistic dtype around each threshold.

    Upstream's rule is a strict ``g_ij > g_i,pos − margin`` with both similarities from one
    matrix, so a candidate whose guide embedding equals the positive's (the same text mined twice)
    ties and stays. Here the threshold is a row-wise dot product and g_ij a tile's, summed in
    another order: the duplicate may come out one ulp above. Similarities this close to the
    threshold count as ties, and ties stay, as upstream.
    """
    st = torch.float64 if threshold.dtype == torch.float64 else torch.float32
    return 16 * torch.finfo(st).eps * (1 + threshold.abs())


def gist_loss(anchor: Tensor, candidates: Sequence[Tensor], anchor_guide: Tensor,
              candidates_guide: Sequence[Tensor], temperature: float, *,
              margin_strategy: str = "absolute", margin: float = 0.0, contrast_anchors: bool = True,
              contrast_positives: bool = True, gather_across_devices: bool = False,
              backend: str = "auto") -> Tensor:
    """sentence-transformers' GISTEmbedLoss on embeddings, fused.

    Args:
        anchor: (B, D). candidates: the positive column, then any negative columns, each (B, D).
        anchor_guide, candidates_guide: the guide model's embeddings of the same texts, (B, Dg).
        temperature: the logits are cosine similarities / temperature.
        margin_strategy, margin: pair (i, j) is a false negative, left out of row i, when its guide
            similarity exceeds g_i,pos − margin ("absolute") or g_i,pos − |g_i,pos|·margin
            ("relative"); the true positive never is.
    Returns:
        The cross-entropy of each anchor against its positive over the kept candidates (anchor–
        candidate, anchor–anchor and positive–positive pairs as configured), mean over B.
    """
    a = normalize_embeddings(anchor)
    cands = [normalize_embeddings(c) for c in candidates]
    a_guide = normalize_embeddings(anchor_guide)
    c_guide = [normalize_embeddings(c) for c in candidates_guide]
    b = a.shape[0]
    offset = 0
    if gather_across_devices:  # candidates from every process, anchors local (as upstream)
        cands = [all_gather_with_grad(c) for c in cands]
        c_guide = [all_gather_with_grad(c) for c in c_guide]
        offset = get_rank() * b
    world = cands[0].shape[0]
    local = torch.arange(offset, offset + b, device=a.device)
    guided_positive = (a_guide * c_guide[0][offset:offset + b]).sum(dim=1)
    if margin_strategy == "absolute":
        threshold = guided_positive - margin
    else:
        threshold = guided_positive - guided_positive.abs() * margin
    threshold = threshold + _tie_tolerance(threshold)
    scale = 1.0 / temperature
    keys = torch.cat(cands) if len(cands) > 1 else cands[0]
    key_guide = torch.cat(c_guide) if len(c_guide) > 1 else c_guide[0]
    # anchor against positives and negatives: labels protect the true positive from the guide
    row, _, pos = lse_stats(a, keys, scale, local, compute_col=False, guide_query=a_guide,
                            guide_keys=key_guide, guide_threshold=threshold, backend=backend)
    lses = [row]
    if contrast_anchors:
        lses.append(lse_stats(a, a, scale, compute_col=False, exclude_self=True,
                              guide_query=a_guide, guide_keys=a_guide, guide_threshold=threshold,
                              backend=backend)[0])
    if contrast_positives:
        lses.append(lse_stats(cands[0][offset:offset + b], cands[0], scale, local,
                              compute_col=False, guide_query=c_guide[0][offset:offset + b],
                              guide_keys=c_guide[0], guide_threshold=threshold, backend=backend,
                              **_exclude_own(local, world, world == b))[0])
    return (_log_partition(lses, "joint") - pos).mean()


# ---------------------------------------------------------------------------------------------
# MultipleNegativesRankingLoss family
# ---------------------------------------------------------------------------------------------

class MultipleNegativesRankingLoss(_st.MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (same arguments, same loss) on the
    fused op: no (queries × documents) score matrix. Inputs: (anchor, positive) pairs,
    (anchor, positive, negative) triplets or (anchor, positive, negative_1, …) n-tuples.
    ``backend`` picks the kernel (default ``"auto"``)."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode: str = "joint", hardness_mode=None, hardness_strength: float = 0.0,
                 *, backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        _normalizes(similarity_fct)
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Optional[Tensor] = None,
                                     matryoshka: Optional[tuple] = None) -> Tensor:
        """The loss from the columns' embeddings; ``matryoshka = (dims, weights)`` (from the
        ``MatryoshkaLoss`` twin) sums it over prefix dimensions in one sweep per direction."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return mnrl_loss(embeddings[0], embeddings[1:], self.scale,
                         normalize=_normalizes(self.similarity_fct), directions=self.directions,
                         partition_mode=self.partition_mode,
                         gather_across_devices=self.gather_across_devices,
                         hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
                         matryoshka=matryoshka, backend=self.backend)


_SYMMETRIC_DEPRECATION = (
    "The {0} is deprecated and will be removed in a future release. Please use {1} with "
    "`directions=('query_to_doc', 'doc_to_query')` and `partition_mode='per_direction'` instead.")


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' (deprecated) ``MultipleNegativesSymmetricRankingLoss``: the fused
    ``MultipleNegativesRankingLoss`` with query_to_doc + doc_to_query, one softmax per direction."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 gather_across_devices: bool = False, *, backend: str = "auto") -> None:
        warnings.warn(_SYMMETRIC_DEPRECATION.format(type(self).__name__, "MultipleNegativesRankingLoss"),
                      DeprecationWarning, stacklevel=2)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         backend=backend)


class CachedMultipleNegativesRankingLoss(_st.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache: the encoder runs
    in mini-batches of ``mini_batch_size``) with the loss on the fused op: the whole batch's loss
    and its embedding gradients in one call instead of upstream's walk over score-matrix blocks."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: Optional[int] = None,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode: str = "joint", show_progress_bar: bool = False,
                 hardness_mode=None, hardness_strength: float = 0.0, *,
                 backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, show_progress_bar=show_progress_bar,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        # the wrapped loss (upstream keeps its own MNRL here) is the fused twin
        self.loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, backend=backend)

    @property
    def backend(self) -> str:
        return self.loss.backend

    def calculate_loss(self, reps: list[list[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the whole batch from the per-mini-batch embeddings ``reps[column][chunk]``;
        with ``with_backward``, their gradients are filled and the detached loss returned."""
        source = getattr(self, "matryoshka_source", None)
        matryoshka = source.draw(sort=False) if source is not None else None
        loss = self.loss.compute_loss_from_embeddings([torch.cat(r) for r in reps], labels,
                                                      matryoshka=matryoshka)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' (deprecated) ``CachedMultipleNegativesSymmetricRankingLoss``."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: Optional[int] = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False, *,
                 backend: str = "auto") -> None:
        warnings.warn(_SYMMETRIC_DEPRECATION.format(type(self).__name__,
                                                    "CachedMultipleNegativesRankingLoss"),
                      DeprecationWarning, stacklevel=2)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         show_progress_bar=show_progress_bar, backend=backend)


# ---------------------------------------------------------------------------------------------
# GISTEmbed
# ---------------------------------------------------------------------------------------------

def _guide_embeddings(loss, sentence_features: list[dict], guide_features: list[dict]) -> list[Tensor]:
    """The guide model's embeddings of the batch's texts (no gradient), re-tokenised for the
    guide when its vocabulary or length differs from the model's (upstream's rule)."""
    with torch.no_grad():
        if loss.must_retokenize:
            guide_features = []
            for features in sentence_features:
                input_ids = features["input_ids"]
                if "cu_seq_lens_q" in features:  # packed (flattened) batches
                    flat = input_ids[0].tolist()
                    bounds = features["cu_seq_lens_q"].tolist()
                    input_ids = [flat[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
                texts = loss.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
                guide_features.append(batch_to_device(loss.guide.preprocess(texts), loss.guide.device))
        return embed_columns(loss.guide, guide_features)


class GISTEmbedLoss(_st.GISTEmbedLoss):
    """sentence-transformers' ``GISTEmbedLoss`` (same arguments, same loss) on the fused op: the
    guide's false-negative mask is computed inside the tiles, no score or mask matrix exists.
    Inputs: (anchor, positive) pairs or (anchor, positive, negative) triplets."""

    def __init__(self, model, guide, temperature: float = 0.01, margin_strategy: str = "absolute",
                 margin: float = 0.0, contrast_anchors: bool = True, contrast_positives: bool = True,
                 gather_across_devices: bool = False, *, backend: str = "auto") -> None:
        super().__init__(model, guide, temperature=temperature, margin_strategy=margin_strategy,
                         margin=margin, contrast_anchors=contrast_anchors,
                         contrast_positives=contrast_positives,
                         gather_across_devices=gather_across_devices)
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        # the guide runs on shallow copies: it writes its outputs into the dicts it is given
        guide_features = [dict(f) for f in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        guide_embeddings = _guide_embeddings(self, sentence_features, guide_features)
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        return gist_loss(embeddings[0], embeddings[1:], guide_embeddings[0], guide_embeddings[1:],
                         self.temperature, margin_strategy=self.margin_strategy, margin=self.margin,
                         contrast_anchors=self.contrast_anchors,
                         contrast_positives=self.contrast_positives,
                         gather_across_devices=self.gather_across_devices, backend=self.backend)


class CachedGISTEmbedLoss(_st.CachedGISTEmbedLoss):
    """sentence-transformers' ``CachedGISTEmbedLoss`` (GradCache mini-batches for the model and
    the guide) with the loss on the fused op; any number of negative columns."""

    def __init__(self, model, guide, temperature: float = 0.01, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, show_progress_bar: bool = False,
                 margin_strategy: str = "absolute", margin: float = 0.0,
                 contrast_anchors: bool = True, contrast_positives: bool = True,
                 gather_across_devices: bool = False, *, backend: str = "auto") -> None:
        super().__init__(model, guide, temperature=temperature, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         show_progress_bar=show_progress_bar, margin_strategy=margin_strategy,
                         margin=margin, contrast_anchors=contrast_anchors,
                         contrast_positives=contrast_positives,
                         gather_across_devices=gather_across_devices)
        self.backend = backend

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the whole batch from the per-mini-batch embeddings and guide embeddings;
        with ``with_backward``, the embeddings' gradients are filled and the detached loss
        returned."""
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        columns = [torch.cat(r) for r in reps]
        guides = [torch.cat(r) for r in reps_guided]
        loss = gist_loss(columns[0], columns[1:], guides[0], guides[1:], self.temperature,
                         margin_strategy=self.margin_strategy, margin=self.margin,
                         contrast_anchors=self.contrast_anchors,
                         contrast_positives=self.contrast_positives,
                         gather_across_devices=self.gather_across_devices, backend=self.backend)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


# ---------------------------------------------------------------------------------------------
# Contrastive tension with in-batch negatives
# ---------------------------------------------------------------------------------------------

class ContrastiveTensionLossInBatchNegatives(_st.ContrastiveTensionLossInBatchNegatives):
    """sentence-transformers' ``ContrastiveTensionLossInBatchNegatives``: the symmetric in-batch
    cross-entropy between two encoders' embeddings of the same texts, with a learnable scale — the
    fused ``clip_loss``. Input: one text column."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, *,
                 backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct)
        self._normalize = _normalizes(similarity_fct)
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)[0]
        a = self.model1(features)["sentence_embedding"]
        b = self.model2(features)["sentence_embedding"]
        if self._normalize:
            a, b = normalize_embeddings(a), normalize_embeddings(b)
        return clip_loss(a, b, self.logit_scale.exp(), backend=self.backend)


# ---------------------------------------------------------------------------------------------
# Matryoshka
# ---------------------------------------------------------------------------------------------

def _fuses_matryoshka(loss) -> bool:
    """Whether ``loss`` computes every prefix in one sweep: an MNRL twin without hardness."""
    target = loss.loss if isinstance(loss, CachedMultipleNegativesRankingLoss) else loss
    return (isinstance(target, MultipleNegativesRankingLoss)
            and not (target.hardness_mode is not None and target.hardness_strength > 0.0))


class MatryoshkaLoss(_st.MatryoshkaLoss):
    """sentence-transformers' ``MatryoshkaLoss`` (same arguments: the model, the inner loss, the
    dims, weights and ``n_dims_per_step``; the same random choice of dims per step): around the
    ``MultipleNegativesRankingLoss`` twins (and their Cached and symmetric forms) every selected
    prefix dimension comes from one sweep of the fused op per direction — the similarity at prefix
    d is a partial sum of the full one — instead of one loss per dimension. Around any other loss
    (``hardness_mode``, GISTEmbed, upstream's classes) it is upstream's per-dimension loop."""

    def __init__(self, model, loss, matryoshka_dims, matryoshka_weights=None,
                 n_dims_per_step: int = -1) -> None:
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights=matryoshka_weights,
                         n_dims_per_step=n_dims_per_step)
        self.fused = _fuses_matryoshka(loss) and len(set(self.matryoshka_dims)) == len(self.matryoshka_dims)
        if self.fused and self.uses_gradient_cache:
            # upstream wrapped the cached loss's calculate_loss in a per-dimension loop; the twin's
            # own calculate_loss asks this object for the dims instead
            target = resolve_gradient_cache_loss(loss)
            del target.calculate_loss
            target.matryoshka_source = self

    def draw(self, sort: bool) -> tuple:
        """(dims ascending, their weights) of this step: all, or ``n_dims_per_step`` of them drawn
        with ``random.sample`` exactly as upstream (the same draws from the same seed)."""
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = random.sample(indices, self.n_dims_per_step)
            if sort:
                indices.sort()
        pairs = sorted((self.matryoshka_dims[i], self.matryoshka_weights[i]) for i in indices)
        return tuple(d for d, _ in pairs), tuple(float(w) for _, w in pairs)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(sentence_features, labels)
        if self.uses_gradient_cache:
            return self.loss(sentence_features, labels)
        embeddings = embed_columns(self.model, list(sentence_features))
        return self.loss.compute_loss_from_embeddings(embeddings, labels,
                                                      matryoshka=self.draw(sort=True))
