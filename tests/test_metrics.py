"""Tests of the streaming confusion-matrix metric against torchmetrics, hand computations and itself."""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import pytest
import torch

from roadseg_utils import confusion
from roadseg_utils.confusion import StreamingConfusionMatrix, all_reduce_confusion
from roadseg_utils.labels import IGNORE_INDEX, idd_label_set
from roadseg_utils.metrics import coarsen_confusion, compute_segmentation_metrics

SIZES = [(17, 23), (5, 40), (32, 9), (1, 1), (24, 24), (11, 3)]


def make_maps(
    seed: int,
    sizes: list[tuple[int, int]],
    ref_classes: list[int],
    pred_classes: list[int],
    ignore_share: float = 0.15,
    agreement: float = 0.6,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random (prediction, reference) uint8 maps drawn from the given classes, with some ignore pixels."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for height, width in sizes:
        reference = rng.choice(ref_classes, size=(height, width)).astype(np.uint8)
        prediction = rng.choice(pred_classes, size=(height, width)).astype(np.uint8)
        agree = (rng.random((height, width)) < agreement) & np.isin(reference, pred_classes)
        prediction[agree] = reference[agree]
        reference[rng.random((height, width)) < ignore_share] = IGNORE_INDEX
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def brute_force_confusion(predictions, references, num_labels: int) -> np.ndarray:
    """Reference confusion matrix built with np.add.at, independent of the bincount code under test."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references, strict=True):
        keep = reference != IGNORE_INDEX
        np.add.at(confusion, (reference[keep].astype(int), prediction[keep].astype(int)), 1)
    return confusion


@pytest.fixture(scope="module")
def varied_maps() -> tuple[list[np.ndarray], list[np.ndarray]]:
    # 8 classes: 6 never occurs, 5 is only ever predicted, 7 only ever in the references.
    return make_maps(0, SIZES, ref_classes=[0, 1, 2, 3, 4, 7], pred_classes=[0, 1, 2, 3, 4, 5])


def test_matches_torchmetrics_jaccard(varied_maps):
    from torchmetrics.classification import MulticlassJaccardIndex

    predictions, references = varied_maps
    num_labels = 8
    per_class = MulticlassJaccardIndex(num_classes=num_labels, ignore_index=IGNORE_INDEX, average=None)
    macro = MulticlassJaccardIndex(num_classes=num_labels, ignore_index=IGNORE_INDEX, average="macro")
    ours = StreamingConfusionMatrix(num_labels)
    for prediction, reference in zip(predictions, references, strict=True):
        pred_t, ref_t = torch.from_numpy(prediction).long(), torch.from_numpy(reference).long()
        per_class.update(pred_t, ref_t)
        macro.update(pred_t, ref_t)
        ours.update(prediction, reference)
    theirs = per_class.compute().double().numpy()
    results = ours.compute()
    iou = results["per_category_iou"]

    occurring = np.array([c in (0, 1, 2, 3, 4, 5, 7) for c in range(num_labels)])
    np.testing.assert_array_equal(~np.isnan(iou), occurring)
    np.testing.assert_allclose(iou[occurring], theirs[occurring], rtol=0, atol=1e-6)
    assert iou[5] == 0.0 and iou[7] == 0.0
    # torchmetrics (zero_division=0) reports 0 for class 6, which is in neither references nor predictions;
    # we report NaN and leave it out of the mean, so the mean is taken over the occurring classes only.
    assert theirs[6] == 0.0 and np.isnan(iou[6])
    assert results["mean_iou"] == pytest.approx(theirs[occurring].mean(), abs=1e-6)
    # Its "macro" average gives zero weight to classes absent from both, i.e. the same mean.
    assert results["mean_iou"] == pytest.approx(macro.compute().item(), abs=1e-6)
    np.testing.assert_array_equal(ours.matrix, per_class.confmat.numpy())


def test_hand_computed_three_classes():
    # Pixel pairs (reference, prediction): (0,0) (0,1) (1,1) / (1,2) (2,2) (255,0); the last one is ignored.
    #   C = [[1, 1, 0],      rows (reference totals)  = [2, 2, 1], total 5
    #        [0, 1, 1],      cols (prediction totals) = [1, 2, 2]
    #        [0, 0, 1]]      diagonal                 = [1, 1, 1]
    # IoU = 1/(2+1-1), 1/(2+2-1), 1/(1+2-1) = 1/2, 1/3, 1/2 -> mean 4/9
    # accuracy = 1/2, 1/2, 1/1 -> mean 2/3; pixel accuracy 3/5
    # frequency-weighted IoU = 2/5 * 1/2 + 2/5 * 1/3 + 1/5 * 1/2 = 13/30
    # Groups {0, 1} -> 0 and {2} -> 1: coarse C = [[3, 1], [0, 1]] -> IoU 3/(4+3-3), 1/(1+2-1) = 3/4, 1/2 -> 5/8
    references = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    predictions = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
    counts = StreamingConfusionMatrix(3).update(predictions, references)
    np.testing.assert_array_equal(counts.matrix, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert counts.matrix.dtype == np.int64

    results = counts.compute(id2label={0: "road", 1: "curb", 2: "sky"}, coarser={"group": {0: 0, 1: 0, 2: 1}})
    np.testing.assert_allclose(results["per_category_iou"], [1 / 2, 1 / 3, 1 / 2], rtol=1e-15)
    np.testing.assert_allclose(results["per_category_accuracy"], [1 / 2, 1 / 2, 1.0], rtol=1e-15)
    assert results["mean_iou"] == pytest.approx(4 / 9, rel=1e-14)
    assert results["mean_accuracy"] == pytest.approx(2 / 3, rel=1e-14)
    assert results["overall_accuracy"] == pytest.approx(3 / 5, rel=1e-14)
    assert results["frequency_weighted_iou"] == pytest.approx(13 / 30, rel=1e-14)
    assert results["iou_curb"] == pytest.approx(1 / 3, rel=1e-15)
    assert results["accuracy_sky"] == 1.0
    np.testing.assert_array_equal(coarsen_confusion(counts.matrix, {0: 0, 1: 0, 2: 1}), [[3, 1], [0, 1]])
    np.testing.assert_allclose(results["per_category_iou_group"], [3 / 4, 1 / 2], rtol=1e-15)
    assert results["mean_iou_group"] == pytest.approx(5 / 8, rel=1e-14)


def test_streaming_equals_one_shot_and_brute_force(varied_maps):
    predictions, references = varied_maps
    expected = brute_force_confusion(predictions, references, 8)
    one_shot = StreamingConfusionMatrix(8).update(predictions, references)
    np.testing.assert_array_equal(one_shot.matrix, expected)

    streamed = StreamingConfusionMatrix(8)
    for start, stop in [(0, 1), (1, 4), (4, len(predictions))]:
        streamed.update(predictions[start:stop], references[start:stop])
    np.testing.assert_array_equal(streamed.matrix, expected)
    assert streamed.num_maps == one_shot.num_maps == len(predictions)

    stacked_pred, stacked_ref = make_maps(1, [(9, 14)] * 4, [0, 1, 2], [0, 1, 2])
    batch = StreamingConfusionMatrix(3).update(np.stack(stacked_pred), np.stack(stacked_ref))
    np.testing.assert_array_equal(batch.matrix, brute_force_confusion(stacked_pred, stacked_ref, 3))
    assert batch.num_maps == 4


def test_torch_numpy_and_list_inputs_agree(varied_maps, monkeypatch):
    predictions, references = varied_maps
    from_numpy = StreamingConfusionMatrix(8).update(predictions, references).matrix
    as_int64_tensors = ([torch.from_numpy(p).long() for p in predictions], [torch.from_numpy(r) for r in references])
    from_tensors = StreamingConfusionMatrix(8).update(*as_int64_tensors).matrix
    from_lists = StreamingConfusionMatrix(8).update([p.tolist() for p in predictions], [r.tolist() for r in references])
    np.testing.assert_array_equal(from_tensors, from_numpy)
    np.testing.assert_array_equal(from_lists.matrix, from_numpy)

    # Route CPU tensors through the accelerator path (torch.bincount on the tensor's device) to test it here.
    monkeypatch.setattr(
        confusion, "_accelerator_device", lambda p, r: p.device if isinstance(p, torch.Tensor) else None
    )
    on_device = StreamingConfusionMatrix(8).update(*as_int64_tensors)
    assert isinstance(on_device.matrix_tensor, torch.Tensor) and on_device.matrix_tensor.dtype == torch.long
    np.testing.assert_array_equal(on_device.matrix, from_numpy)
    bad = [p.clone() for p in as_int64_tensors[0]]
    bad[2][0, 0] = 8
    with pytest.raises(ValueError, match=r"predictions hold values \[8\]"):
        on_device.update(bad, as_int64_tensors[1])
    bad[2][0, 0] = -3
    with pytest.raises(ValueError, match="outside"):
        on_device.update(bad, as_int64_tensors[1])
    bad[2][0, 0] = 0
    bad[2][as_int64_tensors[1][2] == IGNORE_INDEX] = 9
    with pytest.raises(ValueError, match=r"predictions hold values \[9\]"):
        on_device.update(bad, as_int64_tensors[1])
    np.testing.assert_array_equal(on_device.matrix, from_numpy)


def test_chunked_threaded_counting_equals_brute_force(monkeypatch):
    predictions, references = make_maps(3, [(37, 53)] * 3, list(range(6)), list(range(6)))
    expected = brute_force_confusion(predictions, references, 6)
    # Tiny chunks and four threads: the map of 3 x 37 x 53 pixels is split unevenly over the pool.
    monkeypatch.setattr(confusion, "MIN_THREADED_CHUNK_PIXELS", 100)
    monkeypatch.setattr(confusion, "MAX_CHUNK_PIXELS", 1000)
    monkeypatch.setattr(confusion.cv2, "getNumThreads", lambda: 4)
    batch = StreamingConfusionMatrix(6).update(np.stack(predictions), np.stack(references))
    np.testing.assert_array_equal(batch.matrix, expected)
    monkeypatch.setattr(confusion.cv2, "getNumThreads", lambda: 1)
    np.testing.assert_array_equal(StreamingConfusionMatrix(6).update(predictions, references).matrix, expected)


def test_counts_stay_exact_beyond_float32_integers(monkeypatch):
    # OpenCV histograms count in float32, which cannot hold 2**24 + 1; the chunking must keep every count exact,
    # also in one thread, where no split comes from the thread count.
    monkeypatch.setattr(confusion.cv2, "getNumThreads", lambda: 1)
    size = (1 << 24) + 2
    references = np.zeros((1, size), dtype=np.uint8)
    predictions = np.zeros((1, size), dtype=np.uint8)
    predictions[0, -1] = 1
    counts = StreamingConfusionMatrix(2).update(predictions, references).matrix
    assert counts.tolist() == [[size - 1, 1], [0, 0]]


def _count_in_child(queue) -> None:
    predictions, references = make_maps(4, [(700, 800)], [0, 1, 2], [0, 1, 2])
    queue.put(StreamingConfusionMatrix(3).update(predictions, references).matrix.tolist())


def test_counting_works_in_a_forked_child_after_the_parent_used_its_threads():
    import multiprocessing

    predictions, references = make_maps(4, [(700, 800)], [0, 1, 2], [0, 1, 2])
    expected = StreamingConfusionMatrix(3).update(predictions, references).matrix.tolist()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_count_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("counting in a forked child hung (a thread pool inherited through fork)")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected


@pytest.fixture(scope="module")
def idd_maps() -> tuple[list[np.ndarray], list[np.ndarray]]:
    classes = list(range(26))
    return make_maps(2, SIZES, ref_classes=classes[:-3], pred_classes=classes[2:])


def test_coarser_levels_equal_mapping_the_maps_first(idd_maps):
    predictions, references = idd_maps
    label_set = idd_label_set(3)
    results = StreamingConfusionMatrix(26).update(predictions, references).compute(coarser=label_set.coarser)
    for level in ("level2", "level1"):
        lookup = label_set.lookup_to(level)
        num_coarse = len(label_set.coarser_names[level])
        mapped = StreamingConfusionMatrix(num_coarse).update(
            [lookup[p] for p in predictions], [lookup[r] for r in references]
        )
        expected = mapped.compute()
        np.testing.assert_array_equal(results[f"per_category_iou_{level}"], expected["per_category_iou"])
        assert results[f"mean_iou_{level}"] == expected["mean_iou"]
    with pytest.raises(ValueError, match="no group for fine classes"):
        coarsen_confusion(np.eye(3, dtype=np.int64), {0: 0, 1: 0})


def test_nan_semantics():
    # Class 2 never occurs; class 3 is predicted but never a reference; class 1 is a reference never predicted.
    references = np.array([[0, 0, 1, 255]], dtype=np.uint8)
    predictions = np.array([[0, 3, 0, 2]], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = StreamingConfusionMatrix(4).update(predictions, references).compute()
        empty = compute_segmentation_metrics(np.zeros((4, 4), dtype=np.int64))
    iou, accuracy = results["per_category_iou"], results["per_category_accuracy"]
    # Class 0: C_00 = 1, row 2, col 2 -> 1/3. Class 1: 0/(1 + 0) = 0. Class 3: 0/(0 + 1) = 0.
    np.testing.assert_array_equal(np.isnan(iou), [False, False, True, False])
    np.testing.assert_allclose(iou[[0, 1, 3]], [1 / 3, 0.0, 0.0])
    np.testing.assert_array_equal(np.isnan(accuracy), [False, False, True, True])
    assert results["mean_iou"] == pytest.approx(1 / 9)
    assert results["mean_accuracy"] == pytest.approx(1 / 4)
    assert results["frequency_weighted_iou"] == pytest.approx(2 / 3 * 1 / 3)
    assert all(np.isnan(empty[key]) for key in ("mean_iou", "mean_accuracy", "overall_accuracy"))
    assert np.isnan(empty["frequency_weighted_iou"]) and np.isnan(empty["per_category_iou"]).all()


def test_bad_values_raise_and_leave_the_matrix_unchanged():
    predictions, references = make_maps(4, [(8, 8), (4, 5)], [0, 1, 2], [0, 1, 2])
    counts = StreamingConfusionMatrix(3).update(predictions, references)
    before = counts.matrix

    too_big = [predictions[0], np.where(predictions[1] == 2, 3, predictions[1]).astype(np.uint8)]
    with pytest.raises(ValueError, match=r"predictions hold values \[3\] outside \[0, 3\)"):
        counts.update(too_big, references)
    stray_ref = [references[0], np.where(references[1] == 1, 200, references[1]).astype(np.uint8)]
    with pytest.raises(ValueError, match=r"references hold values \[200\].*not ignore_index=255"):
        counts.update(predictions, stray_ref)
    ignored_everywhere = np.full((2, 2), IGNORE_INDEX, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"predictions hold values \[255\]"):
        counts.update(ignored_everywhere, ignored_everywhere)
    with pytest.raises(ValueError, match="outside"):
        counts.update(predictions[0].astype(np.int64) - 1, references[0])
    with pytest.raises(ValueError, match="integer class ids"):
        counts.update(predictions[0].astype(np.float32), references[0])
    with pytest.raises(ValueError, match=r"predictions\[1\] has shape \(4, 5\) and references\[1\] has \(5, 4\)"):
        counts.update(predictions, [references[0], references[1].T])
    with pytest.raises(ValueError, match="2 predicted maps but 1 reference maps"):
        counts.update(predictions, references[:1])
    np.testing.assert_array_equal(counts.matrix, before)

    with pytest.raises(ValueError, match="ignore_index must be None or an integer in"):
        StreamingConfusionMatrix(3, ignore_index=1)
    with pytest.raises(ValueError, match="num_labels must be"):
        StreamingConfusionMatrix(0)
    with pytest.raises(ValueError, match="square"):
        compute_segmentation_metrics(np.zeros((2, 3), dtype=np.int64))


def test_merge_add_matrix_and_reset():
    predictions, references = make_maps(5, SIZES, [0, 1, 2, 3], [0, 1, 2, 3])
    whole = StreamingConfusionMatrix(4).update(predictions, references)
    first = StreamingConfusionMatrix(4).update(predictions[:2], references[:2])
    second = StreamingConfusionMatrix(4).update(predictions[2:], references[2:])
    np.testing.assert_array_equal(first.merge(second).matrix, whole.matrix)
    assert first.num_maps == whole.num_maps
    np.testing.assert_array_equal(StreamingConfusionMatrix(4).add_matrix(whole.matrix).matrix, whole.matrix)
    with pytest.raises(ValueError, match=r"expected a \(4, 4\) confusion matrix"):
        whole.add_matrix(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="negative"):
        whole.add_matrix(-np.eye(4, dtype=np.int64))
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(StreamingConfusionMatrix(5))
    assert whole.reset().matrix.sum() == 0 and whole.num_maps == 0


class _TwoRankAccelerator:
    """Stands in for an accelerate.Accelerator on two ranks whose other rank holds ``other``."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: torch.Tensor):
        self.other = other

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        return tensor + self.other


def _all_reduce_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        local = np.full((3, 3), rank + 1, dtype=np.int64)
        local[rank, rank] += 10
        summed = all_reduce_confusion(local)
        np.save(os.path.join(result_dir, f"rank{rank}.npy"), summed)
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_confusion_sums_over_ranks(tmp_path):
    local = np.arange(9, dtype=np.int64).reshape(3, 3)
    np.testing.assert_array_equal(all_reduce_confusion(local), local)
    reduced = all_reduce_confusion(local, _TwoRankAccelerator(torch.ones(3, 3, dtype=torch.long)))
    assert isinstance(reduced, np.ndarray)
    np.testing.assert_array_equal(reduced, local + 1)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Forked workers skip re-importing torch, which spawned ones would pay for (seconds on a 2-core machine).
    torch.multiprocessing.start_processes(
        _all_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    # Rank r holds r + 1 everywhere plus 10 on (r, r): the sum is 3 everywhere plus 10 on (0, 0) and (1, 1).
    expected = np.full((3, 3), 3, dtype=np.int64) + np.diag([10, 10, 0])
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), expected)


def test_constant_prediction_baseline_is_the_best_single_class_miou():
    from roadseg_utils.metrics import constant_prediction_mean_iou

    rng = np.random.default_rng(5)
    reference = rng.choice([0, 1, 2, 255], size=(40, 50), p=[0.5, 0.3, 0.1, 0.1])
    best = 0.0
    for constant in range(4):
        matrix = StreamingConfusionMatrix(4)
        matrix.update(np.full_like(reference, constant), reference)
        best = max(best, compute_segmentation_metrics(matrix.matrix)["mean_iou"])
    matrix = StreamingConfusionMatrix(4)
    matrix.update(reference.clip(0, 3) % 255, reference)
    assert constant_prediction_mean_iou(matrix.matrix) == pytest.approx(best, abs=1e-12)
