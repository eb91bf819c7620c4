"""`report_html` and `ckpt report --html`: the page is self-contained and carries one bar per run segment, a
tick per checkpoint, markers for notices and restores, shaded work lost, a row per job and the cost chart; 1,000
jobs stay under 1 MiB; and a real headless Chromium renders it with no console errors (slow: takes a screenshot)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from ckpt_helpers import DATA, REPO

from ckpt_agent import cli
from ckpt_agent.errors import EXIT_STORE
from ckpt_agent.headnode.report import build_report, load_job_events
from ckpt_agent.headnode.report_html import cost_series, render_html
from ckpt_agent.store.generations import CheckpointStore

UTC = dt.timezone.utc
PRICES = {"c6i.large": {"spot": 0.03, "ondemand": 0.085}, "m6i.large": {"spot": 0.04, "ondemand": 0.096},
          "r6i.2xlarge": {"spot": 0.19, "ondemand": 0.504}}
ROOT = REPO


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def synthetic_events(n_jobs: int, start: dt.datetime) -> dict:
    """Jobs of 1-3 segments: periodic checkpoints every 15 min; a segment that is interrupted gets a notice and a
    final checkpoint (or, every third one, a failed final checkpoint: work lost); the next segment is a restore."""
    types = list(PRICES)
    out = {}
    for j in range(n_jobs):
        job = str(7000 + j)
        t = start + dt.timedelta(minutes=37 * j)
        evs = []
        segments = 1 + j % 3
        gen = 0
        for k in range(segments):
            node = f"spot-dy-nodes-{(j + k) % 9 + 1}"
            inst = {"instance_id": f"i-0{j:07x}{k:09x}", "instance_type": types[(j + k) % len(types)]}
            how = "restored" if k else "launched"
            if k:
                evs.append({"event": "restored", "time": _iso(t), "job_id": job, "node": node, "step": "main",
                            "generation": gen, "seconds": 12.5, **inst})
            evs.append({"event": "segment_started", "how": how, "time": _iso(t), "job_id": job, "node": node,
                        "step": "main", **inst})
            length = dt.timedelta(minutes=50 + 13 * ((j * 7 + k) % 9))
            c = t + dt.timedelta(minutes=15)
            while c < t + length:
                gen += 1
                evs.append({"event": "checkpoint_committed", "time": _iso(c), "job_id": job, "node": node,
                            "step": "main", "generation": gen, "final": False, "seconds": 6.0, "frozen_seconds": 2.0,
                            "bytes_written": 300_000_000, "bytes_new": 40_000_000, **inst})
                c += dt.timedelta(minutes=15)
            end = t + length
            if k < segments - 1:
                evs.append({"event": "notice_received", "time": _iso(end - dt.timedelta(minutes=2)), "job_id": job,
                            "node": node, "action": "terminate", **inst})
                if (j + k) % 3:
                    gen += 1
                    evs.append({"event": "checkpoint_committed", "time": _iso(end), "job_id": job, "node": node,
                                "step": "main", "generation": gen, "final": True, "seconds": 30.0,
                                "frozen_seconds": 30.0, "bytes_written": 90_000_000, "bytes_new": 9_000_000, **inst})
                else:
                    evs.append({"event": "checkpoint_failed", "time": _iso(end), "job_id": job, "node": node,
                                "step": "main", "final": True, "error": "criu dump timed out", **inst})
                evs.append({"event": "segment_ended", "how": "interrupted", "time": _iso(end), "job_id": job,
                            "node": node, "step": "main", **inst})
                evs.append({"event": "requeued", "time": _iso(end), "job_id": job, "node": node, **inst})
                t = end + dt.timedelta(minutes=4)
            else:
                evs.append({"event": "segment_ended", "how": "completed", "time": _iso(end), "job_id": job,
                            "node": node, "step": "main", "exit_status": 0, **inst})
        out[job] = evs
    return out


def make_store(root: Path, events: dict) -> CheckpointStore:
    root.mkdir(parents=True, exist_ok=True)
    for job, evs in events.items():
        (root / job).mkdir()
        with open(root / job / "events.jsonl", "w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in evs)
    return CheckpointStore(str(root))


class Elements(HTMLParser):
    """Counts elements by tag and class; notes anything that would load from outside the file."""

    def __init__(self):
        super().__init__()
        self.count = {}
        self.external = []
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for cls in [tag] + [f"{tag}.{c}" for c in (a.get("class") or "").split()]:
            self.count[cls] = self.count.get(cls, 0) + 1
        if tag in ("script", "link", "img", "iframe", "object", "embed"):
            self.external.append(tag)
        for k in ("src", "href"):
            if a.get(k):
                self.external.append(a[k])


def parse(text: str) -> Elements:
    p = Elements()
    p.feed(text)
    return p


NOW = dt.datetime(2026, 11, 30, tzinfo=UTC)


def test_page_has_every_part_and_nothing_external(tmp_path):
    events = synthetic_events(12, dt.datetime(2026, 11, 20, tzinfo=UTC))
    report = build_report(events, PRICES, now=NOW)
    page = render_html(report, events)
    p = parse(page)
    segs = sum(len(s["segments"]) for j in report["jobs"] for s in j["steps"])
    assert segs == sum(1 + j % 3 for j in range(12))
    assert p.count["rect.seg"] == segs
    assert p.count["rect.c"] == 12 and p.count["rect.i"] == segs - 12
    checkpoints = sum(1 for evs in events.values() for e in evs if e["event"] == "checkpoint_committed")
    ticks = re.findall(r'<path class="tk" d="([^"]+)"', page)
    assert sum(d.count("M") + d.count("m") for d in ticks) == checkpoints  # a quarter hour is many pixels here
    notices = sum(1 for evs in events.values() for e in evs if e["event"] == "notice_received")
    assert p.count["path.n"] == notices and p.count["circle.rs"] == segs - 12
    lost = sum(1 for j in report["jobs"] for s in j["steps"][0]["segments"] if s["work_lost_seconds"])
    assert lost and p.count["rect.lo"] == lost  # failed final checkpoints lose work since the last periodic one
    assert p.count["tr"] == 12 + 1 and {"summary", "cost-chart", "timeline", "jobs"} <= p.ids
    assert p.count["polyline.sp"] == 1 and p.count["polyline.od"] == 1
    assert p.external == []
    assert "@import" not in page and "url(http" not in page and "@font-face" not in page


def test_cost_series_is_cumulative_and_ends_at_the_summary():
    events = synthetic_events(9, dt.datetime(2026, 11, 20, tzinfo=UTC))
    report = build_report(events, PRICES, now=NOW)
    series = cost_series(report)
    assert [p[0] for p in series] == sorted(p[0] for p in series)
    assert all(b[1] >= a[1] and b[2] >= a[2] for a, b in zip(series, series[1:]))
    assert series[-1][1] == pytest.approx(report["summary"]["spot_cost"], abs=1e-3)
    assert series[-1][2] == pytest.approx(report["summary"]["ondemand_cost"], abs=1e-3)
    assert series[-1][2] > series[-1][1]


def test_thousand_jobs_stay_under_one_mebibyte():
    events = synthetic_events(1000, dt.datetime(2026, 10, 1, tzinfo=UTC))
    page = render_html(build_report(events, PRICES, now=NOW), events)
    size = len(page.encode())
    assert size < 1 << 20, size
    assert parse(page).count["tr"] == 1001


def test_markup_in_names_is_escaped():
    events = synthetic_events(1, dt.datetime(2026, 11, 20, tzinfo=UTC))
    for e in events["7000"]:
        e["node"] = "<script>alert(1)</script>"
    page = render_html(build_report(events, PRICES, now=NOW), events)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_cli_writes_the_page_for_one_job_and_for_a_period(tmp_path, monkeypatch, capsys):
    store = make_store(tmp_path / "store", synthetic_events(5, dt.datetime(2026, 11, 20, tzinfo=UTC)))
    monkeypatch.setenv("CKPT_STORE", store.root)
    monkeypatch.setenv("CKPT_CONFIG", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text("{}\n")
    out = tmp_path / "one.html"
    assert cli.main(["report", "--no-slurm", "--job-id", "7001", "--html", str(out)]) == 0
    page = out.read_text()
    assert "ckpt report: job 7001" in page and parse(page).count["tr"] == 2
    assert cli.main(["report", "--no-slurm", "--since", "2026-11-20", "--html", str(tmp_path / "all.html")]) == 0
    assert parse((tmp_path / "all.html").read_text()).count["tr"] == 6
    capsys.readouterr()
    assert cli.main(["report", "--no-slurm", "--html", str(tmp_path / "no" / "such" / "dir.html")]) == EXIT_STORE
    err = capsys.readouterr().err.strip()
    assert err.startswith("ckpt: --html ") and "\n" not in err


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (scripts/setup-dev.sh installs it)")


def _run_chromium(args, tmp_path):
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--hide-scrollbars"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_headless_chromium_renders_the_page_without_console_errors(tmp_path):
    store = make_store(tmp_path / "store", synthetic_events(14, dt.datetime(2026, 11, 24, 6, tzinfo=UTC)))
    events = load_job_events(store)
    report = build_report(events, PRICES, now=NOW)
    page_path = tmp_path / "report.html"
    page_path.write_text(render_html(report, events, title="cluster eda-spot, 24 Nov 2026"))
    url = page_path.as_uri()

    dom = _run_chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = parse(dom.stdout)
    segs = sum(len(s["segments"]) for j in report["jobs"] for s in j["steps"])
    assert p.count.get("rect.seg") == segs and p.count.get("tr") == 15
    assert {"summary", "cost-chart", "timeline", "jobs"} <= p.ids
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console

    shot = tmp_path / "shot.png"
    run = _run_chromium([f"--screenshot={shot}", "--window-size=1340,1440", url], tmp_path)
    assert run.returncode == 0 and shot.stat().st_size > 20_000, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    keep = os.environ.get("CKPT_REPORT_SCREENSHOT")  # `make screenshot` refreshes docs/report-screenshot.png
    if keep:
        shutil.copyfile(shot, keep)


def test_report_fixture_jobs_render(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    for job in ("5001", "5002", "5003"):
        (root / job).mkdir()
        shutil.copy(DATA / "report" / f"{job}.events.jsonl", root / job / "events.jsonl")
    store = CheckpointStore(str(root))
    events = load_job_events(store)
    page = render_html(build_report(events, PRICES, now=NOW), events)
    assert parse(page).count["tr"] == 4
