"""Hugging Face datasets: a hub id (from the local HF cache when offline) or local parquet, arrow,
json or csv files, through the `datasets` library.

Images are read from the dataset's memory-mapped Arrow files as encoded bytes and go the way of
an image folder (data/images.py: in memory when small, decoded in workers when not); text is
written out once as one file and tokenized like any text (data/text.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import DataModule, split_indices
from trainer.data.files import ImageSource
from trainer.errors import UserError

log = logging.getLogger("trainer")

SPLITS = {"train": "train", "val": "validation", "test": "test"}
FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
                ".csv": "csv"}


class HFImages(ImageSource):
    """The encoded images of one column of a Hugging Face dataset (rows `rows` of it)."""

    def __init__(self, dataset: Any, column: str, labels: np.ndarray, size: int, channels: int,
                 name: str) -> None:
        from datasets import Image

        super().__init__(labels, size, channels)
        # decode=False: the bytes as stored, decoded by torchvision in the workers, not by PIL.
        self.dataset = dataset.select_columns([column]).cast_column(column, Image(decode=False))
        self.column, self.name = column, name
        self.rows = np.arange(len(dataset))

    def encoded(self, i: int) -> str | bytes:
        cell = self.dataset[int(self.rows[i])][self.column]
        return cell["bytes"] if cell.get("bytes") is not None else cell["path"]

    def describe(self, i: int) -> str:
        return f"{self.name} row {int(self.rows[i])}"

    def _select(self, index: np.ndarray) -> None:
        self.rows = self.rows[index]


def hf(name: str, subset: str | None = None, splits: dict | None = None,
       image_column: str | None = None, label_column: str | None = None,
       text_column: str | None = None, image_size: int = 32, grayscale: bool = False,
       block_size: int = 64, tokenizer: str = "char", vocab_size: int = 512,
       batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.1,
       augment: str = "none", in_memory: bool | str = "auto", num_workers: int | None = None,
       skip_bad_files: bool = False, streaming: bool = False, shuffle_buffer: int = 10_000,
       seed: int = 0) -> DataModule:
    """A Hugging Face dataset. `splits` maps train/val/test to the dataset's split names; a split
    it lacks is drawn from the training split by seed (val_fraction, test_fraction of it).
    `streaming` reads image rows as a stream (data/streams.py) instead of through an Arrow copy
    on disk."""
    loaded = _load(name, subset, streaming)
    mapping = {**SPLITS, **(splits or {})}
    if mapping["train"] not in loaded:
        raise UserError(f"data.name={name!r} has no split {mapping['train']!r}; it has "
                        f"{', '.join(loaded)}: set data.splits.train=NAME")
    train = loaded[mapping["train"]]
    columns = list(train.features or [])
    image_column = image_column or _first(train, "Image")
    text_column = text_column if text_column or image_column else _text_column(train)
    for key, column in (("image_column", image_column), ("label_column", label_column),
                        ("text_column", text_column)):
        if column is not None and column not in columns:
            raise UserError(f"data.{key}={column!r} is not a column of {name}; its columns are "
                            f"{', '.join(columns)}")
    present = {part: loaded[mapping[part]] for part in ("val", "test") if mapping[part] in loaded}
    short = Path(name).name or name
    if streaming:
        return _streamed_images(name, subset, loaded, mapping, image_column, label_column,
                                image_size, grayscale, batch_size, augment, num_workers,
                                skip_bad_files, shuffle_buffer, seed)
    if image_column:
        return _images(short, train, present, image_column, label_column, image_size,
                       grayscale, batch_size, val_fraction, test_fraction, augment, in_memory,
                       num_workers, skip_bad_files, seed)
    if text_column:
        return _text(short, train, present, text_column, block_size, tokenizer, vocab_size,
                     batch_size, val_fraction, test_fraction, seed)
    raise UserError(f"data.name={name!r} has no image or text column (its columns are "
                    f"{', '.join(columns)}): set data.image_column or data.text_column")


def _load(name: str, subset: str | None, streaming: bool = False) -> Any:
    """A DatasetDict from a local file, a local folder, or the hub (or its local cache)."""
    import datasets

    path = Path(name)
    try:
        if path.is_file():
            if path.suffix not in FILE_FORMATS:
                raise UserError(f"data.name={name!r}: a file must be one of "
                                f"{', '.join(FILE_FORMATS)}")
            return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path),
                                         streaming=streaming)
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(path))  # saved with save_to_disk
            return datasets.IterableDatasetDict(
                {split: part.to_iterable_dataset() for split, part in saved.items()}) \
                if streaming else saved
        return datasets.load_dataset(name, subset, streaming=streaming)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise UserError(f"data.name={name!r} could not be loaded "
                        f"({' '.join(str(error).split())[:200]}); give a hub id that is in the "
                        "local Hugging Face cache (offline) or a folder or file of parquet, "
                        "arrow, json or csv") from None


def _first(dataset: Any, feature_type: str) -> str | None:
    return next((column for column, feature in dataset.features.items()
                 if type(feature).__name__ == feature_type), None)


def _text_column(dataset: Any) -> str | None:
    if "text" in dataset.features:
        return "text"
    return next((column for column, feature in dataset.features.items()
                 if getattr(feature, "dtype", None) in ("string", "large_string")), None)


def _labels(dataset: Any, column: str | None, classes: Sequence[str] | None
            ) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names: a ClassLabel's names, else the sorted distinct values."""
    if column is None:
        return np.zeros(len(dataset), dtype=np.int64), []  # no classes: a classifier refuses
    values = dataset[column]
    feature = dataset.features[column]
    if classes is None:
        classes = list(getattr(feature, "names", None) or sorted({str(v) for v in values}))
    if hasattr(feature, "names"):
        return np.asarray(values, dtype=np.int64), list(classes)
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = {str(v) for v in values} - lookup.keys()
    if unknown:
        raise UserError(f"data.label_column={column!r}: labels {sorted(unknown)[:5]} are not "
                        f"in the training split's classes")
    return np.asarray([lookup[str(v)] for v in values], dtype=np.int64), list(classes)


def _images(name: str, train: Any, present: dict[str, Any], column: str,
            label_column: str | None, image_size: int, grayscale: bool, batch_size: int,
            val_fraction: float, test_fraction: float, augment: str, in_memory: bool | str,
            num_workers: int | None, skip_bad_files: bool, seed: int) -> DataModule:
    from trainer.data.images import encoded_images

    label_column = label_column or _first(train, "ClassLabel")
    channels = 1 if grayscale else 3
    labels, classes = _labels(train, label_column, None)
    every = HFImages(train, column, labels, image_size, channels, f"{name} train")
    drawn = split_indices(len(every), 0.0 if "val" in present else val_fraction,
                          0.0 if "test" in present else test_fraction, seed)
    sources: list[ImageSource] = [every.subset(drawn[0].tolist())]
    for part, index in (("val", drawn[1]), ("test", drawn[2])):
        if part in present:
            split_labels, _ = _labels(present[part], label_column, classes)
            sources.append(HFImages(present[part], column, split_labels, image_size, channels,
                                    f"{name} {part}"))
        else:
            sources.append(every.subset(index.tolist()))
    if min(len(source) for source in sources) == 0:
        raise UserError(f"data.name={name!r} has too few rows for a train/val/test split "
                        f"({', '.join(str(len(s)) for s in sources)})")
    return encoded_images(name, sources, classes, batch_size, augment, in_memory, num_workers,
                          skip_bad_files, seed)


def _text(name: str, train: Any, present: dict[str, Any], column: str, block_size: int,
          tokenizer: str, vocab_size: int, batch_size: int, val_fraction: float,
          test_fraction: float, seed: int) -> DataModule:
    """The column's rows, one per line, train then val then test, in one UTF-8 file (written
    once per dataset version); the mapped splits become the text's contiguous splits."""
    from trainer.data.text import text
    from trainer.data.token_cache import user_cache

    parts = [train, *present.values()]
    key = "-".join(part._fingerprint for part in parts)
    folder = Path(train.cache_files[0]["filename"]).parent if train.cache_files else user_cache()
    file = folder / f"trainer-{column}-{key}.txt"
    sizes_file = file.with_suffix(".sizes.json")  # each split's characters, for the fractions
    if not sizes_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        sizes = _write_rows(parts, column, file)
        sizes_file.write_text(json.dumps(sizes))
    sizes = json.loads(sizes_file.read_text())
    total = sum(sizes)
    val_fraction = sizes[1] / total if "val" in present else val_fraction
    test_fraction = sizes[-1] / total if "test" in present else test_fraction
    return text(str(file), block_size=block_size, batch_size=batch_size,
                val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, name=name,
                tokenizer=tokenizer, vocab_size=vocab_size)


def _write_rows(parts: list[Any], column: str, file: Path) -> list[int]:
    """Write every part's rows, one per line; return each part's length in characters."""
    from trainer.logging import progress_bar
    from trainer.ranks import env_rank

    sizes = []
    partial = file.with_name(file.name + ".partial")
    rows = sum(len(part) for part in parts)
    with open(partial, "w", encoding="utf-8") as out, \
            progress_bar(rows, "row", f"writing {column} rows", env_rank() == 0) as bar:
        for part in parts:
            size = 0
            for batch in part.iter(batch_size=1000):
                chunk = "".join(f"{row}\n" for row in batch[column])
                size += len(chunk)
                out.write(chunk)
                bar.update(len(batch[column]))
            sizes.append(size)
    partial.replace(file)
    return sizes


def _row_counts(name: str, subset: str | None, loaded: Any) -> dict[str, int]:
    """Rows per split: from the dataset card's metadata, else from the footers of its parquet
    files (a few bytes each), else unknown."""
    import datasets
    import pyarrow.parquet as pq

    info = next(iter(loaded.values())).info.splits
    if info:
        return {split: known.num_examples for split, known in info.items()}
    path = Path(name)
    builder = datasets.load_dataset_builder("parquet", data_files=str(path)) if path.is_file() \
        else datasets.load_dataset_builder(name, subset)
    files = builder.config.data_files or {}
    return {split: sum(pq.ParquetFile(file).metadata.num_rows for file in paths)
            for split, paths in files.items()
            if paths and all(str(file).endswith(".parquet") for file in paths)}


def _streamed_images(path: str, subset: str | None, loaded: Any, mapping: dict[str, str],
                     image_column: str | None, label_column: str | None, image_size: int,
                     grayscale: bool, batch_size: int, augment: str, num_workers: int | None,
                     skip_bad_files: bool, shuffle_buffer: int, seed: int) -> DataModule:
    """Three streamed splits; their lengths and class names come from the dataset's metadata,
    since a stream cannot be counted without reading it all."""
    from datasets import Image

    from trainer.data import DataSpec
    from trainer.data.files import BadFiles
    from trainer.data.images import default_workers
    from trainer.data.streams import HFStreamSplit, StreamedRows
    from trainer.data.transforms import make_augment

    name = Path(path).name or path
    if not image_column:
        raise UserError(f"data.streaming=true reads image datasets; data.name={path!r} has no "
                        "Image column: set data.image_column, or data.streaming=false for text")
    train = loaded[mapping["train"]]
    label_column = label_column or _first(train, "ClassLabel")
    classes = getattr(train.features[label_column], "names", None) if label_column else []
    if label_column and not classes:
        raise UserError(f"data.streaming=true needs class names from a ClassLabel column; "
                        f"data.label_column={label_column!r} is not one")
    channels = 1 if grayscale else 3
    workers = default_workers() if num_workers is None else num_workers
    bad = BadFiles(skip_bad_files)
    columns = [image_column, *([label_column] if label_column else [])]
    counts = _row_counts(path, subset, loaded)
    splits = []
    for part in ("train", "val", "test"):
        split_name = mapping[part]
        if split_name not in loaded:
            raise UserError(f"data.streaming=true cannot draw a {part} split out of a stream: "
                            f"set data.splits.{part} to one of {', '.join(loaded)}")
        if split_name not in counts:
            raise UserError(f"data.streaming=true needs the number of rows of each split, and "
                            f"{name} declares none for {split_name!r} (in its dataset card) and "
                            "is not parquet: use data.streaming=false")
        rows = loaded[split_name].select_columns(columns).cast_column(image_column,
                                                                      Image(decode=False))
        splits.append(HFStreamSplit(
            rows, image_column, label_column, counts[split_name],
            StreamedRows(f"{name} {part}", image_size, channels), workers, bad, seed,
            shuffle_buffer if part == "train" else 0))
    splits[0].augment = make_augment(augment, seed)
    spec = DataSpec(kind="image", name=name, in_shape=(channels, image_size, image_size),
                    num_classes=len(classes), classes=tuple(classes))
    return DataModule(spec, *splits, batch_size)
