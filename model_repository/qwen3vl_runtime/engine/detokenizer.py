"""Incremental detokenization with stop strings: emit only text that can no longer change."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """tokenizer: a transformers tokenizer with a Rust backend (``backend_tokenizer``).

    Each token goes through the Rust library's ``DecodeStream``, which holds back a partial UTF-8
    character until the token that completes it. With Qwen3-VL's tokenizer that is 1.4 us per
    token on the CPU machine, where one ``tokenizer.decode`` of a 7-token window takes 2.9 us and
    the code this replaced made two per token (scripts/bench_detokenizer.py); at 64 streams those
    decodes were most of the engine's per-step output phase (docs/benchmarks.md, run 11). The streamed text equals
    ``tokenizer.decode(ids, skip_special_tokens=True)`` (tests/test_engine.py); tokenizers that
    clean up spaces after decoding (not Qwen's) would differ by that clean-up."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        # Per stop string: the lengths n < len(stop) of its prefixes, longest first, by the prefix's
        # last character. A tail of the text can grow into a stop only if it is such a prefix, so
        # only the prefixes that end in the text's last character are compared.
        self._prefix_lengths = [_prefix_lengths_by_last_char(s) for s in stop]
        self.text = ""  # all text decoded so far (past stop-string cuts, never)
        self._sent = 0  # characters of self.text already emitted

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text safe to send now, whether a stop string was hit)."""
        piece = self._stream.step(self._backend, token_id)
        if piece is None:  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        self.text += piece
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
        if not self.text:
            return 0
        last, longest = self.text[-1], 0
        for stop, lengths in zip(self.stop, self._prefix_lengths):
            for n in lengths.get(last, ()):
                if n <= longest:
                    break
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        chunk, self._sent = self.text[self._sent : end], end
        return chunk


def _prefix_lengths_by_last_char(stop: str) -> dict[str, list[int]]:
    lengths: dict[str, list[int]] = {}
    for n in range(len(stop) - 1, 0, -1):
        lengths.setdefault(stop[n - 1], []).append(n)
    return lengths
