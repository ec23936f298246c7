"""ByteTokenizer: exact UTF-8 round trip, replacement on invalid bytes, clear errors."""
import numpy as np
import pytest

from moe_edge.workload.tokenizer import ByteTokenizer, TokenizerError


def test_round_trip_matches_utf8_bytes():
  tok = ByteTokenizer()
  text = "Grüße, 世界 🙂\n\\begin{abstract} x_1 = 0;"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.vocab_size == 256 and ids.max() < tok.vocab_size


def test_decode_replaces_invalid_utf8():
  tok = ByteTokenizer()
  cut = tok.encode("é")[:1]  # first byte of a two-byte character
  assert tok.decode(cut) == "\ufffd"
  assert tok.decode(np.array([], dtype=np.int32)) == ""


@pytest.mark.parametrize("bad", [np.array([256]), np.array([-1]), np.zeros((2, 2), np.int32),
                                 np.array([1.5])])
def test_decode_rejects_bad_ids(bad):
  with pytest.raises(TokenizerError):
    ByteTokenizer().decode(bad)


def test_encode_rejects_bytes():
  with pytest.raises(TokenizerError, match="str"):
    ByteTokenizer().encode(b"abc")
