"""`runner report` / `runner.report`: pictures of a job, as one self-contained HTML page (plotly.js
embedded; viewable with no network). (Not report.py: a submodule `runner.report` would hide the function.)

job folder (jobdir.py) -> `collect` -> `ReportData` -> `render` -> report.html

`collect` reads what the folder records and nothing else: the commit markers (each batch's end time, rows,
tokens and seconds; older markers only their commit time), the result shards one at a time and only the
columns a chart needs (never embeddings), the error log (errors.jsonl and the markers' row errors) and
stats.json (each run's device and peak memory). Histograms are binned as the shards are read, so memory
grows with the number of result rows by a few bytes each, not with their text or tokens. `render` turns that
into plotly figures and HTML tables; every piece of text from the job is HTML-escaped.
"""

from __future__ import annotations

import heapq
import html
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import jobdir, storage
from .errors import RunnerError
from .jobdir import ORDER, Job

SAMPLES = 5  # rows shown at each end of the sample table
# the per-token log-prob histogram: bins of LP_BIN nats from LP_LOW (lower log-probs join the lowest bin) to 0
LP_LOW = -30.0
LP_BIN = 0.5
MAX_POINTS = 1500  # throughput points per worker before they are merged into time windows
TEXT_CHARS = 400  # characters of a text shown in the sample table
# the result columns each kind of job needs for its charts and sample table (shards lacking one skip it)
COLUMNS = {
    "generate": ["id", "prompt", "text", "finish_reason", "completion_tokens", "token_logprobs",
                 "cumulative_logprob"],
    "score": ["id", "text", "context", "continuation", "num_tokens", "token_logprobs", "mean_logprob"],
    "embed": ["id", "text", "num_tokens"],
}  # fmt: skip


@dataclass
class Sample:
    """A row of the sample table."""

    score: float | None  # mean log-prob per token (None for embeddings)
    id: str
    sample: int
    tokens: int
    finish: str | None
    prompt: str | None
    text: str


@dataclass
class ReportData:
    """Everything the page shows, small: counts, binned histograms, a few sample rows."""

    job: Job
    status: Any  # job_status.JobStatus
    rows_read: int = 0
    # throughput: (end time as unix seconds, worker, result rows, tokens, seconds computing; None if unknown)
    batches: list[tuple[float, str, int, int, float | None]] = field(default_factory=list)
    lengths: Any = None  # np.ndarray: result rows by length in tokens (index = length)
    finish: Counter = field(default_factory=Counter)
    token_lp: Any = None  # np.ndarray: per-token log-prob counts over bins of LP_BIN from LP_LOW
    row_lp: list[Any] = field(default_factory=list)  # per-row mean log-prob arrays (float32), one per shard
    lowest: list[Sample] = field(default_factory=list)
    highest: list[Sample] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # (stage, error) -> rows
    error_examples: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # stats.json runs
    runs_problem: str | None = None  # why stats.json's runs are not there to show (Job.read_stats)
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  # heartbeats of the workers running it now
    computed_with: Counter = field(default_factory=Counter)  # "float32 on cpu, torch ..." -> result rows


def write_report(job: Job, path: str | os.PathLike) -> Path:
    """Write the report of `job` to `path` (atomically; its folder is made if missing) and return the path."""
    path = Path(path)
    _not_over_the_job(job, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.atomic_write(path, render(collect(job)), durable=False)
    return path


def _not_over_the_job(job: Job, path: Path) -> None:
    """Refuse a path in the job folder other than an .html page directly in it: `-o JOB/job.json` (or a shard)
    replaced the job's own file with the page, the job broken and its rows gone."""
    target, folder = path.resolve(), Path(job.dir).resolve()
    if target.is_relative_to(folder) and (
        target.parent != folder or target.suffix.lower() not in (".html", ".htm")
    ):
        raise RunnerError(f"the report would be written over the job's own files ({path}): write it outside the "
                          "job folder, or as an .html file directly in it")  # fmt: skip


# --- reading the job folder ---------------------------------------------------------------------------------


def collect(job: Job) -> ReportData:
    """What the page shows, read from the job folder in one pass (read-only: a running job is not disturbed)."""
    from .job_status import job_status

    stats = job.read_stats()
    verifier = jobdir.Verifier(job)
    data = ReportData(job, job_status(job, verifier=verifier), runs=stats["runs"], runs_problem=stats["problem"],
                      live=jobdir.live_workers(job))  # fmt: skip
    # (at the status's retry generation: a `runner retry` landing between the two reads made the summary count
    # a row error the errors section no longer listed, pass 74; and with its verifier: read unverified, a commit
    # whose shard fails its checksum counted its row errors in the errors section, not in the status, pass 229)
    ledger = jobdir.read_ledger(job, verifier=verifier, generation=data.status.generation)
    for commit in ledger.commits:
        _batches_of(data, commit.marker)
    _read_errors(data, job, ledger)
    _read_results(data, job)
    data.batches.sort(key=lambda b: b[0])
    return data


def _batches_of(data: ReportData, marker: dict[str, Any]) -> None:
    """A marker's batches; a marker written before batches were recorded counts as one point at its commit
    time, with its tokens added when its shard is read."""
    worker = str(marker.get("worker") or "?")
    batches = marker.get("batches")
    if isinstance(batches, list):
        for b in batches:
            try:
                end, rows, tokens, seconds = (float(x) for x in b)
            except (TypeError, ValueError):
                continue
            data.batches.append((end, worker, int(rows), int(tokens), seconds))


def _read_errors(data: ReportData, job: Job, ledger: jobdir.Ledger) -> None:
    """Errors by (stage, reason), with the first few of each: invalid input rows, then run-time row errors
    (streamed: there may be millions)."""
    from itertools import chain

    for e in chain(job.invalid_rows(), ledger.errors()):
        key = (str(e.get("stage") or "?"), str(e.get("error") or "?"))
        data.errors[key] += 1
        examples = data.error_examples.setdefault(key, [])
        if len(examples) < 3:
            examples.append(e)


def _read_results(data: ReportData, job: Job) -> None:
    """One pass over the shards (each verified as load_results does, a key counted once), binning as it goes."""
    import numpy as np

    from .results import shard_tables

    seen = np.zeros(job.spec.rows * job.samples, dtype=bool)
    data.lengths = np.zeros(1, dtype=np.int64)
    data.token_lp = np.zeros(int(-LP_LOW / LP_BIN), dtype=np.int64)
    lowest: list[tuple[float, int, Sample]] = []  # max-heap (negated) of the lowest scores
    highest: list[tuple[float, int, Sample]] = []  # min-heap of the highest
    for commit, table in shard_tables(job, COLUMNS[job.kind]):
        keys = table.column(ORDER).to_numpy() * job.samples + table.column("sample").to_numpy()
        fresh = ~seen[keys]
        seen[keys] = True
        if not fresh.all():
            table = table.filter(fresh)
        if not isinstance(commit.marker.get("batches"), list) and (t := commit.written_at):
            tokens = int(_lengths(table, job.kind).sum())
            data.batches.append((t, str(commit.marker.get("worker") or "?"), table.num_rows, tokens, None))
        data.computed_with[_computed_with(table)] += table.num_rows
        _bin(data, table, job.kind)
        _keep_samples(table, job.kind, lowest, highest, data.rows_read)
        data.rows_read += table.num_rows
    data.lowest = [s for _, _, s in sorted(lowest, key=lambda x: -x[0])]
    data.highest = [s for _, _, s in sorted(highest, key=lambda x: -x[0])]


def _computed_with(table: Any) -> str:
    """What a shard's rows were computed with (its Parquet metadata): precision, device, library versions."""
    meta = {
        k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"runner.")
    }
    if not meta.get("runner.dtype"):
        return "not recorded (an older runner)"
    versions = meta.get("runner.versions")
    return f"{meta['runner.dtype']} on {meta.get('runner.device', '?')}" + (
        f", {versions}" if versions else ""
    )


def _lengths(table: Any, kind: str) -> Any:
    import numpy as np

    name = "completion_tokens" if kind == "generate" else "num_tokens"
    if name not in table.column_names:
        return np.zeros(0, dtype=np.int64)
    return table.column(name).fill_null(0).to_numpy().astype(np.int64)


def _row_scores(table: Any, kind: str) -> Any:
    """Mean log-prob per token of each row (NaN where there is none): the score of the sample table."""
    import numpy as np

    if kind == "score" and "mean_logprob" in table.column_names:
        return table.column("mean_logprob").to_numpy(zero_copy_only=False).astype(np.float64)
    if kind == "generate" and "cumulative_logprob" in table.column_names:
        total = table.column("cumulative_logprob").to_numpy(zero_copy_only=False).astype(np.float64)
        n = _lengths(table, kind)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return np.full(table.num_rows, np.nan)


def _bin(data: ReportData, table: Any, kind: str) -> None:
    import numpy as np
    import pyarrow.compute as pc

    counts = np.bincount(_lengths(table, kind))
    if len(counts) > len(data.lengths):
        data.lengths = np.pad(data.lengths, (0, len(counts) - len(data.lengths)))
    data.lengths[: len(counts)] += counts
    if kind == "generate" and "finish_reason" in table.column_names:
        for entry in pc.value_counts(table.column("finish_reason")).to_pylist():
            data.finish[str(entry["values"])] += int(entry["counts"])
    if "token_logprobs" in table.column_names:
        lps = pc.list_flatten(table.column("token_logprobs")).to_numpy(zero_copy_only=False)
        lps = lps[np.isfinite(lps)]
        idx = np.clip(((lps - LP_LOW) / LP_BIN).astype(np.int64), 0, len(data.token_lp) - 1)
        data.token_lp += np.bincount(idx, minlength=len(data.token_lp))
    scores = _row_scores(table, kind)
    if np.isfinite(scores).any():
        data.row_lp.append(scores[np.isfinite(scores)].astype(np.float32))


def _keep_samples(table: Any, kind: str, lowest: list, highest: list, seq: int) -> None:
    """Keep the SAMPLES lowest and highest scoring rows seen so far (for embeddings: the first rows); only
    the few candidates of this shard are turned into Python objects."""
    import numpy as np

    if table.num_rows == 0:
        return
    scores = _row_scores(table, kind)
    if kind == "embed":
        order = table.column(ORDER).to_numpy()
        for i in np.argsort(order, kind="stable")[:SAMPLES]:
            _push(highest, -float(order[i]), seq + int(i), _sample(table, int(i), None, kind))
        return
    ok = np.flatnonzero(np.isfinite(scores))
    by_score = ok[np.argsort(scores[ok], kind="stable")]
    for i in by_score[:SAMPLES]:
        _push(lowest, -float(scores[i]), seq + int(i), _sample(table, int(i), float(scores[i]), kind))
    for i in by_score[-SAMPLES:]:
        _push(highest, float(scores[i]), seq + int(i), _sample(table, int(i), float(scores[i]), kind))


def _push(heap: list, key: float, seq: int, sample: Sample) -> None:
    """Keep the SAMPLES largest keys (a min-heap)."""
    item = (key, -seq, sample)
    if len(heap) < SAMPLES:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _sample(table: Any, i: int, score: float | None, kind: str) -> Sample:
    def cell(name: str) -> Any:
        return table.column(name)[i].as_py() if name in table.column_names else None

    prompt, text = cell("prompt"), cell("text")
    if kind == "score" and text is None:  # a (context, continuation) pair
        prompt, text = cell("context"), cell("continuation")
    n = _lengths(table.slice(i, 1), kind)
    return Sample(score, str(cell("id")), int(cell("sample") or 0), int(n[0]) if len(n) else 0,
                  cell("finish_reason"), prompt, text or "")  # fmt: skip


# --- the page -----------------------------------------------------------------------------------------------


def render(data: ReportData) -> str:
    """The whole page: plotly.js once in the head, then one section per picture."""
    from plotly.offline import get_plotlyjs

    job, kind = data.job, data.job.kind
    sections = [_summary(data), _throughput(data), _outputs_section(data)]
    if kind in ("generate", "score"):
        sections.append(_logprob_section(data))
    sections += [
        _errors_section(data),
        _memory_section(data),
        _settings_section(data),
        _samples_section(data),
    ]
    title = f"runner report: {job.name or job.id}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n" + "\n".join(sections) +
        f"\n<script>{RESIZE}</script>\n<footer>made by runner {_e(_version())} at {_e(time.strftime('%Y-%m-%d %H:%M:%S %z'))} "
        f"from {_e(str(job.dir))}</footer>\n</body>\n</html>\n"
    )  # fmt: skip


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; word-break: break-all; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; word-break: break-word; max-width: 560px; font-family: ui-monospace, monospace; }
.note { color: #666; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
@media (max-width: 900px) { .grid { grid-template-columns: minmax(0, 1fr); } }
.grid > * { min-width: 0; overflow: hidden; }
footer { margin-top: 40px; color: #888; font-size: 12px; }
"""


# Each chart is drawn as the page is parsed, when the grid beside it may not be laid out yet: fit them again.
RESIZE = """window.addEventListener("load", function () {
  document.querySelectorAll(".js-plotly-plot").forEach(function (d) { Plotly.Plots.resize(d); });
});"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _version() -> str:
    from . import __version__

    return __version__


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _figure(fig: Any, key: str) -> str:
    """A plotly figure as a div (plotly.js is in the page head once)."""
    fig.update_layout(
        margin={"l": 60, "r": 20, "t": 40, "b": 50}, template="plotly_white", height=fig.layout.height or 360
    )
    body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{key}",
                       config={"displaylogo": False, "displayModeBar": False, "responsive": True})  # fmt: skip
    return f'<div class="chart-box" data-chart="{key}">{body}</div>'


def _table(head: list[str] | None, rows: list[list[Any]], classes: list[str] | None = None) -> str:
    classes = classes or [""] * len(rows[0] if rows else head or [])
    out = ["<table>"] + (["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"] if head else [])
    for row in rows:
        cells = "".join(
            f'<td class="{c}">{_e(v)}</td>' if c else f"<td>{_e(v)}</td>"
            for v, c in zip(row, classes, strict=True)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _results_said(s: Any) -> str:
    """ "128 of 400 done (32.0%)", or that they are not counted (a broken job: its commits were not read)."""
    if s.done is None or s.total is None:
        return "not counted (the job is broken: see its state)"
    return f"{s.done:,} of {s.total:,} done ({100 * s.done / s.total if s.total else 0:.1f}%)"


def _summary(data: ReportData) -> str:
    s, job = data.status, data.job
    rows = [
        ["job", job.id + (f" ({job.name})" if job.name else "")],
        ["kind", job.kind],
        ["model", job.spec.model + (f" (snapshot {job.spec.revision})" if job.spec.revision else "")],
        ["state", s.state + (f" - {s.message}" if s.message else "")],
        ["results", _results_said(s)],
        [
            "errors",
            ("row errors not counted" if s.errors is None else f"{s.errors:,} row errors")
            + f", {s.invalid:,} invalid input rows",
        ],
        ["tokens / s", f"{s.tokens_per_second:,.1f}" if s.tokens_per_second else "-"],
        ["created", job.spec.created],
        ["folder", str(job.dir)],
    ]
    return _section("summary", "Summary", _table(None, rows, ["", ""]))


def _throughput(data: ReportData) -> str:
    import plotly.graph_objects as go

    if not data.batches:
        return _section("throughput", "Throughput over time", _note("No batch has been committed yet."))
    # embeddings count no tokens (tasks.py): their throughput is texts per second
    per, unit = (2, "texts") if data.job.kind == "embed" else (3, "tokens")
    workers = sorted({b[1] for b in data.batches})
    rate = go.Figure()
    for worker in workers:
        xs, ys = _rates([b for b in data.batches if b[1] == worker], per)
        rate.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=worker, marker={"size": 6}))
    read = " read" if data.job.kind == "score" else ""
    rate.update_layout(title=f"{unit}{read} per second" + (", by worker" if len(workers) > 1 else ""),
                       xaxis_title="time", yaxis={"title": f"{unit} / s", "rangemode": "tozero"},
                       showlegend=len(workers) > 1)  # fmt: skip
    xs, ys = _progress(data.batches)
    done = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line_shape="hv", fill="tozeroy", name="results"))
    of = f" (of {data.status.total:,})" if data.status.total is not None else ""  # (None: a broken job's)
    done.update_layout(title=f"results done{of}", xaxis_title="time",
                       yaxis={"title": "result rows", "rangemode": "tozero"})  # fmt: skip
    note = _note(f"Each point is a batch: its {unit} over the seconds it took. Times are when each batch "
                 "ended (this machine's local time).")  # fmt: skip
    if any(b[4] is None for b in data.batches):
        note = _note(f"Older commits recorded only their commit time: a point there is a commit's {unit} over "
                     "the time since the worker's previous commit.")  # fmt: skip
    body = f'<div class="grid">{_figure(rate, "throughput")}{_figure(done, "progress")}</div>\n{note}'
    return _section("throughput", "Throughput over time", body)


def _rates(
    batches: list[tuple[float, str, int, int, float | None]], per: int
) -> tuple[list[str], list[float]]:
    """(times, rate) of one worker's batches, rate = field `per` of a batch (rows 2, tokens 3) per second;
    merged into MAX_POINTS time windows when there are more."""
    points: list[tuple[float, float, float]] = []  # (end, amount, seconds)
    prev = None
    for b in batches:
        end, seconds = b[0], b[4]
        if seconds is None:  # an old commit: the time since the previous one, when there is one
            seconds = end - prev if prev is not None and end > prev else None
        prev = end
        if seconds:
            points.append((end, b[per], seconds))
    if len(points) > MAX_POINTS:
        t0, t1 = points[0][0], points[-1][0]
        width = (t1 - t0) / MAX_POINTS or 1.0
        merged: dict[int, list[float]] = {}
        for end, amount, seconds in points:
            m = merged.setdefault(min(int((end - t0) / width), MAX_POINTS - 1), [end, 0.0, 0.0])
            m[0], m[1], m[2] = end, m[1] + amount, m[2] + seconds
        points = [(e, a, s) for e, a, s in merged.values()]
    return [_when(e) for e, _, _ in points], [round(a / s, 2) for _, a, s in points]


def _progress(batches: list[tuple[float, str, int, int, float | None]]) -> tuple[list[str], list[int]]:
    """(times, result rows done) from 0 when the first batch began, a point per batch (sorted by end time); past
    MAX_POINTS the last point of each of MAX_POINTS time windows, so a long run's page stays small."""
    first = batches[0]
    ends = [first[0] - (first[4] or 0)] + [b[0] for b in batches]  # the line starts at 0 when the first began
    done = [0] + _cumsum([b[2] for b in batches])
    if len(ends) > MAX_POINTS + 1:
        width = (ends[-1] - ends[0]) / MAX_POINTS or 1.0
        last = {min(int((e - ends[0]) / width), MAX_POINTS - 1): i for i, e in enumerate(ends) if i}
        keep = [0, *sorted(last.values())]
        ends, done = [ends[i] for i in keep], [done[i] for i in keep]
    return [_when(e) for e in ends], done


def _when(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _outputs_section(data: ReportData) -> str:
    """Output (or text) lengths, and for generation the finish reasons."""
    import plotly.graph_objects as go

    generate = data.job.kind == "generate"
    title = "Output length and finish reasons" if generate else "Text length"
    if not data.rows_read:
        return _section("outputs", title, _note("No results yet."))
    counts = data.lengths
    xs = [i for i in range(len(counts)) if counts[i]]
    fig = go.Figure(go.Bar(x=xs, y=[int(counts[i]) for i in xs], width=0.9, name="rows"))
    total = int(counts.sum())
    mean = sum(i * int(counts[i]) for i in xs) / total if total else 0
    what = "generated tokens per result" if generate else "tokens per text"
    fig.update_layout(title=f"{what} (mean {mean:.1f}, max {max(xs) if xs else 0})",
                      xaxis={"title": "tokens", **_whole(max(xs) - min(xs) if xs else 0)},
                      yaxis={"title": "result rows", **_whole(int(max(counts)))})  # fmt: skip
    charts = [_figure(fig, "lengths")]
    table = ""
    if generate and data.finish:
        reasons = sorted(data.finish, key=lambda r: -data.finish[r])
        ns = [data.finish[r] for r in reasons]
        bars = go.Figure(go.Bar(x=reasons, y=ns, text=ns, textposition="auto"))
        bars.update_layout(title="finish reasons", xaxis_title="finish_reason",
                           yaxis={"title": "result rows", **_whole(max(ns))})  # fmt: skip
        charts.append(_figure(bars, "finish"))
        rows = [[r, f"{n:,}", f"{100 * n / data.rows_read:.1f}%"] for r, n in zip(reasons, ns, strict=True)]
        table = _table(["finish_reason", "rows", "share"], rows, ["", "num", "num"]) + _note(
            "stop: an end-of-sequence token or a stop string; length: max_new_tokens reached."
        )
    return _section("outputs", title, f'<div class="grid">{"".join(charts)}</div>\n{table}')


def _whole(span: int) -> dict[str, Any]:
    """Axis settings for a count over a small range: a tick per whole number, never 0.2 of a row."""
    return {"dtick": 1, "tick0": 0} if span <= 12 else {"tickformat": ",d"}


def _logprob_section(data: ReportData) -> str:
    import numpy as np
    import plotly.graph_objects as go

    title = "Log-probabilities and perplexity"
    if not data.rows_read or not int(data.token_lp.sum()):
        return _section("logprobs", title, _note("No results yet."))
    counts = data.token_lp
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    xs = [LP_LOW + (i + 0.5) * LP_BIN for i in range(lo, hi)]
    tokens = go.Figure(go.Bar(x=xs, y=counts[lo:hi].tolist(), width=LP_BIN * 0.95, name="tokens"))
    what = "generated token" if data.job.kind == "generate" else "scored token"
    tokens.update_layout(title=f"log-prob of each {what} ({int(counts.sum()):,} tokens)",
                         xaxis_title="log-prob (nats)", yaxis_title="tokens")  # fmt: skip
    ppl = go.Figure()
    scores = np.concatenate(data.row_lp) if data.row_lp else np.zeros(0, dtype=np.float32)
    if len(scores):
        logppl = (-scores.astype(np.float64)) / math.log(10)  # log10 of each row's perplexity
        span = max(float(logppl.max() - logppl.min()), 1e-3)
        counts_r, edges = np.histogram(logppl, bins=min(60, max(5, int(math.sqrt(len(logppl))) * 2)),
                                       range=(float(logppl.min()), float(logppl.min()) + span))  # fmt: skip
        mids = ((edges[:-1] + edges[1:]) / 2).tolist()
        ppl.add_trace(go.Bar(x=mids, y=counts_r.tolist(), width=float(edges[1] - edges[0]) * 0.95,
                             customdata=[_power10(m) for m in mids],
                             hovertemplate="perplexity ~ %{customdata:.3g}<br>%{y} rows<extra></extra>"))  # fmt: skip
        ticks = _log_ticks(float(edges[0]), float(edges[-1]))
        with np.errstate(over="ignore"):  # a perplexity past float64 is inf
            median = float(np.median(np.exp(-scores.astype(np.float64))))
        ppl.update_layout(title=f"perplexity of each result (median {_num(median)})",
                          xaxis={"title": "perplexity = exp(-mean log-prob per token), log scale",
                                 "tickvals": ticks, "ticktext": [_num(_power10(t)) for t in ticks]},
                          yaxis_title="result rows")  # fmt: skip
    note = _note(f"Token log-probs below {LP_LOW:g} are counted in the lowest bar.") if counts[0] else ""
    body = f'<div class="grid">{_figure(tokens, "token-logprobs")}{_figure(ppl, "perplexity")}</div>\n{note}'
    return _section("logprobs", title, body)


def _power10(x: float) -> float:
    """10 ** x; inf past float64 (a perplexity of a mean log-prob below -709.78: Python's power raises there)."""
    return 10.0**x if x < 308.25 else math.inf


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions (log10) at 1, 2, 5 x powers of ten inside [lo, hi]; five even ones if fewer than three."""
    ticks = [math.log10(m) + e for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 3 else [lo + (hi - lo) * i / 4 for i in range(5)]


def _num(v: float) -> str:
    """A perplexity for a tick label: 3 significant digits, thousands separated (1,160 not 1.16e+03)."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _errors_section(data: ReportData) -> str:
    import plotly.graph_objects as go

    if not data.errors:
        return _section("errors", "Errors", _note("No errors: every input row was valid and no row failed."))
    keys = sorted(data.errors, key=lambda k: -data.errors[k])
    labels = [f"{stage}: {error}" for stage, error in keys]
    fig = go.Figure(go.Bar(x=[data.errors[k] for k in keys], y=labels, orientation="h",
                           text=[data.errors[k] for k in keys], textposition="auto"))  # fmt: skip
    fig.update_layout(title="rows by error reason", xaxis={"title": "rows", **_whole(max(data.errors.values()))},
                      yaxis={"autorange": "reversed", "automargin": True}, height=max(220, 100 + 40 * len(keys)))  # fmt: skip
    rows = []
    for k in keys:
        for e in data.error_examples[k]:
            where = f"line {e['line']}" if e.get("line") is not None else ""
            rows.append([f"{k[0]}: {k[1]}", data.errors[k], e.get("id", ""), where, e.get("message", "")])
    table = _table(["reason", "rows", "example id", "where", "message"], rows, ["", "num", "", "", "text"])
    note = _note("validate: rows refused at submit (errors.jsonl); others failed at run time (`runner retry` "
                 "tries them again). The first three of each reason are listed.")  # fmt: skip
    return _section("errors", "Errors", f"{_figure(fig, 'errors')}\n{table}\n{note}")


def _memory_section(data: ReportData) -> str:
    """Each finished run (stats.json) and each worker running now (its heartbeat: peak so far)."""
    rows, peaks = [], []
    for r in data.runs:
        peak = _count(r.get("peak_memory_bytes"))
        rows.append([str(r.get("finished_at", "")), r.get("worker", ""), r.get("device", ""), r.get("dtype", ""),
                     f"{_count(r.get('rows')) or 0:,.0f}", f"{_count(r.get('tokens_per_second')) or 0:,.1f}",
                     _bytes(peak)])  # fmt: skip
        peaks.append((peak, r.get("device")))
    for worker, hb in sorted(data.live.items()):
        peak = _count(hb.get("peak_memory_bytes"))
        # (a worker frozen on this machine, SIGSTOP or Ctrl-Z, is not running: its figures are of before)
        owner = jobdir.Owner.from_dict(hb)
        now = "stopped now" if owner is not None and owner.provably_stopped() else "running now"
        rows.append([now, worker, hb.get("device") or "", "", f"{_count(hb.get('rows')) or 0:,.0f}",
                     f"{_count(hb.get('tokens_per_second')) or 0:,.1f}", _bytes(peak)])  # fmt: skip
        peaks.append((peak, hb.get("device")))
    known = [(p, d) for p, d in peaks if p is not None]
    if not known:
        why = data.runs_problem or (
            "no run has finished yet and no worker runs it now" if not rows else "the runs did not record it"
        )
        return _section("memory", "Peak memory", _note(f"Peak memory was not recorded: {why}."))
    peak, device = max(known, key=lambda x: x[0])
    head = f"Highest: {_bytes(peak)} on {device or '?'}."
    table = _table(["run finished", "worker", "device", "dtype", "rows", "tokens / s", "peak memory"], rows,
                   ["", "", "", "", "num", "num", "num"])  # fmt: skip
    note = _note("From stats.json (each run that ended, a stopped one too) and the workers' heartbeats (running now, peak so far): "
                 "on CUDA the most memory torch allocated on the GPU; on CPU the worker process's peak resident "
                 "memory.")  # fmt: skip
    return _section("memory", "Peak memory", f"<p>{_e(head)}</p>\n{table}\n{note}")


def _count(value: Any) -> float | None:
    """A number from a file another process wrote (possibly damaged): None unless finite and >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if 0 <= v < float("inf") else None


def _bytes(n: float | None) -> str:
    if n is None:
        return "not recorded"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def _settings_section(data: ReportData) -> str:
    meta = data.job.meta
    inp = meta.get("input") or {}
    rows = [["model", meta.get("model")], ["kind", meta.get("kind")], ["seed", meta.get("seed")],
            ["input", f"{inp.get('path', '?')} ({int(inp.get('rows') or 0):,} rows)"]]  # fmt: skip
    rows += [
        [f"input.{k}", _plain(inp[k])] for k in ("prompt_field", "template", "truncate", "chat") if k in inp
    ]
    rows += [[k, _plain(v)] for k, v in (meta.get("params") or {}).items() if k != "seed"]
    rows += [[f"engine.{k}", _plain(v)] for k, v in (meta.get("engine") or {}).items()]
    # every shard's own record: a job carried on on another GPU or VM mixes them (kills leave no stats.json run)
    mixed = " (mixed: the same model, other rounding)" if len(data.computed_with) > 1 else ""
    rows += [[f"computed with{mixed}", f"{how}: {n:,} rows"] for how, n in data.computed_with.most_common()]
    return _section("settings", "Settings", _table(["setting", "value"], rows, ["", "text"]))


def _plain(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _samples_section(data: ReportData) -> str:
    from .scoring import perplexity

    if not data.rows_read:
        return _section("samples", "Sample outputs", _note("No results yet."))
    kind = data.job.kind
    if kind == "embed":
        rows = [[s.id, s.tokens, _cut(s.text)] for s in data.highest]
        return _section(
            "samples", "Sample texts", _table(["id", "tokens", "text"], rows, ["", "num", "text"])
        )
    low = {(s.id, s.sample) for s in data.lowest}
    shown = [("lowest", s) for s in data.lowest]
    shown += [("highest", s) for s in data.highest if (s.id, s.sample) not in low]  # a small job: once each
    context = kind == "score" and any(s.prompt for _, s in shown)  # (context, continuation) pairs
    head = ["", "id", "sample", "tokens", "mean log-prob", "perplexity"]
    classes = ["", "", "num", "num", "num", "num"]
    if kind == "generate":
        head, classes = head + ["finish", "prompt", "output"], classes + ["", "text", "text"]
    else:
        head, classes = head + ["context"] * context + ["text"], classes + ["text"] * (1 + context)
    rows = []
    for label, s in shown:
        row = [label, s.id, s.sample, s.tokens, f"{s.score:.3f}", _num(perplexity(s.score))]
        if kind == "generate":
            row += [s.finish or "", _tail(s.prompt or "")]
        elif context:
            row.append(_tail(s.prompt or ""))
        rows.append(row + [_cut(s.text)])
    note = _note(f"The {SAMPLES} results with the lowest and the highest mean log-prob per token (outputs cut "
                 f"after {TEXT_CHARS} characters, prompts shown by their last 200).")  # fmt: skip
    return _section("samples", "Sample outputs", f"{_table(head, rows, classes)}\n{note}")


def _cut(text: str, n: int = TEXT_CHARS) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _tail(prompt: str, n: int = 200) -> str:
    """The end of a prompt: what the output continues (a chat template puts the question last)."""
    return prompt if len(prompt) <= n else "…" + prompt[-n:]
