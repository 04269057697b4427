"""The thread count commands use without --threads: measured fastest once, cached, torch left as found."""

from __future__ import annotations

import torch

import amphista
from amphista import threads


def test_candidates_double_up_to_the_usable_cores():
    assert threads.candidates(1) == [1]
    assert threads.candidates(2) == [1, 2]
    assert threads.candidates(6) == [1, 2, 4, 6]
    assert threads.candidates(8) == [1, 2, 4, 8]


def test_fastest_threads_measures_once_then_reads_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path))
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    speed = {1: 3.0, 2: 1.0, 4: 2.0}
    calls = []

    def fake(target):
        calls.append(torch.get_num_threads())
        return speed[torch.get_num_threads()]

    monkeypatch.setattr(threads, "_time_step", fake)
    target = amphista.load_default_target()
    before = torch.get_num_threads()
    assert threads.fastest_threads(target) == 2 and calls == [1, 2, 4]
    assert torch.get_num_threads() == before  # measuring leaves torch's setting alone
    assert threads.fastest_threads(target) == 2 and len(calls) == 3  # cached
    for path in (tmp_path / "threads").iterdir():
        path.write_text("{not json")
    speed[4] = 0.5
    assert threads.fastest_threads(target) == 4 and len(calls) == 6  # a corrupt cache is measured again
    try:
        assert threads.set_threads(target, None) == 4 == torch.get_num_threads()
        assert threads.set_threads(target, 1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_a_real_measurement_returns_a_candidate(monkeypatch, tmp_path):
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    assert threads.fastest_threads(amphista.load_default_target()) in threads.candidates()
    assert torch.get_num_threads() == before
