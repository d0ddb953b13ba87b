"""The shard reader's two borrowed rules, written out so that reading shards imports no torch, against their originals:
webdataset's member-name split and open_clip's caption cleaning."""

import pytest
from open_clip.tokenizer import basic_clean, whitespace_clean
from webdataset.tariterators import base_plus_ext

from clipforge.data.samples import clean_caption, split_member_name

MEMBER_NAMES = [
    "000001.jpg",
    "000001.txt",
    "a.b.jpg",
    "dir/sub/0001.json",
    "dir.with.dots/0001.png",
    "dir.with.dots/a.b.c",
    "noextension",
    "dir/noextension",
    ".hidden",
    "dir/.hidden.jpg",
    "trailingdot.",
    "KEY.JPG",
    "__key__.txt",
    "ünïcode/ключ.webp",
    "a/b/",
    "",
]

CAPTIONS = [
    "a photo of a cat",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand  runs   of spaces",
    "&amp;lt;b&amp;gt;double-escaped&amp;lt;/b&amp;gt;",
    "fish &amp; chips &quot;quoted&quot;",
    "mojibake: cafÃ©, donâ€™t",
    "curly “quotes” and ﬁ ligature, ｆｕｌｌ width",
    "non\u00a0breaking\u2003spaces\u200b and zero width",
    "",
    "   ",
    "emoji 🐈 and ünïcode",
]


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_member_names_split_as_webdataset_splits_them(name):
    assert split_member_name(name) == base_plus_ext(name)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_captions_clean_as_open_clip_cleans_them(caption):
    assert clean_caption(caption) == whitespace_clean(basic_clean(caption))
