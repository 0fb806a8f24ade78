"""`llmkit clean`: the pretraining chapter's text cleaning, streamed line by line (or document by document).

Steps, in order: strip HTML tags and entities, Unicode NFKC, optional PII scrubbing, collapse whitespace,
optional lowercasing, stop-word removal and Snowball stemming, then drop empty and exact-duplicate units
(by hash). Counts of what was kept and dropped are reported at the end.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from llmkit.data.corpus import NAMED_CORPORA, bible_verses, corpus_files
from llmkit.data.pii import scrub_pii
from llmkit.errors import LlmkitError
from llmkit.io import atomic_file

_WS = re.compile(r"\s+")
_TAG_HINT = re.compile(r"<[a-zA-Z/!]")
_EDGE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, word, trailing punctuation


class _TextExtractor(HTMLParser):
    """Collect the text of an HTML fragment, skipping <script> and <style> bodies."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Text content of HTML (tags removed, entities decoded); plain text passes through unchanged."""
    if not _TAG_HINT.search(text):
        return html.unescape(text) if "&" in text else text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def normalize(text: str) -> str:
    """Unicode NFKC (full-width -> ASCII forms, ligatures split, ...) and collapsed whitespace."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


class Cleaner:
    """Stateful cleaner: remembers hashes of units already seen, and counts what it did."""

    def __init__(self, html_: bool = True, lowercase: bool = False, stopwords: str | None = None,
                 stem: str | None = None, dedup: bool = True, scrub_pii: bool = False, min_chars: int = 1):
        self.html, self.lowercase, self.dedup, self.scrub, self.min_chars = html_, lowercase, dedup, scrub_pii, min_chars
        self.stop: set[str] = set()
        if stopwords == "english":  # scikit-learn's 318-word list; the stop-words package's is 1,333 words
            from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

            self.stop = set(ENGLISH_STOP_WORDS)
        elif stopwords:
            from stop_words import AVAILABLE_LANGUAGES, get_stop_words

            if stopwords not in AVAILABLE_LANGUAGES:
                raise LlmkitError(f"no stop-word list for {stopwords!r}; choose one of {', '.join(AVAILABLE_LANGUAGES)}")
            self.stop = set(get_stop_words(stopwords))
        self.stemmer = None
        if stem:
            import snowballstemmer

            if stem not in snowballstemmer.algorithms():
                raise LlmkitError(f"no Snowball stemmer for {stem!r}; choose one of {', '.join(snowballstemmer.algorithms())}")
            self.stemmer = snowballstemmer.stemmer(stem)
        self.seen: set[bytes] = set()
        self.counts: Counter[str] = Counter()

    def _words(self, text: str) -> str:
        """Stop-word removal and stemming per whitespace token; punctuation around a word is kept."""
        out = []
        for tok in text.split(" "):
            m = _EDGE.match(tok)
            lead, word, trail = m.group(1), m.group(2), m.group(3)
            if self.stop and word.lower() in self.stop:
                self.counts["stopwords_removed"] += 1
                continue
            if self.stemmer is not None and word:
                word = self.stemmer.stemWord(word)
            out.append(lead + word + trail)
        return " ".join(out)

    def clean(self, unit: str) -> str | None:
        """The cleaned unit, or None if it is dropped (empty, too short or a duplicate)."""
        self.counts["input"] += 1
        text = strip_html(unit) if self.html else unit
        text = unicodedata.normalize("NFKC", text)
        if self.scrub:
            text, found = scrub_pii(text)
            for kind, n in found.items():
                self.counts[f"pii_{kind}"] += n
        text = normalize(text)
        if self.lowercase:
            text = text.lower()
        if self.stop or self.stemmer is not None:
            text = self._words(text)
        if len(text) < self.min_chars:
            self.counts["dropped_empty"] += 1
            return None
        if self.dedup:
            h = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if h in self.seen:
                self.counts["dropped_duplicate"] += 1
                return None
            self.seen.add(h)
        self.counts["kept"] += 1
        return text


def _units(data: str, unit: Literal["line", "document"]) -> Iterator[str]:
    """Stream lines, or documents separated by blank lines, from a corpus."""
    if data in NAMED_CORPORA:
        yield from bible_verses()
        return
    for f in corpus_files(data):
        buf: list[str] = []
        try:
            with f.open(encoding="utf-8") as fh:
                for line in fh:
                    if unit == "line":
                        yield line
                    elif line.strip():
                        buf.append(line)
                    elif buf:
                        yield "".join(buf)
                        buf = []
        except UnicodeDecodeError as e:
            raise LlmkitError(f"{f} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e
        if buf:
            yield "".join(buf)


def clean(*, data: str, out: str, unit: Literal["line", "document"] = "line", strip_html_tags: bool = True,
          lowercase: bool = False, stopwords: str | None = None, stem: str | None = None, dedup: bool = True,
          scrub_pii: bool = False, min_chars: int = 1) -> dict[str, int]:
    """Clean a raw text corpus into OUT (one cleaned unit per line, or documents separated by blank lines).

    Args:
        data: a named corpus (`bible`), a UTF-8 text file, or a folder of .txt files.
        out: output text file (written atomically).
        unit: clean and deduplicate per line, or per document (paragraphs separated by blank lines).
        strip_html_tags: remove HTML tags, scripts and styles; decode entities.
        lowercase: lowercase everything.
        stopwords: remove stop words of this language (english, chinese, french, ...; `stop-words` package).
        stem: Snowball-stem words in this language (english, porter, german, ...; `snowballstemmer`).
        dedup: drop exact duplicate units (hash of the cleaned text).
        scrub_pii: mask e-mails, phone numbers, IPs, credit cards and ID numbers (see llmkit.data.pii).
        min_chars: drop units shorter than this after cleaning.

    Examples:
        llmkit clean --data raw.txt --out clean.txt
        llmkit clean --data crawl/ --out clean.txt --unit document --lowercase true --stopwords english --stem english
        llmkit clean --data support_tickets.txt --out safe.txt --scrub_pii true
    """
    cleaner = Cleaner(strip_html_tags, lowercase, stopwords, stem, dedup, scrub_pii, min_chars)
    out_path = Path(out)
    sep = "\n" if unit == "line" else "\n\n"
    with atomic_file(out_path) as tmp:
        with tmp.open("w", encoding="utf-8") as fh:
            for u in tqdm(_units(data, unit), desc="clean", unit=unit, mininterval=1.0):
                cleaned = cleaner.clean(u)
                if cleaned is not None:
                    fh.write(cleaned + sep)
        if cleaner.counts["input"] == 0:
            raise LlmkitError(f"corpus {data!r} is empty; give it some text")
    counts = dict(cleaner.counts)
    dropped = counts.get("dropped_empty", 0) + counts.get("dropped_duplicate", 0)
    print(f"kept {counts.get('kept', 0):,} of {counts['input']:,} {unit}s, dropped {dropped:,} "
          f"({counts.get('dropped_duplicate', 0):,} duplicate, {counts.get('dropped_empty', 0):,} empty) -> {out_path}")
    extra = {k: v for k, v in counts.items() if k.startswith("pii_") or k == "stopwords_removed"}
    if extra:
        print("  " + ", ".join(f"{k}: {v:,}" for k, v in sorted(extra.items())))
    return counts
