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


# A Python block of the README run with the demo model and a file of examples/ for what it names (no hub here)
HUB_STAND_INS = {'"prompts.jsonl", "gpt2"': '"examples/prompts.jsonl", "smollm2-135m-instruct"'}


def offline_python() -> list[str]:
    """The README's Python that runs offline, in order: each ```python block that names no hub model other than
    through HUB_STAND_INS and no cluster (Ray), and each `python -c "..."` line (they read what the commands
    before them made in out/)."""
    out, block, inside = [], None, False
    for ln in README.splitlines():
        if ln.startswith("```"):
            if block is not None:
                code = "\n".join(block)
                for printed, stand_in in HUB_STAND_INS.items():
                    code = code.replace(printed, stand_in)
                if "import ray" not in code and '"gpt2"' not in code:
                    out.append(code)
            block = [] if ln.strip() == "```python" else None
            inside = not inside
        elif block is not None:
            block.append(ln)
        elif inside and ln.startswith('python -c "'):
            out.append(shlex.split(ln)[2])
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
    assert all(printed in README for printed in HUB_STAND_INS)  # (else its block is silently left out)
    code = offline_python()
    assert len(code) >= 3 and any("runner.run(" in c for c in code) and any("out/people" in c for c in code)


def test_the_readme_names_every_per_row_setting():
    """Each field a row may set its own generation settings by (params.ROW_SETTINGS) is named in the README's
    "Settings per row" (num_beams and the beam fields were accepted per row and named nowhere)."""
    from runner.params import ROW_SETTINGS

    section = README.split("### Settings per row", 1)[1].split("\n### ", 1)[0]
    assert [f for f in ROW_SETTINGS if f"`{f}`" not in section] == []


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
    for code in offline_python():
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{code}\n{proc.stderr[-3000:]}"
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
