"""Label-aware head initialisation: mapped class-head rows are copied exactly, unmatched rows start fresh."""

import json

import pytest
import torch

from roadseg_utils.head_init import LabelMappingError, class_mapping, read_label_mapping
from roadseg_utils.labels import custom_label_set, idd_label_set
from roadseg_utils.modeling import ModelLoadError, load_model
from roadseg_utils.synthetic import CITYSCAPES_NAMES

CITYSCAPES = custom_label_set("cityscapes", dict(enumerate(CITYSCAPES_NAMES)))
LEVEL3 = idd_label_set(3)


@pytest.fixture(scope="module")
def cityscapes_checkpoint(tmp_path_factory):
    """A tiny checkpoint with Cityscapes' 19 classes and a class head whose rows all differ."""
    folder = tmp_path_factory.mktemp("cityscapes")
    torch.manual_seed(0)
    model = load_model("tiny", CITYSCAPES)
    with torch.no_grad():
        model.class_predictor.weight.normal_(0, 1)
        model.class_predictor.bias.normal_(0, 1)
    model.save_pretrained(folder)
    return folder, model.class_predictor.weight.detach().clone(), model.class_predictor.bias.detach().clone()


def rows_equal(model, target_id, weight, bias, source_id):
    head = model.class_predictor
    return torch.equal(head.weight[target_id], weight[source_id]) and torch.equal(head.bias[target_id],
                                                                                  bias[source_id])


def test_mapped_rows_are_copied_exactly_and_unmatched_rows_are_fresh(cityscapes_checkpoint):
    folder, weight, bias = cityscapes_checkpoint
    torch.manual_seed(1)
    model = load_model(str(folder), LEVEL3)
    torch.manual_seed(2)
    again = load_model(str(folder), LEVEL3)
    source = {name: idx for idx, name in enumerate(CITYSCAPES_NAMES)}
    expected = {"road": "road", "car": "car", "rider": "rider", "sky": "sky", "autorickshaw": "car",
                "curb": "sidewalk", "non-drivable fallback": "terrain", "guard rail": "fence"}
    for target, origin in expected.items():
        assert rows_equal(model, LEVEL3.label2id[target], weight, bias, source[origin]), target
    assert rows_equal(model, LEVEL3.num_labels, weight, bias, len(CITYSCAPES_NAMES))  # "no object"
    unmatched = LEVEL3.label2id["obs-str-bar-fallback"]
    assert not any(rows_equal(model, unmatched, weight, bias, idx) for idx in range(len(CITYSCAPES_NAMES) + 1))
    assert not torch.equal(model.class_predictor.weight[unmatched], again.class_predictor.weight[unmatched])
    assert torch.equal(model.class_predictor.weight[LEVEL3.label2id["road"]],
                       again.class_predictor.weight[LEVEL3.label2id["road"]])
    record = model.config.head_initialisation
    assert record["autorickshaw"] == "car" and record["obs-str-bar-fallback"] is None
    assert record["no object"] == "no object"


def test_mapping_file_overrides_the_builtin_map(cityscapes_checkpoint, tmp_path):
    folder, weight, bias = cityscapes_checkpoint
    mapping_file = tmp_path / "mapping.json"
    mapping_file.write_text(json.dumps({"autorickshaw": "truck", "car": None}))
    model = load_model(str(folder), LEVEL3, label_mapping=mapping_file)
    source = {name: idx for idx, name in enumerate(CITYSCAPES_NAMES)}
    assert rows_equal(model, LEVEL3.label2id["autorickshaw"], weight, bias, source["truck"])
    car = LEVEL3.label2id["car"]
    assert not any(rows_equal(model, car, weight, bias, idx) for idx in range(len(CITYSCAPES_NAMES) + 1))
    assert rows_equal(model, LEVEL3.label2id["road"], weight, bias, source["road"])


def test_builtin_map_only_for_a_cityscapes_checkpoint():
    other = custom_label_set("other", {0: "road", 1: "car", 2: "lamp"})
    assert class_mapping(other.id2label, LEVEL3) == {LEVEL3.label2id["road"]: 0, LEVEL3.label2id["car"]: 1}


@pytest.mark.parametrize(("payload", "problem"), [
    ({"tractor": "car"}, "'tractor' is not a class of the label set"),
    ({"car": "lorry"}, "'lorry' (for 'car') is not a class of the checkpoint"),
])
def test_bad_mapping_is_one_clear_line(payload, problem):
    with pytest.raises(LabelMappingError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        class_mapping(CITYSCAPES.id2label, LEVEL3, payload, "mapping.json")


def test_unreadable_mapping_file_names_the_file(tmp_path):
    bad = tmp_path / "mapping.json"
    bad.write_text('["car"]')
    with pytest.raises(LabelMappingError, match="mapping.json: a label mapping is a JSON object"):
        read_label_mapping(bad)
    with pytest.raises(LabelMappingError, match="not found"):
        read_label_mapping(tmp_path / "missing.json")


def test_mapping_for_the_random_tiny_model_is_refused(tmp_path):
    mapping_file = tmp_path / "mapping.json"
    mapping_file.write_text('{"car": "car"}')
    with pytest.raises(ModelLoadError, match="tiny has random weights"):
        load_model("tiny", LEVEL3, label_mapping=mapping_file)
