"""Image datasets: a zip of class folders, a zip with a metadata file, or Parquet with an image column.

No torch here (the API imports this module); Pillow decodes every image once at upload, so a corrupt or truncated
file is a 422 naming it, not a failed job later. Images are stored as uploaded (their encoded bytes) in the
normalised Parquet file's `image` column; the worker decodes them again for each model's own image processor.

Rules (every rejection is a `DatasetProblem`):
- Zip members: directories, hidden files and folders (a path part starting with "."), `__MACOSX/`, `Thumbs.db` and
  `desktop.ini` are skipped. When every member sits under one top folder (a zip of a folder), that folder is the
  root. Images are files ending in one of IMAGE_SUFFIXES (case-insensitive).
- Zip with `metadata.csv` or `metadata.jsonl` at its root (the Hugging Face imagefolder convention): one row per
  example; the file column (`image_column`, default "file_name") holds the image's path relative to the root, the
  label column its label, read by the same rules as CSV/JSONL text datasets (any task). Row numbers are the
  metadata's. Images the metadata does not name are not part of the dataset.
- Zip without metadata: class folders, classification only. An image's class is the first folder under the root
  (deeper subfolders belong to it); an image directly at the root is an error, as is a file inside a class folder
  that is not an image. Other files at the root (README, LICENSE) are skipped. `row` is the image's 1-based
  position in path order, and `path` names it.
- Parquet with `image_column`: binary cells, or structs with a `bytes` field (what Hugging Face `datasets` writes
  for its Image feature); a cell with only a path is an error (the server cannot read the client's files).
- Each image must decode (Pillow) and have at most MAX_IMAGE_PIXELS pixels; the images' uncompressed bytes are
  capped by the upload limit.
"""

from __future__ import annotations

import io
import uuid
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from service.labels import ParsedDataset, check_row_count, encode_labels
from service.tabular import DatasetProblem, arrow_values, csv_records, json_records, show, unknown_column

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
DEFAULT_FILE_COLUMN = "file_name"
MAX_IMAGE_PIXELS = 40_000_000  # 8000 × 5000; larger is a decompression bomb or a scan no ranking model reads whole
_SKIPPED_NAMES = {"thumbs.db", "desktop.ini"}


def parse_images(path: Path, fmt: str, task: str, label_column: str, *, image_column: str | None = None,
                 min_rows: int = 2, max_bytes: int | None = None) -> ParsedDataset:
    """Validate an image dataset (see the module rules); examples are the images' encoded bytes."""
    if fmt == "zip":
        return _parse_zip(path, task, label_column, image_column, min_rows, max_bytes)
    if fmt == "parquet":
        return _parse_parquet(path, task, label_column, image_column or "image", min_rows, max_bytes)
    raise DatasetProblem(422, "images must be inside the upload",
                         f"a {fmt.upper()} file cannot carry images; send a zip of class folders, a zip with "
                         "metadata.csv naming each image's file, or Parquet with the image bytes in image_column",
                         field="image_column")


def check_image(data: bytes, row: int, where: str | None = None, field: str = "file") -> None:
    """Decode the image fully; a DatasetProblem naming the row (and zip member) if it cannot be read."""
    from PIL import Image

    label = f"{where} (row {row})" if where else f"row {row}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below decides
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DatasetProblem(422, "image too large", f"{label} is {width}×{height} pixels; the limit is "
                                         f"{MAX_IMAGE_PIXELS} pixels", field=field, row=row, path=where)
                image.load()
    except DatasetProblem:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DatasetProblem(422, "unreadable image", f"{label} is not an image Pillow can decode "
                             f"({type(exc).__name__}: {exc})", field=field, row=row, path=where) from exc


# ---- zip ------------------------------------------------------------------------------------------------------
def _members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Files of the archive by path relative to its root (see the module rules for what is skipped)."""
    files: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if info.is_dir():
            continue
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts) \
                or parts[-1].lower() in _SKIPPED_NAMES:
            continue
        files["/".join(parts)] = info
    # A zip of one folder: that folder is the root (repeatedly, for a folder inside a folder).
    while files and all("/" in name for name in files):
        tops = {name.split("/", 1)[0] for name in files}
        if len(tops) != 1:
            break
        inner = {name.split("/", 1)[1]: info for name, info in files.items()}
        if all("/" not in name for name in inner) and not any(name in METADATA_FILES for name in inner):
            break  # the single folder holds images only: it is a (lone) class folder, not a root
        files = inner
    return files


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


class _Reader:
    """Reads members, keeping the total uncompressed bytes under the cap."""

    def __init__(self, archive: zipfile.ZipFile, max_bytes: int | None) -> None:
        self.archive, self.max_bytes, self.total = archive, max_bytes, 0

    def read(self, name: str, info: zipfile.ZipInfo, row: int) -> bytes:
        self.total += info.file_size
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise DatasetProblem(413, "images too large", f"the zip's images exceed {self.max_bytes} bytes "
                                 "uncompressed (HUBTUNE_MAX_UPLOAD_BYTES)", field="file", row=row, path=name)
        try:
            return self.archive.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:  # CRC, unsupported method
            raise DatasetProblem(422, "unreadable zip member", f"{name}: {exc}", field="file", row=row,
                                 path=name) from exc


def _parse_zip(path: Path, task: str, label_column: str, file_column: str | None, min_rows: int,
               max_bytes: int | None) -> ParsedDataset:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetProblem(422, "unreadable zip file", str(exc), field="file") from exc
    with archive:
        files = _members(archive)
        reader = _Reader(archive, max_bytes)
        metadata = [name for name in METADATA_FILES if name in files]
        if len(metadata) > 1:
            raise DatasetProblem(422, "two metadata files", "the zip holds both metadata.csv and metadata.jsonl; "
                                 "keep one", field="file")
        if metadata:
            return _zip_with_metadata(archive, files, metadata[0], reader, task, label_column,
                                      file_column or DEFAULT_FILE_COLUMN, min_rows, path)
        if file_column is not None:
            raise DatasetProblem(422, "no metadata file", f"image_column {file_column!r} names a column of "
                                 "metadata.csv or metadata.jsonl, and the zip holds neither at its root",
                                 field="image_column")
        return _zip_of_class_folders(files, reader, task, min_rows)


def _zip_of_class_folders(files: dict[str, zipfile.ZipInfo], reader: _Reader, task: str,
                          min_rows: int) -> ParsedDataset:
    if task != "classification":
        raise DatasetProblem(422, "class folders give class labels only",
                             f"task {task} needs labels per image: add metadata.csv (columns file_name and your "
                             "label column) at the zip's root", field="task")
    images: list[bytes] = []
    classes: list[str] = []
    rows: list[int] = []
    for name in sorted(files):
        folder, _, rest = name.partition("/")
        if not rest:
            if _is_image(name):
                raise DatasetProblem(422, "image outside a class folder", f"{name} sits at the zip's root; put "
                                     "each image in a folder named after its class, or add metadata.csv",
                                     field="file", path=name)
            continue  # README, LICENSE...
        row = len(images) + 1
        if not _is_image(name):
            raise DatasetProblem(422, "not an image", f"{name} is in class folder {folder!r} but is not one of "
                                 f"{', '.join(IMAGE_SUFFIXES)}", field="file", row=row, path=name)
        data = reader.read(name, files[name], row)
        check_image(data, row, name)
        images.append(data)
        classes.append(folder.strip())
        rows.append(row)
    if not images:
        raise DatasetProblem(422, "no images", "the zip holds no images in class folders (and no metadata.csv); "
                             f"images end in {', '.join(IMAGE_SUFFIXES)}", field="file")
    if len(set(classes)) < 2:
        raise DatasetProblem(422, "a single class", f"the zip has one class folder ({classes[0]!r}); at least two "
                             "are needed", field="file")
    check_row_count(len(images), min_rows)
    parsed = encode_labels(images, classes, rows, task, "class folder", modality="image")
    parsed.labels_from_folders = True
    return parsed


def _zip_with_metadata(archive: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo], metadata_name: str,
                       reader: _Reader, task: str, label_column: str, file_column: str, min_rows: int,
                       upload: Path) -> ParsedDataset:
    if file_column == label_column:
        raise DatasetProblem(422, "same column for image and label", f"both are {file_column!r}",
                             field="label_column")
    # The CSV/JSONL readers take a path: the metadata goes to a scratch file beside the upload.
    scratch = upload.with_name(f".{upload.name}.{uuid.uuid4().hex}.{metadata_name}")
    try:
        scratch.write_bytes(reader.read(metadata_name, files[metadata_name], 0))
        columns = {"image": file_column, "label": label_column}
        if metadata_name.endswith(".csv"):
            records = list(csv_records(scratch, {k: v.strip() for k, v in columns.items()}))
        else:
            records = list(json_records(scratch, columns))
    except DatasetProblem as problem:
        problem.path = problem.path or metadata_name
        raise
    finally:
        scratch.unlink(missing_ok=True)

    images: list[bytes] = []
    raw_labels: list[Any] = []
    rows: list[int] = []
    for row, (file_name, label) in records:
        if not isinstance(file_name, str) or not file_name.strip():
            raise DatasetProblem(422, "missing image file name", f"row {row} of {metadata_name}: {file_column!r} "
                                 f"holds {show(file_name)}", field="image_column", row=row, path=metadata_name)
        name = "/".join(PurePosixPath(file_name.strip().replace("\\", "/").lstrip("/")).parts)
        if name.startswith("./"):
            name = name[2:]
        if name not in files:
            raise DatasetProblem(422, "image not in the zip", f"row {row} of {metadata_name} names {file_name!r}, "
                                 "which is not in the zip (paths are relative to the metadata file's folder)",
                                 field="image_column", row=row, path=metadata_name)
        data = reader.read(name, files[name], row)
        check_image(data, row, name)
        images.append(data)
        raw_labels.append(label)
        rows.append(row)
    check_row_count(len(images), min_rows)
    parsed = encode_labels(images, raw_labels, rows, task, label_column, modality="image")
    parsed.image_column = file_column
    return parsed


# ---- Parquet --------------------------------------------------------------------------------------------------
def _parse_parquet(path: Path, task: str, label_column: str, image_column: str, min_rows: int,
                   max_bytes: int | None) -> ParsedDataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if image_column == label_column:
        raise DatasetProblem(422, "same column for image and label", f"both are {image_column!r}",
                             field="label_column")
    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
        if image_column not in names:
            raise unknown_column("image", image_column, names)
        if label_column not in names:
            raise unknown_column("label", label_column, names)
        table = parquet.read(columns=[image_column, label_column])
    except (pa.ArrowException, OSError) as exc:
        raise DatasetProblem(422, "unreadable Parquet file", str(exc), field="file") from exc
    column = table.column(image_column)
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise DatasetProblem(422, "not an image column", f"{image_column!r} is a struct without a 'bytes' "
                                 f"field ({column.type})", field="image_column")
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], type=column.type["bytes"].type)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DatasetProblem(422, "not an image column", f"{image_column!r} holds {column.type}, not image bytes "
                             "(binary, or Hugging Face's struct of bytes and path); paths on your machine cannot be "
                             "read here: embed the images", field="image_column")
    cells = column.to_pylist()
    labels = arrow_values(table.column(label_column), "label_column")
    total = 0
    for row, data in enumerate(cells, start=1):
        if not data:
            raise DatasetProblem(422, "missing image", f"row {row} has no image bytes in {image_column!r}",
                                 field="image_column", row=row)
        total += len(data)
        if max_bytes is not None and total > max_bytes:
            raise DatasetProblem(413, "images too large", f"the images exceed {max_bytes} bytes",
                                 field="file", row=row)
        check_image(data, row, field="image_column")
    check_row_count(len(cells), min_rows)
    parsed = encode_labels(cells, labels, list(range(1, len(cells) + 1)), task, label_column, modality="image")
    parsed.image_column = image_column
    return parsed
