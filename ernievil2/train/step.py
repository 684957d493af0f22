"""What one training step computes from a loader batch: the views' embeddings in as few model
passes as possible (:func:`encode_views`), micro-batches merged for gradient accumulation, the
gradient norm, and the bad-sample counts a batch carries."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import paddle

from ernievil2.data.device_views import ViewFinisher
from ernievil2.data.views import IMAGE_VIEWS, PHOTOMETRIC_SUFFIX
from ernievil2.encode import trim_padding
from ernievil2.train.parallel import unwrap

TEXT_VIEWS = {"caption": "caption_ids", "text_view": "text_view_ids", "objects": "objects_ids"}
SKIPPED_KEY = "skipped"  # bad-sample counts a batch may carry (ernievil2.data.loader)


def as_device_tensor(x: Any) -> paddle.Tensor:
    """``x`` as a tensor on the current device (loader batches may hold host tensors)."""
    t = x if isinstance(x, paddle.Tensor) else paddle.to_tensor(np.asarray(x))
    device = paddle.get_device()
    return t.to(device) if device != "cpu" and t.place.is_cpu_place() else t


def to_host(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if isinstance(x, paddle.Tensor) else x)


#: A text view padded to the longest view's length adding at most this share of that pass's tokens
#: rides along in it (one pass fewer: on small batches a pass costs more than its padding).
RIDE_ALONG = 0.25


def encode_views(
    model: paddle.nn.Layer, batch: dict, views: Sequence[str], with_logit_scale: bool = True,
    finish: Optional[ViewFinisher] = None, rows: Optional[Mapping[str, int]] = None,
    patch_dropout: Optional[Mapping[str, float]] = None,
) -> tuple[dict[str, paddle.Tensor], Optional[paddle.Tensor]]:
    """Embed the requested views in one ``model(pixels, ids)`` call. Image views (uint8 pixels,
    finished here on the device by ``finish``, default ImageNet normalisation, with the
    photometric draws a SimCLR view carries) of one resolution and one ``patch_dropout`` go
    through the image tower together (one pass per such group), and so do text views of one length
    once each view's all-padding columns are trimmed (short object tags do not pay for captions'
    padding); a text that recurs within a view (detector tags: many samples share one) is encoded
    once and its features shared by its rows, and a view that few rows are left of rides along in
    the longest view's pass (:data:`RIDE_ALONG`). ``rows`` limits a view to its first N rows (the
    auxiliary views of ``loss.aux_fraction``). Returns the features by view and the logit scale
    (None unless ``with_logit_scale``). Going through ``forward`` lets a ``paddle.DataParallel``
    wrapper prepare its gradient all-reduce."""
    rows, drops = rows or {}, patch_dropout or {}
    img_keys = [v for v in IMAGE_VIEWS if v in views]
    txt_keys = [v for v in TEXT_VIEWS if v in views]
    finish = finish or ViewFinisher()
    groups: dict[tuple, list[str]] = {}
    finished: dict[str, paddle.Tensor] = {}
    for k in img_keys:
        n = rows.get(k)
        photometric = batch.get(k + PHOTOMETRIC_SUFFIX)
        finished[k] = finish(batch[k][:n], None if photometric is None else photometric[:n], k)
        groups.setdefault((tuple(finished[k].shape[2:]), float(drops.get(k, 0.0))), []).append(k)
    img_order = [k for keys in groups.values() for k in keys]
    pixels = [paddle.concat([finished[k] for k in keys]) for keys in groups.values()] or None
    pad = unwrap(model).cfg.text.pad_id
    trimmed, inverse = {}, {}
    for k in txt_keys:
        ids_k = trim_padding(to_host(batch[TEXT_VIEWS[k]])[: rows.get(k)], pad)
        unique, back = np.unique(ids_k, axis=0, return_inverse=True)
        if len(unique) < len(ids_k):
            ids_k, inverse[k] = unique, paddle.to_tensor(back.reshape(-1).astype(np.int64))
        trimmed[k] = ids_k
    txt_groups: dict[int, list[str]] = {}
    longest = max((trimmed[k].shape[1] for k in txt_keys), default=0)
    main_tokens = sum(trimmed[k].size for k in txt_keys if trimmed[k].shape[1] == longest)
    for k in txt_keys:
        length = trimmed[k].shape[1]
        if length < longest and len(trimmed[k]) * longest <= RIDE_ALONG * main_tokens:
            trimmed[k] = np.pad(trimmed[k], ((0, 0), (0, longest - length)), constant_values=pad)
            length = longest
        txt_groups.setdefault(length, []).append(k)
    txt_order = [k for keys in txt_groups.values() for k in keys]
    ids = [paddle.to_tensor(np.concatenate([trimmed[k] for k in keys])) for keys in txt_groups.values()] or None
    image_emb, text_emb, logit_scale = model(pixels, ids, with_logit_scale=with_logit_scale,
                                             patch_dropout=[key[1] for key in groups])
    feats: dict[str, paddle.Tensor] = {}
    if img_keys:
        sizes = [finished[k].shape[0] for k in img_order]
        feats.update(zip(img_order, paddle.split(full_precision(image_emb), sizes)))
    if txt_keys:
        sizes = [len(trimmed[k]) for k in txt_order]
        for k, f in zip(txt_order, paddle.split(full_precision(text_emb), sizes)):
            feats[k] = paddle.gather(f, inverse[k]) if k in inverse else f
    return feats, logit_scale


def merge_micro_batches(parts: Sequence[Mapping[str, paddle.Tensor]], lead: int) -> dict[str, paddle.Tensor]:
    """Features of ``k`` micro-batches as one batch whose first ``k · lead`` rows are the micro-batches'
    first ``lead`` rows (the rows an auxiliary view has), in micro-batch order, then the rest; a view
    with only ``lead`` rows per micro-batch is concatenated as it is. Every view gets the same row
    order, so paired rows stay paired."""
    out = {}
    for key in parts[0]:
        views = [p[key] for p in parts]
        if all(v.shape[0] <= lead for v in views):
            out[key] = paddle.concat(views)
        else:
            out[key] = paddle.concat([v[:lead] for v in views] + [v[lead:] for v in views])
    return out


def full_precision(x: paddle.Tensor) -> paddle.Tensor:
    """``x`` in float32 when AMP made it half precision (the loss is computed in full precision)."""
    return x.astype("float32") if x.dtype in (paddle.float16, paddle.bfloat16) else x


def global_grad_norm(model: paddle.nn.Layer) -> float:
    sq = [float((p.grad.astype("float32") ** 2).sum()) for p in model.parameters() if p.grad is not None]
    return math.sqrt(sum(sq))


def bad_sample_counts(batch: dict) -> dict[str, int]:
    """Remove and return the ``skipped`` counts a batch carries (``{kind: count}``, ernievil2.data.loader)."""
    return batch.pop(SKIPPED_KEY, None) or {}
