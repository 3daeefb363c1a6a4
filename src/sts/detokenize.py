"""Incremental detokenization: stream the text of a growing token sequence without broken characters.

Decoding each new batch of ids on its own splits characters whose bytes fall in two batches
(a byte-level tokenizer spells many characters with two or more tokens) and prints U+FFFD for
each half. :class:`IncrementalDetokenizer` keeps every id of the sequence instead and, as vLLM
and TGI do, decodes the ids from the start of the last emitted piece (``prefix_offset``): the
text past the previously emitted ids (``read_offset``) is emitted once it no longer ends in an
unfinished character. Decoding from a token the tokenizer has already rendered keeps rules that
depend on the previous token (SentencePiece's leading space) the same as in a whole decode.
"""

from __future__ import annotations

from typing import Any, Sequence

#: What tokenizers render an unfinished UTF-8 sequence as, while its remaining bytes are to come.
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's ids, arriving in pieces, into text pieces whose concatenation equals
    ``tokenizer.decode(all_ids)``.

    Call :meth:`add` with each new batch of ids and write what it returns; call :meth:`flush`
    once the sequence has ended, for the text still held back (a character never finished, or
    text the tokenizer renders as U+FFFD for good).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        #: Every id of the sequence so far.
        self.ids: list[int] = []
        #: Where the decoded window starts: the first id of the last emitted piece.
        self.prefix_offset = 0
        #: How many ids have been emitted as text.
        self.read_offset = 0

    def add(self, ids: Sequence[int]) -> str:
        """Return the text that ``ids`` completes (possibly empty), after appending them to the sequence."""
        self.ids.extend(int(i) for i in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back; later :meth:`add` calls continue after it."""
        return self._advance(final=True)

    def peek(self) -> str:
        """Return the text held back by :meth:`add` up to its unfinished character, without emitting it.

        A stop string may end there: a token can finish a word and start a character at once
        (byte-level BPE merges bytes across character boundaries), and waiting for the character's
        last byte would look for the stop one token late.
        """
        if self.read_offset == len(self.ids):
            return ""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._decode(self.ids[self.prefix_offset :])[len(emitted) :].rstrip(REPLACEMENT)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        """Return the new stable text past ``read_offset`` (all of it when ``final``) and move the offsets."""
        if self.read_offset == len(self.ids):
            return ""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if not final and (len(text) <= len(emitted) or text.endswith(REPLACEMENT)):
            return ""  # an unfinished character, or ids that render as nothing yet (special tokens)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]
