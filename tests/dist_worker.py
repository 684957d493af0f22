"""Worker of tests/test_distributed.py: one training step of the multi-view loss on this rank's
share of a fixed batch, through the real ``Trainer.train_step`` (DataParallel + gather with grad).

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_worker.py OUT_DIR

For every case of :data:`CASES` it writes ``OUT_DIR/rank{R}_{case}.npz`` with ``term/<name>`` (the
loss terms as the trainer reports them: averaged over ranks) and ``grad/<parameter>`` (this rank's
parameter gradients after DataParallel's all-reduce). The test process computes the same cases in
one process over the whole batch with :func:`step` and compares. The model is float64 so that a
1e-5 relative tolerance checks the algebra, not rounding.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernievil2.distributed import DistInfo, DistributedExchange, init_distributed  # noqa: E402
from ernievil2.losses import LossConfig, MultiViewLoss  # noqa: E402
from ernievil2.models import build_model  # noqa: E402
from ernievil2.models.config import model_config  # noqa: E402
from ernievil2.train.config import TrainerSchema  # noqa: E402
from ernievil2.train.trainer import Trainer  # noqa: E402

GLOBAL_BATCH = 8
IMAGE_SIZE = 32
MAX_LEN = 12
VOCAB = 64
SEED = 7
# Samples with object tags: batch "a" has tagged and untagged samples on both halves; in batch "b"
# the second half (rank 1 of 2) has none.
MASKS = {"a": [1, 0, 1, 1, 0, 1, 0, 1], "b": [1, 1, 0, 1, 0, 0, 0, 0]}
# Tag keys of each sample (image) and of its objects text (0: none): in "a", text {5} recurs on both
# ranks and is true of image 3 ({5, 7}); in "b", texts {3} twice on rank 0.
TAGS = {"a": ([[5], [], [5], [5, 7], [], [7], [], [5]], [[5], [], [5], [7], [], [7], [], [5]]),
        "b": ([[3], [3, 4], [], [4], [], [], [], []], [[3], [3], [], [4], [], [], [], []])}
ALL_TERMS = ("image_caption", "image_objects", "image_image", "text_text")
# The cheaper multi-view step: image-image on the caption view, auxiliary terms on half the rows.
SHARED_AUX = (("aux_fraction", 0.5), ("shared_image_view", True))
# case name -> (batch, local_loss, exchange with a gradient-free gather, active loss terms, micro-batches
# [, LossConfig settings])
CASES = {
    "local_a": ("a", True, False, ALL_TERMS, 1),
    "local_b": ("b", True, False, ALL_TERMS, 1),
    "global_a": ("a", False, False, ALL_TERMS, 1),
    "global_b": ("b", False, False, ALL_TERMS, 1),
    # Image-image NT-Xent alone: the text tower and the temperature get no gradient, so the
    # trainer's DataParallel must look for unused parameters.
    "image_only_a": ("a", True, False, ("image_image",), 1),
    # Gradient accumulation: each rank's share in 2 micro-batches (cached features, no_sync until
    # the last); the reference is the whole batch in one process, in one piece.
    "accum_local_b": ("b", True, False, ALL_TERMS, 2),
    "accum_global_a": ("a", False, False, ALL_TERMS, 2),
    # Auxiliary terms on the first half of each rank's rows; the one-process reference accumulates
    # the two ranks' shares as two micro-batches (whose first halves are then the auxiliary rows).
    "aux_local_b": ("b", True, False, ALL_TERMS, 1, SHARED_AUX),
    "aux_accum_local_b": ("b", True, False, ALL_TERMS, 2, SHARED_AUX),
    # Samples with equal tag sets: not each other's negatives, or each other's positives, across ranks.
    "dup_masked_local_a": ("a", True, False, ALL_TERMS, 1, (("objects_true_texts", "masked"),)),
    "dup_positive_local_a": ("a", True, False, ALL_TERMS, 1, (("objects_true_texts", "positive"),)),
    "dup_positive_global_a": ("a", False, False, ALL_TERMS, 1, (("objects_true_texts", "positive"),)),
    "dup_masked_accum_local_b": ("b", True, False, ALL_TERMS, 2, (("objects_true_texts", "masked"),)),
    "dup_masked_local_b": ("b", True, False, ALL_TERMS, 1, (("objects_true_texts", "masked"),)),
    # The sigmoid objects objective (its bias from the job's pairs) and image-caption pairs weighed
    # by their captions' agreement with the objects texts (a softmax over the job's rows).
    "sigmoid_positive_local_a": ("a", True, False, ALL_TERMS, 1,
                                 (("objects_true_texts", "positive"), ("objects_objective", "sigmoid"))),
    "sigmoid_masked_global_b": ("b", False, False, ALL_TERMS, 1,
                                (("objects_true_texts", "masked"), ("objects_objective", "sigmoid"))),
    "agreement_local_a": ("a", True, False, ALL_TERMS, 1, (("caption_agreement", 0.2),)),
    "agreement_global_b": ("b", False, False, ALL_TERMS, 1, (("caption_agreement", 0.2),)),
    # Negative control: paddle's all_gather returns no gradient (docs/DISTRIBUTED.md); the test expects this
    # case to disagree with one process, which shows the comparison can fail.
    "nograd_gather_a": ("a", True, True, ALL_TERMS, 1),
}


def make_model():
    """A tiny float64 dual encoder with a fixed init (call after ``set_default_dtype('float64')``)."""
    cfg = model_config(
        "tiny",
        vision={"image_size": IMAGE_SIZE, "patch_size": 16, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        text={"vocab_size": VOCAB, "width": 32, "layers": 1, "heads": 2, "ffn_dim": 64, "max_positions": 16},
    )
    paddle.seed(SEED)
    return build_model(cfg)


def make_batch(name: str) -> dict[str, np.ndarray]:
    """The fixed global batch ``name``: random uint8 pixels and token ids with ragged lengths."""
    rng = np.random.default_rng(0 if name == "a" else 1)
    batch: dict[str, np.ndarray] = {}
    for key in ("image", "image_view1", "image_view2"):
        batch[key] = rng.integers(0, 256, (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for key in ("caption_ids", "text_view_ids", "objects_ids"):
        ids = np.zeros((GLOBAL_BATCH, MAX_LEN), dtype=np.int64)
        for i in range(GLOBAL_BATCH):
            n = int(rng.integers(3, MAX_LEN + 1))
            ids[i, :n] = rng.integers(4, VOCAB, n)
            ids[i, 0], ids[i, n - 1] = 1, 2
        batch[key] = ids
    batch["has_objects"] = np.asarray(MASKS[name], dtype=np.float64)
    for key, sets in zip(("objects_tags", "objects_text_tags"), TAGS[name]):
        batch[key] = np.zeros((GLOBAL_BATCH, 2), dtype=np.int64)
        for i, tags in enumerate(sets):
            batch[key][i, : len(tags)] = tags
    return batch


def shard(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    b = len(batch["has_objects"]) // world
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


def micro_batches(batch: dict[str, np.ndarray], k: int) -> list[dict[str, np.ndarray]]:
    """``batch`` cut into ``k`` consecutive micro-batches (as ``accum_steps`` loader batches)."""
    return [shard(batch, i, k) for i in range(k)]


class NoGradGatherExchange(DistributedExchange):
    """The silent bug of a plain gather: ``all_gather`` without a gradient path to the other ranks' features."""

    def gather(self, x):
        if self.world_size == 1:
            return x
        parts: list = []
        dist.all_gather(parts, x)
        return paddle.concat(parts, axis=0)


def make_trainer(info: DistInfo, terms: tuple[str, ...] = ALL_TERMS, settings: tuple = ()) -> Trainer:
    """A trainer (fresh model, same init every time) whose loss has the active ``terms`` (and the
    other ``LossConfig`` ``settings``)."""
    weights = {t: 1.0 if t in terms else 0.0 for t in ALL_TERMS}
    loss = MultiViewLoss(LossConfig(**weights, **dict(settings)), DistributedExchange(info))
    return Trainer(make_model(), loss, None, None, None, [], None, "unused", TrainerSchema(max_steps=1), dist=info)


def run_cases(info: DistInfo) -> dict[str, tuple[dict[str, float], dict[str, np.ndarray]]]:
    """Loss terms (as the trainer reports them) and parameter gradients of every case on this
    rank's share of its batch. Gradients a case does not produce are absent."""
    trainers: dict[tuple, Trainer] = {}
    results = {}
    for case, (batch_name, local_loss, nograd, terms, accum, *extra) in CASES.items():
        key = (terms, *extra)
        if key not in trainers:  # one DataParallel wrapper per model, made once
            trainers[key] = make_trainer(info, terms, *extra)
        trainer = trainers[key]
        trainer.loss.cfg.local_loss = local_loss
        trainer.loss.exchange = NoGradGatherExchange(info) if nograd else DistributedExchange(info)
        trainer.model.clear_gradients(set_to_zero=False)
        values = trainer.train_step(micro_batches(shard(make_batch(batch_name), info.rank, info.world_size), accum))
        grads = {n: p.grad.numpy().copy() for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.model.clear_gradients(set_to_zero=False)
        results[case] = (values, grads)
    return results


def data_parallel_mean_check(info: DistInfo) -> np.ndarray:
    """The gradient ``paddle.DataParallel`` leaves on a Linear(2, 1) whose input is ``rank + 1``:
    the mean over ranks (1.5 for 2 ranks) if it averages, the sum (3.0) if it sums."""
    lin = paddle.nn.Linear(2, 1, bias_attr=False)
    dp = paddle.DataParallel(lin)
    dp(paddle.to_tensor([[info.rank + 1.0, 0.0]], dtype=lin.weight.dtype)).sum().backward()
    return lin.weight.grad.numpy().ravel()


def main(out_dir: str) -> None:
    paddle.set_device("cpu")
    paddle.set_default_dtype("float64")
    info = init_distributed()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for case, (terms, grads) in run_cases(info).items():
        arrays = {f"term/{k}": np.asarray(v) for k, v in terms.items()}
        arrays.update({f"grad/{k}": v for k, v in grads.items()})
        np.savez(out / f"rank{info.rank}_{case}.npz", **arrays)
    np.save(out / f"rank{info.rank}_dp_grad.npy", data_parallel_mean_check(info))
    print(f"rank {info.rank} of {info.world_size}: wrote {len(CASES)} cases to {out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
