"""Multi-scale (and flip) test-time augmentation: scaled inputs, the 384x384 sum, the single-scale path, run_eval."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import run_eval
from roadseg_utils import inference
from roadseg_utils.labels import idd_label_set
from roadseg_utils.modeling import load_image_processor, load_model
from roadseg_utils.synthetic import generate_synthetic_idd

ROOT = Path(__file__).resolve().parents[1]
LEVEL3 = idd_label_set(3)
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def sharp_model(sharpened_tiny_model):
    """The sharpened tiny model of tests/conftest.py, in eval mode."""
    return sharpened_tiny_model.eval()


def padded_batch(sizes: list[tuple[int, int]], targets: list[tuple[int, int]], seed: int = 0) -> dict:
    """Images of ``sizes`` padded at the bottom and right (values 0, mask 0), as the collator pads them."""
    generator = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for index, (h, w) in enumerate(sizes):
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[index, :h, :w] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask,
            "original_segmentation_maps": [np.zeros(size, dtype=np.uint8) for size in targets]}


def test_scale_one_alone_is_the_single_scale_path_bitwise(sharp_model):
    batch = padded_batch([(64, 96), (32, 64)], [(90, 135), (45, 90)])
    with torch.inference_mode():
        for working_size in (None, 30):
            single = inference.predict_batch(sharp_model, batch, Accelerator(), working_size=working_size)
            scaled = inference.predict_batch(sharp_model, batch, Accelerator(), working_size=working_size,
                                             scales=[1.0])
            assert all(len(m.unique()) > 1 for m in single)  # maps that vary, so equality means something
            for a, b in zip(single, scaled, strict=True):
                assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)


def test_flip_at_scale_one_gives_the_flip_path(sharp_model):
    batch = padded_batch([(64, 96)], [(90, 135)], seed=1)
    with torch.inference_mode():
        flip = inference.predict_batch(sharp_model, batch, Accelerator(), "flip")[0]
        scaled = inference.predict_batch(sharp_model, batch, Accelerator(), "flip", scales=(1.0,))[0]
    # The mirror runs in its own forward pass here and the sum is halved (exact): the argmax agrees to float noise.
    assert (flip != scaled).float().mean() < 1e-3


def test_summing_at_384_equals_resizing_each_view_then_summing(sharp_model):
    """The final resize is linear: one resize of the views' mean is the mean of resizing each, to float rounding."""
    batch = padded_batch([(64, 96)], [(90, 135)], seed=2)
    valid_sizes = inference.valid_sizes_of(batch["pixel_mask"])
    views = []
    with torch.inference_mode():
        for scale in PAPER_SCALES:
            values, mask, sizes = inference.scale_batch(batch["pixel_values"], valid_sizes, scale)
            outputs = sharp_model(pixel_values=values, pixel_mask=mask)
            views.append(inference.semantic_scores_for_image(
                outputs.class_queries_logits[0], outputs.masks_queries_logits[0], sizes[0], tuple(values.shape[-2:])
            ))
        target = (270, 405)

        def resize(scores: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(scores[None], size=target, mode="bilinear", align_corners=False)[0]

        once = resize(torch.stack(views).mean(dim=0))
        each = torch.stack([resize(view) for view in views]).mean(dim=0)
        assert (once - each).abs().max() < 1e-5
        # And the label map multi-scale TTA returns is the argmax of the resize-each average, bar near-ties.
        (label_map,) = inference.multiscale_label_maps(sharp_model, batch["pixel_values"], valid_sizes, [target],
                                                       PAPER_SCALES, tile=False)
    top2 = each.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5
    assert len(label_map.unique()) > 1
    assert torch.equal(label_map[clear].long(), each.argmax(dim=0)[clear])


class LocalModel(torch.nn.Module):
    """A stand-in whose mask logits at each pixel depend on that 4x4 block of the input alone (three queries)."""

    def __init__(self, num_labels: int = 5) -> None:
        super().__init__()
        self.class_logits = torch.randn(3, num_labels + 1, generator=torch.Generator().manual_seed(3))
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> SimpleNamespace:
        self.inputs.append(tuple(pixel_values.shape))
        masks = torch.nn.functional.avg_pool2d(pixel_values, 4) * 3
        return SimpleNamespace(class_queries_logits=self.class_logits.expand(len(pixel_values), -1, -1),
                               masks_queries_logits=masks)


@pytest.mark.parametrize("width,strip", [(96, 32), (160, 64), (1184, 512), (3360, 1056), (64, 64), (64, 128)])
def test_strips_are_the_fewest_that_cover_the_width_on_the_32_grid(width, strip):
    starts = inference.strip_starts(width, strip)
    assert starts[0] == 0 and starts[-1] + min(strip, width) == width
    assert len(starts) == max(1, -(-width // strip))  # the fewest strips that can cover the width
    assert all(start % 32 == 0 for start in starts) and starts == sorted(set(starts))
    assert all(b - a <= strip for a, b in zip(starts, starts[1:], strict=False))  # no gap between strips
    assert inference.strip_width_for(96, 3360, 96 * 1000) == 992 and inference.strip_width_for(96, 64, 10**6) == 64


def test_stitched_strips_equal_the_whole_view_for_a_local_model():
    """Seams and overlaps are placed exactly: a model without context gives the same scores in strips as whole."""
    model = LocalModel()
    pixel_values = torch.randn(2, 3, 64, 224, generator=torch.Generator().manual_seed(4))
    pixel_mask = torch.ones(2, 64, 224, dtype=torch.uint8)
    with torch.inference_mode():
        whole = inference.class_scores_in_strips(model, pixel_values, pixel_mask, strip_width=224)
        for strip_width in (32, 64, 96, 160):
            model.inputs.clear()
            strips = inference.class_scores_in_strips(model, pixel_values, pixel_mask, strip_width)
            assert all(shape[-1] == strip_width for shape in model.inputs) and len(model.inputs) > 1
            assert strips.shape == whole.shape == (2, 5, 16, 56)
            assert (strips - whole).abs().max() < 1e-6


def test_tiled_multi_scale_never_runs_a_pass_larger_than_single_scale():
    model = LocalModel()
    batch = padded_batch([(64, 96), (32, 64)], [(90, 135), (45, 90)], seed=6)
    valid_sizes = inference.valid_sizes_of(batch["pixel_mask"])
    single_pixels = 64 * 96
    with torch.inference_mode():
        tiled = inference.multiscale_label_maps(model, batch["pixel_values"], valid_sizes, [(90, 135), (45, 90)],
                                                PAPER_SCALES, flip=True)
        tiled_inputs, model.inputs = model.inputs, []
        whole = inference.multiscale_label_maps(model, batch["pixel_values"], valid_sizes, [(90, 135), (45, 90)],
                                                PAPER_SCALES, flip=True, tile=False)
    assert max(h * w for *_, h, w in tiled_inputs) <= single_pixels
    assert max(h * w for *_, h, w in model.inputs) > 2.5 * single_pixels  # scale 1.75, whole
    assert len(tiled_inputs) > len(model.inputs) == 12
    # Without context, strips change only where upstream's rule resizes before the sigmoid and the stitch after it.
    for a, b in zip(tiled, whole, strict=True):
        assert a.shape == b.shape and (a == b).float().mean() > 0.9


def test_scaled_inputs_round_up_to_32_and_keep_each_image_apart():
    assert inference.scaled_side(512, 0.75) == 384 and inference.scaled_side(928, 1.25) == 1184
    assert inference.scaled_side(320, 1.1) == 352  # 352.00000000000006 in floating point
    assert inference.scaled_side(90, 1.0) == 90 and inference.scaled_side(40, 0.1) == 32
    batch = padded_batch([(64, 96), (32, 64)], [(1, 1), (1, 1)])
    values, mask, sizes = inference.scale_batch(batch["pixel_values"], [(64, 96), (32, 64)], 1.5)
    assert sizes == [(96, 160), (64, 96)] and values.shape == (2, 3, 96, 160)
    assert torch.equal(mask, (values != 0).any(dim=1).to(mask.dtype))  # 1 exactly on each image's scaled part
    alone, _, _ = inference.scale_batch(batch["pixel_values"][1:, :, :32, :64], [(32, 64)], 1.5)
    assert torch.equal(values[1:, :, :64, :96], alone)  # the padded image scales as it would alone
    same, same_mask, same_sizes = inference.scale_batch(batch["pixel_values"], [(64, 96), (32, 64)], 1.0)
    assert same is batch["pixel_values"] and torch.equal(same_mask.long(), batch["pixel_mask"])


@pytest.mark.parametrize("text", ["0.5,,1", "0.5,-1", "0,1", "1,inf", "nan", "a,b", "1,1", "", ",".join(["1.1"] * 9)])
def test_bad_scales_are_refused(text):
    with pytest.raises(ValueError):
        inference.parse_tta_scales(text)


def test_good_scales_parse():
    assert inference.parse_tta_scales("0.5, 0.75,1,1.25,1.5,1.75") == PAPER_SCALES
    assert inference.parse_tta_scales([1, 1.5]) == (1.0, 1.5)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """Four 72x128 scenes, all in the test split, and a saved sharpened tiny model with a small processor size."""
    root = tmp_path_factory.mktemp("tta")
    generate_synthetic_idd(root / "data", 4, 1, (72, 128), seed=5, workers=1)
    torch.manual_seed(0)
    model = load_model("tiny", LEVEL3)
    with torch.no_grad():
        model.class_predictor.weight.mul_(40)
    model.save_pretrained(root / "model")
    load_image_processor("tiny", shortest_edge=64).save_pretrained(root / "model")
    return root


def _eval_arguments(root: Path, output: str, **extra) -> Path:
    arguments = {
        "model_name_or_path": str(root / "model"), "data_dir": str(root / "data"), "output_dir": str(root / output),
        "train_fraction": 0.0, "val_fraction": 0.0, "test_fraction": 1.0, "num_overlays": 0,
        "dataloader_num_workers": 0, "batch_size": 2, **extra,
    }
    path = root / f"{output}.json"
    path.write_text(json.dumps(arguments))
    return path


def test_run_eval_multi_scale_flip_records_the_scales(tiny_tree):
    results = run_eval.main([str(_eval_arguments(tiny_tree, "ms", tta="flip", tta_scales="0.5,1.0,1.5"))])
    assert results["tta"] == "flip" and results["tta_scales"] == [0.5, 1.0, 1.5] and results["num_images"] == 4
    written = json.loads((tiny_tree / "ms" / "eval_results.json").read_text())
    assert written["tta_scales"] == [0.5, 1.0, 1.5]
    single = run_eval.main([str(_eval_arguments(tiny_tree, "one", tta_scales="1.0"))])
    plain = run_eval.main([str(_eval_arguments(tiny_tree, "plain"))])
    assert plain["tta_scales"] is None and single["tta_scales"] == [1.0]
    assert single["mean_iou"] == plain["mean_iou"] and single["per_class"] == plain["per_class"]
    assert results["tta_tiling"] is True and single["tta_tiling"] is True and plain["tta_tiling"] is None
    whole = run_eval.main([str(_eval_arguments(tiny_tree, "whole", tta="flip", tta_scales="0.5,1.0,1.5",
                                               tta_tiling=False))])
    assert whole["tta_tiling"] is False and whole["num_images"] == 4


@pytest.mark.parametrize("value", ["0.5,-1", "1,x", ",".join(["1.1"] * 9)])
def test_bad_tta_scales_is_one_line_naming_the_option(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as info:
        run_eval.main(["--model_name_or_path", "tiny", "--data_dir", str(tmp_path), "--output_dir",
                       str(tmp_path / "ev"), "--tta_scales", value])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_eval.py: error: --tta_scales: ")
    assert not (tmp_path / "ev").exists()
