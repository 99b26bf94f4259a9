"""Text for language models, offline: the lesion studies of Veit et al. Sec. 4 on a transformer's
residual stream (experiment=lm_lesions).

The default text is real English prose that ships with Python: the pydoc help topics
(`pydoc_data.topics.topics`, ~465 kB, the language reference's sections), joined in key order;
or any UTF-8 file (`data.text_file=<path>`). Tokens are the text's UTF-8 bytes (vocabulary 256,
no tokenizer to fit or download), or, with `data.tokenizer=<local directory>`, a pretrained
model's own Hugging Face tokenizer (read with local_files_only).

The token stream is split into contiguous chunks, in this order: train, val, test (no sequence
straddles two splits). Each split is cut into non-overlapping windows of seq_len + 1 tokens; a
window gives x = its first seq_len tokens and y = its last seq_len (x shifted by one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from torch.utils.data import TensorDataset

from src.data.datamodules import DataUnavailable, TensorDataModule
from src.errors import ConfigError
from src.schema import FRACTION, POSITIVE

BYTES = 256


def pydoc_text() -> str:
    """The pydoc help topics that ship with Python's standard library, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(text_file: str | None) -> str:
    if text_file is None:
        return pydoc_text()
    path = Path(str(text_file)).expanduser()
    if not path.is_file():
        raise DataUnavailable(
            f"data.text_file={text_file}: no such file; pass a UTF-8 text file, or "
            "data.text_file=null for the pydoc text that ships with Python"
        )
    return path.read_text(encoding="utf-8", errors="replace")


def load_tokenizer(directory: str):
    """A Hugging Face tokenizer from a local directory, or a Hub id (src/hub.py)."""
    from transformers import AutoTokenizer

    from src.hub import from_pretrained

    return from_pretrained(AutoTokenizer.from_pretrained, directory, "data.tokenizer")


def windows(ids: torch.Tensor, seq_len: int) -> TensorDataset:
    """Non-overlapping (x, y) windows of a token stream, y = x shifted by one token."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return TensorDataset(x, y)


class TextDataModule(TensorDataModule):
    """Next-token prediction on a text: batches of (x, y) token ids of shape (B, seq_len).

    text_file:      a UTF-8 file (None: Python's pydoc topics).
    seq_len:        tokens per sequence.
    val_fraction, test_fraction: contiguous shares of the token stream, taken from its end
                    (train | val | test).
    test_size:      use only the first test_size test sequences (None: all), to keep lesion
                    sweeps short.
    tokenizer:      None: UTF-8 bytes (vocabulary 256); a local directory: its tokenizer.
    `num_classes` is the vocabulary size; `channels` is 1 (one token stream).
    """

    channels = 1
    inputs = "tokens"

    def __init__(
        self,
        text_file: str | None = None,
        seq_len: Annotated[int, POSITIVE] = 128,
        val_fraction: Annotated[float, FRACTION] = 0.05,
        test_fraction: Annotated[float, FRACTION] = 0.05,
        test_size: Annotated[int, POSITIVE] | None = None,
        tokenizer: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("augment", False)
        super().__init__(**kwargs)
        if seq_len < 1 or (test_size is not None and test_size < 1):
            raise ConfigError(
                f"data.seq_len ({seq_len}) and data.test_size ({test_size}) must be positive"
            )
        if not (0 < test_fraction and 0 < val_fraction and val_fraction + test_fraction < 1):
            raise ConfigError(
                "data.val_fraction and data.test_fraction must be positive with a sum below 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        self.text_file, self.seq_len, self.test_size = text_file, int(seq_len), test_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
        self.num_classes = BYTES if self.tokenizer is None else len(self.tokenizer)
        if text_file is not None:
            read_text(text_file)  # a missing file stops the run before any work

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ids = self.encode(read_text(self.text_file))
        n_val = int(len(ids) * self.val_fraction)
        n_test = int(len(ids) * self.test_fraction)
        n_train = len(ids) - n_val - n_test
        parts = {
            "train": ids[:n_train],
            "val": ids[n_train : n_train + n_val],
            "test": ids[n_train + n_val :],
        }
        self.splits = {k: windows(v, self.seq_len) for k, v in parts.items()}
        empty = [k for k, d in self.splits.items() if len(d) == 0]
        if empty:
            raise ConfigError(
                f"the text ({len(ids)} tokens) leaves no {empty[0]} sequence of seq_len "
                f"{self.seq_len}: use a longer text, a smaller data.seq_len or larger fractions"
            )
        if self.test_size is not None:
            x, y = self.splits["test"].tensors
            self.splits["test"] = TensorDataset(x[: self.test_size], y[: self.test_size])

    def transform(self, x: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        """Token ids need no augmentation or normalisation."""
        return x
