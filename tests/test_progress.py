"""Progress when nobody watches a terminal: plain lines at a steady interval, and once at the end."""

from __future__ import annotations

import io

from rich.console import Console

from pktransfer.progress import Progress


def test_plain_lines_without_a_terminal(monkeypatch):
    monkeypatch.setenv("PKT_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    p = Progress(console=Console(file=out, force_terminal=False, width=200))
    with p.task("train", total=4) as advance:
        for i in range(4):
            advance(1, loss=f"{1 / (i + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].startswith("pkt train: 1/4 in ") and "eta" in lines[0] and "loss=1.000" in lines[0]
    assert lines[-1].startswith("pkt train: 4/4") and "loss=0.250" in lines[-1] and "eta" not in lines[-1]


def test_the_interval_spaces_the_lines_and_quiet_silences_them(monkeypatch):
    monkeypatch.setenv("PKT_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=False)).task("eval", total=100) as advance:
        for _ in range(100):
            advance()
    assert out.getvalue().count("pkt eval:") == 1  # only the closing line within the hour
    quiet = io.StringIO()
    with Progress(quiet=True, console=Console(file=quiet, force_terminal=False)).task("eval", total=3) as advance:
        advance()
    assert quiet.getvalue() == ""


def test_a_logged_label_with_brackets_is_printed_as_is():
    out = io.StringIO()
    Progress(console=Console(file=out, force_terminal=False, width=200)).log("compare: cell 3/9: seeking[lr=0.0001], seed 0")
    assert out.getvalue().strip() == "pkt compare: cell 3/9: seeking[lr=0.0001], seed 0"


def test_a_bar_shows_its_label_and_fields_with_brackets_as_is():
    out = io.StringIO()
    p = Progress(console=Console(file=out, force_terminal=True, width=200, color_system=None))
    with p.task("cell seeking[lr=0.0001]", total=2) as advance:
        advance(2, note="[/x]")
    assert "cell seeking[lr=0.0001]" in out.getvalue() and "note=[/x]" in out.getvalue()


def test_a_resumed_task_counts_its_earlier_units_in_the_total_not_in_the_rate(monkeypatch):
    import time

    monkeypatch.setenv("PKT_PROGRESS_INTERVAL", "0")
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=False, width=200)).task("train", total=100, done=90) as advance:
        now[0] = 10.0
        advance()  # step 91 after 10 s: 0.1 steps/s, 9 left
        now[0] = 20.0
        advance()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("pkt train: 91/100 (resumed at 90) in 10 s (0.10/s, eta 90 s)"), lines[0]
    assert lines[-1].startswith("pkt train: 92/100 (resumed at 90) in 20 s (0.10/s, eta 80 s)"), lines[-1]
