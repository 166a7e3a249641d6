"""`runner report`: real small jobs (tiny model) -> one HTML page whose numbers are the results' own, whose
hostile text stays text, and which a real headless Chromium shows with no console error and drawn charts."""

import base64
import dataclasses
import json
import os
import shlex
import shutil
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers import ids_of, invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams
from runner.engine import Engine
from runner.job_report import collect
from runner.jobdir import Heartbeat, Owner
from runner.jobs import create_job
from runner.params import EmbedParams, ScoreParams
from runner.worker import run_job

HOSTILE_TEXT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
HOSTILE_ID = "</td><script>window.__pwned = 3</script>"
PROMPTS = ["The quick brown fox", "Hello", "A language model reads", "My friend", "The old man",
           "Every student", "The robot", "A small bird"]  # fmt: skip
OOM = "The robot"  # its rows fail with out of memory, even alone
SECTIONS = ["summary", "throughput", "outputs", "logprobs", "errors", "memory", "settings", "samples"]


class Page(HTMLParser):
    """The report's sections: for each <section id>, its tables as rows of cell texts, and its text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.text: dict[str, str] = {}
        self.section: str | None = None
        self.cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.section = dict(attrs)["id"]
            self.tables[self.section], self.text[self.section] = [], ""
        elif tag == "tr" and self.section:
            self.tables[self.section].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.section:
            self.tables[self.section][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.section:
            self.text[self.section] += data

    def rows(self, section: str) -> dict[str, list[str]]:
        """The rows of a section's tables, by their first cell (header rows included)."""
        return {r[0]: r[1:] for r in self.tables[section] if r}


@pytest.fixture(scope="module")
def generate_job(tmp_path_factory, tiny_gpt2, gpt2_engine):
    """A finished generate job with both finish reasons, an invalid input row, two rows that ran out of memory,
    a hostile id and an output that holds a <script>: batches of 4, a commit every 4 results."""
    root = tmp_path_factory.mktemp("gen")
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    rows[1]["id"] = HOSTILE_ID
    rows.append({"id": "bad", "prompt": 5})
    prompts = write_jsonl(root / "p.jsonl", rows)
    params = GenerationParams(max_new_tokens=8, temperature=1.0, num_return_sequences=2, seed=3, stop=["e"])
    job = create_job(prompts, tiny_gpt2, params, EngineOptions(batch_size=4), job_dir=root / "job",
                     skip_invalid=True)  # fmt: skip
    oom, hostile = ids_of(gpt2_engine, [OOM, PROMPTS[3]])
    real = Engine.generate

    def generate(self, prompts, params, seeds=None, stop=None, **kw):
        if oom in prompts:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = real(self, prompts, params, seeds, stop, **kw)
        return [dataclasses.replace(c, text=HOSTILE_TEXT + c.text) if p == hostile else c
                for p, c in zip(prompts, out, strict=True)]  # fmt: skip

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "generate", generate)
        summary = run_job(job, gpt2_engine, echo=None, shard_rows=4)
    assert summary.finished and summary.errors == 2 and summary.done == 14
    return job


@pytest.fixture(scope="module")
def generate_page(generate_job, tmp_path_factory):
    path = runner.report(generate_job, tmp_path_factory.mktemp("page") / "report.html")
    return path, Page(path.read_text(encoding="utf-8"))


def test_the_report_shows_each_section_with_the_results_own_numbers(generate_job, generate_page):
    path, page = generate_page
    assert list(page.tables) == SECTIONS
    df = runner.load_results(generate_job)
    # finish reasons: both kinds, counted as the results count them
    finish = page.rows("outputs")
    want = df["finish_reason"].value_counts().to_dict()
    assert set(want) == {"stop", "length"}
    assert {r: int(finish[r][0]) for r in want} == want
    # lengths and log-probs come from every result row, each once
    data = collect(generate_job)
    assert data.rows_read == len(df) == 14
    assert {i: int(n) for i, n in enumerate(data.lengths) if n} == df[
        "completion_tokens"
    ].value_counts().to_dict()
    tokens = int(df["completion_tokens"].sum())
    assert int(data.token_lp.sum()) == tokens and f"({tokens:,} tokens)" in path.read_text(encoding="utf-8")
    # throughput: every batch of the run, its rows adding up to the results
    assert sum(b[2] for b in data.batches) == 14 and len(data.batches) >= 4
    assert sum(b[3] for b in data.batches) == tokens
    # errors by reason: the invalid input row and the two samples of the row that ran out of memory
    errors = page.rows("errors")
    assert errors["validate: invalid_input"][:2] == ["1", "bad"]
    assert errors["generate: out_of_memory"][0] == "2"
    assert "must be a string, got number" in page.text["errors"]
    # peak memory, as stats.json recorded it
    (run,) = json.loads((generate_job.dir / "stats.json").read_text())["runs"]
    from runner.job_report import _bytes

    assert _bytes(run["peak_memory_bytes"]) in page.text["memory"]  # in MiB or GiB, as large as it was
    # settings and summary
    settings = page.rows("settings")
    assert settings["temperature"] == ["1.0"] and settings["stop"] == ['["e"]'] and settings["seed"] == ["3"]
    summary = page.rows("summary")
    assert summary["results"] == ["14 of 16 done (87.5%)"] and summary["state"] == ["completed"]
    # what every row was computed with, from each shard's own record (a killed run leaves no stats.json run)
    import transformers

    (how,) = [v for k, v in settings.items() if k.startswith("computed with")]
    assert how[0].startswith(
        f"float32 on cpu, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    assert how[0].endswith(": 14 rows")
    # samples: the lowest and highest mean log-prob per token, each result at most once
    df["score"] = df["cumulative_logprob"] / df["completion_tokens"]
    samples = [r for r in page.tables["samples"][1:]]
    assert samples[0][1] == df.loc[df["score"].idxmin(), "id"] and samples[0][0] == "lowest"
    assert next(r for r in samples if r[0] == "highest")[1] == df.loc[df["score"].idxmax(), "id"]
    assert len(samples) == 10 and len({(r[1], r[2]) for r in samples}) == 10


def test_the_errors_section_counts_what_the_status_counts_while_a_shard_fails_its_checksum(
    generate_job, tmp_path
):
    """A commit whose shard fails its checksum (not quarantined yet) does not count: the status left its row
    errors out, and the errors section, read unverified, counted them (adversarial pass 229)."""
    from runner import jobdir

    copy = tmp_path / "job"
    shutil.copytree(generate_job.dir, copy)
    job = jobdir.Job.open(copy)
    erring = next(c for c in jobdir.read_ledger(job).commits if c.marker.get("errors") and c.shard)
    shard = copy / jobdir.SHARDS / erring.shard
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = collect(job)
    run_time = sum(n for (stage, _), n in report.errors.items() if stage != "validate")
    assert report.status.errors == run_time == 0, (report.status, report.errors)


def test_runner_report_is_the_function_even_after_its_module_is_imported():
    import runner.job_report  # noqa: F401  (a submodule named `report` would replace the function here)

    assert callable(runner.report) and runner.report.__module__ == "runner.api"


def test_hostile_text_stays_text(generate_job, generate_page):
    path, page = generate_page
    html = path.read_text(encoding="utf-8")
    assert "<script>window.__pwned" not in html and "<img" not in html and "</td><script>" not in html
    assert escape(HOSTILE_TEXT) in html and escape(HOSTILE_ID) in html
    # the parsed page shows the hostile output as text, exactly
    outputs = [r[-1] for r in page.tables["samples"][1:]]
    assert any(o.startswith(HOSTILE_TEXT) for o in outputs)
    # scripts: plotly.js, one per chart, and the resize one; nothing else
    charts = html.count('class="chart-box"')
    assert html.count("<script") == 1 + charts + 1 and charts == 7


def test_a_job_with_no_results_yet_and_its_command_line(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt": "My friend"}]
    )
    job_id = invoke(
        "submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 3, "--name", "later"
    ).stdout.strip()
    out = tmp_path / "reports" / "r.html"  # a folder that does not exist yet
    result = invoke("report", "later", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and f"wrote the report of job later to {out}" in result.stderr
    page = Page(out.read_text(encoding="utf-8"))
    assert list(page.tables) == SECTIONS
    assert "No batch has been committed yet." in page.text["throughput"]
    assert "No results yet." in page.text["outputs"] and "No results yet." in page.text["samples"]
    assert (
        "Peak memory was not recorded: no run has finished yet and no worker runs it now."
        in page.text["memory"]
    )
    assert page.rows("summary")["state"] == ["queued"]
    # `runner status JOB` prints the command, and it works as typed (by name in the home, by folder outside)
    for ref in ("later", job_id, str(runner_home / job_id)):
        line = next(ln for ln in invoke("status", ref).stdout.splitlines() if ln.startswith("report:"))
        args = shlex.split(line.removeprefix("report:"))
        assert args[:2] == ["runner", "report"] and args[-2:] == ["-o", "report.html"]
        monkeypatch.chdir(tmp_path)
        assert invoke(*args[1:]).exit_code == 0 and (tmp_path / "report.html").stat().st_size > 10**6
    outside = tmp_path / "elsewhere"
    shutil.copytree(runner_home / job_id, outside)
    line = next(ln for ln in invoke("status", outside).stdout.splitlines() if ln.startswith("report:"))
    assert line == f"report:   runner report {outside} -o report.html"
    assert invoke("report", "nope").output.startswith("Error: no job 'nope' in ")
    # a worker running it now: its heartbeat's peak so far
    job = runner.open_job(job_id)
    Heartbeat(
        job, Owner.me("w-live"), info={"device": "cuda:0", "rows": 1, "peak_memory_bytes": 3 * 2**30}
    ).beat()
    page = Page(runner.report(job, tmp_path / "live.html").read_text(encoding="utf-8"))
    assert "Highest: 3.00 GiB on cuda:0." in page.text["memory"]
    assert page.rows("memory")["running now"][:2] == ["w-live", "cuda:0"]
    assert page.rows("summary")["state"] == ["running"]


@pytest.mark.parametrize("kind", ["score", "embed"])
def test_score_and_embed_jobs_show_what_applies(tmp_path, tiny_gpt2, gpt2_engine, kind):
    texts = [{"id": "a", "text": "The quick brown fox jumps"}, {"id": "b", "text": HOSTILE_TEXT},
             {"id": "c", "context": "Hello", "continuation": " there"}]  # fmt: skip
    params = ScoreParams() if kind == "score" else EmbedParams()
    if kind == "embed":  # texts only
        texts[2] = {"id": "c", "text": "Hello there"}
    job, _ = runner.run(write_jsonl(tmp_path / "t.jsonl", texts), tiny_gpt2, params, output=tmp_path / kind,
                        engine=gpt2_engine, echo=None)  # fmt: skip
    html = runner.report(job.dir, tmp_path / "r.html").read_text(encoding="utf-8")
    page = Page(html)
    df = runner.load_results(job.dir)
    assert HOSTILE_TEXT not in html and "finish reasons" not in html
    assert [r[0] for r in page.tables["samples"][1:]] != []
    if kind == "score":
        assert list(page.tables) == SECTIONS
        data = collect(job)
        assert (
            int(data.token_lp.sum())
            == int(df["num_tokens"].sum())
            == sum(len(t) for t in df["token_logprobs"])
        )
        texts_shown = [r[-1] for r in page.tables["samples"][1:]]
        contexts = [r[-2] for r in page.tables["samples"][1:]]
        assert HOSTILE_TEXT in texts_shown and "Hello" in contexts and " there" in texts_shown
        assert "tokens read per second" in html
    else:
        assert "logprobs" not in page.tables and "texts per second" in html
        assert [r[0] for r in page.tables["samples"][1:]] == ["a", "b", "c"]  # input order


def test_a_job_computed_in_two_precisions_says_mixed(generate_job, monkeypatch):
    """Begun on one GPU in bfloat16, carried on elsewhere in float32: the report lists both with their rows."""
    from runner import job_report

    real = job_report._computed_with
    calls = []

    def alternating(table):
        calls.append(1)
        return "bfloat16 on NVIDIA A100-SXM4-40GB" if len(calls) % 2 else real(table)

    monkeypatch.setattr(job_report, "_computed_with", alternating)
    data = collect(generate_job)
    assert len(data.computed_with) == 2 and sum(data.computed_with.values()) == 14
    page = Page(job_report.render(data))
    rows = [r for r in page.tables["settings"] if r and r[0].startswith("computed with")]
    assert [r[0] for r in rows] == ["computed with (mixed: the same model, other rounding)"] * 2
    assert rows[0][1].startswith("bfloat16 on NVIDIA A100-SXM4-40GB: ") or rows[1][1].startswith(
        "bfloat16 on"
    )


def test_markers_from_before_batches_were_recorded_count_at_their_commit(generate_job, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(generate_job.dir, old)
    for marker in (old / "done").glob("*.json"):
        record = json.loads(marker.read_text())
        del record["batches"], record["check"]  # as a runner of before both wrote them
        marker.write_text(json.dumps(record))
    data = collect(runner.open_job(old))
    committed = [m for m in (old / "done").glob("*.json") if json.loads(m.read_text())["shard"]]
    assert len(data.batches) == len(committed) and all(b[4] is None for b in data.batches)
    assert sum(b[2] for b in data.batches) == 14
    assert (
        "recorded only their commit time"
        in Page(runner.report(old, tmp_path / "r.html").read_text()).text["throughput"]
    )


def test_a_long_run_is_drawn_in_bounded_points_that_keep_its_rate():
    from runner.job_report import MAX_POINTS, _rates

    # 10,000 batches of one worker, 1 s each, at 100 then 300 tokens/s: merged into time windows
    batches = [(1e9 + i, "w", 4, 100 if i < 5000 else 300, 1.0) for i in range(10_000)]
    times, rates = _rates(batches, 3)
    assert len(times) == len(rates) <= MAX_POINTS
    assert rates[0] == 100 and rates[-1] == 300 and all(100 <= r <= 300 for r in rates)
    assert _rates(batches[:10], 2)[1] == [4.0] * 10  # few batches: each its own point (here rows/s)


def test_the_progress_line_of_a_long_run_is_drawn_in_bounded_points():
    """The results-done line had a point per batch: 200,000 batches made a 7 MB chart beside the bounded rates."""
    from runner.job_report import MAX_POINTS, _progress

    batches = [(1e9 + i, f"w{i % 4}", 3, 30, 1.0) for i in range(200_000)]
    times, done = _progress(batches)
    assert len(times) == len(done) <= MAX_POINTS + 1
    assert done[0] == 0 and done[-1] == 3 * 200_000 and done == sorted(done)
    assert _progress(batches[:3])[1] == [0, 3, 6, 9]  # few batches: each its own point


# --- in a real browser --------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
# Count the colours of a PNG (a chart's screenshot) and its pixels in plotly's first trace colour #636efa.
PIXELS = """async (b64) => {
  const img = new Image(); img.src = "data:image/png;base64," + b64; await img.decode();
  const c = document.createElement("canvas"); c.width = img.width; c.height = img.height;
  const g = c.getContext("2d"); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data, colours = new Set(); let trace = 0;
  for (let i = 0; i < d.length; i += 4) {
    colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    if (d[i] === 99 && d[i + 1] === 110 && d[i + 2] === 250) trace++;
  }
  return {colours: colours.size, trace: trace, pixels: d.length / 4};
}"""


def chromium():
    """Playwright driving the system Chromium; skipped where there is none, except in CI (.ci/run installs it)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        why = "playwright is not installed" if sync_playwright is None else f"no {CHROMIUM}"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(why)
    return sync_playwright


@pytest.mark.slow  # a real browser on a 5 MB page: a few seconds
def test_the_page_loads_offline_in_a_real_browser_and_draws_its_charts(generate_page):
    sync_playwright = chromium()
    path, _ = generate_page
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            page.wait_for_function(
                "[...document.querySelectorAll('.js-plotly-plot')].filter(d => "
                "d.querySelector('.main-svg')).length === 7"
            )
            assert problems == [] and all(u.startswith("file:") for u in requests), (problems, requests)
            assert page.evaluate("window.__pwned") is None
            charts = page.locator(".chart-box")
            assert charts.count() == 7
            drawn = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(d =>
                [d.id, d.querySelectorAll('.point, .js-line').length, d.getBoundingClientRect().width,
                 d.closest('.chart-box').getBoundingClientRect().width])""")
            pictures = {}
            for i in range(charts.count()):
                png = charts.nth(i).screenshot()
                pictures[drawn[i][0]] = browser.new_page().evaluate(PIXELS, base64.b64encode(png).decode())
        finally:
            browser.close()
    for div, marks, width, column in drawn:
        assert marks > 0 and 300 < width <= column + 1, (
            div,
            marks,
            width,
            column,
        )  # drawn, within its column
    for div, px in pictures.items():
        assert px["colours"] > 30 and px["trace"] > 100, (div, px)  # not blank: text, axes and the data


def test_an_empty_report_path_is_refused_at_once(generate_job):
    # (Path("") is "."; writing the page onto it was retried for a minute as a busy mount)
    with pytest.raises(ValueError, match="empty path"):
        runner.report(generate_job.dir, "")


@pytest.mark.parametrize("name", ["job.json", "prompts.parquet", "shards/report.html", "stats.json"])
def test_a_report_is_never_written_over_the_jobs_own_files(generate_job, tmp_path, name):
    """`-o JOB/job.json` (or a shard, prompts.parquet) replaced the job's file with the page: the job broken, its
    rows gone. Only a page of its own directly in the job folder is written there."""
    job_dir = tmp_path / "job"
    shutil.copytree(generate_job.dir, job_dir)
    before = {p: p.read_bytes() for p in job_dir.rglob("*") if p.is_file()}
    result = invoke("report", job_dir, "-o", job_dir / name)
    assert result.exit_code == 1 and result.output.startswith("Error: the report would be written "), (
        result.output
    )
    assert {p: p.read_bytes() for p in job_dir.rglob("*") if p.is_file()} == before
    assert invoke("report", job_dir, "-o", job_dir / "report.html").exit_code == 0
    assert runner.status(job_dir).state == "completed" and len(runner.load_results(job_dir)) == 14
