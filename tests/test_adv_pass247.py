"""Adversarial pass 247: two shapes of a new user's file that submit took without a word (pass 244's Colab users,
files from Excel, pandas and fine-tuning data sets): chat rows whose last message is the assistant's (the model
writes the turn after it, not that answer again), and an id column spelled `ID`, `Id`, `id ` or ` id` (the ids
are line numbers, the column kept as data). Submit now says each, counted; what the job computes is unchanged."""

import json

import pandas as pd
import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams
from runner.inputs import READING
from runner.jobs import create_job, submit_warnings

TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
ANSWERED = [{"role": "user", "content": "日本の首都は?"}, {"role": "assistant", "content": "東京です。"}]
ASKED = [{"role": "user", "content": "日本の首都は?"}]


def submit(tmp_path, path, *args):
    result = invoke("--home", tmp_path / "home", "submit", path, "-m", *args)
    assert result.exit_code == 0, result.output
    job = runner.open_job(result.output.split()[-1], home=tmp_path / "home")
    return " ".join(result.output.split()), job


def test_submit_counts_the_chat_rows_ending_with_the_assistants_message(tmp_path, tiny_gpt2):
    """Fine-tuning rows (the answer included) beside a question: the model writes a turn after the answer, and the
    user who meant the answer written again heard nothing until the results. The note counts the rows, says what
    is generated and how to drop the last message; the rows are rendered (and so computed) as before."""
    rows = [{"messages": ANSWERED}] * 3 + [{"messages": ASKED}]
    said, job = submit(
        tmp_path, write_jsonl(tmp_path / "ft.jsonl", rows), tiny_gpt2, "--chat-template", TEMPLATE
    )
    assert "note: 3 rows of 4 end with an assistant message" in said, said
    assert "the model writes the turn after it" in said and "continue_final_message" in said, said
    assert """jq -c '.messages |= (if .[-1].role == "assistant" then .[:-1] else . end)'""" in said, said
    assert "df['messages'].map(lambda m: m[:-1] if m[-1]['role'] == 'assistant' else m)" in said, said
    assert said.count("assistant message") == 1, said
    # (what runs is unchanged: the answer rendered as a finished turn, a new one opened after it)
    rendered = "<|user|>日本の首都は?\n<|assistant|>東京です。\n<|assistant|>"
    assert job.prompts().column("prompt").to_pylist()[:3] == [rendered] * 3
    assert job.meta["input"]["reading"] == READING and job.meta["input"]["assistant_last"] == 3


def test_every_row_ending_with_the_assistants_message_gets_the_short_fix(tmp_path, tiny_gpt2):
    path = write_jsonl(
        tmp_path / "ft.jsonl", [{"id": "a", "messages": ANSWERED}, {"id": "b", "messages": ANSWERED}]
    )
    said, _ = submit(tmp_path, path, tiny_gpt2, "--chat-template", TEMPLATE)
    assert "note: every row (2) ends with an assistant message" in said, said
    assert "jq -c '.messages |= .[:-1]'" in said and "map(lambda m: m[:-1])" in said, said


def test_no_assistant_note_for_chats_asking_or_an_assistant_turn_inside(tmp_path, tiny_gpt2):
    inside = [*ANSWERED, {"role": "user", "content": "大阪は?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": inside}, {"messages": ASKED}, {"prompt": "x"}])
    said, job = submit(tmp_path, path, tiny_gpt2, "--chat-template", TEMPLATE)
    assert "assistant message" not in said and job.meta["input"]["assistant_last"] == 0, said


@pytest.mark.parametrize("name", ["ID", "Id", "id ", " id", "custom_id"])
def test_submit_names_a_column_spelled_like_the_id(tmp_path, tiny_gpt2, name):
    """An Excel sheet's `ID` (or `id ` with its stray space), or an OpenAI Batch habit's `custom_id` in a plain
    file of prompts: runner reads only `id`, so the ids were the line numbers and the column went through to the
    results as data, said nowhere."""
    (tmp_path / "p.csv").write_text(f"{name},prompt\nq1,a\nq2,b\n")
    said, job = submit(tmp_path, tmp_path / "p.csv", tiny_gpt2)
    assert (
        f"note: {name!r} looks like the id column, but runner reads ids from a column named exactly 'id'"
        in said
    )
    assert "each row's id is its number" in said and f"df.rename(columns={{{name!r}: 'id'}})" in said, said
    assert f"jq -c '.id = .[{json.dumps(name)}] | del(.[{json.dumps(name)}])'" in said, said
    # (the file is read as before: ids are line numbers, the column kept)
    assert job.prompts().column("id").to_pylist() == ["2", "3"]
    assert job.prompts().column(name).to_pylist() == ["q1", "q2"]


def test_no_id_note_beside_a_real_id_column_or_without_one_like_it(tmp_path, tiny_gpt2):
    (tmp_path / "both.csv").write_text("id,ID,prompt\n1,q1,a\n2,q2,b\n")
    said, _ = submit(tmp_path, tmp_path / "both.csv", tiny_gpt2)
    assert "looks like the id column" not in said, said
    (tmp_path / "plain.csv").write_text("idx,prompt,identity\n1,a,x\n")
    said, _ = submit(tmp_path, tmp_path / "plain.csv", tiny_gpt2)
    assert "looks like the id column" not in said, said


def test_a_dataframe_gets_both_notes_from_python(tmp_path, tiny_gpt2, gpt2_engine):
    """The Python path: `runner.run(df)` prints submit's notes (`runner.submit` returns the job, and
    `submit_warnings(job)` are the same notes)."""
    df = pd.DataFrame({"ID": ["q1", "q2"], "messages": [ANSWERED, ASKED]})
    job = create_job(
        df, tiny_gpt2, GenerationParams(max_new_tokens=2), chat_template=TEMPLATE, job_dir=tmp_path / "a"
    )
    notes = " ".join(submit_warnings(job))
    assert (
        "1 row of 2 ends with an assistant message" in notes and "'ID' looks like the id column" in notes
    ), notes
    said: list[str] = []
    params = GenerationParams(max_new_tokens=2)
    runner.run(
        df,
        tiny_gpt2,
        params,
        chat_template=TEMPLATE,
        output=tmp_path / "b",
        engine=gpt2_engine,
        echo=said.append,
    )
    said_all = " ".join(said)
    assert "1 row of 2 ends with an assistant message" in said_all and "'ID' looks like" in said_all, said
    assert runner.load_results(tmp_path / "b")["ID"].tolist() == ["q1", "q2"]
