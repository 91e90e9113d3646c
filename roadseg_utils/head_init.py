"""Label-aware class-head initialisation: new head rows start from the checkpoint's row of the same or a mapped class.

Mask2Former's class head is one linear layer with a row per class plus a last "no object" row. When a checkpoint's
classes differ from the target label set, each target row is copied from the checkpoint row its class maps to, the
"no object" row from the checkpoint's, and only unmatched classes keep a fresh initialisation. A class maps to the
checkpoint class of the same name, else by the built-in Cityscapes -> IDD map when the checkpoint has Cityscapes'
classes, else by a ``--label_mapping`` JSON file ``{"target class": "checkpoint class" or null}``, which overrides
both (null: start random). The map used is stored in ``config.json`` (``head_initialisation``) for the model card.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .labels import LabelSet
from .synthetic import CITYSCAPES_NAMES

logger = hf_logging.get_logger(__name__)

CONFIG_KEY = "head_initialisation"
NO_OBJECT = "no object"
# Target class (IDD names at levels 1-4) -> Cityscapes class whose row it starts from. Same names map themselves.
CITYSCAPES_TO_IDD: dict[str, str] = {
    "parking": "road",
    "drivable fallback": "terrain",
    "non-drivable fallback": "terrain",
    "rail track": "terrain",
    "curb": "sidewalk",
    "guard rail": "fence",
    "billboard": "traffic sign",
    "autorickshaw": "car",
    "vehicle fallback": "car",
    "caravan": "truck",
    "trailer": "truck",
    "polegroup": "pole",
    "bridge": "building",
    "tunnel": "building",
    "2-wheeler": "motorcycle",
    "car-auto": "car",
    "large-vehicle": "truck",
    "curb-wall": "wall",
    "fence-guard rail": "fence",
    "info-structures": "traffic sign",
    "construction": "building",
    "drivable": "road",
    "non-drivable": "sidewalk",
    "living-things": "person",
    "vehicles": "car",
    "far-objects": "building",
}


class LabelMappingError(ValueError):
    """A label mapping that cannot be used; the message names its file and the problem in one line."""


def read_label_mapping(path: str | Path) -> dict[str, str | None]:
    """The ``{"target class": "checkpoint class" | null}`` object of a ``--label_mapping`` JSON file."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelMappingError(f"{path}: label mapping file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelMappingError(f"{path}: label mapping is not readable JSON ({err})") from err
    if not isinstance(payload, dict) or not all(isinstance(v, str) or v is None for v in payload.values()):
        raise LabelMappingError(f"{path}: a label mapping is a JSON object of target class -> checkpoint class name "
                                "or null, e.g. {\"autorickshaw\": \"car\"}")
    return payload


def class_mapping(
    source_id2label: Mapping[int, str],
    target: LabelSet,
    overrides: Mapping[str, str | None] | None = None,
    source_name: str = "the mapping",
) -> dict[int, int]:
    """Target class id -> checkpoint class id: same names, then the Cityscapes -> IDD map, then ``overrides``."""
    source_ids = {name: idx for idx, name in source_id2label.items()}
    builtin = CITYSCAPES_TO_IDD if set(source_ids) >= set(CITYSCAPES_NAMES) else {}
    overrides = dict(overrides or {})
    for wanted, given in overrides.items():
        if wanted not in target.label2id:
            raise LabelMappingError(f"{source_name}: {wanted!r} is not a class of the label set {target.name}")
        if given is not None and given not in source_ids:
            raise LabelMappingError(f"{source_name}: {given!r} (for {wanted!r}) is not a class of the checkpoint; "
                                    f"its classes are {', '.join(source_id2label.values())}")
    mapping = {}
    for idx, name in target.id2label.items():
        origin = overrides.get(name) if name in overrides else name if name in source_ids else builtin.get(name)
        if origin is not None:
            mapping[idx] = source_ids[origin]
    return mapping


def _fresh_linear(model: nn.Module) -> nn.Linear:
    head = model.class_predictor
    fresh = nn.Linear(head.in_features, head.out_features)
    # The initialisation a new model gives its class head.
    model._init_weights(fresh)
    return fresh


def fresh_head(model: nn.Module) -> None:
    """Re-initialise every row of ``model.class_predictor`` ("no object" included), as a new model has it."""
    fresh = _fresh_linear(model)
    with torch.no_grad():
        model.class_predictor.weight.copy_(fresh.weight)
        model.class_predictor.bias.copy_(fresh.bias)


def initialise_head(
    model: nn.Module,
    source_head: tuple[torch.Tensor, torch.Tensor],
    source_id2label: Mapping[int, str],
    mapping: Mapping[int, int],
) -> dict[str, str | None]:
    """Fill ``model.class_predictor`` from the checkpoint's (weight, bias): mapped rows copied, the rest fresh.

    Returns (and stores in ``model.config``) target class -> checkpoint class (None: random), "no object" included.
    """
    head = model.class_predictor
    fresh = _fresh_linear(model)
    weight, bias = source_head
    rows = torch.tensor(sorted(mapping), dtype=torch.long)
    origins = torch.tensor([mapping[idx] for idx in sorted(mapping)], dtype=torch.long)
    with torch.no_grad():
        fresh.weight[rows] = weight[origins].to(fresh.weight.dtype)
        fresh.bias[rows] = bias[origins].to(fresh.bias.dtype)
        fresh.weight[-1] = weight[-1]
        fresh.bias[-1] = bias[-1]
        head.weight.copy_(fresh.weight)
        head.bias.copy_(fresh.bias)
    id2label = model.config.id2label
    record = {id2label[idx]: source_id2label[mapping[idx]] if idx in mapping else None for idx in sorted(id2label)}
    record[NO_OBJECT] = NO_OBJECT
    setattr(model.config, CONFIG_KEY, record)
    copied = sum(origin is not None for origin in record.values()) - 1
    logger.warning("class head: %d of %d rows copied from the checkpoint's classes (+ no object), %d start random%s",
                   copied, len(id2label), len(id2label) - copied,
                   ": " + ", ".join(name for name, origin in record.items() if origin is None) if copied < len(
                       id2label) else "")
    logger.info("class head rows: %s", ", ".join(f"{name} <- {origin}" for name, origin in record.items()))
    return record
