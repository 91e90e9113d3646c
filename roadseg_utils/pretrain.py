"""Pretrain the tiny Mask2Former fully on the synthetic Cityscapes-like source domain and package it.

The result, ``roadseg_utils/pretrained/tiny-cityscapes/``, stands in offline for a real
``facebook/mask2former-swin-*-cityscapes-semantic`` checkpoint: 19 Cityscapes classes, features learnt on another
domain. Training is ``run_finetune.py`` itself with every part unfrozen, so the recipe is the suite's own.

Usage:
    python -m roadseg_utils.pretrain --seed 0
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from .atomic import write_text_atomically
from .synthetic import SOURCE_DOMAIN, SOURCE_ID2LABEL_FILE, SOURCE_LABEL_SUFFIX, generate_synthetic_idd

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
TINY_CITYSCAPES = "tiny-cityscapes"
PACKAGED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
FINETUNE_SCRIPT = Path(__file__).resolve().parent.parent / "run_finetune.py"


@dataclass
class PretrainArguments:
    """Command-line arguments of ``python -m roadseg_utils.pretrain``."""

    output_dir: str = field(default=str(PRETRAINED_DIR / TINY_CITYSCAPES),
                            metadata={"help": "Folder that receives the packaged checkpoint and its card."})
    work_dir: str = field(default="runs/pretrain", metadata={"help": "Folder for the source data and the run."})
    seed: int = field(default=0, metadata={"help": "Seed of the source data and of training."})
    num_images: int = field(default=600, metadata={"help": "Source-domain frames to generate."})
    max_steps: int = field(default=600, metadata={"help": "Training steps."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1.5e-3, metadata={"help": "Peak learning rate (cosine, 5 % warm-up)."})
    crop_size: str = field(default="160x288", metadata={"help": "Training crop as HEIGHTxWIDTH."})


def finetune_command(args: PretrainArguments, data_dir: Path, run_dir: Path) -> list[str]:
    """The ``run_finetune.py`` command line that trains the whole tiny model on the source domain."""
    return [
        sys.executable, str(FINETUNE_SCRIPT), "--model_name_or_path", "tiny", "--data_dir", str(data_dir),
        "--label_set", str(data_dir / SOURCE_ID2LABEL_FILE), "--mask_suffix", SOURCE_LABEL_SUFFIX,
        "--unfreeze_backbone", "--unfreeze_pixel_decoder", "--output_dir", str(run_dir), "--overwrite_output_dir",
        "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
        "--crop_size", args.crop_size, "--min_scale", "0.75", "--max_scale", "1.25",
        "--eval_shortest_edge", args.crop_size.split("x")[0], "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, args.max_steps // 20)),
        "--eval_strategy", "no", "--save_strategy", "no", "--seed", str(args.seed), "--disable_tqdm", "True",
        "--dataloader_num_workers", "1",
    ]


def model_card(args: PretrainArguments, command: list[str], results: dict, minutes: float) -> str:
    """The README.md of the packaged checkpoint: what it is, how it was made, its source-domain scores."""
    rerun = f"python -m roadseg_utils.pretrain --seed {args.seed} --num_images {args.num_images} " \
            f"--max_steps {args.max_steps} --batch_size {args.batch_size} --learning_rate {args.learning_rate} " \
            f"--crop_size {args.crop_size}"
    return f"""# tiny-cityscapes

A ~1.5 M-parameter Mask2Former (Swin backbone, the suite's `tiny` configuration) trained fully on the synthetic
Cityscapes-like *source* domain (`python -m roadseg_utils.synthetic --domain cityscapes`), labelled with Cityscapes'
19 classes and train ids. It stands in offline for `facebook/mask2former-swin-*-cityscapes-semantic`: load it with
`--model_name_or_path {TINY_CITYSCAPES}`. It is a test fixture for transfer, not a model for real images.

- Seed: {args.seed}
- Source data: {args.num_images} frames of 360x640 (generator seed {args.seed})
- Recipe: {args.max_steps} steps, batch {args.batch_size}, crops {args.crop_size}, AdamW lr {args.learning_rate}
  (cosine, 5 % warm-up), every part trained
- Source-domain mIoU (held-out test split): {results.get('test_mean_iou', float('nan')):.4f}
- Source-domain mIoU (validation split): {results.get('eval_mean_iou', float('nan')):.4f}
- Training time: {minutes:.1f} min on a 2-core CPU shared with other jobs (OMP_NUM_THREADS=1)

Rebuild it with:

```
{rerun}
```

which runs:

```
{shlex.join(["python", FINETUNE_SCRIPT.name, *command[2:]])}
```
"""


def main(argv: list[str] | None = None) -> dict:
    """Generate the source domain, train on it with run_finetune.py, and package the model and its card."""
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(args=argv)
    work_dir = Path(args.work_dir)
    data_dir, run_dir = work_dir / "data", work_dir / "run"
    shutil.rmtree(data_dir, ignore_errors=True)
    generate_synthetic_idd(data_dir, args.num_images, max(1, args.num_images // 25), (360, 640), args.seed,
                           domain=SOURCE_DOMAIN)
    command = finetune_command(args, data_dir, run_dir)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - start) / 60
    results = json.loads((run_dir / "all_results.json").read_text(encoding="utf-8"))
    output_dir = Path(args.output_dir)
    staging = output_dir.with_name(output_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in PACKAGED_FILES:
        shutil.copy2(run_dir / name, staging / name)
    write_text_atomically(staging / "README.md", model_card(args, command, results, minutes))
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    print(f"{output_dir}: source-domain test mIoU {results.get('test_mean_iou', float('nan')):.4f} "
          f"after {args.max_steps} steps in {minutes:.1f} min")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
