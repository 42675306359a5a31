// The usage dashboard's charts: each `.chart` element names, in `data-spec`, the figures
// (rows in the page's JSON block) and the column it draws; lines are by the rows' `series`
// column, or one line per figure when the spec gives a label. Drawn with uPlot (vendored).
(function () {
  "use strict";
  var figures = JSON.parse(document.getElementById("figures").textContent);
  var palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
    "#ca8a04", "#db2777", "#4b5563"];
  var MAX_LINES = 8;

  function dayOf(text) {
    return Date.parse(text + "T00:00:00Z") / 1000;
  }

  function total(line) {
    var sum = 0;
    Object.keys(line).forEach(function (t) { sum += Math.abs(line[t] || 0); });
    return sum;
  }

  function draw(el) {
    var spec = JSON.parse(el.getAttribute("data-spec"));
    var lines = {};
    var days = {};
    var zero = false;
    spec.forEach(function (s) {
      zero = zero || !!s.zero;
      (figures[s.figure] || []).forEach(function (row) {
        var t = dayOf(row.day);
        days[t] = true;
        var v = row[s.value];
        if (v === null || v === undefined) { return; }
        var label = s.label || String(row.series);
        lines[label] = lines[label] || {};
        lines[label][t] = (lines[label][t] || 0) + Number(v);
      });
    });
    var xs = Object.keys(days).map(Number).sort(function (a, b) { return a - b; });
    var labels = Object.keys(lines).sort(function (a, b) { return total(lines[b]) - total(lines[a]); });
    if (xs.length === 0 || labels.length === 0) {
      el.textContent = "Nothing in this period.";
      el.setAttribute("data-rendered", "empty");
      return;
    }
    // The largest lines, and the rest summed as "other".
    if (labels.length > MAX_LINES) {
      var other = {};
      labels.slice(MAX_LINES - 1).forEach(function (l) {
        Object.keys(lines[l]).forEach(function (t) { other[t] = (other[t] || 0) + lines[l][t]; });
      });
      labels = labels.slice(0, MAX_LINES - 1);
      lines.other = other;
      labels.push("other");
    }
    var data = [xs];
    var series = [{}];
    labels.forEach(function (label, i) {
      data.push(xs.map(function (t) {
        var v = lines[label][t];
        return v === undefined ? (zero ? 0 : null) : v;
      }));
      series.push({ label: label, stroke: palette[i % palette.length], width: 2,
        points: { show: xs.length < 32 } });
    });
    var width = Math.max(el.clientWidth || 0, 320);
    new uPlot({ width: width, height: 220, series: series, scales: { x: { time: true } },
      axes: [{}, { size: 72 }] }, data, el);
    el.setAttribute("data-rendered", String(labels.length));
  }

  var charts = document.querySelectorAll(".chart");
  for (var i = 0; i < charts.length; i++) {
    try {
      draw(charts[i]);
    } catch (e) {
      charts[i].textContent = "This chart could not be drawn: " + e;
      charts[i].setAttribute("data-rendered", "error");
    }
  }
  document.body.setAttribute("data-charts", "done");
})();
