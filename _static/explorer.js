/* The convolution explorer of book/explorer.md.
 *
 * Everything runs in the reader's browser: no kernel, no library, no network. From the sizes the
 * reader chooses it computes, per axis, the output size of a convolution,
 *     H_out = floor((H + 2p - d(K - 1) - 1) / s) + 1            (chapter 2, `out_size`),
 * draws the padded input and the output as grids, shows the window (taps, dilation gaps, taps on
 * padding) of the output pixel under the pointer or the keyboard focus, and gives the shape and the
 * strides of chapter 2's `windows(pad2d(x, p), kernel, stride=, dilation=)` view of an NHWC batch:
 *     shape (N, H_out, W_out, KH, KW, C), strides (σN, σH·sh, σW·sw, σH·dh, σW·dw, σC).
 */
(function () {
  "use strict";

  // The controls given per axis: id, label, the symbols of its two values, range, default.
  const PAIRS = [
    { key: "input", label: "Input size", names: ["H", "W"], min: 1, max: 32, value: [7, 9] },
    { key: "kernel", label: "Kernel", names: ["KH", "KW"], min: 1, max: 9, value: [3, 3] },
    { key: "stride", label: "Stride", names: ["sh", "sw"], min: 1, max: 8, value: [2, 2] },
    { key: "padding", label: "Padding", names: ["ph", "pw"], min: 0, max: 8, value: [1, 1] },
    { key: "dilation", label: "Dilation", names: ["dh", "dw"], min: 1, max: 8, value: [1, 1] },
  ];
  const SINGLES = [
    { key: "batch", label: "Batch N", min: 1, max: 1024, value: 2 },
    { key: "channels", label: "Channels C", min: 1, max: 4096, value: 3 },
  ];
  const DTYPES = { float64: 8, float32: 4, float16: 2, int64: 8, int32: 4, int16: 2, uint8: 1 };
  const AXES = ["height", "width"];
  const MINUS = "\u2212";

  /* ---------- the arithmetic (one axis at a time) ---------- */

  function outSize(n, k, s, p, d) {
    return Math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1;
  }

  function kernelSpan(k, d) {
    return d * (k - 1) + 1;
  }

  /** Padded coordinates read by output index i along one axis: i*s + a*d for a < k. */
  function tapsOf(i, k, s, d) {
    const taps = [];
    for (let a = 0; a < k; a++) taps.push(i * s + a * d);
    return taps;
  }

  /** Element strides of the contiguous (N, Hp, Wp, C) array that pad2d returns, and of the view. */
  function viewStrides(cfg) {
    const [hp, wp] = cfg.padded;
    const sigma = [hp * wp * cfg.channels, wp * cfg.channels, cfg.channels, 1];
    const [sN, sH, sW, sC] = sigma;
    const [sh, sw] = cfg.stride;
    const [dh, dw] = cfg.dilation;
    return { sigma, view: [sN, sH * sh, sW * sw, sH * dh, sW * dw, sC] };
  }

  /* ---------- small DOM helpers ---------- */

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  const sub = (base, s) => `${base}<sub>${s}</sub>`;
  const sigma = (axis) => `σ<sub>${axis}</sub>`;  // a stride of the padded array, in chapter 2's notation
  const tuple = (xs) => `(${xs.join(", ")})`;
  const num = (v) => String(v).replace("-", MINUS);

  /* ---------- controls ---------- */

  function numberInput(id, min, max, value, label) {
    return el("input", { type: "number", id, min, max, step: 1, value, inputmode: "numeric",
                         "aria-label": label });
  }

  function pairRow(p) {
    const cells = [el("span", { class: "cx-param", id: `cx-${p.key}-label`, text: p.label })];
    AXES.forEach((axis, a) => {
      const input = numberInput(`cx-${p.key}-${axis[0]}`, p.min, p.max, p.value[a],
                                `${p.label}, ${axis} (${p.names[a]})`);
      cells.push(el("label", { class: "cx-axis" },
                    [el("span", { class: "cx-axis-name", text: `${p.names[a]} ` }), input]));
    });
    const box = el("input", { type: "checkbox", id: `cx-${p.key}-shared`,
                              "aria-label": `${p.label}: the same for height and width` });
    box.checked = p.value[0] === p.value[1];
    cells.push(el("label", { class: "cx-shared" }, [box, el("span", { text: " same" })]));
    return cells;
  }

  function buildControls() {
    const pairs = el("div", { class: "cx-pairs", role: "group", "aria-label": "Sizes per axis" });
    pairs.append(el("span"), el("span", { class: "cx-head", text: "height" }),
                 el("span", { class: "cx-head", text: "width" }),
                 el("span", { class: "cx-head", text: "both axes" }));
    PAIRS.forEach((p) => pairs.append(...pairRow(p)));
    const singles = el("div", { class: "cx-singles" });
    for (const s of SINGLES) {
      const input = numberInput(`cx-${s.key}`, s.min, s.max, s.value, s.label);
      singles.append(el("label", {}, [el("span", { text: `${s.label} ` }), input]));
    }
    const select = el("select", { id: "cx-dtype", "aria-label": "dtype" });
    for (const [name, size] of Object.entries(DTYPES)) {
      select.append(el("option", { value: name, text: `${name} (${size} B)` }));
    }
    select.value = "float32";
    singles.append(el("label", {}, [el("span", { text: "dtype " }), select]));
    return el("form", { class: "cx-controls", novalidate: "" }, [pairs, singles]);
  }

  /** Mirror height into width (and disable width) for every pair whose "same" box is ticked. */
  function syncShared(root) {
    for (const p of PAIRS) {
      const shared = root.querySelector(`#cx-${p.key}-shared`).checked;
      const h = root.querySelector(`#cx-${p.key}-h`);
      const w = root.querySelector(`#cx-${p.key}-w`);
      w.disabled = shared;
      if (shared) w.value = h.value;
    }
  }

  /* ---------- reading and validating the controls ---------- */

  function readInt(input, spec, what, errors) {
    const text = input.value.trim();
    const value = Number(text);
    if (!/^-?\d+$/.test(text) || value < spec.min || value > spec.max) {
      const got = text === "" ? "nothing (or not a number)" : `\u201c${text}\u201d`;
      errors.push(`${what} must be a whole number from ${spec.min} to ${spec.max}; got ${got}.`);
      return null;
    }
    return value;
  }

  function readConfig(root) {
    const cfg = {}, errors = [];
    for (const p of PAIRS) {
      const shared = root.querySelector(`#cx-${p.key}-shared`).checked;
      const what = (a) => (shared ? p.label : `${p.label} (${AXES[a]}, ${p.names[a]})`);
      const read = (a) => readInt(root.querySelector(`#cx-${p.key}-${AXES[a][0]}`), p, what(a), errors);
      const h = read(0);
      cfg[p.key] = [h, shared ? h : read(1)];
    }
    for (const s of SINGLES) {
      cfg[s.key] = readInt(root.querySelector(`#cx-${s.key}`), s, s.label, errors);
    }
    cfg.dtype = root.querySelector("#cx-dtype").value;
    if (errors.length) return { cfg: null, errors };
    cfg.padded = [0, 1].map((a) => cfg.input[a] + 2 * cfg.padding[a]);
    cfg.out = [0, 1].map((a) => outSize(cfg.input[a], cfg.kernel[a], cfg.stride[a],
                                        cfg.padding[a], cfg.dilation[a]));
    return { cfg, errors: fitErrors(cfg) };
  }

  function fitErrors(cfg) {
    const errors = [];
    [0, 1].forEach((a) => {
      if (cfg.out[a] >= 1) return;
      const span = kernelSpan(cfg.kernel[a], cfg.dilation[a]);
      const unit = a === 0 ? "rows" : "columns";
      errors.push(`No window fits along the ${AXES[a]}: the kernel with its dilation spans ` +
        `d(K ${MINUS} 1) + 1 = ${cfg.dilation[a]}\u00b7(${cfg.kernel[a]} ${MINUS} 1) + 1 = ${span} ` +
        `${unit}, but the padded input has ${cfg.input[a]} + 2\u00b7${cfg.padding[a]} = ` +
        `${cfg.padded[a]} ${unit}. Choose a smaller kernel or dilation, or more padding.`);
    });
    return errors;
  }

  /* ---------- the output-size formulas ---------- */

  function formulaHTML(cfg, a) {
    const [X, n] = a === 0 ? ["H", "h"] : ["W", "w"];
    const [size, k, s, p, d] = [cfg.input, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation]
      .map((v) => v[a]);
    const numer = size + 2 * p - d * (k - 1) - 1;
    const steps = [
      `${sub(X, "out")} = ⌊(${X} + 2${sub("p", n)} ${MINUS} ${sub("d", n)}(${sub("K", X)} ` +
        `${MINUS} 1) ${MINUS} 1) / ${sub("s", n)}⌋ + 1`,
      `= ⌊(${size} + 2·${p} ${MINUS} ${d}·(${k} ${MINUS} 1) ${MINUS} 1) / ${s}⌋ + 1`,
      `= ⌊${num(numer)} / ${s}⌋ + 1`,
      `= <strong class="cx-result">${num(cfg.out[a])}</strong>`,
    ];
    return steps.map((t) => `<span class="cx-step">${t}</span>`).join(" ");
  }

  /* ---------- the grids ---------- */

  /** Cells as large as fit the width: `columns` cells, the 1 px gaps between them, a 3 px margin. */
  function cellSize(root, columns) {
    const width = root.clientWidth || 600;
    return Math.max(8, Math.min(28, Math.floor((width - 8 - (columns - 1)) / columns)));
  }

  function buildInputGrid(cfg, size) {
    const [hp, wp] = cfg.padded;
    const [ph, pw] = cfg.padding;
    const grid = el("div", { class: "cx-grid cx-input-grid", id: "cx-input-grid", role: "img",
      "aria-label": `padded input: ${hp} rows by ${wp} columns, of which the outer ${ph} rows and ` +
                    `${pw} columns on each side are padding` });
    grid.style.gridTemplateColumns = `repeat(${wp}, ${size}px)`;
    const cells = [];
    for (let r = 0; r < hp; r++) {
      cells.push([]);
      for (let c = 0; c < wp; c++) {
        const pad = r < ph || r >= hp - ph || c < pw || c >= wp - pw;
        const title = pad ? `padding (${r}, ${c}): reads 0` : `padded (${r}, ${c}) = x[${r - ph}, ${c - pw}]`;
        const cls = pad ? "cx-cell cx-pad" : "cx-cell";
        const cell = el("div", { class: cls, "data-r": r, "data-c": c, title });
        cells[r].push(cell);
        grid.append(cell);
      }
    }
    return { grid, cells };
  }

  function buildOutputGrid(cfg, size) {
    const [ho, wo] = cfg.out;
    const grid = el("div", { class: "cx-grid cx-output-grid", id: "cx-output-grid", role: "grid",
      "aria-label": `output: ${ho} rows by ${wo} columns; arrow keys choose a pixel` });
    grid.style.gridTemplateColumns = `repeat(${wo}, ${size}px)`;
    for (let i = 0; i < ho; i++) {
      const row = el("div", { role: "row", class: "cx-row" });
      for (let j = 0; j < wo; j++) {
        row.append(el("div", { class: "cx-cell cx-out", role: "gridcell", tabindex: -1,
                               "data-i": i, "data-j": j, "aria-label": `output pixel (${i}, ${j})` }));
      }
      grid.append(row);
    }
    return grid;
  }

  /** Mark the taps, the dilation gaps and the output pixel of window (i, j). */
  function highlight(state, i, j) {
    const { cfg, cells, output } = state;
    for (const cell of state.marked) cell.classList.remove("cx-tap", "cx-gap", "cx-span");
    state.marked = [];
    const rows = tapsOf(i, cfg.kernel[0], cfg.stride[0], cfg.dilation[0]);
    const cols = tapsOf(j, cfg.kernel[1], cfg.stride[1], cfg.dilation[1]);
    for (let r = rows[0]; r <= rows[rows.length - 1]; r++) {
      for (let c = cols[0]; c <= cols[cols.length - 1]; c++) {
        const cell = cells[r][c];
        cell.classList.add("cx-span", rows.includes(r) && cols.includes(c) ? "cx-tap" : "cx-gap");
        state.marked.push(cell);
      }
    }
    for (const cell of output.querySelectorAll(".cx-out")) {
      const on = +cell.dataset.i === i && +cell.dataset.j === j;
      cell.classList.toggle("cx-selected", on);
      cell.setAttribute("aria-selected", on);
      cell.tabIndex = on ? 0 : -1;
    }
    state.selected = [i, j];
    describe(state, rows, cols);
  }

  function describe(state, rows, cols) {
    const { cfg } = state;
    const [i, j] = state.selected;
    const [ph, pw] = cfg.padding;
    const padRows = rows.filter((r) => r < ph || r >= cfg.padded[0] - ph).length;
    const padCols = cols.filter((c) => c < pw || c >= cfg.padded[1] - pw).length;
    const onPad = rows.length * cols.length - (rows.length - padRows) * (cols.length - padCols);
    const { view } = viewStrides(cfg);
    const bytes = DTYPES[cfg.dtype];
    const start = (i * view[1] + j * view[2]) * bytes;
    state.root.querySelector("#cx-window").innerHTML =
      `Output pixel <strong id="cx-selected">(${i}, ${j})</strong> reads the ` +
      `${rows.length}\u00d7${cols.length} taps at rows ${rows.join(", ")} and columns ${cols.join(", ")} ` +
      `of the padded input; <span id="cx-on-pad">${onPad}</span> of them lie on padding and read 0. ` +
      `In the view, its window starts i·${sigma("H")}·${sub("s", "h")} + j·${sigma("W")}·` +
      `${sub("s", "w")} = ${i}·${view[1] * bytes} + ${j}·${view[2] * bytes} = ` +
      `<span id="cx-start">${start}</span> bytes after the first element of its (padded) image.`;
  }

  function wireOutput(state) {
    const pick = (cell, focus) => {
      if (!cell) return;
      highlight(state, +cell.dataset.i, +cell.dataset.j);
      if (focus) cell.focus();
    };
    const target = (e) => e.target.closest(".cx-out");
    state.output.addEventListener("mouseover", (e) => pick(target(e), false));
    state.output.addEventListener("click", (e) => pick(target(e), true));
    state.output.addEventListener("focusin", (e) => {
      const cell = target(e);
      if (cell && cell.getAttribute("aria-selected") !== "true") pick(cell, false);
    });
    state.output.addEventListener("keydown", (e) => {
      const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1],
                      Home: [0, -Infinity], End: [0, Infinity] };
      if (!(e.key in moves)) return;
      e.preventDefault();
      const [i, j] = state.selected;
      const ni = Math.min(state.cfg.out[0] - 1, Math.max(0, i + moves[e.key][0]));
      const nj = Math.min(state.cfg.out[1] - 1, Math.max(0, j + moves[e.key][1]));
      pick(state.output.querySelector(`[data-i="${ni}"][data-j="${nj}"]`), true);
    });
  }

  /* ---------- the strides of the windows view ---------- */

  const plural = (v, unit) => `${v} ${unit}${v === 1 ? "" : "s"}`;

  /** One row per axis of the view, as in chapter 2's table: size, step, stride (elements, bytes). */
  function axisRows(cfg, view, bytes) {
    const step = (symbol, v, unit) => `${symbol} = ${plural(v, unit)}`;
    const [sh, sw, dh, dw] = [sub("s", "h"), sub("s", "w"), sub("d", "h"), sub("d", "w")];
    const rows = [
      ["n", "N", cfg.batch, "next image", sigma("N")],
      ["i", sub("H", "out"), cfg.out[0], step(sh, cfg.stride[0], "row"), `${sigma("H")}·${sh}`],
      ["j", sub("W", "out"), cfg.out[1], step(sw, cfg.stride[1], "column"), `${sigma("W")}·${sw}`],
      ["a", sub("K", "H"), cfg.kernel[0], step(dh, cfg.dilation[0], "row"), `${sigma("H")}·${dh}`],
      ["b", sub("K", "W"), cfg.kernel[1], step(dw, cfg.dilation[1], "column"), `${sigma("W")}·${dw}`],
      ["c", "C", cfg.channels, "next channel", sigma("C")],
    ];
    return rows.map(([axis, name, size, moves, formula], k) =>
      `<tr><td><code>${axis}</code></td><td>${name} = ${size}</td><td>${moves}</td><td>${formula}</td>` +
      `<td class="cx-num">${view[k]}</td><td class="cx-num">${view[k] * bytes}</td></tr>`).join("");
  }

  function stridesHTML(cfg) {
    const bytes = DTYPES[cfg.dtype];
    const { sigma: strides, view } = viewStrides(cfg);
    const times = (v) => v.map((s) => s * bytes);
    const paddedShape = [cfg.batch, cfg.padded[0], cfg.padded[1], cfg.channels];
    const shape = [cfg.batch, cfg.out[0], cfg.out[1], cfg.kernel[0], cfg.kernel[1], cfg.channels];
    const padded = cfg.padding[0] || cfg.padding[1];
    const source = padded ? "<code>pad2d(x, p)</code>" : "<code>x</code> (no padding)";
    const span = (id, v) => `<span class="cx-tuple-value" id="${id}">${tuple(v)}</span>`;
    return `<p>The padded array ${source} has shape (N, H + 2${sub("p", "h")}, ` +
      `W + 2${sub("p", "w")}, C) = ${span("cx-padded-shape", paddedShape)} and strides ` +
      `(${["N", "H", "W", "C"].map(sigma).join(", ")}) = ${span("cx-padded-elements", strides)} ` +
      `elements = ${span("cx-padded-bytes", times(strides))} bytes (${cfg.dtype}: ` +
      `${plural(bytes, "byte")} per element). Element [n, i, j, a, b, c] of the view is element ` +
      `[n, i·${sub("s", "h")} + a·${sub("d", "h")}, j·${sub("s", "w")} + b·${sub("d", "w")}, c] ` +
      `of the padded array, so each axis of the view steps:</p>` +
      `<div class="cx-table-wrap"><table class="cx-strides"><thead><tr><th>axis</th><th>size</th>` +
      `<th>one step moves</th><th>stride</th><th>elements</th><th>bytes</th></tr></thead>` +
      `<tbody>${axisRows(cfg, view, bytes)}</tbody></table></div>` +
      `<p class="cx-view">The view: shape ${span("cx-view-shape", shape)}, strides ` +
      `${span("cx-view-elements", view)} elements = ${span("cx-view-bytes", times(view))} bytes. ` +
      `In Python:</p><pre class="cx-code" id="cx-code">${codeText(cfg)}</pre>`;
  }

  function codeText(cfg) {
    const pair = (v) => `(${v[0]}, ${v[1]})`;
    const shape = [cfg.batch, cfg.input[0], cfg.input[1], cfg.channels];
    const x = `np.zeros(${tuple(shape)}, np.${cfg.dtype})`;
    const padded = cfg.padding[0] || cfg.padding[1] ? `pad2d(${x}, ${pair(cfg.padding)})` : x;
    return `windows(${padded}, ${pair(cfg.kernel)},\n        stride=${pair(cfg.stride)}, ` +
      `dilation=${pair(cfg.dilation)}).strides`;
  }

  /* ---------- putting it together ---------- */

  /** Everything the drawing depends on: the controls' values and the room there is. */
  function signature(root) {
    const form = root.querySelector("form");
    const values = Array.from(form.elements, (e) => (e.type === "checkbox" ? e.checked : e.value));
    return values.join("|") + "|" + root.clientWidth;
  }

  function render(state) {
    const { root } = state;
    syncShared(root);
    // A "change" after an "input", or a resize that changes nothing, would redraw the grids
    // for nothing and take the keyboard focus away from the output grid.
    const drawn = signature(root);
    if (drawn === state.drawn) return;
    state.drawn = drawn;
    const { cfg, errors } = readConfig(root);
    const message = root.querySelector("#cx-message");
    message.hidden = errors.length === 0;
    message.innerHTML = errors.map((e) => `<p>${e}</p>`).join("");
    const formulas = root.querySelector("#cx-formulas");
    formulas.hidden = cfg === null;
    if (cfg) {
      formulas.innerHTML = [0, 1].map((a) => `<p id="cx-out-${"hw"[a]}">${formulaHTML(cfg, a)}</p>`)
        .join("");
    }
    root.querySelector("#cx-results").hidden = errors.length > 0;
    if (errors.length) {  // no stale grid stays behind the message
      for (const id of ["#cx-input-slot", "#cx-output-slot", "#cx-strides"]) {
        root.querySelector(id).replaceChildren();
      }
      return;
    }
    drawResults(state, cfg);
  }

  function drawResults(state, cfg) {
    const { root } = state;
    const size = cellSize(root.querySelector("#cx-grids"), Math.max(cfg.padded[1], cfg.out[1]));
    const input = buildInputGrid(cfg, size);
    const output = buildOutputGrid(cfg, size);
    root.style.setProperty("--cx-cell", `${size}px`);
    root.querySelector("#cx-input-slot").replaceChildren(input.grid);
    root.querySelector("#cx-output-slot").replaceChildren(output);
    root.querySelector("#cx-strides").innerHTML = stridesHTML(cfg);
    Object.assign(state, { cfg, cells: input.cells, output, marked: [] });
    wireOutput(state);
    const [i, j] = state.selected;
    highlight(state, Math.min(i, cfg.out[0] - 1), Math.min(j, cfg.out[1] - 1));
  }

  function legend() {
    const item = (cls, text) => el("span", { class: "cx-legend-item" },
      [el("span", { class: `cx-cell cx-swatch ${cls}` }), el("span", { text })]);
    return el("div", { class: "cx-legend", "aria-hidden": "true" }, [
      item("", "input pixel"), item("cx-pad", "padding (0)"),
      item("cx-span cx-tap", "tap of the window"), item("cx-pad cx-span cx-tap", "tap on padding"),
      item("cx-span cx-gap", "dilation gap (skipped)"),
    ]);
  }

  function build(root) {
    const figure = (id, caption) => el("figure", { class: "cx-figure" },
      [el("figcaption", { text: caption }), el("div", { id, class: "cx-slot" })]);
    root.replaceChildren(
      buildControls(),
      el("div", { id: "cx-message", class: "cx-message", role: "alert", hidden: "" }),
      el("div", { id: "cx-formulas", class: "cx-formulas", "aria-live": "polite" }),
      el("div", { id: "cx-results" }, [
        legend(),
        el("div", { id: "cx-grids", class: "cx-grids" }, [
          figure("cx-input-slot", "padded input"), figure("cx-output-slot", "output: point at a pixel")]),
        el("p", { id: "cx-window", class: "cx-window", "aria-live": "polite" }),
        el("div", { id: "cx-strides" }),
      ]));
    const state = { root, selected: [0, 0], marked: [] };
    const update = () => render(state);
    root.addEventListener("input", update);
    root.addEventListener("change", update);
    root.querySelector("form").addEventListener("submit", (e) => e.preventDefault());
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(update, 100);
    });
    update();
  }

  function start() {
    const root = document.getElementById("conv-explorer");
    if (root) build(root);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
