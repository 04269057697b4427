"""Incremental detokenization: turn committed token ids into text deltas as they arrive.

Decoding one token at a time is wrong for SentencePiece/BPE tokenizers: a leading "▁" becomes a space only
next to other text, and byte-fallback tokens (<0xE6><0x97><0xA5>) form one character only together. So,
as in TGI and vLLM, each step decodes a small window twice -- the tokens already shown (`prefix..read`)
and the same window plus the new tokens -- and emits the difference, waiting while the text ends in an
incomplete character (U+FFFD).

The concatenated deltas equal `decode(prompt + new)[len(decode(prompt)):]`, the continuation exactly as the
full text shows it, minus any stop string (OpenAI semantics: the stop sequence is not returned).
"""

from __future__ import annotations

import os

REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context, so the first new token decodes as it does after the prompt.
CONTEXT_TOKENS = 4


def continuation_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The reference the stream must reproduce (used by tests and the non-streaming path's checks)."""
    full = tokenizer.decode(prompt + new, skip_special_tokens=True)
    return full[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]


class TextStream:
    """Feed it token ids with `push`; it returns text that is safe to show. Call `finish` at the end."""

    def __init__(self, tokenizer, prompt: list[int], stop: list[str] | tuple = (), lstrip: bool = False):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)
        self.stop = [s for s in stop if s]
        self.lstrip = lstrip  # chat replies: drop the space a plain-text template leaves after "Assistant:"
        self.text = ""  # all generated text decoded so far, stop strings included
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found: nothing more is returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new: list[int]) -> str:
        self.ids.extend(new)
        if self.stopped or not new:
            return ""
        shown = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if full.endswith(REPLACEMENT) or not full.startswith(shown):
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        delta = full[len(shown) :]
        if delta:  # keep the window non-empty: a window of special tokens alone would lose a leading space
            self.prefix = self.read
        self.read = len(self.ids)
        return self._add(delta, final=False)

    def finish(self) -> str:
        """Flush what is held back (an incomplete character stays as U+FFFD, like a full decode)."""
        if self.stopped:
            return ""
        shown = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        self.read = len(self.ids)
        # A decode that is not prefix-stable (rare tokenizers): emit what follows the common prefix.
        common = len(os.path.commonprefix([shown, full]))
        return self._add(full[common:], final=True)

    def _add(self, delta: str, final: bool) -> str:
        if self.lstrip and not self.text:
            delta = delta.lstrip()
        self.text += delta
        end = len(self.text)
        hits = [i for i in (self.text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._held_back()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that could be the start of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
