"""Train, load and save tokenizers with HF `tokenizers`: byte-level BPE, WordPiece and character-level.

`Tokenizer` wraps a `tokenizers.Tokenizer` with the roles of its special tokens (bos/eos/pad/...),
which the rest of llmkit needs and `tokenizer.json` alone does not record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmkit.errors import LlmkitError

Kind = Literal["bpe", "wordpiece", "char"]

DEFAULT_SPECIALS: dict[str, dict[str, str]] = {
    "bpe": {"eos": "<|endoftext|>", "bos": "<|endoftext|>", "pad": "<|pad|>"},
    "char": {"eos": "<|endoftext|>", "bos": "<|endoftext|>", "pad": "<|pad|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
}
# Names we recognise when a tokenizer.json comes without roles (e.g. one trained elsewhere).
_KNOWN_ROLES = {
    "eos": ["<|endoftext|>", "</s>", "[SEP]", "<|im_end|>", "<eos>"],
    "bos": ["<|endoftext|>", "<s>", "[CLS]", "<bos>"],
    "pad": ["<|pad|>", "[PAD]", "<pad>"],
    "unk": ["[UNK]", "<unk>"],
    "cls": ["[CLS]", "<s>"],
    "sep": ["[SEP]", "</s>"],
    "mask": ["[MASK]", "<mask>"],
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special-token roles. Encode/decode never add specials implicitly."""

    def __init__(self, tok: HFTokenizer, specials: dict[str, str] | None = None,
                 chat_template: str | None = None):
        self.tok = tok
        vocab = tok.get_vocab()
        if specials is None:
            specials = {}
            for role, names in _KNOWN_ROLES.items():
                for name in names:
                    if name in vocab:
                        specials[role] = name
                        break
        self.specials = {r: t for r, t in specials.items() if t in vocab}
        self.chat_template = chat_template

    # -- ids of special tokens -------------------------------------------------------------------------
    def special_id(self, role: str) -> int | None:
        t = self.specials.get(role)
        return None if t is None else self.tok.token_to_id(t)

    @property
    def eos_id(self) -> int | None:
        return self.special_id("eos")

    @property
    def bos_id(self) -> int | None:
        return self.special_id("bos")

    @property
    def pad_id(self) -> int:
        """Padding id: the pad token, else eos, else 0 (padding is always masked out anyway)."""
        for role in ("pad", "eos"):
            i = self.special_id(role)
            if i is not None:
                return i
        return 0

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    # -- encode / decode ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- files ----------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, with roles and chat template in tokenizer_config.json (HF's file names)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        meta: dict[str, object] = {f"{r}_token": t for r, t in self.specials.items()}
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding tokenizer.json (+ optional tokenizer_config.json) or a tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise LlmkitError(f"no tokenizer at {file}; train one with `llmkit tokenizer train` or pass its folder")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
            raise LlmkitError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
        specials, template = None, None
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.exists():
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
            roles = {k[: -len("_token")]: v for k, v in meta.items() if k.endswith("_token") and isinstance(v, str)}
            specials = roles or None
            template = meta.get("chat_template") if isinstance(meta.get("chat_template"), str) else None
        return cls(tok, specials, template)


def _build(kind: Kind, lowercase: bool) -> HFTokenizer:
    if kind == "bpe":  # GPT-2 style: bytes -> 256 base symbols, so any UTF-8 text round-trips
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
    elif kind == "wordpiece":  # BERT style: normalise, split on whitespace/punctuation/CJK chars, ## pieces
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    elif kind == "char":  # every Unicode character is a token; unseen characters map to <unk>
        tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
    else:
        raise LlmkitError(f"unknown tokenizer kind {kind!r}; choose bpe, wordpiece or char")
    return tok


def train_from_iterator(texts: Iterable[str], kind: Kind = "bpe", vocab_size: int = 4096,
                        min_frequency: int = 2, lowercase: bool = False,
                        special_tokens: list[str] | None = None, show_progress: bool = True) -> Tokenizer:
    """Train a tokenizer on an iterator of texts (the Python API under `llmkit tokenizer train`)."""
    roles = dict(DEFAULT_SPECIALS[kind])
    specials = list(dict.fromkeys(list(roles.values()) + (special_tokens or [])))
    if kind == "char":
        specials.append("<unk>")
        roles["unk"] = "<unk>"
    tok = _build(kind, lowercase)
    if kind == "bpe":
        min_vocab = 256 + len(specials)
        if vocab_size < min_vocab:
            raise LlmkitError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least {min_vocab}")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
    elif kind == "wordpiece":
        if vocab_size < len(specials) + 100:
            raise LlmkitError(f"vocab_size={vocab_size} is too small for WordPiece; use at least {len(specials) + 100}")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=show_progress)
    else:
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                            show_progress=show_progress)
    counted = _CountingIterator(texts)
    tok.train_from_iterator(counted, trainer=trainer)
    if counted.chars == 0:
        raise LlmkitError("the corpus is empty: no text to train a tokenizer on")
    if kind == "wordpiece":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return Tokenizer(tok, roles)


class _CountingIterator:
    """Pass texts through while counting characters, to tell an empty corpus from a small one."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self) -> Iterator[str]:
        for t in self.texts:
            self.chars += len(t)
            yield t


