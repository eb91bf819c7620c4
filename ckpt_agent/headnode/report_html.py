"""`ckpt report --html FILE`: the report as one self-contained HTML page (inline CSS and SVG; no scripts, no external
fonts, images or style sheets), for one job or a period.

It presents what report.build_report computed (segments, work lost, costs, summary) and adds, from the same
events, the instants the text report only counts: checkpoints (ticks), interruption notices and restores. Sections:
  - summary figures;
  - cumulative Spot cost against what On-Demand would have cost, over time (each segment's cost counted at its end);
  - a timeline per job on one time axis: a bar per run segment on its node (coloured by how it ended), checkpoints as
    ticks, notices as red markers, restores as green markers, work lost shaded;
  - a table of jobs.
Sizes stay small: one path of relative moves per job for its ticks (at most one per pixel), short class names, no
per-element styles (1,000 jobs < 1 MiB).
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any, Dict, List, Optional, Tuple

from ckpt_agent.headnode.report import hours, parse_time, usd
from ckpt_agent.store import event_names as ev
from ckpt_agent.util.units import human_bytes

ROW = 18  # timeline row height, px
LEFT = 110  # room for job ids
WIDTH = 1100  # drawing width of the SVGs, px

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}.sub{color:#5b6672;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d7dde3;border-radius:6px;padding:8px 14px;
min-width:120px}.card b{display:block;font-size:20px}.card span{color:#5b6672;font-size:12px}
table{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid #e6eaee;text-align:right;white-space:nowrap}
th{background:#f3f5f7;position:sticky;top:0}td:first-child,th:first-child,td.l{text-align:left}
svg{display:block;max-width:100%;height:auto}svg text{font-size:11px;fill:#3b4550}
.ax{stroke:#c4ccd4;stroke-width:1}.gr{stroke:#eef1f4}.c{fill:#2e9e5b}.i{fill:#e8913a}.f{fill:#b3261e}
.r{fill:#3b7dd8}.x{fill:#9aa5b1}.lo{fill:url(#h)}.tk{stroke:#1d232a;stroke-width:1.2;stroke-opacity:.7}.n{fill:#d62828}
.nl{font-size:9px;fill:#fff;paint-order:stroke;stroke:rgba(0,0,0,.35);stroke-width:2px}
.rs{fill:#1b7f3b;stroke:#fff;stroke-width:.8}.sp{fill:none;stroke:#e8913a;stroke-width:2.2}
.od{fill:none;stroke:#3b7dd8;stroke-width:2.2;stroke-dasharray:6 3}.lg{display:flex;gap:16px;flex-wrap:wrap;
font-size:12px;color:#3b4550;margin:6px 0}.lg i{display:inline-block;width:14px;height:10px;margin-right:5px;
vertical-align:-1px}.bad{color:#b3261e}
"""

CLASS_OF = {"completed": "c", "interrupted": "i", "failed": "f", "running": "r", "lost": "x"}


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_time(t: dt.datetime, span: float) -> str:
    return t.strftime("%m-%d %H:%M" if span < 3 * 86400 else "%Y-%m-%d")


def instants(events: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, List[dt.datetime]]]:
    """{job id: {"checkpoint": [...], "notice": [...], "restore": [...]}} from the events."""
    kinds = {ev.CHECKPOINT_COMMITTED: "checkpoint", ev.NOTICE_RECEIVED: "notice", ev.RESTORED: "restore"}
    out: Dict[str, Dict[str, List[dt.datetime]]] = {}
    for job_id, evs in events.items():
        got: Dict[str, List[dt.datetime]] = {"checkpoint": [], "notice": [], "restore": []}
        for e in evs:
            kind = kinds.get(e.get("event"))
            t = parse_time(e.get("time")) if kind else None
            if t is not None:
                got[kind].append(t)
        out[job_id] = got
    return out


def cost_series(report: Dict[str, Any]) -> List[Tuple[dt.datetime, float, float]]:
    """(time, cumulative Spot, cumulative On-Demand) at each priced segment's end, in time order."""
    points = []
    for job in report["jobs"]:
        for step in job["steps"]:
            for s in step["segments"]:
                end = parse_time(s["end"])
                if end is not None and s["spot_cost"] is not None and s["ondemand_cost"] is not None:
                    points.append((end, s["spot_cost"], s["ondemand_cost"]))
    points.sort(key=lambda p: p[0])
    out, spot, od = [], 0.0, 0.0
    for t, sp, o in points:
        spot += sp
        od += o
        out.append((t, spot, od))
    return out


class _Scale:
    def __init__(self, t0: dt.datetime, t1: dt.datetime, x0: float, x1: float):
        self.t0, self.x0, self.x1 = t0, x0, x1
        self.span = max(1.0, (t1 - t0).total_seconds())

    def __call__(self, t: dt.datetime) -> float:
        return round(self.x0 + (t - self.t0).total_seconds() / self.span * (self.x1 - self.x0), 1)


def _time_axis(scale: _Scale, y: float, top: float, n: int = 6) -> str:
    parts = []
    for k in range(n + 1):
        t = scale.t0 + dt.timedelta(seconds=scale.span * k / n)
        x = scale(t)
        anchor = "start" if k == 0 else "end" if k == n else "middle"
        parts.append(f'<line class="gr" x1="{x}" x2="{x}" y1="{top}" y2="{y}"/>'
                     f'<text x="{x}" y="{y + 14}" text-anchor="{anchor}">{_fmt_time(t, scale.span)}</text>')
    return "".join(parts)


def cost_chart(report: Dict[str, Any]) -> str:
    series = cost_series(report)
    h, top, bottom, left, right = 260, 12, 228, 70, WIDTH - 20
    if not series:
        return '<p class="sub" id="cost-none">No priced segments: add prices (ckpt prices) to see costs.</p>'
    t0 = min(parse_time(s["start"]) for j in report["jobs"] for st in j["steps"] for s in st["segments"]
             if s["spot_cost"] is not None)
    t1 = series[-1][0]
    scale = _Scale(t0, t1 if t1 > t0 else t0 + dt.timedelta(seconds=1), left, right)
    ymax = max(series[-1][1], series[-1][2]) or 1.0
    ymax *= 1.08

    def y(v: float) -> float:
        return round(bottom - v / ymax * (bottom - top), 1)

    out = [f'<svg id="cost-chart" viewBox="0 0 {WIDTH} {h}" width="{WIDTH}" height="{h}" role="img" '
           f'aria-label="cumulative Spot cost against On-Demand">']
    for k in range(5):
        v = ymax / 1.08 * k / 4
        out.append(f'<line class="gr" x1="{left}" x2="{right}" y1="{y(v)}" y2="{y(v)}"/>'
                   f'<text x="{left - 6}" y="{y(v) + 4}" text-anchor="end">{_esc(usd(v))}</text>')
    out.append(_time_axis(scale, bottom, top))
    out.append(f'<line class="ax" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>')
    for cls, idx in (("od", 2), ("sp", 1)):
        pts = [f"{scale(t0)},{y(0)}"]
        for p in series:
            pts.append(f"{scale(p[0])},{y(p[idx])}")
        out.append(f'<polyline class="{cls}" points="{" ".join(pts)}"/>')
    last = series[-1]
    out.append(f'<text x="{right}" y="{y(last[2]) - 6}" text-anchor="end">On-Demand {_esc(usd(last[2]))}</text>'
               f'<text x="{right}" y="{y(last[1]) + 16}" text-anchor="end">Spot {_esc(usd(last[1]))}</text>')
    out.append("</svg>")
    return "".join(out)


def timeline(report: Dict[str, Any], marks: Dict[str, Dict[str, List[dt.datetime]]]) -> str:
    jobs = report["jobs"]
    rows: List[Tuple[Dict[str, Any], str, List[Dict[str, Any]]]] = []
    for job in jobs:
        for step in job["steps"]:
            rows.append((job, step["step"], step["segments"]))
    times = [parse_time(s[k]) for _, _, segs in rows for s in segs for k in ("start", "end") if s[k]]
    if not times:
        return '<p class="sub" id="timeline-none">No run segments recorded.</p>'
    t0, t1 = min(times), max(times)
    if t1 <= t0:
        t1 = t0 + dt.timedelta(seconds=1)
    right = WIDTH - 10
    scale = _Scale(t0, t1, LEFT, right)
    h = 24 + ROW * len(rows)
    out = [f'<svg id="timeline" viewBox="0 0 {WIDTH} {h}" width="{WIDTH}" height="{h}" role="img" '
           'aria-label="run segments per job"><defs><pattern id="h" width="6" height="6" '
           'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#f4c7c3"/>'
           '<line x1="0" y1="0" x2="0" y2="6" stroke="#b3261e" stroke-width="2.2"/></pattern></defs>']
    out.append(_time_axis(scale, h - 22, 0))
    seen_job = set()
    for i, (job, step, segs) in enumerate(rows):
        top = i * ROW + 3
        label = job["job_id"] if len(job["steps"]) == 1 else f"{job['job_id']}.{step}"
        labels: List[str] = []
        out.append(f'<g class="job" data-job="{_esc(job["job_id"])}"><text x="{LEFT - 6}" y="{top + 11}" '
                   f'text-anchor="end">{_esc(label)}</text>')
        for s in segs:
            start, end = parse_time(s["start"]), parse_time(s["end"]) or parse_time(s["start"])
            x0, x1 = scale(start), scale(end)
            w = max(1.5, round(x1 - x0, 1))
            out.append(f'<rect class="seg {CLASS_OF.get(s["ended"], "x")}" x="{x0}" y="{top}" width="{w}" '
                       f'height="{ROW - 6}"><title>{_esc(s["node"])} {_esc(s["instance_type"] or "")}: '
                       f'{_esc(s["ended"])}, {hours(s["seconds"])}</title></rect>')
            if s["work_lost_seconds"]:
                lx = scale(end - dt.timedelta(seconds=s["work_lost_seconds"]))
                out.append(f'<rect class="lo" x="{lx}" y="{top}" width="{max(1.5, round(x1 - lx, 1))}" '
                           f'height="{ROW - 6}"/>')
            if w > 50:  # the node's name, its distinctive end when the bar is short
                labels.append(f'<text class="nl" x="{x0 + 4}" y="{top + 9.5}">'
                              f'{_esc(s["node"][-max(3, int((w - 8) / 5.2)):])}</text>')
        if job["job_id"] not in seen_job:  # job-level instants go on the job's first row
            seen_job.add(job["job_id"])
            m = marks.get(job["job_id"], {})
            xs = sorted({round(scale(t)) for t in m.get("checkpoint", [])})  # one tick per pixel at most
            if xs:
                h_ = ROW - 4
                ticks = f"M{xs[0]} {top - 1}v{h_}" + "".join(f"m{b - a}-{h_}v{h_}" for a, b in zip(xs, xs[1:]))
                out.append(f'<path class="tk" d="{ticks}"/>')
            for t in m.get("notice", []):
                out.append(f'<path class="n" d="M{scale(t)} {top + ROW - 3}l4 -7h-8z"/>')
            for t in m.get("restore", []):
                out.append(f'<circle class="rs" cx="{scale(t)}" cy="{top + (ROW - 6) / 2}" r="3.5"/>')
        out.append("".join(labels) + "</g>")
    out.append(f'<line class="ax" x1="{LEFT}" x2="{right}" y1="{h - 22}" y2="{h - 22}"/></svg>')
    return "".join(out)


LEGEND = ('<div class="lg"><span><i style="background:#2e9e5b"></i>completed</span>'
          '<span><i style="background:#e8913a"></i>interrupted</span><span><i style="background:#b3261e"></i>failed'
          '</span><span><i style="background:#3b7dd8"></i>running</span><span><i style="background:#9aa5b1"></i>'
          'lost</span><span><i style="background:repeating-linear-gradient(45deg,#b3261e 0 2px,#f4c7c3 2px 5px)">'
          '</i>work lost</span><span>| checkpoint</span><span style="color:#d62828">&#9660; notice</span>'
          '<span style="color:#1b7f3b">&#9679; restore</span></div>')


def jobs_table(report: Dict[str, Any]) -> str:
    head = ("Job", "State", "Submitted", "Finished", "Segments", "Interruptions", "Checkpoints", "Written",
            "Restores", "Work lost", "Net runtime", "Wall clock", "Spot", "On-Demand", "Saved")
    out = ['<table id="jobs"><thead><tr>', "".join(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for j in report["jobs"]:
        cells = (j["job_id"], j["state"] or "-", (j["submitted"] or "-").replace("T", " ")[:16],
                 (j["finished"] or "-").replace("T", " ")[:16], j["segments"],
                 f'{j["interruptions"]}' + (f' ({j["finals_skipped"]} final skipped)' if j["finals_skipped"] else ""),
                 j["checkpoints"],
                 human_bytes(j["bytes_written"]), j["restores"], hours(j["work_lost_seconds"]),
                 hours(j["net_runtime_seconds"]), hours(j["wall_clock_seconds"]), usd(j["spot_cost"]),
                 usd(j["ondemand_cost"]), usd(j["savings"]))
        lost = ' class="bad"' if j["work_lost_seconds"] else ""
        out.append("<tr>" + "".join(f"<td{lost if k == 9 else ''}>{_esc(c)}</td>" for k, c in enumerate(cells))
                   + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cards(s: Dict[str, Any]) -> str:
    pct = f" ({s['savings_percent']:.0f}%)" if s["savings_percent"] is not None else ""
    items = (("jobs", s["jobs"]), ("interruptions", s["interruptions"]), ("checkpoints", s["checkpoints"]),
             ("restores", s["restores"]), ("work lost", f"{s['work_lost_hours']:.2f} h"),
             ("net runtime", f"{s['net_runtime_hours']:.2f} h"), ("Spot", usd(s["spot_cost"])),
             ("On-Demand", usd(s["ondemand_cost"])), ("saved", usd(s["savings"]) + pct))
    if s.get("finals_skipped"):
        items = items[:2] + (("finals skipped", s["finals_skipped"]),) + items[2:]
    return '<div class="cards" id="summary">' + "".join(
        f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for k, v in items) + "</div>"


def render_html(report: Dict[str, Any], events: Dict[str, List[Dict[str, Any]]], title: Optional[str] = None) -> str:
    s = report["summary"]
    what = title or (f"job {report['jobs'][0]['job_id']}" if len(report["jobs"]) == 1 else f"{s['jobs']} jobs")
    period = f"{(s['from'] or '-').replace('T', ' ')} to {(s['to'] or '-').replace('T', ' ')}"
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>ckpt report: {_esc(what)}</title><style>{CSS}</style></head><body>",
        f"<h1>ckpt report: {_esc(what)}</h1>",
        f'<p class="sub">{_esc(period)}; generated {_esc((report["generated"] or "").replace("T", " "))}</p>',
        _cards(s),
        "<h2>Cumulative cost: Spot against On-Demand</h2>",
        '<div class="lg"><span><i style="background:#e8913a"></i>Spot (what was paid)</span><span>'
        '<i style="background:#3b7dd8"></i>On-Demand (the same net runtime, uninterrupted)</span></div>',
        cost_chart(report),
        "<h2>Timeline</h2>", LEGEND, timeline(report, instants(events)),
        "<h2>Jobs</h2>", jobs_table(report),
        "</body></html>\n",
    ])
