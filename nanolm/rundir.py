"""One run per run dir: the lock a trainer holds while it writes its run dir (checkpoints,
metrics.jsonl, config.json). The checkpoint files themselves are nanolm/checkpoint.py's; this
is about which process may write them."""
import fcntl
import os
import socket
import time
from pathlib import Path

from nanolm.config import ConfigError


class RunDirLock:
    """Held while a run writes its run dir, so a second trainer on the same dir is refused with
    the holder's pid, host and start time (read from the lock file). An flock: the kernel drops
    it when the holder dies, so a lock file left by a killed run never blocks a resume."""

    def __init__(self, run_dir):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(f"{run_dir} is in use by {holder}: wait for that run to end, "
                              f"or pass another --out_dir") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def close(self):
        self.file.close()  # releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
