"""The suite's own scheduling under pytest-xdist (tests/conftest.py): a file's tests go to one worker,
the durability files that share session fixtures to one worker together."""
from xdist_scopes import worker_scope


def test_a_files_tests_share_one_unit_of_work_and_the_durability_files_share_one():
    assert worker_scope("tests/kernels/test_triton_aot.py::test_every_launch_compiles_and_fits_the_device[sm_80]") \
        == worker_scope("tests/kernels/test_triton_aot.py::test_occupancy_takes_the_tightest_limit") \
        == "tests/kernels/test_triton_aot.py"
    assert {worker_scope(f"tests/{name}::test_x") for name in ("test_resume.py", "test_multirank.py",
                                                               "test_large_batch.py")} == {"shared-session"}
    assert worker_scope("tests/test_run.py::test_x") != worker_scope("tests/test_sweep.py::test_x")
    assert worker_scope("tests/test_clip.py::test_x[a::b]") == "tests/test_clip.py"
