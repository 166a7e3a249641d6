"""`runner status JOB` peak memory is per job: a job run resets the peak (engine.reset_peak_memory) at its start."""

import os

import pytest
import torch
from helpers import write_jsonl

import runner
import runner.job_status
from runner import GenerationParams
from runner.engine import _proc_status_kib, peak_memory_bytes, reset_peak_memory
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
    # (a pytest worker that ran the demo model before had long been larger than the spike)
    if not reset_peak_memory(cpu):
        pytest.skip("this kernel or sandbox keeps the resident high-water mark through clear_refs")
    before, rss_before = peak_memory_bytes(cpu), _proc_status_kib("VmRSS")["VmRSS"]
    big = b"\x01" * spike  # touched pages: resident
    after_spike, rss_grew = peak_memory_bytes(cpu), _proc_status_kib("VmRSS")["VmRSS"] - rss_before
    del big
    if rss_grew * 1024 < spike // 2:
        pytest.skip("the spike did not stay resident (a memory limit swapped it out)")
    assert after_spike - before >= spike // 2, (before, after_spike)
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}])
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "small")
    assert run_job(job, gpt2_engine, echo=None).finished
    peak = runner.job_status.job_status(job).peak_memory_bytes
    assert peak is not None and peak < after_spike - spike // 2, (peak, before, after_spike)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="no /proc")
def test_a_reset_the_kernel_ignores_is_reported_not_assumed(monkeypatch):
    """Some sandboxes take the clear_refs write and keep the old high-water mark: the reset says so (False), so
    that nothing reads the lifetime peak as this run's."""
    import runner.engine as engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "_proc_status_kib", lambda *f: {"VmHWM": 400_100, "VmRSS": 400_000})
    assert engine.reset_peak_memory(cpu) is True
    monkeypatch.setattr(engine, "_proc_status_kib", lambda *f: {"VmHWM": 2_000_000, "VmRSS": 400_000})
    assert engine.reset_peak_memory(cpu) is False
