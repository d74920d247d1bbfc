"""The explorer server in a child process, under a lowered open-file limit, watched from /proc (for the load tests)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, resource, sys, threading
workspace, nofile, header_timeout, idle_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
from conceptevo.explorer import make_server
from conceptevo.workspace import Workspace

server = make_server(Workspace(workspace), port=0, kmeans=4)
server.header_timeout, server.idle_timeout = header_timeout, idle_timeout

def answer():  # a line on stdin asks for the figures; the end of stdin stops the server
    for _ in sys.stdin:
        print(json.dumps({"open": getattr(server, "open_connections", None), "peak": getattr(server, "peak_connections", None)}),
              flush=True)
    server.shutdown()

threading.Thread(target=answer, daemon=True).start()
print(json.dumps({"port": server.server_address[1], "max_connections": getattr(server, "max_connections", None),
                  "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}), flush=True)
server.serve_forever(poll_interval=0.05)
server.server_close()
"""


class ServerProcess:
    """``python -c SCRIPT``: the explorer for ``workspace`` on 127.0.0.1, its open-file limit lowered to ``nofile``."""

    def __init__(self, workspace, nofile: int = 256, header_timeout: float = 10.0, idle_timeout: float = 15.0):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(workspace), str(nofile), str(header_timeout),
                                      str(idle_timeout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the explorer subprocess did not start (exit status {self.proc.returncode})")
        info = json.loads(line)
        self.host, self.port = "127.0.0.1", info["port"]
        self.max_connections, self.nofile = info["max_connections"], info["nofile"]
        self.pid = self.proc.pid

    def stats(self) -> dict:
        """Connections open now and the most open at once (the server's own count)."""
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def threads(self) -> int:
        return self._status("Threads")

    def rss(self) -> int:
        return self._status("VmRSS") * 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def open_file_limit(at_least: int):
    """Raise this process's own soft open-file limit to ``at_least`` (for the clients' sockets); restore it after."""
    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= at_least:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < at_least:
        pytest.skip(f"needs {at_least} open files for its client sockets; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (at_least, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
