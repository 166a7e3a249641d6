"""The README's own commands work exactly as printed: every `runner ...` line that runs offline (on the demo
model and the files in examples/) is run as typed, in a copy of the repository's examples, in order."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workers import ROOT, worker_env

pytestmark = pytest.mark.slow  # the demo model: `make test` runs it, test-fast not

README = (ROOT / "README.md").read_text(encoding="utf-8")


def offline_commands() -> list[str]:
    """`runner` lines of the README's code blocks that need no model hub (the demo model) and no file the
    reader must bring (only examples/)."""
    lines, inside = [], False
    for ln in README.splitlines():
        if ln.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(ln.split("  #")[0].strip())
    out = []
    for ln in lines:
        if ln.startswith("runner report out/"):  # a report of a job an earlier command made
            out.append(ln)
            continue
        if ln.startswith("printf ") and " | runner " in ln and "smollm2-135m-instruct" in ln:
            out.append(ln)  # standard input piped in, as gpt2-score users do (run by a shell)
            continue
        if not ln.startswith("runner ") or "smollm2-135m-instruct" not in ln:
            continue
        files = [
            a
            for a in shlex.split(ln)
            if a.endswith((".jsonl", ".parquet", ".csv")) and not a.startswith("out/")
        ]
        if all(f.startswith("examples/") for f in files):
            out.append(ln)
    return out


def test_the_readme_shows_offline_commands():
    cmds = offline_commands()
    assert any(c.startswith("runner run ") for c in cmds) and any(
        c.startswith("runner run-batch ") for c in cmds
    )
    assert any(c.startswith("runner score ") for c in cmds) and any(
        c.startswith("runner embed ") for c in cmds
    )
    assert any(c.startswith("runner report out/demo ") for c in cmds)
    assert any(c.startswith("printf ") and "runner score - " in c for c in cmds)


def test_readme_commands_run_as_printed(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = worker_env({"RUNNER_HOME": str(tmp_path / "jobs")})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's `runner`
    printed = {}
    for line in offline_commands():
        command = (
            line if line.startswith("printf ") else [sys.executable, "-m", "runner", *shlex.split(line)[1:]]
        )
        proc = subprocess.run(command, shell=isinstance(command, str), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stderr[-3000:]}"
        printed[line] = proc.stdout
    # what the README says those commands leave behind
    import runner

    (scores,) = [out for line, out in printed.items() if line.startswith("printf ")]
    paris, rome = (ln.split("\t") for ln in scores.splitlines())
    assert paris[0].endswith("Paris.") and rome[0].endswith("Rome.") and float(paris[1]) > float(rome[1])

    chat = runner.load_results(tmp_path / "out" / "chat").set_index("id")
    assert (
        chat.loc["capital", "prompt"] == "user: What is the capital of France?\nassistant:"
    )  # --chat-template
    demo = runner.load_results(tmp_path / "out" / "demo")
    assert len(demo) == 8 and any("Paris" in t for t in demo["text"])
    assert (tmp_path / "out" / "responses.jsonl").read_text().count('"custom_id"') == 3
    assert (tmp_path / "out" / "responses.errors.jsonl").read_text() == ""
    assert len(runner.load_results(tmp_path / "out" / "score")) == 6
    assert Path(tmp_path / "out" / "embed" / "job.json").is_file()
    import json

    people = runner.load_results(tmp_path / "out" / "people")
    done = people[people["constraint_complete"]]
    assert len(people) == 4 and len(done) >= 2 and all(json.loads(t)["home"]["city"] for t in done["text"])
    reviews = runner.load_results(tmp_path / "out" / "reviews")["text"].tolist()
    assert (
        set(reviews[:2]) <= {"positive", "negative", "neutral"} and reviews[2][4] == "-"
    )  # the row's own regex
    page = (tmp_path / "out" / "demo-report.html").read_text(encoding="utf-8")
    assert '<section id="throughput">' in page and "8 of 8 done" in page
