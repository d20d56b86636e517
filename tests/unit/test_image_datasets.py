"""Image datasets: zips of class folders, zips with metadata, Parquet with image bytes; every rejection names the
file or row at fault."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from service.datasets import DatasetProblem, UploadLimits, parse_dataset, read_normalized, write_normalized


def png(value: int, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def rejected(path: Path, fmt: str = "zip", task: str = "classification", **kwargs) -> DatasetProblem:
    with pytest.raises(DatasetProblem) as info:
        parse_dataset(path, fmt, task, "text", kwargs.pop("label_column", "label"), **kwargs)
    return info.value


def test_zip_of_class_folders_inside_a_top_folder(tmp_path: Path) -> None:
    images = {"pets/cat/b.png": png(1), "pets/cat/a.jpg": png(2), "pets/dog/x.png": png(3, mode="L"),
              "pets/dog/deeper/y.png": png(4)}
    junk = {"pets/README.md": b"about", "__MACOSX/pets/cat/._b.png": b"\0", "pets/.DS_Store": b"\0",
            "pets/cat/Thumbs.db": b"\0"}
    parsed = parse_dataset(make_zip(tmp_path / "d.zip", {**images, **junk}), "zip", "classification", "text",
                           "label")
    assert parsed.modality == "image" and parsed.labels_from_folders and parsed.image_column is None
    assert parsed.label_names == ["cat", "dog"] and parsed.class_counts == {"cat": 2, "dog": 2}
    # path order: cat/a.jpg, cat/b.png, dog/deeper/y.png, dog/x.png; each example is the file as stored
    assert parsed.examples == [images["pets/cat/a.jpg"], images["pets/cat/b.png"], images["pets/dog/deeper/y.png"],
                               images["pets/dog/x.png"]]
    assert parsed.labels == [0, 0, 1, 1]


def test_class_folders_give_classification_only(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "d.zip", {"a/1.png": png(1), "b/2.png": png(2)})
    problem = rejected(path, task="regression")
    assert (problem.status, problem.field) == (422, "task") and "metadata.csv" in problem.detail


def test_zip_rejections_name_the_file(tmp_path: Path) -> None:
    root = rejected(make_zip(tmp_path / "r.zip", {"a/1.png": png(1), "stray.png": png(2)}))
    assert (root.title, root.path) == ("image outside a class folder", "stray.png")

    broken = rejected(make_zip(tmp_path / "b.zip", {"a/1.png": png(1), "b/2.png": png(2)[:40], "b/3.png": png(3)}))
    assert (broken.status, broken.title, broken.path, broken.row) == (422, "unreadable image", "b/2.png", 2)

    other = rejected(make_zip(tmp_path / "o.zip", {"a/1.png": png(1), "b/notes.txt": b"hi"}))
    assert (other.title, other.path) == ("not an image", "b/notes.txt")

    single = rejected(make_zip(tmp_path / "s.zip", {"only/1.png": png(1), "only/2.png": png(2)}))
    assert single.title == "a single class"

    empty = rejected(make_zip(tmp_path / "e.zip", {"data.csv": b"text,label\na,b\n"}))
    assert empty.title == "no images"

    not_zip = tmp_path / "n.zip"
    not_zip.write_bytes(b"PK\x03\x04 this is no archive")
    assert rejected(not_zip).title == "unreadable zip file"


def test_uncompressed_bytes_are_capped(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "d.zip", {"a/1.png": png(1, (64, 64)), "b/2.png": png(2, (64, 64))})
    problem = rejected(path, limits=UploadLimits(max_upload_bytes=len(png(1, (64, 64))) + 10))
    assert (problem.status, problem.path, problem.limit) == (422, "b/2.png", "HUBTUNE_MAX_UPLOAD_BYTES")


def test_pixel_cap(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "d.zip", {"a/1.png": png(1, (3, 3)), "b/2.png": png(2, (5, 5))})
    problem = rejected(path, limits=UploadLimits(max_image_pixels=20))
    assert (problem.title, problem.path, problem.limit_value) == ("image too large", "b/2.png", 20)


def test_zip_with_metadata_csv_multilabel(tmp_path: Path) -> None:
    metadata = "file_name,tags\nimgs/1.png,red|round\n./imgs/2.png,blue\nimgs/3.png,[]\n"
    members = {"metadata.csv": metadata.encode(), "imgs/1.png": png(1), "imgs/2.png": png(2),
               "imgs/3.png": png(3), "imgs/unlisted.png": png(4)}
    parsed = parse_dataset(make_zip(tmp_path / "d.zip", members), "zip", "multilabel", "text", "tags")
    assert parsed.label_names == ["blue", "red", "round"] and parsed.labels == [[1, 2], [0], []]
    assert parsed.examples == [members["imgs/1.png"], members["imgs/2.png"], members["imgs/3.png"]]
    assert parsed.image_column == "file_name" and not parsed.labels_from_folders


def test_zip_with_metadata_jsonl_regression_in_a_top_folder(tmp_path: Path) -> None:
    lines = [{"path": "a.png", "y": 0.5}, {"path": "b.png", "y": "2"}]
    members = {"set/metadata.jsonl": "\n".join(json.dumps(x) for x in lines).encode(), "set/a.png": png(1),
               "set/b.png": png(2)}
    parsed = parse_dataset(make_zip(tmp_path / "d.zip", members), "zip", "regression", "text", "y",
                           image_column="path")
    assert parsed.labels == [0.5, 2.0] and parsed.label_names is None and parsed.image_column == "path"


def test_metadata_rejections_name_the_row(tmp_path: Path) -> None:
    def zipped(metadata: str, name: str = "d.zip") -> Path:
        return make_zip(tmp_path / name, {"metadata.csv": metadata.encode(), "1.png": png(1), "2.png": png(2)})

    missing = rejected(zipped("file_name,label\n1.png,a\n3.png,b\n"))
    assert (missing.title, missing.row, missing.field, missing.path) == ("image not in the zip", 2, "image_column",
                                                                         "metadata.csv")
    no_label = rejected(zipped("file_name,label\n1.png,a\n2.png,\n", "l.zip"))
    assert (no_label.title, no_label.row, no_label.field) == ("missing label", 2, "label_column")
    column = rejected(zipped("file,label\n1.png,a\n2.png,b\n", "c.zip"))
    assert (column.title, column.field) == ("unknown column", "image_column")
    assert "'file'" in column.detail
    both = make_zip(tmp_path / "two.zip", {"metadata.csv": b"file_name,label\n", "metadata.jsonl": b"{}"})
    assert rejected(both).title == "two metadata files"
    named = rejected(make_zip(tmp_path / "n.zip", {"a/1.png": png(1), "b/2.png": png(2)}), image_column="file")
    assert (named.title, named.field) == ("no metadata file", "image_column")


def test_parquet_image_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [png(1), png(2), png(3)]
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"img": pa.array(images, pa.binary()), "label": ["a", "b", "a"]}), plain)
    parsed = parse_dataset(plain, "parquet", "classification", "text", "label", image_column="img")
    assert parsed.examples == images and parsed.labels == [0, 1, 0] and parsed.image_column == "img"

    # What Hugging Face datasets writes for an Image feature: a struct of bytes and path.
    hf = tmp_path / "hf.parquet"
    structs = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": structs, "label": [1, 2, 1]}), hf)
    assert parse_dataset(hf, "parquet", "classification", "text", "label", image_column="image").examples == images

    # sent without image_column, it is read as text: the 422 says which column to name
    forgot = rejected(hf, "parquet")
    assert forgot.field == "text_column" and "image_column=image" in forgot.detail

    paths_only = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"image": ["/home/me/1.png", "/home/me/2.png"], "label": [0, 1]}), paths_only)
    assert rejected(paths_only, "parquet", image_column="image").title == "not an image column"

    hole = tmp_path / "hole.parquet"
    pq.write_table(pa.table({"image": pa.array([images[0], None], pa.binary()), "label": [0, 1]}), hole)
    problem = rejected(hole, "parquet", image_column="image")
    assert (problem.title, problem.row, problem.field) == ("missing image", 2, "image_column")


def test_images_cannot_come_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("image,label\n/a.png,x\n/b.png,y\n")
    problem = rejected(path, "csv", image_column="image")
    assert (problem.title, problem.field) == ("images must be inside the upload", "image_column")


def test_normalised_images_round_trip(tmp_path: Path) -> None:
    parsed = parse_dataset(make_zip(tmp_path / "d.zip", {"a/1.png": png(1), "b/2.png": png(2)}), "zip",
                           "classification", "text", "label")
    write_normalized(parsed, "classification", tmp_path / "n.parquet")
    assert read_normalized(tmp_path / "n.parquet") == (parsed.examples, [0, 1])
