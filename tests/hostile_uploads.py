"""Hostile uploads, generated: small files that expand (issue 19, items 4-7), and a meter for what a process spent
on one (wall time, CPU time, peak RSS growth, bytes written). Shared by tests/unit/test_upload_limits.py, the
server tests in tests/integration/test_upload_limits.py and benchmarks/upload_limits.py."""

from __future__ import annotations

import io
import os
import socket
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


# ---- images and zips ------------------------------------------------------------------------------------------
def png(width: int = 6, height: int = 4, value: int = 7, trailing: int = 0) -> bytes:
    """A valid RGB PNG of one colour; `trailing` zero bytes after its IEND (Pillow ignores them), so a file can be
    as large as wanted while its image stays small."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (value, 255 - value, 7)).save(out, format="PNG", compress_level=9)
    return out.getvalue() + bytes(trailing)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with no pixel data: only a decoder finds it broken."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def zip_bomb(path: Path, member_bytes: int, members: int = 2) -> Path:
    """An honest zip bomb: `members` images (one per class folder) each `member_bytes` long once inflated, their
    sizes declared truthfully; mostly zeros, so the zip is ~1/1000 of that."""
    head = png()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for i in range(members):
            with archive.open(f"class{i}/{i}.png", "w") as out:
                out.write(head)
                _write_zeros(out, member_bytes - len(head))
    return path


def lying_zip(path: Path, declared: int, actual: int) -> Path:
    """A zip of two class folders whose second image declares `declared` bytes uncompressed (in its local header
    and in the central directory) while its deflated data inflates to `actual` bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("cat/1.png", png(value=1))
        with archive.open("dog/2.png", "w") as out:
            out.write(png(value=2))
            _write_zeros(out, actual - len(png(value=2)))
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("dog/2.png")
        header_offset = info.header_offset
    data = bytearray(path.read_bytes())
    assert data[header_offset:header_offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, header_offset + 22, declared)  # local header: uncompressed size
    central = _central_entry(data, "dog/2.png")
    struct.pack_into("<I", data, central + 24, declared)  # central directory: uncompressed size
    path.write_bytes(bytes(data))
    return path


def _central_entry(data: bytearray, name: str) -> int:
    """The offset of `name`'s central directory entry."""
    at = data.index(b"PK\x01\x02")
    while at >= 0:
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + name_length]) == name.encode():
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise KeyError(name)


def pixel_zip(path: Path, images: int, width: int, height: int) -> Path:
    """`images` PNGs of width × height pixels in two class folders: one colour, so each is tiny once compressed and
    expensive to decode (a pixel bomb within every byte limit)."""
    data = png(width, height)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for i in range(images):
            archive.writestr(f"class{i % 2}/{i}.png", data)
    return path


def _write_zeros(out: io.RawIOBase | io.BufferedIOBase, count: int) -> None:
    block = bytes(min(count, 4 * MIB))
    while count > 0:
        out.write(block[:count])
        count -= len(block)


# ---- tables ---------------------------------------------------------------------------------------------------
def wide_csv(columns: int) -> bytes:
    """A CSV header of `columns` distinct short names and one row: a wide file that fits in a few hundred KB."""
    names = [f"{i:x}" for i in range(columns - 2)] + ["text", "label"]
    return (",".join(names) + "\n" + ",".join(["x"] * columns) + "\n").encode()


def long_header_csv(characters: int) -> bytes:
    """A CSV whose header holds one column name of `characters` characters (and no `text` column)."""
    return ("n" * characters + ",label\nx,a\ny,b\n").encode()


def dictionary_parquet(path: Path, rows: int) -> Path:
    """A Parquet file of `rows` rows, dictionary- and run-length-encoded: tens of KB on disk, hundreds of MB as
    Python values."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = rows // 2
    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["a text"] * 1))
    label = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.array([0, 1], dtype=np.int32), [half, rows - half])),
                                           pa.array(["a", "b"]))
    pq.write_table(pa.table({"text": text, "label": label}), path, compression="zstd", use_dictionary=True)
    return path


def dictionary_value_parquet(path: Path, rows: int, value_bytes: int) -> Path:
    """A Parquet file whose text column repeats one `value_bytes`-long dictionary value on every one of `rows`
    rows: small on disk and in its metadata, rows × value_bytes once decoded."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["t" * value_bytes]))
    label = pa.array(["a", "b"] * (rows // 2) + ["a"] * (rows % 2))
    pq.write_table(pa.table({"text": text, "label": label}), path, compression="zstd", use_dictionary=True)
    return path


# ---- raw HTTP -------------------------------------------------------------------------------------------------
MULTIPART_BOUNDARY = "hubtune-hostile"


def multipart_head(filename: str = "d.csv") -> bytes:
    """The start of a multipart body for POST /v1/datasets up to the file's content (task=classification first)."""
    b = MULTIPART_BOUNDARY
    return (f"--{b}\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\nclassification\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: text/csv\r\n\r\n").encode()


def request_head(host: str, path: str, content_length: int | None) -> bytes:
    """An HTTP/1.1 POST's head: with Content-Length, or chunked without it."""
    length = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={MULTIPART_BOUNDARY}\r\n{length}\r\n\r\n").encode()


@dataclass
class RawResponse:
    status: int | None  # None: no response within the timeout
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the first byte sent to the response read (or the timeout)
    sent: int  # body bytes the client managed to send


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, dict[str, str], bytes]:
    """Read one HTTP response (head, then its Content-Length body) from `sock`; (None, {}, b"") on timeout."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head:
            return None, {}, b""
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body
    except (TimeoutError, ConnectionError):
        return (None, {}, b"") if not data else (int(data.split()[1]), {}, b"")


def send_declared(host: str, port: int, declared: int, send_bytes: int, timeout: float) -> RawResponse:
    """POST /v1/datasets declaring `declared` bytes and sending only `send_bytes`; wait up to `timeout` for an
    answer."""
    start = time.monotonic()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(request_head(f"{host}:{port}", "/v1/datasets", declared))
        body = multipart_head()
        sock.sendall((body + b"x" * send_bytes)[:send_bytes])
        status, headers, content = read_response(sock, timeout)
    return RawResponse(status, headers, content, time.monotonic() - start, send_bytes)


def send_chunked(host: str, port: int, total: int, timeout: float, chunk: int = 256 * 1024) -> RawResponse:
    """POST /v1/datasets as a chunked body (no Content-Length) of up to `total` bytes, sending until the server
    answers or stops reading; then read its answer."""
    start = time.monotonic()
    sent = 0
    with socket.create_connection((host, port)) as sock:
        sock.sendall(request_head(f"{host}:{port}", "/v1/datasets", None))
        block = b"x" * chunk
        first = multipart_head()
        sock.settimeout(5)
        try:
            while sent < total:
                piece = first + block[:chunk - len(first)] if sent == 0 else block
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
                if _answered(sock):
                    break
            else:
                end = f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()
                sock.sendall(f"{len(end):x}\r\n".encode() + end + b"\r\n0\r\n\r\n")
        except (TimeoutError, ConnectionError):
            pass  # the server stopped reading or closed: its answer is waiting
        status, headers, content = read_response(sock, timeout)
    return RawResponse(status, headers, content, time.monotonic() - start, sent)


def _answered(sock: socket.socket) -> bool:
    """Whether the server has already written something back (without consuming it)."""
    import select

    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


# ---- what a process spent -------------------------------------------------------------------------------------
@dataclass
class Spent:
    seconds: float = 0.0  # wall
    cpu_seconds: float = 0.0  # user + system of the measured process
    peak_rss_growth: int = 0  # bytes: peak RSS during the block minus RSS at its start
    written: int = 0  # bytes the process wrote (files included) during the block

    def __str__(self) -> str:
        return (f"{self.seconds:.2f} s wall, {self.cpu_seconds:.2f} s CPU, +{self.peak_rss_growth / MIB:.0f} MB "
                f"peak RSS, {self.written / MIB:.1f} MB written")


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


@contextmanager
def spent(pid: int | None = None) -> Iterator[Spent]:
    """Measure process `pid` (default: this one) over the block: its peak RSS is reset at the start
    (/proc/PID/clear_refs), so the growth is this block's alone."""
    pid = pid or os.getpid()
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = Spent()
    rss, cpu, written, start = _status(pid, "VmRSS"), _cpu_seconds(pid), _written(pid), time.monotonic()
    try:
        yield result
    finally:
        result.seconds = time.monotonic() - start
        result.cpu_seconds = _cpu_seconds(pid) - cpu
        result.peak_rss_growth = max(0, _status(pid, "VmHWM") - rss)
        result.written = _written(pid) - written
