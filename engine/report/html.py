"""One self-contained HTML page of a ``ReportData``: inline CSS and JS, no network.

Thumbnails are inline JPEG data URIs, curves inline SVG drawn by matplotlib, tables
sortable by a click on their header (a few lines of inline JS). Every string that comes
from the data (class names, paths, search parameters) is escaped: a class folder named
``<script>`` shows as text.
"""
from __future__ import annotations

import html
import io
import math
import re
from typing import Any, Iterable, Mapping, Sequence

from .. import __version__
from .data import ReportData, table_rows

__all__ = ["render", "GENERATOR"]

GENERATOR = f"deeptransfer report {__version__}"
MAX_TABLE_ROWS = 500  # search results shown (the best first); the rest are in its own files

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none;background:#f6f6f6;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.scroll{max-height:520px;overflow:auto;border:1px solid #eee;display:inline-block}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;width:120px;font-size:11px;word-wrap:break-word}
figure.thumb img,figure.thumb .noimg{width:96px;height:96px;object-fit:contain;background:#f3f3f3;display:block}
figure.thumb .noimg{display:flex;align-items:center;justify-content:center;color:#999}
.bad{color:#b00}.ok{color:#070}td .gallery figure.thumb{width:100px}
svg{max-width:100%;height:auto}
"""

# sorts a table by the clicked column: numbers by data-v, text otherwise; toggles the order
JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,col){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      function key(r){var c=r.cells[col];var v=c.getAttribute('data-v');
        return v===null?c.textContent:(v===''?NaN:parseFloat(v));}
      rows.sort(function(a,b){var x=key(a),y=key(b),r;
        if(typeof x==='number'&&typeof y==='number'){
          if(isNaN(x))return 1;if(isNaN(y))return -1;r=x-y;}
        else{r=String(x).localeCompare(String(y));}
        return asc?r:-r;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def e(x: Any) -> str:
    """Escaped text of any value."""
    return html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "–"
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _num_cell(v: Any, digits: int = 3) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        dv = "" if (isinstance(v, float) and not math.isfinite(v)) else repr(float(v))
        return f'<td class="n" data-v="{dv}">{e(fmt(v, digits))}</td>'
    return f"<td>{e(fmt(v, digits))}</td>"


def _table(tid: str, header: Sequence[str], rows: Iterable[Sequence[str]],
           numeric: Sequence[bool]) -> str:
    ths = "".join(f'<th class="{"n" if n else ""}" scope="col">{e(h)}</th>'
                  for h, n in zip(header, numeric))
    body = "\n".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table id="{e(tid)}" class="sortable"><thead><tr>{ths}'
            f"</tr></thead><tbody>\n{body}\n</tbody></table></div>")


def _thumb(data: ReportData, item: Mapping[str, Any], caption: str) -> str:
    uri = data.thumbs.get(int(item["row"]))
    path = str(item["path"])
    img = (f'<img src="{e(uri)}" alt="{e(path)}" loading="lazy">' if uri else
           '<div class="noimg">no image</div>')
    return (f'<figure class="thumb" data-row="{int(item["row"])}" title="{e(path)}">{img}'
            f"<figcaption>{caption}</figcaption></figure>")


def _caption(data: ReportData, item: Mapping[str, Any], given: str = "label") -> str:
    c = data.classes
    cls = "ok" if item["pred"] == item["label"] else "bad"
    return (f'{given}: <b>{e(c[item["label"]])}</b> ({fmt(item["p_label"], 2)})<br>'
            f'<span class="{cls}">pred: {e(c[item["pred"]])}</span> ({fmt(item["p_pred"], 2)})')


def _gallery(gid: str, data: ReportData, items: Sequence[Mapping[str, Any]], given: str = "label"
             ) -> str:
    if not items:
        return f'<p id="{e(gid)}" class="gallery muted">none</p>'
    figs = "".join(_thumb(data, it, _caption(data, it, given)) for it in items)
    return f'<div id="{e(gid)}" class="gallery">{figs}</div>'


# -- curves (matplotlib, as SVG) ----------------------------------------------------------------

def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "deeptransfer"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE


def _figure(w: float = 7.5, h: float = 3.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))  # no pyplot: no global state
    FigureCanvasAgg(fig)
    return fig


def training_svg(data: ReportData) -> str:
    """Score (loss) vs iteration, raw and smoothed, with validation accuracy per epoch."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    it = [r["iteration"] for r in data.rounds]
    ax.plot(it, [r["loss"] for r in data.rounds], color="#9bbbe0", lw=0.8, label="loss")
    ax.plot(it, [r["smoothed"] for r in data.rounds], color="#1f4e9c", lw=1.6,
            label="loss (smoothed)")
    ax.set_xlabel("iteration (minibatches per worker)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    val = [(ep["iteration"], ep["val_top1"]) for ep in data.epochs
           if isinstance(ep.get("val_top1"), (int, float)) and "iteration" in ep]
    handles, labels = ax.get_legend_handles_labels()
    if val:
        ax2 = ax.twinx()
        (h,) = ax2.plot([v[0] for v in val], [v[1] for v in val], "o-", color="#c05000",
                        ms=3, lw=1, label="val top-1")
        ax2.set_ylabel("validation top-1")
        handles.append(h)
        labels.append("val top-1")
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    return _svg(fig)


CURVE_X = ("per_class", "size", "fraction", "n_train", "train_size", "train_sizes")


def curve_points(curve: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(x key, points, series names) of a learning curve file: a list of objects under
    ``points`` / ``results`` / ``curve``, each with an x key (``CURVE_X``) and ``NAME_mean``
    (+ ``NAME_std``) values."""
    pts: list[Any] = []
    for k in ("points", "results", "curve", "rows"):
        if isinstance(curve.get(k), list):
            pts = [p for p in curve[k] if isinstance(p, Mapping)]
            break
    xkey = next((k for k in CURVE_X if pts and all(k in p for p in pts)), "")
    series = sorted({k[:-5] for p in pts for k in p if k.endswith("_mean")})
    return xkey, pts, series


def curve_svg(curve: Mapping[str, Any]) -> str:
    xkey, pts, series = curve_points(curve)
    fig = _figure(6.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    pts = sorted(pts, key=lambda p: float(p[xkey]))
    x = [float(p[xkey]) for p in pts]
    for s in series:
        y = [float(p.get(f"{s}_mean", math.nan)) for p in pts]
        sd = [float(p.get(f"{s}_std", 0.0) or 0.0) for p in pts]
        ax.plot(x, y, "o-", ms=3, label=s)
        ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                        alpha=0.2)
    ax.set_xlabel(xkey.replace("_", " "))
    ax.set_ylabel(str(curve.get("metric", "accuracy")))
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _svg(fig)


# -- the page -----------------------------------------------------------------------------------

def _headline(data: ReportData) -> str:
    h = data.headline
    names = [("n", "images"), ("top1", "top-1"), (f"top{h.get('top_k', 5)}",
                                                   f"top-{h.get('top_k', 5)}"),
             ("mean_per_class", "mean per-class"), ("macro_f1", "macro F1"), ("loss", "loss")]
    cards = "".join(f'<div class="card"><span class="muted">{e(label)}</span>'
                    f'<b data-key="{e(k)}">{e(fmt(h.get(k)))}</b></div>'
                    for k, label in names if k in h)
    return f'<div class="cards" id="headline">{cards}</div>'


def _per_class(data: ReportData) -> str:
    rows = ([f"<td>{e(r['class'])}</td>", _num_cell(r["precision"]), _num_cell(r["recall"]),
             _num_cell(r["f1"]), _num_cell(r["support"])] for r in data.per_class)
    return _table("per-class", ["class", "precision", "recall", "F1", "support"], rows,
                  [False, True, True, True, True])


def _pairs(data: ReportData) -> str:
    if not data.pairs:
        return '<p class="muted">no mistakes on this split</p>'
    c = data.classes
    rows = []
    for p in data.pairs:
        figs = "".join(_thumb(data, it, f'p={fmt(it["p_pred"], 2)}') for it in p["examples"])
        rows.append([f"<td>{e(c[p['true']])}</td>", f"<td>{e(c[p['pred']])}</td>",
                     _num_cell(p["count"]), _num_cell(p["share"]),
                     f'<td><div class="gallery">{figs}</div></td>'])
    return _table("pairs", ["true class", "predicted as", "count", "share of class", "examples"],
                  rows, [False, False, True, True, False])


def _search(data: ReportData) -> str:
    s = data.search or {}
    rows = table_rows(s, "results") or table_rows(s, "cv_results") or table_rows(s, "trials")
    out = []
    best = s.get("best") or s.get("best_params") or s.get("best_config")
    if isinstance(best, Mapping):
        flat = ", ".join(f"{e(k)}={e(fmt(v))}" for k, v in best.items()
                         if not isinstance(v, (Mapping, list)))
        out.append(f'<p id="search-best">best: {flat}</p>')
    if rows:
        cols: list[str] = list(dict.fromkeys(k for r in rows for k in r))
        score = next((k for k in ("score", "val_score", "mean_test_score", "val_accuracy")
                      if k in cols), None)
        if score is not None:  # best first; the cap keeps the page small
            rows.sort(key=lambda r: -float(r[score]) if isinstance(r.get(score), (int, float))
                      and math.isfinite(r[score]) else math.inf)
        shown = rows[:MAX_TABLE_ROWS]
        numeric = [all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                       for r in shown if r.get(k) is not None) for k in cols]
        body = ([_num_cell(r.get(k)) if n else f"<td>{e(_plain(r.get(k)))}</td>"
                 for k, n in zip(cols, numeric)] for r in shown)
        out.append(_table("search", cols, body, numeric))
        if len(rows) > len(shown):
            out.append(f'<p class="muted">{len(rows) - len(shown)} more trials in the '
                       f"search's own results file</p>")
    return "\n".join(out) or '<p class="muted">the search results file has no trials</p>'


def _plain(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ",".join(_plain(x) for x in v)
    return fmt(v)


def _curve(data: ReportData) -> str:
    curve = data.curve or {}
    xkey, pts, series = curve_points(curve)
    if not xkey or not pts:
        return '<p class="muted">the learning curve file has no points</p>'
    cols = [xkey] + [f"{s}_{k}" for s in series for k in ("mean", "std")]
    body = ([_num_cell(p.get(c), 4) for c in cols] for p in sorted(pts, key=lambda p: p[xkey]))
    return curve_svg(curve) + _table("curve", cols, body, [True] * len(cols))


_ID = re.compile(r"[^a-z0-9-]+")


def render(data: ReportData) -> str:
    """The whole page as a string."""
    sections: list[tuple[str, str, str]] = [
        ("per-class-section", "Per class", "<p class='muted'>click a column to sort</p>"
         + _per_class(data)),
        ("pairs-section", "Most confused pairs",
         f"<p class='muted'>the {len(data.pairs)} most frequent (true, predicted) mistakes on "
         f"the {e(data.split)} split</p>" + _pairs(data)),
        ("top-losses-section", "Top losses (confidently wrong)",
         _gallery("top-losses", data, data.top_losses)),
        ("low-margin-section", "Difficult (lowest margin between the two best classes)",
         _gallery("low-margin", data, data.low_margin)),
    ]
    if data.label_errors is not None:
        acc = "" if data.oof_accuracy is None else \
            f"; out-of-fold accuracy {fmt(data.oof_accuracy)}"
        sections.append((
            "label-errors-section", "Suspected label errors (train split)",
            f"<p class='muted' id='label-error-count' data-count='{data.label_error_count}'>"
            f"{data.label_error_count} suspects by confident learning on out-of-fold "
            f"probabilities{acc}; the {len(data.label_errors)} least likely labels shown</p>"
            + _gallery("label-errors", data, data.label_errors, given="given")))
    if data.rounds:
        sections.append(("training-section", "Score vs iteration",
                         f'<div id="training-curve">{training_svg(data)}</div>'))
    if data.curve is not None:
        sections.append(("curve-section", "Learning curve", _curve(data)))
    if data.search is not None:
        sections.append(("search-section", "Search results", _search(data)))
    nav = " · ".join(f'<a href="#{s[0]}">{e(s[1].split(" (")[0])}</a>' for s in sections)
    body = "\n".join(f'<section id="{_ID.sub("-", sid)}"><h2>{e(title)}</h2>\n{content}'
                     f"</section>" for sid, title, content in sections)
    opts = data.training
    head = (opts.get("head") or {}) if isinstance(opts.get("head"), Mapping) else {}
    optim = (opts.get("optimizer") or {}) if isinstance(opts.get("optimizer"), Mapping) else {}
    about = (f"{len(data.classes)} classes · head {e(head.get('kind', '?'))} · optimizer "
             f"{e(optim.get('name', '?'))} lr {e(fmt(optim.get('lr')))} · epochs "
             f"{e(opts.get('epochs', '?'))} · model {e(data.model_dir)} · store "
             f"{e(data.store_url)}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="{e(GENERATOR)}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(data.title)}</title>
<style>{CSS}</style></head>
<body>
<h1>{e(data.title)}</h1>
<p class="muted">{about}</p>
{_headline(data)}
<nav>{nav}</nav>
{body}
<script>{JS}</script>
</body></html>
"""
