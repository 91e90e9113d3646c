"""Finding, validating, loading and splitting segmentation datasets of every supported layout.

Every layout (IDD tree, image + mask folders, Hugging Face dataset, legacy pickle) ends as a
``datasets.DatasetDict`` with "train", "validation" and "test", whose rows follow docs/DESIGN.md: ``image``
(PIL RGB), ``label`` (2-D uint8 array of label ids, 255 = ignore), ``path`` (a stable id: for file layouts
the image path relative to the dataset root), ``sequence``, and for file layouts and the pickle ``height`` and
``width``.

The Arrow tables hold only paths (or compact bytes for the pickle); a formatting transform
(`SampleDecoder`) decodes a row when it is read, so loading 8,000 IDD images decodes none of them.
Two consequences for callers:
- add a per-batch transform with ``with_sample_transform(dataset, fn)``, not ``dataset.set_transform(fn)``
  (which would replace the decoding, and ``fn`` would see path strings);
- read plain columns with ``dataset_column(dataset, "path")``: ``dataset["path"]`` runs the transform and so
  decodes every image.

Import from here (``from roadseg_utils.data import ...``); the modules behind it:
- `arguments`: `DataSourceArguments` and the split names;
- `errors`: the `DataError` hierarchy;
- `idd`: IDD file naming and polygon rasterisation;
- `image_files`: opening stored images safely (regular files only, no decompression bombs, EXIF orientation
  applied), checking their integrity from headers and trailers, and `file_stamp` (a file's identity between runs);
- `decoding`: any stored image or label as a PIL RGB image or a uint8 label map, and `image_size` (the start-up
  check of an image);
- `layouts`: `SampleRecord` and `find_records` for an IDD tree or image/mask folders;
- `splits`: seeded splitting and subsampling;
- `label_cache`: `LabelCache`, the per-tree file of label-map facts (size, histogram, verdict) that selection,
  fine-tuning and evaluation share, and `label_cache_path` (where a source's cache lives);
- `validation`: the one bad-sample path, `validate_records` and `check_labelled` (a split without any labelled
  pixel is an error);
- `lazy_dataset`: `SampleDecoder`, `BadSampleGuard` (the bad-sample policy for rows read later, e.g. in DataLoader
  workers), `with_sample_transform`, `records_to_dataset`, `dataset_column`;
- `legacy_pickle` and `hf_source`: the pickle and Hugging Face sources;
- `builder`: `source_label_set` (the label set the arguments and the data name), `load_segmentation_dataset` and
  `load_split_records`.

`datasets` is imported inside the functions that build a dataset: it is slow to import
(`python -X importtime -c "import datasets"`), and finding or validating file layouts never needs it.
"""

from .arguments import ID2LABEL_FILE, SPLIT_ALIASES, SPLITS, DataSourceArguments
from .builder import load_segmentation_dataset, load_split_records, paths_fingerprint, source_label_set
from .decoding import NPY_MAGIC, image_size, label_level, read_label_map, to_label_map, to_rgb_image
from .errors import (
    BadSampleError,
    DataError,
    EmptyDatasetError,
    HubDatasetUnavailableError,
    LabelValueError,
    MissingMaskError,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    UnsafePickleError,
)
from .idd import (
    GROUP_SUFFIX,
    IDD_IMAGE_SUFFIX,
    IDD_POLYGON_SUFFIX,
    idd_frame_name,
    idd_label_suffix,
    rasterize_polygons,
)
from .image_files import check_regular_file, file_stamp
from .label_cache import LabelCache, label_cache_path
from .layouts import IMAGE_EXTENSIONS, SampleRecord, find_records
from .lazy_dataset import BadSampleGuard, SampleDecoder, dataset_column, records_to_dataset, with_sample_transform
from .legacy_pickle import load_legacy_pickle
from .splits import assign_splits, split_dataset, split_records, subsample
from .validation import (
    ON_BAD_SAMPLE_MODES,
    VALIDATION_CHUNK,
    SampleVerdict,
    ValidationResult,
    check_labelled,
    check_on_bad_sample,
    label_value_problem,
    sort_samples,
    validate_records,
)

__all__ = [
    "GROUP_SUFFIX",
    "IDD_IMAGE_SUFFIX",
    "IDD_POLYGON_SUFFIX",
    "ID2LABEL_FILE",
    "IMAGE_EXTENSIONS",
    "LabelCache",
    "NPY_MAGIC",
    "ON_BAD_SAMPLE_MODES",
    "SPLITS",
    "SPLIT_ALIASES",
    "VALIDATION_CHUNK",
    "BadSampleError",
    "BadSampleGuard",
    "DataError",
    "DataSourceArguments",
    "EmptyDatasetError",
    "HubDatasetUnavailableError",
    "LabelValueError",
    "MissingMaskError",
    "SampleDecoder",
    "SampleRecord",
    "SampleVerdict",
    "SizeMismatchError",
    "UnreadableImageError",
    "UnreadableMaskError",
    "UnsafePickleError",
    "ValidationResult",
    "assign_splits",
    "check_labelled",
    "check_regular_file",
    "check_on_bad_sample",
    "dataset_column",
    "file_stamp",
    "find_records",
    "idd_frame_name",
    "idd_label_suffix",
    "image_size",
    "label_level",
    "label_cache_path",
    "label_value_problem",
    "load_legacy_pickle",
    "load_segmentation_dataset",
    "load_split_records",
    "paths_fingerprint",
    "rasterize_polygons",
    "read_label_map",
    "records_to_dataset",
    "sort_samples",
    "source_label_set",
    "split_dataset",
    "split_records",
    "subsample",
    "to_label_map",
    "to_rgb_image",
    "validate_records",
    "with_sample_transform",
]
