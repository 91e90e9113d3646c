#!/usr/bin/env python
"""run_finetune.py with per-rank records for tests/test_distributed.py; run it under ``accelerate launch``.

Each rank writes ``rank<N>.json`` into ``$ROADSEG_RECORD_DIR``: the paths of the training samples it loaded, a
hash of its final weights, every file it created, replaced or removed under ``--output_dir``, and how many label
maps it decoded (validation runs in-process below 64 samples).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree", "shutil.copyfile", "shutil.move")
written: list[str] = []


def record_writes(event: str, args: tuple) -> None:
    """Audit hook: note paths opened for writing, renamed, removed or created."""
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing and isinstance(path, (str, os.PathLike)):
            written.append(os.fspath(path))
    elif event in WRITE_EVENTS:
        # os.rename (also raised by os.replace), shutil.copyfile and shutil.move name the target second.
        target = args[1] if event in ("os.rename", "shutil.copyfile", "shutil.move") else args[0]
        if isinstance(target, (str, os.PathLike)):
            written.append(os.fspath(target))


def recording(function):
    """``function`` (a native writer the audit hook cannot see) with its target path recorded."""

    def wrapper(tensors, filename, *args, **kwargs):
        if isinstance(filename, (str, os.PathLike)):
            written.append(os.fspath(filename))
        return function(tensors, filename, *args, **kwargs)

    return wrapper


# Before transformers binds safetensors.torch.save_file to its own name.
safetensors.torch.save_file = recording(safetensors.torch.save_file)
torch.save = recording(torch.save)
sys.addaudithook(record_writes)

from transformers import TrainerCallback  # noqa: E402

import run_finetune  # noqa: E402
from roadseg_utils.data import dataset_column, label_cache  # noqa: E402
from roadseg_utils.trainer import EpochSeededDataset  # noqa: E402

seen_indices: list[int] = []
decoded_maps: list[str] = []
real_label_map_counts = label_cache.label_map_counts


def counting_label_map_counts(path, level=3):
    """`label_cache.label_map_counts`, noting the map it decodes."""
    decoded_maps.append(os.fspath(path))
    return real_label_map_counts(path, level)


label_cache.label_map_counts = counting_label_map_counts


class RecordingDataset(EpochSeededDataset):
    """`EpochSeededDataset` that notes every index it serves (data-loader workers must be 0)."""

    def __getitem__(self, index: int):
        seen_indices.append(int(index))
        return super().__getitem__(index)


class WeightsHash(TrainerCallback):
    """At the end of training, hash this rank's model weights and save the record."""

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.weights_sha256 = digest.hexdigest()
        self.train_paths = [str(p) for p in dataset_column(train_dataloader.dataset.dataset.dataset, "path")]


def main() -> None:
    record_dir = Path(os.environ["ROADSEG_RECORD_DIR"])
    run_finetune.EpochSeededDataset = RecordingDataset
    weights = WeightsHash()
    run_finetune.main(sys.argv[1:], callbacks=[weights])
    rank = int(os.environ.get("RANK", "0"))
    output_dir = os.path.realpath(sys.argv[sys.argv.index("--output_dir") + 1])
    under_output = sorted({os.path.relpath(os.path.realpath(p), output_dir) for p in written
                           if os.path.realpath(p).startswith(output_dir + os.sep)})
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "train_paths_seen": sorted({weights.train_paths[i] for i in seen_indices}),
        "num_samples_loaded": len(seen_indices),
        "weights_sha256": weights.weights_sha256,
        "written": under_output,
        "label_maps_decoded": len(decoded_maps),
    }
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
