"""Tokenizers: SentencePiece models (trained here or given) and Hugging Face ``tokenizers`` files.

**SentencePiece** (what `prepare-data` trains when `data.tokenizer` is empty): a byte-fallback BPE
model. Special ids are fixed: unk=0, bos=1, eos=2, pad=3. Text is kept as is (identity
normalisation, no dummy prefix, whitespace kept), so that decoding gives back the original layout;
characters outside the learned pieces (newlines included) become byte pieces `<0x..>` instead of
`<unk>`.

**Hugging Face** (to fine-tune a model from the Hub with its own vocabulary, e.g. GPT-2's byte-level
BPE or DeepSeek-V3's): `data.tokenizer` names a model folder holding `tokenizer.json`, or that file
itself. The end-of-document token comes from `tokenizer_config.json` (`eos_token`) or `config.json`
(`eos_token_id`) beside it. `prepare-data` stores it as one self-contained file
(`tokenizer.json` in the data folder: the tokenizer plus its special tokens), which checkpoints copy.
Text is encoded without added special tokens, and special-token text inside a document (e.g. a
literal `<|endoftext|>`) is encoded as plain text; documents are separated by the EOS id only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from deepsuite.data.errors import DataError
from deepsuite.data.files import regular_file, sha256_file

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

HF_TOKENIZER_FILE = "tokenizer.json"
"""Name of a Hugging Face tokenizer file (and of deepsuite's bundle of one in a data folder)."""
_BUNDLE_FORMAT = "deepsuite-hf-tokenizer/1"
_SPECIAL = ("eos", "bos", "pad", "unk")


def is_hf_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face tokenizer: a folder holding ``tokenizer.json`` or a ``.json`` file."""
    p = Path(path)
    return (p.is_dir() and (p / HF_TOKENIZER_FILE).is_file()) or (p.is_file() and p.suffix == ".json")


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: not readable JSON ({exc}); point data.tokenizer at a valid tokenizer"
        ) from None


def _hf_special_tokens(folder: Path, tok: Any) -> dict[str, str | None]:
    """eos/bos/pad/unk token strings from ``tokenizer_config.json``, else ids from ``config.json``."""
    out: dict[str, str | None] = dict.fromkeys(_SPECIAL)
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        conf = _read_json(tc)
        if isinstance(conf, dict):
            for name in _SPECIAL:
                out[name] = _token_text(conf.get(f"{name}_token"))
    mc = folder / "config.json"
    if mc.is_file():
        conf = _read_json(mc)
        if isinstance(conf, dict):
            for name in _SPECIAL:
                token_id = conf.get(f"{name}_token_id")
                if isinstance(
                    token_id, list
                ):  # some configs list several EOS ids: the first is the document end
                    token_id = token_id[0] if token_id else None
                if out[name] is None and isinstance(token_id, int):
                    out[name] = tok.id_to_token(token_id)
    return out


def bundle_hf_tokenizer(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Write the Hugging Face tokenizer ``src`` (a folder with ``tokenizer.json``, or that file) to
    ``dst`` as one self-contained deepsuite file: the tokenizer and its special tokens.

    Raises `DataError` when it does not load or no end-of-document token can be found.
    """
    source = Path(src)
    folder, file = (source, source / HF_TOKENIZER_FILE) if source.is_dir() else (source.parent, source)
    tok = _load_hf(file)
    special = _hf_special_tokens(folder, tok)
    if special["eos"] is None:
        raise DataError(
            f'{source}: cannot tell the end-of-document token: add "eos_token" to tokenizer_config.json (or '
            '"eos_token_id" to config.json) beside tokenizer.json'
        )
    for name, token in special.items():
        if token is not None and tok.token_to_id(token) is None:
            raise DataError(f"{source}: its {name} token {token!r} is not in the vocabulary")
    bundle = {
        "format": _BUNDLE_FORMAT,
        "source": str(source),
        "special_tokens": special,
        "tokenizer": json.loads(tok.to_str()),
    }
    Path(dst).write_text(json.dumps(bundle, ensure_ascii=False) + "\n", encoding="utf-8")


def _load_hf(file: Path, text: str | None = None) -> Any:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise DataError(
            f"{file} is a Hugging Face tokenizer; install the `tokenizers` package (pip install 'deepsuite[hf]')"
        ) from None
    try:
        return HFTokenizer.from_str(text) if text is not None else HFTokenizer.from_file(str(file))
    except Exception as exc:  # the Rust loader raises plain Exceptions
        raise DataError(f"{file}: not a Hugging Face tokenizer ({str(exc).splitlines()[0][:200]})") from None


class Tokenizer:
    """A loaded tokenizer with the ids deepsuite relies on: a SentencePiece ``.model``, a Hugging
    Face ``tokenizer.json`` (or a model folder holding one), or deepsuite's bundle of the latter."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.sp: Any = None
        self.hf: Any = None
        self._special: dict[str, int] = {}
        what = (
            "set data.tokenizer to a SentencePiece .model file or a Hugging Face tokenizer (a "
            "tokenizer.json or a model folder holding one), or leave it empty to train one"
        )
        if not self.path.exists():
            raise DataError(f"tokenizer {str(self.path)!r} does not exist; {what}")
        if not self.path.is_dir():
            regular_file(self.path, "tokenizer", what)
        if is_hf_tokenizer(self.path):
            self._init_hf()
        else:
            self._init_sentencepiece()

    def _init_sentencepiece(self) -> None:
        import sentencepiece as spm

        if not self.path.is_file():
            raise DataError(f"{self.path}: a folder without {HF_TOKENIZER_FILE}; give a tokenizer file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{self.path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"{self.path}: the tokenizer defines no EOS id; train it with eos_id set")

    def _init_hf(self) -> None:
        if self.path.is_dir():
            folder, file = self.path, self.path / HF_TOKENIZER_FILE
            self.hf = _load_hf(file)
            special = _hf_special_tokens(folder, self.hf)
        else:
            data = _read_json(self.path)
            if isinstance(data, dict) and data.get("format") == _BUNDLE_FORMAT:
                self.hf = _load_hf(self.path, json.dumps(data["tokenizer"]))
                special = data.get("special_tokens") or {}
            else:
                self.hf = _load_hf(self.path)
                special = _hf_special_tokens(self.path.parent, self.hf)
        # special-token text inside a document ("<|endoftext|>" in web text) is plain text, not a
        # control token: documents are separated by the EOS id deepsuite appends, nothing else
        if hasattr(self.hf, "encode_special_tokens"):
            self.hf.encode_special_tokens = True
        for name in _SPECIAL:
            token = special.get(name)
            token_id = self.hf.token_to_id(token) if token else None
            self._special[name] = -1 if token_id is None else int(token_id)
        if self._special["eos"] < 0:
            raise DataError(
                f'{self.path}: cannot tell the end-of-document token: add "eos_token" to '
                'tokenizer_config.json (or "eos_token_id" to config.json) beside tokenizer.json'
            )

    @property
    def kind(self) -> str:
        """``"sentencepiece"`` or ``"huggingface"``."""
        return "sentencepiece" if self.sp is not None else "huggingface"

    @property
    def vocab_size(self) -> int:
        """Number of ids (ids are in [0, vocab_size)); added tokens included."""
        if self.sp is not None:
            return int(self.sp.GetPieceSize())
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def _special_id(self, name: str) -> int:
        if self.sp is not None:
            return int(getattr(self.sp, f"{name}_id")())
        return self._special[name]

    @property
    def eos_id(self) -> int:
        """End-of-document id, appended after every document."""
        return self._special_id("eos")

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 when undefined)."""
        return self._special_id("bos")

    @property
    def pad_id(self) -> int:
        """Padding id (-1 when undefined)."""
        return self._special_id("pad")

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (-1 when undefined)."""
        return self._special_id("unk")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each of `texts` (no BOS/EOS added)."""
        if self.sp is not None:
            return [list(ids) for ids in self.sp.EncodeAsIds(texts)]
        return [list(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special ids are dropped)."""
        if self.sp is not None:
            return str(self.sp.DecodeIds([int(i) for i in ids]))
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=True))


def check_tokenizer(data_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a prepared data folder (`meta` is its meta.json), loaded; a `DataError` when
    it is missing, not a regular file, not the file prepare-data wrote (meta's ``tokenizer_sha256``,
    where recorded), does not load, or disagrees with meta's vocabulary size or EOS id. Training
    checks this before it builds anything: the shards hold this tokenizer's ids, and checkpoints
    copy it."""
    folder = Path(data_dir)
    name = meta["tokenizer"]
    fix = "restore it or rebuild the folder with `deepsuite prepare-data --config FILE --force`"
    if Path(name).name != name or name in ("", ".", ".."):
        raise DataError(
            f"{folder / 'meta.json'}: key 'tokenizer' must name a file in the folder, not {name!r}; {fix}"
        )
    path = folder / name
    what = "the data folder's tokenizer"
    if regular_file(path, what, fix) is None:
        raise DataError(f"{what} {path} is missing (prepare-data wrote it, training needs it); {fix}")
    recorded = meta.get("tokenizer_sha256")
    if isinstance(recorded, str) and sha256_file(path) != recorded:
        raise DataError(
            f"{what} {path} is not the file prepare-data wrote (its sha256 differs from meta.json's "
            f"tokenizer_sha256); the shards hold that tokenizer's ids: {fix}"
        )
    try:
        tok = Tokenizer(path)
    except DataError as exc:
        reason = str(exc).split("; ", 1)[0]  # its own advice is about data.tokenizer, not this folder
        raise DataError(f"{what} does not load ({reason}); {fix}") from None
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(
            f"{what} {path} has {tok.vocab_size} pieces but the shards were written with "
            f"vocab_size={meta['vocab_size']} (meta.json); {fix}"
        )
    eos = meta.get("eos_id")
    if isinstance(eos, int) and not isinstance(eos, bool) and tok.eos_id != eos:
        raise DataError(
            f"{what} {path} has EOS id {tok.eos_id} but the shards were written with eos_id={eos} "
            f"(meta.json); {fix}"
        )
    return tok


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


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""Name of the transformers file that names a tokenizer's class and special tokens."""
SENTENCEPIECE_FILE = "tokenizer.model"
"""Name under which a SentencePiece model is stored (data folders, checkpoints, model folders)."""


def _is_bundle(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".json"):
        return False
    data = _read_json(path)
    return isinstance(data, dict) and data.get("format") == _BUNDLE_FORMAT


def store_tokenizer(src: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Put the tokenizer ``src`` into ``folder`` as deepsuite keeps one (in data folders and
    checkpoints): a SentencePiece model is copied as ``tokenizer.model``, deepsuite's bundle is copied
    as is, and a Hugging Face tokenizer (a folder with ``tokenizer.json`` or that file) is bundled
    into ``tokenizer.json`` with its special tokens. Returns the file written; raises `DataError`
    when ``src`` does not load."""
    import shutil

    source = Path(src)
    tok = Tokenizer(source)  # validates it
    if tok.kind == "sentencepiece":
        dst = Path(folder) / SENTENCEPIECE_FILE
        shutil.copyfile(source, dst)
    elif _is_bundle(source):
        dst = Path(folder) / HF_TOKENIZER_FILE
        shutil.copyfile(source, dst)
    else:
        dst = Path(folder) / HF_TOKENIZER_FILE
        bundle_hf_tokenizer(source, dst)
    return dst


def _hf_tokenizer_text(path: Path) -> str:
    """The plain ``tokenizer.json`` text of a Hugging Face tokenizer folder, file or deepsuite bundle."""
    if path.is_dir():
        return (path / HF_TOKENIZER_FILE).read_text(encoding="utf-8")
    data = _read_json(path)
    if isinstance(data, dict) and data.get("format") == _BUNDLE_FORMAT:
        return json.dumps(data["tokenizer"], ensure_ascii=False) + "\n"
    return path.read_text(encoding="utf-8")


def export_hf_tokenizer(src: str | os.PathLike[str], folder: str | os.PathLike[str]) -> dict[str, int]:
    """Write the tokenizer ``src`` into the HF model folder ``folder`` the way transformers'
    ``AutoTokenizer`` reads it, and return the special ids for its ``config.json``
    (``eos_token_id``, ``bos_token_id``, ``pad_token_id``: those the tokenizer defines).

    A Hugging Face tokenizer (deepsuite's bundle included) becomes a plain ``tokenizer.json`` plus a
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast`` with its special tokens); a SentencePiece
    model is copied as ``tokenizer.model`` with a ``tokenizer_config.json`` naming its special pieces
    (``LlamaTokenizerFast`` set to add nothing, as deepsuite encodes). Either way transformers encodes
    text to deepsuite's ids, except special-token text inside a document, which it reads as the
    special token. Raises `DataError` when ``src`` does not load.
    """
    import shutil

    out = Path(folder)
    tok = Tokenizer(src)
    ids = {name: tok._special_id(name) for name in _SPECIAL}
    config: dict[str, Any] = {}
    if tok.kind == "huggingface":
        (out / HF_TOKENIZER_FILE).write_text(_hf_tokenizer_text(tok.path), encoding="utf-8")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokens = {name: tok.hf.id_to_token(i) for name, i in ids.items() if i >= 0}
    else:
        shutil.copyfile(tok.path, out / SENTENCEPIECE_FILE)
        # transformers' SentencePiece tokenizer, told to encode as deepsuite does: nothing added, no
        # dummy prefix (deepsuite's models are trained with add_dummy_prefix=False)
        config.update(
            tokenizer_class="LlamaTokenizerFast",
            add_bos_token=False,
            add_eos_token=False,
            add_prefix_space=False,
            legacy=False,
        )
        tokens = {name: str(tok.sp.IdToPiece(i)) for name, i in ids.items() if i >= 0}
    for name in ("bos", "eos", "unk", "pad"):
        if tokens.get(name):
            config[f"{name}_token"] = tokens[name]
    (out / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return {f"{name}_token_id": ids[name] for name in ("eos", "bos", "pad") if ids[name] >= 0}
