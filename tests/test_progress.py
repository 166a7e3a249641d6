"""Progress lines: how often they come (a night in one Colab cell), and `--progress-every` reaching every command
that works on a job."""

import pytest
from helpers import invoke, write_jsonl

from runner import progress as progress_module
from runner.progress import Progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _lines_over(monkeypatch, seconds: int, **kw) -> list[float]:
    """The times (seconds into the run) at which a run updated every second prints a line."""
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    at: list[float] = []
    p = Progress(seconds, echo=lambda line: at.append(clock.now - 1000.0), **kw)
    for _ in range(seconds):
        clock.now += 1
        p.update(1, 10)
    return at


def test_an_overnight_run_prints_a_few_hundred_lines_not_thousands(monkeypatch):
    """Every 10 s for 8 hours made ~2,900 lines in a Colab cell (pass 33): every 10 s for the first five minutes,
    then a thirtieth of the run's age, at most every 5 minutes."""
    at = _lines_over(monkeypatch, 8 * 3600)
    first = [t for t in at if t <= 300]
    assert len(first) == 30 and first[:2] == [10.0, 20.0]
    assert 150 < len(at) < 250
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert max(gaps) == 300 and gaps == sorted(gaps)  # further apart as it grows old, never past 5 minutes
    assert 8 * 3600 - at[-1] <= 300


def test_a_fixed_interval_is_kept_all_night(monkeypatch):
    at = _lines_over(monkeypatch, 2 * 3600, interval=60)
    assert len(at) == 120 and {b - a for a, b in zip(at, at[1:], strict=False)} == {60.0}


@pytest.fixture
def seen_intervals(monkeypatch):
    """The interval of each Progress a command makes."""
    seen: list[float | None] = []
    original = Progress.__init__

    def init(self, *args, **kw):
        original(self, *args, **kw)
        seen.append(self.interval)

    monkeypatch.setattr(Progress, "__init__", init)
    return seen


@pytest.mark.parametrize("command", ["run", "score", "embed"])
def test_progress_every_reaches_the_work(tmp_path, tiny_gpt2, seen_intervals, command):
    rows = [{"prompt": "Hello", "text": "Hello there"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    field = ["--prompt-field", "text"] if command != "run" else []
    extra = ["--max-new-tokens", 2] if command == "run" else []
    result = invoke(
        command, path, "-m", tiny_gpt2, *field, *extra, "--progress-every", 45, "-o", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    assert seen_intervals == [45.0]
    default = invoke(command, path, "-m", tiny_gpt2, *field, *extra, "-o", tmp_path / "o2")
    assert default.exit_code == 0, default.output
    assert seen_intervals == [45.0, None]  # None: the growing default


def test_progress_every_reaches_run_batch(tmp_path, tiny_gpt2, seen_intervals):
    request = {"custom_id": "r1", "method": "POST", "url": "/v1/completions",
               "body": {"model": "m", "prompt": "Hello", "max_tokens": 2}}  # fmt: skip
    path = write_jsonl(tmp_path / "batch.jsonl", [request])
    out = tmp_path / "out.jsonl"
    result = invoke("run-batch", "-i", path, "-o", out, "-m", tiny_gpt2, "--served-model-name", "m",
                    "--progress-every", 120)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen_intervals == [120.0] and out.exists()


def test_progress_every_reaches_work_and_its_worker_processes(tmp_path, tiny_gpt2, runner_home, seen_intervals,
                                                              monkeypatch):  # fmt: skip
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello"}])
    assert invoke("submit", path, "-m", tiny_gpt2, "--max-new-tokens", 2).exit_code == 0
    forwarded: list[list[str]] = []
    monkeypatch.setattr("runner.cli._run_processes", lambda home, args, devices: forwarded.append(args) or 0)
    assert invoke("work", "--workers", 2, "--progress-every", 30).exit_code == 0
    assert forwarded and forwarded[0][-2:] == ["--progress-every", "30.0"]
    result = invoke("work", "--progress-every", 30)
    assert result.exit_code == 0, result.output
    assert seen_intervals == [30.0]


def test_progress_every_below_a_second_is_refused(tmp_path, tiny_gpt2):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello"}])
    result = invoke("run", path, "-m", tiny_gpt2, "--progress-every", 0)
    assert result.exit_code == 2 and "--progress-every" in result.output


def test_a_count_of_one_says_its_noun_in_the_singular():
    from runner.progress import counted

    assert [counted(n, "errors") for n in (0, 1, 2)] == ["0 errors", "1 error", "2 errors"]
    assert counted(1_024, "rows") == "1,024 rows" and counted(1, "responses") == "1 response"
    assert counted(1, "invalid input rows") == "1 invalid input row"
    # a verb agrees with the count ("1 result row is missing", not "1 result row(s) are missing")
    assert (
        counted(1, "result rows", "are") == "1 result row is" and counted(3, "rows", "were") == "3 rows were"
    )
    assert (
        counted(1, "other workers", "are") == "1 other worker is"
        and counted(2, "jobs", "have") == "2 jobs have"
    )


def test_a_single_invalid_row_and_a_single_retried_row_read_in_the_singular(tmp_path, tiny_gpt2, runner_home):
    """The messages that said "1 invalid row(s)" / "1 failed row(s)" say it as a person would."""
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": 5}])
    refused = invoke("submit", bad, "--model", tiny_gpt2, "--max-new-tokens", "1")
    assert refused.exit_code == 1 and "Error: 1 invalid row; nothing was run:" in refused.output, (
        refused.output
    )
    queued = invoke("submit", bad, "--model", tiny_gpt2, "--max-new-tokens", "1", "--skip-invalid")
    assert queued.exit_code == 0 and "1 row; 1 invalid row listed in errors.jsonl" in queued.output, (
        queued.output
    )
