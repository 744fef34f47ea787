"""Turn a stream of token pieces (bytes) into text that is safe to send.

Two things make that more than concatenation: a multi-byte UTF-8 character can
be split across tokens, and a stop sequence can be split across tokens too.
`TextStream.push` returns only text that is final — complete characters, and
nothing that might still turn out to begin a stop sequence — and says when a
stop sequence has been reached (the text before it is kept, the rest dropped),
as OpenAI's API and llama.cpp's server do.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be sent now."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(piece)
        if not self._stops:
            self._held = ""
            return text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = _partial_stop_length(text, self._stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The text held back, once generation ended without reaching a stop sequence."""
        if self.stopped:
            return ""
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text


def _partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of some stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
