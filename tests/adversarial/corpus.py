"""A generated corpus of hostile inputs, each with what must happen to it (``tests/test_adversarial.py`` runs them).

Every case is built from nothing (no downloads), small, and states its expectation:

* ``IMAGE_MODES``: one image per Pillow mode that can reach the decoder, in a format that stores it, and the RGB
  pixel a viewer shows for it;
* ``tar_cases()``: tar pathologies, each with the skip counts training and ``prep inspect`` must report;
* ``CAPTION_CASES``: caption members (``txt`` or ``json``) and the kind each must be counted as (None: kept);
* the checkpoint and config mistakes live in the test module, next to the commands they break.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SIZE = 32  # image side: the eval crop of a SIZE × SIZE image at SIZE px is the image itself (no resampling)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(color=(200, 30, 30), size=SIZE) -> bytes:
    return encode(Image.new("RGB", (size, size), color), "JPEG", quality=95)


@dataclass(frozen=True)
class ModeCase:
    name: str
    build: object  # () -> bytes (a file) or Image.Image (an in-memory image of a mode no format stores)
    expected: tuple[int, int, int]  # RGB a viewer shows at every pixel
    tolerance: int = 0  # lossy formats


def _grey16(value: int) -> Image.Image:
    return Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint16))  # mode I;16


def _palette(transparent: bool) -> bytes:
    image = Image.new("P", (SIZE, SIZE), 1)
    image.putpalette([0, 0, 0, 30, 140, 250] + [0] * 762)
    return encode(image, "PNG", **({"transparency": 1} if transparent else {}))


def _premultiplied(mode: str) -> Image.Image:
    # 50% alpha over value 200: stored premultiplied as 100
    if mode == "La":
        return Image.merge("La", [Image.new("L", (SIZE, SIZE), 100), Image.new("L", (SIZE, SIZE), 128)])
    bands = [Image.new("L", (SIZE, SIZE), v) for v in (100, 15, 15, 128)]
    return Image.merge("RGBa", bands)


def _pa_tiff() -> bytes:
    image = Image.new("PA", (SIZE, SIZE))
    image.putpalette([200, 30, 30] + [0] * 765)
    image.putdata([(0, 255)] * (SIZE * SIZE))
    return encode(image, "TIFF")


# Over white: round(v * a + 255 * (1 - a)) with a = 128 / 255.
_HALF_OVER_WHITE = round(200 * 128 / 255 + 255 * 127 / 255), round(30 * 128 / 255 + 255 * 127 / 255)

IMAGE_MODES = [
    ModeCase(
        "I;16 PNG, mid-grey (Pillow alone turns it white)", lambda: encode(_grey16(32896), "PNG"), (128, 128, 128)
    ),
    ModeCase("I;16 PNG, dark", lambda: encode(_grey16(25700), "PNG"), (100, 100, 100)),
    ModeCase(
        "I;16B TIFF (big-endian)",
        lambda: encode(Image.frombytes("I;16B", (SIZE, SIZE), np.full((SIZE, SIZE), 51400, ">u2").tobytes()), "TIFF"),
        (200, 200, 200),
    ),
    ModeCase(
        "I (32-bit) TIFF",
        lambda: encode(Image.fromarray(np.full((SIZE, SIZE), 25700, np.int32)), "TIFF"),
        (100, 100, 100),
    ),
    ModeCase(
        "F (float) TIFF, 0..1",
        lambda: encode(Image.fromarray(np.full((SIZE, SIZE), 0.4, np.float32)), "TIFF"),
        (102, 102, 102),
    ),
    ModeCase("LA PNG, opaque", lambda: encode(Image.new("LA", (SIZE, SIZE), (90, 255)), "PNG"), (90, 90, 90)),
    ModeCase(
        "LA PNG, transparent (over white)",
        lambda: encode(Image.new("LA", (SIZE, SIZE), (0, 0)), "PNG"),
        (255, 255, 255),
    ),
    ModeCase("La (premultiplied) in memory", lambda: _premultiplied("La"), (_HALF_OVER_WHITE[0],) * 3, 2),
    ModeCase(
        "RGBa (premultiplied) in memory",
        lambda: _premultiplied("RGBa"),
        (_HALF_OVER_WHITE[0], _HALF_OVER_WHITE[1], _HALF_OVER_WHITE[1]),
        2,
    ),
    ModeCase(
        "RGBA PNG, half transparent red",
        lambda: encode(Image.new("RGBA", (SIZE, SIZE), (200, 30, 30, 128)), "PNG"),
        (_HALF_OVER_WHITE[0], _HALF_OVER_WHITE[1], _HALF_OVER_WHITE[1]),
        1,
    ),
    ModeCase("PA TIFF, opaque palette entry", _pa_tiff, (200, 30, 30)),
    ModeCase("P PNG", lambda: _palette(False), (30, 140, 250)),
    ModeCase("P PNG with a transparent index (over white)", lambda: _palette(True), (255, 255, 255)),
    ModeCase(
        "L PNG with tRNS (over white)",
        lambda: encode(Image.new("L", (SIZE, SIZE), 7), "PNG", transparency=7),
        (255, 255, 255),
    ),
    ModeCase(
        "CMYK TIFF, pure cyan", lambda: encode(Image.new("CMYK", (SIZE, SIZE), (255, 0, 0, 0)), "TIFF"), (0, 255, 255)
    ),
    ModeCase(
        "CMYK JPEG, pure magenta",
        lambda: encode(Image.new("CMYK", (SIZE, SIZE), (0, 255, 0, 0)), "JPEG", quality=95),
        (255, 0, 255),
        3,
    ),
    ModeCase(
        "YCbCr TIFF",
        lambda: encode(Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).convert("YCbCr"), "TIFF"),
        (200, 30, 30),
        3,
    ),
    ModeCase("1 (bilevel) PNG, white", lambda: encode(Image.new("1", (SIZE, SIZE), 1), "PNG"), (255, 255, 255)),
    ModeCase("L JPEG", lambda: encode(Image.new("L", (SIZE, SIZE), 77), "JPEG", quality=95), (77, 77, 77), 2),
    ModeCase("16-bit RGB PNG", lambda: _rgb16_png((51400, 12850, 25700)), (200, 50, 100)),
    ModeCase(
        "progressive JPEG",
        lambda: encode(Image.new("RGB", (SIZE, SIZE), (10, 120, 240)), "JPEG", quality=95, progressive=True),
        (10, 120, 240),
        3,
    ),
    ModeCase(
        "PNG content in a .jpg member", lambda: encode(Image.new("RGB", (SIZE, SIZE), (5, 6, 7)), "PNG"), (5, 6, 7)
    ),
    ModeCase(
        "WebP, lossless",
        lambda: encode(Image.new("RGB", (SIZE, SIZE), (9, 99, 199)), "WEBP", lossless=True),
        (9, 99, 199),
    ),
]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _rgb16_png(rgb: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow writes no 16-bit RGB)."""
    row = b"\x00" + struct.pack(">HHH", *rgb) * SIZE
    header = struct.pack(">IIBBBBB", SIZE, SIZE, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row * SIZE))
        + _png_chunk(b"IEND", b"")
    )


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` × ``height`` (its data does not follow)."""
    data = encode(Image.new("L", (8, 8)), "PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return data[:8] + _png_chunk(b"IHDR", header) + data[8 + 25 :]


def jpeg_with_orientation(orientation: int, size=(48, 32)) -> bytes:
    """Four coloured quadrants (so every rotation and mirror is told apart), EXIF orientation set."""
    image = Image.new("RGB", size)
    width, height = size
    for (x, y), colour in {
        (0, 0): (220, 20, 20),
        (1, 0): (20, 220, 20),
        (0, 1): (20, 20, 220),
        (1, 1): (230, 230, 30),
    }.items():
        image.paste(colour, (x * width // 2, y * height // 2, (x + 1) * width // 2, (y + 1) * height // 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


# ---------------------------------------------------------------------------------------------------- tars


def tar_bytes(members: list[tuple[str, bytes]], kind=tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.type = len(data), 1_700_000_000, kind
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def good_members(prefix: str, count: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        members += [(f"{prefix}{i:04d}.jpg", jpeg()), (f"{prefix}{i:04d}.txt", f"a red square {prefix} {i}".encode())]
    return members


def _with_directory_and_link(data: bytes) -> bytes:
    """``data`` (a tar) with a directory ``d.jpg/`` and a symlink ``l.jpg -> /etc/passwd`` in front."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for name, kind in (("d.jpg", tarfile.DIRTYPE), ("l.jpg", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "", 0
            out.addfile(info)
        with tarfile.open(fileobj=io.BytesIO(data)) as source:
            for member in source.getmembers():
                out.addfile(member, source.extractfile(member))
    return buffer.getvalue()


@dataclass
class TarCase:
    name: str
    data: bytes
    skipped: dict[str, int]  # the counts training and prep inspect must both report
    kept: int  # samples training keeps
    message: str = ""  # a regex the logged (or raised) message must contain
    suffix: str = ".tar"
    extra: dict = field(default_factory=dict)


def tar_cases() -> list[TarCase]:
    good = good_members("g", 6)
    whole = tar_bytes(good)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        third = next(member for member in tar.getmembers() if member.name == "g0002.jpg")
    cases = [
        TarCase(
            "cut inside a member (counted once, with its shard; the sample being read is dropped)",
            whole[: third.offset_data + 10],
            {"truncated_tar": 1},
            2,
            r"truncated tar at \S+case\.tar: after 2 samples: ReadError",
        ),
        TarCase(
            "cut inside a header (the samples read whole are kept)",
            whole[: third.offset + 100],
            {"truncated_tar": 1},
            2,
            r"truncated tar at \S+case\.tar: after 2 samples: the tar ends without",
        ),
        TarCase(
            "cut at a header boundary (no end-of-archive block)",
            whole[: third.offset],
            {"truncated_tar": 1},
            2,
            r"ends without its end-of-archive block",
        ),
        TarCase(
            "a key repeated later in the tar (first kept)",
            tar_bytes(good[:4] + good[:2]),
            {"duplicate_key": 1},
            2,
            r"duplicate key at \S+case\.tar:g0000: the key appears again later",
        ),
        TarCase(
            "a member repeated inside its sample",
            tar_bytes(good[:2] + [good[0]] + good[2:4]),
            {"duplicate_key": 1},
            2,
            r"duplicate key at \S+:g0000: two g0000\.jpg members",
        ),
        TarCase(
            "a key with dots",
            tar_bytes([("photo.v2.jpg", jpeg()), ("photo.v2.txt", b"a caption")] + good[:2]),
            {"dotted_key": 1},
            1,
            r"dotted key at \S+:photo: member photo\.v2\.jpg: webdataset's key ends at "
            r"the first dot",
        ),
        TarCase("not a tar at all", b"this is not a tar file" * 40, {"unreadable_shard": 1}, 0, "not a tar"),
        TarCase("an empty file", b"", {"unreadable_shard": 1}, 0, "not a tar"),
        TarCase(
            "a zero-byte image member",
            tar_bytes([("z.jpg", b""), ("z.txt", b"zero bytes")] + good[:2]),
            {"corrupt_image": 1},
            1,
            r"corrupt image at \S+:z",
        ),
        TarCase(
            "metadata, directories and links are not samples",
            _with_directory_and_link(tar_bytes([("__meta__.json", b"{}")] + good[:2])),
            {},
            1,
        ),
        TarCase(
            "a path outside the archive is only a key",
            tar_bytes([("../../etc/evil.jpg", jpeg()), ("../../etc/evil.txt", b"a caption")]),
            {},
            1,
        ),
        TarCase("gzip-compressed tar", gzip.compress(whole, mtime=0), {}, 6, suffix=".tar.gz"),
    ]
    return cases


# ---------------------------------------------------------------------------------------------------- captions

CAPTION_CASES = [
    # (name, caption_key, members, expected kind or None when kept)
    ("plain text", "txt", {"txt": b"a red square"}, None),
    ("not UTF-8", "txt", {"txt": b"\xff\xfe caf\xe9"}, "bad_caption"),
    ("whitespace only", "txt", {"txt": b" \n\t "}, "empty_caption"),
    ("no .txt member", "txt", {}, "missing_caption"),
    ("NUL and control characters are cleaned, the rest kept", "txt", {"txt": b"a red\x00 square\x07"}, None),
    ("UTF-8 BOM", "txt", {"txt": "\ufeffa red square".encode()}, None),
    ("a megabyte of caption (the tokenizer truncates)", "txt", {"txt": b"red " * 250_000}, None),
    ("txt:lines with no non-empty line", "txt:lines", {"txt": b"\n \n"}, "empty_caption"),
    ("json string", "json:caption", {"json": json.dumps({"caption": "a red square"}).encode()}, None),
    ("json list of strings", "json:caption", {"json": json.dumps({"caption": ["a", "b"]}).encode()}, None),
    ("json dict", "json:caption", {"json": json.dumps({"caption": {"en": "a red square"}}).encode()}, "bad_caption"),
    ("json number", "json:caption", {"json": json.dumps({"caption": 42}).encode()}, "bad_caption"),
    (
        "json list with a non-string",
        "json:caption",
        {"json": json.dumps({"caption": ["a", 3]}).encode()},
        "bad_caption",
    ),
    ("json empty list", "json:caption", {"json": json.dumps({"caption": []}).encode()}, "empty_caption"),
    ("json null", "json:caption", {"json": json.dumps({"caption": None}).encode()}, "empty_caption"),
    ("json without the field", "json:caption", {"json": json.dumps({"title": "x"}).encode()}, "missing_caption"),
    ("json that does not parse", "json:caption", {"json": b"{not json"}, "bad_caption"),
    ("json that is a list, not an object", "json:caption", {"json": b"[1, 2]"}, "missing_caption"),
    ("no .json member", "json:caption", {"txt": b"a red square"}, "missing_caption"),
]
