"""examples/colab.ipynb runs top to bottom in a real Jupyter kernel (Colab-only cells skip themselves), and, as on
Colab after a VM death, runs top to bottom again and ends with one job and complete results."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import runner

pytestmark = pytest.mark.slow  # real worker processes or the demo model: `make test` runs it, test-fast not

NOTEBOOK = Path(__file__).parent.parent / "examples" / "colab.ipynb"


def execute(tmp_path: Path, allow_errors: bool = False) -> str:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) + o.get("ename", "") + o.get("evalue", "")
        for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )  # fmt: skip


def test_colab_notebook_survives_a_vm_death_and_a_second_run_of_all_cells(tmp_path, tiny_gpt2, monkeypatch):
    home = tmp_path / "マイ ドライブ (1)" / "runner-jobs"  # Drive folders have spaces (new-user walkthrough)
    monkeypatch.setenv("RUNNER_NOTEBOOK_MODEL", tiny_gpt2)
    monkeypatch.setenv("RUNNER_HOME", str(home))
    monkeypatch.setenv("RUNNER_WATCH_EVERY", "0.2")
    # First run: the background worker is SIGKILLed right after writing its first shard, before the shard's
    # marker (as when Colab reclaims the VM mid-job); the results cell then fails, as it would for the user.
    monkeypatch.setenv("RUNNER_FAULT", "after_shard")
    first = execute(tmp_path, allow_errors=True)
    assert "not Colab" in first and "runner is installed" in first
    assert "no worker is running job" in first and "AssertionError" in first
    (job_json,) = home.rglob("job.json")
    job_id = job_json.parent.name
    assert runner.status(job_id, home).done == 0
    # Second run of every cell, on a "new VM": the submit finds the job, the work resumes and completes it.
    monkeypatch.delenv("RUNNER_FAULT")
    second = execute(tmp_path)
    assert "completed: 6/6" in second
    assert [p.parent.name for p in home.rglob("job.json")] == [job_id]  # exactly one job
    df = runner.load_results(job_id, home)
    assert len(df) == 6 and sorted(zip(df["id"], df["sample"], strict=True)) == sorted(
        (i, s) for i in ("story", "fox", "cat") for s in (0, 1)
    )
    # the job's report, written beside the jobs and shown inline
    assert f"report: {home / 'report.html'}" in second and "<IPython.core.display.HTML object>" in second
    page = (home / "report.html").read_text(encoding="utf-8")
    assert "Throughput over time" in page and "6 of 6 done" in page
    assert os.environ["RUNNER_NOTEBOOK_MODEL"] == tiny_gpt2
