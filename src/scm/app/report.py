"""The one report writer of scm's application: a document of headings, paragraphs, lists, tables and images,
written as Markdown and, when asked, as a self-contained HTML page (`scm demo`, `scm eval`, the benchmarks).

Images are referenced by relative path; sample grids are PNGs enlarged by whole-pixel repetition when they are
made (scm.images.grid), and shown with `image-rendering: pixelated` in HTML, so small digits stay sharp."""

from __future__ import annotations

import html
import re
from pathlib import Path

from scm.files import atomic_write

__all__ = ["Report", "inline_image"]


def inline_image(src: str, width: int = 192) -> str:
    """A linked thumbnail for a table cell (Markdown renderers keep inline HTML; click for full size)."""
    return f'<a href="{src}"><img src="{src}" width="{width}" style="image-rendering:pixelated"></a>'


class Report:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> Report:
        self.blocks.append(("heading", level, text))
        return self

    def text(self, *paragraphs: str) -> Report:
        self.blocks.extend(("text", p) for p in paragraphs if p)
        return self

    def bullets(self, items: list[str]) -> Report:
        if items:
            self.blocks.append(("bullets", list(items)))
        return self

    def table(self, header: list[str], rows: list[list]) -> Report:
        self.blocks.append(("table", [str(h) for h in header], [[str(c) for c in r] for r in rows]))
        return self

    def image(self, src: str, alt: str = "", width: int | None = None) -> Report:
        self.blocks.append(("image", src, alt, width))
        return self

    def markdown_text(self, text: str) -> Report:
        """Hand-written Markdown, kept as it is (in HTML: as preformatted text)."""
        self.blocks.append(("markdown", text))
        return self

    # -- output --------------------------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *b in self.blocks:
            if kind == "heading":
                out += ["#" * b[0] + " " + b[1], ""]
            elif kind == "text":
                out += [b[0], ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in b[0]] + [""]
            elif kind == "table":
                header, rows = b
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            elif kind == "image":
                src, alt, width = b
                out += [f'<img src="{src}" alt="{alt}" width="{width}">' if width else f"![{alt}]({src})", ""]
            else:
                out += [b[0].rstrip(), ""]
        return "\n".join(out)

    def to_html(self) -> str:
        def inline(s: str) -> str:  # **bold** and `code`; inline HTML (thumbnails) passes through
            if s.lstrip().startswith("<"):
                return s
            s = html.escape(s)
            s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, *b in self.blocks:
            if kind == "heading":
                body.append(f"<h{b[0]}>{inline(b[1])}</h{b[0]}>")
            elif kind == "text":
                body.append(f"<p>{inline(b[0])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b[0]) + "</ul>")
            elif kind == "table":
                header, rows = b
                head = "".join(f"<th>{inline(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><tr>{head}</tr>{cells}</table>")
            elif kind == "image":
                src, alt, width = b
                w = f' width="{width}"' if width else ""
                body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"{w} class="px"></p>')
            else:
                body.append(f"<pre>{html.escape(b[0])}</pre>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #bbb;padding:4px 8px}img.px{image-rendering:pixelated;max-width:100%}")
        return (f"<!doctype html><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style><body>\n" + "\n".join(body) + "\n</body>\n")

    def write(self, markdown_path: Path, html_path: Path | None = None) -> None:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(markdown_path), self.to_markdown())
        if html_path is not None:
            atomic_write(Path(html_path), self.to_html())
