"""The explorer page (`book/explorer.md`, drawn by `_static/explorer.js`) in Chromium.

The tests change the controls the way a reader does (typing, ticking *same*, pointing,
clicking, arrow keys) and compare what the page shows with references computed here:

* the output size and the filled-in formula against `(H + 2p - d(K-1) - 1) // s + 1`
  and against the shape of `convbook.windows.windows` on an array of the padded size;
* the highlighted cells of an output pixel's window (taps, dilation gaps, taps on
  padding) against the indices that `windows` reads from an array that holds each
  pixel's own index;
* the strides, the shape and the Python snippet against
  `windows(pad2d(np.zeros((N, H, W, C), dtype), p), kernel, stride=, dilation=)`;
* an invalid setting (out of range, not a number, a kernel larger than the padded
  input) shows a message instead of grids, and the page recovers when it is valid again;
* no console error, no request that leaves the local server; readable at 1280, 390 px.

`test_checks_catch_a_wrong_explorer` serves wrong copies of `explorer.js` (the output
size without the dilation, the taps without it, the strides without it, no check that
the kernel fits) and shows that each family of checks fails on them.

The site is `_build/html` (built by `make book` before pytest; `test_site.site` builds
it if it is stale) or, to try the page alone, the folder in `$CONVBOOK_SITE`, e.g. a
build of the page with chapters 2 and 3 (`CONVBOOK_SITE=/tmp/jb_explorer/_build/html`).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest

from convbook.windows import pad2d, windows
from test_site import browser, open_page, server  # noqa: F401 (fixtures)
from test_site import site as built_site  # noqa: F401 (a fixture)

pytestmark = pytest.mark.site
PAGE = "book/explorer.html"


@dataclass(frozen=True)
class Config:
    """One setting of the explorer's controls: (height, width) pairs, N, C, dtype."""

    input: tuple[int, int] = (7, 9)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    batch: int = 2
    channels: int = 3
    dtype: str = "float32"

    @property
    def padded(self) -> tuple[int, int]:
        return tuple(n + 2 * p for n, p in zip(self.input, self.padding))

    def formula(self) -> tuple[int, int]:
        """Output size per axis, by chapter 2's formula (floor division, as PyTorch)."""
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                self.input, self.kernel, self.stride, self.padding, self.dilation
            )
        )

    def view(self, x: np.ndarray) -> np.ndarray:
        return windows(x, self.kernel, stride=self.stride, dilation=self.dilation)


CONFIGS = {  # each exercises something the others do not
    "default": Config(),
    "stride 1, dilation 2, no padding": Config(
        (9, 9), (3, 3), (1, 1), (0, 0), (2, 2), 1, 1, "float64"
    ),
    "non-square everything": Config(
        (6, 11), (2, 4), (1, 3), (2, 0), (3, 1), 4, 5, "float16"
    ),
    "stride 2, padding 2, dilation 2": Config(
        (8, 8), (3, 3), (2, 2), (2, 2), (2, 2), 1, 16, "uint8"
    ),
    "largest grid": Config((32, 32), (9, 9), (8, 8), (8, 8), (1, 1), 1, 1, "int64"),
    "1x1 kernel, stride 3": Config(
        (5, 4), (1, 1), (3, 2), (0, 1), (8, 8), 3, 7, "int32"
    ),
}


# ---------- the site, served by test_site.server, and a page ----------


@pytest.fixture(scope="session")
def site(request) -> Path:
    """The built site that `server` serves here: `$CONVBOOK_SITE` if set, else
    `test_site.site` (`_build/html`, built first if it is stale)."""
    folder = os.environ.get("CONVBOOK_SITE")
    root = Path(folder) if folder else request.getfixturevalue("built_site")
    assert (root / PAGE).exists(), (
        f"{root / PAGE} is missing: build the book (make book)"
    )
    return root


class _Browser:
    """What `test_site.open_page` needs of a browser (`new_page(viewport=)`), with our
    viewport width, a log of every request that leaves the local server, and, if
    `script` is given, that source served in place of explorer.js."""

    def __init__(self, browser, base: str, width: int, script: str | None):
        self.browser, self.base, self.width, self.script = browser, base, width, script
        self.outside: list[str] = []

    def new_page(self, viewport):
        page = self.browser.new_page(viewport={**viewport, "width": self.width})
        if self.script is not None:
            page.route(
                "**/_static/explorer.js*",
                lambda route: route.fulfill(
                    status=200, content_type="text/javascript", body=self.script
                ),
            )
        page.on(
            "request",
            lambda r: (
                self.outside.append(f"request outside the site: {r.url}")
                if not r.url.startswith((self.base, "data:", "blob:"))
                else None
            ),
        )
        return page


def open_explorer(browser, base, width=1280, script=None):
    """The explorer page, and a function that lists its problems so far (console
    errors, page errors, failed requests, requests outside the local server)."""
    shim = _Browser(browser, base, width, script)
    page, problems = open_page(shim, urljoin(base, PAGE), base)
    page.wait_for_selector("#cx-output-grid .cx-out")
    return page, lambda: problems + shim.outside


@pytest.fixture
def explorer(browser, server):
    page, problems = open_explorer(browser, server)
    yield page
    page.close()
    assert not problems(), problems()


# ---------- driving the controls ----------

PAIRS = ("input", "kernel", "stride", "padding", "dilation")


def set_pair(page, key: str, values) -> None:
    """Type a (height, width) pair: equal values via the *same* box, others per axis."""
    h, w = (str(v) for v in values)
    page.set_checked(f"#cx-{key}-shared", h == w)
    page.fill(f"#cx-{key}-h", h)
    if h != w:
        page.fill(f"#cx-{key}-w", w)


def set_config(page, cfg: Config) -> None:
    for key in PAIRS:
        set_pair(page, key, getattr(cfg, key))
    page.fill("#cx-batch", str(cfg.batch))
    page.fill("#cx-channels", str(cfg.channels))
    page.select_option("#cx-dtype", cfg.dtype)


def text(page, selector: str) -> str:
    return page.inner_text(selector).replace("\u2212", "-").replace("\u00a0", " ")


def shown_tuple(page, selector: str) -> tuple[int, ...]:
    return tuple(ast.literal_eval(text(page, selector).replace(" ", "")))


WINDOW_CELLS = """() => {
  const cells = (sel) => Array.from(document.querySelectorAll('#cx-input-grid ' + sel))
    .map(c => [+c.dataset.r, +c.dataset.c]);
  const out = Array.from(document.querySelectorAll('#cx-output-grid .cx-selected'))
    .map(c => [+c.dataset.i, +c.dataset.j, c.getAttribute('aria-selected')]);
  return {tap: cells('.cx-tap'), gap: cells('.cx-gap'), padTap: cells('.cx-tap.cx-pad'),
          pad: cells('.cx-pad'), all: cells('.cx-cell'), selected: out,
          outputs: document.querySelectorAll('#cx-output-grid .cx-out').length};
}"""


def as_set(pairs) -> set[tuple[int, int]]:
    return {tuple(p) for p in pairs}


# ---------- the checks (each family is shown to fail on a wrong explorer below) -------


def check_output_size(page, cfg: Config) -> None:
    """Both formulas filled in with the chosen numbers, and their results."""
    ho, wo = cfg.formula()
    # the formula is the one windows uses
    assert cfg.view(np.zeros((1, *cfg.padded, 1))).shape[1:3] == (ho, wo)
    for axis, out, n, k, s, p, d in zip(
        "hw", (ho, wo), cfg.input, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation
    ):
        line = text(page, f"#cx-out-{axis}")
        filled = f"\u230a({n} + 2\u00b7{p} - {d}\u00b7({k} - 1) - 1) / {s}\u230b + 1"
        assert filled in line, (filled, line)
        assert f"\u230a{n + 2 * p - d * (k - 1) - 1} / {s}\u230b + 1" in line, line
        shown = int(text(page, f"#cx-out-{axis} .cx-result"))
        assert shown == out, (
            f"output size along {axis}: the page says {shown}, the formula {out}"
        )
    cells = page.evaluate(WINDOW_CELLS)
    assert cells["outputs"] == ho * wo
    assert len(cells["all"]) == cfg.padded[0] * cfg.padded[1]


def expected_window(cfg: Config, i: int, j: int) -> dict[str, set]:
    """Cells of output pixel (i, j): the taps that `windows` reads from an array holding
    each padded pixel's own flat index, the gaps in their bounding box, and the taps
    that lie on padding."""
    hp, wp = cfg.padded
    index = np.arange(hp * wp).reshape(1, hp, wp, 1)
    taps = {divmod(int(v), wp) for v in cfg.view(index)[0, i, j, :, :, 0].ravel()}
    rows, cols = [r for r, _ in taps], [c for _, c in taps]
    box = {
        (r, c)
        for r in range(min(rows), max(rows) + 1)
        for c in range(min(cols), max(cols) + 1)
    }
    (ph, pw), (h, w) = cfg.padding, cfg.input
    pad = {
        (r, c)
        for r in range(hp)
        for c in range(wp)
        if not (ph <= r < ph + h and pw <= c < pw + w)
    }
    return {"tap": taps, "gap": box - taps, "padTap": taps & pad, "pad": pad}


def check_window(page, cfg: Config, i: int, j: int) -> None:
    """The input cells highlighted for the selected output pixel (i, j); the readout."""
    cells, want = page.evaluate(WINDOW_CELLS), expected_window(cfg, i, j)
    assert cells["selected"] == [[i, j, "true"]], cells["selected"]
    for kind in ("tap", "gap", "padTap", "pad"):
        got = as_set(cells[kind])
        assert got == want[kind], (
            f"{kind} cells of output ({i}, {j}): {sorted(got ^ want[kind])} differ"
        )
    assert int(text(page, "#cx-on-pad")) == len(want["padTap"])
    view = cfg.view(
        pad2d(np.zeros((cfg.batch, *cfg.input, cfg.channels), cfg.dtype), cfg.padding)
    )
    assert int(text(page, "#cx-start")) == i * view.strides[1] + j * view.strides[2]


def check_windows_by_pointer_and_keys(page, cfg: Config) -> None:
    """Hover a corner, click the opposite one, walk with the keys; check each window."""
    ho, wo = cfg.formula()
    page.hover(f'#cx-output-grid [data-i="0"][data-j="{wo - 1}"]')
    check_window(page, cfg, 0, wo - 1)
    page.click(f'#cx-output-grid [data-i="{ho - 1}"][data-j="0"]')
    check_window(page, cfg, ho - 1, 0)
    page.mouse.move(0, 0)  # the pointer leaves the grid: the keys decide from here
    i, j = ho - 1, 0
    for key, (di, dj) in [
        ("ArrowUp", (-1, 0)),
        ("ArrowRight", (0, 1)),
        ("ArrowRight", (0, 1)),
        ("ArrowDown", (1, 0)),
        ("End", (0, wo)),
        ("Home", (0, -wo)),
    ]:
        page.keyboard.press(key)
        i, j = min(max(i + di, 0), ho - 1), min(max(j + dj, 0), wo - 1)
        check_window(page, cfg, i, j)
        assert (
            page.evaluate(
                "(e => e.dataset.i + ',' + e.dataset.j)(document.activeElement)"
            )
            == f"{i},{j}"
        ), "the focus follows the selected pixel"


def check_strides(page, cfg: Config) -> None:
    """Shape and strides of the windows view (elements, bytes); the Python snippet."""
    x = pad2d(np.zeros((cfg.batch, *cfg.input, cfg.channels), cfg.dtype), cfg.padding)
    view, itemsize = cfg.view(x), np.dtype(cfg.dtype).itemsize
    for what, selector, want in [
        ("padded shape", "#cx-padded-shape", x.shape),
        ("padded byte strides", "#cx-padded-bytes", x.strides),
        (
            "padded element strides",
            "#cx-padded-elements",
            tuple(s // itemsize for s in x.strides),
        ),
        ("view shape", "#cx-view-shape", view.shape),
        ("view byte strides", "#cx-view-bytes", view.strides),
        (
            "view element strides",
            "#cx-view-elements",
            tuple(s // itemsize for s in view.strides),
        ),
    ]:
        shown = shown_tuple(page, selector)
        assert shown == want, f"{what}: the page says {shown}, NumPy {want}"
    snippet = page.inner_text("#cx-code")
    assert (
        eval(snippet, {"np": np, "pad2d": pad2d, "windows": windows}) == view.strides
    ), snippet


def check_invalid(page, cfg: Config, says: str) -> None:
    """A message that says `says`; no grids, no strides."""
    message = page.locator("#cx-message")
    assert message.is_visible(), f"no message for {cfg}"
    assert says in text(page, "#cx-message"), text(page, "#cx-message")
    assert not page.locator("#cx-results").is_visible()
    assert not page.locator("#cx-output-grid").is_visible()


def kernel_too_large(cfg: Config) -> bool:
    return min(cfg.formula()) < 1


# A kernel (with its dilation) larger than the padded input: along one axis or both.
TOO_LARGE = {
    "height": (
        Config((3, 8), (3, 3), (1, 1), (0, 0), (2, 1)),
        "No window fits along the height",
    ),
    "width": (
        Config((6, 4), (1, 3), (1, 1), (0, 1), (1, 4)),
        "No window fits along the width",
    ),
    "both": (
        Config((2, 2), (4, 4), (1, 1), (0, 0), (1, 1)),
        "No window fits along the height",
    ),
}


# ---------- the tests ----------


@pytest.mark.parametrize("name", CONFIGS)
def test_output_size_window_and_strides(explorer, name):
    cfg = CONFIGS[name]
    set_config(explorer, cfg)
    assert not explorer.locator("#cx-message").is_visible()
    check_output_size(explorer, cfg)
    check_windows_by_pointer_and_keys(explorer, cfg)
    check_strides(explorer, cfg)


def test_every_window_of_a_dilated_strided_padded_layer(explorer):
    """Every output pixel of one setting, reached with the keys from the top left."""
    cfg = CONFIGS["stride 2, padding 2, dilation 2"]
    set_config(explorer, cfg)
    ho, wo = cfg.formula()
    explorer.focus('#cx-output-grid [data-i="0"][data-j="0"]')
    for i in range(ho):
        for j in range(wo):
            check_window(explorer, cfg, i, j)
            explorer.keyboard.press("ArrowRight")
        explorer.keyboard.press("Home")
        explorer.keyboard.press("ArrowDown")


@pytest.mark.parametrize("axis", TOO_LARGE)
def test_a_kernel_larger_than_the_padded_input_is_explained(explorer, axis):
    cfg, says = TOO_LARGE[axis]
    assert kernel_too_large(cfg)
    with pytest.raises(ValueError, match="larger than the input"):  # windows agrees
        cfg.view(np.zeros((1, *cfg.padded, 1)))
    set_config(explorer, cfg)
    check_invalid(explorer, cfg, says)
    for a, out in zip("hw", cfg.formula()):  # the formula still shows why: below 1
        assert int(text(explorer, f"#cx-out-{a} .cx-result")) == out
    set_config(explorer, CONFIGS["default"])  # and the page recovers
    check_output_size(explorer, CONFIGS["default"])
    check_strides(explorer, CONFIGS["default"])


@pytest.mark.parametrize(
    "field, value, says",
    [
        (
            "#cx-stride-h",
            "0",
            "Stride must be a whole number from 1 to 8; got \u201c0\u201d",
        ),
        (
            "#cx-input-w",
            "33",
            "Input size (width, W) must be a whole number from 1 to 32",
        ),
        ("#cx-padding-h", "-1", "Padding must be a whole number from 0 to 8"),
        (
            "#cx-dilation-h",
            "1.5",
            "Dilation must be a whole number from 1 to 8; got \u201c1.5\u201d",
        ),
        ("#cx-kernel-h", "", "Kernel must be a whole number from 1 to 9; got nothing"),
        ("#cx-channels", "0", "Channels C must be a whole number from 1 to 4096"),
    ],
)
def test_values_out_of_range_are_explained(explorer, field, value, says):
    explorer.fill(field, value)
    check_invalid(explorer, CONFIGS["default"], says)
    assert not explorer.locator("#cx-formulas").is_visible()
    set_config(explorer, CONFIGS["default"])
    assert not explorer.locator("#cx-message").is_visible()
    check_output_size(explorer, CONFIGS["default"])


def test_the_exercises_answers(explorer):
    """The numbers that the exercises' solutions state, read off the explorer."""
    half = Config((8, 8), (3, 3), (2, 2), (1, 1))
    for p, out in [(0, 3), (1, 4), (2, 5)]:  # exercise 1
        set_config(explorer, replace(half, padding=(p, p)))
        assert (
            int(text(explorer, "#cx-out-h .cx-result"))
            == out
            == replace(half, padding=(p, p)).formula()[0]
        )
    cfg = replace(half, padding=(0, 0))  # exercise 2: column 7 is read by no window
    set_config(explorer, cfg)
    read = set()
    for j in range(3):
        explorer.hover(f'#cx-output-grid [data-i="0"][data-j="{j}"]')
        read |= {c for _, c in as_set(explorer.evaluate(WINDOW_CELLS)["tap"])}
    assert read == set(range(7))
    strides = {}  # exercise 3: same output; the 4th and 5th strides differ, by 2
    for k, d in [(3, 2), (5, 1)]:
        set_config(explorer, Config((11, 11), (k, k), (1, 1), (0, 0), (d, d)))
        strides[k] = shown_tuple(explorer, "#cx-view-elements")
        assert shown_tuple(explorer, "#cx-view-shape")[1:3] == (7, 7)
    assert [a // b for a, b in zip(strides[3], strides[5])] == [1, 1, 1, 2, 2, 1]
    set_config(explorer, Config((6, 6), (3, 3), (2, 2), (0, 0), (2, 2)))  # exercise 4
    view = shown_tuple(explorer, "#cx-view-elements")
    assert view[1] == view[3] and view[2] == view[4]


def test_cells_of_each_kind_look_different(explorer):
    """Input pixel, padding, tap, tap on padding and dilation gap look different."""
    set_config(explorer, CONFIGS["stride 2, padding 2, dilation 2"])
    # output (0, 0) has taps on padding and on x, and gaps
    explorer.hover('#cx-output-grid [data-i="0"][data-j="0"]')
    styles = explorer.evaluate("""() => {
      const look = (c) => { const s = getComputedStyle(c);
        return [s.backgroundColor, s.backgroundImage, s.borderTopStyle,
                s.borderTopWidth].join(' '); };
      const kinds = {plain: '.cx-cell:not(.cx-pad):not(.cx-span)',
                     pad: '.cx-pad:not(.cx-span)', tap: '.cx-tap:not(.cx-pad)',
                     padTap: '.cx-tap.cx-pad', gap: '.cx-gap'};
      return Object.fromEntries(Object.entries(kinds).map(([k, sel]) => {
        const c = document.querySelector('#cx-input-grid ' + sel);
        return [k, c && look(c)]; }));
    }""")
    assert None not in styles.values(), styles
    assert len(set(styles.values())) == len(styles), styles


@pytest.mark.parametrize("width", [1280, 390])
def test_readable_at_1280_and_on_a_narrow_screen(browser, server, site, width):
    page, problems = open_explorer(browser, server, width)
    try:
        set_config(page, CONFIGS["largest grid"])
        facts = page.evaluate("""() => {
          const box = (s) => document.querySelector(s).getBoundingClientRect();
          const e = document.getElementById('conv-explorer');
          return {page: document.documentElement.scrollWidth, view: innerWidth,
                  explorer: e.scrollWidth - e.clientWidth,
                  cell: box('#cx-output-grid .cx-out').width,
                  input: box('#cx-input-slot').width,
                  inputGrid: box('#cx-input-grid').width,
                  controls: box('#cx-stride-h').width};
        }""")
        assert facts["page"] <= facts["view"], f"the page scrolls sideways: {facts}"
        assert facts["explorer"] <= 0, f"the explorer overflows its box: {facts}"
        assert facts["cell"] >= 8 and facts["controls"] >= 30, facts
        if width == 1280:  # the 48-column padded input fits without scrolling
            assert facts["inputGrid"] <= facts["input"], facts
        shots = site.parent / "screenshots"  # _build/screenshots
        shots.mkdir(exist_ok=True)
        page.screenshot(path=str(shots / f"explorer-{width}.png"), full_page=True)
    finally:
        page.close()
    assert not problems(), problems()


# ---------- the checks can fail ----------

DILATED = CONFIGS["stride 2, padding 2, dilation 2"]

# What a wrong explorer forgets: (source it changes, the change, the check, its failure)
WRONG = {
    "dilation in the output size": (
        "return Math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1;",
        "return Math.floor((n + 2 * p - (k - 1) - 1) / s) + 1;",
        "size",
        "output size along h: the page says 5, the formula 4",
    ),
    "dilation in the taps": (
        "taps.push(i * s + a * d);",
        "taps.push(i * s + a);",
        "window",
        "tap cells of output",
    ),
    "dilation in the strides": (
        "sH * dh, sW * dw, sC]",
        "sH, sW, sC]",
        "strides",
        "view byte strides: the page says",
    ),
    "the kernel-fits check": (
        "if (cfg.out[a] >= 1) return;",
        "return;",
        "invalid",
        "no message",
    ),
}


@pytest.mark.parametrize("wrong", WRONG)
def test_checks_catch_a_wrong_explorer(browser, server, site, wrong):
    original, changed, family, says = WRONG[wrong]
    source = (site / "_static" / "explorer.js").read_text(encoding="utf-8")
    assert source.count(original) == 1, f"explorer.js no longer contains {original!r}"
    page, _ = open_explorer(browser, server, script=source.replace(original, changed))
    cfg, message = TOO_LARGE["both"] if family == "invalid" else (DILATED, None)
    check = {
        "size": check_output_size,
        "window": check_windows_by_pointer_and_keys,
        "strides": check_strides,
        "invalid": lambda page, cfg: check_invalid(page, cfg, message),
    }[family]
    try:
        set_config(page, cfg)
        with pytest.raises(AssertionError, match=says):
            check(page, cfg)
    finally:
        page.close()
