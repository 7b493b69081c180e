"""The run-dir lock (nanolm/rundir.py); a second process against a live trainer is
tests/test_robustness.py's test_a_run_dir_in_use_is_refused_naming_the_holder."""
import os
import socket

import pytest

from nanolm.config import ConfigError
from nanolm.rundir import RunDirLock


def test_a_held_run_dir_is_refused_naming_the_holder_until_released(tmp_path):
    """flock conflicts between two opens of the lock file even within one process; the refusal
    leaves the holder's lock and its record intact, and closing the holder frees the dir."""
    run = tmp_path / "new" / "run"  # created by the lock
    with RunDirLock(run):
        record = (run / ".lock").read_text()
        assert record.startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
        with pytest.raises(ConfigError, match=f"^{run} is in use by pid {os.getpid()} on .*another --out_dir$"):
            RunDirLock(run)
        assert (run / ".lock").read_text() == record
    RunDirLock(run).close()
