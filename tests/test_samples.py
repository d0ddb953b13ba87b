"""The shard reader's two borrowed rules, written out so that reading shards imports no torch, against their originals:
webdataset's member-name split and open_clip's caption cleaning; and the training tokenizer, which does not clean
the cleaned captions again, against open_clip's tokenizer on the raw ones."""

import random

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean
from webdataset.tariterators import base_plus_ext

from clipforge.data.pipeline import tokenizer_for_cleaned_captions
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
    "vertical\x0btab, form\x0cfeed, unit\x1fseparator, nul\x00 and delete\x7f",
    "a \x1b[31mred\x1b[0m terminal escape",
    "<b>bold</b> &lt;tag&gt; &#39;quoted&#39;",
    "lone\rcarriage returns\r",
]


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_member_names_split_as_webdataset_splits_them(name):
    assert split_member_name(name) == base_plus_ext(name)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_captions_clean_as_open_clip_cleans_them(caption):
    assert clean_caption(caption) == whitespace_clean(basic_clean(caption))


def test_random_ascii_captions_clean_as_open_clip_cleans_them():
    """The printable-ASCII shortcut of clean_caption against open_clip's cleaning, on captions drawn from every
    ASCII character and the start of an HTML entity."""
    generator = random.Random(0)
    alphabet = [chr(code) for code in range(128)] + ["&amp;", "&lt;", "&#", "&quot;"] + ["a", "e", " "] * 20
    for _ in range(3000):
        caption = "".join(generator.choice(alphabet) for _ in range(generator.randrange(0, 40)))
        assert clean_caption(caption) == whitespace_clean(basic_clean(caption)), repr(caption)


@pytest.mark.parametrize("clean", ["lower", "whitespace"])
def test_training_tokens_of_cleaned_captions_equal_open_clips_of_the_raw_ones(clean):
    tokenizer = SimpleTokenizer(context_length=32, clean=clean)
    fast = tokenizer_for_cleaned_captions(tokenizer)
    assert fast is not tokenizer and fast.clean_fn is not tokenizer.clean_fn  # it does skip the second cleaning
    captions = [*CAPTIONS, "UPPER case &AMP; Mixed", "&amp;amp;amp;lt; triple"]
    assert torch.equal(fast([clean_caption(c) for c in captions]), tokenizer(captions))
    assert tokenizer.clean_fn("A &amp; B") == ("a & b" if clean == "lower" else "A & B")  # the model's stays as it was


def test_other_tokenizers_and_rules_are_used_as_they_are():
    canonical = SimpleTokenizer(clean="canonicalize")
    assert tokenizer_for_cleaned_captions(canonical) is canonical
    other = open_clip.get_tokenizer("RN50")  # the same class, 'lower': replaced; a plain function is kept
    assert tokenizer_for_cleaned_captions(other) is not other
    assert tokenizer_for_cleaned_captions(str.split) is str.split
