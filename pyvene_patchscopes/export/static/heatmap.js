/* Heatmaps and layer tables with hover tooltips: no framework, no network, text only (never innerHTML).

   PatchscopesHeatmap.render(container, grid, options)
     grid = {title, row_label, col_label, rows: [labels], cols: [labels], cells: [[cell]],
             origin: "lower" (row 0 at the bottom, as the paper's heatmaps) or "upper" (default), note: str,
             legend: [{verdict, text}] (what a verified grid's marks mean)}
     cell = {label: str, shade: 0..1 or null, tip: [str], muted: bool, verdict: str (verified cells only)};
     cells[i][j]: row i, column j
     draws <table class="ps-heatmap"> with one <td class="ps-cell" data-row=i data-col=j> per cell; a verified
     cell also has data-verdict and the class ps-supported, ps-not-supported or ps-cannot-tell (its mark), and
     the legend is a <div class="ps-legend"> under the table; options.onClick(i, j, cell) on a click.
   PatchscopesTable.render(container, table, options)
     table = {title, key_label, columns: [str] (one per cell), rows: [{key, cells: [str], tip: [str], muted,
              verdict: str (verified rows only, also their last cell)}], note: str}
     draws <table class="ps-layers"> with one <tr data-key=key> per row (the key in its <th>, the first
     cell with class ps-top1); a verified row has data-verdict and the verdict's class (as a cell's), its
     last cell the class ps-verdict; options.onClick(row) on a click.
   Both replace what they drew before in the container and return the <table>. Hovering shows the cell's
   (or row's) tip in the container's one <div class="ps-tooltip">. */
(function () {
  "use strict";

  /* matplotlib's "Blues" (ColorBrewer), 9 stops from shade 0 to 1 */
  var BLUES = [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
               [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]];

  function blues(shade) {
    var x = Math.min(1, Math.max(0, shade)) * (BLUES.length - 1);
    var k = Math.min(BLUES.length - 2, Math.floor(x));
    var f = x - k;
    var rgb = [0, 1, 2].map(function (c) { return Math.round(BLUES[k][c] + f * (BLUES[k + 1][c] - BLUES[k][c])); });
    return "rgb(" + rgb.join(",") + ")";
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function tooltip(container) {
    var tip = container.querySelector(":scope > .ps-tooltip");
    if (!tip) {
      tip = element("div", "ps-tooltip");
      tip.setAttribute("role", "tooltip");
      tip.style.display = "none";
      container.appendChild(tip);
    }
    return tip;
  }

  function clear(container, keep) {
    Array.prototype.slice.call(container.childNodes).forEach(function (child) {
      if (child !== keep) { container.removeChild(child); }
    });
  }

  function show(tip, lines, anchor) {
    tip.textContent = (lines || []).join("\n");
    if (!tip.textContent) { hide(tip); return; }
    tip.style.display = "block";
    var box = anchor.getBoundingClientRect();
    var left = box.right + 8;
    var top = box.top;
    if (left + tip.offsetWidth > window.innerWidth - 4) { left = Math.max(4, box.left - tip.offsetWidth - 8); }
    if (top + tip.offsetHeight > window.innerHeight - 4) { top = Math.max(4, window.innerHeight - tip.offsetHeight - 4); }
    tip.style.left = left + "px";
    tip.style.top = top + "px";
  }

  function hide(tip) { tip.style.display = "none"; }

  function caption(table, title) {
    if (title) { table.appendChild(element("caption", "ps-title", title)); }
  }

  function note(container, text) {
    if (text) { container.appendChild(element("p", "ps-note", text)); }
  }

  /* a verified cell or row: its verdict as data-verdict and as a class ("not supported" -> ps-not-supported) */
  function verdict(node, text) {
    if (typeof text !== "string" || !text) { return; }
    node.setAttribute("data-verdict", text);
    node.classList.add("ps-" + text.replace(/[^a-z]+/g, "-"));
  }

  function legend(container, entries) {
    if (!entries || !entries.length) { return; }
    var box = element("div", "ps-legend");
    entries.forEach(function (entry) {
      var item = element("span", "ps-legend-item");
      var swatch = element("span", "ps-swatch");
      verdict(swatch, entry.verdict);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(" " + entry.text));
      box.appendChild(item);
    });
    container.appendChild(box);
  }

  /* hover and click on the table, by delegation: `find` maps an event target to [node, tip lines, click args] */
  function wire(table, tip, find, onClick) {
    var current = null;
    table.addEventListener("mouseover", function (event) {
      var hit = find(event.target);
      if (!hit) { current = null; hide(tip); return; }
      if (hit[0] !== current) { current = hit[0]; show(tip, hit[1], hit[0]); }
    });
    table.addEventListener("mouseleave", function () { current = null; hide(tip); });
    table.addEventListener("click", function (event) {
      var hit = find(event.target);
      if (hit && typeof onClick === "function") { onClick.apply(null, hit[2]); }
    });
  }

  function renderHeatmap(container, grid, options) {
    options = options || {};
    var tip = tooltip(container);
    clear(container, tip);
    var rows = grid.rows || [], cols = grid.cols || [], cells = grid.cells || [];
    var table = element("table", "ps-heatmap");
    if (cols.length > 20) { table.classList.add("ps-dense"); }  /* a 30 x 30 grid fits a laptop's width */
    caption(table, grid.title);
    var body = element("tbody");
    var order = rows.map(function (_, i) { return i; });
    if (grid.origin === "lower") { order.reverse(); }
    order.forEach(function (i, k) {
      var tr = element("tr");
      if (k === 0) {
        var side = element("th", "ps-axis ps-row-axis", grid.row_label || "");
        side.rowSpan = rows.length;
        tr.appendChild(side);
      }
      var head = element("th", "ps-row-label", rows[i]);
      head.scope = "row";
      tr.appendChild(head);
      (cells[i] || []).forEach(function (cell, j) {
        var td = element("td", "ps-cell", cell.label);
        td.setAttribute("data-row", String(i));
        td.setAttribute("data-col", String(j));
        if (cell.muted) { td.classList.add("ps-muted"); }
        verdict(td, cell.verdict);
        if (typeof cell.shade === "number" && isFinite(cell.shade)) {
          if (!cell.muted) {
            td.style.backgroundColor = blues(cell.shade);
            if (cell.shade > 0.6) { td.classList.add("ps-dark"); }
          }
        } else {
          td.classList.add("ps-empty");
        }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    var foot = element("tfoot");
    var labels = element("tr");
    labels.appendChild(element("th", "ps-corner"));
    labels.appendChild(element("th", "ps-corner"));
    cols.forEach(function (label) {
      var th = element("th", "ps-col-label", label);
      th.scope = "col";
      labels.appendChild(th);
    });
    foot.appendChild(labels);
    var axis = element("tr");
    axis.appendChild(element("th", "ps-corner"));
    axis.appendChild(element("th", "ps-corner"));
    var name = element("th", "ps-axis ps-col-axis", grid.col_label || "");
    name.colSpan = Math.max(1, cols.length);
    axis.appendChild(name);
    foot.appendChild(axis);
    table.appendChild(body);
    table.appendChild(foot);
    container.appendChild(table);
    legend(container, grid.legend);
    note(container, grid.note);
    wire(table, tip, function (target) {
      var td = target.closest ? target.closest("td.ps-cell") : null;
      if (!td || !table.contains(td)) { return null; }
      var i = Number(td.getAttribute("data-row")), j = Number(td.getAttribute("data-col"));
      var cell = cells[i][j];
      return [td, cell.tip, [i, j, cell]];
    }, options.onClick);
    return table;
  }

  function renderTable(container, data, options) {
    options = options || {};
    var tip = tooltip(container);
    clear(container, tip);
    var rows = data.rows || [];
    var table = element("table", "ps-layers");
    caption(table, data.title);
    var head = element("thead");
    var line = element("tr");
    line.appendChild(element("th", "ps-key-label", data.key_label || ""));
    (data.columns || []).forEach(function (column) { line.appendChild(element("th", null, column)); });
    head.appendChild(line);
    table.appendChild(head);
    var body = element("tbody");
    rows.forEach(function (row, k) {
      var tr = element("tr");
      tr.setAttribute("data-key", String(row.key));
      tr.setAttribute("data-index", String(k));
      if (row.muted) { tr.classList.add("ps-muted"); }
      verdict(tr, row.verdict);
      var key = element("th", "ps-key", row.key);
      key.scope = "row";
      tr.appendChild(key);
      var texts = row.cells || [];
      texts.forEach(function (text, j) {
        var last = row.verdict && j === texts.length - 1;
        tr.appendChild(element("td", j === 0 ? "ps-top1" : last ? "ps-verdict" : null, text));
      });
      body.appendChild(tr);
    });
    table.appendChild(body);
    container.appendChild(table);
    note(container, data.note);
    wire(table, tip, function (target) {
      var tr = target.closest ? target.closest("tbody tr") : null;
      if (!tr || !table.contains(tr)) { return null; }
      var row = rows[Number(tr.getAttribute("data-index"))];
      return [tr, row.tip, [row]];
    }, options.onClick);
    return table;
  }

  window.PatchscopesHeatmap = { render: renderHeatmap, color: blues };
  window.PatchscopesTable = { render: renderTable };
}());
