"""examples/colab.ipynb runs top to bottom in a real Jupyter kernel (Colab-only cells skip themselves)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # real worker processes or the demo model: `make test` runs it, test-fast not

NOTEBOOK = Path(__file__).parent.parent / "examples" / "colab.ipynb"


def test_colab_notebook_runs_top_to_bottom(tmp_path, tiny_gpt2, monkeypatch):
    monkeypatch.setenv("RUNNER_NOTEBOOK_MODEL", tiny_gpt2)
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "not Colab" in outputs
    assert "completed: 6/6 rows" in outputs
    # the job's report, shown inline: the whole page in an iframe, plotly.js with it
    pages = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "text/html" in o.get("data", {})]  # fmt: skip
    assert any(
        p.startswith("<iframe srcdoc=") and "Plotly" in p and "Throughput over time" in p for p in pages
    )
    assert "report: " in outputs
    assert any(p.name == "job.json" for p in (tmp_path / "home").rglob("job.json"))
    assert os.environ["RUNNER_NOTEBOOK_MODEL"] == tiny_gpt2
