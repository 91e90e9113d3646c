"""The selection manifest: one row per pool image, as manifest.json and manifest.csv; reading it and applying it."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers.utils import logging

from ..atomic import write_text_atomically
from ..data import DataError, dataset_column
from ..labels import LabelSet

if TYPE_CHECKING:
    import datasets

    # strategies.py imports the format constants below, so Selection is only named in annotations here.
    from .strategies import Selection

logger = logging.get_logger(__name__)

MANIFEST_FORMAT = "roadseg-selection-manifest"
MANIFEST_VERSION = 1
MANIFEST_COLUMNS = ("path", "sequence", "cds", "rcs", "ics", "score", "rank", "selected")
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"


def manifest_rows(selection: Selection) -> list[dict[str, Any]]:
    """The manifest rows (docs/DESIGN.md columns) in rank order."""
    order = np.argsort(selection.rank, kind="stable")
    return [
        {"path": selection.paths[i], "sequence": selection.sequences[i], "cds": float(selection.cds[i]),
         "rcs": float(selection.rcs[i]), "ics": float(selection.ics[i]), "score": float(selection.score[i]),
         "rank": int(selection.rank[i]), "selected": bool(selection.selected[i])}
        for i in order
    ]


def write_manifest(selection: Selection, output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write manifest.json and manifest.csv (header as ``# key: value`` lines) atomically; no timestamps."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    header, rows = selection.header, manifest_rows(selection)
    body = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    json_text = '{"header": ' + json.dumps(header, indent=2, ensure_ascii=False) + ',\n"rows": [\n' + body + "\n]}\n"
    buffer = io.StringIO()
    for key, value in header.items():
        buffer.write(f"# {key}: {json.dumps(value, ensure_ascii=False)}\n")
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "cds": repr(row["cds"]), "rcs": repr(row["rcs"]), "ics": repr(row["ics"]),
                         "score": repr(row["score"]), "selected": "true" if row["selected"] else "false"})
    json_path, csv_path = output_dir / MANIFEST_JSON, output_dir / MANIFEST_CSV
    write_text_atomically(json_path, json_text)
    write_text_atomically(csv_path, buffer.getvalue())
    return json_path, csv_path


def _typed_row(row: dict[str, Any], source: str, line: int) -> dict[str, Any]:
    try:
        selected = row["selected"]
        if isinstance(selected, str):
            if selected.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"selected must be true or false, got {selected!r}")
            selected = selected.strip().lower() in ("true", "1")
        return {"path": str(row["path"]), "sequence": str(row["sequence"]), "cds": float(row["cds"]),
                "rcs": float(row["rcs"]), "ics": float(row["ics"]), "score": float(row["score"]),
                "rank": int(row["rank"]), "selected": bool(selected)}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{source}: manifest row {line} is malformed ({err!r})") from err


def load_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read manifest.json or manifest.csv: (header, rows) with typed columns (floats, int rank, bool selected)."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{source}: selection manifest does not exist") from err
    except OSError as err:
        raise DataError(f"{source}: cannot read the selection manifest ({err})") from err
    if source.endswith(".csv"):
        lines = text.splitlines()
        header_lines = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
        header: dict[str, Any] = {}
        for number, line in enumerate(header_lines, start=1):
            key, _, value = line[1:].strip().partition(": ")
            try:
                header[key] = json.loads(value)
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: header line {number} is not 'key: JSON value'") from err
        reader = csv.DictReader(lines[len(header_lines):])
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{source}: manifest lacks columns {sorted(missing)}")
        raw_rows: list[dict[str, Any]] = list(reader)
    else:
        try:
            payload = json.loads(text)
            header, raw_rows = payload["header"], payload["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{source}: not a selection manifest (expected JSON with 'header' and 'rows')") from err
        if not isinstance(header, dict) or not isinstance(raw_rows, list):
            raise DataError(f"{source}: not a selection manifest (expected JSON with 'header' and 'rows')")
    if header.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{source}: not a selection manifest (format {header.get('format')!r})")
    rows = [_typed_row(row, source, i + 1) for i, row in enumerate(raw_rows)]
    paths = [row["path"] for row in rows]
    if len(set(paths)) != len(paths):
        raise DataError(f"{source}: the manifest lists some paths twice")
    return header, rows


def selected_paths(manifest_path: str | os.PathLike[str]) -> set[str]:
    """The ``path`` ids of the selected rows, to match against a dataset's ``path`` column (train split)."""
    _, rows = load_manifest(manifest_path)
    return {row["path"] for row in rows if row["selected"]}


def select_training_rows(
    train: datasets.Dataset, held_out: list[datasets.Dataset], manifest_path: str, label_set: LabelSet
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The train rows a selection manifest marks as selected, and a summary of the selection for logs and card."""
    header, rows = load_manifest(manifest_path)
    chosen = {row["path"] for row in rows if row["selected"]}
    train_paths = [str(path) for path in dataset_column(train, "path")]
    keep = [index for index, path in enumerate(train_paths) if path in chosen]
    if not keep:
        raise DataError(
            f"{manifest_path}: none of its {len(chosen)} selected paths is in the train split "
            f"(e.g. {sorted(chosen)[:1]} vs {train_paths[:1]}); was it made from this dataset?"
        )
    held = sum(path in chosen for split in held_out for path in dataset_column(split, "path"))
    missing = len(chosen) - len(keep) - held
    manifest_labels = header.get("label_set", {}).get("name")
    if manifest_labels and manifest_labels != label_set.name:
        logger.warning(f"{manifest_path} was made with label set {manifest_labels}, this run uses {label_set.name}")
    if held:
        logger.warning(f"{held} selected images fell into the validation/test splits and stay out of training")
    if missing:
        logger.warning(f"{missing} selected paths of {manifest_path} are not in this dataset")
    logger.info(f"selection manifest {manifest_path}: training on {len(keep)} of {len(train_paths)} train images")
    rare = ", ".join(item["name"] for item in header.get("rare_classes", [])) or "none"
    summary = {
        "manifest": manifest_path,
        "strategy": header.get("strategy"),
        "formula": header.get("formula"),
        "weights (alpha, beta, gamma)": (header.get("alpha"), header.get("beta"), header.get("gamma")),
        "selected of candidates": f"{len(chosen)} of {header.get('num_candidates')}",
        "rare classes": rare,
        "pool fingerprint": header.get("dataset", {}).get("fingerprint"),
        "selected images trained on": len(keep),
        "selected images held out (validation/test)": held,
    }
    return train.select(keep), summary
