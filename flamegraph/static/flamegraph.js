/* spanflame flame graph: an icicle chart (root on top) drawn as SVG, for one self-contained page
 * or the web UI. Every string from a profile is untrusted: it only ever reaches the DOM through
 * textContent or setAttribute, never through innerHTML.
 *
 * Data (built by flamegraph/html.py):
 *   {strings: [...], types: [{name, unit, total, tree, top}], default: "cpu", title, subtitle}
 *   tree node: [nameIdx, fileIdx, line, total, self, pruned, [children...], baselineTotal?]
 *   With data.diff, frames are coloured by how their share changed against the baseline
 *   (red: more than the baseline, blue: less).
 *   top row:   [nameIdx, fileIdx, line, self, total]
 */
(function (global) {
  'use strict';

  var ROW = 18, MIN_PX = 0.4, TEXT_PX = 28, CHAR_PX = 6.4;
  var SVGNS = 'http://www.w3.org/2000/svg';

  function formatValue(v, unit) {
    if (unit === 'nanoseconds') {
      var a = Math.abs(v);
      if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e11 ? 0 : 2) + ' s';
      if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e8 ? 0 : 1) + ' ms';
      if (a >= 1e3) return (v / 1e3).toFixed(1) + ' µs';
      return v + ' ns';
    }
    if (unit === 'bytes') {
      var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0, x = v;
      while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i++; }
      return (i === 0 ? x : x.toFixed(1)) + ' ' + units[i];
    }
    return Math.round(v).toLocaleString('en-US') + (unit && unit !== 'count' ? ' ' + unit : '');
  }

  function pct(v, total) {
    if (!total) return '0%';
    var p = 100 * v / total;
    return (p >= 10 ? p.toFixed(1) : p.toFixed(2)) + '%';
  }

  function hashColor(name, file) {
    var h = 0, s = name || '';
    for (var i = 0; i < s.length; i++) h = (h * 31 + s.charCodeAt(i)) | 0;
    var r = 205 + (Math.abs(h) % 50), g = 80 + (Math.abs(h >> 8) % 130), b = 40 + (Math.abs(h >> 16) % 50);
    if (/site-packages|dist-packages|\/lib\/python/.test(file || '')) { b += 60; r -= 40; g += 20; }
    if (/^\[/.test(s)) { r = 120; g = 150; b = 200 + (Math.abs(h) % 50); }
    return 'rgb(' + r + ',' + g + ',' + b + ')';
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function Flamegraph(root, data, opts) {
    this.root = root;
    this.opts = opts || {};
    this.setData(data);
  }

  Flamegraph.prototype.setData = function (data) {
    var t0 = (global.performance && performance.now()) || 0;
    this.data = data || {strings: [], types: []};
    this.strings = this.data.strings || [];
    this.types = this.data.types || [];
    var def = this.opts.type || this.data.default;
    this.typeIndex = 0;
    for (var i = 0; i < this.types.length; i++) if (this.types[i].name === def) this.typeIndex = i;
    this.build();
    // Time to decode the data and draw the first view, for benchmarks.
    this.renderMs = ((global.performance && performance.now()) || 0) - t0;
  };

  Flamegraph.prototype.build = function () {
    var self = this;
    var r = this.root;
    while (r.firstChild) r.removeChild(r.firstChild);

    var header = el('header', 'fg-header');
    if (this.data.title) header.appendChild(el('h1', null, this.data.title));
    if (this.data.subtitle) header.appendChild(el('div', 'fg-subtitle', this.data.subtitle));
    var controls = el('div', 'fg-controls');
    var typeLabel = el('label', null, 'Sample type ');
    var select = el('select', 'fg-type');
    select.setAttribute('aria-label', 'Sample type');
    this.types.forEach(function (t, i) {
      var o = el('option', null, t.name + ' (' + t.unit + ')');
      o.value = String(i);
      if (i === self.typeIndex) o.selected = true;
      select.appendChild(o);
    });
    select.addEventListener('change', function () { self.selectType(+select.value); });
    typeLabel.appendChild(select);
    if (this.types.length < 2) typeLabel.hidden = true;
    controls.appendChild(typeLabel);
    var search = el('input', 'fg-search');
    search.type = 'search';
    search.placeholder = 'Search functions (regex)';
    search.setAttribute('aria-label', 'Search');
    search.addEventListener('input', function () { self.search(search.value); });
    controls.appendChild(search);
    var reset = el('button', 'fg-reset', 'Reset zoom');
    reset.type = 'button';
    reset.addEventListener('click', function () { self.zoom(null); });
    controls.appendChild(reset);
    this.matchedEl = el('span', 'fg-matched');
    controls.appendChild(this.matchedEl);
    this.crumbEl = el('span', 'fg-breadcrumb');
    controls.appendChild(this.crumbEl);
    header.appendChild(controls);
    r.appendChild(header);

    this.chart = el('div', 'fg-chart');
    this.svg = document.createElementNS(SVGNS, 'svg');
    this.svg.setAttribute('class', 'fg-svg');
    this.chart.appendChild(this.svg);
    r.appendChild(this.chart);
    this.tooltip = el('div', 'fg-tooltip');
    this.tooltip.hidden = true;
    r.appendChild(this.tooltip);

    this.topSection = el('section', 'fg-top');
    r.appendChild(this.topSection);

    this.searchInput = search;
    this.typeSelect = select;
    this.svg.addEventListener('mousemove', function (ev) { self.onHover(ev); });
    this.svg.addEventListener('mouseleave', function () { self.tooltip.hidden = true; });
    this.svg.addEventListener('click', function (ev) {
      var g = ev.target.closest ? ev.target.closest('g.frame') : null;
      if (g) self.zoom(self.drawn[+g.getAttribute('data-i')]);
    });
    if (!this._keys) {
      this._keys = true;
      document.addEventListener('keydown', function (ev) {
        if (ev.key === 'Escape') self.zoom(null);
      });
    }
    if (!this._resize) {
      this._resize = true;
      var pending = null;
      global.addEventListener('resize', function () {
        if (pending) return;
        pending = setTimeout(function () { pending = null; self.render(); }, 100);
      });
    }
    this.selectType(this.typeIndex);
  };

  Flamegraph.prototype.decode = function (arr, parent, depth) {
    var S = this.strings;
    var n = {name: S[arr[0]] || '', file: S[arr[1]] || '', line: arr[2], total: arr[3],
             self: arr[4], pruned: arr[5], parent: parent, depth: depth,
             children: [], match: false, base: arr.length > 7 ? arr[7] : null};
    var kids = arr[6] || [];
    for (var i = 0; i < kids.length; i++) n.children.push(this.decode(kids[i], n, depth + 1));
    if (depth + 1 > this.maxDepth) this.maxDepth = depth + 1;
    return n;
  };

  Flamegraph.prototype.selectType = function (i) {
    this.typeIndex = i;
    this.type = this.types[i];
    this.maxDepth = 0;
    this.tree = this.type ? this.decode(this.type.tree, null, 0) : null;
    this.focus = null;
    this.renderTop();
    this.search(this.searchInput.value);
    if (this.opts.onTypeChange && this.type) this.opts.onTypeChange(this.type.name);
  };

  Flamegraph.prototype.zoom = function (node) {
    this.focus = node && node !== this.tree ? node : null;
    this.render();
  };

  Flamegraph.prototype.search = function (q) {
    this.query = q;
    var re = null;
    if (q) {
      try { re = new RegExp(q, 'i'); } catch (e) {
        re = new RegExp(q.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'), 'i');
      }
    }
    var matchedTotal = 0;
    (function walk(n, under) {
      n.match = !!(re && n.parent && re.test(n.name));
      if (n.match && !under) matchedTotal += n.total;
      for (var i = 0; i < n.children.length; i++) walk(n.children[i], under || n.match);
    })(this.tree || {children: []}, false);
    this.matchedTotal = matchedTotal;
    if (re && this.tree) {
      this.matchedEl.textContent = 'Matched: ' + pct(matchedTotal, this.tree.total) + ' (' +
        formatValue(matchedTotal, this.type.unit) + ')';
    } else {
      this.matchedEl.textContent = '';
    }
    this.render();
  };

  Flamegraph.prototype.render = function () {
    var svg = this.svg;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    this.drawn = [];
    var old = this.root.querySelector('.fg-empty');
    if (old) old.parentNode.removeChild(old);
    if (!this.tree || !this.tree.total) {
      svg.setAttribute('height', '0');
      this.chart.appendChild(el('div', 'fg-empty', 'No samples of this type.'));
      this.crumbEl.textContent = '';
      return;
    }
    var width = Math.max(200, this.chart.clientWidth - 32);
    svg.setAttribute('width', String(width));
    svg.setAttribute('height', String((this.maxDepth + 1) * ROW));
    svg.setAttribute('viewBox', '0 0 ' + width + ' ' + (this.maxDepth + 1) * ROW);
    var focus = this.focus || this.tree;
    var frag = document.createDocumentFragment();
    var anc = [];
    for (var a = focus.parent; a; a = a.parent) anc.push(a);
    for (var k = 0; k < anc.length; k++) this.drawFrame(frag, anc[k], 0, width, 'ancestor');
    this.drawTree(frag, focus, 0, width, width / focus.total);
    svg.appendChild(frag);
    this.crumbEl.textContent = this.focus ? 'Zoomed: ' + focus.name + ' (' +
      pct(focus.total, this.tree.total) + ') · Esc to reset' : '';
  };

  Flamegraph.prototype.drawTree = function (frag, node, x, w, scale) {
    this.drawFrame(frag, node, x, w, '');
    var cx = x;
    for (var i = 0; i < node.children.length; i++) {
      var c = node.children[i];
      var cw = c.total * scale;
      if (cw >= MIN_PX) this.drawTree(frag, c, cx, cw, scale);
      cx += cw;
    }
  };

  Flamegraph.prototype.drawFrame = function (frag, node, x, w, cls) {
    var g = document.createElementNS(SVGNS, 'g');
    var c = 'frame' + (cls ? ' ' + cls : '') + (node.match ? ' match' : '') +
      (this.query && !node.match ? ' dim' : '');
    g.setAttribute('class', c);
    g.setAttribute('data-i', String(this.drawn.length));
    g.setAttribute('data-name', node.name);
    this.drawn.push(node);
    var y = node.depth * ROW;
    var rect = document.createElementNS(SVGNS, 'rect');
    rect.setAttribute('x', x.toFixed(2));
    rect.setAttribute('y', String(y));
    rect.setAttribute('width', Math.max(0.5, w - 0.5).toFixed(2));
    rect.setAttribute('height', String(ROW - 1));
    rect.setAttribute('fill', !node.parent ? '#c8ccd4' :
      (this.data.diff ? this.diffColor(node) : hashColor(node.name, node.file)));
    g.appendChild(rect);
    if (w >= TEXT_PX) {
      var t = document.createElementNS(SVGNS, 'text');
      t.setAttribute('x', (x + 3).toFixed(2));
      t.setAttribute('y', String(y + ROW - 5));
      var maxChars = Math.floor((w - 6) / CHAR_PX);
      var label = node.name;
      if (label.length > maxChars) label = maxChars > 2 ? label.slice(0, maxChars - 1) + '…' : '';
      t.textContent = label;
      g.appendChild(t);
    }
    frag.appendChild(g);
  };

  /* Diff colours compare values, not shares: the baseline is already scaled to be comparable
   * (e.g. the average of other spans), so "this span spent 300 ms more here" shows as red. */
  Flamegraph.prototype.diffColor = function (n) {
    var scale = Math.max(this.tree.total || 0, this.type.baseline_total || 0);
    var d = scale ? Math.max(-1, Math.min(1, 3 * (n.total - (n.base || 0)) / scale)) : 0;
    if (Math.abs(d) < 0.03) return 'rgb(220,220,220)';
    var k = Math.round(220 - Math.abs(d) * 140);
    return d > 0 ? 'rgb(235,' + k + ',' + k + ')' : 'rgb(' + k + ',' + k + ',235)';
  };

  Flamegraph.prototype.onHover = function (ev) {
    var g = ev.target.closest ? ev.target.closest('g.frame') : null;
    var tt = this.tooltip;
    if (!g) { tt.hidden = true; return; }
    var n = this.drawn[+g.getAttribute('data-i')];
    var unit = this.type.unit, total = this.tree.total;
    while (tt.firstChild) tt.removeChild(tt.firstChild);
    tt.appendChild(el('div', 'fg-tt-name', n.name));
    if (n.file) tt.appendChild(el('div', 'fg-tt-file', n.file + (n.line ? ':' + n.line : '')));
    var table = el('table');
    var rows = [['Total', formatValue(n.total, unit) + ' (' + pct(n.total, total) + ')'],
                ['Self', formatValue(n.self, unit) + ' (' + pct(n.self, total) + ')']];
    if (n.pruned) rows.push(['In tiny frames', formatValue(n.pruned, unit)]);
    if (this.data.diff) {
      var b = n.base || 0, dv = n.total - b;
      rows.push([this.data.baseline_label || 'Baseline', formatValue(b, unit) + ' (' +
        pct(b, this.type.baseline_total) + ')']);
      rows.push(['Difference', (dv > 0 ? '+' : dv < 0 ? '−' : '') + formatValue(Math.abs(dv), unit)]);
    }
    rows.forEach(function (r) {
      var tr = el('tr');
      tr.appendChild(el('td', null, r[0]));
      tr.appendChild(el('td', null, r[1]));
      table.appendChild(tr);
    });
    tt.appendChild(table);
    tt.hidden = false;
    var px = ev.clientX + 14, py = ev.clientY + 14;
    var vw = global.innerWidth, vh = global.innerHeight;
    var r = tt.getBoundingClientRect();
    if (px + r.width > vw - 8) px = Math.max(8, ev.clientX - r.width - 14);
    if (py + r.height > vh - 8) py = Math.max(8, ev.clientY - r.height - 14);
    tt.style.left = px + 'px';
    tt.style.top = py + 'px';
  };

  Flamegraph.prototype.renderTop = function () {
    var sec = this.topSection, self = this;
    while (sec.firstChild) sec.removeChild(sec.firstChild);
    var rows = (this.type && this.type.top) || [];
    if (!rows.length || this.opts.hideTop) return;
    sec.appendChild(el('h2', null, 'Top functions by self ' + this.type.name));
    var table = el('table', 'fg-top-table');
    var thead = el('thead'), hr = el('tr');
    [['Function', ''], ['Self', 'num'], ['Self %', 'num'], ['Total', 'num'], ['Total %', 'num']]
      .forEach(function (h) { hr.appendChild(el('th', h[1], h[0])); });
    thead.appendChild(hr);
    table.appendChild(thead);
    var tbody = el('tbody'), S = this.strings, unit = this.type.unit, total = this.type.total;
    rows.forEach(function (r) {
      var tr = el('tr');
      var name = S[r[0]] || '', file = S[r[1]] || '';
      var fn = el('td', 'fn');
      fn.appendChild(el('div', null, name));
      if (file) fn.appendChild(el('div', 'fg-subtitle', file + (r[2] ? ':' + r[2] : '')));
      tr.appendChild(fn);
      tr.appendChild(el('td', 'num', formatValue(r[3], unit)));
      tr.appendChild(el('td', 'num', pct(r[3], total)));
      tr.appendChild(el('td', 'num', formatValue(r[4], unit)));
      tr.appendChild(el('td', 'num', pct(r[4], total)));
      tr.addEventListener('click', function () {
        var q = '^' + name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '$';
        self.searchInput.value = q;
        self.search(q);
      });
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
    sec.appendChild(table);
  };

  global.SpanflameFlamegraph = {
    create: function (root, data, opts) { return new Flamegraph(root, data, opts); },
    formatValue: formatValue
  };
})(window);
