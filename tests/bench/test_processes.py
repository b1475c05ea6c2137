"""bench.processes' wait for a run's metrics row, while the run is still writing the file."""
import subprocess
import sys
import threading

from bench.processes import wait_for_row


def test_a_read_that_finds_no_step_column_is_tried_again(tmp_path):
    """The fresh-clone suite once read a metrics.csv without its step column while the run was
    writing it (KeyError: 'step' in the two-rank fixture); such a read, and a row cut short, are
    read again, not raised."""
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("train_loss,lr\n2.3,0.1\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rest = threading.Timer(0.5, lambda: metrics.write_text("step,train_loss\n1,2.3\n2,2.1\n3,"))
        rest.start()
        wait_for_row(proc, metrics, 2, timeout=30)
        assert proc.poll() is None  # it returned for the row, not because the process ended
    finally:
        proc.kill()
        proc.wait()
