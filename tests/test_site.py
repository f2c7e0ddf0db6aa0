"""The rendered website, read the way a reader reads it: every page of `_toc.yml` opened in headless
Chromium (Debian's `chromium`, driven by playwright) from a server on 127.0.0.1.

Per page: no console errors, no failed or 4xx/5xx request to the local server, every `<img>` loaded,
MathJax (served from `_static`, no CDN) has typeset every formula, no nbdev directive or Python
traceback visible, launch (Binder, Colab), download and repository buttons present, exercise
solutions folded until opened. Also: the search page finds chapter words, and every internal link
and anchor of the site resolves. A screenshot of every page is saved under `_build/screenshots/`.

The site is built first (`jupyter-book build . -W -n --keep-going`, executing every chapter) unless
a successful build (`make book`, which `make test` runs first) left its stamp after the last change
to a source.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import yaml

pytestmark = pytest.mark.site
ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def toc_pages() -> list[str]:
    """Pages of `_toc.yml` in reading order, as paths without suffix (`book/index`, ...)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            pages.append(e["file"])
            walk(e.get("sections"))

    for part in toc.get("parts", [toc]):
        walk(part.get("chapters"))
    return pages


PAGES = toc_pages()


def _sources() -> list[Path]:
    files = [
        ROOT / "_config.yml",
        ROOT / "_toc.yml",
        *(ROOT / "_ext").glob("*.py"),
        *(ROOT / "_static").glob("*"),
    ]
    return files + [source_of(p) for p in PAGES]


def source_of(page: str) -> Path:
    """The page's source: a notebook, or a Markdown page (the API reference, the explorer)."""
    notebook = ROOT / f"{page}.ipynb"
    return notebook if notebook.exists() else ROOT / f"{page}.md"


STAMP = (
    HTML / ".convbook-built"
)  # touched by `make book` and below after a successful build


def _site_is_fresh() -> bool:
    if not STAMP.exists() or not all((HTML / f"{p}.html").exists() for p in PAGES):
        return False
    return all(src.stat().st_mtime <= STAMP.stat().st_mtime for src in _sources())


@pytest.fixture(scope="session")
def site() -> Path:
    if not _site_is_fresh():
        jb = Path(sys.executable).with_name("jupyter-book")
        subprocess.run(
            [str(jb), "build", ".", "-W", "-n", "--keep-going"], cwd=ROOT, check=True
        )
        STAMP.touch()
    assert _site_is_fresh(), "the book build did not produce every page of _toc.yml"
    return HTML


@pytest.fixture(scope="session")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def browser():
    chromium = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    )
    if not Path(chromium).exists():
        pytest.fail(
            "Debian's Chromium is needed for the site tests: apt-get install -y chromium "
            "(`make test` installs it)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium, args=CHROMIUM_FLAGS, headless=True
        )
        yield b
        b.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


def open_page(browser, url: str, base: str):
    """Open `url`; return the page and the list of problems seen while loading it."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "requestfailed",
        lambda r: (
            problems.append(f"request failed: {r.url} ({r.failure})")
            if r.url.startswith(base)
            else None
        ),
    )
    page.on(
        "response",
        lambda r: (
            problems.append(f"HTTP {r.status}: {r.url}")
            if r.url.startswith(base) and r.status >= 400
            else None
        ),
    )
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, problems


MATHJAX_DONE = """async () => {
  const math = document.querySelectorAll('.math').length;
  if (!window.MathJax || !MathJax.startup) return math ? 'no MathJax' : 'no math';
  await MathJax.startup.promise;
  return 'ok';
}"""

PAGE_FACTS = """() => {
  const math = Array.from(document.querySelectorAll('.math'));
  return {
    math: math.length,
    typeset: math.filter(m => m.querySelector('mjx-container')).length,
    broken_images: Array.from(document.images)
      .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    images: document.images.length,
    text: document.querySelector('main').innerText,
    binder: !!document.querySelector('a[href^="https://mybinder.org/v2/gh/convbook/convbook/"]'),
    colab: !!document.querySelector('a[href^="https://colab.research.google.com/github/convbook/convbook/"]'),
    download: !!document.querySelector('a.btn-download-source-button[href$=".ipynb"]'),
    download_md: !!document.querySelector('a.btn-download-source-button[href$=".md"]'),
    repository: !!document.querySelector('a[href="https://github.com/convbook/convbook"]'),
    solutions: document.querySelectorAll('div.solution').length,
  };
}"""

DIRECTIVE = re.compile(r"^\s*#\|\s*[\w-]+", re.M)


FACTS: dict[str, dict] = {}  # per page, filled by test_page_renders_cleanly


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_cleanly(name, browser, server, screenshots):
    page, problems = open_page(browser, urljoin(server, f"{name}.html"), server)
    try:
        assert page.evaluate(MATHJAX_DONE) in ("ok", "no math")
        facts = FACTS[name] = page.evaluate(PAGE_FACTS)
        page.screenshot(
            path=str(screenshots / f"{name.replace('/', '_')}.png"), full_page=True
        )
        assert not problems, problems
        assert facts["typeset"] == facts["math"], (
            f"{facts['math'] - facts['typeset']} formulas not typeset"
        )
        assert not facts["broken_images"], facts["broken_images"]
        assert not DIRECTIVE.search(facts["text"]), DIRECTIVE.search(
            facts["text"]
        ).group()
        assert "Traceback (most recent call last)" not in facts["text"]
        notebook = source_of(name).suffix == ".ipynb"
        buttons = (
            ("binder", "colab", "download", "repository")
            if notebook
            else ("download_md", "repository")
        )  # a Markdown page has no kernel to launch
        for button in buttons:
            assert facts[button], f"no {button} button"
        if (
            notebook and name != PAGES[0]
        ):  # every chapter ends with exercises, folded solutions
            assert "Exercises" in facts["text"] and facts["solutions"] > 0
            solution = page.locator("div.solution").first
            body = solution.locator("section").first
            assert not body.is_visible(), (
                "solutions must be folded until the reader opens them"
            )
            solution.locator(".toggle-button, button").first.click()
            body.wait_for(state="visible", timeout=5000)
    finally:
        page.close()


def test_pages_with_math_and_figures_exist(browser, server):
    """The per-page checks above are vacuous on a page without math or images: make sure the
    book as a whole has both, so a MathJax or figure regression cannot hide."""
    for name in set(PAGES) - set(FACTS):  # when run on its own
        page, _ = open_page(browser, urljoin(server, f"{name}.html"), server)
        page.evaluate(MATHJAX_DONE)
        FACTS[name] = page.evaluate(PAGE_FACTS)
        page.close()
    totals = {k: sum(FACTS[name][k] for name in PAGES) for k in ("math", "images")}
    assert totals["math"] > 50 and totals["images"] > 30, totals


@pytest.mark.parametrize(
    "word, page",
    [
        ("im2col", "book/04_im2col"),
        ("col2im", "book/05_backward"),
        ("EMNIST", "book/07_emnist"),
    ],
)
def test_search_finds_chapter_words(word, page, browser, server):
    p, problems = open_page(browser, urljoin(server, f"search.html?q={word}"), server)
    try:
        p.wait_for_selector("#search-results ul.search li a", timeout=15000)
        hrefs = p.eval_on_selector_all(
            "#search-results ul.search li a", "els => els.map(e => e.href)"
        )
        assert any(urlsplit(h).path.endswith(f"{page}.html") for h in hrefs), hrefs
        assert not problems, problems
    finally:
        p.close()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) and not (
                tag == "link" and a.get("rel") in ("preconnect", "dns-prefetch")
            ):
                self.links.append(a[key])


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def broken_links(site: Path, pages: list[str]) -> list[str]:
    """Relative hrefs/srcs of `pages` that point to no file of `site`, or to an `#anchor` that is no
    id of the target page. External links are not followed (no network here)."""
    broken = []
    for name in pages:
        page = site / f"{name}.html"
        for link in _parse(page).links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue
            target = (
                (page.parent / unquote(parts.path)).resolve() if parts.path else page
            )
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{name}: {link}")
            elif (
                parts.fragment
                and target.suffix == ".html"
                and unquote(parts.fragment) not in _parse(target).ids
            ):
                broken.append(f"{name}: {link} (no such anchor)")
    return broken


def test_internal_links_and_anchors_resolve(site):
    assert not broken_links(site, PAGES)


def test_link_check_catches_broken_links(tmp_path):
    (tmp_path / "a.html").write_text(
        '<h1 id="top">A</h1><a href="b.html#sec">ok</a><a href="#top">ok</a>'
        '<img src="missing.png"><a href="b.html#nope">bad</a><a href="c.html">bad</a>'
        '<a href="https://example.org/x">external</a>'
    )
    (tmp_path / "b.html").write_text(
        '<section id="sec"><a href="a.html">back</a></section>'
    )
    assert broken_links(tmp_path, ["a", "b"]) == [
        "a: missing.png",
        "a: b.html#nope (no such anchor)",
        "a: c.html",
    ]


def test_api_reference_documents_every_public_name(site):
    """Every name of convbook.__all__ has an entry (an HTML anchor named after it) on the API page
    of the module that defines it, and every module of the package has a page."""
    import importlib
    import pkgutil
    import types

    import convbook

    modules = {
        m.name
        for m in pkgutil.iter_modules(convbook.__path__)
        if not m.name.startswith("_")
    }
    for module in modules:
        assert (site / "book" / "api" / f"{module}.html").exists(), (
            f"no API page for convbook.{module}"
        )
    missing = []
    for name in convbook.__all__:
        obj = getattr(convbook, name)
        if isinstance(obj, types.ModuleType):
            module, anchor = obj.__name__.split(".")[1], f"module-{obj.__name__}"
        else:
            module = importlib.import_module(obj.__module__).__name__.split(".")[1]
            anchor = f"convbook.{module}.{name}"
        html = (site / "book" / "api" / f"{module}.html").read_text()
        if f'id="{anchor}"' not in html:
            missing.append(anchor)
    assert not missing, f"not on the API pages: {missing}"
