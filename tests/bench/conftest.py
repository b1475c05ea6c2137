import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one intra-op thread (two spin-wait each other on a busy 2-core machine), and
    whatever a bench's --threads set is undone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """bench/results, moved to tmp_path: what a run would write there lands here instead."""
    from bench import report

    folder = tmp_path / "committed"
    monkeypatch.setattr(report, "RESULTS_DIR", folder)
    return folder
