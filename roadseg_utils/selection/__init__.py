"""Choosing the most informative training images: per-image class statistics, scores, strategies, manifest I/O.

Selection ranks the *training pool* of a data source: the images of its train split as found (an IDD tree's
``leftImg8bit/train``, every image of flat folders, a Hugging Face dataset's train split). Validation and test are
never ranked and never filtered. Each image gets three scores from the pixel histogram of its label map:

- CDS, class diversity: the Shannon entropy in nats of its class pixel distribution (``entropy``), or the number
  of classes present (``count``); a class is present with at least ``min_pixels`` pixels.
- RCS, rare-class score: the number of present classes of the rare set (``count``), or the sum over present
  classes of ``-ln f_c``, where ``f_c`` is the share of pool images containing class c (``neglog``).
- ICS: the inverse of the number of pool images in the image's sequence folder (``inverse``), or that number
  (``count``).

The seed's score is ``count`` / ``neglog`` / ``count``. The defaults differ because the seed's score is not
rare-seeking: summing ``-ln f_c`` over every present class rewards clutter (many mid-frequency classes) over one
rare class, and counting classes and sequence sizes pushes the same way, so classes that come with sparse scenes
(guard rails on highways) end up under-represented, below a random subset of the same size.

``score = alpha * cds / max(cds) + beta * rcs / max(rcs) + gamma * ics / max(ics)`` (a term whose maximum is 0 is
0), plus ``delta * uncertainty / max(uncertainty)`` when a model's uncertainty is weighed (``delta`` > 0). With
``label_source="model"`` the histograms are those of the maps a model predicts (`model_scores`), so the pool needs
no masks.

The manifest (docs/DESIGN.md) holds one row per pool image; ``selected_paths(manifest)`` gives the ``path`` ids
of the chosen rows, the same ids as the dataset's ``path`` column (`SampleRecord.path`: relative to the data root),
so ``run_finetune.py --selection_manifest`` keeps exactly those rows of its train split.

Before ranking, every sample is checked (the image's header, the mask decoded, their sizes, the label values); a bad
one stops the run or, with ``on_bad_sample="skip"``, is left out and never ranked. Verdicts and histograms are kept
in the data's label cache (`roadseg_utils.data.label_cache`, shared with fine-tuning and evaluation) keyed by both
files' paths and stamps (size, mtime, ctime, inode), so a rerun with other weights or another budget reads no image
and decodes no label map, and a replaced file is always checked again.

Modules: `arguments` (options and modes), `pool` (the training pool), `class_stats` (sample checks
and label histograms), `model_scores` (predicted histograms, uncertainty and embeddings from one model pass,
cached), `diversity` (k-center greedy), `scoring` (CDS, RCS, ICS, budget, rare set), `strategies` (orders and
`select_images`), `manifest`, `report` (report.md and plots) and `export` (writing the subset, pushing it to the Hub).
"""

from ..data.label_cache import CACHE_FILE, CACHE_VERSION, PNG_SIGNATURE, LabelCache, label_map_counts
from .arguments import (
    CDS_MODES,
    DEFAULT_NUM_IMAGES,
    ICS_MODES,
    LABEL_SOURCES,
    MATERIALIZE_MODES,
    RCS_MODES,
    STRATEGIES,
    SelectionArguments,
    SelectionError,
    check_json_arguments,
    check_weights,
)
from .class_stats import HISTOGRAM_CHUNK, ClassStats, compute_class_stats
from .diversity import k_center_greedy
from .export import (
    SUBSET_MARKER,
    check_materialize_target,
    materialize_dataset,
    materialize_files,
    push_subset_to_hub,
    remove_stale_staging,
)
from .manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_CSV,
    MANIFEST_FORMAT,
    MANIFEST_JSON,
    MANIFEST_VERSION,
    load_manifest,
    manifest_rows,
    select_training_rows,
    selected_paths,
    write_manifest,
)
from .model_scores import (
    DEFAULT_PREDICTION_SIZE,
    PREDICTION_CACHE,
    ModelScores,
    PredictionCache,
    check_model_labels,
    compute_model_scores,
    model_fingerprint,
    process_state,
)
from .pool import SUBSAMPLE_SALT, CandidatePool, load_candidate_pool
from .report import PLOT_FILES, REPORT_FILE, render_report, strategy_comparison, study_section, write_plots
from .scoring import (
    FORMULA,
    class_diversity,
    class_presence,
    image_frequency,
    rare_class_score,
    resolve_budget,
    resolve_rare_classes,
    sequence_score,
    weighted_score,
)
from .strategies import (
    CLASS_DRAW_BATCH,
    RANDOM_SALT,
    RARE_CLASS_SALT,
    Selection,
    diversity_order,
    random_order,
    rare_class_sampling_order,
    select_images,
    strategy_order,
    weighted_order,
)

__all__ = [
    "process_state",
    "study_section",
    "diversity_order",
    "LABEL_SOURCES",
    "k_center_greedy",
    "model_fingerprint",
    "compute_model_scores",
    "check_model_labels",
    "PredictionCache",
    "ModelScores",
    "PREDICTION_CACHE",
    "DEFAULT_PREDICTION_SIZE",
    "CACHE_FILE",
    "CACHE_VERSION",
    "CDS_MODES",
    "CLASS_DRAW_BATCH",
    "DEFAULT_NUM_IMAGES",
    "FORMULA",
    "HISTOGRAM_CHUNK",
    "ICS_MODES",
    "MANIFEST_COLUMNS",
    "MANIFEST_CSV",
    "MANIFEST_FORMAT",
    "MANIFEST_JSON",
    "MANIFEST_VERSION",
    "MATERIALIZE_MODES",
    "PLOT_FILES",
    "PNG_SIGNATURE",
    "RANDOM_SALT",
    "RARE_CLASS_SALT",
    "RCS_MODES",
    "REPORT_FILE",
    "STRATEGIES",
    "SUBSAMPLE_SALT",
    "SUBSET_MARKER",
    "CandidatePool",
    "ClassStats",
    "LabelCache",
    "Selection",
    "SelectionArguments",
    "SelectionError",
    "check_json_arguments",
    "check_materialize_target",
    "check_weights",
    "class_diversity",
    "class_presence",
    "compute_class_stats",
    "image_frequency",
    "label_map_counts",
    "load_candidate_pool",
    "load_manifest",
    "manifest_rows",
    "select_training_rows",
    "materialize_dataset",
    "materialize_files",
    "push_subset_to_hub",
    "random_order",
    "rare_class_sampling_order",
    "rare_class_score",
    "remove_stale_staging",
    "render_report",
    "resolve_budget",
    "resolve_rare_classes",
    "select_images",
    "selected_paths",
    "sequence_score",
    "strategy_comparison",
    "strategy_order",
    "weighted_order",
    "weighted_score",
    "write_manifest",
    "write_plots",
]
