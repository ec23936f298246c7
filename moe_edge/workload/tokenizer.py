"""Byte-level tokenizer: a token is one UTF-8 byte, so the vocabulary has 256 entries.

No merges, no unknown token, nothing to download: every string round-trips exactly, and the small
MoE model (``configs/models/small_moe.py``, ``vocab_size=256``) reads the corpus directly.
"""
from __future__ import annotations

import numpy as np

from moe_edge.core.errors import MoeEdgeError


class TokenizerError(MoeEdgeError):
  """Token ids that the byte tokenizer cannot decode."""


class ByteTokenizer:
  """``encode(str) -> [S] int32`` UTF-8 bytes; ``decode([S]) -> str``."""

  vocab_size: int = 256

  def encode(self, text: str) -> np.ndarray:
    """``[S]`` int32: the UTF-8 bytes of ``text`` (``S`` = byte length, not character count)."""
    if not isinstance(text, str):
      raise TokenizerError(f"encode expects a str, got {type(text).__name__}; decode bytes to "
                           f"str first or use np.frombuffer for raw bytes.")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, tokens) -> str:
    """The text of byte tokens ``[S]``; invalid UTF-8 (e.g. a window cut mid-character) becomes
    U+FFFD instead of raising."""
    a = np.asarray(tokens)
    if a.ndim != 1:
      raise TokenizerError(f"decode expects a 1-D token array [S], got shape {a.shape}; decode "
                           f"each row of a batch separately.")
    if a.size and not np.issubdtype(a.dtype, np.integer):
      raise TokenizerError(f"token ids must be integers, got {a.dtype}.")
    if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
      raise TokenizerError(f"token ids must lie in [0, {self.vocab_size}) for the byte "
                           f"tokenizer, got range [{a.min()}, {a.max()}]; were these ids made by "
                           f"another tokenizer?")
    return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
