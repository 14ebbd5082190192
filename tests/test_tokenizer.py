"""The vendored, offline CLIP tokenizer and the lookup of a concept word's token positions."""

from __future__ import annotations

import pytest

from conceptseg.tokenizer import MODEL_MAX_LENGTH, clip_tokenizer, concept_token_positions

BOS, EOS = 49406, 49407


def test_clip_tokenizer_matches_openai_clip(tokenizer) -> None:
    # Ids of openai/clip-vit-large-patch14 (the tokenizer of every Stable Diffusion 1.x).
    assert tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH == 77
    assert tokenizer.bos_token_id == BOS and tokenizer.eos_token_id == EOS


def test_clip_tokenizer_lowercases_and_normalises_whitespace(tokenizer) -> None:
    assert tokenizer("A  Photo of a CAT").input_ids == tokenizer("a photo of a cat").input_ids


def test_clip_tokenizer_pads_like_stable_diffusion(tokenizer) -> None:
    # SD 1.x pads its 77-token prompts with <|endoftext|>.
    ids = tokenizer("a photo", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:4] == [BOS, 320, 1125, EOS]
    assert set(ids[4:]) == {EOS}
    long_ids = tokenizer(" ".join(["cat"] * 100), truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[0] == BOS and long_ids[-1] == EOS


def test_clip_tokenizer_is_rebuilt_identically() -> None:
    a, b = clip_tokenizer(), clip_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.get_vocab()["cat</w>"] == 2368 and a.get_vocab()["<|startoftext|>"] == BOS


def test_single_token_word(tokenizer) -> None:
    assert concept_token_positions(tokenizer, "a photo of a bird", ["bird"]) == [[5]]
    # matching is on token ids after CLIP's lower-casing, in either the prompt or the word
    assert concept_token_positions(tokenizer, "a photo of a Bird", ["bird"]) == [[5]]
    assert concept_token_positions(tokenizer, "a photo of a bird", ["BIRD"]) == [[5]]


def test_multi_token_word(tokenizer) -> None:
    word_ids = tokenizer("pneumothorax", add_special_tokens=False).input_ids
    assert len(word_ids) == 4
    positions = concept_token_positions(tokenizer, "a photo of a pneumothorax", ["pneumothorax"])
    assert positions == [[5, 6, 7, 8]]
    prompt_ids = tokenizer("a photo of a pneumothorax").input_ids
    assert [prompt_ids[i] for i in positions[0]] == word_ids


def test_several_words(tokenizer) -> None:
    prompt = "a photo of a human with arms and legs"
    assert concept_token_positions(tokenizer, prompt, ["human", "arms", "legs"]) == [[5], [7], [9]]
    # the order of the result follows the order of the words asked for, not the prompt
    assert concept_token_positions(tokenizer, prompt, ["legs", "human"]) == [[9], [5]]


def test_first_occurrence_is_used(tokenizer) -> None:
    assert concept_token_positions(tokenizer, "a bird and a bird", ["bird"]) == [[2]]


def test_word_absent_from_prompt(tokenizer) -> None:
    with pytest.raises(ValueError, match="'dog'.*does not occur"):
        concept_token_positions(tokenizer, "a photo of a cat", ["dog"])
    # a word is not found inside a longer word: "birds" is one different token
    with pytest.raises(ValueError, match="'bird'"):
        concept_token_positions(tokenizer, "a photo of a birds", ["bird"])
    # one missing word among found ones is still an error
    with pytest.raises(ValueError, match="'tail'"):
        concept_token_positions(tokenizer, "a photo of a bird", ["bird", "tail"])


def test_word_cut_off_by_truncation_is_absent(tokenizer) -> None:
    prompt = " ".join(["cat"] * 100) + " dog"
    with pytest.raises(ValueError, match="'dog'"):
        concept_token_positions(tokenizer, prompt, ["dog"])


def test_empty_word(tokenizer) -> None:
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        concept_token_positions(tokenizer, "a photo of a cat", [""])
