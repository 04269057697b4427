"""When to stop: EOS ids, stop strings, max_new_tokens. Tokens past a stop are never emitted."""

from __future__ import annotations

from .errors import InputError


class StopChecker:
    """Cuts the new tokens at the first EOS id, completed stop string or max_new_tokens, whichever is first."""

    def __init__(self, eos_ids, stop_strings, tokenizer, max_new_tokens: int):
        self.eos = set(eos_ids or [])
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if stop_strings is not None and (
            not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) for s in stop_strings)
        ):
            raise InputError(f"stop_strings must be a string or a list of strings, got {stop_strings!r}")
        self.stop_strings = [s for s in (stop_strings or []) if s]
        if self.stop_strings and tokenizer is None:
            raise InputError(
                "stop strings need a tokenizer: pass tokenizer= to generate or to the decoder, or load the target "
                "from a folder"
            )
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        # Enough trailing tokens to contain any stop string (a token decodes to >= 1 char, byte-fallback
        # tokens may decode to a partial character, hence the margin).
        self.window = max((len(s) for s in self.stop_strings), default=0) + 4

    def __call__(self, generated: list[int], new: list[int]) -> tuple[list[int], str | None]:
        """Append `new` to `generated` up to the first stop; return (emitted tokens, finish reason or None)."""
        emitted = []
        for tok in new:
            generated.append(tok)
            emitted.append(tok)
            if tok in self.eos:
                return emitted, "stop"
            if self.stop_strings and self._hit_stop_string(generated):
                return emitted, "stop"
            if len(generated) >= self.max_new_tokens:
                return emitted, "length"
        return emitted, None

    def _hit_stop_string(self, generated: list[int]) -> bool:
        tail = self.tokenizer.decode(generated[-self.window :], skip_special_tokens=False)
        last = self.tokenizer.decode(generated[-self.window : -1], skip_special_tokens=False)
        # Only a stop string completed by the newest token counts; older ones already stopped us.
        return any(s in tail and s not in last for s in self.stop_strings)
