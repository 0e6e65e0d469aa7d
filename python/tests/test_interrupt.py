"""Ctrl-C stops a fit at a batch boundary with KeyboardInterrupt, its state saved as at a
checkpoint; the same call resumes to the factors an uninterrupted run writes."""

import os
import signal

import pytest

import infl
from conftest import CORPUS, MODEL


def test_sigint_stops_the_fit_and_the_rerun_resumes_to_the_same_factors(cli_runs, tmp_path):
    cli_factors, _ = cli_runs
    out = tmp_path / "f"
    calls = []

    def ctrl_c_once(stage, done, total, finished):
        calls.append((stage, done))
        if done > 0 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        infl.fit(MODEL, CORPUS, out, max_len=32, fisher="empirical",
                 progress=ctrl_c_once)
    assert not (out / "factors.safetensors").exists()
    # It stopped within a batch of the signal, and saved where it stopped.
    assert len(calls) <= 5
    saved = list((out / "work").rglob("*.json"))
    assert saved, "no state saved"
    infl.fit(MODEL, CORPUS, out, max_len=32, fisher="empirical", progress=False)
    assert (out / "factors.safetensors").read_bytes() == \
        (cli_factors / "factors.safetensors").read_bytes()


def test_an_exception_from_the_progress_callable_stops_the_job_and_is_raised(tmp_path):
    def fail(stage, done, total, finished):
        if done:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        infl.fit(MODEL, CORPUS, tmp_path / "f", max_len=32, progress=fail)
