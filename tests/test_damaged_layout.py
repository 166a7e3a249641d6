"""Something of the wrong kind where a job's folder needs a file or a folder (found by an adversarial pass): a
folder at log.txt, at a claim's name or at an in-flight record, a file where claims/ or done/ belongs. That job
is broken and skipped with a `runner repair` hint; `runner work` runs the others (before: it stopped for the
whole home every time, or looped for ever on the blocked claim), and `runner repair` sets the thing aside
in quarantine/ so the job runs again, each row once."""

import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams
from runner.jobs import create_job
from runner.scheduler import work

ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(3)]
DAMAGE = {  # path in the job's folder -> what is put there
    "log.txt": "dir",
    "claims/00000-00000001.json": "dir",
    "inflight/00000.json": "dir",
    "claims": "file",
    "done": "file",
}


def _stop_after(calls: int):
    """A `stop` for work() that ends a worker looping without progress (the bug this file guards against);
    a worker that progresses asks far fewer times."""
    asked = [0]

    def stop() -> bool:
        asked[0] += 1
        return asked[0] > calls

    return stop


@pytest.mark.parametrize("target", DAMAGE)
def test_a_damaged_job_is_skipped_and_repair_brings_it_back(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, target
):
    params = GenerationParams(max_new_tokens=2)
    victim = create_job(
        write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, params, home=runner_home, name="victim"
    )
    other = create_job(tmp_path / "p.jsonl", tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home)
    path = victim.dir / target
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        path.rmdir()
    elif path.exists():
        path.unlink()
    if DAMAGE[target] == "dir":
        path.mkdir()
    else:
        path.write_text("x\n")
    said: list[str] = []
    work(runner_home, engine=gpt2_engine, echo=said.append, stop=_stop_after(500))
    assert runner.status(other.dir).state == "completed"
    assert runner.status(victim.dir).state != "completed"
    assert any(f"job {victim.id} is broken" in s and "runner repair" in s for s in said), said
    report = runner.repair(victim.dir)
    assert report.state_now == "queued"
    assert list((victim.dir / "quarantine").iterdir())  # the thing in the way, kept
    work(runner_home, engine=gpt2_engine, echo=None, stop=_stop_after(500))
    df = runner.load_results(victim.dir)
    assert runner.status(victim.dir).state == "completed" and sorted(df["id"]) == [r["id"] for r in ROWS]
