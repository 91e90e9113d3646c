"""Loading or building Mask2Former and its image processor: Hub id, local folder or offline tiny config.

A local folder is checked before any weight is read, from its headers alone: ``config.json`` must be a Mask2Former
config, a weights file must be there, safetensors headers must describe exactly the bytes the file holds (a
truncated file fails here) and a ``pytorch_model.bin`` archive must have its central directory; a folder marked
``RUN_INCOMPLETE`` by an unfinished run is refused. ``pytorch_model.bin`` is read with ``weights_only=True``, so a
pickle that asks to run code is refused, never run. Every failure is a `ModelLoadError` of one line.

``tiny-cityscapes`` names the pretrained tiny checkpoint packaged in ``roadseg_utils/pretrained/`` (built by
``python -m roadseg_utils.pretrain``). When a checkpoint's classes differ from the label set, the new class head
starts from the checkpoint's rows of the same or mapped classes (`roadseg_utils.head_init`).
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.utils import cached_file, is_torchvision_available
from transformers.utils import logging as hf_logging

from .cli import one_line
from .head_init import CONFIG_KEY, class_mapping, initialise_head, read_label_mapping
from .hub import hub_is_reachable
from .labels import IGNORE_INDEX, LabelSet
from .output_dir import INCOMPLETE_FILE, is_incomplete

logger = hf_logging.get_logger(__name__)

TINY_MODEL = "tiny"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# Checkpoints packaged with the suite, by the name --model_name_or_path accepts.
PACKAGED_MODELS = ("tiny-cityscapes",)
DEFAULT_CHECKPOINT = "facebook/mask2former-swin-small-cityscapes-semantic"
TINY_SHORTEST_EDGE = 512
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)
# Largest safetensors header accepted (the format's own limit is 100 MB); more means a corrupt length field.
MAX_SAFETENSORS_HEADER = 100_000_000
# Mask2FormerConfig fields that only shape the training loss, so a checkpoint's weights load unchanged beside them.
LOSS_SETTINGS = {
    "class_weight": float,
    "mask_weight": float,
    "dice_weight": float,
    "no_object_weight": float,
    "train_num_points": int,
    "oversample_ratio": float,
    "importance_sample_ratio": float,
}


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message is one line a user can act on."""


def image_processor_class() -> type:
    """The Mask2Former image-processor class that works in this environment, without fallback warnings."""
    # Without torchvision transformers>=5 falls back to the PIL backend anyway, but warns on every load.
    if not is_torchvision_available() and hasattr(transformers, "Mask2FormerImageProcessorPil"):
        return transformers.Mask2FormerImageProcessorPil
    return transformers.Mask2FormerImageProcessor


def parse_loss_overrides(text: str | None) -> dict[str, float | int]:
    """``"no_object_weight=0.2,train_num_points=12544"`` as typed loss settings; a bad entry raises ValueError."""
    overrides: dict[str, float | int] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or name not in LOSS_SETTINGS:
            raise ValueError(f"--loss_overrides: {entry.strip()!r} is not NAME=VALUE with NAME one of "
                             f"{', '.join(LOSS_SETTINGS)}")
        try:
            overrides[name] = LOSS_SETTINGS[name](value)
        except ValueError:
            kind = "an integer" if LOSS_SETTINGS[name] is int else "a number"
            raise ValueError(f"--loss_overrides: {name} needs {kind}, got {value!r}") from None
        if not 0 <= overrides[name] < float("inf") or (name == "train_num_points" and overrides[name] < 1):
            raise ValueError(f"--loss_overrides: {name} must be a finite number >= 0 (train_num_points >= 1), got "
                             f"{value}")
    return overrides


def build_tiny_config(label_set: LabelSet) -> Mask2FormerConfig:
    """A ~1.5 M-parameter Mask2Former with a Swin backbone, for offline demos, tests and benchmarks."""
    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=24,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 3, 6],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_feedforward_dim=128,
        dim_feedforward=128,
        encoder_layers=2,
        decoder_layers=3,
        num_attention_heads=4,
        num_queries=32,
        train_num_points=4096,
        id2label=dict(label_set.id2label),
        label2id=label_set.label2id,
    )


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: {what} is not readable JSON ({one_line(err)})") from err
    if not isinstance(payload, dict):
        raise ModelLoadError(f"{path}: {what} must be a JSON object")
    return payload


def _check_safetensors(path: Path) -> None:
    """The header of a safetensors file parses and its tensors end exactly where the file ends."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ModelLoadError(f"{path}: truncated or corrupt safetensors file (header length {length}, "
                                 f"file {size} bytes)")
        try:
            header = json.loads(stream.read(length))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({one_line(err)})") from err
    if max(ends, default=0) != size - 8 - length:
        raise ModelLoadError(f"{path}: truncated or corrupt safetensors file: its header describes "
                             f"{max(ends, default=0)} bytes of tensors, the file holds {size - 8 - length}")


def _check_torch_archive(path: Path) -> None:
    # torch.save writes a zip archive whose central directory is at the end: a truncated file loses it.
    with open(path, "rb") as stream:
        legacy_pickle = stream.read(1) == b"\x80"
    if not legacy_pickle and not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: truncated or corrupt PyTorch weights file (not a readable archive)")


def _check_weights(folder: Path) -> None:
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ModelLoadError(f"{folder}: no weights in this folder ({' or '.join(WEIGHT_FILES[::2])})")
    first = present[0]
    if first.endswith(".index.json"):
        weight_map = _read_json_object(folder / first, "the weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{folder / first}: the weights index has no weight_map")
        shards = sorted({str(name) for name in weight_map.values()})
    else:
        shards = [first]
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise ModelLoadError(f"{path}: weights file named by {first} is missing")
        if shard.endswith(".safetensors"):
            _check_safetensors(path)
        else:
            _check_torch_archive(path)


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """Check a saved model folder from its headers alone and return its ``config.json``; `ModelLoadError` if bad."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found" if not folder.exists() else
                             f"{folder}: not a folder (a model is a folder with config.json and weights)")
    if is_incomplete(folder):
        raise ModelLoadError(f"{folder}: left by a run that did not finish ({INCOMPLETE_FILE} is there); rerun it to "
                             "complete the folder, or pick a checkpoint-* folder inside it")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json in this folder, so it is not a saved model")
    config = _read_json_object(folder / "config.json", "config.json")
    if config.get("model_type") != "mask2former":
        raise ModelLoadError(f"{folder / 'config.json'}: not a Mask2Former config (model_type "
                             f"{config.get('model_type')!r})")
    id2label = config.get("id2label", {})
    if not isinstance(id2label, dict) or not all(str(key).isdigit() for key in id2label):
        raise ModelLoadError(f"{folder / 'config.json'}: id2label must map class ids to names, got {id2label!r:.80}")
    _check_weights(folder)
    return config


def resolve_model_name(model_name_or_path: str) -> str:
    """The folder of a packaged checkpoint name (``tiny-cityscapes``); any other name or path unchanged."""
    if model_name_or_path in PACKAGED_MODELS and not Path(model_name_or_path).exists():
        return str(PRETRAINED_DIR / model_name_or_path)
    return model_name_or_path


def _checkpoint_head(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's class head (weight, bias) read from its weights file(s) in ``folder``."""
    first = next(name for name in WEIGHT_FILES if (folder / name).is_file())
    names = ("class_predictor.weight", "class_predictor.bias")
    if first.endswith(".index.json"):
        weight_map = json.loads((folder / first).read_text(encoding="utf-8"))["weight_map"]
        files = [folder / weight_map[name] for name in names]
    else:
        files = [folder / first] * 2
    tensors = []
    for name, path in zip(names, files, strict=True):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as weights:
                tensors.append(weights.get_tensor(name))
        else:
            tensors.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True)[name])
    return tensors[0], tensors[1]


def _map_class_head(model: Mask2FormerForUniversalSegmentation, source: str, is_local: bool,
                    label_set: LabelSet, overrides: Mapping[str, str | None] | None, mapping_file: str,
                    **hub: Any) -> None:
    """Start the class head from the checkpoint's rows of the same or mapped classes, when its classes differ."""
    config_path = Path(source) / "config.json" if is_local else Path(cached_file(source, "config.json", **hub))
    source_id2label = {int(idx): name for idx, name in _read_json_object(config_path, "config.json")
                       .get("id2label", {}).items()}
    if source_id2label == dict(label_set.id2label) and not overrides:
        # A record from the run that made this checkpoint does not describe this one's head.
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
        return
    mapping = class_mapping(source_id2label, label_set, overrides, mapping_file)
    try:
        head = _checkpoint_head(config_path.parent)
    except (OSError, KeyError, StopIteration, SafetensorError, RuntimeError) as err:
        raise ModelLoadError(f"{source}: cannot read its class head to map it ({one_line(err)[:200]})") from err
    initialise_head(model, head, source_id2label, mapping)


def load_model(
    model_name_or_path: str,
    label_set: LabelSet | None,
    revision: str = "main",
    token: str | bool | None = None,
    cache_dir: str | None = None,
    label_mapping: str | Path | None = None,
    loss_overrides: Mapping[str, float | int] | None = None,
) -> Mask2FormerForUniversalSegmentation:
    """Load a Mask2Former from a Hub id or folder (or build ``tiny``) with the head sized to ``label_set``.

    ``label_set=None`` keeps the checkpoint's own head and ``id2label`` (evaluation); ``tiny`` needs a label set.
    Head rows of classes the checkpoint knows (by name, the Cityscapes -> IDD map or the ``label_mapping`` JSON file)
    are copied. ``loss_overrides`` (see `parse_loss_overrides`) replace the checkpoint's loss settings.
    """
    loss_overrides = dict(loss_overrides or {})
    model_name_or_path = resolve_model_name(model_name_or_path)
    if model_name_or_path == TINY_MODEL and label_mapping:
        raise ModelLoadError(f"--label_mapping {label_mapping}: {TINY_MODEL} has random weights, so there is no "
                             "head to map; start from a checkpoint (e.g. tiny-cityscapes)")
    # Read before any weight is: a bad mapping file fails fast.
    overrides = read_label_mapping(label_mapping) if label_mapping else None
    if model_name_or_path == TINY_MODEL:
        if label_set is None:
            raise ModelLoadError(f"--model_name_or_path {TINY_MODEL} needs a label set to size its head")
        logger.info("building a randomly initialised tiny Mask2Former (offline)")
        config = build_tiny_config(label_set)
        for name, value in loss_overrides.items():
            setattr(config, name, value)
        return Mask2FormerForUniversalSegmentation(config)
    local = Path(model_name_or_path).expanduser()
    is_local = local.exists() or model_name_or_path.startswith((".", "/", "~"))
    if is_local:
        check_model_folder(local)
    source = str(local) if is_local else model_name_or_path
    try:
        head = {} if label_set is None else {
            "id2label": dict(label_set.id2label), "label2id": label_set.label2id, "ignore_mismatched_sizes": True
        }
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            source,
            **head,
            **loss_overrides,
            output_loading_info=True,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            # Offline, go straight to the local cache instead of waiting through the Hub client's retries.
            local_files_only=not is_local and not hub_is_reachable(),
            # A pickle in pytorch_model.bin may only rebuild tensors: one that asks to run code is refused.
            weights_only=True,
        )
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which is the one thing not to do with an unknown file.
        asked = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise ModelLoadError(
            f"{source}: refused to load its PyTorch weights: the pickle asks for "
            f"{asked.group(1) if asked else 'objects other than tensors'}, which could run code; only tensors are "
            "read (save the model again as safetensors from a copy you trust)"
        ) from err
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, SafetensorError) as err:
        if is_local:
            raise ModelLoadError(f"{source}: cannot load the model ({one_line(err)[:300]})") from err
        raise ModelLoadError(
            f"cannot fetch {model_name_or_path!r} from the Hugging Face Hub (offline, or no such model): "
            f"pass a local model folder or --model_name_or_path {TINY_MODEL}"
        ) from err
    reinitialised = sorted(key for key, *_ in info.get("mismatched_keys", ()))
    if reinitialised:
        logger.warning(
            "%s has another number of classes than the label set %s (%d): re-initialised %s",
            model_name_or_path,
            label_set.name,
            label_set.num_labels,
            ", ".join(reinitialised),
        )
    if "no_object_weight" in loss_overrides:
        # The checkpoint's saved criterion.empty_weight buffer was loaded over the one built from the config.
        with torch.no_grad():
            model.criterion.empty_weight[-1] = loss_overrides["no_object_weight"]
    if label_set is not None:
        _map_class_head(model, source, is_local, label_set, overrides, str(label_mapping), revision=revision,
                        token=token, cache_dir=cache_dir, local_files_only=True)
    return model


def load_image_processor(model_name_or_path: str, shortest_edge: int | None = None, **kwargs: Any) -> Any:
    """The image processor of a checkpoint (or a default one for ``tiny``), set to ignore label 255."""
    processor_cls = image_processor_class()
    model_name_or_path = resolve_model_name(model_name_or_path)
    overrides = {"ignore_index": IGNORE_INDEX, "do_reduce_labels": False, **kwargs}
    if shortest_edge is not None:
        overrides["size"] = {"shortest_edge": shortest_edge, "longest_edge": shortest_edge * 4}
    if model_name_or_path == TINY_MODEL:
        overrides.setdefault("size", {"shortest_edge": TINY_SHORTEST_EDGE, "longest_edge": TINY_SHORTEST_EDGE * 4})
        return processor_cls(**overrides)
    local = Path(model_name_or_path).expanduser()
    is_local = local.exists()
    if is_local and (local / "preprocessor_config.json").is_file():
        _read_json_object(local / "preprocessor_config.json", "the image processor config")
    try:
        return processor_cls.from_pretrained(
            model_name_or_path, local_files_only=not is_local and not hub_is_reachable(), **overrides
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        where = "no usable preprocessor_config.json" if is_local else "offline, or no preprocessor_config.json"
        raise ModelLoadError(
            f"cannot load the image processor of {model_name_or_path!r} ({where}: {one_line(err)[:200]})"
        ) from err


def processor_shortest_edge(processor: Any) -> int | None:
    """The shortest edge an image processor resizes to, or None when it has none."""
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(min(get("height"), get("width")))
    return None
