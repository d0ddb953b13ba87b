"""The transformers tokenizer and image processor that reproduce open_clip's tokenizer and eval transform.

Tokenizer: open_clip's ``SimpleTokenizer`` is OpenAI CLIP's byte-level BPE. ``clip_tokenizer``
builds the same vocabulary (256 bytes, the same with ``</w>``, 48,894 merges, then
``<start_of_text>`` 49406 and ``<end_of_text>`` 49407) from the ``bpe_simple_vocab_16e6.txt.gz``
shipped inside open_clip, offline, and gives it to transformers' ``CLIPTokenizer``. Choices:

- Special tokens keep open_clip's spellings, so a caption containing them tokenizes the same.
- Padding uses ``<end_of_text>`` (OpenAI's CLIP exports do the same), not ``!`` (id 0, what
  open_clip pads with): a pad token is a special token, which transformers splits out of the
  text before BPE, so ``!`` as pad turns "wow!!!" into three ``!`` tokens instead of open_clip's
  one ``!!!`` token. Padding positions therefore hold 49407 instead of 0; the CLIP text tower is
  causal and pools at the first end-of-text token, so the embeddings are identical.
- ``model_max_length`` is the model's context length; ``truncation=True`` keeps the first
  ``context_length - 2`` tokens between start and end, exactly what open_clip's truncation keeps.
- Known difference: open_clip cleans captions with ``ftfy.fix_text`` and ``html.unescape`` before
  tokenizing; transformers 5's ``CLIPTokenizer`` always rebuilds its normalizer (NFC, whitespace,
  lowercase) and cannot carry more. Captions those functions change (curly quotes, ligatures,
  full-width letters, HTML entities, mojibake) tokenize differently unless cleaned first with
  ``open_clip.tokenizer.basic_clean``; every other caption gives the same ids (tested).

Image processor: ``CLIPImageProcessor`` with open_clip's eval transform: resize the shortest side
to the image size (or squash to it), centre-crop, the same interpolation, mean and std. Its PIL
backend (``AutoImageProcessor.from_pretrained(DIR, backend="pil")``) gives open_clip's pixels
exactly, but for the crop's offset where the resized image leaves a margin of 4k+3 pixels:
torchvision's ``CenterCrop`` takes ``round(margin / 2)``, rounding half to even, and both of
transformers' backends ``floor(margin / 2)``, one pixel less; no processor setting expresses
torchvision's rounding. transformers 5 loads the torchvision backend by default, which also resizes
tensors and differs by up to a few tenths (normalised units) where an image is resized, not at all
where it is already at the model's size. A saved folder cannot choose the backend: transformers 5
records both under the one ``image_processor_type``.
"""

from __future__ import annotations

import copy
import gzip
from typing import Any

from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, bytes_to_unicode, default_bpe
from transformers import CLIPImageProcessor, CLIPTokenizer, PreTrainedTokenizerBase

from clipforge.export.towers import CannotConvert

START, END = "<start_of_text>", "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # as open_clip's SimpleTokenizer reads the file


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's vocabulary and merges, built as ``SimpleTokenizer.__init__`` builds them."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(tokenizer: Any, context_length: int) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` giving open_clip ``tokenizer``'s ids; refuses tokenizers it cannot reproduce."""
    if not isinstance(tokenizer, SimpleTokenizer):
        raise CannotConvert(
            f"the model's tokenizer is {type(tokenizer).__name__}; the CLIPModel export carries "
            "open_clip's CLIP BPE tokenizer (SimpleTokenizer) only"
        )
    if tokenizer.reduction_fn is not None or len(tokenizer.encoder) != 49408:
        raise CannotConvert("the tokenizer has a reduction mask or extra special tokens")
    if tokenizer.clean_fn.__name__ != "_clean_lower":
        raise CannotConvert(
            f"the tokenizer cleans text with {tokenizer.clean_fn.__name__}; CLIPTokenizer "
            "lowercases like open_clip's default ('lower') only"
        )
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=START,
        eos_token=END,
        unk_token=END,
        pad_token=END,
        model_max_length=context_length,
    )


def unmasked_tokenizer(tokenizer: HFTokenizer, context_length: int) -> PreTrainedTokenizerBase:
    """The transformers tokenizer inside open_clip's ``HFTokenizer``, set up as open_clip uses it for a
    bidirectional (SigLIP) text tower: padded to the context length with its pad id, and no attention mask,
    since the tower attends to the padding (transformers' own ``SiglipTokenizer`` returns no mask either)."""
    if tokenizer.tokenizer_mode or tokenizer.strip_sep_token:
        raise CannotConvert(
            f"the tokenizer's mode {tokenizer.tokenizer_mode!r} / strip_sep_token rewrites ids "
            "after tokenizing, which a saved transformers tokenizer cannot do"
        )
    inner = copy.deepcopy(tokenizer.tokenizer)
    for name, value in (("model_input_names", ["input_ids"]), ("model_max_length", context_length)):
        setattr(inner, name, value)
        inner.init_kwargs[name] = value  # what save_pretrained writes
    return inner


def image_processor(preprocess_cfg: dict[str, Any]) -> CLIPImageProcessor:
    """``CLIPImageProcessor`` doing open_clip's eval transform for ``preprocess_cfg`` (size, mean, std, ...)."""
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    resize_mode = preprocess_cfg.get("resize_mode") or "shortest"
    if resize_mode == "shortest" and height == width:
        geometry = dict(
            size={"shortest_edge": height}, do_center_crop=True, crop_size={"height": height, "width": width}
        )
    elif resize_mode == "squash":
        geometry = dict(size={"height": height, "width": width}, do_center_crop=False)
    else:
        raise CannotConvert(
            f"resize_mode {resize_mode!r} at size {size} (resize and pad, or shortest side to a "
            "non-square size) has no CLIPImageProcessor equivalent"
        )
    # open_clip resizes bicubically unless told 'bilinear' ('random' is a training option: bicubic at eval).
    resample = 2 if preprocess_cfg.get("interpolation") == "bilinear" else 3
    return CLIPImageProcessor(
        do_resize=True,
        resample=resample,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocess_cfg["mean"]),
        image_std=list(preprocess_cfg["std"]),
        do_convert_rgb=True,
        **geometry,
    )
