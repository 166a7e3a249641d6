"""Adversarial pass 240: the second reading of pass 237's changes (steady clocks, submits set aside, status of a
queued job's backup, CSV stop cells, the setting columns' note, the CLI's hints)."""


import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams
from runner.jobs import create_job


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    lines = ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(4))
    return create_job(write_jsonl(tmp_path / "p.jsonl", lines), tiny_gpt2, GenerationParams(max_new_tokens=3),
                      runner.EngineOptions(batch_size=2), home=runner_home)  # fmt: skip


def test_the_setting_columns_note_counts_only_the_rows_the_job_holds(tmp_path, tiny_gpt2):
    """--skip-invalid leaves out a row whose setting cell is refused: the note counted it all the same, and said
    'temperature' (2 rows of 1), more rows than the job has."""
    (tmp_path / "p.csv").write_text("id,prompt,temperature\n1,a,0.5\n2,b,hot\n3,c,\n")
    args = ("--home", str(tmp_path / "home"), "submit", str(tmp_path / "p.csv"), "-m", tiny_gpt2)
    result = invoke(*args, "--skip-invalid")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "read as each row's own settings: 'temperature' (1 row of 2)" in said, said
