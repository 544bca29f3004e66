"""HTML building blocks of the report: escaping by default, tables, data URIs and the page shell.

Every string that comes from a file (labels are folder names, paths, error text) goes through
``text``/``html.escape``; only ``Html`` values, built here from escaped parts, pass unescaped.
The page is self-contained: inline CSS, images as ``data:`` URIs, no script, no external link.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence


class Html(str):
    """A string that is already HTML (built from escaped parts): inserted as it is."""


def text(value: object) -> Html:
    """``value`` as HTML text: escaped unless it already is ``Html``; ``None`` shows as a dash."""
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("&mdash;")
    return Html(html.escape(str(value), quote=True))


def tag(name: str, *children: object, cls: str | None = None, title: str | None = None,
        style: str | None = None) -> Html:
    """``<name class=.. title=..>children</name>``; attribute values and children escaped."""
    attrs = ""
    if cls:
        attrs += f' class="{html.escape(cls, quote=True)}"'
    if title:
        attrs += f' title="{html.escape(title, quote=True)}"'
    if style:
        attrs += f' style="{html.escape(style, quote=True)}"'
    return Html(f"<{name}{attrs}>" + "".join(text(c) for c in children) + f"</{name}>")


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(html.escape(sep).join(text(p) for p in parts))


def table(headers: Sequence[object] | None, rows: Iterable[Sequence[object]], *, cls: str = "grid",
          row_classes: Sequence[str | None] | None = None) -> Html:
    """A table (no header row when ``headers`` is None); a cell is text (escaped) or ``Html``."""
    head = "" if headers is None else "<thead><tr>" + "".join(tag("th", h) for h in headers) + "</tr></thead>"
    body = []
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes and i < len(row_classes) else None
        body.append((f'<tr class="{html.escape(rc, quote=True)}">' if rc else "<tr>")
                    + "".join(tag("td", c) for c in row) + "</tr>")
    return Html(f'<table class="{html.escape(cls, quote=True)}">{head}<tbody>'
                + "".join(body) + "</tbody></table>")


def prose(value: object) -> Html:
    """Escaped text in which `backticked` parts (commands, file names) are set as code."""
    parts = text(value).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: leave the text as it is
        return text(value)
    return Html("".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts)))


def markdown_inline(value: object) -> Html:
    """One line of the bench's Markdown as HTML: escaped first, then **bold** set as <strong> and
    `code` as <code> (only paired markers; no other Markdown is used in those lines)."""
    escaped = str(text(value))
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return Html(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


def markdown_lines(lines: Iterable[str]) -> Html:
    """Markdown lines (``## title``, ``- item``, paragraphs) as HTML: h3, one ul per run of items, p."""
    parts: list[str] = []
    items: list[Html] = []
    for line in [*lines, ""]:
        if line.startswith("- "):
            items.append(tag("li", markdown_inline(line[2:])))
            continue
        if items:
            parts.append(tag("ul", *items))
            items = []
        if line.startswith("## "):
            parts.append(tag("h3", markdown_inline(line[3:])))
        elif line.strip():
            parts.append(tag("p", markdown_inline(line)))
    return Html("".join(parts))


def note(*children: object, cls: str = "note") -> Html:
    """A paragraph; plain strings in it are ``prose``."""
    return tag("p", *(c if isinstance(c, Html) else prose(c) for c in children), cls=cls)


def code(value: object) -> Html:
    return tag("code", value)


def img_png(data: bytes, *, alt: str, cls: str | None = None, width: int | None = None) -> Html:
    """An ``<img>`` holding ``data`` (PNG bytes) inline as a base64 data URI."""
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    extra = f' class="{html.escape(cls, quote=True)}"' if cls else ""
    extra += f' width="{int(width)}"' if width else ""
    return Html(f'<img src="{uri}" alt="{html.escape(alt, quote=True)}"{extra}>')


def section(anchor: str, title: str, *body: object) -> Html:
    return Html(f'<section id="{html.escape(anchor, quote=True)}">' + tag("h2", title)
                + "".join(text(b) for b in body) + "</section>")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f24;background:#fff}
main{max-width:1150px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.5em;margin:0.4em 0}h2{font-size:1.2em;border-bottom:1px solid #d0d7de;padding-bottom:4px;
margin-top:1.6em}h3{font-size:1em;margin:0.8em 0 0.3em}
nav a{margin-right:12px;color:#0550ae;text-decoration:none}
table{border-collapse:collapse;font-size:0.85em;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
table.kv td{text-align:left}#verify td:nth-child(-n+6){white-space:nowrap}#verify td:nth-child(7),#verify td:nth-child(8),#int8-layers td:nth-child(2),#int8-layers td:nth-child(3){text-align:left}
tr.fail td{background:#ffebe9}tr.stale td{background:#fff8c5}tr.pass td:last-child{color:#1a7f37;font-weight:600}
tr.fail td:last-child{color:#cf222e;font-weight:700}tr.stale td:last-child{color:#9a6700;font-weight:700}
.banner{background:#cf222e;color:#fff;padding:10px 14px;font-weight:700;border-radius:6px}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;border-radius:6px}
.note{color:#57606a;font-size:0.9em}
.cms{display:flex;flex-wrap:wrap;gap:18px}.cm table{font-size:0.72em}.cm td{min-width:1.6em}
.cm td.diag{font-weight:700}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:6px;width:190px;font-size:0.75em}
.card img{image-rendering:pixelated;display:block;margin-bottom:4px;background:#f6f8fa}
.card .path{color:#57606a;word-break:break-all}.right{color:#1a7f37}.wrong{color:#cf222e}
img.figure{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:0.8em;white-space:pre-wrap}
code{font-size:0.9em}
"""


def page(title: str, *body: object) -> str:
    """The whole document: inline CSS, no script, nothing loaded from elsewhere."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # No request may leave the page: images are data URIs, nothing else is loaded.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">"
            + tag("title", title) + f"<style>{CSS}</style></head><body><main>"
            + "".join(text(b) for b in body) + "</main></body></html>\n")
