"""A damage sweep over a job's small files (adversarial pass 182): every truncation of job.json, its backup, the
newest state record, a commit marker, a claim, a seal, verified.json and stats.json; one-value changes to
job.json and its backup (each field: a digit, a string, removed, another type), one copy changed and both;
each kind of file deleted; and files copied in from another job of the same input. What it found:

* a number of job.json rewritten as its equal of another type (`1.0` as `1`, as JavaScript's JSON writes it;
  `true` as `1`): the job was broken ("does not match its checksum; `runner repair` restores it from
  job.backup.json"), and `runner repair` failed saying the same, for ever: it compared job.json with its backup
  by Python's ==, which takes 1 for 1.0 and for true, and so left the damaged file in place.
"""

import json

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


@pytest.mark.parametrize(("field", "value"), [("top_p", 1), ("early_stopping", 0), ("temperature", True)])
def test_a_job_json_number_rewritten_as_its_equal_of_another_type_is_restored_by_repair(
    tmp_path, tiny_gpt2, field, value
):
    job = create_job(
        write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "j"
    )
    meta = json.loads((job.dir / "job.json").read_text())
    assert meta["params"][field] == value and type(meta["params"][field]) is not type(value)
    meta["params"][field] = value  # (1.0 -> 1, false -> 0: equal in Python, another checksum)
    (job.dir / "job.json").write_text(json.dumps(meta, indent=2))
    status = runner.status(job.dir)
    assert status.state == "broken" and "its checksum" in status.message
    said = invoke("repair", job.dir)
    assert said.exit_code == 0 and "job.json restored from job.backup.json" in said.output, said.output
    assert (job.dir / "job.json").read_bytes() == (job.dir / "job.backup.json").read_bytes()
    assert runner.status(job.dir).state == "queued"
