"""Find and mask (or remove) personal data in text: e-mails, phone numbers, IP addresses, card and ID numbers.

Each detector validates its candidates (phone numbers with `phonenumbers`, IPs with `ipaddress`, card
numbers with the Luhn checksum, national IDs with their check digits), so ordinary numbers — years, prices,
verse references, counts — stay. Earlier detectors win where spans overlap (an e-mail's digits are not a phone).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import Literal

import phonenumbers

from llmkit.errors import LlmkitError

KINDS = ("email", "credit_card", "id", "ip", "phone")
MASKS = {"email": "[EMAIL]", "credit_card": "[CREDIT_CARD]", "id": "[ID]", "ip": "[IP]", "phone": "[PHONE]"}

Span = tuple[int, int]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
# 13-19 digits, run together or grouped by single spaces/dashes (4-4-4-4, 4-6-5 for Amex, ...)
_CARD = re.compile(r"(?<![\d-])\d{4}(?:[ -]?\d{2,6}){2,4}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_CN_ID = re.compile(r"(?<![\dA-Za-z])\d{17}[\dXx](?![\dA-Za-z])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# "passport no. X1234567", "customer ID: 88-1234-77", "my SSN is ...": a labelled code with at least 4 digits
_LABELLED = re.compile(
    r"(?i)\b(?:id|ssn|passport|licen[cs]e|account|acct|member(?:ship)?|customer|employee|patient|student|tax)"
    r"(?:\s+(?:no\.?|number|num|id|#))?(?:\s+(?:is|was))?\s*[:#]?\s*(?P<code>(?=(?:[A-Z-]*\d){4})[A-Z0-9][A-Z0-9-]{4,}[A-Z0-9])\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (double every second digit from the right)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cn_id_ok(s: str) -> bool:
    """Chinese resident ID: ISO 7064 MOD 11-2 check character."""
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    check = "10X98765432"[sum(int(c) * w for c, w in zip(s[:17], weights)) % 11]
    return s[17].upper() == check


def _iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def _cards(text: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            yield m.span()


def _ids(text: str) -> Iterator[Span]:
    for m in _SSN.finditer(text):
        yield m.span()
    for m in _CN_ID.finditer(text):
        if _cn_id_ok(m.group()):
            yield m.span()
    for m in _IBAN.finditer(text):
        if _iban_ok(m.group()):
            yield m.span()
    for m in _LABELLED.finditer(text):
        yield m.span("code")


def _ips(text: str) -> Iterator[Span]:
    for rx in (_IPV4, _IPV6):
        for m in rx.finditer(text):
            s = m.group()
            if rx is _IPV6 and (s.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", s)):
                continue  # "12:30:45" is a time; ipaddress rejects it anyway, this skips the obvious ones
            try:
                ipaddress.ip_address(s)
            except ValueError:
                continue
            yield m.span()


def _phones(text: str, region: str) -> Iterator[Span]:
    for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
        yield m.start, m.end


def find_pii(text: str, region: str = "US") -> list[tuple[int, int, str]]:
    """All PII spans (start, end, kind), sorted, non-overlapping; earlier kinds in KINDS win overlaps."""
    detectors: list[tuple[str, Callable[[str], Iterator[Span]]]] = [
        ("email", _emails), ("credit_card", _cards), ("id", _ids), ("ip", _ips),
        ("phone", lambda t: _phones(t, region)),
    ]
    claimed: list[tuple[int, int, str]] = []
    view = text
    for kind, detect in detectors:
        found = []
        for s, e in detect(view):
            if not any(s < ce and cs < e for cs, ce, _ in claimed + found):
                found.append((s, e, kind))
        claimed += found
        # blank claimed spans so later detectors cannot match across them (same length keeps offsets)
        for s, e, _ in found:
            view = view[:s] + "\x00" * (e - s) + view[e:]
    return sorted(claimed)


def scrub_pii(text: str, mode: Literal["mask", "remove"] = "mask", *, region: str = "US"
              ) -> tuple[str, dict[str, int]]:
    """Mask (`[EMAIL]`, `[PHONE]`, `[IP]`, `[CREDIT_CARD]`, `[ID]`) or remove personal data in `text`.

    Returns the scrubbed text and the number of spans found per kind (every kind present, 0 if none).
    `region` is the country assumed for phone numbers written without a +country code.
    """
    if mode not in ("mask", "remove"):
        raise LlmkitError(f"unknown PII mode {mode!r}; choose mask or remove")
    counts = dict.fromkeys(KINDS, 0)
    out: list[str] = []
    pos = 0
    for s, e, kind in find_pii(text, region):
        counts[kind] += 1
        piece = text[pos:s]
        if mode == "remove" and piece.endswith(" ") and text[e:e + 1] in (" ", ""):
            piece = piece[:-1]  # "call 555 now" -> "call now", not "call  now"
        out.append(piece)
        out.append(MASKS[kind] if mode == "mask" else "")
        pos = e
    out.append(text[pos:])
    return "".join(out), counts
