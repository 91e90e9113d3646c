"""The source domain, the pretraining script and the packaged tiny-cityscapes checkpoint."""

import numpy as np
from PIL import Image

from roadseg_utils import pretrain
from roadseg_utils.labels import idd_label_set, load_id2label_file
from roadseg_utils.modeling import PRETRAINED_DIR, load_image_processor, load_model
from roadseg_utils.synthetic import CITYSCAPES_NAMES, SOURCE_DOMAIN, SOURCE_ID2LABEL_FILE, generate_synthetic_idd

SIZE = (72, 128)


def test_source_domain_has_cityscapes_ids_and_another_look(tmp_path):
    source = generate_synthetic_idd(tmp_path / "source", 8, 2, SIZE, seed=1, workers=1, domain=SOURCE_DOMAIN)
    target = generate_synthetic_idd(tmp_path / "target", 8, 2, SIZE, seed=1, workers=1)
    label_set = load_id2label_file(tmp_path / "source" / SOURCE_ID2LABEL_FILE)
    assert list(label_set.id2label.values()) == list(CITYSCAPES_NAMES)
    labels = np.stack([np.asarray(Image.open(frame.label_path)) for frame in source])
    assert set(np.unique(labels)) <= set(range(len(CITYSCAPES_NAMES))) | {255}
    assert {CITYSCAPES_NAMES.index(name) for name in ("road", "car", "sky")} <= set(np.unique(labels))
    assert all(frame.polygons_path is None for frame in source)
    # Cool, bright light against the IDD-like scenes' warmer look: blue outweighs red more in the source.
    blue_minus_red = [np.mean([np.asarray(Image.open(f.image_path), float)[..., 2] - np.asarray(
        Image.open(f.image_path), float)[..., 0] for f in frames]) for frames in (source, target)]
    assert blue_minus_red[0] > blue_minus_red[1] + 5


def test_pretrain_trains_packages_and_loads_by_path(tmp_path):
    out = tmp_path / "packaged"
    results = pretrain.main(["--work_dir", str(tmp_path / "work"), "--output_dir", str(out), "--num_images", "30",
                             "--max_steps", "2", "--batch_size", "2", "--crop_size", "64x96", "--seed", "3"])
    assert sorted(path.name for path in out.iterdir()) == ["README.md", *pretrain.PACKAGED_FILES]
    card = (out / "README.md").read_text()
    assert "Seed: 3" in card and f"{results['test_mean_iou']:.4f}" in card
    model = load_model(str(out), None)
    assert list(model.config.id2label.values()) == list(CITYSCAPES_NAMES)


def test_packaged_checkpoint_loads_offline_by_name_with_a_mapped_head():
    own = load_model("tiny-cityscapes", None)
    assert list(own.config.id2label.values()) == list(CITYSCAPES_NAMES)
    model = load_model("tiny-cityscapes", idd_label_set(3))
    road = idd_label_set(3).label2id["road"]
    assert model.class_predictor.weight[road].equal(own.class_predictor.weight[CITYSCAPES_NAMES.index("road")])
    assert load_image_processor("tiny-cityscapes").size["shortest_edge"] > 0
    card = (PRETRAINED_DIR / "tiny-cityscapes" / "README.md").read_text()
    assert "Seed:" in card and "Source-domain mIoU" in card
