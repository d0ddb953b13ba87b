"""The shard reader's own tar parser (``clipforge.data.samples``) against Python's tarfile: the same regular members,
names and bytes, for every format tarfile writes and the member types shards meet; compressed shards; and what
tarfile would not say: a damaged header in the middle of a shard is counted, not taken for the end."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import tarfile

import pytest

from clipforge.data.samples import SkipCounter, _byte_sum, _number, _tar_members, read_tar

LONG_DIRECTORY = "a-directory-name-long-enough/" * 4  # 116 characters: past ustar's 100-byte name field
PAYLOADS = {
    "000001.jpg": b"\xff\xd8" + bytes(range(256)) * 7,  # 1,794 bytes: not a multiple of the 512-byte block
    "000001.txt": b"a caption",
    "000002.jpg": bytes(1024),  # exactly two blocks
    "000002.txt": b"",  # empty
    f"{LONG_DIRECTORY}000003.jpg": b"long name" * 100,
    f"{LONG_DIRECTORY}000003.txt": b"its caption",
    "ünïcode/ключ.txt": "ünïcode".encode(),
    "ünïcode/ключ.jpg": b"jpeg" * 300,
}


def archive(fmt: int, extra_types: bool = True, **options) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, **options) as tar:
        if extra_types:
            for name, kind in (("dir.jpg", tarfile.DIRTYPE), ("link.jpg", tarfile.SYMTYPE)):
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, "000001.jpg" if kind == tarfile.SYMTYPE else ""
                tar.addfile(info)
        for name, data in PAYLOADS.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000.5  # a float mtime: pax writes a record for it
            tar.addfile(info, io.BytesIO(data))
        if extra_types:
            hard = tarfile.TarInfo("hard.jpg")
            hard.type, hard.linkname = tarfile.LNKTYPE, "000001.jpg"
            tar.addfile(hard)
    return buffer.getvalue()


def by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar if member.isreg()]


def by_reader(data: bytes) -> list[tuple[str, bytes]]:
    stream = io.BytesIO(data)
    return list(_tar_members(stream, stream.read(512)))


FORMATS = {
    "ustar": dict(fmt=tarfile.USTAR_FORMAT),
    "gnu": dict(fmt=tarfile.GNU_FORMAT),
    "pax": dict(fmt=tarfile.PAX_FORMAT),
    "pax with a global header": dict(fmt=tarfile.PAX_FORMAT, pax_headers={"comment": "written by a test"}),
}


@pytest.mark.parametrize("options", FORMATS.values(), ids=FORMATS.keys())
def test_regular_members_names_and_bytes_equal_tarfiles(options):
    data = archive(**options)
    expected = by_tarfile(data)
    assert [name for name, _ in expected] == list(PAYLOADS)  # links and directories are not members' data
    assert by_reader(data) == expected


def test_ustar_names_past_100_bytes_use_the_prefix_field():
    data = archive(tarfile.USTAR_FORMAT, extra_types=False)
    assert b"ustar\x0000" in data and b"path=" not in data and b"@LongLink" not in data  # no pax, no GNU name
    assert dict(by_reader(data))[f"{LONG_DIRECTORY}000003.jpg"] == b"long name" * 100


def test_a_directory_written_as_a_regular_file_with_a_slash_is_not_a_member():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("old-style-dir/")
        info.type = tarfile.AREGTYPE  # "\0": pre-POSIX tars mark directories only by the slash
        tar.addfile(info)
        info = tarfile.TarInfo("000001.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert by_reader(buffer.getvalue()) == by_tarfile(buffer.getvalue()) == [("000001.txt", b"abc")]


def test_base_256_numbers_as_gnu_writes_them_for_large_files():
    for value in (0, 7, 8**11 - 1, 8**11, 64 * 2**30):  # 8 GiB and up no longer fit 11 octal digits
        assert _number(tarfile.itn(value, 12, tarfile.GNU_FORMAT)) == value


def samples(data: bytes) -> tuple[list[str], dict[str, int], dict[str, str]]:
    counter = SkipCounter()
    keys = [sample["__key__"] for sample in read_tar("case.tar", io.BytesIO(data), counter)]
    return keys, dict(counter.counts), counter.first


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_compressed_shards_read_as_the_plain_one(compress):
    plain = archive(tarfile.PAX_FORMAT)
    assert samples(compress(plain)) == samples(plain)
    assert samples(plain)[0] == ["000001", "000002", f"{LONG_DIRECTORY}000003", "ünïcode/ключ"]


def test_a_compressed_shard_cut_short_is_counted_with_the_samples_before_it():
    whole = gzip.compress(archive(tarfile.PAX_FORMAT) * 1, mtime=0)
    keys, counts, first = samples(whole[: len(whole) * 2 // 3])
    assert counts == {"truncated_tar": 1} and len(keys) < 4
    assert f"after {len(keys)} samples: EOFError" in first["truncated_tar"]


def test_a_damaged_header_inside_a_shard_is_counted_not_taken_for_its_end():
    """tarfile reads a header whose checksum fails, after the first, as the end of the archive, and says nothing:
    the rest of the shard would be lost without a count."""
    data = bytearray(archive(tarfile.USTAR_FORMAT, extra_types=False))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        third = next(member for member in tar.getmembers() if member.name.endswith("000002.jpg"))
    data[third.offset + 10] ^= 0xFF  # one byte of the member's name: its checksum no longer matches
    assert [name for name, _ in by_tarfile(bytes(data))] == ["000001.jpg", "000001.txt"]  # silently
    keys, counts, first = samples(bytes(data))
    assert keys == ["000001"] and counts == {"truncated_tar": 1}
    assert f"after 1 samples: a damaged header at byte {third.offset}: bad checksum" in first["truncated_tar"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a tar: empty file"),
        (b"x" * 100, "not a tar: 100 bytes, shorter than one tar header"),
        (b"not a tar " * 100, "not a tar: "),
        (gzip.compress(b"not a tar " * 100), "not a tar: "),
        (b"\x1f\x8b" + bytes(600), "not a tar: gzip stream does not decompress"),
    ],
    ids=["empty", "short", "text", "gzip of text", "broken gzip"],
)
def test_what_is_not_a_tar_is_an_unreadable_shard(data, message):
    keys, counts, first = samples(data)
    assert keys == [] and counts == {"unreadable_shard": 1} and message in first["unreadable_shard"]


def test_an_empty_archive_is_no_problem():
    assert samples(bytes(1024)) == ([], {}, {})


def test_a_shard_cut_inside_the_padding_after_a_member_keeps_that_member():
    data = archive(tarfile.USTAR_FORMAT, extra_types=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        first = tar.getmembers()[0]  # 000001.jpg: 1,794 bytes, so 254 bytes of padding follow it
    cut = data[: first.offset_data + first.size + 100]
    counter = SkipCounter()
    kept = list(read_tar("case.tar", io.BytesIO(cut), counter))
    assert [sorted(sample) for sample in kept] == [["__key__", "__url__", "jpg"]]
    assert kept[0]["jpg"] == PAYLOADS["000001.jpg"]
    assert dict(counter.counts) == {"truncated_tar": 1}
    assert "after 1 samples: the tar ends without its end-of-archive block" in counter.first["truncated_tar"]


def test_header_byte_sums_are_exact():
    """The checksum's byte sum, taken from Adler-32 of each half-block, against Python's sum: the extremes (a block
    of 0xFF sums to 130,560, past Adler-32's modulus) and random blocks."""
    generator = random.Random(0)
    blocks = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), *(generator.randbytes(512) for _ in range(500))]
    assert [_byte_sum(block) for block in blocks] == [sum(block) for block in blocks]
