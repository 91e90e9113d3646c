"""Loading or building Mask2Former and its image processor: Hub id, local folder or offline tiny config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import transformers
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.utils import is_torchvision_available
from transformers.utils import logging as hf_logging

from .cli import one_line
from .hub import hub_is_reachable
from .labels import IGNORE_INDEX, LabelSet

logger = hf_logging.get_logger(__name__)

TINY_MODEL = "tiny"
DEFAULT_CHECKPOINT = "facebook/mask2former-swin-small-cityscapes-semantic"
TINY_SHORTEST_EDGE = 512


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message is one line a user can act on."""


def image_processor_class() -> type:
    """The Mask2Former image-processor class that works in this environment, without fallback warnings."""
    # Without torchvision transformers>=5 falls back to the PIL backend anyway, but warns on every load.
    if not is_torchvision_available() and hasattr(transformers, "Mask2FormerImageProcessorPil"):
        return transformers.Mask2FormerImageProcessorPil
    return transformers.Mask2FormerImageProcessor


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


def _check_local_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model folder not found")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json in this folder, so it is not a saved model")


def load_model(
    model_name_or_path: str,
    label_set: LabelSet | None,
    revision: str = "main",
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> Mask2FormerForUniversalSegmentation:
    """Load a Mask2Former from a Hub id or folder (or build ``tiny``) with the head sized to ``label_set``.

    ``label_set=None`` keeps the checkpoint's own head and ``id2label`` (evaluation); ``tiny`` needs a label set.
    """
    if model_name_or_path == TINY_MODEL:
        if label_set is None:
            raise ModelLoadError(f"--model_name_or_path {TINY_MODEL} needs a label set to size its head")
        logger.info("building a randomly initialised tiny Mask2Former (offline)")
        return Mask2FormerForUniversalSegmentation(build_tiny_config(label_set))
    local = Path(model_name_or_path).expanduser()
    if local.exists() or model_name_or_path.startswith((".", "/", "~")):
        _check_local_folder(local)
        source = str(local)
    else:
        source = model_name_or_path
    try:
        head = {} if label_set is None else {
            "id2label": dict(label_set.id2label), "label2id": label_set.label2id, "ignore_mismatched_sizes": True
        }
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            source,
            **head,
            output_loading_info=True,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            # Offline, go straight to the local cache instead of waiting through the Hub client's retries.
            local_files_only=source == model_name_or_path and not hub_is_reachable(),
        )
    except (OSError, ValueError) as err:
        if source != model_name_or_path:
            raise ModelLoadError(f"{source}: cannot load the model ({one_line(err)})") from err
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
    return model


def load_image_processor(model_name_or_path: str, shortest_edge: int | None = None, **kwargs: Any) -> Any:
    """The image processor of a checkpoint (or a default one for ``tiny``), set to ignore label 255."""
    processor_cls = image_processor_class()
    overrides = {"ignore_index": IGNORE_INDEX, "do_reduce_labels": False, **kwargs}
    if shortest_edge is not None:
        overrides["size"] = {"shortest_edge": shortest_edge, "longest_edge": shortest_edge * 4}
    if model_name_or_path == TINY_MODEL:
        overrides.setdefault("size", {"shortest_edge": TINY_SHORTEST_EDGE, "longest_edge": TINY_SHORTEST_EDGE * 4})
        return processor_cls(**overrides)
    is_local = Path(model_name_or_path).expanduser().exists()
    try:
        return processor_cls.from_pretrained(
            model_name_or_path, local_files_only=not is_local and not hub_is_reachable(), **overrides
        )
    except OSError as err:
        raise ModelLoadError(
            f"cannot load the image processor of {model_name_or_path!r} (offline, or no preprocessor_config.json)"
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
