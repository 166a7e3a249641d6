"""The click layer: exit codes and the exact words a user sees, then what landed on disk via the library."""

import errno
import json
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from helpers import invoke, write_jsonl

import runner
from runner.cli import cli


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "The quick brown fox"},
                                                    {"id": "b", "prompt": "Hello"}])  # fmt: skip


def test_run_generates_and_prints_the_job_folder(tmp_path, prompts, tiny_gpt2):
    out = tmp_path / "out"
    result = invoke("run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 3, "--stop", "\\n", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "done: 2/2 rows, 0 errors" in result.stderr
    df = runner.load_results(out)
    assert list(df["id"]) == ["a", "b"] and (df["completion_tokens"] <= 3).all()
    assert json.loads((out / "job.json").read_text())["params"]["stop"] == ["\n"]  # "\n" typed in a shell
    again = invoke("run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 3, "--stop", "\n", "-o", out)
    assert (
        "done: 2/2 rows, 0 errors, already done before: nothing computed" in again.stderr
    )  # (not "0.0 tok/s")


def test_a_run_whose_rows_another_worker_computed_does_not_say_they_were_done_before(
    tmp_path, prompts, tiny_gpt2, monkeypatch
):
    """The same `runner run` in two notebooks: the one that waited while the other computed every row said
    "already done before: nothing computed", under "completed by another worker". Here the other worker
    finishes the job inside this run's `work` (as it does while this one waits for its units)."""
    from runner import scheduler

    own_work = scheduler.work

    def another_worker_does_it(**kw):
        own_work(job=kw["job"], echo=None)
        return []

    monkeypatch.setattr(scheduler, "work", another_worker_does_it)
    args = ("run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2, "-o", tmp_path / "out")
    first = invoke(*args)
    assert first.exit_code == 0 and "done: 2/2 rows, 0 errors" in first.stderr, first.output
    assert "already done before" not in first.stderr
    assert "done: 2/2 rows, 0 errors, already done before: nothing computed" in invoke(*args).stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "1.5"], "Error: --top-p: top_p must be in [0, 1], got 1.5."),
        (
            ["--max-new-tokens", "0"],
            "Error: --max-new-tokens: max_new_tokens must be in [1, 1000000], got 0.",
        ),
        (
            ["--greedy", "--top-p", "0.9"],
            "Error: --top-p: no effect with --greedy, which takes the most likely token",
        ),
        (["--device", "tpu"], "Error: --device: device must be auto, cpu, cuda or cuda:N, got 'tpu'."),
        (
            ["--template", "{x.__class__}"],
            "Error: --template: template placeholder {x.__class__} is not allowed",
        ),
    ],
)
def test_bad_settings_name_the_option(prompts, tiny_gpt2, args, message):
    result = invoke("run", prompts, "--model", tiny_gpt2, *args)
    assert result.exit_code == 1
    assert result.output.startswith(message)
    assert "Traceback" not in result.output


def test_bad_input_lists_every_problem_and_runs_nothing(tmp_path, tiny_gpt2):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n{broken\n', encoding="utf-8")
    result = invoke("run", bad, "--model", tiny_gpt2, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{bad}:2: prompt: must be a string, got number" in result.output
    assert re.search(rf"{re.escape(str(bad))}:3: invalid JSON \(", result.output)
    assert not (tmp_path / "out").exists()


def test_unknown_model_is_an_error_not_a_traceback(prompts, tmp_path):
    result = invoke("run", prompts, "--model", tmp_path / "missing-model")
    # a mistyped folder is said as such, not as the hub's "Repo id must be in the form ..." (new-user walkthrough)
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: no model folder at {tmp_path / 'missing-model'}"
    )
    for typo in ("マイ ドライブ/my model", "./my-model", "../models/a/b"):
        result = invoke("run", prompts, "--model", typo)
        assert result.exit_code == 1 and result.output.startswith(f"Error: no model folder at {typo} "), typo


@pytest.mark.parametrize("command", ["run", "generate", "score"])
def test_an_empty_model_name_is_said_as_such(prompts, command):
    """`--model "$MODEL"` with MODEL unset (or a notebook's `--model {MODEL}` left empty) loaded the current
    directory as the model: "cannot load model '/content': Unrecognized model in /content. Should have a
    `model_type` key in its config.json" (adversarial pass 143)."""
    for empty in ("", " "):
        result = invoke(command, prompts if command != "generate" else "Hello", "--model", empty)
        assert result.exit_code == 1 and result.output.startswith("Error: --model is empty: give "), (
            result.output
        )


def test_a_folder_that_holds_no_model_is_said_as_such(prompts, tmp_path, tiny_gpt2):
    """`--model` naming a Trainer's output folder, whose models are in its checkpoint-N folders, said
    "Unrecognized model in out. Should have a `model_type` key in its config.json" (there is no config.json;
    adversarial pass 143). It says the folder holds no config.json, and names the folders in it that do."""
    import shutil

    out = tmp_path / "trainer-out"
    (out / "runs").mkdir(parents=True)
    result = invoke("run", prompts, "--model", out)
    assert result.exit_code == 1 and result.output == (
        f"Error: no config.json in {out}: not a model folder (a model saved with save_pretrained has one)\n"
    )
    for step in ("checkpoint-500", "checkpoint-1000"):
        shutil.copytree(tiny_gpt2, out / step)
    result = invoke("generate", "Hello", "--model", out)
    assert result.exit_code == 1 and result.output.endswith(
        "; the folders checkpoint-1000, checkpoint-500 in it hold models: give one of them\n"
    ), result.output


def test_every_command_has_help_and_is_in_the_readme():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for name, command in cli.commands.items():
        assert command.help and len(command.help) > 20, name
        assert f"runner {name}" in readme, f"README does not show `runner {name}`"
        assert invoke(name, "--help").exit_code == 0


README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_of_runner_run_is_in_the_readme_table():
    from runner.cli import ENGINE_FIELDS, GEN_FIELDS

    start = README.index("### Generation settings")
    table = README[start : README.index("\n\n", README.index("| option |", start))]
    settings = [
        p for p in cli.commands["run"].params if p.name in {*GEN_FIELDS, *ENGINE_FIELDS, "json_object"}
    ]
    assert len(settings) > 30
    assert [p.opts[-1] for p in settings if f"`{p.opts[-1]}" not in table] == []


def test_the_readme_installs_from_the_repository_and_says_which_commands_have_no_home():
    """PyPI's `runner` is an unrelated package: never `pip install runner[...]`. "All commands take --home" was
    said while generate and run-batch have none."""
    assert not re.search(r"pip install [\"']?runner\b", README)
    no_home = sorted(name for name, c in cli.commands.items() if "home" not in {p.name for p in c.params})
    assert no_home == ["generate", "run-batch"]
    assert "`runner generate` saves nothing and `runner run-batch` keeps its job" in " ".join(README.split())


@pytest.mark.parametrize("command", ["run", "submit", "score", "embed", "generate", "run-batch"])
def test_every_engine_option_is_a_command_line_option(command):
    from runner.cli import ENGINE_FIELDS, build_settings

    names = {p.name for p in cli.commands[command].params}
    generates = command not in ("score", "embed")  # continuous batching and CUDA graphs are generation levers
    levers = {"continuous_batching", "cuda_graphs"}
    assert set(ENGINE_FIELDS) - (levers if not generates else set()) <= names
    helped = invoke(command, "--help").output
    assert ("--continuous-batching / --no-continuous-batching" in helped) is generates
    assert ("--cuda-graphs / --no-cuda-graphs" in helped) is generates
    _, options = build_settings({"continuous_batching": True, "batch_size": 8})
    assert options.continuous_batching and options.batch_size == 8
    default = runner.EngineOptions().continuous_batching
    assert build_settings({"continuous_batching": None})[1].continuous_batching is default  # not given


def test_job_life_cycle_through_the_cli(prompts, tiny_gpt2, runner_home, tmp_path):
    result = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 3, "--name", "night1")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert (
        f"queued generate job {job_id}: 2 rows" in result.stderr
        and (runner_home / job_id / "job.json").is_file()
    )
    table = invoke("status").stdout
    assert "night1" in table and "queued" in table and "0/2" in table
    assert invoke("cancel", "night1").exit_code == 0
    assert "nothing to do" in invoke("work").stderr
    assert invoke("retry", "night1").exit_code == 0
    result = invoke("work", "--hours", 1)
    assert result.exit_code == 0 and f"job {job_id} completed: 2/2 rows" in result.stderr
    detail = invoke("status", "night1").stdout
    assert "state:    completed" in detail and "progress: 2/2 rows" in detail
    assert "chat" not in detail.split("settings: ")[1].splitlines()[0]
    out = tmp_path / "night1.jsonl"
    assert invoke("results", "night1", "--to", out).exit_code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b"] and all("token_logprobs" in r for r in lines)
    assert invoke("results", "night1", "--to", tmp_path / "x.txt").exit_code == 2
    preview = invoke("results", "night1").stdout  # which prompt gave which text
    assert "The quick brown fox" in preview.splitlines()[1] and "(2 rows; --to FILE to export)" in preview
    from runner.cli import _shortened

    assert _shortened("a  long\nprompt " * 9, 12) == "a long prom\u2026" and _shortened(None) is None
    result = invoke("status", "../etc")
    assert result.exit_code == 1 and "no job folder ../etc" in result.output


def test_work_exits_1_when_a_job_failed_and_still_runs_the_others(tmp_path, prompts, tiny_gpt2, runner_home):
    """`runner work && next-step` must not go on as if all went well when a job failed (found by a user
    walkthrough: exit 0 and "nothing to do"); the other jobs still run."""
    import shutil

    model = shutil.copytree(tiny_gpt2, tmp_path / "model")
    assert invoke("submit", prompts, "-m", model, "--max-new-tokens", 2, "--name", "gone").exit_code == 0
    assert invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2, "--name", "fine").exit_code == 0
    (model / "model.safetensors").write_bytes(b"not a safetensors file" * 64)  # (a folder gone waits instead)
    result = invoke("work")
    assert result.exit_code == 1, result.output
    gone = runner.open_job("gone").id
    assert f"Error: 1 job failed: {gone} (`runner status JOB` says why" in result.output
    assert "nothing to do" not in result.output and "`runner retry JOB` re-queues it)" in result.output
    assert runner.status("fine").state == "completed" and runner.status("gone").state == "failed"
    # a damaged prompts file does not fail its job: it is broken, for `runner repair` to write it again from the
    # input file (a retry would read it again; submitting again loses the rows done: pass 120)
    assert invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 3, "--name", "torn").exit_code == 0
    data = bytearray((runner.open_job("torn").dir / "prompts.parquet").read_bytes())
    data[100] ^= 0xFF
    (runner.open_job("torn").dir / "prompts.parquet").write_bytes(bytes(data))
    result = invoke("work")
    torn = runner.open_job("torn")
    assert f"job {torn.id} is broken (prompts.parquet of job {torn.id} is damaged" in result.output, (
        result.output
    )
    assert "writes it again from the input file" in result.output and "runner retry" not in result.output
    assert runner.status("torn").state == "broken"
    # ...and `runner work` says it did not run, exit 1, not "nothing to do" and 0 (pass 122): also for that job
    # alone, and beside a job that ran
    for args in (["work"], ["work", "--job", "torn"]):
        result = invoke(*args)
        assert result.exit_code == 1 and "nothing to do" not in result.output, result.output
        assert f"Error: 1 job is broken and skipped: {torn.id} (`runner status JOB` says why" in result.output
    assert invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2, "--name", "next").exit_code == 0
    result = invoke("work")
    assert result.exit_code == 1 and f"Error: 1 job is broken and skipped: {torn.id}" in result.output
    assert runner.status("next").state == "completed"


def test_run_again_on_a_broken_job_says_it_did_not_run(tmp_path, prompts, tiny_gpt2):
    """`runner run ... -o DIR` again on a job gone broken said "stopped with 0/2 rows done; run the same command
    again to carry on", which carries on with nothing (pass 122): it says the job is broken, exit 1."""
    out = tmp_path / "out"
    runner.run(prompts, tiny_gpt2, runner.GenerationParams(max_new_tokens=3), output=out, stop=lambda: True)
    data = bytearray((out / "prompts.parquet").read_bytes())
    data[100] ^= 0xFF
    (out / "prompts.parquet").write_bytes(bytes(data))
    result = invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 3, "-o", out)
    assert result.exit_code == 1 and "run the same command again" not in result.output, result.output
    job = runner.open_job(out).id
    assert f"is broken (prompts.parquet of job {job} is damaged" in result.output
    assert f"Error: job {job} is broken and did not run (`runner status {out}` says why" in result.output
    assert invoke("repair", out).exit_code == 0
    result = invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 3, "-o", out)
    assert result.exit_code == 0 and runner.status(out).state == "completed", result.output


def test_work_deadline_options_are_checked(runner_home):
    assert "give --hours or --until, not both" in invoke("work", "--hours", 1, "--until", "06:00").output
    assert "expected HH:MM" in invoke("work", "--until", "six").output
    assert invoke("work", "--hours", -1).exit_code == 2


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("work", "--hours"), "--hours"),
        (("work", "--shard-minutes"), "--shard-minutes"),
        (("work", "--progress-every"), "--progress-every"),
        (("watch", "JOB", "--every"), "--every"),
        (("run", "in.jsonl", "-m", "gpt2", "--progress-every"), "--progress-every"),
        (("score", "in.jsonl", "-m", "gpt2", "--progress-every"), "--progress-every"),
        (("embed", "in.jsonl", "-m", "gpt2", "--progress-every"), "--progress-every"),
        (
            ("run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "-m", "gpt2", "--progress-every"),
            "--progress-every",
        ),
    ],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_refuse_nan_and_inf(runner_home, args, option, value):
    """click's FloatRange lets nan through (every comparison with it is false): `runner work --hours nan` had no
    deadline, `--progress-every nan` said nothing until the end. Refused as the generation settings are."""
    result = invoke(*args, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': must be a finite number, got {float(value)}." in result.output


@pytest.mark.parametrize("option", ["--hours", "--shard-minutes"])
def test_a_huge_finite_hours_or_shard_minutes_is_refused_not_a_traceback(runner_home, option):
    # (1e306 hours overflowed the deadline to inf, which work() refuses: a ValueError traceback)
    result = invoke("work", option, "1e306")
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert "Traceback" not in result.output


def test_colab_warns_when_the_home_is_not_on_drive(prompts, tiny_gpt2, monkeypatch, tmp_path):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", prompts, "--model", tiny_gpt2)
    assert result.exit_code == 0
    assert "WARNING: the job home" in result.stderr and "not on Google Drive" in result.stderr
    # `runner run -o DIR`: the job folder is DIR, which --home does not move; -o on Drive is the advice (pass 44)
    out = invoke("run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 1, "-o", "out/x")
    assert out.exit_code == 0 and "--home" not in out.stderr, out.stderr
    assert f"WARNING: the job folder {Path('out/x').resolve()} is not on Google Drive" in out.stderr
    assert "give -o a path there, e.g. -o /content/drive/MyDrive/x" in out.stderr
    # `runner work --job out/x`: --job makes no job, so the folder is copied there first (pass 48); run-batch's
    # job folder goes beside its -o file
    said = invoke("work", "--job", "out/x").stderr
    copy = (
        f"copy the job there, `cp -r {Path('out/x').resolve()} /content/drive/MyDrive/x`, then `runner work"
    )
    assert copy in said and "--job /content/drive/MyDrive/x`" in said, said
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {"model": "m", '
                     '"prompt": "Hi", "max_tokens": 1}}\n')  # fmt: skip
    said = invoke(
        "run-batch", "-i", batch, "-o", "out/r.jsonl", "-m", tiny_gpt2, "--served-model-name", "m"
    ).stderr
    assert f"WARNING: the job folder {Path('out/r.jsonl.job').resolve()} is not on Google Drive" in said, said
    assert "give -o a path there, e.g. -o /content/drive/MyDrive/r.jsonl" in said


def test_colab_refuses_a_home_on_drive_before_drive_is_mounted(prompts, tiny_gpt2, monkeypatch, tmp_path):
    """`--home /content/drive/MyDrive/runner-jobs` in a cell run before drive.mount made the folders on the VM's
    own disk, without a word (the path reads as Drive): the jobs died with the VM, and drive.mount then refused
    the mount point that was no longer empty. Refused, naming the mount, before anything is made there: by the
    commands, and by the Python API a notebook calls (`runner.run(..., output=...)`, `export_results`)."""
    from runner import storage

    drive = tmp_path / "content" / "drive"
    monkeypatch.setattr(storage, "DRIVE", str(drive))
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    home = drive / "MyDrive" / "runner-jobs"
    for args in (("submit", prompts, "--model", tiny_gpt2), ("work",),
                 ("run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 1, "-o", drive / "MyDrive" / "x")):  # fmt: skip
        result = invoke("--home", home, *args)
        assert result.exit_code == 1, result.output
        assert f"Google Drive is not mounted at {drive}" in result.stderr and "drive.mount(" in result.stderr
        assert "Traceback" not in result.output and not drive.exists()
    job = runner.submit(prompts, tiny_gpt2, job_dir=tmp_path / "job")
    for call in (lambda: runner.run(prompts, tiny_gpt2, output=drive / "MyDrive" / "y", echo=None),
                 lambda: runner.submit(prompts, tiny_gpt2, home=home),
                 lambda: runner.export_results(job.dir, drive / "MyDrive" / "r.parquet")):  # fmt: skip
        with pytest.raises(runner.RunnerError, match=f"Google Drive is not mounted at {drive}"):
            call()
        assert not drive.exists()
    mounted = str(drive)
    monkeypatch.setattr(storage.os.path, "ismount", lambda p: str(p) == mounted)
    result = invoke("--home", home, "submit", prompts, "--model", tiny_gpt2)
    assert result.exit_code == 0 and "WARNING" not in result.stderr, result.output


def test_template_takes_the_same_escapes_as_stop(tmp_path, tiny_gpt2, runner_home):
    """The README's QA example: `--template "...\\nAnswer:"` typed in a shell sends a newline, not "\\n"."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q", "context": "Paris is in France.", "question": "Where?"}) + "\n")
    result = invoke(
        "submit",
        qa,
        "--model",
        tiny_gpt2,
        "--template",
        "Context: {context}\\nQuestion: {question}\\nAnswer:",
    )
    assert result.exit_code == 0, result.output
    import runner

    prompt = runner.open_job(result.stdout.strip()).prompts().column("prompt")[0].as_py()
    assert prompt == "Context: Paris is in France.\nQuestion: Where?\nAnswer:"


def test_results_export_lists_as_json_in_csv_and_an_array_in_json(prompts, tiny_gpt2, tmp_path, runner_home):
    import csv

    result = invoke(
        "run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 3, "--logprobs", 1, "-o", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    assert invoke("results", tmp_path / "o", "--to", tmp_path / "r.csv").exit_code == 0
    assert (tmp_path / "r.csv").read_bytes().startswith(b"\xef\xbb\xbfid,")  # a BOM: Excel reads UTF-8 then
    rows = list(csv.DictReader((tmp_path / "r.csv").open(encoding="utf-8-sig")))
    assert pd.read_csv(tmp_path / "r.csv").columns[0] == "id"  # pandas (and runner's own reader) skip the BOM
    assert json.loads(rows[0]["token_ids"]) and all(
        isinstance(i, int) for i in json.loads(rows[0]["token_ids"])
    )
    assert json.loads(rows[0]["top_logprobs"])[0][0]["rank"] == 1
    assert invoke("results", tmp_path / "o", "--to", tmp_path / "r.json").exit_code == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(data, list) and [r["id"] for r in data] == ["a", "b"]
    # The same export from Python; a type it cannot write is refused before anything is read.
    import runner

    written = runner.export_results(tmp_path / "o", tmp_path / "p.jsonl")
    assert (written.rows, written.errors) == (2, 0) and repr(written) == "Exported(rows=2, errors=0)"
    assert [json.loads(line)["id"] for line in (tmp_path / "p.jsonl").read_text().splitlines()] == ["a", "b"]
    with pytest.raises(ValueError, match="unknown type '.txt'"):
        runner.export_results(tmp_path / "o", tmp_path / "p.txt")
    bad = invoke("results", tmp_path / "o", "--to", tmp_path / "r.txt")
    assert bad.exit_code == 2 and "unknown type '.txt'" in bad.output
    # `--to -`, the shell's way to say standard output: said so, not "unknown type '(none)'"
    bad = invoke("results", tmp_path / "o", "--to", "-")
    assert bad.exit_code == 2 and "not to standard output; name one (.jsonl" in bad.output, bad.output


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_results_errors_to_writes_the_rows_that_could_not_be_done_beside_a_table_export(
    suffix, tmp_path, tiny_gpt2, runner_home
):
    """`--errors-to` was ignored without `--format openai`, silently (its help said so). A table export now
    writes read_errors to it (typed by suffix as --to), and refuses one file for both before writing either."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hello"}\n{"id": "b"}\n{"id": "c", "prompt": "The fox"}\n')
    result = invoke(
        "run", src, "--model", tiny_gpt2, "--max-new-tokens", 2, "--skip-invalid", "-o", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    out, errors = tmp_path / "r.jsonl", tmp_path / f"errors{suffix}"
    errors.write_text("OLDER EXPORT'S ERRORS")
    done = invoke("results", tmp_path / "o", "--to", out, "--errors-to", errors)
    assert done.exit_code == 0, done.output
    assert f"wrote 2 rows to {out} and 1 error to {errors}" in done.output
    got = pd.read_parquet(errors) if suffix == ".parquet" else None
    if suffix == ".jsonl":
        got = pd.read_json(errors, lines=True)
    elif suffix == ".csv":
        got = pd.read_csv(errors)
    assert (
        got["id"].tolist() == ["b"] and got["line"].tolist() == [2] and got["stage"].tolist() == ["validate"]
    )
    assert "prompt" in got["message"][0] and got["field"].tolist() == ["prompt"]
    import runner

    assert runner.export_results(tmp_path / "o", out, errors_to=errors) == (2, 1)
    same = invoke("results", tmp_path / "o", "--to", out, "--errors-to", out)
    assert same.exit_code != 0 and "must be two files" in same.output and "Traceback" not in same.output
    assert len(out.read_text().splitlines()) == 2  # refused before anything was written
    bad = invoke("results", tmp_path / "o", "--to", out, "--errors-to", tmp_path / "e.txt")
    assert bad.exit_code == 2 and "--errors-to" in bad.output and "unknown type '.txt'" in bad.output


def test_results_errors_to_alone_writes_the_errors_file(tmp_path, tiny_gpt2, runner_home):
    """`runner results JOB --errors-to e.jsonl` without --to printed the preview and wrote nothing (exit 0): the
    errors file is written alone, and said; the preview is for neither option given."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hello"}\n{"id": "b", "prompt": 5}\n')
    ran = invoke("run", src, "-m", tiny_gpt2, "--max-new-tokens", 2, "--skip-invalid", "-o", tmp_path / "o")
    assert ran.exit_code == 0, ran.output
    errors = tmp_path / "e.jsonl"
    done = invoke("results", tmp_path / "o", "--errors-to", errors)
    assert done.exit_code == 0, done.output
    assert done.stdout == "" and f"wrote 1 error to {errors}" in done.stderr
    got = pd.read_json(errors, lines=True)
    assert (
        got["id"].tolist() == ["b"] and got["line"].tolist() == [2] and got["stage"].tolist() == ["validate"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.jsonl",
        "in.jsonl",
        "o",
    ]  # no rows file beside it
    # (`to` may be left out for the errors alone: it is None by default)
    assert runner.export_results(tmp_path / "o", errors_to=tmp_path / "e.csv") == (0, 1)
    assert pd.read_csv(tmp_path / "e.csv")["id"].tolist() == ["b"]
    with pytest.raises(ValueError, match="needs `to` or `errors_to`"):
        runner.export_results(tmp_path / "o")
    bad = invoke("results", tmp_path / "o", "--errors-to", tmp_path / "e.txt")
    assert bad.exit_code == 2 and "--errors-to" in bad.output and "unknown type '.txt'" in bad.output


def test_an_empty_file_path_is_refused_at_once_naming_its_option(tmp_path, prompts, tiny_gpt2, monkeypatch):
    """`runner results JOB --to ''` renamed onto '.' (Path("")), retried that for a minute as a busy mount, then
    blamed the file system ("Device or resource busy"); so did `report -o ''`. Refused at once, as a usage error."""
    from runner import storage

    monkeypatch.setattr(
        storage, "RETRY_DELAYS", ()
    )  # (without the check: the busy error at once, not a minute)
    job = tmp_path / "o"
    assert invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2, "-o", job).exit_code == 0
    for args, option in [
        (("results", job, "--to", ""), "'--to'"),
        (("results", job, "--to", tmp_path / "r.jsonl", "--errors-to", ""), "'--errors-to'"),
        (("results", job, "--errors-to", ""), "'--errors-to'"),
        (("results", job, "--format", "openai", "--to", ""), "'--to'"),
        (("report", job, "-o", ""), "'-o' / '--output'"),
        (("run-batch", "-i", prompts, "-o", "", "-m", tiny_gpt2), "'-o' / '--output-file'"),
    ]:
        refused = invoke(*args)
        assert refused.exit_code == 2, (args, refused.output)
        assert f"Invalid value for {option}: an empty path names no file" in refused.output, refused.output
    # ...and a folder or input file (`-o ''` said ". exists and is not a runner job folder", `--home ''` "no jobs
    # in ", `submit ''` "INPUT: .: unknown file type")
    for args, said in [
        (("run", prompts, "-m", tiny_gpt2, "-o", ""), "'-o' / '--output': an empty path names no folder"),
        (("status", "--home", ""), "'--home': an empty path names no folder"),
        (("--home", "", "status"), "'--home': an empty path names no folder"),
        (("submit", "", "-m", tiny_gpt2), "'INPUT': an empty path names no file"),
    ]:
        refused = invoke(*args)
        assert refused.exit_code == 2 and f"Invalid value for {said}" in refused.output, (
            args,
            refused.output,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "prompts.jsonl"]
    with pytest.raises(ValueError, match="an empty path names no file"):
        runner.export_results(job, "")


def test_results_errors_to_that_cannot_be_written_whole_leaves_the_older_pair(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Pass 67: the older errors file was removed before the new rows were written; a full disk then left the
    older rows beside no errors file, which reads as an export without errors. Both are staged whole first."""
    from runner import storage

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hello"}\n{"id": "b"}\n')
    assert (
        invoke(
            "run", src, "-m", tiny_gpt2, "--max-new-tokens", 2, "--skip-invalid", "-o", tmp_path / "o"
        ).exit_code
        == 0
    )
    out, errors = tmp_path / "r.csv", tmp_path / "e.csv"
    out.write_text("OLDER ROWS")
    errors.write_text("OLDER ERRORS")
    real = storage.fsync_file

    def full_disk(path):
        if "e.csv" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(storage, "fsync_file", full_disk)
    failed = invoke("results", tmp_path / "o", "--to", out, "--errors-to", errors)
    assert (
        failed.exit_code != 0
        and f"cannot write {errors}" in failed.output
        and "Traceback" not in failed.output
    )
    assert out.read_text() == "OLDER ROWS" and errors.read_text() == "OLDER ERRORS"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_home_is_taken_after_the_command_too(tmp_path, prompts, tiny_gpt2, monkeypatch):
    monkeypatch.delenv("RUNNER_HOME")
    home = tmp_path / "elsewhere"
    assert invoke("submit", prompts, "--model", tiny_gpt2, "--home", home).exit_code == 0
    result = invoke("status", "--home", home)
    assert result.exit_code == 0 and "queued" in result.stdout


class _Exited(Exception):
    pass


@pytest.mark.parametrize(
    "argv, code, where",
    [
        (["runner", "--version"], 0, "out"),
        (["runner", "status", "no-such-job"], 1, "err"),
        (["runner", "--no-such-option"], 2, "err"),
    ],
)
def test_the_command_ends_without_the_interpreter_teardown(argv, code, where, monkeypatch, capsys, tmp_path):
    """pyarrow's native thread pools can abort the teardown after a successful command (exit -6 in the fault
    campaign): `runner` flushes its output and leaves with os._exit and its own exit code."""
    from runner import cli as cli_mod

    def fake_exit(rc):
        raise _Exited(rc)

    monkeypatch.setattr(cli_mod.os, "_exit", fake_exit)
    monkeypatch.setattr(cli_mod.sys, "argv", argv)
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    with pytest.raises(_Exited) as e:
        cli_mod.main()
    assert e.value.args == (code,)
    out, err = capsys.readouterr()
    assert (out if where == "out" else err).strip()


def test_inside_a_notebook_the_command_raises_system_exit(monkeypatch, tmp_path):
    from runner import cli as cli_mod

    monkeypatch.setattr(cli_mod.os, "_exit", lambda rc: pytest.fail("os._exit inside a notebook kernel"))
    monkeypatch.setattr(cli_mod.sys, "argv", ["runner", "status", "no-such-job"])
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 1


WAIT_VARS = runner.OPENMP_WAIT_VARS


@pytest.mark.slow  # (a real Python process: make test, not test-fast)
@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
        ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT": "300000"}),
    ],
)
def test_openmp_threads_spin_briefly_unless_told_otherwise(given, expected):
    """Spinning OpenMP threads starve other processes on a shared CPU: `import runner` (which the command
    and every worker do before torch) makes them spin briefly then sleep, unless the user chose a wait."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS} | given
    code = f"import runner, os, torch; print({{k: os.environ[k] for k in {WAIT_VARS!r} if k in os.environ}})"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(expected)


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
@pytest.mark.parametrize("torch_first", [True, False])
def test_a_cpu_engine_warns_when_torch_came_first(tiny_gpt2, torch_first):
    """In a notebook that imported torch before runner, the thread wait above comes too late: a CPU engine
    with several threads says so (a warning, once), and says nothing when runner came first."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in (*WAIT_VARS, "OMP_NUM_THREADS")}
    imports = "import torch, runner" if torch_first else "import runner, torch"
    code = (f"{imports}; torch.set_num_threads(2); from runner.engine import Engine; Engine({tiny_gpt2!r}); "
            f"Engine({tiny_gpt2!r})")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stderr.count("torch was imported before runner") == (1 if torch_first else 0), out.stderr


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
def test_a_reader_that_stops_reading_is_not_blamed_on_the_job_home(tmp_path, prompts, tiny_gpt2, runner_home):
    """`runner status | head -2`: the pipe closes before runner has written; it ends quietly with exit 141 (as a
    process killed by SIGPIPE), not with "Error: cannot read or write the job home: Broken pipe" (found by a
    user walkthrough)."""
    import subprocess

    import workers

    assert invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2).exit_code == 0
    env = workers.worker_env({"RUNNER_HOME": str(runner_home)})
    proc = subprocess.Popen([sys.executable, "-m", "runner", "status"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=workers.ROOT)  # fmt: skip
    proc.stdout.close()  # before the interpreter has even started: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_submit_notes_the_sampling_settings_of_the_models_generation_config(tmp_path, prompts, tiny_gpt2):
    """A model whose generation_config.json asks for sampling (model.generate() would sample): runner applies
    only the settings given, and says so at submit with the options that would use them (found by a user
    walkthrough: the same greedy text, silently). Settings the user gave are not second-guessed."""
    import shutil

    model = shutil.copytree(tiny_gpt2, tmp_path / "model")
    config = json.loads((model / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.7, top_k=20, repetition_penalty=1.3)
    (model / "generation_config.json").write_text(json.dumps(config))
    out = invoke("submit", prompts, "-m", model, "--max-new-tokens", 2).stderr
    assert (
        "generation_config.json asks for temperature=0.7, top_k=20, repetition_penalty=1.3 (sampling)" in out
    )
    assert "pass --temperature 0.7 --top-k 20 --repetition-penalty 1.3" in out
    out = invoke("submit", prompts, "-m", model, "--max-new-tokens", 2, "--temperature", "0.9").stderr
    assert "pass --top-k 20 --repetition-penalty 1.3" in out
    out = invoke("submit", prompts, "-m", model, "--max-new-tokens", 2, "--temperature", "0").stderr
    assert "asks for repetition_penalty=1.3, which" in out
    assert (
        "generation_config.json"
        not in invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2).stderr
    )


def test_an_unnamed_submit_of_a_queued_jobs_file_and_settings_warns_it_is_a_second_job(
    prompts, tiny_gpt2, runner_home
):
    """Running a notebook's cells again after a VM's death queued the same work twice without a word, and
    `runner work` computed both (pass 33). The seed aside (an unseeded submit picks a new one each time)."""
    args = ("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2, "--temperature", "0.8")
    first = invoke(*args).stdout.strip()
    again = invoke(*args)
    second = again.stdout.strip()
    assert second != first and f"WARNING: job {first} (queued, submitted " in again.stderr, again.stderr
    assert (
        f"Give --name, so that a rerun returns its job; `runner cancel {second}` drops this one"
        in again.stderr
    )
    other = invoke(*args[:-1], "0.9")  # other settings: no twin
    assert other.exit_code == 0 and "WARNING: job" not in other.stderr
    assert invoke("cancel", first).exit_code == 0 and invoke("cancel", second).exit_code == 0
    assert "WARNING: job" not in invoke(*args).stderr  # cancelled ones are no twins


def test_jobs_of_their_own_seeds_or_their_own_folders_are_no_twins(
    prompts, tiny_gpt2, runner_home, tmp_path, monkeypatch
):
    """`runner run -o out/seed1 --seed 1` and `-o out/seed2 --seed 2`, both interrupted: resuming the second
    warned that the first was "a second job, and `runner work` computes both", and said to cancel the job being
    resumed (pass 44). A job in a folder of its own is never run by `runner work`, and jobs of other explicit
    seeds are not the same work."""
    args = ("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2, "--temperature", "0.8")
    assert invoke(*args, "--seed", 1).exit_code == 0
    assert "WARNING: job" not in invoke(*args, "--seed", 2).stderr  # another seed, given: other work
    assert "WARNING: job" in invoke(*args, "--seed", 2).stderr  # the same seed again: a twin
    from runner.jobs import create_job, submit_warnings

    params = runner.GenerationParams(max_new_tokens=2, temperature=0.8)  # unseeded: the same work each time
    first = create_job(
        prompts, tiny_gpt2, params, job_dir=tmp_path / "out" / "a"
    )  # queued, as if interrupted
    second = create_job(prompts, tiny_gpt2, params, job_dir=tmp_path / "out" / "b")
    assert first.id != second.id and not [w for w in submit_warnings(second) if "WARNING: job" in w]
    # in a home given with --home, its cancel hint names it (pasted without, it looked in ./jobs)
    monkeypatch.delenv("RUNNER_HOME")
    home = tmp_path / "drive home"
    assert invoke("--home", home, *args).exit_code == 0
    again = invoke("--home", home, *args)
    assert f"`runner --home '{home}' cancel {again.stdout.strip()}` drops this one" in again.stderr, (
        again.stderr
    )


def test_the_jobs_log_records_how_each_run_began_and_ended(prompts, tiny_gpt2, runner_home, monkeypatch):
    """log.txt had the progress lines but not the starting, completed, stopped or cancelled lines `runner work`
    printed: a cancelled job's log just stopped (pass 33). Lines of `--workers N` carry their worker's label."""
    job_id = invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    monkeypatch.setenv("RUNNER_WORKER_LABEL", "w2")
    assert invoke("work").exit_code == 0
    log = (runner.open_job(job_id).dir / "log.txt").read_text()
    assert (
        f"[w2] starting job {job_id}\n" in log and f"[w2] job {job_id} completed: 2/2 rows, 0 errors\n" in log
    )


def test_a_max_length_column_is_said_to_be_data(tmp_path, tiny_gpt2, runner_home):
    """A row giving max_length (model.generate()'s name, the tutorials' habit) was silently passed through as
    data, the row generated to the job's limit (pass 33)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello", "max_length": 20}])
    said = invoke("submit", path, "-m", tiny_gpt2).stderr
    assert "note: 'max_length' is kept as data, not a setting: a row's own limits are max_new_tokens" in said
    plain = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hello", "max_new_tokens": 20}])
    assert "kept as data" not in invoke("submit", plain, "-m", tiny_gpt2).stderr


def test_best_of_and_echo_columns_are_said_to_be_data(tmp_path, tiny_gpt2, runner_home):
    """A plain row giving best_of or echo, as an OpenAI /v1/completions request does (and a Batch file's request
    takes them), was passed through as data without a word: each row one sample, its `--format openai` answer
    without its prompt. They stay data, as every column no row setting names does, and submit says so."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello", "best_of": 3, "echo": True}])
    said = invoke("submit", path, "-m", tiny_gpt2, "--max-new-tokens", "2")
    assert said.exit_code == 0, said.output
    assert (
        "note: 'best_of' and 'echo' are kept as data, not settings: a plain row is no OpenAI request; runner has "
        "no best_of: -n N (or a row's n) returns all N samples" in said.stderr
    ), said.stderr
    assert "an OpenAI Batch file's /v1/completions request takes echo" in said.stderr
    echo = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Hello", "echo": False}])
    assert "note: 'echo' is kept as data, not a setting" in invoke("submit", echo, "-m", tiny_gpt2).stderr
    plain = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hello", "n": 2, "temperature": 1.0}])
    assert "kept as data" not in invoke("submit", plain, "-m", tiny_gpt2).stderr


def test_a_column_named_almost_like_a_row_setting_is_said_to_be_data(tmp_path, tiny_gpt2, runner_home):
    """A CSV from Excel with a `Temperature` or `max_new_token` column (a capital, a letter short) was passed
    through as data without a word, every row generated with the job's settings (adversarial pass 143)."""
    path = tmp_path / "p.csv"
    path.write_text("prompt,Temperature,max_new_token,topic,top\nHello,0.5,3,cats,1\n", encoding="utf-8")
    said = invoke("submit", path, "-m", tiny_gpt2).stderr
    assert (
        "note: 'Temperature' (did you mean 'temperature'?) and 'max_new_token' (did you mean 'max_new_tokens'?) "
        "are kept as data, not settings: a row's settings have these exact names" in said
    ), said
    assert "'topic'" not in said and "'top'" not in said  # ('top' is not a letter off 'stop')
    plain = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hello", "temperature": 0.5, "topic": "cats"}])
    assert "kept as data" not in invoke("submit", plain, "-m", tiny_gpt2).stderr


def test_submit_says_when_the_job_is_already_there_and_counts_per_row_samples(
    tmp_path, tiny_gpt2, runner_home
):
    """Found by a user walkthrough: submitting a completed job again said "queued ... 3 rows x 2 samples = 4
    results" (it was not queued, and one row had n = 2, not all); cancelling a running job said "(was queued)".
    Submitting a job still queued again said "queued generate job ..." as if it were a new one."""
    rows = [
        {"id": "a", "prompt": "Hello", "n": 2},
        {"id": "b", "prompt": "The fox"},
        {"id": "c", "prompt": "My"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    args = ("submit", path, "-m", tiny_gpt2, "--max-new-tokens", 2, "--temperature", "0.8", "--name", "n1")
    first = invoke(*args)
    assert (
        f"queued generate job {first.stdout.strip()}: 3 rows (4 results with their samples)" in first.stderr
    )
    queued = invoke(*args)  # submitted again before any work: not "queued generate job ..." again, as if new
    assert queued.exit_code == 0 and queued.stdout == first.stdout and "queued generate" not in queued.stderr
    assert (
        f"job {first.stdout.strip()} (the same file and settings) is already there: queued, 0/4 results"
        in queued.stderr
    )
    assert len(runner.status()) == 1
    worked = invoke("work")  # its progress counts the 4 results, as the submit line said, not "4/4 rows"
    assert worked.exit_code == 0 and "completed: 4/4 results, 0 errors" in worked.stderr, worked.stderr
    again = invoke(*args)
    assert again.stdout == first.stdout
    assert (
        f"job {first.stdout.strip()} (the same file and settings) is already there: completed, 4/4 results"
        in again.stderr
    )
    from runner.jobdir import Heartbeat, Owner

    assert invoke("submit", path, "-m", tiny_gpt2, "--max-new-tokens", 3, "--name", "n2").exit_code == 0
    with Heartbeat(runner.open_job("n2"), Owner.me(), 60):  # a live worker on it
        assert runner.status("n2").state == "running"
        assert "cancelled job n2 (was running)" in invoke("cancel", "n2").stderr


def test_results_of_an_unfinished_job_say_they_are_partial(tmp_path, prompts, tiny_gpt2, runner_home):
    """Found by a user walkthrough: load_results and `runner results` on a queued, running or cancelled job
    returned some of the rows without a word. A complete job says nothing."""
    job_id = invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    with pytest.warns(UserWarning, match=f"job {job_id} is queued: these are 0 of its 2 results"):
        assert len(runner.load_results(job_id)) == 0
    result = invoke("results", job_id, "--to", tmp_path / "r.jsonl")
    assert f"[runner] warning: job {job_id} is queued: these are 0 of its 2 results" in result.stderr
    assert invoke("work").exit_code == 0
    result = invoke("results", job_id, "--to", tmp_path / "r.jsonl")
    assert result.exit_code == 0 and "warning" not in result.stderr
    # a cancelled job's other rows come only after a retry, not "not generated yet"
    other = invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 3).stdout.strip()
    assert invoke("cancel", other).exit_code == 0
    with pytest.warns(UserWarning, match=r"is cancelled: these are 0 of its 2 results \(the rest are computed only "
                                         r"after `runner retry .*`\)"):  # fmt: skip
        runner.load_results(other)
    status = invoke("status", job_id).output
    assert re.search(r"speed:    [\d,]+\.\d tok/s", status) and "(2 prompts)" in status, status


@pytest.mark.parametrize("command", ["score", "embed"])
def test_score_and_embed_offer_no_generate_only_options(command):
    """Found by a user walkthrough: `score --help` listed --chat (refused when given), --continuous-batching
    and --served-model-name (accepted, silently ignored)."""
    help_text = invoke(command, "--help").output
    for option in ("--chat", "--continuous-batching", "--served-model-name", "--max-new-tokens"):
        assert option not in help_text
    result = invoke(command, "x.jsonl", "-m", "gpt2", "--continuous-batching")
    assert result.exit_code == 2 and "No such option '--continuous-batching'" in result.output


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
def test_a_closed_stderr_does_not_stop_the_work(tmp_path, prompts, tiny_gpt2):
    """`runner run ... 2>&1 | head -3`: once the reader is gone, the progress lines go nowhere (log.txt keeps
    them) and the job still finishes; before, the first line after it killed the run (found by adversarial pass
    9, with exit code 0 for an unfinished job)."""
    import subprocess

    import workers

    out = tmp_path / "out"
    args = ["run", str(prompts), "-m", str(tiny_gpt2), "--max-new-tokens", "2", "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=workers.worker_env(), cwd=workers.ROOT)  # fmt: skip
    proc.stderr.close()  # before the first progress line
    printed = proc.stdout.read().decode()
    assert proc.wait() == 0 and printed.strip() == str(out)
    assert runner.status(out).state == "completed" and "2/2 rows (100.0%)" in (out / "log.txt").read_text()


def test_the_partial_results_warning_is_said_only_when_rows_are_missing(tmp_path, prompts, tiny_gpt2):
    """A complete job whose state files are damaged says no "partial" falsehood (found by adversarial pass 9:
    'broken: 0 of its 0 results', 'queued (interrupted): 2 of its 2 results')."""
    import warnings

    out = tmp_path / "out"
    assert invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2, "-o", out).exit_code == 0
    (out / "completed.json").write_text("{garbled")
    workers_dir = out / "workers"
    if workers_dir.is_dir():
        workers_dir.rmdir()
    workers_dir.write_text("a file where the workers folder was")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(runner.load_results(out)) == 2
    assert not [w for w in seen if "results (the rest" in str(w.message)], [str(w.message) for w in seen]


def test_work_with_nothing_to_do_names_a_completed_job_that_lost_rows(prompts, tiny_gpt2, runner_home):
    """A completed job whose shard was lost since: `runner work` leaves it to `runner repair` (its rows are not
    queued), but says so instead of a bare "nothing to do" (adversarial pass 16)."""
    import shutil

    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    assert invoke("work").exit_code == 0
    shutil.rmtree(runner_home / job_id / "shards")
    said = invoke("work").stderr
    assert f"job {job_id} completed, but 2 result rows are missing" in said and "runner repair" in said
    assert "nothing to do" in said
    status = json.loads(invoke("status", job_id, "--json").stdout)
    assert (status["state"], status["missing"]) == ("broken", 2)
    assert invoke("repair", job_id).exit_code == 0
    assert f"job {job_id} completed: 2/2 rows" in invoke("work").stderr


def test_work_on_a_gpu_makes_it_the_current_device(runner_home, monkeypatch):
    import runner.scheduler

    made = []
    monkeypatch.setattr(runner.scheduler, "make_current", made.append)
    assert invoke("work", "--device", "cuda:1").exit_code == 0  # (nothing to do: no engine is loaded)
    assert made == ["cuda:1"]


def test_a_job_asking_for_a_gpu_this_machine_lacks_stays_queued_and_runs_with_device_cpu(
    prompts, tiny_gpt2, runner_home, monkeypatch, tmp_path
):
    """A Colab VM given no GPU this time: the job is not failed (retry, then the same failure, as a user walkthrough
    found), it waits for a machine with the device, and `runner work --device cpu` runs it here."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job_id = invoke(
        "submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2, "--device", "cuda"
    ).stdout.strip()
    other = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2, "--name", "cpu-job")
    assert other.exit_code == 0
    done = invoke("work")  # the other job runs meanwhile
    assert (
        done.exit_code == 0
        and f"job {job_id} stays queued: --device cuda: CUDA is not available" in done.stderr
    )
    assert f"`runner work --job {job_id} --device cpu`" in done.stderr, done.stderr
    assert runner.status("cpu-job", runner_home).state == "completed"
    assert runner.status(job_id, runner_home).state == "queued"
    again = invoke("work", "--job", job_id)
    assert again.exit_code == 1 and "stays queued" in again.stderr and "nothing to do" not in again.stderr
    assert invoke("work", "--job", job_id, "--device", "cpu").exit_code == 0
    assert runner.status(job_id, runner_home).state == "completed"
    # `runner run -o DIR`: the hint named the job by its id, which is not in the home (pass 33), and then said
    # to run the same command again, which leaves it queued again
    out = tmp_path / "out"
    ran = invoke("run", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2, "--device", "cuda", "-o", out)
    assert ran.exit_code == 1 and f"`runner work --job {out} --device cpu`" in ran.stderr, ran.stderr
    assert "run the same command again" not in ran.stderr
    assert (
        invoke("work", "--job", out, "--device", "cpu").exit_code == 0
        and runner.status(out).state == "completed"
    )


def test_work_on_a_job_cancelled_under_it_does_not_say_to_run_work_again(
    prompts, tiny_gpt2, runner_home, monkeypatch
):
    """It said "stopped; run `runner work` again to carry on", which a cancelled job never does (new-user
    walkthrough); it says the job was cancelled and how to resume it."""
    from runner.worker import JobRun

    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    real = JobRun.cancelled

    def cancelled_now(self):  # the user's `runner cancel` lands while the job runs
        if not self.was_cancelled:
            runner.cancel(self.job.dir)
            self.cancel_checked = 0.0
        return real(self)

    monkeypatch.setattr(JobRun, "cancelled", cancelled_now)
    result = invoke("work")
    assert f"job {job_id} was cancelled" in result.stderr and "runner retry" in result.stderr, result.stderr
    assert "run `runner work` again" not in result.stderr


def test_a_job_whose_model_folder_is_gone_stays_queued_until_it_is_back(
    prompts, tiny_gpt2, runner_home, tmp_path
):
    """A model folder on a Drive not mounted yet (or moved): the job failed with the hub's "Repo id must be in
    the form ..." (adversarial pass 19); it waits, saying why, and runs once the folder is back. A folder given
    as the input file is "not a file", not "no such file"."""
    import shutil

    model = shutil.copytree(tiny_gpt2, tmp_path / "model")
    job_id = invoke("submit", prompts, "--model", model, "--max-new-tokens", 2).stdout.strip()
    model.rename(tmp_path / "away")
    gone = invoke("work")
    assert (
        gone.exit_code == 1
        and f"job {job_id} stays queued: its model {model} is not on this machine" in gone.stderr
    )
    assert runner.status(job_id, runner_home).state == "queued"
    # runner status says what it waits for (it said "queued" alone)
    waits = (
        f"its model {model} is not on this machine (is its drive mounted?); `runner work` runs it once it is"
    )
    assert (
        f"{job_id}: {waits} there" in invoke("status").stdout
        and f"state:    queued - {waits} there" in invoke("status", job_id).stdout
    )
    (tmp_path / "away").rename(model)
    assert invoke("work").exit_code == 0 and runner.status(job_id, runner_home).state == "completed"
    assert runner.status(job_id, runner_home).message is None
    (tmp_path / "d.jsonl").mkdir()
    folder = invoke("submit", tmp_path / "d.jsonl", "--model", model)
    assert folder.exit_code == 1 and f"{tmp_path / 'd.jsonl'}: not a file" in folder.stderr, folder.stderr


def test_an_export_into_the_jobs_own_folder_is_refused_and_an_empty_one_is_an_empty_file(
    prompts, tiny_gpt2, runner_home, tmp_path
):
    """`--to JOB/job.json` overwrote the job's spec (the job then read as broken), `--to JOB/done/...` planted a
    stray commit; an export of no rows to .jsonl wrote one empty line (adversarial pass 18)."""
    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    folder = runner_home / job_id
    spec = (folder / "job.json").read_bytes()
    empty = tmp_path / "none.jsonl"
    assert invoke("results", job_id, "--to", empty).exit_code == 0  # nothing done yet: no rows
    assert empty.read_bytes() == b""
    for inside in (folder / "job.json", folder / "done" / "00000-00000000-0000.json"):
        refused = invoke("results", job_id, "--to", inside)
        assert refused.exit_code == 1 and "inside the job's folder" in refused.stderr, refused.stderr
    assert (folder / "job.json").read_bytes() == spec and not (
        folder / "done" / "00000-00000000-0000.json"
    ).exists()
    assert invoke("work").exit_code == 0 and runner.status(folder).state == "completed"


def test_status_names_a_chat_job_as_such(prompts, tiny_llama, runner_home):
    """`--chat` changes every prompt (sent through the chat template): the job's settings line says so (it was
    missing; new-user walkthrough)."""
    job_id = invoke("submit", prompts, "--model", tiny_llama, "--chat", "--max-new-tokens", 2).stdout.strip()
    detail = invoke("status", job_id).stdout
    assert "chat (each prompt as a user message)" in detail.split("settings: ")[1].splitlines()[0], detail
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    job_id = invoke("submit", prompts, "-m", tiny_llama, "--chat", "--chat-template", template).stdout.strip()
    settings = invoke("status", job_id).stdout.split("settings: ")[1].splitlines()[0]
    assert settings.endswith("chat (each prompt as a user message), its own --chat-template"), settings


def test_status_settings_say_rows_that_set_their_own_run_with_those(tmp_path, tiny_llama, runner_home):
    """An OpenAI Batch file's requests sample at temperature 1 unless they say otherwise, and `runner status`
    showed only the job's `do_sample=False` (new-user walkthrough, pass 178). A job whose rows carry their own
    settings says so; one whose rows carry none does not."""
    body = {"model": Path(tiny_llama).name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    request = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    batch = write_jsonl(tmp_path / "b.jsonl", [request])
    settings = invoke("status", invoke("submit", batch, "-m", tiny_llama).stdout.strip()).stdout
    assert (
        settings.split("settings: ")[1]
        .splitlines()[0]
        .endswith("; rows that set their own (a field of the row, a request's body) run with those")
    ), settings
    plain = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi"}])
    settings = invoke("status", invoke("submit", plain, "-m", tiny_llama).stdout.strip()).stdout
    assert "set their own" not in settings, settings


@pytest.mark.parametrize("kind", ["score", "embed"])
def test_status_settings_of_a_score_or_embed_job_name_no_seed(prompts, tiny_gpt2, runner_home, kind):
    """Pass 72: `runner status JOB` of a score job printed `settings: , seed=8282176507304970342`: a stray comma,
    and a seed such jobs do not take (`--seed: not used by score jobs`)."""
    job_id = invoke(
        "submit", prompts, "--kind", kind, "--text-field", "prompt", "-m", tiny_gpt2
    ).stdout.strip()
    settings = invoke("status", job_id).stdout.split("settings: ")[1].splitlines()[0]
    assert settings == "the defaults", settings
    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    settings = invoke("status", job_id).stdout.split("settings: ")[1].splitlines()[0]
    assert settings.startswith("max_new_tokens=2, ") and ", seed=" in settings, settings  # generation samples


@pytest.mark.parametrize("kind", [["generate"], {"generate": 1}, 3, "sample"])
def test_status_lists_a_job_json_whose_kind_is_no_kind_as_broken(tmp_path, tiny_gpt2, runner_home, kind):
    """job.json's kind damaged into a list or an object (its backup damaged too): `runner status` crashed with
    "TypeError: unhashable type: 'list'" (the KIND column looked the value up in a dict), where the runner before
    it listed the job broken. It is listed broken, its kind shown as '-'."""
    from runner.jobs import create_job

    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home)
    meta = json.loads((job.dir / "job.json").read_text())
    (job.dir / "job.json").write_text(json.dumps({**meta, "kind": kind}))
    (job.dir / "job.backup.json").write_text('{"torn')
    (listed,) = runner.status(home=runner_home)
    assert (listed.id, listed.state, listed.kind) == (job.id, "broken", None), listed
    table = invoke("status")
    assert table.exit_code == 0 and f"{job.id}  -     -     broken" in table.stdout, table.output


def test_work_until_says_whether_it_means_today_or_tomorrow(runner_home):
    """`--until 9:00` given at 9:20 means tomorrow 9:00: said, not assumed silently (new-user walkthrough)."""
    import datetime as dt

    now = dt.datetime.now()
    before = now - dt.timedelta(minutes=2)
    when = "tomorrow" if before.date() == now.date() else "today"  # (2 minutes before 00:01 is today's 23:59)
    result = invoke("work", "--until", f"{before:%H:%M}")
    # (a Colab VM's clock is UTC: said, since the user's 07:00 may not be)
    zone = before.astimezone().tzname()
    assert result.exit_code == 0, result.output
    assert f"working until {before:%H:%M} {zone} {when}" in result.stderr, result.stderr


def test_runner_export_points_to_results_to_not_to_report():
    """click's close match sent `runner export` to `report` (an HTML report, not the rows: pass 38)."""
    result = invoke("export", "JOB")
    assert result.exit_code == 2
    assert "No such command 'export': `runner results JOB --to FILE` writes a job's rows" in result.output
    assert "report" not in result.output
    assert "Did you mean 'status'" in invoke("statsu").output  # other typos: click's own suggestion


def test_work_past_its_deadline_says_the_jobs_left_not_nothing_to_do(prompts, tiny_gpt2, tmp_path):
    """A deadline that came before a job began said "nothing to do: no queued or interrupted jobs" with a job
    queued (new-user walkthrough: `runner work --hours` too small for the model's load)."""
    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    result = invoke("work", "--hours", "0.0000001")
    assert result.exit_code == 0, result.output
    assert "stopped at the deadline (--hours/--until) with 1 job left to run; run `runner work` again to " \
           "carry on" in result.stderr, result.stderr  # fmt: skip
    assert "nothing to do" not in result.stderr
    assert "state:    queued" in invoke("status", job_id).stdout  # (interrupted, when its start came in time)
    assert "stopped at the deadline" not in invoke("work").stderr  # the queue emptied before any deadline
    # a job in a folder of its own is run again with --job (plain `runner work` never runs it)
    import shlex

    from runner.jobs import create_job

    own = create_job(prompts, tiny_gpt2, runner.GenerationParams(max_new_tokens=1), job_dir=tmp_path / "a b")
    said = invoke("work", "--job", own.dir, "--hours", "0.0000001").stderr
    assert f"1 job left to run; run `runner work --job {shlex.quote(str(own.dir))}` again" in said, said


def test_hints_quote_a_folder_with_a_space_so_they_can_be_pasted(prompts, tiny_gpt2, tmp_path):
    """Colab's Drive mount was /content/drive/My Drive: a hint that printed `runner retry /content/drive/My
    Drive/...` unquoted failed when pasted ("Got unexpected extra argument"; pass 44)."""
    import shlex

    from runner.jobs import create_job

    out = tmp_path / "My Drive" / "night"
    job = create_job(prompts, tiny_gpt2, runner.GenerationParams(max_new_tokens=1), job_dir=out)
    assert invoke("cancel", out).exit_code == 0
    result = invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 1, "-o", out)
    hint = re.search(r"`(runner retry [^`]+)`", result.output)
    assert result.exit_code != 0 and hint, result.output
    assert invoke(*shlex.split(hint.group(1))[1:]).exit_code == 0  # pasted as printed: it works
    (job.dir / "job.json").unlink()
    hint = re.search(r"`(runner repair [^`]+)`", invoke("status", out).output)
    assert hint and invoke(*shlex.split(hint.group(1))[1:]).exit_code == 0
    assert invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 1, "-o", out).exit_code == 0


def test_hints_name_the_home_given_and_the_folder_of_a_job_of_its_own(
    prompts, tiny_gpt2, tmp_path, monkeypatch
):
    """With the jobs on Drive (--home), `cancel` said "`runner retry night1` resumes it" and `retry` said "run
    `runner work`": pasted, both looked in ./jobs ("no job 'night1'", "nothing to do"). And `runner work` never
    runs a job in a folder of its own (-o DIR), so its retry says `runner work --job FOLDER` (pass 44)."""
    import shlex

    from runner.jobs import create_job

    monkeypatch.delenv("RUNNER_HOME")
    home = tmp_path / "drive home"
    assert invoke(
        "--home", home, "submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 1, "--name", "night1"
    )
    said = invoke("cancel", "night1", "--home", home).output
    hint = re.search(r"`(runner [^`]+)` resumes it", said).group(1)
    assert hint == f"runner --home {shlex.quote(str(home))} retry night1", said
    said = invoke(*shlex.split(hint)[1:]).output  # pasted as printed
    work = re.search(r"run `(runner [^`]+)` to carry on", said).group(1)
    assert "job" in said and "completed" in invoke(*shlex.split(work)[1:]).output
    folder = tmp_path / "own folder"
    create_job(prompts, tiny_gpt2, runner.GenerationParams(max_new_tokens=1), job_dir=folder)
    assert invoke("cancel", folder).exit_code == 0
    said = invoke("retry", folder).output
    work = re.search(r"run `(runner [^`]+)` to carry on", said).group(1)
    assert work == f"runner work --job {shlex.quote(str(folder))}"
    assert "completed" in invoke(*shlex.split(work)[1:]).output


def test_options_users_bring_from_other_tools_are_answered(prompts, tiny_gpt2, tmp_path):
    """--max-length (the tutorials' model.generate habit) said only "No such option"; gpt2-score's
    --exclude-end (runner's default) was refused; vLLM's --top-k -1 (off) said "must be >= 0" though a row's
    top_k -1 was taken (pass 44)."""
    result = invoke("generate", "Hello", "-m", tiny_gpt2, "--max-length", 20)
    assert result.exit_code == 2
    assert (
        "--max-length: transformers' max_length counts the prompt too; runner's limit is --max-new-tokens"
        in (result.output)
    )
    assert "--min-new-tokens" in invoke("run", prompts, "-m", tiny_gpt2, "--min-length", 5).output
    # vLLM's and OpenAI's names: click's close match sent --n to --json and --stop-sequences to -n (pass 48)
    for option, ours in (("--n", "-n (--num-return-sequences)"), ("--max-tokens", "--max-new-tokens"),
                         ("--stop-sequences", "--stop (repeatable)"), ("--min-tokens", "--min-new-tokens")):  # fmt: skip
        said = invoke("generate", "Hello", "-m", tiny_gpt2, option, 2)
        assert said.exit_code == 2 and f"{option}: runner's name is {ours}" in said.output, said.output
    text = tmp_path / "s.txt"
    text.write_text("hello world\n")
    scores = [invoke("score", text, "-m", tiny_gpt2, "--print", *flag, "-o", tmp_path / f"s{i}").stdout
              for i, flag in enumerate([(), ("--exclude-end",), ("--add-eos",)])]  # fmt: skip
    assert scores[0] == scores[1] != scores[2]
    off = [invoke("generate", "Hello", "-m", tiny_gpt2, "--max-new-tokens", 4, "--temperature", 0.9, "--top-k", k)
           for k in (-1, 0)]  # fmt: skip
    assert off[0].exit_code == 0 and off[0].output == off[1].output


def test_a_mistyped_option_is_offered_shown_options_not_the_hidden_names_runner_refuses(prompts):
    """click's "Did you mean" looked through the hidden options too (other tools' names, each refused when
    typed): `--max-new-token` was offered `--max-tokens`, `--num-return-sequence` `--stop-sequences` and
    `--eos-token-id` `--max-tokens` and `--min-tokens` (a new user's pass 195)."""
    hidden = ("--max-tokens", "--min-tokens", "--stop-sequences", "--top-logprobs", "--max-length", "--n'")
    for command, typo, meant in (("run", "--max-new-token", "--max-new-tokens"),
                                 ("generate", "--num-return-sequence", "--num-return-sequences"),
                                 ("submit", "--eos-token-id", "--max-new-tokens"),
                                 ("generate", "--top-logprob", "--logprobs")):  # fmt: skip
        said = invoke(command, prompts, "-m", "gpt2", typo, 2)
        assert said.exit_code == 2 and f"No such option '{typo}'" in said.output, said.output
        assert meant in said.output and not [h for h in hidden if h in said.output], said.output


def test_a_transient_error_looking_for_the_model_folder_is_looked_again_not_the_commands_end(
    prompts, tiny_gpt2, runner_home, tmp_path, monkeypatch
):
    """The look at whether a job's model folder is on this machine (a Drive not mounted yet) let a transient
    EIO through: one passing error on a Drive mount ended `runner status` for every job of the home, and
    `runner work` with it ("cannot read or write MODEL: Input/output error"), where every other read of a flaky
    mount is tried again. Found by the adversarial pass on transient errors taken for answers."""
    import os
    import shutil

    from runner import storage

    model = str(shutil.copytree(tiny_gpt2, tmp_path / "model"))
    job_id = invoke("submit", prompts, "--model", model, "--max-new-tokens", 2).stdout.strip()
    real, failed = os.stat, []

    def stat(path, *args, **kwargs):
        if not isinstance(path, int) and os.fspath(path) == model and not failed:
            failed.append(path)  # the first look at the model folder meets a failing mount, once
            raise OSError(errno.EIO, "Input/output error", model)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.01,) * 3)
    status = invoke("status")
    assert failed and status.exit_code == 0 and f"{job_id}" in status.stdout, status.output
    failed.clear()
    work = invoke("work")
    assert failed and work.exit_code == 0, work.output
    assert runner.status(job_id, runner_home).state == "completed"


def test_a_model_that_does_not_read_is_looked_at_once_per_status_and_its_jobs_show_queued(
    prompts, tiny_gpt2, runner_home, tmp_path, monkeypatch
):
    """A model on a Drive mount that stopped answering (ENOTCONN until it is mounted again), the job home
    elsewhere: `runner status` retried the look at the model's folder for a minute for each of its queued jobs
    (a home of 30 such jobs: half an hour), and showed each job `unreadable`, its progress gone, where its own
    folder read. Second reader of the transient-reads audit: the model is looked at once per status, and its
    jobs show queued, saying why they wait."""
    import os
    import shutil

    from runner import storage

    model = str(shutil.copytree(tiny_gpt2, tmp_path / "model"))
    ids = [invoke("submit", prompts, "--model", model, "--max-new-tokens", 2, "--name", f"j{i}").stdout.strip()
           for i in range(3)]  # fmt: skip
    real, looks = os.stat, []

    def stat(path, *args, **kwargs):
        if not isinstance(path, int) and os.fspath(path) == model:
            looks.append(path)
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", model)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 3)
    status = invoke("status", "--json")
    assert status.exit_code == 0, status.output
    shown = {s["id"]: s for s in json.loads(status.stdout)}
    assert len(looks) == 4  # one look and its 3 retries, for the three jobs
    for job_id in ids:
        assert shown[job_id]["state"] == "queued" and shown[job_id]["total"] == 2
        assert shown[job_id]["message"].startswith(f"cannot read the model {model!r}")
    one = invoke("status", ids[0])
    assert one.exit_code == 0 and "state:    queued - cannot read the model" in one.stdout, one.output


def test_a_job_home_that_is_not_there_is_said_so(tmp_path):
    """`runner status --home /typo` said "no jobs in /typo", as of an empty home: a mistyped --home (or a Drive
    not mounted yet) read as "my jobs are gone"."""
    typo = tmp_path / "typo"
    said = invoke("--home", typo, "status")
    assert said.exit_code == 0 and said.stdout.strip() == (
        f"no jobs in {typo} (no such folder: a mistyped --home or $RUNNER_HOME, or a Drive not mounted yet?)"
    )
    assert "no such folder" in invoke("--home", typo, "work").stderr
    one = invoke("--home", typo, "status", "night1")
    assert one.exit_code == 1 and one.output.strip() == (
        f"Error: no job 'night1' in {typo}: no such folder (a mistyped --home or $RUNNER_HOME?)"
    )
    typo.mkdir()
    assert invoke("--home", typo, "status").stdout.strip() == f"no jobs in {typo}"  # there, and empty
    assert not (typo / "logs").exists() and list(typo.iterdir()) == []


def test_an_export_of_a_job_that_lost_rows_exits_1_after_writing(tmp_path, prompts, tiny_gpt2, runner_home):
    """`runner results J --to f && upload f`: a completed job whose shard was lost since wrote 0 of its 2 rows,
    warned, and exited 0, so the upload went on. It still writes what verifies, and exits 1 saying so; a job
    not done yet (queued, running) exports its rows so far with exit 0, as before."""
    import shutil

    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    queued = invoke("results", job_id, "--to", tmp_path / "q.jsonl")
    assert queued.exit_code == 0 and "is queued: these are 0 of its 2 results" in queued.stderr
    assert invoke("work").exit_code == 0
    shutil.rmtree(runner_home / job_id / "shards")
    for name in ("r.csv", "r.jsonl"):
        result = invoke("results", job_id, "--to", tmp_path / name, "--errors-to", tmp_path / f"e-{name}")
        assert result.exit_code == 1 and (tmp_path / name).exists(), result.output
        assert (
            f"Error: {tmp_path / name} was written, but without rows the job had: job {job_id} is broken: "
            "completed, but 2 result rows are missing" in result.stderr
        )
    with pytest.warns(UserWarning, match="is broken"):
        assert runner.export_results(job_id, tmp_path / "p.jsonl").lost.startswith(
            f"job {job_id} is broken: "
        )
    assert invoke("repair", job_id).exit_code == 0 and invoke("work").exit_code == 0
    again = invoke("results", job_id, "--to", tmp_path / "r.csv")
    assert again.exit_code == 0 and runner.export_results(job_id, tmp_path / "p.jsonl").lost == ""


def test_an_export_missing_rows_the_job_had_leaves_an_earlier_file_as_it_was(
    tmp_path, prompts, tiny_gpt2, runner_home
):
    """A whole export of a completed job, then its shards lost (a damaged commit; a Drive mount showing files
    late): `runner results J --to` the same file wrote the partial rows over the whole ones and exited 1, the one
    good copy gone. Now that file (or pair) is left byte for byte, exit 1 saying why; a new file gets the rows
    that can be read, as before."""
    import shutil

    job_id = invoke("submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    assert invoke("work").exit_code == 0
    out, errors = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    assert invoke("results", job_id, "--to", out, "--errors-to", errors).exit_code == 0
    whole = out.read_bytes(), errors.read_bytes()
    assert len(whole[0].splitlines()) == 2
    shutil.rmtree(runner_home / job_id / "shards")
    for args in (("--to", out), ("--to", out, "--errors-to", errors)):
        result = invoke("results", job_id, *args)
        assert result.exit_code == 1 and f"{out}" in result.stderr, result.output
        assert "not written: the rows read may lack some the job had (job" in result.stderr
        assert (out.read_bytes(), errors.read_bytes()) == whole
    assert not [
        p for p in tmp_path.iterdir() if p.name not in ("r.jsonl", "e.jsonl", "prompts.jsonl", "home")
    ]
    fresh = invoke("results", job_id, "--to", tmp_path / "new.jsonl")
    assert fresh.exit_code == 1 and "was written, but without rows the job had" in fresh.stderr


@pytest.mark.parametrize(
    "command, flags",
    [
        ("generate", ["--do-sample", "--greedy"]),
        ("run", ["--greedy", "--do-sample"]),
        ("score", ["--add-eos", "--exclude-end"]),
        ("score", ["--no-add-bos", "--add-bos"]),
        ("submit", ["--cuda-graphs", "--no-cuda-graphs"]),
        ("run", ["--no-continuous-batching", "--continuous-batching"]),
    ],
)
def test_both_sides_of_an_on_off_flag_are_refused_not_settled_by_the_last(
    tmp_path, prompts, tiny_gpt2, command, flags
):
    """`runner generate --do-sample --greedy` decoded greedily and `--greedy --do-sample` sampled: click kept the
    last one typed and said nothing (`--add-eos --exclude-end` the same), where runner refuses settings that
    cannot all hold (`--greedy --temperature 0.8`). A value that looks like a flag is still a value."""
    first = "hi" if command == "generate" else str(prompts)
    result = invoke(command, first, "-m", tiny_gpt2, *flags, "-o" if command == "run" else "--priority",
                    str(tmp_path / "o") if command == "run" else "0")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{flags[0]} and {flags[1]} say opposite things: give one of them" in result.output
    assert not (tmp_path / "o").exists()
    result = invoke(
        "generate", "hi", "-m", tiny_gpt2, "--max-new-tokens", 2, "--stop", "--greedy", "--do-sample"
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "command, typed, said",
    [
        ("generate", ["--do-sample", "false"], "--do-sample turns it on, --greedy turns it off"),
        ("generate", ["--greedy", "True"], "--do-sample turns it on, --greedy turns it off"),
        ("generate", ["--chat", "yes"], "give --chat to turn it on, leave it out for off"),
        ("generate", ["--show-logprobs", "0"], "give --show-logprobs to turn it on"),
        ("submit", ["--add-eos", "no"], "--add-eos turns it on, --no-add-eos or --exclude-end turns it off"),
        ("submit", ["--skip-invalid", "1"], "give --skip-invalid to turn it on"),
        ("run", ["--cuda-graphs", "off"], "--cuda-graphs turns it on, --no-cuda-graphs turns it off"),
    ],
)
def test_a_value_after_an_on_off_switch_is_refused_not_taken_as_an_argument(
    prompts, tiny_gpt2, monkeypatch, command, typed, said
):
    """`runner generate "Hi" --do-sample false` (GenerationConfig's do_sample=False habit) sampled, with 'false'
    as a second prompt: a switch takes no value. A true/false/yes/no/on/off/0/1 word right after one is refused
    before the model loads, naming both sides of the switch and how to give that word as an argument."""
    monkeypatch.setattr("runner.engine.Engine", None)  # loading the model would fail the test
    first = "Hi" if command == "generate" else str(prompts)
    result = invoke(command, first, "-m", tiny_gpt2, *typed, "--max-new-tokens", 2)
    assert result.exit_code == 2, result.output
    what = "PROMPTS" if command == "generate" else "an extra argument"
    assert (f"{typed[0]} is a switch and takes no value, so {typed[1]!r} would be read as {what}: {said}"
            in result.output)  # fmt: skip
    assert f"to mean the text {typed[1]!r}, give it before {typed[0]} or after --" in result.output


def test_the_word_of_a_switch_value_is_still_a_prompt_before_the_switch_after_dashes_or_as_a_value(
    tiny_gpt2, monkeypatch
):
    """What the refusal above says to do works: the word before the switch, or after `--`, is a prompt; the value
    of an option that takes one (`--stop false`) is that option's."""
    from runner import quick

    asked = []
    monkeypatch.setattr(
        quick, "generate", lambda texts, *a, **kw: asked.append(list(texts)) or [[]] * len(texts)
    )
    for typed in (
        ["false", "--do-sample"],
        ["--do-sample", "--", "false"],
        ["Hi", "--stop", "false", "--chat"],
    ):
        result = invoke("generate", "-m", tiny_gpt2, *typed)
        assert result.exit_code == 0, result.output
    assert asked == [["false"], ["false"], ["Hi"]]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "JSON"])
def test_results_format_given_a_file_type_says_that_to_writes_it(fmt):
    """`runner results JOB --format csv`, as pandas users ask for a file type, was only told "'csv' is not one
    of 'table', 'openai'": the file type comes from --to's suffix, and the message says so."""
    result = invoke("results", "night1", "--format", fmt)
    assert result.exit_code == 2, result.output
    assert f"--to FILE.{fmt.lower()} writes it" in result.output


@pytest.mark.parametrize(
    "args, said",
    [
        (["generate", "--context=江戸時代のインターネット回線"], 'runner generate "TEXT" -m MODEL'),
        (["generate", "hi", "--num_generate", "2"], "is runner's -n (--num-return-sequences)"),
        (
            ["embed", "--context=江戸時代のインターネット回線"],
            'echo "TEXT" | runner embed - -m MODEL --print',
        ),
    ],
)
def test_gpt2_japanese_options_point_to_runners_own(tiny_gpt2, args, said):
    """The gpt2-japanese README's `gpt2-generate.py --context="..." --num_generate 1` and `gpt2-transform.py
    --context="..."` got "No such option '--context'": they say what runner calls them."""
    result = invoke(*args, "-m", tiny_gpt2)
    assert result.exit_code == 2, result.output
    assert said in result.output


def test_submit_help_says_which_names_a_job_may_have():
    """--name said only "a name to refer to the job by" and the README "letters, digits ...": `--name 夜間ジョブ`
    (letters, to a Japanese user) was then refused as ASCII-only. The help says the rule."""
    shown = " ".join(invoke("submit", "--help").output.split())
    assert "ASCII letters, digits, '-', '_' and '.'" in shown


def test_score_help_does_not_offer_the_truncate_it_refuses():
    """`runner score --help` listed --truncate ("Prompts over the context window: refuse (none) or keep their
    end (left)"), which score refuses ("not used by score jobs: a text over the context window is scored
    whole, in windows"): the help offered what the command says no to. It still says why to one who types it."""
    assert "--truncate" not in invoke("score", "--help").output
    assert "--truncate" in invoke("embed", "--help").output and "--truncate" in invoke("run", "--help").output
    result = invoke("score", "x.txt", "-m", "m", "--truncate", "left")
    assert result.exit_code != 0 and "--truncate" in result.output


def test_run_batch_help_says_what_its_chat_template_renders():
    """`runner run-batch --help` said --chat-template is "for 'messages' rows and --chat": run-batch refuses
    --chat and reads no such rows; the template renders its chat requests' messages."""
    shown = " ".join(invoke("run-batch", "--help").output.split())
    assert "/v1/chat/completions requests' messages" in shown and "'messages' rows" not in shown


def test_retry_help_names_every_job_retry_takes():
    """`runner retry --help` said it re-queues "a failed or cancelled JOB", while retry also takes a completed job
    with row errors (its own refusal says so): a user with 3 failed rows of a finished night never found out."""
    shown = " ".join(invoke("retry", "--help").output.split())
    assert "failed or cancelled JOB, or a completed one with row errors" in shown


def test_status_says_a_worker_is_loading_its_model_until_it_names_its_device(prompts, tiny_gpt2, runner_home):
    """A worker still loading its model showed as `vm-... on ?: 0.0 tok/s` in `runner status` (a user walkthrough,
    pass 195): it says it is loading the model; once loaded, its device."""
    from runner.jobdir import Heartbeat, Owner

    job_id = invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    owner = Owner.me()
    with Heartbeat(runner.open_job(job_id), owner, 60) as beat:
        beat.beat()
        status = invoke("status", job_id).output
        assert f"workers:  {owner.worker}: loading the model" in status and "?" not in status, status
        beat.beat(device="cpu", tokens_per_second=12.5)
        assert f"workers:  {owner.worker} on cpu: 12.5 tok/s" in invoke("status", job_id).output


def test_a_worker_names_its_device_in_its_heartbeat_once_its_model_is_loaded(
    prompts, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """From its model's load on, before its first decode step, a worker's heartbeat names its device (status said
    `on ?` until the first figures of a step)."""
    from runner import worker

    job_id = invoke("submit", prompts, "-m", tiny_gpt2, "--max-new-tokens", 2).stdout.strip()
    seen, next_unit = [], worker.JobRun.next_unit

    def looking(self):
        seen.append(self.beat.info.get("device"))
        return next_unit(self)

    monkeypatch.setattr(worker.JobRun, "next_unit", looking)
    worker.run_job(runner.open_job(job_id), gpt2_engine, echo=None)
    assert seen and seen[0] == str(gpt2_engine.device)


def test_gpt2_generates_length_options_point_to_runners_own(tiny_gpt2, prompts):
    """The gpt2-japanese README's `gpt2-generate.py --min_length 512 --max_length 1024` got click's bare "No such
    option '--max_length'" (the hidden --max-length that answers it is spelled with a hyphen, and click offered
    no near name): both say runner's option, on generate, run and submit."""
    for command, where in (("generate", "Hello"), ("run", prompts), ("submit", prompts)):
        for typed, ours in (("--max_length", "--max-new-tokens"), ("--min_length", "--min-new-tokens")):
            said = invoke(command, where, "-m", tiny_gpt2, typed, 50)
            assert said.exit_code == 2, said.output
            assert f"Error: {typed}: runner's" in said.output and f"is {ours}, in new tokens" in said.output


def test_the_help_examples_write_where_the_readmes_do():
    """`runner run --help`'s example wrote to `-o out/`, the folder that holds the README's out/demo, out/qa
    ...: after the README, it was refused ("out exists and is not a runner job folder"). Each job-folder example
    of a command's help uses the folder the README's command of the same file uses."""
    import shlex

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")

    def folders(lines):
        out = {}
        for line in lines:
            words = shlex.split(line.split("  #")[0]) if line.startswith("runner ") else []
            if "-o" in words and words[1] in ("run", "score", "embed"):
                out.setdefault((words[1], words[2]), set()).add(words[words.index("-o") + 1])
        return out

    readme_folders = folders(ln.strip() for ln in readme.splitlines())
    for command in ("run", "score", "embed"):
        shown = folders(ln.strip() for ln in invoke(command, "--help").output.splitlines())
        assert shown and all(folder <= readme_folders.get(key, set()) for key, folder in shown.items()), shown


def test_the_results_preview_lines_up_japanese_rows(tmp_path, tiny_gpt2):
    """`runner results JOB` counted a Japanese character as one column, where a terminal and a Colab cell show
    it two wide: each Japanese row's later columns stood to the right of the others' (finish_reason, the text)."""
    import unicodedata

    def shown_width(line):
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)

    rows = [
        {"id": "ja", "prompt": "吾輩は猫である。名前はまだ無い。"},
        {"id": "en", "prompt": "The old man said"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    done = invoke("run", path, "-m", tiny_gpt2, "--max-new-tokens", 3, "-o", tmp_path / "j")
    assert done.exit_code == 0, done.output
    table = invoke("results", tmp_path / "j").stdout.splitlines()[:-1]
    assert len(table) == 3 and "吾輩は猫" in table[1], table
    # the text column is the last and right-aligned: lined up, every line ends at the same column
    assert len({shown_width(line) for line in table}) == 1, table


def test_a_column_named_as_a_setting_runner_lacks_is_said_to_be_data(tmp_path, tiny_gpt2, runner_home):
    """A row giving vLLM's `ignore_eos` or `stop_token_ids`, or GenerationConfig's `eos_token_id` (the tutorials'
    `eos_token_id=tokenizer.encode('\\n')[0]`), was kept as data without a word, the row generated without it,
    where a Batch body giving one is refused; GenerationConfig's `stop_strings` is runner's `stop`."""
    rows = [
        {"prompt": "Hello", "stop_token_ids": [0], "ignore_eos": True, "eos_token_id": 198, "topic": "cats"}
    ]
    said = invoke("submit", write_jsonl(tmp_path / "p.jsonl", rows), "-m", tiny_gpt2).stderr
    assert (
        "note: 'stop_token_ids', 'ignore_eos' and 'eos_token_id' are kept as data, not settings: runner has none of them"
        in said
    ), said
    assert "'topic'" not in said
    two = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Hello", "ignore_eos": True, "pad_token_id": 0}])
    said = invoke("submit", two, "-m", tiny_gpt2).stderr
    assert (
        "note: 'ignore_eos' and 'pad_token_id' are kept as data, not settings: runner has neither" in said
    ), said
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hello", "stop_strings": ["\n"]}])
    said = invoke("submit", renamed, "-m", tiny_gpt2).stderr
    assert "note: 'stop_strings' (did you mean 'stop'?) is kept as data, not a setting" in said, said
    plain = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Hello", "stop": ["\n"], "topic": "cats"}])
    assert "kept as data" not in invoke("submit", plain, "-m", tiny_gpt2).stderr


def test_help_speaks_of_what_each_command_does_with_revision_and_served_names():
    """`runner generate --help` said of --revision that "a hub model's job runs to the end on the commit this
    names at submit" (a try makes no job), and `runner run-batch --help` of --served-model-name that "--format
    openai answers with the first" (run-batch has no --format; each answer names its request's model)."""

    def option_help(command, option):
        (param,) = [p for p in cli.commands[command].params if option in p.opts]
        return param.help

    assert "job" not in option_help("generate", "--revision")
    assert "job runs to the end" in option_help("run", "--revision")
    assert "--format" not in option_help("run-batch", "--served-model-name")
    assert "the model its request named" in option_help("run-batch", "--served-model-name")
    assert "--format openai answers with the first" in option_help("submit", "--served-model-name")
    assert "revision" in invoke("generate", "--help").output  # (shown, as click shows it)
