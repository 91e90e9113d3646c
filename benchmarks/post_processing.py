"""What the one post-processing rule (upstream's 384x384 step, which pipeline() applies) costs thin classes.

Every scoring path of the suite turns Mask2Former outputs into label maps with the rule of upstream
``post_process_semantic_segmentation`` (roadseg_utils.inference), so the card, run_eval.py and ``pipeline()`` agree.
This benchmark shows what that rule gives up against upsampling the mask logits straight to the target size, on
the outputs of an oracle model: one query per class whose mask logits are the area-averaged ground truth of a
1080x1920 synthetic scene at the model's 1/4 output stride, so every loss is the post-processing's.

    python -m benchmarks.post_processing
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from roadseg_utils.confusion import StreamingConfusionMatrix
from roadseg_utils.inference import semantic_maps_from_outputs
from roadseg_utils.labels import idd_label_set
from roadseg_utils.synthetic import generate_synthetic_idd

LEVEL3 = idd_label_set(3)
THIN_CLASSES = ("pole", "traffic sign", "traffic light")
# Input rows, and the mask logits' size at stride 4 for a 16:9 frame.
INPUTS = {"1080 rows": (270, 480), "720 rows": (180, 320), "512 rows": (128, 228)}


def straight_to_target(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The alternative rule: mask logits upsampled straight to the target size, then weighted and argmaxed."""
    probs = torch.nn.functional.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)[0].sigmoid()
    return torch.einsum("qc,qhw->chw", class_logits[0].softmax(dim=-1)[..., :-1], probs).argmax(dim=0)


def main() -> None:
    """Print thin-class IoU and mIoU of both rules for three input sizes."""
    with tempfile.TemporaryDirectory() as folder:
        generate_synthetic_idd(Path(folder), 1, 1, (1080, 1920), seed=1, workers=1)
        truth = np.array(Image.open(next(Path(folder).rglob("*_gtFine_labellevel3Ids.png"))))
    class_logits = torch.full((1, 26, 27), -4.0)
    class_logits[0, torch.arange(26), torch.arange(26)] = 8.0
    one_hot = (truth[None] == np.arange(26)[:, None, None]).astype(np.float32)
    print("| model input (mask size) | rule | " + " | ".join(THIN_CLASSES) + " | mIoU |")
    print("| --- | --- | " + "---: | " * len(THIN_CLASSES) + "---: |")
    for rows, mask_size in INPUTS.items():
        shares = np.stack([cv2.resize(m, mask_size[::-1], interpolation=cv2.INTER_AREA) for m in one_hot])
        mask_logits = torch.from_numpy(8.0 * (2.0 * shares - 1.0))[None]
        predictions = {
            "upstream 384x384 (the suite's rule)": semantic_maps_from_outputs(class_logits, mask_logits,
                                                                              [truth.shape])[0],
            "straight to target": straight_to_target(class_logits, mask_logits, truth.shape),
        }
        for rule, prediction in predictions.items():
            scores = StreamingConfusionMatrix(26).update([prediction.to(torch.uint8)], [truth]).compute(LEVEL3.id2label)
            thin = " | ".join(f"{100 * scores[f'iou_{name}']:.2f}" for name in THIN_CLASSES)
            print(f"| {rows} ({mask_size[0]}x{mask_size[1]}) | {rule} | {thin} | {100 * scores['mean_iou']:.2f} |")


if __name__ == "__main__":
    main()
