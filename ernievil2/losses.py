"""The ERNIE-ViL 2.0 multi-view contrastive loss: weighted InfoNCE terms over four views.

Features (L2-normalised embeddings), not logits, cross ranks: every term asks a
:class:`FeatureExchange` for the gathered columns and the offset of this rank's rows, so the
distributed gather-with-gradient plugs in without touching the loss. With the default
base :class:`FeatureExchange` (one process) the columns are the local batch itself.

Two variants (``LossConfig.local_loss``): the *local* loss scores this rank's ``B`` rows against
all ``W·B`` gathered columns (labels offset by ``rank·B``), and the job's loss is the mean of the
ranks' values; the *global* loss scores all ``W·B`` gathered rows on every rank (``W`` times the
compute, the same value everywhere). With a gather that all-reduces its gradient
(:class:`ernievil2.distributed.AllGatherWithGrad`) both give every rank the feature gradient
``W · dL/dx`` and, after ``paddle.DataParallel``'s averaging over ranks, the single-process
gradient of the global batch; ``tests/test_distributed.py`` checks both against one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import paddle
import paddle.nn.functional as F

TERMS = ("image_caption", "image_objects", "image_image", "text_text")
# Which model outputs each term consumes (the trainer computes only what the active terms need).
TERM_VIEWS: dict[str, tuple[str, ...]] = {
    "image_caption": ("image", "caption"),
    "image_objects": ("image", "objects"),
    "image_image": ("image_view1", "image_view2"),
    "text_text": ("caption", "text_view"),
}
#: With ``shared_image_view`` the image-image term contrasts the caption view with one SimCLR view.
SHARED_IMAGE_IMAGE_VIEWS: tuple[str, str] = ("image", "image_view2")
#: Views made and encoded only for the first ``aux_rows`` rows of a batch (``LossConfig.aux_fraction``).
AUX_VIEWS: tuple[str, ...] = ("image_view1", "image_view2", "text_view", "objects")
#: The terms beside image-caption: what ``aux_fraction`` and ``aux_until`` apply to.
AUX_TERMS: tuple[str, ...] = ("image_objects", "image_image", "text_text")
#: Image views a ``patch_dropout`` entry may name.
PATCH_DROPOUT_VIEWS: tuple[str, ...] = ("image", "image_view1", "image_view2")
NEG_INF = -1e9


def aux_rows(batch_rows: int, fraction: float) -> int:
    """Rows of a batch of ``batch_rows`` that carry the auxiliary views: ``ceil(fraction · B)``,
    at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"loss.aux_fraction must be in (0, 1], got {fraction}")
    return max(1, min(batch_rows, math.ceil(fraction * batch_rows - 1e-9)))


class FeatureExchange:
    """How features cross ranks. This base class is the single-process case (world size 1)."""

    rank: int = 0
    world_size: int = 1

    def gather(self, x: paddle.Tensor) -> paddle.Tensor:
        """Concatenate ``x`` from all ranks along axis 0 (gradients flow back to the owner)."""
        return x

    def sum(self, x: paddle.Tensor) -> paddle.Tensor:
        """Sum a (gradient-free) tensor over all ranks."""
        return x

    def gather_values(self, x: paddle.Tensor) -> paddle.Tensor:
        """Concatenate a gradient-free tensor (e.g. int64 keys) from all ranks along axis 0."""
        return x


def _cross_entropy_rows(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Per-row cross entropy, ``[N]``, computed in float32 whatever the AMP dtype."""
    if logits.dtype in (paddle.float16, paddle.bfloat16):
        logits = logits.astype("float32")
    return F.cross_entropy(logits, labels.unsqueeze(-1), reduction="none").squeeze(-1)


def _labels(n: int, offset: int) -> paddle.Tensor:
    return paddle.arange(offset, offset + n, dtype="int64")


def info_nce(
    queries: paddle.Tensor,
    keys_local: paddle.Tensor,
    scale: paddle.Tensor,
    exchange: FeatureExchange,
    local: bool = True,
    pair_weights: Optional[paddle.Tensor] = None,
) -> paddle.Tensor:
    """Symmetric InfoNCE between paired rows of ``queries`` and ``keys_local`` (this rank's rows).

    Local (default): rows of this rank score against the columns of all ranks; labels are offset
    by ``rank · B``. Global (``local=False``): the gathered rows of all ranks score against all
    columns. Returns the mean of the two directions' mean cross entropy; ``pair_weights`` (no
    gradient; ``[W·B]``, every pair of the job in rank order) weight each pair's two rows in those
    means.
    """
    b = queries.shape[0]
    keys_all = exchange.gather(keys_local)
    queries_all = exchange.gather(queries)
    if local:
        labels = _labels(b, exchange.rank * b)
    else:
        queries, keys_local, labels = queries_all, keys_all, _labels(queries_all.shape[0], 0)
    if pair_weights is not None and local:
        pair_weights = pair_weights[exchange.rank * b:(exchange.rank + 1) * b]
    q2k = _cross_entropy_rows(scale * paddle.matmul(queries, keys_all, transpose_y=True), labels)
    k2q = _cross_entropy_rows(scale * paddle.matmul(keys_local, queries_all, transpose_y=True), labels)
    if pair_weights is not None:
        w = pair_weights.astype(q2k.dtype)
        q2k, k2q = w * q2k, w * k2q
    return (q2k.mean() + k2q.mean()) / 2


def caption_agreement_weights(
    captions: paddle.Tensor, objects: paddle.Tensor, mask: paddle.Tensor, temperature: float,
    exchange: Optional[FeatureExchange] = None,
) -> paddle.Tensor:
    """Weights (no gradient, mean 1) for the image–caption pairs of the whole job, ``[W·B]`` in rank
    order, from how well each caption agrees with its own sample's objects text:
    ``softmax(cos(caption_i, objects_i) / T)`` over the job's tagged rows, times their count. A
    caption written for another scene (a mismatched web pair) names objects the image's tags do
    not, so its pair weighs less. ``captions`` covers this rank's batch, ``objects`` and ``mask``
    (1 where a sample has tags) its first ``n`` rows; rows without a tag, or past ``n``, weigh 1."""
    exchange = exchange or FeatureExchange()
    b, n = captions.shape[0], objects.shape[0]
    tagged = paddle.concat([mask.astype("float32").reshape([-1]), paddle.zeros([b - n], dtype="float32")])
    own = (captions[:n].detach() * objects.detach()).sum(axis=-1).astype("float32")
    agree = paddle.concat([own, paddle.zeros([b - n], dtype="float32")])
    tagged, agree = exchange.gather_values(tagged), exchange.gather_values(agree)
    count = tagged.sum()
    if float(count) == 0.0:
        return paddle.ones_like(tagged)
    share = F.softmax(agree / temperature + (1.0 - tagged) * NEG_INF, axis=0) * count
    return paddle.where(tagged > 0, share, paddle.ones_like(share))


#: What an objects text that is true of an image (but is not its own) is to that image's query
#: (``LossConfig.objects_true_texts``).
TRUE_TEXT_MODES: tuple[str, ...] = ("negative", "masked", "positive")
#: How the image-objects term scores: one softmax over the candidates per row, in both directions
#: (InfoNCE), or an independent sigmoid per image-text pair (a multi-label objective, as SigLIP).
OBJECTS_OBJECTIVES: tuple[str, ...] = ("softmax", "sigmoid")


def _soft_cross_entropy_rows(logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
    """Per-row cross entropy against a target distribution per row, ``[N]``, in float32."""
    if logits.dtype in (paddle.float16, paddle.bfloat16):
        logits = logits.astype("float32")
    return -(targets.astype(logits.dtype) * F.log_softmax(logits, axis=-1)).sum(axis=-1)


def texts_true_of_images(image_tags: paddle.Tensor, text_tags: paddle.Tensor) -> paddle.Tensor:
    """``[N, M]`` bool: objects text ``j`` is true of image ``i`` when it names at least one tag and
    every tag it names is among image ``i``'s tags. ``image_tags`` ``[N, K]`` and ``text_tags``
    ``[M, K]`` hold int64 tag keys, 0-padded (:func:`ernievil2.data.views.tag_key`). Each side
    becomes a multi-hot ``[N or M, V]`` over the ``V`` distinct keys present (no gradient)."""
    n = image_tags.shape[0]
    keys = paddle.concat([image_tags, text_tags])
    unique, index = paddle.unique(keys.reshape([-1]), return_inverse=True)
    index = index.reshape(keys.shape).astype("int64")
    hot = paddle.put_along_axis(paddle.zeros([keys.shape[0], unique.shape[0]], dtype="float32"), index,
                                paddle.ones(index.shape, dtype="float32"), axis=1)  # not the default dtype
    hot = hot * (unique != 0).astype("float32").unsqueeze(0)  # key 0 is padding
    images, texts = hot[:n], hot[n:]
    named = texts.sum(axis=1)
    shared = paddle.matmul(images, texts, transpose_y=True)
    return (shared == named.unsqueeze(0)).logical_and(named.unsqueeze(0) > 0)


def masked_info_nce(
    images: paddle.Tensor,
    texts: paddle.Tensor,
    mask: paddle.Tensor,
    scale: paddle.Tensor,
    exchange: FeatureExchange,
    local: bool = True,
    tags: Optional[tuple[paddle.Tensor, paddle.Tensor]] = None,
    true_texts: str = "negative",
    objective: str = "softmax",
) -> paddle.Tensor:
    """Symmetric image–objects InfoNCE where ``mask`` (1/0 per sample) marks samples with tags.

    A sample without tags is neither a query in either direction nor a candidate objects text;
    its image stays a negative for the objects texts of other samples. The mean runs over the
    valid rows of the whole job, so the value does not depend on how samples fall on ranks.
    Rows are this rank's (``local``) or all gathered rows (global), as in :func:`info_nce`.

    With detector tags many samples of a batch share a tag text ("the picture contains circle"),
    and another sample's text is often true of an image. ``tags`` (each sample's tag keys and the
    keys its text names, :func:`texts_true_of_images`) let ``true_texts`` decide what such a text
    (or, for a text's query, such an image) is: ``negative`` (plain InfoNCE; tags unused),
    ``masked`` (not a candidate) or ``positive`` (a target of equal share with the own pair: a
    multi-positive cross entropy, as UniCL's image-label contrast).

    ``objective="sigmoid"`` scores every (image, objects text) pair on its own: a binary cross
    entropy on ``scale · cos + bias`` whose targets are the own pair and, with ``positive``, every
    text true of the image (with ``masked`` those are left out). The bias is set per batch so that
    the mean candidate pair's logit is the logit of the batch's share of positive pairs; a row's
    loss is its sum over the candidates divided by its positives, the scale of a softmax row. Each pair is scored once in the job
    (this rank's images against all texts).
    """
    if objective not in OBJECTS_OBJECTIVES:
        raise ValueError(f"loss.objects_objective must be one of {list(OBJECTS_OBJECTIVES)}, got {objective!r}")
    if true_texts not in TRUE_TEXT_MODES:
        raise ValueError(f"loss.objects_true_texts must be one of {list(TRUE_TEXT_MODES)}, got {true_texts!r}")
    if true_texts != "negative" and tags is None:
        raise ValueError(f"objects_true_texts={true_texts!r} needs the samples' tag keys")
    b = images.shape[0]
    mask = mask.astype(images.dtype)
    mask_all = exchange.gather(mask.detach())
    texts_all = exchange.gather(texts)
    images_all = exchange.gather(images)
    if true_texts != "negative":
        image_tags, text_tags = tags
        image_tags_all, text_tags_all = exchange.gather_values(image_tags), exchange.gather_values(text_tags)
    if local:
        labels = _labels(b, exchange.rank * b)
    else:
        images, texts, mask = images_all, texts_all, mask_all
        if true_texts != "negative":
            image_tags, text_tags = image_tags_all, text_tags_all
        labels = _labels(images_all.shape[0], 0)
    # image → objects: objects texts of untagged samples are not candidates.
    i2t_logits = scale * paddle.matmul(images, texts_all, transpose_y=True)
    i2t_logits = i2t_logits + (1.0 - mask_all.astype(i2t_logits.dtype)) * NEG_INF
    if objective == "sigmoid":
        return _sigmoid_objects(i2t_logits, labels, mask, mask_all, exchange, local,
                                None if true_texts == "negative" else texts_true_of_images(image_tags, text_tags_all),
                                true_texts)
    t2i_logits = scale * paddle.matmul(texts, images_all, transpose_y=True)
    if true_texts == "negative":
        i2t, t2i = _cross_entropy_rows(i2t_logits, labels), _cross_entropy_rows(t2i_logits, labels)
    else:
        # i2t: text j (all) true of image i (rows); t2i: text i (rows) true of image j (all)
        i2t = _true_texts_rows(i2t_logits, labels, texts_true_of_images(image_tags, text_tags_all), true_texts)
        t2i = _true_texts_rows(t2i_logits, labels, texts_true_of_images(image_tags_all, text_tags).t(), true_texts)
    # Local: each rank divides by (valid rows of the job) / world size, so averaging over ranks
    # gives the global masked mean; global: every rank holds all valid rows of the job.
    # A batch with no tagged sample contributes an exact zero.
    count = mask.sum().detach() if not local else exchange.sum(mask.sum().detach()) / exchange.world_size
    denom = paddle.maximum(count, paddle.ones_like(count))
    rows = paddle.where(mask > 0, i2t + t2i, paddle.zeros_like(i2t))
    return rows.sum() / (2 * denom)


def _true_texts_rows(logits: paddle.Tensor, labels: paddle.Tensor, true: paddle.Tensor, mode: str) -> paddle.Tensor:
    """Per-row loss when the candidates ``true`` of a query (beside its own, ``labels``) are left out
    (``masked``) or are equal-share targets (``positive``)."""
    own = F.one_hot(labels, logits.shape[1]) > 0
    true = true.logical_or(own)
    if mode == "masked":
        return _cross_entropy_rows(logits + _others(true, own, logits.dtype), labels)
    return _soft_cross_entropy_rows(logits, _share(true))


def _sigmoid_objects(
    logits: paddle.Tensor, labels: paddle.Tensor, mask: paddle.Tensor, mask_all: paddle.Tensor,
    exchange: FeatureExchange, local: bool, true: Optional[paddle.Tensor], true_texts: str,
) -> paddle.Tensor:
    """The sigmoid image-objects loss of :func:`masked_info_nce` from its image→text ``logits``
    (untagged columns already at ``NEG_INF``)."""
    logits = logits.astype("float32")
    valid = mask_all.astype("float32").unsqueeze(0).expand_as(logits)
    own = F.one_hot(labels, logits.shape[1]) > 0
    target = own if true is None else true.logical_or(own)
    weight = valid
    if true_texts == "masked":
        weight = weight * (1.0 - target.logical_and(own.logical_not()).astype("float32"))
        target = own
    target = target.astype("float32")
    # The bias: the mean candidate pair sits at the logit of the batch's share of positive pairs,
    # whatever the embeddings' common offset (at the start of training every cosine is near 1).
    # Over the job's pairs: with the local loss each rank holds its own rows' share of the sums.
    def job_sum(x: paddle.Tensor) -> paddle.Tensor:
        return exchange.sum(x.detach()) if local else x.detach()

    row_weight = weight * (mask > 0).astype("float32").unsqueeze(1)  # untagged queries left out
    pairs = paddle.maximum(job_sum(row_weight.sum()), paddle.ones([], dtype="float32"))
    prior = paddle.clip(job_sum((target * row_weight).sum()) / pairs, 1e-4, 1 - 1e-4)
    mean = job_sum((logits * row_weight).sum()) / pairs
    logits = logits - mean + paddle.log(prior / (1 - prior))
    pair = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # per row: the sum over its candidates per positive, the scale of a softmax row's loss
    positives = paddle.maximum((target * weight).sum(axis=1), paddle.ones([logits.shape[0]], dtype="float32"))
    rows = (pair * weight).sum(axis=1) / positives
    count = mask.sum().detach() if not local else exchange.sum(mask.sum().detach()) / exchange.world_size
    denom = paddle.maximum(count, paddle.ones_like(count))
    return paddle.where(mask > 0, rows, paddle.zeros_like(rows)).sum() / denom


def _others(true: paddle.Tensor, own: paddle.Tensor, dtype) -> paddle.Tensor:
    """``NEG_INF`` where a candidate is true of the query but is not its own pair."""
    return true.logical_and(own.logical_not()).astype(dtype) * NEG_INF


def _share(true: paddle.Tensor) -> paddle.Tensor:
    """Each row's true candidates as an equal-share target distribution."""
    t = true.astype("float32")
    return t / t.sum(axis=1, keepdim=True)


def nt_xent(
    view1: paddle.Tensor, view2: paddle.Tensor, scale: paddle.Tensor, exchange: FeatureExchange,
    local: bool = True,
) -> paddle.Tensor:
    """NT-Xent (SimCLR) between two views: each of the 2B rows has one positive (its other view)
    among all 2·W·B columns; its own column (self-similarity) is excluded. Global
    (``local=False``): all 2·W·B gathered rows, as in :func:`info_nce`."""
    b = view1.shape[0]
    offset = exchange.rank * b
    v1_all = exchange.gather(view1)
    v2_all = exchange.gather(view2)
    n_all = v1_all.shape[0]
    if not local:
        view1, view2, b, offset = v1_all, v2_all, n_all, 0
    rows = paddle.concat([view1, view2], axis=0)
    cols = paddle.concat([v1_all, v2_all], axis=0)
    logits = scale * paddle.matmul(rows, cols, transpose_y=True)
    idx = paddle.arange(b, dtype="int64")
    self_cols = paddle.concat([offset + idx, n_all + offset + idx])
    positive = paddle.concat([n_all + offset + idx, offset + idx])
    self_mask = F.one_hot(self_cols, 2 * n_all).astype(logits.dtype) * NEG_INF
    return _cross_entropy_rows(logits + self_mask, positive).mean()


@dataclass
class LossConfig:
    """Weights of the four terms (0 switches a term off), the intra-modal temperature, and the
    economies of a multi-view step (``shared_image_view``, ``aux_fraction``, ``patch_dropout``;
    ``data.views.aux_image_scale`` is the fourth). ``conf/loss/*.yaml`` documents each recipe."""

    image_caption: float = 1.0
    image_objects: float = 1.0
    image_image: float = 1.0
    text_text: float = 1.0
    # Fixed temperature of the intra-modal NT-Xent terms (SimCLR/SLIP use 0.1);
    # None shares the learnable logit scale of the inter-modal terms.
    intra_temperature: Optional[float] = 0.1
    # Several ranks: True scores this rank's rows against all gathered columns (B × W·B logits per
    # rank); False scores all gathered rows on every rank (W·B × W·B, W times the compute). Both
    # give the single-process gradient (module docstring); the local loss is the scalable one.
    local_loss: bool = True
    # DeCLIP-style shared view: the image-image term contrasts the caption view ("image") with
    # "image_view2" instead of two extra SimCLR views, so a step runs 2 image forwards, not 3.
    shared_image_view: bool = False
    # image_image, text_text and image_objects on the first ceil(f·B) rows of each batch only;
    # their views are neither made (loader) nor encoded for the other rows.
    aux_fraction: float = 1.0
    # FLIP patch dropout per image view in training: {view: fraction of patch tokens dropped}.
    patch_dropout: dict[str, float] = field(default_factory=dict)
    # None: the auxiliary terms keep their weights all run. f in (0, 1]: their weights fall linearly
    # from full at the start to 0 at fraction f of training (of trainer.time_budget_s, else of
    # trainer.max_steps); from then on the steps are image-caption steps and their views are not
    # encoded (a curriculum: the intra-modal terms spread the embeddings of different samples
    # apart from the first step, the cheaper image-caption steps follow).
    aux_until: Optional[float] = None
    # None: full weights from the first step. f in (0, 1]: the auxiliary terms' weights rise
    # linearly from 0 at the start to full at fraction f of training (image-caption steps first).
    aux_from: Optional[float] = None
    # What another sample's objects text that is true of an image (every tag it names is one of the
    # image's; e.g. an identical text) is to that image in the image-objects term, and likewise
    # such an image to a text: "negative" (plain InfoNCE), "masked" (no candidate) or "positive"
    # (an equal-share target). With detector tags many samples of a batch share one tag text.
    objects_true_texts: str = "negative"
    # "softmax" (InfoNCE) or "sigmoid" (one binary cross entropy per image-text pair: a multi-label
    # objective over the batch's tag texts).
    objects_objective: str = "softmax"
    # None: every image-caption pair weighs the same. T > 0: each pair weighs by how well its caption
    # agrees with its own objects text, softmax(cos / T) over the tagged rows (mean 1), so a caption
    # written for another scene weighs less (needs loss.image_objects > 0).
    caption_agreement: Optional[float] = None
    name: str = "custom"  # the recipe's name (conf/loss/NAME.yaml), which reports group runs by

    def __post_init__(self) -> None:
        aux_rows(1, self.aux_fraction)  # range check
        if self.objects_true_texts not in TRUE_TEXT_MODES:
            raise ValueError(f"loss.objects_true_texts must be one of {list(TRUE_TEXT_MODES)}, "
                             f"got {self.objects_true_texts!r}")
        if self.objects_objective not in OBJECTS_OBJECTIVES:
            raise ValueError(f"loss.objects_objective must be one of {list(OBJECTS_OBJECTIVES)}, "
                             f"got {self.objects_objective!r}")
        if self.caption_agreement is not None and not self.caption_agreement > 0.0:
            raise ValueError(f"loss.caption_agreement must be > 0 or null, got {self.caption_agreement}")
        if self.aux_until is not None and not 0.0 < self.aux_until <= 1.0:
            raise ValueError(f"loss.aux_until must be in (0, 1] or null, got {self.aux_until}")
        if self.aux_from is not None and not 0.0 < self.aux_from <= 1.0:
            raise ValueError(f"loss.aux_from must be in (0, 1] or null, got {self.aux_from}")
        for view, p in self.patch_dropout.items():
            if view not in PATCH_DROPOUT_VIEWS:
                raise ValueError(f"loss.patch_dropout: unknown image view {view!r} (one of {list(PATCH_DROPOUT_VIEWS)})")
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"loss.patch_dropout.{view} must be in [0, 1), got {p}")


class MultiViewLoss:
    """Weighted sum of the active terms; returns ``{"loss": total, term: value, ...}``."""

    def __init__(self, cfg: LossConfig, exchange: Optional[FeatureExchange] = None):
        self.cfg = cfg
        self.weights = {t: float(getattr(cfg, t)) for t in TERMS if float(getattr(cfg, t)) != 0.0}
        if not self.weights:
            raise ValueError("all loss weights are 0: enable at least one of " + ", ".join(TERMS))
        self.exchange = exchange or FeatureExchange()
        for key in ("aux_until", "aux_from"):
            if getattr(cfg, key) is not None and "image_caption" not in self.weights:
                raise ValueError(f"loss.{key} switches the auxiliary terms off for a while: it needs loss.image_caption > 0")
        if cfg.caption_agreement is not None and not {"image_caption", "image_objects"} <= set(self.weights):
            raise ValueError("loss.caption_agreement weighs image-caption pairs by their objects text: "
                             "it needs loss.image_caption > 0 and loss.image_objects > 0")

    def aux_weight(self, progress: float) -> float:
        """Factor on the auxiliary terms' weights at ``progress`` (fraction of training done):
        rising from 0 to 1 over ``aux_from``, falling to 0 at ``aux_until``."""
        factor = 1.0
        if self.cfg.aux_from is not None:
            factor = min(1.0, float(progress) / self.cfg.aux_from)
        if self.cfg.aux_until is not None:
            factor = min(factor, max(0.0, 1.0 - float(progress) / self.cfg.aux_until))
        return factor

    def views_at(self, progress: float) -> tuple[str, ...]:
        """The views the terms active at ``progress`` need (:attr:`required_views` until the
        auxiliary terms are switched off, then image-caption's)."""
        if self.aux_weight(progress) > 0.0:
            return self.required_views
        return tuple(v for v in self.required_views if v in self.term_views("image_caption"))

    @property
    def uses_logit_scale(self) -> bool:
        """Whether an active term depends on the learnable logit scale: the inter-modal terms, and
        the intra-modal ones when ``intra_temperature`` is None."""
        inter = any(t in self.weights for t in ("image_caption", "image_objects"))
        intra = any(t in self.weights for t in ("image_image", "text_text"))
        return inter or (intra and self.cfg.intra_temperature is None)

    def term_views(self, term: str) -> tuple[str, ...]:
        """The model outputs ``term`` contrasts (``shared_image_view`` changes the image-image pair)."""
        if term == "image_image" and self.cfg.shared_image_view:
            return SHARED_IMAGE_IMAGE_VIEWS
        return TERM_VIEWS[term]

    @property
    def required_views(self) -> tuple[str, ...]:
        """Model outputs the active terms need, e.g. ``("image", "caption")`` for CLIP-only."""
        views: list[str] = []
        for term in self.weights:
            views += [v for v in self.term_views(term) if v not in views]
        return tuple(views)

    @property
    def aux_views(self) -> tuple[str, ...]:
        """The required views made only for the first :meth:`rows` rows (all rows: ``aux_fraction`` 1)."""
        if self.cfg.aux_fraction >= 1.0:
            return ()
        return tuple(v for v in self.required_views if v in AUX_VIEWS)

    def rows(self, view: str, batch_rows: int) -> int:
        """How many leading rows of a ``batch_rows`` batch carry ``view``."""
        return aux_rows(batch_rows, self.cfg.aux_fraction) if view in self.aux_views else batch_rows

    def __call__(
        self, feats: Mapping[str, paddle.Tensor], logit_scale: paddle.Tensor,
        objects_mask: Optional[paddle.Tensor] = None, progress: float = 0.0,
        objects_tags: Optional[tuple[paddle.Tensor, paddle.Tensor]] = None,
    ) -> dict[str, paddle.Tensor]:
        """``feats``: each view's features, an auxiliary view (:attr:`aux_views`) holding only the
        first :meth:`rows` rows; ``objects_mask`` and ``objects_tags`` (each sample's tag keys and
        those its objects text names, for ``objects_true_texts``) cover all rows of the batch;
        ``progress`` the fraction of training done (for ``aux_until``)."""
        ex, local = self.exchange, self.cfg.local_loss
        factor = self.aux_weight(progress)
        weights = {t: w * (factor if t in AUX_TERMS else 1.0) for t, w in self.weights.items()}
        weights = {t: w for t, w in weights.items() if w != 0.0}
        intra = logit_scale if self.cfg.intra_temperature is None else 1.0 / self.cfg.intra_temperature

        def pair(term: str) -> tuple[paddle.Tensor, paddle.Tensor]:
            # both views of a term cut to the rows they share (an auxiliary view's)
            a, b = (feats[v] for v in self.term_views(term))
            n = min(a.shape[0], b.shape[0])
            return a[:n], b[:n]

        terms: dict[str, paddle.Tensor] = {}
        if "image_caption" in weights:
            pair_weights = None
            if self.cfg.caption_agreement is not None:
                if objects_mask is None:
                    raise ValueError("loss.caption_agreement needs objects_mask (1 for samples with tags)")
                objects = feats["objects"]
                pair_weights = caption_agreement_weights(
                    feats["caption"], objects, objects_mask[: objects.shape[0]], self.cfg.caption_agreement, ex)
            terms["image_caption"] = info_nce(*pair("image_caption"), logit_scale, ex, local, pair_weights)
        if "image_objects" in weights:
            if objects_mask is None:
                raise ValueError("the image_objects term needs objects_mask (1 for samples with tags)")
            images, objects = pair("image_objects")
            n = objects.shape[0]
            terms["image_objects"] = masked_info_nce(
                images, objects, objects_mask[:n], logit_scale, ex, local,
                None if objects_tags is None else (objects_tags[0][:n], objects_tags[1][:n]),
                self.cfg.objects_true_texts, self.cfg.objects_objective,
            )
        if "image_image" in weights:
            terms["image_image"] = nt_xent(*pair("image_image"), intra, ex, local)
        if "text_text" in weights:
            terms["text_text"] = nt_xent(*pair("text_text"), intra, ex, local)
        total = paddle.add_n([weights[t] * v for t, v in terms.items()])
        return {"loss": total, **terms}
