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
- Bounds (service.tabular.UploadLimits; each a HUBTUNE_ setting, named with its value in the 422 that enforces
  it, and the zip member or row at fault): one image file inflates to at most max_image_bytes, and all the zip's
  files together to at most max_upload_bytes. A member is inflated in chunks with a running count, refused as soon
  as it passes its bound, and refused before a byte is inflated when its declared size already does (an honest
  zip bomb); one that declares fewer bytes than its data holds fails its CRC at the declared size (a lying one).
  One image has at most max_image_pixels pixels, all of the upload's images at most max_upload_pixels together:
  both read from the image's header before it is decoded. Then each image must decode (Pillow).
"""

from __future__ import annotations

import io
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from service.labels import ParsedDataset, check_row_count, encode_labels
from service.tabular import (
    DatasetProblem,
    UploadLimits,
    arrow_values,
    csv_records,
    json_records,
    open_parquet,
    read_parquet_columns,
    show,
    unknown_column,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
DEFAULT_FILE_COLUMN = "file_name"
_SKIPPED_NAMES = {"thumbs.db", "desktop.ini"}
_CHUNK = 1 << 20  # bytes inflated at a time


def parse_images(path: Path, fmt: str, task: str, label_column: str, *, image_column: str | None = None,
                 min_rows: int = 2, limits: UploadLimits | None = None) -> ParsedDataset:
    """Validate an image dataset (see the module rules); examples are the images' encoded bytes."""
    limits = limits or UploadLimits()
    if fmt == "zip":
        return _parse_zip(path, task, label_column, image_column, min_rows, limits)
    if fmt == "parquet":
        return _parse_parquet(path, task, label_column, image_column or "image", min_rows, limits)
    raise DatasetProblem(422, "images must be inside the upload",
                         f"a {fmt.upper()} file cannot carry images; send a zip of class folders, a zip with "
                         "metadata.csv naming each image's file, or Parquet with the image bytes in image_column",
                         field="image_column")


class Pixels:
    """The pixels of an upload's images so far, against max_image_pixels (each) and max_upload_pixels (all)."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits, self.total = limits, 0

    def add(self, width: int, height: int, label: str, **where: Any) -> None:
        pixels = width * height
        if pixels > self.limits.max_image_pixels:
            raise _over("image too large", f"{label} is {width}×{height} = {pixels} pixels; one image may have at "
                        f"most {self.limits.max_image_pixels}", "HUBTUNE_MAX_IMAGE_PIXELS",
                        self.limits.max_image_pixels, **where)
        self.total += pixels
        if self.total > self.limits.max_upload_pixels:
            raise _over("too many pixels", f"{label} ({width}×{height}) brings the images to {self.total} pixels; "
                        f"an upload's images may have at most {self.limits.max_upload_pixels} together",
                        "HUBTUNE_MAX_UPLOAD_PIXELS", self.limits.max_upload_pixels, **where)


def _over(title: str, detail: str, setting: str, value: int, field: str = "file", **where: Any) -> DatasetProblem:
    """A 422 for an upload over one of its bounds, naming the setting and its value."""
    return DatasetProblem(422, title, f"{detail} ({setting})", field=field, limit=setting, limit_value=value, **where)


def check_image(data: bytes, row: int, pixels: Pixels, where: str | None = None, field: str = "file") -> None:
    """Count the image's pixels from its header (refused over a bound before any is decoded), then decode it fully;
    a DatasetProblem naming the row (and zip member) if it cannot be read."""
    from PIL import Image

    label = f"{where} (row {row})" if where else f"row {row}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bounds decide
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                pixels.add(*image.size, label, field=field, row=row, path=where)
                image.load()
    except DatasetProblem:
        raise
    except Image.DecompressionBombError as exc:  # over twice Pillow's own bound: refused by its header there
        raise _over("image too large", f"{label} has more pixels than Pillow opens ({exc}); one image may have at "
                    f"most {pixels.limits.max_image_pixels}", "HUBTUNE_MAX_IMAGE_PIXELS",
                    pixels.limits.max_image_pixels, field=field, row=row, path=where) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError...
        raise DatasetProblem(422, "unreadable image", f"{label} is not an image Pillow can decode "
                             f"({type(exc).__name__}: {str(exc)[:200]})", field=field, row=row, path=where) from exc


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
    """Inflates members in chunks with a running count, against max_image_bytes (one image) and max_upload_bytes
    (all the members read); counts the images' pixels."""

    def __init__(self, archive: zipfile.ZipFile, limits: UploadLimits) -> None:
        self.archive, self.limits, self.total = archive, limits, 0
        self.pixels = Pixels(limits)

    def read(self, name: str, info: zipfile.ZipInfo, row: int, image: bool = True) -> bytes:
        room = self.limits.max_upload_bytes - self.total
        bound, setting = room, "HUBTUNE_MAX_UPLOAD_BYTES"
        if image and self.limits.max_image_bytes < room:
            bound, setting = self.limits.max_image_bytes, "HUBTUNE_MAX_IMAGE_BYTES"
        if info.file_size > bound:  # refused on its declared size: nothing inflated
            raise self._too_large(name, row, f"declares {info.file_size} bytes", bound, setting)
        data = io.BytesIO()  # its value is taken without a copy
        if info.file_size:  # sized once, to the declared size: grown chunk by chunk, a copying realloc doubled the peak
            data.seek(info.file_size - 1)
            data.write(b"\0")
            data.seek(0)
        count = 0
        try:
            with self.archive.open(info) as member:
                while chunk := member.read(_CHUNK):
                    count += len(chunk)
                    if count > bound:  # zipfile stops at the declared size; this holds whatever it does
                        raise self._too_large(name, row, f"inflates to more than {count - len(chunk)} bytes",
                                              bound, setting)
                    data.write(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
            if _declares_too_few(info):
                raise DatasetProblem(422, "zip member larger than it declares", f"{name} declares "
                                     f"{info.file_size} bytes uncompressed, but its {info.compress_size} bytes of "
                                     f"compressed data inflate to more; refused at its declared size",
                                     field="file", row=row, path=name, limit="declared size",
                                     limit_value=info.file_size) from exc
            raise DatasetProblem(422, "unreadable zip member", f"{name}: {exc}", field="file", row=row,
                                 path=name) from exc
        self.total += count
        if count != info.file_size:  # zipfile checks the size it declares; this keeps the buffer true regardless
            data.truncate(count)
        return data.getvalue()

    def _too_large(self, name: str, row: int, size: str, bound: int, setting: str) -> DatasetProblem:
        if setting == "HUBTUNE_MAX_IMAGE_BYTES":
            detail = f"{name} {size}; one image file may have at most {bound}"
        else:
            detail = (f"{name} {size}, with {self.total} bytes read before it; a zip's files may inflate to at "
                      f"most {self.limits.max_upload_bytes} bytes together")
        value = bound if setting == "HUBTUNE_MAX_IMAGE_BYTES" else self.limits.max_upload_bytes
        return _over("zip member too large", detail, setting, value, row=row, path=name)


def _declares_too_few(info: zipfile.ZipInfo) -> bool:
    """Whether a deflated member's compressed data is longer than deflate could make its declared size: stored
    blocks add 5 bytes per 16 KiB at worst (zlib's deflateBound, with room to spare)."""
    bound = info.file_size + 5 * (info.file_size // 16383 + 1) + 64
    return info.compress_type == zipfile.ZIP_DEFLATED and info.compress_size > bound


def _parse_zip(path: Path, task: str, label_column: str, file_column: str | None, min_rows: int,
               limits: UploadLimits) -> ParsedDataset:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetProblem(422, "unreadable zip file", str(exc), field="file") from exc
    with archive:
        files = _members(archive)
        reader = _Reader(archive, limits)
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
        check_image(data, row, reader.pixels, name)
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
        scratch.write_bytes(reader.read(metadata_name, files[metadata_name], 0, image=False))
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
        check_image(data, row, reader.pixels, name)
        images.append(data)
        raw_labels.append(label)
        rows.append(row)
    check_row_count(len(images), min_rows)
    parsed = encode_labels(images, raw_labels, rows, task, label_column, modality="image")
    parsed.image_column = file_column
    return parsed


# ---- Parquet --------------------------------------------------------------------------------------------------
def _parse_parquet(path: Path, task: str, label_column: str, image_column: str, min_rows: int,
                   limits: UploadLimits) -> ParsedDataset:
    import pyarrow as pa

    if image_column == label_column:
        raise DatasetProblem(422, "same column for image and label", f"both are {image_column!r}",
                             field="label_column")
    parquet = open_parquet(path)
    names = list(parquet.schema_arrow.names)
    if image_column not in names:
        raise unknown_column("image", image_column, names)
    if label_column not in names:
        raise unknown_column("label", label_column, names)
    table = read_parquet_columns(path, parquet, [image_column, label_column], limits.max_upload_bytes)
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
    pixels = Pixels(limits)
    for row, data in enumerate(cells, start=1):
        if not data:
            raise DatasetProblem(422, "missing image", f"row {row} has no image bytes in {image_column!r}",
                                 field="image_column", row=row)
        if len(data) > limits.max_image_bytes:
            raise _over("image file too large", f"row {row} holds {len(data)} bytes; one image file may have at "
                        f"most {limits.max_image_bytes}", "HUBTUNE_MAX_IMAGE_BYTES", limits.max_image_bytes,
                        field="image_column", row=row)
        check_image(data, row, pixels, field="image_column")
    check_row_count(len(cells), min_rows)
    parsed = encode_labels(cells, labels, list(range(1, len(cells) + 1)), task, label_column, modality="image")
    parsed.image_column = image_column
    return parsed
