"""Loading, building, head resizing and freezing of Mask2Former, and its outputs turned into label maps."""

from __future__ import annotations

import pytest
import torch
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from roadseg_utils import modeling
from roadseg_utils.freezing import freeze
from roadseg_utils.labels import idd_label_set, load_id2label_file
from roadseg_utils.modeling import ModelLoadError, load_image_processor, load_model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = load_model("tiny", idd_label_set(3))
    folder = tmp_path_factory.mktemp("tiny26")
    model.save_pretrained(folder)
    load_image_processor("tiny").save_pretrained(folder)
    return folder, model


def test_tiny_model_is_small_swin_with_label_set_head():
    label_set = idd_label_set(3)
    model = load_model("tiny", label_set)
    assert isinstance(model.config.backbone_config, SwinConfig)
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    assert model.class_predictor.out_features == label_set.num_labels + 1  # + "no object"
    assert model.config.id2label == label_set.id2label


def test_head_resized_to_other_label_set_with_warning(saved_tiny, tmp_path):
    folder, original = saved_tiny
    custom = tmp_path / "labels.json"
    custom.write_text('{"0": "road", "1": "vehicle", "2": "sky"}')
    label_set = load_id2label_file(custom)
    logger = hf_logging.get_logger(modeling.__name__)
    with CaptureLogger(logger) as captured:
        model = load_model(str(folder), label_set)
    assert "class_predictor.weight" in captured.out and "re-initialised" in captured.out
    assert model.class_predictor.out_features == 4
    assert model.config.id2label == {0: "road", 1: "vehicle", 2: "sky"}
    loaded = dict(model.named_parameters())
    for name, param in original.named_parameters():
        if not name.startswith("class_predictor"):
            assert torch.equal(loaded[name], param), name


def test_same_label_set_reloads_every_weight(saved_tiny):
    folder, original = saved_tiny
    model = load_model(str(folder), idd_label_set(3))
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_offline_hub_id_gives_one_clear_line(monkeypatch):
    monkeypatch.setattr(modeling, "hub_is_reachable", lambda: False)
    with pytest.raises(ModelLoadError) as info:
        load_model("roadseg-tests/no-such-model-xyz", idd_label_set(3))
    message = str(info.value)
    assert "\n" not in message and "roadseg-tests/no-such-model-xyz" in message and "tiny" in message


def test_bad_local_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing"), idd_label_set(3))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), idd_label_set(3))


def test_sharded_and_pytorch_bin_folders_pass_the_header_check(saved_tiny, tmp_path):
    _, original = saved_tiny
    original.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    original.config.save_pretrained(tmp_path / "bin")
    torch.save(original.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in (tmp_path / "sharded", tmp_path / "bin"):
        assert modeling.check_model_folder(folder)["model_type"] == "mask2former"
        model = load_model(str(folder), None)
        for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_relative_folder_errors_name_the_folder_not_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="mine/config.json: config.json is not readable JSON"):
        load_model("mine", None)


def test_image_processor_ignores_255_and_round_trips(saved_tiny):
    folder, _ = saved_tiny
    processor = load_image_processor(str(folder))
    assert processor.ignore_index == 255 and processor.do_reduce_labels is False
    assert processor.size.shortest_edge == load_image_processor("tiny").size.shortest_edge


def test_freeze_by_attribute_not_by_name(saved_tiny):
    model = Mask2FormerForUniversalSegmentation(saved_tiny[1].config)
    counts = freeze(model, ("backbone", "pixel_decoder"))
    pixel_level = model.model.pixel_level_module
    assert all(not p.requires_grad for p in pixel_level.parameters())
    assert not pixel_level.encoder.training and not pixel_level.decoder.training
    # The pixel decoder has its own `.encoder`; the transformer decoder must stay trainable.
    assert all(p.requires_grad for p in model.model.transformer_module.parameters())
    assert all(p.requires_grad for p in model.class_predictor.parameters())
    assert counts["trainable_parameters"] + counts["frozen_parameters"] == sum(p.numel() for p in model.parameters())
    assert counts["frozen_parameters"] == sum(p.numel() for p in pixel_level.parameters())

    partial = Mask2FormerForUniversalSegmentation(saved_tiny[1].config)
    freeze(partial, ("backbone",))
    assert all(p.requires_grad for p in partial.model.pixel_level_module.decoder.parameters())
    with pytest.raises(ValueError, match="unknown part"):
        freeze(partial, ("encoder",))


def test_semantic_maps_are_upstream_post_processing_bitwise():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    from roadseg_utils.inference import label_map_at, semantic_maps_from_outputs, semantic_scores_for_image
    from roadseg_utils.modeling import image_processor_class

    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(2, 10, 6, generator=generator)
    mask_logits = torch.randn(2, 10, 96, 160, generator=generator) * 4
    outputs = Mask2FormerForUniversalSegmentationOutput(
        class_queries_logits=class_logits, masks_queries_logits=mask_logits
    )
    # Non-square targets, one larger and one smaller than the 384x384 step: what pipeline() returns, exactly.
    targets = [(720, 1280), (90, 160)]
    upstream = image_processor_class()().post_process_semantic_segmentation(outputs, target_sizes=targets)
    ours = semantic_maps_from_outputs(class_logits, mask_logits, targets)
    for a, b in zip(upstream, ours, strict=True):
        assert b.dtype == torch.uint8 and torch.equal(a, b.long())
    # Resizing a few classes at a time gives the same maps, ties included.
    scores = semantic_scores_for_image(class_logits[0], mask_logits[0])
    scores[:, :50] = 0.25
    whole = torch.nn.functional.interpolate(scores[None], size=(500, 700), mode="bilinear")[0].argmax(dim=0)
    for class_chunk in (1, 2, 4, 5):
        assert torch.equal(label_map_at(scores, (500, 700), class_chunk), whole), class_chunk
    # Class ids beyond 255 do not fit uint8: such maps stay int64.
    wide = semantic_maps_from_outputs(torch.randn(1, 4, 301, generator=generator), mask_logits[:1, :4], [(8, 8)])
    assert wide[0].dtype == torch.long


def test_semantic_maps_crop_padding_before_resizing():
    from roadseg_utils.inference import semantic_maps_from_outputs

    # One query covers the left half of the valid 64x32 region with class 1; everything else is class 0.
    mask_logits = torch.full((1, 2, 16, 16), -20.0)
    mask_logits[0, 0, :, :4] = 20.0
    mask_logits[0, 1, :, 4:8] = 20.0
    class_logits = torch.tensor([[[-5.0, 5.0, -9.0], [5.0, -5.0, -9.0]]])
    (label_map,) = semantic_maps_from_outputs(
        class_logits, mask_logits, target_sizes=[(64, 32)], valid_sizes=[(64, 32)], input_size=(64, 64)
    )
    assert label_map.shape == (64, 32)
    assert (label_map[:, :14] == 1).all() and (label_map[:, 18:] == 0).all()


def test_loss_overrides_reach_the_criterion_of_built_and_loaded_models(saved_tiny):
    folder, original = saved_tiny
    overrides = modeling.parse_loss_overrides("train_num_points=123, no_object_weight=0.3,class_weight=4")
    assert overrides == {"train_num_points": 123, "no_object_weight": 0.3, "class_weight": 4.0}
    loaded = load_model(str(folder), idd_label_set(3), loss_overrides=overrides)
    for model in (load_model("tiny", idd_label_set(3), loss_overrides=overrides), loaded):
        assert model.criterion.num_points == 123
        assert model.criterion.empty_weight[-1].item() == pytest.approx(0.3)
        assert model.weight_dict["loss_cross_entropy"] == 4.0
        assert model.weight_dict["loss_mask"] == original.weight_dict["loss_mask"]
    loaded_parameters = dict(loaded.named_parameters())
    for name, param in original.named_parameters():
        assert torch.equal(loaded_parameters[name], param), name


@pytest.mark.parametrize(("text", "problem"), [
    ("hidden_dim=32", "'hidden_dim=32' is not NAME=VALUE"),
    ("class_weight", "'class_weight' is not NAME=VALUE"),
    ("train_num_points=1.5", "train_num_points needs an integer, got '1.5'"),
    ("dice_weight=-1", "dice_weight must be a finite number >= 0"),
    ("mask_weight=nan", "mask_weight must be a finite number >= 0"),
    ("train_num_points=0", "train_num_points >= 1"),
])
def test_bad_loss_overrides_are_refused(text, problem):
    with pytest.raises(ValueError, match="--loss_overrides") as raised:
        modeling.parse_loss_overrides(text)
    assert problem in str(raised.value)
