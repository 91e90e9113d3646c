"""Per-image scores from a model instead of labels: predicted class histograms, uncertainty and pooled embeddings.

One forward pass per batch under ``torch.inference_mode()`` gives all three. Images are decoded at a reduced size
(shortest edge ``prediction_size``, JPEGs drafted by their decoder at a fraction of full size), batched and
normalised with the model's image processor statistics; a background thread decodes the next batch while the model
runs. Everything is read at the resolution of Mask2Former's mask logits (a quarter of the input side), with no
upsampling and no post-processing call: the per-pixel semantic class probabilities are upstream's (class
probabilities without "no object" times mask sigmoids, summed over queries) normalised over the classes, so

- the **histogram** counts the argmax class of each pixel of that grid (pixel counts are at the reduced size, so
  ``--min_pixels`` counts reduced pixels);
- the **uncertainty** is the mean per-pixel entropy of those probabilities in nats, over the image's real pixels;
- the **embedding** is the encoder's last feature map averaged over the image's real pixels.

Results are cached in ``model_predictions.npz`` keyed by image file (`file_stamp`) and model fingerprint, written
every few batches, so an interrupted pass resumes where it stopped and a rerun with other weights loads no model.
With several accelerate processes each one takes every n-th image, keeps its own ``model_predictions.part<rank>.npz``
and the main process merges them at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from transformers.utils import logging

from ..atomic import write_atomically
from ..data import SampleVerdict, UnreadableImageError, file_stamp, sort_samples
from ..data.image_files import STAMP_FIELDS, decode_upright, open_stored_image
from ..labels import LabelSet
from .arguments import SelectionError
from .class_stats import ClassStats
from .pool import CandidatePool

logger = logging.get_logger(__name__)

PREDICTION_CACHE = "model_predictions.npz"
PREDICTION_CACHE_VERSION = 2  # 2: unreadable images kept with their problem
DEFAULT_PREDICTION_SIZE = 256
# Mask2Former predicts mask logits at a quarter of the input side; the input is padded to a multiple of 32.
MASK_STRIDE = 4
SIZE_DIVISOR = 32
# Batches between cache saves: an interrupted pass loses at most this many batches.
SAVE_EVERY = 8
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ARRAYS = ("version", "fingerprint", "keys", "stamps", "histograms", "uncertainty", "embeddings", "problems")
# ImageNet statistics, the default of Mask2Former's image processor (a checkpoint's own processor may differ).
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, eq=False)
class ModelScores:
    """Model-derived statistics of the usable pool images, in pool order."""

    stats: ClassStats  # predicted histograms in the shape of label histograms, so scoring is unchanged
    uncertainty: np.ndarray  # (N,) mean per-pixel entropy in nats
    embeddings: np.ndarray  # (N, D) float32 pooled encoder features
    model: dict[str, str]  # name and fingerprint, for the manifest
    inferred: int  # images run through the model by this call; the others came from the cache


def _stamp_of_files(folder: Path) -> list[Any]:
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return [(name, *file_stamp(folder / name)) for name in names]


def model_fingerprint(model_name_or_path: str, prediction_size: int, precision: str, seed: int = 0) -> str:
    """What tells a model's predictions apart without loading it: its files' stamps (a folder), its name (a Hub id or
    ``tiny`` with the seed that initialises it), the prediction size and the precision."""
    folder = Path(model_name_or_path).expanduser()
    identity: list[Any] = [model_name_or_path, prediction_size, precision]
    if folder.is_dir():
        identity += [str(folder.resolve()), _stamp_of_files(folder)]
    else:
        identity.append(seed)
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]


def check_model_labels(model_name_or_path: str, label_set: LabelSet) -> None:
    """A model folder whose classes differ from ``label_set``: one line saying which (read from config.json only)."""
    config = Path(model_name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return
    try:
        id2label = {int(k): str(v) for k, v in json.loads(config.read_text()).get("id2label", {}).items()}
    except (ValueError, AttributeError) as err:
        raise SelectionError(f"{config}: unreadable id2label ({err})") from err
    expected = dict(label_set.id2label)
    if id2label != expected:
        extra = sorted(set(id2label.values()) - set(expected.values()))
        missing = sorted(set(expected.values()) - set(id2label.values()))
        detail = f"{len(id2label)} classes, {len(expected)} expected"
        if extra or missing:
            detail += f"; not in {label_set.name}: {extra[:5]}; missing: {missing[:5]}"
        else:
            detail += "; same names in another order"
        raise SelectionError(f"--model_name_or_path {model_name_or_path}: its labels differ from --label_set "
                             f"{label_set.name} ({detail})")


class PredictionCache:
    """Histograms, uncertainty and embeddings keyed by image file and stamp, for one model fingerprint; an image that
    cannot be decoded is kept with its problem (an empty problem: a good image), so a rerun loads no model for it."""

    def __init__(self, folder: Path, fingerprint: str, rank: int = 0) -> None:
        self.folder, self.fingerprint, self.rank = folder, fingerprint, rank
        self.entries: dict[str, tuple[tuple[int, ...], np.ndarray, float, np.ndarray | None, str]] = {}
        for path in [folder / PREDICTION_CACHE, *sorted(folder.glob("model_predictions.part*.npz"))]:
            self._read(path)
        self._dirty = False

    def _read(self, path: Path) -> None:
        if not path.is_file():
            return
        try:
            with np.load(path, allow_pickle=False) as stored:
                if set(stored.files) != set(_ARRAYS) or int(stored["version"]) != PREDICTION_CACHE_VERSION:
                    raise ValueError("not a prediction cache of this version")
                if str(stored["fingerprint"]) != self.fingerprint:
                    return  # another model's predictions: this run replaces them
                arrays = {name: stored[name] for name in _ARRAYS}
        except Exception as err:  # a truncated or foreign file: infer again
            logger.warning(f"{path}: unreadable prediction cache ({type(err).__name__}: {err}); rebuilding it")
            return
        for i, key in enumerate(arrays["keys"].tolist()):
            self.entries[key] = (tuple(arrays["stamps"][i].tolist()), arrays["histograms"][i],
                                 float(arrays["uncertainty"][i]), arrays["embeddings"][i], str(arrays["problems"][i]))

    def get(self, key: str, stamp: tuple[int, ...]) -> tuple[np.ndarray, float, np.ndarray | None, str] | None:
        """(histogram, uncertainty, embedding, problem) of a file whose stamp is unchanged, else None."""
        entry = self.entries.get(key)
        return entry[1:] if entry is not None and entry[0] == stamp else None

    def add(self, key: str, stamp: tuple[int, ...], histogram: np.ndarray, uncertainty: float,
            embedding: np.ndarray) -> None:
        """Remember one image's results (written by `save_part`)."""
        self.entries[key] = (stamp, histogram, uncertainty, embedding, "")
        self._dirty = True

    def add_problem(self, key: str, stamp: tuple[int, ...], problem: str) -> None:
        """Remember why an image cannot be decoded (written by `save_part`)."""
        self.entries[key] = (stamp, np.zeros(256, np.int64), float("nan"), None, problem)
        self._dirty = True

    def _write(self, path: Path, keys: list[str]) -> None:
        width = next((self.entries[k][3].shape[0] for k in keys if self.entries[k][3] is not None), 0)
        embeddings = [self.entries[k][3] if self.entries[k][3] is not None else np.zeros(width) for k in keys]
        write_atomically(path, lambda stream: np.savez(
            stream, version=np.int64(PREDICTION_CACHE_VERSION), fingerprint=np.array(self.fingerprint),
            keys=np.array(keys, dtype=str),
            stamps=np.array([self.entries[k][0] for k in keys], dtype=np.int64).reshape(-1, STAMP_FIELDS),
            histograms=np.array([self.entries[k][1] for k in keys], dtype=np.int64).reshape(-1, 256),
            uncertainty=np.array([self.entries[k][2] for k in keys], dtype=np.float64),
            embeddings=np.array(embeddings, dtype=np.float32).reshape(-1, width),
            problems=np.array([self.entries[k][4] for k in keys], dtype=str),
        ))

    def save_part(self) -> None:
        """This process's entries so far, so an interrupted pass resumes from them."""
        if self._dirty:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write(self.folder / f"model_predictions.part{self.rank}.npz", sorted(self.entries))
            self._dirty = False

    def merge(self) -> None:
        """Every process's entries into ``model_predictions.npz`` (main process, after all parts are saved)."""
        self.entries.clear()
        parts = sorted(self.folder.glob("model_predictions.part*.npz"))
        for path in [self.folder / PREDICTION_CACHE, *parts]:
            self._read(path)
        if parts or not (self.folder / PREDICTION_CACHE).is_file():
            self._write(self.folder / PREDICTION_CACHE, sorted(self.entries))
        for path in parts:
            path.unlink(missing_ok=True)


def reduced_size(height: int, width: int, prediction_size: int) -> tuple[int, int]:
    """(height, width) with the shortest edge at ``prediction_size``, aspect kept."""
    scale = prediction_size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_reduced(source: str | bytes, prediction_size: int, name: str | None = None) -> np.ndarray:
    """An image file (or its bytes, called ``name`` in errors) as (H, W, 3) uint8 at the reduced size; JPEGs are
    drafted by the decoder near that size."""
    problem = lambda text: UnreadableImageError(name or str(source), text)  # noqa: E731
    with open_stored_image(source, problem) as image:
        target = reduced_size(image.height, image.width, prediction_size)
        if image.format == "JPEG":
            image.draft("RGB", (target[1], target[0]))
        image = decode_upright(image, problem).convert("RGB")
        target = reduced_size(image.height, image.width, prediction_size)
        image = image.resize((target[1], target[0]), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.array(image)  # writable, so torch.from_numpy takes it without a warning


def stack_batch(
    images: Sequence[np.ndarray], mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel values padded (bottom, right) to a common multiple of 32, and the pixel mask."""
    height = -(-max(image.shape[0] for image in images) // SIZE_DIVISOR) * SIZE_DIVISOR
    width = -(-max(image.shape[1] for image in images) // SIZE_DIVISOR) * SIZE_DIVISOR
    pixels = torch.zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        pixels[i, :, :h, :w] = (torch.from_numpy(image).permute(2, 0, 1).float().div_(255) - mean) / std
        mask[i, :h, :w] = 1
    return pixels, mask


def batch_statistics(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, encoder_features: torch.Tensor, pixel_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 256) predicted-class pixel counts, (B,) mean entropy and (B, D) pooled features at the mask-logit grid."""
    class_logits, mask_logits, encoder_features = class_logits.float(), mask_logits.float(), encoder_features.float()
    batch, _, height, width = mask_logits.shape
    class_probs = class_logits.softmax(-1)[..., :-1]
    scores = torch.einsum("bqc,bqhw->bchw", class_probs, mask_logits.sigmoid())
    probs = scores / scores.sum(1, keepdim=True).clamp_min(1e-12)
    valid = torch.nn.functional.interpolate(pixel_mask[:, None].float(), size=(height, width), mode="nearest")[:, 0]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    counts = valid.sum((1, 2)).clamp_min(1)
    uncertainty = (entropy * valid).sum((1, 2)) / counts
    labels = scores.argmax(1) + torch.arange(batch, device=scores.device)[:, None, None] * 256
    histograms = torch.bincount(labels[valid.bool()], minlength=batch * 256).view(batch, 256)
    feature_valid = torch.nn.functional.interpolate(valid[:, None], size=encoder_features.shape[-2:], mode="nearest")
    pooled = (encoder_features * feature_valid).sum((2, 3)) / feature_valid.sum((2, 3)).clamp_min(1)
    return histograms, uncertainty, pooled


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: ``auto`` is bf16 on a GPU that has it, fp16 on another GPU,
    fp32 (None) on the CPU, where low precision is slower."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _decoded_batches(
    images: Sequence[tuple[str | bytes, str]], batch_size: int, prediction_size: int
) -> Iterator[list[tuple[int, np.ndarray | None, str | None]]]:
    """Batches of (position, image or None, problem) decoded one batch ahead by a background thread."""
    def decode(start: int) -> list[tuple[int, np.ndarray | None, str | None]]:
        out: list[tuple[int, np.ndarray | None, str | None]] = []
        for position in range(start, min(start + batch_size, len(images))):
            source, name = images[position]
            try:
                out.append((position, decode_reduced(source, prediction_size, name), None))
            except UnreadableImageError as err:
                out.append((position, None, err.problem))
        return out

    starts = range(0, len(images), batch_size)
    with ThreadPoolExecutor(max_workers=1) as decoder:
        pending = decoder.submit(decode, starts[0]) if starts else None
        for following in [*starts[1:], None]:
            ready = pending.result()
            pending = decoder.submit(decode, following) if following is not None else None
            yield ready


def run_model_pass(
    model: torch.nn.Module, images: Sequence[tuple[str | bytes, str]], batch_size: int, prediction_size: int,
    device: torch.device, dtype: torch.dtype | None, mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    on_result: Callable[[int, np.ndarray, float, np.ndarray], None] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict[int, str]:
    """Run ``model`` over (file or bytes, name) images; ``on_result(position, histogram, uncertainty, embedding)``
    for each readable one, ``on_batch()`` after each batch. Returns the problem of each unreadable one by position."""
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    problems: dict[int, str] = {}
    with torch.inference_mode():
        for batch in _decoded_batches(images, batch_size, prediction_size):
            problems.update({position: problem for position, image, problem in batch if image is None})
            good = [(position, image) for position, image, _ in batch if image is not None]
            if good:
                pixels, mask = stack_batch([image for _, image in good], mean_t, std_t)
                pixels, mask = pixels.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    outputs = model(pixel_values=pixels, pixel_mask=mask)
                histograms, uncertainty, pooled = batch_statistics(
                    outputs.class_queries_logits, outputs.masks_queries_logits, outputs.encoder_last_hidden_state,
                    mask)
                histograms, uncertainty, pooled = histograms.cpu().numpy(), uncertainty.cpu().numpy(), pooled.cpu()
                for i, (position, _) in enumerate(good):
                    if on_result is not None:
                        on_result(position, histograms[i], float(uncertainty[i]), pooled[i].numpy())
            if on_batch is not None:
                on_batch()
    return problems


def process_state() -> PartialState:
    """This process's place under ``accelerate launch`` (one process without it); CPU processes when there is no GPU
    or ACCELERATE_USE_CPU is set, as `Accelerator` decides."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def _processor_statistics(model_name_or_path: str) -> tuple[Sequence[float], Sequence[float]]:
    config = Path(model_name_or_path).expanduser() / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        return values.get("image_mean", _DEFAULT_MEAN), values.get("image_std", _DEFAULT_STD)
    return _DEFAULT_MEAN, _DEFAULT_STD


def compute_model_scores(
    pool: CandidatePool,
    label_set: LabelSet,
    model_name_or_path: str,
    cache_dir: Path,
    load: Callable[[], torch.nn.Module],
    batch_size: int = 8,
    prediction_size: int = DEFAULT_PREDICTION_SIZE,
    precision: str = "auto",
    on_bad_sample: str = "error",
    seed: int = 0,
) -> ModelScores:
    """Predicted histograms, uncertainty and embeddings of every pool image: cached ones reused, the rest inferred.

    ``load`` builds the model; it is called only when some image is not cached. Under ``accelerate launch`` each
    process infers every n-th missing image. An unreadable image raises `UnreadableImageError` naming it, or with
    ``on_bad_sample="skip"`` is left out and counted.
    """
    state = process_state()
    sources = pool.image_sources()
    names = [source if isinstance(source, str) else path for source, path in zip(sources, pool.paths, strict=True)]
    fingerprint = model_fingerprint(model_name_or_path, prediction_size, precision, seed)
    cache = PredictionCache(cache_dir, fingerprint, state.process_index)
    keys, stamps = _cache_keys(pool, sources)
    missing = [i for i, key in enumerate(keys) if cache.get(key, stamps[i]) is None]
    problems: dict[int, str] = {}
    inferred = 0
    if missing:
        mine = missing[state.process_index::state.num_processes]
        logger.info(f"running {model_name_or_path} over {len(missing)} images ({len(sources) - len(missing)} cached)")
        model = load().to(state.device).eval()
        _check_loaded_labels(model, model_name_or_path, label_set)
        saved = [0]

        def keep(position: int, histogram: np.ndarray, uncertainty: float, embedding: np.ndarray) -> None:
            index = mine[position]
            cache.add(keys[index], stamps[index], histogram, uncertainty, embedding)

        def checkpoint() -> None:
            saved[0] += 1
            if saved[0] % SAVE_EVERY == 0:
                cache.save_part()

        mean, std = _processor_statistics(model_name_or_path)
        local = run_model_pass(model, [(sources[i], names[i]) for i in mine], batch_size, prediction_size, state.device,
                               autocast_dtype(precision, state.device), mean, std, keep, checkpoint)
        problems = {mine[position]: problem for position, problem in local.items()}
        for index, problem in problems.items():
            if stamps[index][0] >= 0:  # a file that could not even be stat'ed is tried again next time
                cache.add_problem(keys[index], stamps[index], problem)
        inferred = len(mine)
        cache.save_part()
        state.wait_for_everyone()
        if state.is_main_process:
            cache.merge()
        state.wait_for_everyone()
        cache = PredictionCache(cache_dir, fingerprint, state.process_index)
    if state.num_processes > 1:
        problems = _gather_problems(problems)
    for index, key in enumerate(keys):
        entry = cache.get(key, stamps[index])
        if entry is not None and entry[3]:  # an image whose problem is cached
            problems[index] = entry[3]
    verdicts = (SampleVerdict(names[i], UnreadableImageError, problems[i]) if i in problems else SampleVerdict("")
                for i in range(len(sources)))
    keep_indices, _, skipped = sort_samples(verdicts, on_bad_sample, pool.source)
    entries = [cache.get(keys[i], stamps[i]) for i in keep_indices]
    histograms = np.stack([entry[0] for entry in entries]).astype(np.int64)
    uncertainty = np.array([entry[1] for entry in entries], dtype=np.float64)
    embeddings = np.stack([entry[2] for entry in entries]).astype(np.float32)
    subset = pool if len(keep_indices) == len(pool) else pool.subset(keep_indices)
    stats = ClassStats(subset, histograms, skipped, inferred)
    return ModelScores(stats, uncertainty, embeddings, {"name": model_name_or_path, "fingerprint": fingerprint},
                       inferred)


def _check_loaded_labels(model: torch.nn.Module, model_name_or_path: str, label_set: LabelSet) -> None:
    """A loaded model (e.g. from the Hub, whose config was not read before) must predict ``label_set``'s classes."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label is not None and {int(k): str(v) for k, v in id2label.items()} != dict(label_set.id2label):
        raise SelectionError(f"--model_name_or_path {model_name_or_path}: its labels differ from --label_set "
                             f"{label_set.name} ({len(id2label)} classes, {label_set.num_labels} expected)")


def _cache_keys(pool: CandidatePool, sources: list[str | bytes]) -> tuple[list[str], list[tuple[int, ...]]]:
    """Cache keys and stamps: a file's absolute path and `file_stamp`; a dataset row's fingerprint and path."""
    if pool.records is None:
        return [f"dataset:{pool.dataset._fingerprint}:{path}" for path in pool.paths], [(0,) * STAMP_FIELDS] * len(pool)
    keys, stamps = [], []
    for path in sources:
        keys.append(os.path.abspath(path))
        try:
            stamps.append(file_stamp(path))
        except OSError:
            stamps.append((-1,) * STAMP_FIELDS)
    return keys, stamps


def _gather_problems(problems: dict[int, str]) -> dict[int, str]:
    from accelerate.utils import gather_object

    merged: dict[int, str] = {}
    for part in gather_object([problems]):
        merged.update(part)
    return merged
