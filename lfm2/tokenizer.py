"""Tokenizers for training an exported LFM2 architecture, built with the `tokenizers` package.

Two kinds, both saved as a standard `tokenizer.json` (+ `tokenizer_config.json`) that
`transformers.AutoTokenizer` loads without remote code:

* `bytes` -- byte-level: token id == byte value (0..255), and one special token,
  `<|endoftext|>`, at id 256 that ends every document. It needs a vocabulary of at least
  257; a larger one is fine: the rows above 256 are never fed in, and since the head is
  tied to the embedding, training pushes their logits down (the softmax gradient) so that
  generation does not pick them.
* `bpe` -- a byte-level BPE trained here on the training split, with `vocab_size` equal to
  the model's vocabulary (fewer merges when the corpus is too small to fill it; the unused
  rows then behave as above). `<|endoftext|>` is id 0.

Both use the byte-level pre-tokenizer, so any text (and any byte sequence) is encodable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from lfm2.errors import UserError

END_OF_TEXT = "<|endoftext|>"
BYTE_VOCAB = 256
TOKENIZER_KINDS = ("bytes", "bpe")


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE: printable
    Latin-1 bytes stand for themselves, the others are moved to code points from 256 up."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level tokenizer with id == byte value and `<|endoftext|>` at 256."""
    if vocab_size < BYTE_VOCAB + 1:
        raise UserError(
            f"byte-level training needs a vocabulary of at least {BYTE_VOCAB + 1} (256 bytes and an end-of-text token); "
            f"this model has {vocab_size}: export an architecture with a larger vocab_size"
        )
    table = _byte_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    # No regex split: every byte becomes one token, exactly `np.frombuffer(text, uint8)`.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts` with at most `vocab_size` tokens."""
    if vocab_size < BYTE_VOCAB + 1:
        raise UserError(f"a byte-level BPE needs a vocabulary of at least {BYTE_VOCAB + 1}; this model has {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def end_of_text_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise UserError(f"the tokenizer has no {END_OF_TEXT} token; train with --tokenizer bytes or bpe to make one")
    return token_id


def encode_documents(tokenizer: Tokenizer, documents: list[bytes], kind: str, dtype=np.int32) -> np.ndarray:
    """All documents as one token stream, each followed by `<|endoftext|>`."""
    eot = end_of_text_id(tokenizer)
    pieces = []
    if kind == "bytes":
        # Same ids as the tokenizer gives (checked in the tests), without a Python loop.
        for doc in documents:
            pieces.append(np.frombuffer(doc, dtype=np.uint8).astype(dtype))
            pieces.append(np.array([eot], dtype=dtype))
    else:
        texts = [doc.decode("utf-8", errors="replace") for doc in documents]
        for batch_start in range(0, len(texts), 256):
            for encoding in tokenizer.encode_batch(texts[batch_start : batch_start + 256], add_special_tokens=False):
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
                pieces.append(np.array([eot], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, kind: str, model_max_length: int) -> None:
    """`tokenizer.json` and a `tokenizer_config.json` that `AutoTokenizer` reads."""
    folder = Path(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "lfm2_nas_tokenizer": kind,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(folder: str | Path) -> tuple[Tokenizer, str]:
    """The tokenizer saved in `folder` and its kind (`bytes` or `bpe`)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json")
    kind = "bpe"
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        kind = json.loads(config_path.read_text()).get("lfm2_nas_tokenizer", "bpe")
    return Tokenizer.from_file(str(path)), kind


__all__ = [
    "END_OF_TEXT",
    "TOKENIZER_KINDS",
    "byte_tokenizer",
    "train_bpe_tokenizer",
    "end_of_text_id",
    "encode_documents",
    "save_tokenizer",
    "load_tokenizer",
]
