"""The human rating page in headless Chromium (Debian's package, driven by
Playwright): a rater votes on 5 pairs, the votes are in SQLite, no pair is
shown twice to the rater, and the report adds the human win rates."""
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eval_pairs import write_eval_pairs
from helpers import REPO, free_port
from misbehaving_judge import MisbehavingJudge

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")]


def _evaluate(data, out, url):
    from aesformer.jobs import evaluate

    return evaluate.main([f"data={data}", f"output={out}", "systems=[identity]", "judge.kind=openai",
                          f"judge.endpoint.base_url={url}", "judge.endpoint.model=judge-4o",
                          "judge.endpoint.api_key_env=null", "judge.both_orders=0.0", "scorers=[]", "n_boot=200"])


def _wait_for(url, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"rate.py exited {proc.returncode}: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s")


def test_a_rater_votes_on_five_pairs_in_chromium_and_the_report_shows_them(tmp_path):
    pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    from playwright.sync_api import sync_playwright

    data = write_eval_pairs(tmp_path / "data", n=3, side=48)
    study = tmp_path / "eval"
    with MisbehavingJudge(winner="A") as judge:
        _evaluate(data, study, judge.base_url)
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "rate.py"), f"study={study}", f"port={port}",
                                 f"output={tmp_path / 'rate'}", "tracking.enabled=false"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        shown = []
        try:
            _wait_for(url, proc)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                page = browser.new_page()
                page.goto(url)
                page.fill("#rater", "rater-7")
                page.click("#start")
                for i, choice in enumerate(["left", "right", "tie", "left", "right"]):
                    page.wait_for_function("document.getElementById('left').complete && "
                                           "document.getElementById('left').naturalWidth > 0")
                    src = page.get_attribute("#left", "src")
                    assert "identity" not in page.content() and "output" not in src and "reference" not in src
                    shown.append(src.split("/")[2])
                    page.click(f"#vote-{choice}")
                    page.wait_for_function(f"document.getElementById('status').textContent.startsWith('{i + 1} votes')")
                # 3 photos x (poor, good) = 6 pairs: one is left, and it is none of those voted on
                page.reload()
                page.fill("#rater", "rater-7")
                page.click("#start")
                page.wait_for_function("document.getElementById('status').textContent.includes('1 pairs left')")
                last = page.get_attribute("#left", "src").split("/")[2]
                assert last not in shown and len(set(shown)) == 5
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        db = sqlite3.connect(study / "evaluation.db")
        votes = db.execute("SELECT rater, pair, left_image, right_image, choice, created FROM votes").fetchall()
        assert len(votes) == 5 and {v[0] for v in votes} == {"rater-7"} and len({v[1] for v in votes}) == 5
        assert sorted(v[4] for v in votes) == sorted(["left", "right", "tie", "left", "right"])
        assert all({v[2], v[3]} == {"output", "reference"} and v[5] > 0 for v in votes)
        assert all(v[1].startswith("identity|") for v in votes)

        again = _evaluate(data, study, judge.base_url)
        assert again["judge_requests"] == 0 and again["votes"] == 5
    md = Path(again["report"]).read_text()
    assert "5 votes from 1 rater" in md
    ident = again["summary"]["systems"]["identity"]
    human = [ident["human_vs_poor"], ident["human_vs_good"]]
    assert sum(h["n"] for h in human if h) == 5
    # the table's human columns (after the judge's win rate against each reference) hold them
    row = next(line for line in md.splitlines() if line.startswith("| Identity (poor photo) | ours |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    shown = [cells[4], cells[6]]
    assert [c for c in shown if c != "n/a"] and all(f"(n={h['n']})" in c for h, c in zip(human, shown) if h)
    assert "5 votes from 1 rater" in Path(again["html"]).read_text()
