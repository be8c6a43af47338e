"""Incremental detokenization with stop strings: emit only text that can no longer change."""

from __future__ import annotations

# Tokens re-decoded before the first unsent one: enough for any merge across token borders.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (past stop-string cuts, never)
        self._decoded_upto = 0  # tokens folded into self.text
        self._sent = 0  # characters of self.text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text safe to send now, whether a stop string was hit)."""
        self.ids.append(token_id)
        start = max(0, self._decoded_upto - CONTEXT_TOKENS)
        before = self._decode(self.ids[start : self._decoded_upto])
        after = self._decode(self.ids[start:])
        if after.endswith("\ufffd") or not after.startswith(before):
            return "", False  # an incomplete UTF-8 sequence: wait for the next token
        self.text += after[len(before) :]
        self._decoded_upto = len(self.ids)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self._sent - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._stop_prefix_len()), False

    def flush(self) -> str:
        """The text held back so far (the sequence ended without a stop string)."""
        return self._take(len(self.text))

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        chunk, self._sent = self.text[self._sent : end], end
        return chunk
