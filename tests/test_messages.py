"""Every command a message suggests works as typed: the test takes the text between backticks from the real
message (a refusal, a cancel, a failed or broken job) and runs it."""

import re
import shlex

from helpers import PROMPTS, invoke, write_jsonl

import runner
from runner.jobdir import Job


def suggested(text: str) -> list[str]:
    return re.findall(r"`(runner [^`]+)`", text)


def run_suggestion(text: str, home) -> str:
    (command,) = [c for c in suggested(text) if not c.startswith("runner run ")] or [None]
    assert command is not None, f"no command suggested in: {text}"
    result = invoke("--home", home, *shlex.split(command)[1:])
    assert result.exit_code == 0 and "Traceback" not in result.output, (command, result.output)
    return result.output


def test_each_suggested_command_works_as_typed(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS[:3])])
    # -o with other settings: refused, with the command that shows the completed job's results
    assert invoke("run", f, "-m", tiny_gpt2, "--max-new-tokens", 2, "-o", "out/qa").exit_code == 0
    refused = invoke("run", f, "-m", tiny_gpt2, "--max-new-tokens", 3, "-o", "out/qa")
    assert refused.exit_code == 1 and "it is completed: `runner results out/qa`" in refused.output
    run_suggestion(refused.output, runner_home)
    # ... and for a job not done yet, the command that finishes it as it was
    runner.submit(f, tiny_gpt2, runner.GenerationParams(max_new_tokens=2), job_dir="out/q2")
    refused = invoke("run", f, "-m", tiny_gpt2, "--max-new-tokens", 3, "-o", "out/q2")
    assert refused.exit_code == 1 and "runner work --job out/q2" in refused.output
    run_suggestion(refused.output, runner_home)
    assert runner.status("out/q2", runner_home).state == "completed"
    # cancel: the message says how to resume, and that resumes it
    job = runner.submit(
        f, tiny_gpt2, runner.GenerationParams(max_new_tokens=2), home=runner_home, name="later"
    )
    cancelled = invoke("--home", runner_home, "cancel", "later")
    assert cancelled.exit_code == 0 and "runner retry later" in cancelled.output
    run_suggestion(cancelled.output, runner_home)
    assert runner.status("later", runner_home).state == "queued"
    # running a cancelled -o job: refused with the retry command for its folder, which re-queues it
    runner.submit(f, tiny_gpt2, runner.GenerationParams(max_new_tokens=2), job_dir="out/b")
    runner.cancel("out/b", runner_home)
    again = invoke("run", f, "-m", tiny_gpt2, "--max-new-tokens", 2, "-o", "out/b")
    assert again.exit_code == 1 and "runner retry" in again.output
    run_suggestion(again.output, runner_home)
    assert invoke("run", f, "-m", tiny_gpt2, "--max-new-tokens", 2, "-o", "out/b").exit_code == 0
    # a broken job: status says how to repair it, and that repairs it
    (job.dir / "job.json").write_text("{ torn")
    status = invoke("--home", runner_home, "status")
    assert "broken" in status.output and "runner repair" in status.output
    (line,) = [ln for ln in status.output.splitlines() if ln.startswith(f"{job.id}: ")]
    run_suggestion(line, runner_home)
    assert Job.open(job.dir).spec.model == tiny_gpt2
