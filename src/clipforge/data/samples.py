"""Samples out of tar shards, and what makes one unusable: the one reader behind training and ``prep inspect``.

``read_tar(url, stream, counter)`` yields a shard's samples as webdataset groups them (``KEY.EXT`` members
with the same key, consecutive in the tar, become ``{"__key__": KEY, "__url__": url, EXT: bytes, ...}``,
the key ending at the file name's first dot). It is written here rather than taken from
``webdataset.tariterators`` because the problems must be counted exactly once and named with their shard:
webdataset's reader counts a tar cut inside a member twice (once for the member, once for the header
after it) with no shard name, and passes a key repeated later in the tar on as a second sample.

``SampleDecoder`` turns a sample into (uint8 image, cleaned caption) or counts why it cannot.
``SKIP_KINDS`` is the one list of problem kinds; training logs and counts them (``data/skipped_*``) and
``prep inspect`` reports them under the same names. ``SkipCounter`` counts and remembers the first of each
kind; with ``data.strict`` the first problem stops the run instead.
"""

from __future__ import annotations

import html
import json
import random
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

import ftfy

from clipforge.data.images import IMAGE_EXTENSIONS, DecompressionBomb, decode_error

if TYPE_CHECKING:
    import numpy as np
    import torch

SKIP_KINDS = {
    "unreadable_shard": "a shard that cannot be opened or read (missing file, failing pipe: command)",
    "truncated_tar": "a tar cut short (inside a member or header, or before its end-of-archive block) or with a "
    "damaged header; the samples before the cut are used, one cut inside its data is dropped",
    "duplicate_key": "a key met again in the same tar; its first sample is used, the repeat dropped",
    "dotted_key": "a member like a.b.jpg: webdataset's key ends at the first dot, so its extension reads b.jpg",
    "missing_image": f"a sample with no {'/'.join(IMAGE_EXTENSIONS)} member",
    "missing_caption": "a sample without the member (or JSON field) data.caption_key reads",
    "bad_caption": "a caption that is not UTF-8, not JSON, or not a string (or list of strings)",
    "empty_caption": "a caption that is empty after cleaning",
    "decompression_bomb": "an image whose header declares more than data.max_image_pixels pixels",
    "corrupt_image": "an image that does not decode (truncated, zero bytes, not an image)",
    "missing_teacher": "a sample with no row in data.teacher's embeddings (found by shard file name and key)",
    "bad_regions": "a KEY.regions.json that does not parse or whose boxes or captions are malformed (read only when "
    "an objective asks for regions: clipforge.data.regions)",
}


class DataError(ValueError):
    """Bad input that stops the run: in strict mode, or a stream that keeps no sample at all."""


class SkipCounter:
    """Counts skipped inputs by kind and remembers the first of each kind (shard, key, reason).

    Workers do not log: the counts and first occurrences travel with each batch and the ``TrainLoader`` logs each
    kind once per run, in the main process.
    """

    def __init__(self, strict: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.strict = strict

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        assert kind in SKIP_KINDS, kind
        message = f"{kind.replace('_', ' ')} at {where}" + (f": {detail}" if detail else "")
        if self.strict:
            raise DataError(f"{message} (data.strict is set; unset it to skip and count bad inputs)")
        self.first.setdefault(kind, message)
        self.counts[kind] += 1


# webdataset's rule for a member name (``webdataset.tariterators.base_plus_ext``): the key is the path up to the file
# name's first dot, the suffix the rest. Written out, as ``clean_caption`` is, because importing webdataset or
# open_clip imports torch, which reading shards (``prep inspect``) does not need; tests/test_samples.py checks both
# against the originals.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, suffix) of a tar member name, as webdataset splits it; (None, None) for a name with no suffix."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


_PLAIN_CAPTION = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")  # printable ASCII, tabs, line breaks; 0x26 is "&"


def clean_caption(text: str) -> str:
    """open_clip's tokenizer cleaning, ``whitespace_clean(basic_clean(text))``: ftfy, HTML entities unescaped
    twice, whitespace runs collapsed to one space, the ends stripped. A caption of printable ASCII, tabs and line
    breaks without an ``&`` has nothing for ftfy or the unescaping to change (no mojibake, wide or curly characters,
    control characters, terminal escapes or entities; its line breaks become spaces either way) and skips them:
    1.6 ms of a worker's 26 ms per batch of 128 short captions, 0.04 ms without."""
    if _PLAIN_CAPTION.fullmatch(text):
        return " ".join(text.split())
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def read_tar(url: str, stream: IO[bytes], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """The samples of one tar (plain or gzip/bzip2/xz-compressed), each problem counted once with the shard's name.

    A tar cut inside a member drops the sample being read; one that ends without its end-of-archive block, or
    meets a damaged header, keeps the samples read whole before it (the one in progress too); each is counted as
    ``truncated_tar`` with how many samples came before it."""
    try:
        first, stream = _first_block(stream)
    except (_NotATar, OSError) as exn:  # OSError: a failing pipe or file
        counter.skip("unreadable_shard", url, f"not a tar: {exn}")
        return
    sample: dict[str, Any] | None = None
    yielded = 0
    seen: set[str] = set()
    duplicates: set[str] = set()
    try:
        for name, data in _tar_members(stream, first):
            key, suffix = split_member_name(name)
            if key is None or key.startswith("__"):  # webdataset's metadata members
                continue
            suffix = suffix.lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yielded += 1
                    yield sample
                sample = None
                if key in seen:
                    if key not in duplicates:
                        duplicates.add(key)
                        counter.skip("duplicate_key", f"{url}:{key}", "the key appears again later in the tar")
                    continue
                seen.add(key)
                sample = {"__key__": key, "__url__": url}
            if suffix in sample:
                if key not in duplicates:
                    duplicates.add(key)
                    counter.skip("duplicate_key", f"{url}:{key}", f"two {key}.{suffix} members")
                continue
            if data is not None:  # None: cut inside its data (the reader raises next)
                sample[suffix] = data
    except _EndedEarly as exn:  # between or inside headers: the sample in progress is whole, and kept
        counter.skip("truncated_tar", url, f"after {yielded + (sample is not None)} samples: {exn}")
    except (tarfile.ReadError, OSError, _DecompressionError) as exn:  # the sample being read is dropped
        detail = str(exn) if isinstance(exn, _DecompressionError) else f"{type(exn).__name__}: {exn}"
        counter.skip("truncated_tar", url, f"after {yielded} samples: {detail}")
        return
    if sample is not None:
        yield sample


# A tar read by hand: Python's tarfile parses each 512-byte header through a dozen Python-level field decoders,
# half of a training worker's time per sample on small (64 px) images. This reads the ustar fields members of
# shards use (name and ustar prefix, size, type, checksum), POSIX pax records (path, size) and GNU long names, and
# skips the data of anything that is not a regular file, as tarfile does. tests/test_tar_reader.py checks it
# against tarfile on every format tarfile writes.
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES, less GNU sparse files (refused: no shard writer makes them)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "lzma"}  # what tarfile's "r|*" opens


class _NotATar(Exception):
    """The first header is not one."""


class _EndedEarly(Exception):
    """The tar ends before its end-of-archive block, or a later header is damaged."""


class _DecompressionError(Exception):
    """A compressed shard's stream breaks off or does not decompress."""


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts, got = [data], len(data)
    while got < size:  # pipes and decompressors may return less than asked before the end
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _Decompressed:
    """A compressed stream's decompressed bytes, read(n) as a file's; its errors become ``_DecompressionError``."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def read(self, size: int) -> bytes:
        try:
            return self.reader.read(size)
        except Exception as exn:  # gzip: EOFError, BadGzipFile; bz2: OSError, EOFError; lzma: LZMAError, EOFError
            raise _DecompressionError(f"{type(exn).__name__}: {exn}") from None


class _Replay:
    """``head`` and then the rest of ``stream``: what a decompressor reads after the magic bytes were looked at."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            head, self.head = self.head, b""
            return head + self.stream.read()
        head, self.head = self.head[:size], self.head[size:]
        return head


def _first_block(stream: IO[bytes]) -> tuple[bytes, IO[bytes]]:
    """The first header block and the stream to read on from (decompressed where the shard is compressed)."""
    block = _read_exactly(stream, BLOCK)
    for magic, module in _COMPRESSED.items():
        if block.startswith(magic):
            stream = _Decompressed(_decompressor(module, _Replay(block, stream)))
            try:
                block = _read_exactly(stream, BLOCK)
            except _DecompressionError as exn:
                raise _NotATar(f"{module} stream does not decompress ({exn})") from None
            break
    if not block:
        raise _NotATar("empty file")
    if len(block) < BLOCK:
        raise _NotATar(f"{len(block)} bytes, shorter than one tar header")
    if block != _ZERO_BLOCK:
        try:
            _header(block)
        except ValueError as exn:
            raise _NotATar(str(exn)) from None
    return block, stream


def _decompressor(module: str, raw: _Replay):
    if module == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw)
    if module == "bz2":
        import bz2

        return bz2.open(raw)
    import lzma

    return lzma.open(raw)


def _text(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU's base-256 for large values."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).strip()
    return int(text or b"0", 8)  # ValueError: not a number


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes, from the low half of Adler-32 (1 + the byte sum, modulo 65,521) of each
    256-byte half, whose sum (at most 65,280) the modulo leaves whole: in C, where Python's ``sum`` over the bytes
    took a quarter of reading a shard of small images (3.9 → 2.9 ms per 128 samples)."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a header block; ValueError for a bad checksum or an unreadable number."""
    try:
        stored, size = _number(block[148:156]), _number(block[124:136])
    except ValueError:
        raise ValueError("invalid header: its checksum or size is not a number") from None
    unsigned = _byte_sum(block) - sum(block[148:156]) + 256  # the checksum field counts as 8 spaces
    if stored != unsigned and stored != unsigned - 256 * sum(byte > 127 for byte in block[:148] + block[156:]):
        raise ValueError("bad checksum")
    if size < 0:
        raise ValueError(f"negative size {size}")
    name, prefix = _text(block[:100]), _text(block[345:500])
    kind = block[156:157]
    if prefix and kind not in (b"L", b"K", b"S"):  # tarfile: a ustar prefix, except in GNU's own header types
        name = f"{prefix}/{name}"
    return name, size, kind


def _pax(data: bytes) -> dict[str, Any]:
    """The path and size of a pax extended header's records ("LENGTH KEY=VALUE\\n")."""
    records: dict[str, Any] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.index(b" ", position)
        length = int(data[position:space])
        if length <= space - position:
            raise ValueError(f"pax record of length {length}")
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        if key == b"path":
            records["path"] = value.decode("utf-8", "surrogateescape")
        elif key == b"size":
            records["size"] = int(value)
        position += length
    return records


def _tar_members(stream: IO[bytes], block: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member, starting from the header ``block`` already read, up to the
    end-of-archive block. Raises ``_EndedEarly`` (no end block, or a damaged header) and ``tarfile.ReadError`` (a
    member's data cut short: after yielding (name, None) for it)."""
    offset, pax, long_name = 0, None, None
    while True:
        if len(block) < BLOCK:
            raise _EndedEarly("the tar ends without its end-of-archive block (cut short between or inside headers)")
        if block == _ZERO_BLOCK:
            return
        try:
            name, size, kind = _header(block)
            if pax:
                name, size = pax.get("path", name), pax.get("size", size)
        except ValueError as exn:
            raise _EndedEarly(f"a damaged header at byte {offset}: {exn}") from None
        if kind == b"S":
            raise _EndedEarly(f"a GNU sparse member at byte {offset} ({name}), which shard readers do not support")
        padding = -size % BLOCK
        data = _read_exactly(stream, size)
        if len(data) < size:
            if kind in _REGULAR:  # the member is named first, as tarfile does: the sample before it is complete
                yield name, None
            raise tarfile.ReadError("unexpected end of data")
        if padding:
            stream.read(padding)  # cut short here, the next header read finds the end: _EndedEarly
        padded = size + padding
        offset += BLOCK + padded
        if kind in (b"x", b"g", b"L", b"K"):  # extended headers: about the next member (or, "g", all; ignored)
            try:
                if kind == b"x":
                    pax = _pax(data)
                elif kind == b"L":
                    long_name = _text(data)
            except ValueError as exn:
                raise _EndedEarly(f"a damaged pax header at byte {offset - BLOCK - padded}: {exn}") from None
        else:
            if long_name is not None:
                name, long_name = long_name, None
            pax = None
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
                yield name, data
        block = _read_exactly(stream, BLOCK)


def read_caption(sample: dict[str, Any], caption_key: str, rng: random.Random) -> str:
    """The cleaned caption (ftfy + whitespace, as open_clip's tokenizer cleans).

    Raises ``CaptionProblem`` with kind ``missing_caption`` or ``bad_caption``.
    """
    member = "txt" if caption_key.startswith("txt") else "json"
    if member not in sample:
        raise CaptionProblem("missing_caption", f"no .{member} member (data.caption_key={caption_key})")
    try:
        text = sample[member].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise CaptionProblem("bad_caption", f".{member} is not UTF-8 ({exn})") from None
    if caption_key == "txt:lines":
        lines = [line for line in text.splitlines() if line.strip()]
        text = rng.choice(lines) if lines else ""
    elif member == "json":
        field = caption_key.split(":", 1)[1]
        try:
            record = json.loads(text)
        except ValueError as exn:
            raise CaptionProblem("bad_caption", f".json does not parse ({exn})") from None
        if not isinstance(record, dict) or field not in record:
            raise CaptionProblem("missing_caption", f".json has no field {field!r} (data.caption_key={caption_key})")
        text = _caption_value(record[field], field, rng)
    return clean_caption(text)


def _caption_value(value: Any, field: str, rng: random.Random) -> str:
    """A JSON caption: a string, or a list of strings (one at random); null is empty, anything else is bad."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        options = [item for item in value if item.strip()]
        return rng.choice(options) if options else ""
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise CaptionProblem(
        "bad_caption", f"JSON field {field!r} is a {type(value).__name__}, not a string or a list of strings: {shown}"
    )


class CaptionProblem(ValueError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def image_member(sample: dict[str, Any], where: str, counter: SkipCounter) -> str | None:
    """The extension of the sample's image member, or None (counted: a missing image or a dotted key)."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if extension is not None:
        return extension
    dotted = [s for s in sample if not s.startswith("__") and "." in s and s.rsplit(".", 1)[1] in IMAGE_EXTENSIONS]
    if dotted:
        counter.skip(
            "dotted_key",
            where,
            f"member {sample['__key__']}.{dotted[0]}: webdataset's key ends at the "
            f"first dot of the file name, so this image's extension reads "
            f"{dotted[0]!r}; rename the files without dots in the key",
        )
    else:
        members = sorted(s for s in sample if not s.startswith("__"))
        counter.skip("missing_image", where, f"members: {', '.join(members) or 'none'}")
    return None


class SampleDecoder:
    """A sample → (image, cleaned caption, image member's extension), or None, the reason counted.

    The image is what ``transform`` makes of the image bytes: the training ``ImageTransform``'s uint8 (3, H, W)
    tensor, or, with ``ImageTransform.crop`` (``prep inspect``), the decoded crop before the resize, (h, w, 3)."""

    def __init__(
        self, transform: Callable[[bytes, random.Random], torch.Tensor | np.ndarray], caption_key: str
    ) -> None:
        self.transform, self.caption_key = transform, caption_key

    def __call__(
        self, sample: dict[str, Any], counter: SkipCounter, rng: random.Random
    ) -> tuple[torch.Tensor | np.ndarray, str, str] | None:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        extension = image_member(sample, where, counter)
        if extension is None:
            return None
        try:
            caption = read_caption(sample, self.caption_key, rng)
        except CaptionProblem as problem:
            counter.skip(problem.kind, where, problem.detail)
            return None
        if not caption:
            counter.skip("empty_caption", where)
            return None
        try:
            image = self.transform(sample[extension], rng)
        except DecompressionBomb as exn:
            counter.skip("decompression_bomb", where, str(exn))
            return None
        except Exception as exn:  # decoders raise many types for corrupt data: all mean "skip this image"
            counter.skip("corrupt_image", where, decode_error(exn))
            return None
        return image, caption, extension
