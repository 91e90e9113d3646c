"""Tests of FrozenBackboneTrainer: freezing through real training, DDP settings, evaluation, augmentation seeds."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import EvalPrediction, TrainerCallback, TrainingArguments

import run_finetune
from roadseg_utils.collator import MODEL_INPUT_KEYS, SegmentationCollator
from roadseg_utils.freezing import frozen_modules, lock_eval_mode
from roadseg_utils.inference import valid_sizes_of
from roadseg_utils.labels import IGNORE_INDEX, idd_label_set
from roadseg_utils.metrics import compute_segmentation_metrics
from roadseg_utils.modeling import load_image_processor, load_model
from roadseg_utils.synthetic import generate_synthetic_idd
from roadseg_utils.trainer import ConfusionMatrixMetrics, EpochSeededDataset, FrozenBackboneTrainer

LABELS = idd_label_set(3)
FROZEN_PREFIXES = ("model.pixel_level_module.encoder.", "model.pixel_level_module.decoder.")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """24 synthetic IDD frames of 90x160."""
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_idd(root, num_images=24, num_sequences=3, image_size=(90, 160), seed=5, workers=1)
    return root


def trainer_for(model, tmp_path: Path, frozen_parts=("backbone", "pixel_decoder"), **kwargs) -> FrozenBackboneTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **kwargs)
    return FrozenBackboneTrainer(model=model, args=args, frozen_parts=frozen_parts, label_set=LABELS)


def batch(label_maps: list[np.ndarray], seed: int = 0) -> dict:
    """A six-key batch of random images over the given label maps."""
    rng = np.random.default_rng(seed)
    examples = [
        {"pixel_values": rng.standard_normal((3, *label.shape)).astype(np.float32), "label": label,
         "valid": np.ones(label.shape, dtype=np.uint8)}
        for label in label_maps
    ]
    return SegmentationCollator(num_labels=LABELS.num_labels)(examples)


def blocky_label(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 26, (height // 16, width // 16)), np.ones((16, 16))).astype(np.uint8)


class TrainingRecorder(TrainerCallback):
    """Records, during real training, what the freeze contract is about."""

    def __init__(self) -> None:
        self.frozen_flags: list[tuple[str, bool]] = []
        self.trained_flags: list[bool] = []
        self.got_gradient: set[str] = set()
        self.frozen_with_gradient: set[str] = set()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.start = {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}
        self.start_buffers = {name: value.clone() for name, value in model.named_buffers()}
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self.frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        self.optimizer_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.parameter_ids = {name: id(p) for name, p in model.named_parameters()}
        for part in frozen_modules(model, ("backbone", "pixel_decoder")):
            for name, module in part.named_modules():
                module.register_forward_hook(
                    lambda m, i, o, name=name: self.frozen_flags.append((type(m).__name__, m.training))
                )
        model.model.transformer_module.register_forward_hook(lambda m, i, o: self.trained_flags.append(m.training))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and parameter.grad.abs().sum() > 0:
                (self.got_gradient if parameter.requires_grad else self.frozen_with_gradient).add(name)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}
        self.end_buffers = {name: value.clone() for name, value in model.named_buffers()}


def test_training_from_a_saved_checkpoint_leaves_frozen_parts_untouched(scenes, tmp_path, caplog):
    # The checkpoint has a 7-class head (IDD level 1); training at level 3 resizes it with a warning.
    checkpoint = tmp_path / "start"
    torch.manual_seed(0)
    load_model("tiny", idd_label_set(1)).save_pretrained(checkpoint)
    load_image_processor("tiny").save_pretrained(checkpoint)
    recorder = TrainingRecorder()
    output_dir = tmp_path / "trained"
    with caplog.at_level(logging.WARNING, logger="roadseg_utils"):
        run_finetune.main(
            ["--model_name_or_path", str(checkpoint), "--data_dir", str(scenes), "--output_dir", str(output_dir),
             "--max_steps", "4", "--per_device_train_batch_size", "2", "--crop_size", "64x128",
             "--learning_rate", "1e-3", "--eval_strategy", "no", "--save_strategy", "no", "--do_eval", "False",
             "--do_predict", "False", "--dataloader_num_workers", "0", "--disable_tqdm", "True"],
            callbacks=[recorder],
        )
    assert "re-initialised" in caplog.text and "class_predictor" in caplog.text

    # Every frozen parameter and buffer, in memory and as saved, is bitwise what the checkpoint held.
    frozen_keys = [name for name in recorder.start if name.startswith(FROZEN_PREFIXES)]
    assert len(frozen_keys) > 100
    for name in frozen_keys:
        assert torch.equal(recorder.start[name], recorder.end[name]), name
    for name, buffer in recorder.start_buffers.items():
        assert torch.equal(buffer, recorder.end_buffers[name]), name
    saved, original = load_file(output_dir / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    saved_frozen = [name for name in saved if name.startswith(FROZEN_PREFIXES)]
    assert len(saved_frozen) > 100
    for name in saved_frozen:
        assert torch.equal(saved[name], original[name]), name

    # Exactly the trainable parameters got gradients, and each of them changed.
    assert recorder.frozen == {name for name in recorder.start if name.startswith(FROZEN_PREFIXES)
                               and name in recorder.parameter_ids}
    assert all(name.startswith(("model.transformer_module.", "class_predictor.")) for name in recorder.trainable)
    assert recorder.got_gradient == recorder.trainable
    assert not recorder.frozen_with_gradient
    for name in recorder.trainable:
        assert not torch.equal(recorder.start[name], recorder.end[name]), f"{name} got a gradient but did not change"

    # The optimizer holds the trainable parameters and nothing else.
    assert recorder.optimizer_ids == {recorder.parameter_ids[name] for name in recorder.trainable}

    # Norm, dropout and drop-path layers of the frozen parts ran in eval mode on every call; the decoder trained.
    kinds = {kind for kind, _ in recorder.frozen_flags}
    assert {"LayerNorm", "GroupNorm", "SwinDropPath"} <= kinds and any("Dropout" in kind for kind in kinds)
    assert not any(training for _, training in recorder.frozen_flags)
    assert len(recorder.trained_flags) == 4 and all(recorder.trained_flags)


def test_eval_mode_lock_survives_train_and_deepcopy():
    model = load_model("tiny", LABELS)
    parts = frozen_modules(model, ("backbone", "pixel_decoder"))
    lock_eval_mode(parts)
    model.train()
    assert model.training and model.model.transformer_module.training
    assert not any(module.training for part in parts for module in part.modules())
    twin = copy.deepcopy(model)
    twin.train()
    twin_parts = frozen_modules(twin, ("backbone", "pixel_decoder"))
    assert not any(module.training for part in twin_parts for module in part.modules())


def test_ddp_unused_parameter_search_matches_which_parameters_get_gradients(tmp_path):
    # One crop with labels and one without a labelled pixel, then a batch of unlabelled crops only.
    unlabelled = np.full((64, 128), IGNORE_INDEX, dtype=np.uint8)
    batches = [batch([blocky_label(64, 128, 1), unlabelled]), batch([unlabelled, unlabelled])]
    unused_swin_norm = {"model.pixel_level_module.encoder.swin.layernorm.weight",
                        "model.pixel_level_module.encoder.swin.layernorm.bias"}
    for frozen_parts in (("backbone", "pixel_decoder"), ("backbone",), ("pixel_decoder",), ()):
        backbone_trains = "backbone" not in frozen_parts
        torch.manual_seed(0)
        model = load_model("tiny", LABELS)
        trainer = trainer_for(model, tmp_path, frozen_parts=frozen_parts)
        assert trainer.args.ddp_find_unused_parameters is backbone_trains, frozen_parts
        for inputs in batches:
            model.zero_grad(set_to_none=True)
            model.train()
            trainer.compute_loss(model, inputs).backward()
            without = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
            assert without == (unused_swin_norm if backbone_trains else set()), frozen_parts
    explicit = trainer_for(load_model("tiny", LABELS), tmp_path, ddp_find_unused_parameters=True)
    assert explicit.args.ddp_find_unused_parameters is True


def test_only_model_keys_reach_forward_with_float_masks(tmp_path):
    model = load_model("tiny", LABELS)
    trainer = trainer_for(model, tmp_path)
    inputs = batch([blocky_label(64, 128, 2)])
    inputs["original_segmentation_maps"] = [np.zeros((5, 5), dtype=np.uint8)]
    selected = trainer.model_inputs(model, inputs)
    assert set(selected) == set(MODEL_INPUT_KEYS)
    assert all(masks.dtype == torch.float32 for masks in selected["mask_labels"])
    assert inputs["mask_labels"][0].dtype == torch.bool


def test_evaluation_scores_every_image_once_at_its_original_size(scenes, tmp_path):
    from roadseg_utils.data import DataSourceArguments, load_segmentation_dataset, with_sample_transform
    from roadseg_utils.transforms import make_eval_transform

    splits = load_segmentation_dataset(DataSourceArguments(data_dir=str(scenes)), LABELS, seed=0)
    rows = splits["train"].select(range(5))
    # Shortest edge 48: the model sees 64x96 inputs (sides rounded up to 32), scores are taken on the 90x160 maps.
    transform = make_eval_transform(load_image_processor("tiny", shortest_edge=48))
    dataset = with_sample_transform(rows, transform)
    trainer = trainer_for(load_model("tiny", LABELS), tmp_path, per_device_eval_batch_size=2, batch_eval_metrics=True)
    metrics = trainer.evaluate(eval_dataset=dataset)
    assert metrics["eval_num_images"] == 5
    labelled = sum(int((np.asarray(row["label"]) != IGNORE_INDEX).sum()) for row in rows)
    confusion = trainer.compute_metrics.last_confusion
    assert confusion.sum() == labelled
    assert metrics["eval_mean_iou"] == pytest.approx(compute_segmentation_metrics(confusion)["mean_iou"])
    assert np.isfinite(metrics["eval_loss"])


def test_confusion_metrics_batched_equals_all_at_once():
    rng = np.random.default_rng(0)
    matrices = rng.integers(0, 50, size=(7, 4, 4))
    batched = ConfusionMatrixMetrics(4, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    assert batched(EvalPrediction(matrices[:3], np.zeros(3)), compute_result=False) == {}
    from_batches = batched(EvalPrediction(torch.as_tensor(matrices[3:]), np.zeros(4)), compute_result=True)
    at_once = ConfusionMatrixMetrics(4, id2label={0: "a", 1: "b", 2: "c", 3: "d"})(EvalPrediction(matrices, None))
    assert from_batches == at_once and from_batches["num_images"] == 7
    expected = compute_segmentation_metrics(matrices.sum(axis=0))
    assert from_batches["mean_iou"] == pytest.approx(expected["mean_iou"])
    again = batched(EvalPrediction(matrices[:1], None))
    assert again["num_images"] == 1


def test_valid_sizes_read_the_padded_batch():
    mask = torch.zeros((2, 6, 9), dtype=torch.long)
    mask[0, :6, :9] = 1
    mask[1, :4, :7] = 1
    assert valid_sizes_of(mask) == [(6, 9), (4, 7)]


def test_epoch_seeded_augmentation_depends_only_on_seed_epoch_and_index(scenes):
    from roadseg_utils.data import DataSourceArguments, load_segmentation_dataset, with_sample_transform
    from roadseg_utils.transforms import build_train_transforms, make_transform_fn

    rows = load_segmentation_dataset(DataSourceArguments(data_dir=str(scenes)), LABELS, seed=0)["train"]
    transform = make_transform_fn(build_train_transforms((48, 64), (0.5,) * 3, (0.5,) * 3), keep_originals=False)
    first, second = (EpochSeededDataset(with_sample_transform(rows, transform), seed=11) for _ in range(2))
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    forward = [first[i]["label"] for i in range(4)]
    assert np.array_equal(np.random.get_state()[1], state), "the global NumPy stream was disturbed"
    np.random.seed(999)
    backward = [second[i]["label"] for i in reversed(range(4))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward, strict=True))
    second.set_epoch(1)
    assert not all(np.array_equal(first[i]["label"], second[i]["label"]) for i in range(4))


def test_mask_count_is_upstream_in_one_process_and_a_true_mean_across_processes(monkeypatch):
    from accelerate import PartialState

    import roadseg_utils.trainer as trainer_module

    PartialState()
    model = load_model("tiny", LABELS)
    labels = [torch.arange(3), torch.arange(0), torch.arange(2)]
    upstream = model.criterion.get_num_masks(labels, torch.device("cpu"))
    trainer_module.fix_mask_count(model)
    assert isinstance(model.criterion.get_num_masks, trainer_module.MeanMaskCount)
    assert torch.equal(model.criterion.get_num_masks(labels, torch.device("cpu")), upstream)

    class TwoProcesses:
        num_processes = 2

    # This rank holds 5 masks, the other 3: a sum-reduce gives 8, so the mean per process is 4.
    monkeypatch.setattr(trainer_module, "PartialState", TwoProcesses)
    monkeypatch.setattr(trainer_module, "reduce", lambda tensor, reduction: tensor + 3 if reduction == "sum" else None)
    assert float(model.criterion.get_num_masks(labels, torch.device("cpu"))) == 4.0


def test_placeholders_of_dropped_samples_are_neither_scored_nor_counted(tmp_path):
    trainer = trainer_for(load_model("tiny", LABELS), tmp_path)
    rng = np.random.default_rng(3)
    labels = [blocky_label(64, 128, 1), blocky_label(64, 128, 2)]
    examples = [{"pixel_values": rng.standard_normal((3, 64, 128)).astype(np.float32), "label": label,
                 "valid": np.ones(label.shape, dtype=np.uint8), "original_image": np.zeros((64, 128, 3), np.uint8),
                 "original_label": label} for label in labels]
    collate = SegmentationCollator(num_labels=LABELS.num_labels)
    _, expected, counts = trainer.prediction_step(trainer.model, collate(examples), prediction_loss_only=False)
    loss, confusion, counted = trainer.prediction_step(trainer.model, collate([examples[0], None, examples[1]]),
                                                       prediction_loss_only=False)
    assert torch.isfinite(loss) and confusion.shape[0] == 3
    assert torch.equal(confusion[[0, 2]], expected) and not confusion[1].any()
    assert counted.tolist() == [counts[0], -1, counts[1]]
    metrics = ConfusionMatrixMetrics(LABELS.num_labels)(EvalPrediction(confusion, counted))
    assert metrics["num_images"] == 2
    loss, confusion, counted = trainer.prediction_step(trainer.model, collate([None]), prediction_loss_only=False)
    assert torch.isfinite(loss) and not confusion.any() and counted.tolist() == [-1]
