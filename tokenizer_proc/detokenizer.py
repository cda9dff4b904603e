"""Incremental detokenization with stop strings.

Token ids become bytes (``Tokenizer.decode_bytes``), bytes become text through an incremental
UTF-8 decoder: a character split across tokens is held until its last byte arrives, and
U+FFFD appears only for bytes that can never complete. Text that could still be the start of
a stop string is held back too; when a stop string appears, it and everything after it are
dropped and the detokenizer is ``stopped``. ``finish`` flushes whatever is held. Only the held
text (the new text and at most the longest stop string's length before it) is ever searched.

Without stop strings nothing is ever held back but the incomplete UTF-8 tail, which the
incremental decoder holds itself: ``step`` is then one bytes lookup and one decode per output
(picked once, when the detokenizer is made).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from tokenizer_proc.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._decode_bytes = tokenizer.decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text not yet released
        self.stopped = False
        if not self._stop:
            self.step = self._step_plain  # type: ignore[method-assign]

    def _step_plain(self, token_ids: Sequence[int]) -> str:
        """``step`` without stop strings: no text is held back, none is searched."""
        return self._utf8.decode(self._decode_bytes(token_ids))

    def step(self, token_ids: Sequence[int]) -> str:
        """Text that is safe to emit after ``token_ids`` (possibly empty)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._decode_bytes(token_ids))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the generation (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = 0 if final else self._stop_prefix_len()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the held text that some stop string starts with.

        Each stop string is tried only at the positions of its first character among the last
        ``len(stop) - 1`` characters, so a step costs a bounded amount (the number and length of
        stop strings are bounded by ``tokenizer_proc.validation``)."""
        text, best = self._held, 0
        for stop in self._stop:
            pos = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
            while pos != -1 and len(text) - pos > best:
                if stop.startswith(text[pos:]):
                    best = len(text) - pos
                    break
                pos = text.find(stop[0], pos + 1)
        return best
