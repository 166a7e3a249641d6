"""`runner status JOB` peak memory is per job: a job run resets the peak (engine.reset_peak_memory) at its start."""

import os

import pytest
import torch
from helpers import write_jsonl

import runner
import runner.job_status
from runner import GenerationParams
from runner.engine import peak_memory_bytes, reset_peak_memory
from runner.jobs import create_job
from runner.worker import run_job


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="ru_maxrss (no /proc) is a lifetime peak"
)
def test_peak_memory_of_a_job_is_not_an_earlier_jobs_peak(tmp_path, tiny_gpt2, gpt2_engine):
    """One process (`runner work`, a notebook) runs a big job, then a small one: the small job's peak must not
    be the process's lifetime high-water mark. The spike here stands for the earlier job."""
    spike = 600 * 2**20
    cpu = torch.device("cpu")  # the spike is host memory
    reset_peak_memory(
        cpu
    )  # (a pytest worker that ran the demo model before had long been larger than the spike)
    before = peak_memory_bytes(cpu)
    big = b"\x01" * spike  # touched pages: resident
    after_spike = peak_memory_bytes(cpu)
    del big
    assert after_spike - before >= spike // 2, (before, after_spike)
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}])
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "small")
    assert run_job(job, gpt2_engine, echo=None).finished
    peak = runner.job_status.job_status(job).peak_memory_bytes
    assert peak is not None and peak < after_spike - spike // 2, (peak, before, after_spike)
