"""Write Fashion-MNIST as zips of class folders: the image dataset the service, the docs/datasets.md example and
benchmarks/image_ranking.py read.

Debian's dataset-fashion-mnist package holds the IDX files (60k train, 10k test, 28×28 grayscale, 10 classes); it
installs without root as `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb PKG`.
This takes `--rows` train images, class-stratified (seed `--seed`), as PNGs in one folder per class
(`shapes/<class>/<index>.png` style: `fashion/<class>/<split>-<index>.png`), and with `--test-rows` the same from the
test split into a second zip.

    python -m benchmarks.data.fashion_mnist --package PKG --out /tmp/fm/fashion1000.zip --rows 1000
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from workers.sampling import stratified_sample

# Folder names: the dataset's class names with "/" and spaces replaced.
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")


def find_idx_folder(package: Path) -> Path:
    """The folder of the IDX files inside an extracted package (or that folder itself)."""
    for candidate in [package, *package.rglob("fashion-mnist")]:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    raise SystemExit(f"no Fashion-MNIST IDX files under {package}: apt-get download dataset-fashion-mnist && "
                     "dpkg -x dataset-fashion-mnist_*.deb PKG")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (unsigned bytes): magic 0x0000080N, N dimension sizes (big-endian int32), then the data."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(package: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×28×28 uint8, labels N) of "train" or "t10k"."""
    folder = find_idx_folder(package)
    return (read_idx(folder / f"{split}-images-idx3-ubyte.gz"), read_idx(folder / f"{split}-labels-idx1-ubyte.gz"))


def stratified(labels: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """`rows` indices with class shares as in `labels` (equal shares: Fashion-MNIST is balanced), shuffled."""
    return stratified_sample(labels, rows, seed, shuffle=True)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_zip(out: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split: str) -> Counter:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in indices:
            archive.writestr(f"fashion/{CLASSES[labels[i]]}/{split}-{i:05d}.png", png_bytes(images[i]))
    return Counter(CLASSES[labels[i]] for i in indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="the extracted dataset-fashion-mnist package")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--test-out", type=Path, default=None)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, labels = load_split(args.package, "train")
    counts = write_zip(args.out, images, labels, stratified(labels, args.rows, args.seed), "train")
    print(f"wrote {args.out}: {sum(counts.values())} images, {dict(counts)}")
    if args.test_out:
        images, labels = load_split(args.package, "t10k")
        counts = write_zip(args.test_out, images, labels, stratified(labels, args.test_rows, args.seed), "test")
        print(f"wrote {args.test_out}: {sum(counts.values())} images")


if __name__ == "__main__":
    main()
