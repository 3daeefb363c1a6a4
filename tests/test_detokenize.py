"""Incremental detokenization: the streamed pieces join to the tokenizer's own decode of all ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smollm2 import smollm2_tokenizer
from sts.detokenize import IncrementalDetokenizer

# Characters of 3 and 4 UTF-8 bytes, a joined emoji, and words whose leading spaces a
# SentencePiece-style decoder drops at the start of a decode.
TEXT = "中文🙂" * 4 + " hello world. the fox 日本 🧑‍🚀 end"


def bpe_tokenizer(folder: Path, pieces: list[str], merges: list[tuple[str, str]], **parts: object):
    """Return a fast tokenizer built from a ``tokenizer.json`` spec: a BPE over ``pieces`` (merges added to
    the vocabulary) with the given normalizer, pre-tokenizer and decoder, and ``<eos>`` as a special token."""
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(pieces + [a + b for a, b in merges])}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "post_processor": None,
        "added_tokens": [{"id": len(vocab), "content": "<eos>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": None, **parts,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>" if "<unk>" in vocab else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": "<0x00>" in vocab, "ignore_merges": False, "vocab": vocab,
                  "merges": [list(m) for m in merges]},
    }
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<eos>")


def byte_level_bpe(folder: Path):
    """Return a GPT-2-style byte-level BPE: every CJK character and emoji is spelled in several byte tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return bpe_tokenizer(folder, list(bytes_to_unicode().values()), [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l")],
                         pre_tokenizer=byte_level, decoder=byte_level)


def sentencepiece_byte_fallback(folder: Path):
    """Return a Llama-2-style tokenizer: ``▁`` for spaces, ``<0xNN>`` byte tokens for unknown characters,
    and a decoder that strips the leading space of whatever it decodes."""
    pieces = ["<unk>", *(f"<0x{i:02X}>" for i in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyz.,"]
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    return bpe_tokenizer(
        folder, pieces, [("▁", "h"), ("▁h", "e"), ("▁", "w")],
        normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, space]},
        decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                  {"type": "ByteFallback"}, {"type": "Fuse"},
                                                  {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    )


def stream(tokenizer, ids: list[int], size: int) -> list[str]:
    """Return the pieces an incremental detokenizer emits for ``ids`` fed ``size`` at a time, flush included."""
    text = IncrementalDetokenizer(tokenizer)
    return [text.add(ids[i : i + size]) for i in range(0, len(ids), size)] + [text.flush()]


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_byte_fallback])
def test_stream_equals_the_whole_decode(make, tmp_path):
    tokenizer = make(tmp_path)
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


def test_flush_returns_a_character_never_finished(tmp_path):
    tokenizer = byte_level_bpe(tmp_path)
    ids = tokenizer("ok 中", add_special_tokens=False)["input_ids"][:-1]  # the last byte of 中 never comes
    text = IncrementalDetokenizer(tokenizer)
    held = "".join(text.add([i]) for i in ids)
    assert held == "ok "
    assert held + text.flush() == tokenizer.decode(ids) and tokenizer.decode(ids).endswith("\ufffd")
    assert text.flush() == ""
