"""Word-level difference between an answer and a user's correction, as the demo shows it after a correction.

The segments feed `gr.HighlightedText`: unchanged words carry no label, words the correction removed carry
"removed", words it added carry "added".
"""

from __future__ import annotations

import difflib
import re

_TOKEN = re.compile(r"\S+\s*")


def word_diff(answer: str, correction: str) -> list[tuple[str, str | None]]:
    """Segments of (text, label) that rebuild the answer's removed words and the correction's kept and added words.

    Neighbouring segments with the same label are merged, so the page shows phrases, not single words.
    """
    before, after = _TOKEN.findall(answer), _TOKEN.findall(correction)
    matcher = difflib.SequenceMatcher(a=[t.strip() for t in before], b=[t.strip() for t in after], autojunk=False)
    segments: list[tuple[str, str | None]] = []

    def add(text: str, label: str | None) -> None:
        if not text:
            return
        if segments and segments[-1][1] == label:
            segments[-1] = (segments[-1][0] + text, label)
        else:
            segments.append((text, label))

    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            add("".join(after[b0:b1]), None)
            continue
        add("".join(before[a0:a1]), "removed")
        add("".join(after[b0:b1]), "added")
    return segments


def changed_words(answer: str, correction: str) -> tuple[list[str], list[str]]:
    """The words the correction removed and the words it added, in order."""
    removed = [w for text, label in word_diff(answer, correction) if label == "removed" for w in text.split()]
    added = [w for text, label in word_diff(answer, correction) if label == "added" for w in text.split()]
    return removed, added
