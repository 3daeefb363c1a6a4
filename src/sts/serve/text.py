"""A request's text as it streams: detokenized incrementally and cut at the first stop string."""

from __future__ import annotations

from typing import Any, Sequence

from sts.detokenize import IncrementalDetokenizer


class TextStream:
    """Turns one sequence's tokens, given one at a time, into text pieces, and ends it at a stop string.

    The text returned never includes a stop string nor anything after it (OpenAI's rule). Text
    that could be the start of a stop string (its last ``len(longest stop) - 1`` characters) is
    held back until the next token shows it is not, or until :meth:`finish`. A stop string is found
    at the token that completes it, even when that token also starts a character it does not finish
    (:meth:`~sts.detokenize.IncrementalDetokenizer.peek`), so the caller can end the ids there. Without a tokenizer
    (checkpoints saved without one) the text is empty and there can be no stop strings.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        #: The text so far (past a stop string: cut before it).
        self.text = ""
        #: How many characters of :attr:`text` have been returned.
        self.sent = 0
        #: Whether a stop string ended the text.
        self.stopped = False

    def add(self, token: int) -> str:
        """Return the text that ``token`` makes final (possibly empty); :attr:`stopped` tells whether a stop string hit."""
        if self.stopped or self.detokenizer is None:
            return ""
        return self._scan(self.detokenizer.add([token]), final=False)

    def finish(self) -> str:
        """Return the text still held back, once the sequence has ended."""
        if self.stopped or self.detokenizer is None:
            return ""
        return self._scan(self.detokenizer.flush(), final=True)

    def _scan(self, new: str, final: bool) -> str:
        """Append ``new``, cut the text at the first stop string, and return what may be sent now."""
        # A stop string not found before must end in the new text, so it starts at most `hold` characters earlier.
        start = max(0, len(self.text) - self.hold)
        self.text += new
        # The detokenizer's held-back text counts too: a stop string ending there ends the text at this token.
        seen = self.text + self.detokenizer.peek() if self.stop and self.detokenizer is not None else self.text
        hits = [i for i in (seen.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped, final = seen[: min(hits)], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece
