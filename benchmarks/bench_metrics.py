"""Side-by-side timing of StreamingConfusionMatrix against torchmetrics and a per-image numpy histogram.

Run from the repository root: ``python -m benchmarks.bench_metrics [--num_maps 100 --repeats 3]``.
Every method sees the same maps, generated once up front (not timed), and is timed the same way in this one process
(a warm-up on three maps, then the median of ``--repeats`` passes over all of them), so the ratios compare like with
like; absolute times move with the load of the machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.timing import time_passes
from roadseg_utils.confusion import NUM_CODES, StreamingConfusionMatrix
from roadseg_utils.labels import IGNORE_INDEX
from roadseg_utils.metrics import per_category_iou

AGREEMENT = 0.7
IGNORE_SHARE = 0.05
WARMUP_MAPS = 3


def make_maps(
    num_maps: int, height: int, width: int, num_classes: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 (prediction, reference) maps: uniform classes, predictions agreeing 70% of the time, 5% ignore."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(num_maps):
        reference = rng.integers(0, num_classes, size=(height, width), dtype=np.uint8)
        prediction = rng.integers(0, num_classes, size=(height, width), dtype=np.uint8)
        agree = rng.random((height, width), dtype=np.float32) < AGREEMENT
        prediction[agree] = reference[agree]
        reference[rng.random((height, width), dtype=np.float32) < IGNORE_SHARE] = IGNORE_INDEX
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def histogram_iou(predictions: list[np.ndarray], references: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-class IoU the way evaluate's Hub ``mean_iou`` does it: three np.histogram calls per image."""
    area_intersect = np.zeros(num_classes, dtype=np.int64)
    area_pred = np.zeros(num_classes, dtype=np.int64)
    area_ref = np.zeros(num_classes, dtype=np.int64)
    for prediction, reference in zip(predictions, references, strict=True):
        keep = reference != IGNORE_INDEX
        kept_pred, kept_ref = prediction[keep], reference[keep]
        bins = {"bins": num_classes, "range": (0, num_classes)}
        area_intersect += np.histogram(kept_pred[kept_pred == kept_ref], **bins)[0]
        area_pred += np.histogram(kept_pred, **bins)[0]
        area_ref += np.histogram(kept_ref, **bins)[0]
    union = area_pred + area_ref - area_intersect
    return np.where(union > 0, area_intersect / np.maximum(union, 1), np.nan)


def bench_metrics(
    num_maps: int = 100,
    height: int = 1080,
    width: int = 1920,
    num_classes: int = 26,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Time every method on the same maps; assert they agree with ours."""
    from torchmetrics.classification import MulticlassJaccardIndex

    predictions, references = make_maps(num_maps, height, width, num_classes, seed)
    pred_tensors = [torch.from_numpy(p) for p in predictions]
    ref_tensors = [torch.from_numpy(r) for r in references]
    argmax_like = [p.long() for p in pred_tensors]

    def ours(maps: list[Any], refs: list[Any]) -> Callable[[int], StreamingConfusionMatrix]:
        def count(n: int) -> StreamingConfusionMatrix:
            counts = StreamingConfusionMatrix(num_classes)
            for prediction, reference in zip(maps[:n], refs[:n], strict=True):
                counts.update(prediction, reference)
            return counts

        return count

    def torchmetrics_jaccard(n: int) -> Any:
        metric = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE_INDEX, average=None)
        for prediction, reference in zip(pred_tensors[:n], ref_tensors[:n], strict=True):
            metric.update(prediction, reference)
        return metric

    def torch_bincount(n: int) -> torch.Tensor:
        joint = torch.zeros(NUM_CODES * NUM_CODES, dtype=torch.long)
        for prediction, reference in zip(pred_tensors[:n], ref_tensors[:n], strict=True):
            codes = (reference.reshape(-1).long() << 8) | prediction.reshape(-1).long()
            joint += torch.bincount(codes, minlength=NUM_CODES * NUM_CODES)
        return joint.reshape(NUM_CODES, NUM_CODES)[:num_classes, :num_classes]

    def timed(fn: Callable[[int], Any]) -> tuple[float, Any]:
        timing = time_passes(lambda: fn(num_maps), repeats, warmup=lambda: fn(min(WARMUP_MAPS, num_maps)))
        return timing.median, timing.result

    ours_s, counts = timed(ours(predictions, references))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        ours_one_thread_s, counts_one_thread = timed(ours(predictions, references))
    finally:
        cv2.setNumThreads(threads)
    ours_int64_s, counts_int64 = timed(ours(argmax_like, ref_tensors))
    torchmetrics_s, jaccard = timed(torchmetrics_jaccard)
    torchmetrics_iou = jaccard.compute().double().numpy()
    histogram_s, histogram_ious = timed(lambda n: histogram_iou(predictions[:n], references[:n], num_classes))
    torch_bincount_s, torch_joint = timed(torch_bincount)

    our_iou = counts.compute()["per_category_iou"]
    assert np.array_equal(counts.matrix, jaccard.confmat.numpy()), "confusion matrix differs from torchmetrics'"
    assert np.array_equal(counts_int64.matrix, counts.matrix), "int64 tensor inputs give another matrix"
    assert np.array_equal(counts_one_thread.matrix, counts.matrix), "one thread gives another matrix"
    assert np.array_equal(torch_joint.numpy(), counts.matrix), "torch.bincount gives another matrix"
    torchmetrics_diff = float(np.nanmax(np.abs(our_iou - torchmetrics_iou)))
    histogram_diff = float(np.nanmax(np.abs(our_iou - histogram_ious)))
    # torchmetrics reduces in float32, hence differences around 1e-8; the counts themselves are identical.
    assert torchmetrics_diff <= 1e-6, f"IoU differs from torchmetrics' by {torchmetrics_diff}"
    assert histogram_diff <= 1e-12, f"IoU differs from the histogram method's by {histogram_diff}"
    assert np.array_equal(per_category_iou(counts.matrix), our_iou)
    return {
        "num_maps": num_maps,
        "repeats": repeats,
        "height": height,
        "width": width,
        "torch_threads": torch.get_num_threads(),
        "opencv_threads": threads,
        "times": {
            "StreamingConfusionMatrix (uint8 numpy maps)": ours_s,
            "StreamingConfusionMatrix, one OpenCV thread": ours_one_thread_s,
            "StreamingConfusionMatrix (int64 torch predictions)": ours_int64_s,
            "torchmetrics MulticlassJaccardIndex": torchmetrics_s,
            "per-image np.histogram (evaluate mean_iou)": histogram_s,
            "torch.bincount of the same combined code": torch_bincount_s,
        },
        "speedup": torchmetrics_s / ours_s,
        "torchmetrics_max_abs_diff": torchmetrics_diff,
        "histogram_max_abs_diff": histogram_diff,
        "mean_iou": counts.compute()["mean_iou"],
    }


def main() -> None:
    """Print the timings and ratios of one benchmark run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_maps", type=int, default=100)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--num_classes", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = bench_metrics(**vars(args))
    ours_s = result["times"]["StreamingConfusionMatrix (uint8 numpy maps)"]
    torchmetrics_s = result["times"]["torchmetrics MulticlassJaccardIndex"]
    print(
        f"{result['num_maps']} maps of {result['height']}x{result['width']}, {args.num_classes} classes + "
        f"{IGNORE_SHARE:.0%} ignore, torch threads {result['torch_threads']}, OpenCV threads "
        f"{result['opencv_threads']}, median of {result['repeats']} passes each after a warm-up"
    )
    print(f"{'method':<52}{'total (s)':>11}{'ms/map':>10}{'vs torchmetrics':>17}")
    for name, seconds in result["times"].items():
        print(
            f"{name:<52}{seconds:>11.2f}{seconds * 1000 / result['num_maps']:>10.1f}{torchmetrics_s / seconds:>16.1f}x"
        )
    print(f"speed-up over torchmetrics: {torchmetrics_s / ours_s:.1f}x (target >= 20x)")
    print(
        "confusion matrix identical to torchmetrics': yes; max |IoU diff| vs torchmetrics "
        f"{result['torchmetrics_max_abs_diff']:.2e}, vs np.histogram {result['histogram_max_abs_diff']:.2e}; "
        f"mIoU {result['mean_iou']:.4f}"
    )


if __name__ == "__main__":
    main()
