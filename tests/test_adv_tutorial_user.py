"""Adversarial pass 235, a new user from the Japanese Colab / GPT-2 tutorials: the option spellings, files and
habits they bring."""

import pytest
from helpers import invoke, write_jsonl


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # gpt-2's scripts, transformers' run_generation.py, the tutorial's generate_text(length=50): new tokens
        (["generate", "hi", "--length", "20"], "No such option '--length': runner's is --max-new-tokens"),
        (["run", "p.jsonl", "--length=20"], "No such option '--length': runner's is --max-new-tokens"),
        (["generate", "hi", "--nsamples", "2"], "runner's is -n (--num-return-sequences)"),
        (["submit", "p.jsonl", "--num_samples", "2"], "runner's is -n (--num-return-sequences)"),
        (["generate", "hi", "--num-samples", "2"], "runner's is -n (--num-return-sequences)"),
        (["generate", "hi", "--fp16"], "runner's is --dtype fp16"),
        (["score", "p.txt", "--bf16"], "runner's is --dtype bf16"),
        (["run", "p.jsonl", "--model_name_or_path", "gpt2"], "runner's is -m (--model)"),
        (["generate", "hi", "--prompt", "hi"], 'the prompt is the argument: runner generate "TEXT" -m MODEL'),
        # an underscore spelling of runner's own option: that option alone, not three close ones
        (["generate", "hi", "--top_k", "40"], "No such option '--top_k'. Did you mean '--top-k'?"),
        (["run", "p.jsonl", "--top_p=0.9"], "No such option '--top_p'. Did you mean '--top-p'?"),
        (["score", "p.txt", "--add_bos"], "No such option '--add_bos'. Did you mean '--add-bos'?"),
        (
            ["run", "p.jsonl", "--prompt_field", "q"],
            "No such option '--prompt_field'. Did you mean '--prompt-field'?",
        ),
    ],
)
def test_the_tutorials_option_spellings_are_answered_with_runners_own(args, said):
    """`--length 20` (gpt-2's, run_generation.py's and the tutorial's `length=50`: new tokens) was offered
    `--length-penalty`, a beam-search setting; `--nsamples` and `--num_samples` `--do-sample`; `--fp16` and
    `--model_name_or_path` nothing at all; `runner generate --prompt "..."` `--prompt-logprobs`; `--top_k`
    three close names, `--stop` first, beside the one meant."""
    result = invoke(*args, "-m", "gpt2") if "--model_name_or_path" not in args else invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert said in result.output, result.output
    assert "--length-penalty" not in result.output and "--do-sample" not in result.output, result.output


def test_a_mistyped_checkpoint_folder_is_said_as_a_folder_here_not_only_as_a_hub_id(
    tmp_path, tiny_gpt2, monkeypatch
):
    """A Trainer user's `-m results/checkpoint-500` (their results/ holds checkpoint-5000) was taken for the hub
    id of an owner "results": half a minute of network retries, then "cannot load model ...: We couldn't connect
    to 'https://huggingface.co' ... (not in this machine's cache: hf download results/checkpoint-500)"."""
    import shutil

    from transformers.utils import hub

    for step in ("5000", "10000"):
        shutil.copytree(tiny_gpt2, tmp_path / "results" / f"checkpoint-{step}")
    (tmp_path / "results" / "runs").mkdir()  # (TensorBoard's, no model)
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(hub, "cached_file", no_network)
    result = invoke("generate", "hi", "-m", "results/checkpoint-500", "--max-new-tokens", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (
        "(no folder results/checkpoint-500 here, so it was looked up as a hub id: the folder results here holds "
        "the models checkpoint-10000, checkpoint-5000; did you mean results/checkpoint-5000?)"
        in result.output
    ), result.output
    assert "hf download" not in result.output, result.output


def test_a_notebook_cell_run_again_on_a_finished_job_says_nothing_was_computed(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """A notebook's `runner.run(...)` cell run again, its job long completed, printed nothing at all (the
    command line's closing line says "already done before: nothing computed"): it looked as if it had not run."""
    import runner

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "私は今日も"}, {"prompt": "昔々"}])
    params = runner.GenerationParams(max_new_tokens=2, seed=1)
    first, second = [], []
    job, _ = runner.run(path, tiny_gpt2, params, engine=gpt2_engine, echo=first.append)
    again, summary = runner.run(path, tiny_gpt2, params, engine=gpt2_engine, echo=second.append)
    assert again.dir == job.dir and summary.done_before and summary.generated == 0
    assert second == [f"job {job.id} was completed before (2/2 rows): nothing computed; runner.load_results("
                      f"{str(job.dir)!r}) reads its results"], second  # fmt: skip


def test_runner_work_given_a_file_or_a_job_says_what_to_type(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """`runner work prompts.csv` (as `runner run prompts.csv`) and `runner work night1` said only "Got unexpected
    extra argument (prompts.csv)": not that a file is submitted first, nor that one job is `--job night1`."""
    from runner.jobs import create_job

    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "私は今日も"}])
    create_job(path, tiny_gpt2, home=runner_home, name="night1")
    file = invoke("work", "prompts.jsonl")
    assert file.exit_code == 2 and "Traceback" not in file.output, file.output
    assert (
        "runner work takes no file: it works on the jobs submitted to the home; `runner submit prompts.jsonl "
        "-m MODEL` submits it (then `runner work`), or `runner run prompts.jsonl -m MODEL` does both"
    ) in " ".join(file.output.split()), file.output
    job = invoke("work", "night1", "--hours", "1")
    assert job.exit_code == 2 and "runner work --job night1 works on that job alone" in job.output, job.output
    other = invoke("work", "tonight")
    assert other.exit_code == 2 and "Got unexpected extra argument (tonight)" in other.output, other.output


@pytest.mark.parametrize("command", ["status", "results", "cancel", "report"])
@pytest.mark.parametrize("typed", ["prompts.jsonl", "./prompts.jsonl"])
def test_a_jobs_input_file_named_for_the_job_points_to_the_job(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, command, typed
):
    """`runner status prompts.jsonl` (the file the user knows, as `runner run prompts.jsonl` took it) said "no job
    'prompts.jsonl' in HOME (`runner status` lists its jobs)", and `runner results prompts.jsonl` that it "is not
    a Parquet file of results (Parquet magic bytes not found in footer ...)": not which job it is the input of."""
    from runner.jobs import create_job

    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "私は今日も"}])
    job = create_job(path, tiny_gpt2, home=runner_home, name="night1")
    result = invoke(command, typed)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    said = " ".join(result.output.split())
    assert f"prompts.jsonl is the input file of job {job.id} (night1): give the job's id or name" in said, (
        said
    )
    assert "magic bytes" not in said, said


@pytest.mark.parametrize("to", ["結果.xlsx", "out.XLS"])
def test_an_excel_export_is_pointed_to_the_csv_excel_opens(tmp_path, to):
    """`runner results night1 --to 結果.xlsx` said only "unknown type '.xlsx'; use .jsonl, .json, .csv or
    .parquet", not that the .csv is the one Excel opens, its Japanese text read right (UTF-8 with a BOM)."""
    result = invoke("results", "night1", "--to", tmp_path / to)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert (
        "use .jsonl, .json, .csv or .parquet (a .csv opens in Excel: it is written as UTF-8 with a BOM, "
        in said
    )


def test_a_tsv_prompt_file_says_how_to_make_it_a_csv(tmp_path, monkeypatch):
    """A .tsv of prompts (Japanese corpora, `df.to_csv("x.tsv", sep="\\t")`) said "unknown file type '.tsv'; use
    .jsonl, .parquet, .csv ...": not that it is tab-separated text, which one line of pandas makes a CSV of
    (its cells kept as written: dtype=str, keep_default_na=False)."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    (tmp_path / "質問.tsv").write_text("id\tprompt\n007\t私は今日も\n008\tNA\n", encoding="utf-8")
    result = invoke("submit", "質問.tsv", "-m", "gpt2")
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    said = " ".join(result.output.split())
    fix = (
        "pd.read_csv('質問.tsv', sep='\\t', dtype=str, keep_default_na=False).to_csv('質問.csv', index=False)"
    )
    assert (
        f"質問.tsv: a tab-separated file, which runner does not read: save it as a CSV, with pandas: {fix}"
        in said
    )
    exec(f"{fix}", {"pd": pd})  # the line as printed makes the CSV, cells as written
    assert (tmp_path / "質問.csv").read_text(encoding="utf-8") == "id,prompt\n007,私は今日も\n008,NA\n"
    again = " ".join(
        invoke("submit", "質問.tsv", "-m", "gpt2").output.split()
    )  # (not over the CSV beside it)
    assert ".to_csv('質問-from-tsv.csv', index=False)" in again, again


def test_a_rerun_with_other_settings_after_ctrl_c_names_the_interrupted_job_it_does_not_resume(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """After Ctrl-C, the cell run again with one setting changed (`--max-new-tokens 3` for 2, `-n` forgotten)
    said only "starting job B": not that job A, the interrupted one of the same file, was not carried on (its rows
    done are not B's) and stays queued, for `runner work` to compute beside B."""
    import runner
    from runner.jobs import create_job
    from runner.worker import run_job

    rows = [{"prompt": f"私は今日も {i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    options = runner.EngineOptions(batch_size=1)
    first = create_job(
        path, tiny_gpt2, runner.GenerationParams(max_new_tokens=2, seed=1), options, home=runner_home
    )
    run_job(
        first, gpt2_engine, echo=None, shard_rows=1, should_stop=lambda: any((first.dir / "done").glob("*"))
    )
    assert 0 < runner.status(first.dir).done < 4
    said = []
    again, _ = runner.run(path, tiny_gpt2, runner.GenerationParams(max_new_tokens=3, seed=1), options,
                          engine=gpt2_engine, echo=said.append)  # fmt: skip
    assert again.dir != first.dir
    note = [line for line in said if first.id in line]
    assert note and note[0].startswith(
        f"note: job {first.id} (interrupted, {runner.status(first.dir).done}/4 rows done) is of the same file with "
        "other settings (max_new_tokens 2, now 3), so this job does not carry it on"
    ), said
    # the same settings again: that job is carried on, and nothing is said of it
    said.clear()
    same, _ = runner.run(path, tiny_gpt2, runner.GenerationParams(max_new_tokens=2, seed=1), options,
                         engine=gpt2_engine, echo=said.append)  # fmt: skip
    assert same.dir == first.dir and not [line for line in said if "is of the same file" in line], said


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (["run", "Colab", "Notebooks/prompts.csv", "-m", "gpt2"], "Colab Notebooks/prompts.csv"),
        (["score", "Colab", "Notebooks/prompts.csv", "-m", "gpt2"], "Colab Notebooks/prompts.csv"),
        (["run", "Colab Notebooks/prompts.csv", "-m", "gpt2", "-o", "My", "Drive/out"], "My Drive/out"),
        (["results", "night1", "--to", "My", "Drive/結果.csv"], "My Drive/結果.csv"),
    ],
)
def test_a_drive_path_with_a_space_left_unquoted_is_said_so(tmp_path, monkeypatch, args, path):
    """`!runner run /content/drive/MyDrive/Colab Notebooks/prompts.csv -m gpt2` (Drive's "Colab Notebooks"
    folder, unquoted in a cell) said only "Got unexpected extra argument (Notebooks/prompts.csv)"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Colab Notebooks").mkdir()
    (tmp_path / "Colab Notebooks" / "prompts.csv").write_text("prompt\n私は今日も\n", encoding="utf-8")
    (tmp_path / "My Drive").mkdir()
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    said = " ".join(result.output.split())
    assert f'look like one path with a space in it: quote it, "{path}"' in said, said


def test_an_extra_argument_that_is_no_path_with_a_space_is_said_as_click_says_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("status", "night1", "night2")
    assert result.exit_code == 2 and "Got unexpected extra argument (night2)" in result.output, result.output
    assert "quote it" not in result.output


def test_submit_names_the_columns_read_as_each_rows_settings(tmp_path, tiny_gpt2):
    """A data column that happens to be called `n` or `temperature` (a question's number) gives those rows
    samples or a temperature of their own, said only in the README: submit now names the columns it read as
    settings and in how many rows; a Batch file's bodies (settings by nature) and a file without such columns
    get no such note (adversarial pass 235's noticed)."""
    (tmp_path / "p.csv").write_text("id,prompt,n,temperature\n1,a,,0.5\n2,b,3,\n3,c,,\n")
    result = invoke("--home", str(tmp_path / "home"), "submit", str(tmp_path / "p.csv"), "-m", tiny_gpt2)
    assert result.exit_code == 0, result.output
    assert "read as each row's own settings: 'n' (1 row of 3), 'temperature' (1 row of 3)" in result.output

    write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "hi", "topic": "x"}])
    result = invoke("--home", str(tmp_path / "home"), "submit", str(tmp_path / "q.jsonl"), "-m", tiny_gpt2)
    assert result.exit_code == 0 and "own settings" not in result.output, result.output

    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0.5}}  # fmt: skip
    write_jsonl(tmp_path / "b.jsonl", [line])
    args = ("--home", str(tmp_path / "home"), "submit", str(tmp_path / "b.jsonl"), "-m", tiny_gpt2)
    result = invoke(*args, "--served-model-name", "tiny")
    assert result.exit_code == 0 and "own settings" not in result.output, result.output


def test_a_home_that_fails_to_list_costs_the_notes_not_the_submit(tmp_path, tiny_gpt2, monkeypatch):
    """The notes on the other jobs of the home (the same file's twin, the interrupted one) are read after the job
    is stored: a home listing that failed through the retries ended submit with an error (exit 1) though its
    job was stored, and a user running it again made a second job (adversarial pass 240's noticed)."""
    from runner import jobdir, storage

    write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "hi"}])
    real = jobdir.job_folders

    def failing(home, *args, **kwargs):
        if any(p.name.startswith("2") for p in real(home, *args, **kwargs)):
            raise storage.StorageError(f"cannot list {home}: Input/output error", 5)
        return real(home, *args, **kwargs)

    monkeypatch.setattr(jobdir, "job_folders", failing)
    result = invoke("--home", str(tmp_path / "home"), "submit", str(tmp_path / "q.jsonl"), "-m", tiny_gpt2)
    assert result.exit_code == 0, result.output
    assert "could not be read for the notes on them (cannot list" in result.output
    monkeypatch.undo()
    assert len(real(tmp_path / "home")) == 1
