"""The real CLIP tokenizer, built offline from the vendored BPE vocabulary, and concept-token lookup."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Sequence

from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # CLIP's own cut of the BPE file


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's BPE uses for raw bytes, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = resources.files("conceptseg") / "assets" / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP ViT-L/14's tokenizer (the one every Stable Diffusion 1.x uses), with no network access."""
    vocab, merges = _vocab_and_merges()
    # transformers 5 silently ignores vocab_file=; vocab=/merges= are the working arguments.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MODEL_MAX_LENGTH)


def concept_token_positions(tokenizer, prompt: str, words: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Positions of each word's BPE tokens in the tokenized prompt (position 0 is the start token).

    A word split into several BPE tokens gives several positions (the caller averages their maps).
    Matching is on token ids, so "bird" in "a photo of a bird" is found at [5]. `max_length`: the
    length the prompt is truncated to (default: the tokenizer's own, 77 for CLIP).
    """
    max_length = max_length or tokenizer.model_max_length
    prompt_ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
    found = []
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not word_ids:
            raise ValueError(f"concept word {word!r} tokenizes to nothing")
        n = len(word_ids)
        starts = [i for i in range(len(prompt_ids) - n + 1) if prompt_ids[i : i + n] == word_ids]
        if not starts:
            raise ValueError(f"concept word {word!r} does not occur in the prompt {prompt!r} (after tokenization)")
        found.append(list(range(starts[0], starts[0] + n)))
    return found


def check_prompt_length(tokenizer, prompt: str) -> None:
    """Refuse a prompt the text encoder would silently truncate, saying by how much."""
    n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    limit = tokenizer.model_max_length
    if n > limit:
        raise ValueError(f"the prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {n} tokens long (start and end "
                         f"tokens included); the text encoder reads {limit}: shorten it by {n - limit} tokens")
