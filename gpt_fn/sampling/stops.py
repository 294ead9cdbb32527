"""Stop strings matched on the bytes of generated tokens, and the tokenizer check they share.

`StopStrings` decides, token by token, whether a text has just completed a stop string;
`RowStops` keeps one text per row of a batch; `cut_at_stop` cuts a decoded text after its
first stop string (the CLI's streaming print). Every decoder (`generate`, `beam_search`,
`speculative_generate`) matches stop strings through `StopStrings`.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor


def check_tokenizer(tokenizer: Any) -> Any:
    """`tokenizer` if it reads like a tiktoken `Encoding` (`decode_single_token_bytes`, `n_vocab`);
    else `TypeError`."""
    if not callable(getattr(tokenizer, "decode_single_token_bytes", None)) or not isinstance(
        getattr(tokenizer, "n_vocab", None), int
    ):
        raise TypeError(
            "tokenizer must be a tiktoken Encoding (decode_single_token_bytes and n_vocab), got "
            f"{type(tokenizer).__name__}"
        )
    return tokenizer


class StopStrings:
    """Stop strings matched on the bytes of the generated tokens, across token boundaries.

    A text stops at the first token whose bytes complete a stop string: the string lies in the
    text and ends within that token (HF's `StopStringCriteria` on the generated ids). Only
    generated text counts: a stop string that begins in the prompt is not one. Matching is on
    UTF-8 bytes, so a character split over several tokens matches once its last byte arrives.
    """

    def __init__(self, stop: Sequence[str], tokenizer: Any) -> None:
        self.tokenizer = check_tokenizer(tokenizer)
        self.stops = [s.encode("utf-8") for s in stop]
        self.keep = max(len(s) for s in self.stops) - 1  # bytes a stop may have begun in

    def step(self, tail: bytes, token: int) -> tuple[bool, bytes]:
        """Whether `token`, after a text ending in `tail`, completes a stop string; the new tail
        (the text's last bytes, as many as a stop string can have begun in)."""
        text = tail + self._bytes(token)
        return any(s in text for s in self.stops), (text[-self.keep :] if self.keep else b"")

    def _bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_single_token_bytes(token)
        except KeyError:
            raise ValueError(
                f"stop strings: token id {token} has no text in the tokenizer "
                f"(n_vocab {self.tokenizer.n_vocab})"
            ) from None


class RowStops:
    """`StopStrings` over the rows of a batch: each row's tail of generated text."""

    def __init__(self, stops: StopStrings, rows: int) -> None:
        self.stops = stops
        self.tails = [b""] * rows

    def update(
        self, token: Int[Tensor, " batch"], finished: Bool[Tensor, " batch"]
    ) -> Bool[Tensor, " batch"]:
        """Which unfinished rows `token` (one per row) makes complete a stop string."""
        hits = [False] * len(self.tails)
        for row, (t, done) in enumerate(zip(token.tolist(), finished.tolist(), strict=True)):
            if not done:
                hits[row], self.tails[row] = self.stops.step(self.tails[row], t)
        return torch.tensor(hits, device=finished.device)  # one host-to-device copy a step


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to and including the first of the `stop` strings it contains (whole if none)."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text
