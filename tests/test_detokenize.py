"""Incremental detokenization: the streamed pieces join to the tokenizer's own decode of all ids."""

from __future__ import annotations

import pytest

from smollm2 import smollm2_tokenizer
from sts.detokenize import IncrementalDetokenizer

# Characters of 3 and 4 UTF-8 bytes, a joined emoji, and words whose leading spaces a
# SentencePiece-style decoder drops at the start of a decode.
TEXT = "中文🙂" * 4 + " hello world. the fox 日本 🧑‍🚀 end"


def byte_level_bpe():
    """Return a GPT-2-style byte-level BPE trained in-process on ASCII: every CJK character and emoji
    is spelled in several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog. hello world, again."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def sentencepiece_byte_fallback():
    """Return a Llama-2-style tokenizer: ``▁`` for spaces, ``<0xNN>`` byte tokens for unknown characters,
    and a decoder that strips the leading space of whatever it decodes."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<eos>", *(f"<0x{i:02X}>" for i in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁h", "▁he", "▁w"]
    raw = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[("▁", "h"), ("▁h", "e"), ("▁", "w")],
                               byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")


def stream(tokenizer, ids: list[int], size: int) -> list[str]:
    """Return the pieces an incremental detokenizer emits for ``ids`` fed ``size`` at a time, flush included."""
    text = IncrementalDetokenizer(tokenizer)
    return [text.add(ids[i : i + size]) for i in range(0, len(ids), size)] + [text.flush()]


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_byte_fallback])
def test_stream_equals_the_whole_decode(make):
    tokenizer = make()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # A special token inside is skipped, as decode skips it.
    ids = ids + [tokenizer.eos_token_id] + tokenizer("中文🙂", add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "🙂" in whole and "\ufffd" not in whole
    for size in range(1, 6):
        pieces = stream(tokenizer, ids, size)
        assert "".join(pieces) == whole, size
        assert not any("\ufffd" in p for p in pieces)
    # Decoding each chunk on its own, as the CLI did, breaks characters: the test can tell.
    assert "".join(tokenizer.decode(ids[i : i + 1], skip_special_tokens=True) for i in range(len(ids))) != whole


def test_smollm2_stream_of_repeated_cjk_and_emoji(sts_cache_dir):
    tokenizer = smollm2_tokenizer(sts_cache_dir)
    for k in (1, 3, 7):
        ids = tokenizer("中文🙂" * k, add_special_tokens=False)["input_ids"]
        assert len(ids) > 3 * k  # the emoji takes two tokens: some chunking splits it
        for size in range(1, 6):
            assert "".join(stream(tokenizer, ids, size)) == tokenizer.decode(ids), (k, size)


def test_flush_returns_a_character_never_finished():
    tokenizer = byte_level_bpe()
    ids = tokenizer("ok 中", add_special_tokens=False)["input_ids"][:-1]  # the last byte of 中 never comes
    text = IncrementalDetokenizer(tokenizer)
    held = "".join(text.add([i]) for i in ids)
    assert held == "ok "
    assert held + text.flush() == tokenizer.decode(ids) and tokenizer.decode(ids).endswith("\ufffd")
    assert text.flush() == ""
