"""The static HTML gallery page of search results."""
from __future__ import annotations

import html
import os
import urllib.parse
from pathlib import Path
from typing import Optional, Sequence

from ernievil2.atomic import atomic_write
from ernievil2.search.index import SearchHit

__all__ = ["write_html"]


def _src(path: str, page_dir: Path, relative: bool) -> str:
    p = Path(path).absolute()
    if relative:
        return urllib.parse.quote(Path(os.path.relpath(p, page_dir)).as_posix())
    return p.as_uri()


def write_html(hits: Sequence[SearchHit], out_path: str | os.PathLike, *, query: Optional[str] = None,
               query_image: Optional[str | os.PathLike] = None, title: str = "ernievil2 search",
               relative: bool = True) -> Path:
    """A static gallery page of ``hits`` (thumbnail, rank, score, path), written atomically.
    Image ``src`` are relative to the page (``relative=False``: ``file://`` URIs); every path and
    the query are HTML-escaped."""
    out = Path(out_path).expanduser().absolute()
    page_dir = out.parent
    e = html.escape
    head = []
    if query:
        head.append(f'<p class="query">query: <q>{e(query)}</q></p>')
    if query_image:
        head.append(f'<p class="query">query image: <img class="thumb" src="{e(_src(str(query_image), page_dir, relative))}" '
                    f'alt="{e(str(query_image))}"> <code>{e(str(query_image))}</code></p>')
    cards = []
    for rank, hit in enumerate(hits, start=1):
        cards.append(
            f'<figure><a href="{e(_src(hit.path, page_dir, relative))}">'
            f'<img class="thumb" loading="lazy" src="{e(_src(hit.path, page_dir, relative))}" alt="{e(hit.path)}"></a>'
            f'<figcaption><b>{rank}.</b> <span class="score">{hit.score:.4f}</span><br>'
            f'<code>{e(hit.path)}</code></figcaption></figure>'
        )
    page = "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;vertical-align:top;width:220px;"
        "margin:6px}img.thumb{max-width:200px;max-height:200px}code{word-break:break-all;font-size:small}</style>",
        "</head><body>", f"<h1>{e(title)}</h1>", *head, f"<p>{len(hits)} results</p>", '<div class="results">',
        *cards, "</div>", "</body></html>", "",
    ])
    with atomic_write(out) as f:
        f.write(page)
    return out
