/* spanflame web UI: Explore, Slow spans, Trace and Span flame graph views over the agent's API.
 *
 * Every string from the API (function, span, service names, attributes) is untrusted: it only
 * reaches the DOM through textContent, setAttribute or option values, never through innerHTML.
 * The bearer token, when the agent wants one, comes once as ?token= (it is then kept in
 * sessionStorage and removed from the address bar) and is sent as an Authorization header.
 */
(function (global) {
  'use strict';

  var FG = global.SpanflameFlamegraph;
  var fmtNs = function (v) { return FG.formatValue(Math.round(v || 0), 'nanoseconds'); };
  var RANGES = [['5m', 300], ['15m', 900], ['1h', 3600], ['6h', 21600], ['24h', 86400],
                ['3d', 259200], ['7d', 604800]];
  var CATS = [
    ['cpu', 'CPU'], ['lock', 'lock'], ['gil', 'GIL'], ['sync', 'waiting for another thread'],
    ['await', 'awaiting (asyncio)'],
    ['io', 'disk IO'], ['net', 'network'],
    ['other', 'other off-CPU'], ['children', 'child spans'], ['unaccounted', 'unaccounted'],
    ['unobserved', 'not observed']];
  var TYPE_HELP = {
    cpu: 'time on CPU', wall: 'wall-clock time', off_cpu: 'time off CPU', lock_wait: 'lock waits',
    gil_wait: 'GIL waits', io_wait: 'disk IO waits', io: 'disk IO bytes', net_wait: 'network waits',
    net_send: 'TCP bytes sent', net_recv: 'TCP bytes received', tcp_retransmits: 'TCP retransmits'};

  // -- token and API ------------------------------------------------------------------------
  var TOKEN = (function () {
    var u = new URL(global.location.href);
    var t = u.searchParams.get('token');
    if (t) {
      try { global.sessionStorage.setItem('spanflame-token', t); } catch (e) { /* private mode */ }
      u.searchParams.delete('token');
      global.history.replaceState(null, '', u.pathname + u.search + u.hash);
      return t;
    }
    try { return global.sessionStorage.getItem('spanflame-token') || ''; } catch (e) { return ''; }
  })();

  function query(params) {
    var q = new URLSearchParams();
    Object.keys(params).forEach(function (k) {
      var v = params[k];
      if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
    });
    return q.toString();
  }

  function api(path, params) {
    var headers = {};
    if (TOKEN) headers.Authorization = 'Bearer ' + TOKEN;
    var url = path + (params ? '?' + query(params) : '');
    return fetch(url, {headers: headers}).then(function (r) {
      if (r.status === 401) throw new Error('This agent wants a token: open the UI with ?token=…');
      if (!r.ok) return r.text().then(function (t) { throw new Error(t.trim() || r.statusText); });
      return r.json();
    });
  }

  function downloadUrl(path, params) {
    var p = Object.assign({}, params);
    if (TOKEN) p.token = TOKEN;
    return path + '?' + query(p);
  }

  // -- DOM helpers ------------------------------------------------------------------------------
  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === undefined || v === null || v === false) return;
      if (k === 'text') e.textContent = v;
      else if (k === 'class') e.className = v;
      else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    });
    (kids || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    });
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  function errorBox(msg) { return el('div', {class: 'sf-error', role: 'alert', text: msg}); }

  function fmtTime(sec) {
    var d = new Date(sec * 1000);
    var pad = function (n) { return (n < 10 ? '0' : '') + n; };
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  function params() { return new URL(global.location.href).searchParams; }

  function setParams(obj) {
    var u = new URL(global.location.href);
    Object.keys(obj).forEach(function (k) {
      if (obj[k] === undefined || obj[k] === null || obj[k] === '' || obj[k] === false) u.searchParams.delete(k);
      else u.searchParams.set(k, String(obj[k]));
    });
    global.history.replaceState(null, '', u.pathname + '?' + u.searchParams.toString());
  }

  /* A range is either relative (`range=1h`, evaluated at every fetch) or absolute (from/until). */
  function rangeOf(p) {
    if (p.get('from') && p.get('until')) return {from: +p.get('from'), until: +p.get('until'), label: 'custom'};
    var label = p.get('range') || '1h', secs = 3600;
    RANGES.forEach(function (r) { if (r[0] === label) secs = r[1]; });
    var now = Date.now() / 1000;
    return {from: now - secs, until: now, label: label};
  }

  function rangeSelect(current, onChange) {
    var s = el('select', {'aria-label': 'Time range', class: 'sf-range'});
    RANGES.forEach(function (r) {
      s.appendChild(el('option', {value: r[0], text: 'Last ' + r[0], selected: r[0] === current}));
    });
    if (current === 'custom') s.appendChild(el('option', {value: 'custom', text: 'Custom range', selected: true}));
    s.addEventListener('change', function () { onChange(s.value); });
    return s;
  }

  function field(label, input) { return el('label', {class: 'sf-field'}, [el('span', {text: label}), input]); }

  function parseLabels(text) {
    var out = {}, bad = [];
    (text || '').split(',').forEach(function (part) {
      part = part.trim();
      if (!part) return;
      var i = part.indexOf('=');
      if (i <= 0) { bad.push(part); return; }
      out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
    });
    return {labels: out, bad: bad};
  }

  // -- breakdown bar ----------------------------------------------------------------------------
  function breakdownParts(bd) {
    if (!bd) return [];
    var parts = [], total = 0;
    CATS.forEach(function (c) { var v = bd[c[0] + '_ns'] || 0; total += v; parts.push([c[0], c[1], v]); });
    return parts.filter(function (p) { return p[2] > 0; }).map(function (p) {
      return {cat: p[0], label: p[1], ns: p[2], share: total ? p[2] / total : 0};
    });
  }

  function breakdownBar(bd) {
    var bar = el('div', {class: 'sf-bar', role: 'img'});
    var parts = breakdownParts(bd);
    if (!parts.length) {
      bar.classList.add('sf-bar-none');
      bar.setAttribute('aria-label', 'no breakdown (the span was not on a profiled thread)');
      bar.appendChild(el('span', {class: 'sf-bar-empty', text: 'no breakdown'}));
      return bar;
    }
    var desc = [];
    parts.forEach(function (p) {
      var text = p.label + ' ' + fmtNs(p.ns) + ' (' + Math.round(100 * p.share) + '%)';
      desc.push(text);
      bar.appendChild(el('span', {class: 'sf-seg sf-' + p.cat, style: null, title: text,
                                  'data-cat': p.cat}));
      bar.lastChild.style.width = (100 * p.share).toFixed(2) + '%';
    });
    bar.setAttribute('aria-label', desc.join(', '));
    return bar;
  }

  function legend() {
    var l = el('div', {class: 'sf-legend'});
    CATS.forEach(function (c) {
      l.appendChild(el('span', {class: 'sf-legend-item'}, [el('span', {class: 'sf-swatch sf-' + c[0]}), c[1]]));
    });
    return l;
  }

  /* A span is stored as soon as it arrives; its breakdown comes when the window it ran in is
     linked (or never, for a span from before its process was profiled). */
  function causeOf(span) {
    if (!span.breakdown) return 'no profile linked (yet): its window is still open, or its process was not profiled then';
    return span.breakdown.cause || '';
  }

  function flameLink(span, extra) {
    var p = Object.assign({trace_id: span.trace_id, span_id: span.span_id}, extra || {});
    return '/flamegraph?' + query(p);
  }

  // -- services --------------------------------------------------------------------------------
  var servicesCache = null;
  function services() {
    if (!servicesCache) {
      var now = Date.now() / 1000;
      servicesCache = api('/api/services', {from: now - 31 * 86400 + 60, until: now + 60});
    }
    return servicesCache;
  }

  // -- Explore ---------------------------------------------------------------------------------
  function explore(root) {
    var p = params();
    var state = {service: p.get('service') || '', pid: p.get('pid') || '', type: p.get('type') || 'cpu',
                 pod: p.get('pod') ? (p.get('namespace') || '') + '/' + p.get('pod') : '',
                 labels: p.get('labels') || '', range: rangeOf(p)};
    var svc = el('select', {'aria-label': 'Service', class: 'sf-service'});
    var pid = el('select', {'aria-label': 'Process', class: 'sf-pid'});
    var pod = el('select', {'aria-label': 'Pod', class: 'sf-pod'});
    var type = el('select', {'aria-label': 'Profile type', class: 'sf-type'});
    var labels = el('input', {type: 'text', class: 'sf-labels', placeholder: 'thread_name=worker, span_name=checkout',
                              'aria-label': 'Label filters', value: state.labels});
    var range = rangeSelect(state.range.label, function (v) {
      setParams({range: v === 'custom' ? null : v, from: null, until: null});
      state.range = rangeOf(params());
      load();
    });
    var apply = el('button', {type: 'button', class: 'sf-apply', text: 'Apply'});
    var dl = el('span', {class: 'sf-downloads'});
    var status = el('div', {class: 'sf-status', 'aria-live': 'polite'});
    var timeline = el('div', {class: 'sf-timeline'});
    var chart = el('div', {class: 'sf-flame'});
    root.appendChild(el('section', {class: 'sf-toolbar'}, [
      field('Service', svc), field('Process', pid), field('Pod', pod), field('Type', type), field('Range', range),
      field('Labels', labels), apply, dl]));
    var srcLine = el('div', {class: 'sf-source'});
    root.appendChild(srcLine);
    root.appendChild(timeline);
    root.appendChild(status);
    root.appendChild(chart);

    var known = [], sources = {};
    agentInfo().then(function (info) {  // live reasons win over what the store remembers
      Object.keys(info.sources || {}).forEach(function (k) { sources[k] = info.sources[k]; });
      if (known.length) fillPids();
    });
    function fillPids() {
      clear(pid);
      pid.appendChild(el('option', {value: '', text: 'all processes'}));
      known.filter(function (s) { return !state.service || s.service === state.service; })
        .forEach(function (s) {
          s.pids.forEach(function (x) {
            var src = sources[String(x)];
            var how = src ? (src.sampler === 'bpf' ? ', kernel walker' : ', ' + src.sampler) : '';
            pid.appendChild(el('option', {value: String(x), text: x + ' (' + s.service + how + ')',
                                          title: src && src.why ? src.why : null,
                                          selected: String(x) === state.pid}));
          });
        });
      srcLine.textContent = state.pid ? sourceText({sources: sources}, state.pid) : '';
    }
    function fillPods() {
      clear(pod);
      pod.appendChild(el('option', {value: '', text: 'all pods'}));
      var n = 0;
      known.filter(function (s) { return !state.service || s.service === state.service; })
        .forEach(function (s) {
          (s.pods || []).forEach(function (x) {
            n++;
            pod.appendChild(el('option', {value: x, text: x, selected: x === state.pod}));
          });
        });
      pod.parentNode.hidden = n === 0;  // not on Kubernetes
    }
    function fillTypes() {
      clear(type);
      var types = {};
      known.filter(function (s) { return !state.service || s.service === state.service; })
        .forEach(function (s) { s.types.forEach(function (t) { types[t] = 1; }); });
      if (!Object.keys(types).length) types.cpu = 1;
      types[state.type] = 1;
      Object.keys(types).sort().forEach(function (t) {
        type.appendChild(el('option', {value: t, text: t + (TYPE_HELP[t] ? ' · ' + TYPE_HELP[t] : ''), selected: t === state.type}));
      });
    }
    services().then(function (list) {
      known = list;
      list.forEach(function (s) {
        Object.keys(s.sources || {}).forEach(function (k) {
          if (!sources[k]) sources[k] = {sampler: s.sources[k]};
        });
      });
      svc.appendChild(el('option', {value: '', text: 'all services'}));
      list.forEach(function (s) {
        svc.appendChild(el('option', {value: s.service, text: s.service, selected: s.service === state.service}));
      });
      fillPids(); fillPods(); fillTypes();
    }).catch(function (e) { status.appendChild(errorBox(e.message)); });
    svc.addEventListener('change', function () { state.service = svc.value; state.pid = ''; state.pod = ''; fillPids(); fillPods(); fillTypes(); load(); });
    pod.addEventListener('change', function () { state.pod = pod.value; load(); });
    pid.addEventListener('change', function () {
      state.pid = pid.value;
      srcLine.textContent = state.pid ? sourceText({sources: sources}, state.pid) : '';
      load();
    });
    type.addEventListener('change', function () { state.type = type.value; load(); });
    apply.addEventListener('click', function () { state.labels = labels.value; load(); });
    labels.addEventListener('keydown', function (ev) { if (ev.key === 'Enter') { state.labels = labels.value; load(); } });

    var fg = null;
    function load() {
      var r = state.range.label === 'custom' ? state.range : rangeOf(params());
      var parsed = parseLabels(state.labels);
      clear(status);
      if (parsed.bad.length) { status.appendChild(errorBox('Label filters are key=value: ' + parsed.bad.join(', '))); return; }
      var i = state.pod.indexOf('/');
      var podq = state.pod ? {namespace: state.pod.slice(0, i), pod: state.pod.slice(i + 1)} : {namespace: null, pod: null};
      setParams(Object.assign({service: state.service, pid: state.pid, type: state.type, labels: state.labels}, podq));
      var q = Object.assign({from: r.from.toFixed(3), until: r.until.toFixed(3), service: state.service,
                             pid: state.pid, type: state.type}, parsed.labels, state.pod ? podq : {});
      clear(dl);
      dl.appendChild(el('a', {href: downloadUrl('/api/flamegraph', Object.assign({format: 'pprof'}, q)), download: 'profile.pb.gz', text: 'pprof'}));
      dl.appendChild(el('a', {href: downloadUrl('/api/flamegraph', Object.assign({format: 'speedscope'}, q)), download: 'profile.speedscope.json', text: 'speedscope'}));
      drawTimeline(timeline, {from: q.from, until: q.until, service: state.service, pid: state.pid, type: state.type},
        function (a, b) { setParams({from: a.toFixed(3), until: b.toFixed(3), range: null}); state.range = rangeOf(params()); rebuildRange(); load(); });
      status.textContent = 'Loading…';
      var t0 = performance.now();
      api('/api/flamegraph', q).then(function (data) {
        var fetchMs = performance.now() - t0;
        status.textContent = fmtTime(r.from) + ' – ' + fmtTime(r.until) + ' · built in ' + data.elapsed_ms + ' ms on the agent';
        if (!fg) fg = FG.create(chart, data, {});
        else fg.setData(data);
        global.flamegraph = fg;
        global.spanflameTimings = {fetchMs: fetchMs, renderMs: fg.renderMs, readyMs: performance.now()};
        document.body.setAttribute('data-ready', '1');
      }).catch(function (e) { clear(status); status.appendChild(errorBox(e.message)); });
    }
    function rebuildRange() {
      var n = rangeSelect(state.range.label, function (v) {
        setParams({range: v === 'custom' ? null : v, from: null, until: null});
        state.range = rangeOf(params()); load();
      });
      range.parentNode.replaceChild(n, range);
      range = n;
    }
    load();
  }

  /* Activity over time as bars; drag across it to zoom into a range. */
  function drawTimeline(box, q, onSelect) {
    clear(box);
    var W = Math.max(300, box.clientWidth || 1000), H = 64, NS = 'http://www.w3.org/2000/svg';
    api('/api/timeline', Object.assign({buckets: 120}, q)).then(function (tl) {
      clear(box);
      var svg = document.createElementNS(NS, 'svg');
      svg.setAttribute('class', 'sf-timeline-svg');
      svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
      svg.setAttribute('width', String(W));
      svg.setAttribute('height', String(H));
      var max = 0;
      tl.points.forEach(function (pt) { if (pt[1] > max) max = pt[1]; });
      var bw = W / tl.points.length;
      tl.points.forEach(function (pt, i) {
        var h = max ? Math.max(pt[1] ? 1 : 0, (H - 14) * pt[1] / max) : 0;
        var rect = document.createElementNS(NS, 'rect');
        rect.setAttribute('x', (i * bw).toFixed(2));
        rect.setAttribute('y', (H - 12 - h).toFixed(2));
        rect.setAttribute('width', Math.max(0.5, bw - 1).toFixed(2));
        rect.setAttribute('height', h.toFixed(2));
        rect.setAttribute('class', 'sf-tl-bar');
        var title = document.createElementNS(NS, 'title');
        title.textContent = fmtTime(pt[0]) + ': ' + FG.formatValue(pt[1], tl.unit);
        rect.appendChild(title);
        svg.appendChild(rect);
      });
      var lab = function (x, text, anchor) {
        var t = document.createElementNS(NS, 'text');
        t.setAttribute('x', String(x)); t.setAttribute('y', String(H - 1));
        t.setAttribute('text-anchor', anchor); t.setAttribute('class', 'sf-tl-label');
        t.textContent = text; svg.appendChild(t);
      };
      lab(2, fmtTime(tl.from) + (tl.clipped ? ' · first data (nothing before it in the range)' : ''), 'start');
      if (tl.clipped) svg.setAttribute('data-clipped', '1');
      lab(W - 2, fmtTime(tl.until), 'end');
      var sel = document.createElementNS(NS, 'rect');
      sel.setAttribute('class', 'sf-tl-sel'); sel.setAttribute('y', '0'); sel.setAttribute('height', String(H - 12));
      sel.setAttribute('width', '0');
      svg.appendChild(sel);
      var x0 = null;
      var toX = function (ev) { var r = svg.getBoundingClientRect(); return Math.max(0, Math.min(W, (ev.clientX - r.left) * W / r.width)); };
      svg.addEventListener('mousedown', function (ev) { x0 = toX(ev); sel.setAttribute('x', String(x0)); sel.setAttribute('width', '0'); });
      svg.addEventListener('mousemove', function (ev) {
        if (x0 === null) return;
        var x = toX(ev); sel.setAttribute('x', String(Math.min(x, x0))); sel.setAttribute('width', String(Math.abs(x - x0)));
      });
      svg.addEventListener('mouseup', function (ev) {
        if (x0 === null) return;
        var x = toX(ev), a = Math.min(x, x0), b = Math.max(x, x0);
        x0 = null;
        if (b - a < 3) { a = Math.max(0, a - bw); b = Math.min(W, b + bw); }  // a click: that bucket
        var span = tl.until - tl.from;
        onSelect(tl.from + span * a / W, tl.from + span * b / W);
      });
      box.appendChild(svg);
    }).catch(function (e) { box.appendChild(errorBox(e.message)); });
  }

  // -- Slow spans ------------------------------------------------------------------------------
  function slowSpans(root) {
    var p = params();
    var state = {service: p.get('service') || '', name: p.get('name') || '',
                 min: p.get('min_duration_ms') || '', range: rangeOf(p)};
    var svc = el('select', {'aria-label': 'Service', class: 'sf-service'});
    var name = el('input', {type: 'text', class: 'sf-name', placeholder: 'span name', 'aria-label': 'Span name', value: state.name});
    var min = el('input', {type: 'number', min: '0', step: 'any', class: 'sf-min', placeholder: 'ms', 'aria-label': 'Minimum duration (ms)', value: state.min});
    var range = rangeSelect(state.range.label, function (v) { setParams({range: v, from: null, until: null}); state.range = rangeOf(params()); load(); });
    var apply = el('button', {type: 'button', class: 'sf-apply', text: 'Apply'});
    var status = el('div', {class: 'sf-status', 'aria-live': 'polite'});
    var table = el('table', {class: 'sf-spans'});
    root.appendChild(el('section', {class: 'sf-toolbar'}, [
      field('Service', svc), field('Name', name), field('Min duration (ms)', min), field('Range', range), apply]));
    root.appendChild(legend());
    root.appendChild(status);
    root.appendChild(table);
    services().then(function (list) {
      svc.appendChild(el('option', {value: '', text: 'all services'}));
      list.forEach(function (s) { svc.appendChild(el('option', {value: s.service, text: s.service, selected: s.service === state.service})); });
    }).catch(function () { svc.appendChild(el('option', {value: '', text: 'all services'})); });
    svc.addEventListener('change', function () { state.service = svc.value; load(); });
    apply.addEventListener('click', function () { state.name = name.value.trim(); state.min = min.value; load(); });
    [name, min].forEach(function (i) { i.addEventListener('keydown', function (ev) { if (ev.key === 'Enter') apply.click(); }); });

    function load() {
      var r = state.range.label === 'custom' ? state.range : rangeOf(params());
      setParams({service: state.service, name: state.name, min_duration_ms: state.min});
      status.textContent = 'Loading…';
      api('/api/spans', {from: r.from.toFixed(3), until: r.until.toFixed(3), service: state.service,
                         name: state.name, min_duration_ms: state.min, limit: 200}).then(function (rows) {
        status.textContent = rows.length ? rows.length + ' slowest spans, ' + fmtTime(r.from) + ' – ' + fmtTime(r.until)
          : 'No spans in this range.';
        clear(table);
        table.appendChild(el('thead', null, [el('tr', null, [
          el('th', {text: 'Span'}), el('th', {class: 'num', text: 'Duration'}), el('th', {text: 'Started'}),
          el('th', {class: 'sf-bd-col', text: 'Where the time went'}), el('th', {text: 'Trace'})])]));
        var body = el('tbody');
        rows.forEach(function (s) {
          var link = el('a', {href: flameLink(s), class: 'sf-span-link', text: s.name});
          var tr = el('tr', {class: 'sf-span-row' + (s.breakdown ? '' : ' sf-pending'), 'data-span-id': s.span_id}, [
            el('td', {class: 'sf-span-name'}, [link, el('div', {class: 'sf-muted', text: s.service + (s.pid ? ' · pid ' + s.pid : '')})]),
            el('td', {class: 'num', text: fmtNs(s.duration_ms * 1e6)}),
            el('td', {class: 'sf-nowrap', text: fmtTime(s.start)}),
            el('td', {class: 'sf-bd-col'}, [breakdownBar(s.breakdown), el('div', {class: 'sf-cause', text: causeOf(s)})]),
            el('td', null, [el('a', {href: '/trace/' + s.trace_id, class: 'sf-trace-link', text: s.trace_id.slice(0, 8) + '…'})])]);
          tr.addEventListener('click', function (ev) {
            if (ev.target.closest('a')) return;
            global.location.href = flameLink(s);
          });
          body.appendChild(tr);
        });
        table.appendChild(body);
        document.body.setAttribute('data-ready', '1');
      }).catch(function (e) { clear(status); status.appendChild(errorBox(e.message)); });
    }
    load();
  }

  // -- Trace view ------------------------------------------------------------------------------
  function traceView(root, traceId) {
    var status = el('div', {class: 'sf-status', text: 'Loading…'});
    root.appendChild(el('h1', {class: 'sf-h1'}, ['Trace ', el('code', {text: traceId})]));
    root.appendChild(legend());
    root.appendChild(status);
    api('/api/trace/' + encodeURIComponent(traceId)).then(function (rows) {
      if (!rows.length) { status.textContent = 'No spans of this trace are stored.'; return; }
      var t0 = Infinity, t1 = -Infinity, byId = {}, kids = {};
      rows.forEach(function (r) { t0 = Math.min(t0, r.start_ns); t1 = Math.max(t1, r.end_ns); byId[r.span_id] = r; });
      var roots = [];
      rows.forEach(function (r) {
        if (r.parent_span_id && byId[r.parent_span_id]) (kids[r.parent_span_id] = kids[r.parent_span_id] || []).push(r);
        else roots.push(r);
      });
      var order = [];
      (function walk(list, depth) {
        list.sort(function (a, b) { return a.start_ns - b.start_ns; }).forEach(function (r) {
          order.push([r, depth]); walk(kids[r.span_id] || [], depth + 1);
        });
      })(roots, 0);
      var total = Math.max(1, t1 - t0);
      status.textContent = rows.length + ' spans · ' + fmtNs(total) + ' · started ' + fmtTime(t0 / 1e9);
      var wf = el('div', {class: 'sf-waterfall'});
      order.forEach(function (pair) {
        var s = pair[0], depth = pair[1];
        var label = el('div', {class: 'sf-wf-label'}, [
          el('a', {href: flameLink(s), class: 'sf-span-link', text: s.name}),
          el('span', {class: 'sf-muted', text: ' ' + fmtNs(s.end_ns - s.start_ns) + ' · ' + s.service})]);
        label.style.paddingLeft = (8 + 14 * Math.min(depth, 30)) + 'px';
        var track = el('div', {class: 'sf-wf-track'});
        var bar = breakdownBar(s.breakdown);
        bar.classList.add('sf-wf-bar');
        bar.style.left = (100 * (s.start_ns - t0) / total).toFixed(3) + '%';
        bar.style.width = Math.max(0.3, 100 * (s.end_ns - s.start_ns) / total).toFixed(3) + '%';
        track.appendChild(bar);
        var row = el('div', {class: 'sf-wf-row', 'data-span-id': s.span_id}, [label, track,
          el('div', {class: 'sf-wf-cause', text: causeOf(s)})]);
        wf.appendChild(row);
      });
      root.appendChild(wf);
      document.body.setAttribute('data-ready', '1');
    }).catch(function (e) { clear(status); status.appendChild(errorBox(e.message)); });
  }

  // -- Span flame graph ------------------------------------------------------------------------
  function spanFlame(root) {
    var p = params();
    var spanId = p.get('span_id') || '', traceId = p.get('trace_id') || '';
    var header = el('section', {class: 'sf-span-header'});
    var toolbar = el('section', {class: 'sf-toolbar'});
    var status = el('div', {class: 'sf-status', 'aria-live': 'polite'});
    var chart = el('div', {class: 'sf-flame'});
    root.appendChild(header);
    root.appendChild(toolbar);
    root.appendChild(status);
    root.appendChild(chart);
    if (!spanId) {
      status.appendChild(errorBox('Open a span: /flamegraph?trace_id=…&span_id=… (from a trace view or the slow-span list).'));
      return;
    }
    var mode = p.get('descendants') === '1' ? '1' : '0';
    var compare = p.get('compare') === '1';
    var only = el('input', {type: 'radio', name: 'sf-scope', value: '0', checked: mode === '0', id: 'sf-scope-0'});
    var desc = el('input', {type: 'radio', name: 'sf-scope', value: '1', checked: mode === '1', id: 'sf-scope-1'});
    var cmp = el('input', {type: 'checkbox', id: 'sf-compare', checked: compare});
    var dl = el('span', {class: 'sf-downloads'});
    toolbar.appendChild(el('span', {class: 'sf-field sf-scope', role: 'radiogroup', 'aria-label': 'Scope'}, [
      only, el('label', {for: 'sf-scope-0', text: 'This span only'}),
      desc, el('label', {for: 'sf-scope-1', text: 'With its descendants'})]));
    var cmpLabel = el('label', {for: 'sf-compare', class: 'sf-compare-label', text: 'Compare with other spans of this name'});
    toolbar.appendChild(el('span', {class: 'sf-field'}, [cmp, cmpLabel]));
    toolbar.appendChild(dl);
    var fg = null, type = p.get('type') || '';
    [only, desc].forEach(function (r) { r.addEventListener('change', function () { mode = r.value; load(); }); });
    cmp.addEventListener('change', function () { compare = cmp.checked; load(); });

    function q() {
      return {trace_id: traceId, span_id: spanId, from: p.get('from'), until: p.get('until'),
              descendants: mode === '1' ? 1 : '', type: 'all'};
    }
    function showSpan(s) {
      clear(header);
      if (!s) {
        header.appendChild(el('h1', {class: 'sf-h1'}, ['Span ', el('code', {text: spanId})]));
        return;
      }
      cmpLabel.textContent = 'Compare with other “' + s.name + '” spans (average)';
      header.appendChild(el('h1', {class: 'sf-h1'}, [el('span', {class: 'sf-span-title', text: s.name}),
        el('span', {class: 'sf-muted', text: ' · ' + s.service})]));
      header.appendChild(el('div', {class: 'sf-span-meta'}, [
        el('span', {text: fmtNs(s.duration_ms * 1e6)}), ' · started ' + fmtTime(s.start) + ' · ',
        el('a', {href: '/trace/' + s.trace_id, class: 'sf-trace-link', text: 'trace ' + s.trace_id}), ' · ',
        el('a', {href: '/spans?' + query({service: s.service, name: s.name}), text: 'slowest “' + s.name + '” spans'})]));
      header.appendChild(el('div', {class: 'sf-span-bd'}, [breakdownBar(s.breakdown),
        el('div', {class: 'sf-cause', text: causeOf(s)})]));
      header.appendChild(legend());
    }
    function load() {
      var params_ = q();
      setParams({descendants: params_.descendants, compare: compare ? 1 : '', type: type});
      clear(dl);
      dl.appendChild(el('a', {href: downloadUrl('/api/flamegraph', Object.assign({}, params_, {format: 'pprof'})), download: 'span.pb.gz', text: 'pprof'}));
      dl.appendChild(el('a', {href: downloadUrl('/api/flamegraph', Object.assign({}, params_, {format: 'speedscope'})), download: 'span.speedscope.json', text: 'speedscope'}));
      status.textContent = 'Loading…';
      var t0 = performance.now();
      api('/api/flamegraph', Object.assign({}, params_, {compare: compare ? 1 : ''})).then(function (data) {
        var fetchMs = performance.now() - t0;
        showSpan(data.span);
        var total = 0;
        data.types.forEach(function (t) { total += t.total; });
        var msg = total ? '' : 'No samples for this span (yet): the agent writes a window shortly after it ends, once its spans have arrived.';
        if (compare) msg += (msg ? ' ' : '') + (data.baseline_spans ? 'Red: more than the average of ' + data.baseline_spans +
          ' other spans of this name; blue: less.' : 'No other spans of this name in range to compare with.');
        status.textContent = msg;
        var opts = {type: type || undefined, onTypeChange: function (t) {
          // Only a choice away from the span's own default type goes into the address.
          var def = fg ? fg.data.default : data.default;
          type = t === def ? '' : t;
          setParams({type: type});
        }};
        if (!fg) fg = FG.create(chart, data, opts);
        else { fg.opts.type = type || undefined; fg.setData(data); }
        global.flamegraph = fg;
        global.spanflameTimings = {fetchMs: fetchMs, renderMs: fg.renderMs, readyMs: performance.now()};
        document.body.setAttribute('data-ready', '1');
      }).catch(function (e) { clear(status); status.appendChild(errorBox(e.message)); });
    }
    load();
  }

  // -- what the agent runs below what was asked: shown on every page, never hidden ----------
  var infoCache = null;
  function agentInfo() {
    if (!infoCache) infoCache = api('/api/info').catch(function () { return {}; });
    return infoCache;
  }

  function degradedBanner(root) {
    agentInfo().then(function (info) {
      var items = info.degraded || [];
      if (!items.length) return;
      var box = el('div', {class: 'sf-degraded', role: 'status'}, [
        el('strong', {text: 'Running below what was asked: '})]);
      var ul = el('ul');
      items.forEach(function (t) { ul.appendChild(el('li', {text: t})); });
      box.appendChild(ul);
      root.insertBefore(box, root.firstChild);
    });
  }

  /* Where one process's stacks come from: the kernel walker, or py-spy and why. */
  function sourceText(info, pid) {
    var s = info.sources && info.sources[String(pid)];
    if (!s) return '';
    if (s.sampler === 'bpf') return 'stacks: kernel walker (every sample and wait on its exact stack)';
    return 'stacks: ' + s.sampler + (s.why ? ' (' + s.why + ')' : '');
  }

  // -- router ------------------------------------------------------------------------------------
  function main() {
    var root = document.getElementById('app');
    clear(root);
    var path = global.location.pathname;
    var nav = path === '/' || path === '/explore' ? 'explore' : path === '/spans' ? 'spans' : '';
    Array.prototype.forEach.call(document.querySelectorAll('[data-nav]'), function (a) {
      if (a.getAttribute('data-nav') === nav) a.classList.add('active');
    });
    if (path === '/' || path === '/explore') explore(root);
    else if (path === '/spans') slowSpans(root);
    else if (path.indexOf('/trace/') === 0) traceView(root, decodeURIComponent(path.slice(7)));
    else if (path === '/flamegraph') spanFlame(root);
    else root.appendChild(errorBox('No such page.'));
    degradedBanner(root);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', main);
  else main();
})(window);
