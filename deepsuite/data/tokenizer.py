"""SentencePiece tokenizer: train a byte-fallback BPE model on a corpus, or load an existing one.

Special ids are fixed: unk=0, bos=1, eos=2, pad=3. Text is kept as is (identity normalisation, no
dummy prefix, whitespace kept), so that decoding gives back the original layout; characters outside
the learned pieces (newlines included) become byte pieces `<0x..>` instead of `<unk>`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from deepsuite.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded SentencePiece model with the ids deepsuite relies on."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer {str(self.path)!r} does not exist; set data.tokenizer to a SentencePiece "
                ".model file, or leave it empty to train one"
            )
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{self.path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"{self.path}: the tokenizer defines no EOS id; train it with eos_id set")

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are in [0, vocab_size))."""
        return int(self.sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        """End-of-document id, appended after every document."""
        return int(self.sp.eos_id())

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 when undefined)."""
        return int(self.sp.bos_id())

    @property
    def pad_id(self) -> int:
        """Padding id (-1 when undefined)."""
        return int(self.sp.pad_id())

    @property
    def unk_id(self) -> int:
        """Unknown-piece id."""
        return int(self.sp.unk_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special ids are dropped)."""
        return str(self.sp.DecodeIds([int(i) for i in ids]))


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    seed: int,
    num_threads: int = 2,
    max_sentences: int = 2_000_000,
) -> Path:
    """Train a byte-fallback BPE SentencePiece model on the lines of `texts`; return the .model path.

    Deterministic for a given corpus, vocab size and seed (the file holds no path or time).
    """
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    prefix = Path(model_prefix)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_lines(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise vocab_size_error(str(exc).strip().splitlines()[-1], vocab_size) from None
    path = prefix.with_suffix(".model")
    path.write_bytes(model.getvalue())
    return path


def vocab_size_error(msg: str, vocab_size: int) -> DataError:
    """The `DataError` for SentencePiece's training error `msg`, with advice in the right direction.

    SentencePiece fails both when the vocabulary cannot even hold the corpus's characters plus the
    byte and special pieces ("Vocabulary size is smaller than required_chars. 260 vs 283.") and when
    the corpus cannot yield that many pieces ("Vocabulary size too high (5000). Please set it to a
    value <= 408.").
    """
    small = re.search(r"smaller than required_chars\D*(\d+)\s*vs\s*(\d+)", msg)
    if small:
        need = int(small.group(2))
        return DataError(
            f"data.vocab_size={vocab_size} is too small for this corpus: its characters plus the byte and "
            f"special pieces need at least {need}; raise data.vocab_size to >= {need}"
        )
    large = re.search(r"too high.*?<=\s*(\d+)", msg)
    if large:
        most = int(large.group(1))
        return DataError(
            f"data.vocab_size={vocab_size} is too large for this corpus: it yields at most {most} pieces; "
            f"lower data.vocab_size to <= {most} or use a larger corpus"
        )
    if "Vocabulary size" in msg or "vocab_size" in msg:
        return DataError(
            f"data.vocab_size={vocab_size} does not suit this corpus ({msg}); change data.vocab_size"
        )
    return DataError(f"tokenizer training failed: {msg}")
