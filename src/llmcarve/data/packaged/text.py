"""Clean-text helpers shared by the extractors: paragraph reflow and prose out of HTML manuals."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from html.parser import HTMLParser

_BLANK_LINES = re.compile(r"\n\s*\n")
_SPACES = re.compile(r"\s+")


def squeeze(text: str) -> str:
    """One line, runs of whitespace as single spaces."""
    return _SPACES.sub(" ", text).strip()


def paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of hard-wrapped text, each reflowed onto one line.

    Why reflow: the line breaks of wrapped files are typesetting, and each one would cost the
    model a newline token in the middle of a sentence.
    """
    return [p for p in (squeeze(block) for block in _BLANK_LINES.split(text)) if p]


def word_count(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------------------------------------------
# HTML manuals: the prose of the main content element, without code, tables or navigation.

# Elements whose end starts a new paragraph.
_BLOCKS = frozenset(
    "p div section article h1 h2 h3 h4 h5 h6 li dt dd dl ul ol blockquote br hr figcaption caption "
    "title header footer aside".split()
)
_HEADINGS = frozenset("h1 h2 h3 h4 h5 h6".split())
# Elements that never close (html.parser reports no end tag for them).
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
# Subtrees that are never prose: code blocks, tables, scripts, and forms (inline <code> is
# part of its sentence).
_ALWAYS_SKIPPED = frozenset("pre script style table form svg math button select textarea nav".split())

ElementTest = Callable[[str, Mapping[str, str]], bool]


class _ProseParser(HTMLParser):
    """Collects paragraphs inside the first element matching `is_main`, minus skipped subtrees."""

    def __init__(self, is_main: ElementTest, is_skipped: ElementTest) -> None:
        super().__init__(convert_charrefs=True)
        self._is_main, self._is_skipped = is_main, is_skipped
        # open elements: (tag, opens the main content, opens a skipped subtree)
        self._stack: list[tuple[str, bool, bool]] = []
        self._in_main = self._skipping = 0
        self._buffer: list[str] = []
        self._heading = False
        self.paragraphs: list[tuple[str, bool]] = []  # (text, is a heading)
        self.main_closed = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS:
            self._flush()
        if tag in _VOID:
            return
        attributes = {name: value or "" for name, value in attrs}
        opens_main = not self._in_main and self._is_main(tag, attributes)
        skipped = tag in _ALWAYS_SKIPPED or self._is_skipped(tag, attributes)
        self._stack.append((tag, opens_main, skipped))
        self._in_main += opens_main
        self._skipping += skipped
        if tag in _HEADINGS:
            self._heading = True

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not any(open_tag == tag for open_tag, _, _ in self._stack):
            return  # a stray end tag
        # Close everything opened since the matching start tag (HTML lets <p>, <li>, ... go unclosed).
        while self._stack:
            open_tag, opened_main, skipped = self._stack.pop()
            self._in_main -= opened_main
            self.main_closed |= opened_main
            self._skipping -= skipped
            if open_tag == tag:
                break
        if tag in _BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_main and not self._skipping:
            self._buffer.append(data)

    def _flush(self) -> None:
        text = squeeze("".join(self._buffer))
        if text:
            self.paragraphs.append((text, self._heading))
        self._buffer.clear()
        self._heading = False

    def close(self) -> None:
        super().close()
        self._flush()


_CHUNK = 16384


def html_prose(
    html: str,
    is_main: ElementTest,
    is_skipped: ElementTest = lambda tag, attributes: False,
    min_words: int = 6,
    main_marker: str | None = None,
) -> str:
    """The prose of one HTML page: one paragraph a line, headings kept, and every other paragraph
    of fewer than `min_words` words dropped (captions, labels, menu entries).

    `main_marker`, text inside the main element's start tag, lets parsing begin at that tag.
    """
    parser = _ProseParser(is_main, is_skipped)
    # html.parser is slow and pages carry large navigation trees around the content: start at the
    # main element when its tag is known, and stop feeding once it has closed.
    start = html.find(main_marker) if main_marker else -1
    start = html.rfind("<", 0, start) if start > 0 else 0
    for begin in range(max(start, 0), len(html), _CHUNK):
        parser.feed(html[begin : begin + _CHUNK])
        if parser.main_closed:
            break
    parser.close()
    kept = [(text, heading) for text, heading in parser.paragraphs if heading or word_count(text) >= min_words]
    if all(heading for _, heading in kept):  # a page reduced to its headings has no prose
        return ""
    return "\n".join(text for text, _ in kept)


def has_class(attributes: Mapping[str, str], *names: str) -> bool:
    classes = attributes.get("class", "").split()
    return any(name in classes for name in names)

