"""`mistral-compile chat` driven in a pseudo-terminal, for tests."""

import os
import pty
import re
import select
import signal
import sys
import time


class Terminal:
    """`mistral-compile chat` in a pseudo-terminal (so Ctrl-C is a real SIGINT)."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(sys.executable, [sys.executable, "-m", "mistral_compile", "-q", "chat",
                                      *map(str, args)])
        self.out = ""

    def expect(self, pattern, timeout=60):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; got:\n{self.out[-2000:]}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"chat exited while waiting for {pattern!r}:\n{self.out[-2000:]}"
                self.out += chunk.decode(errors="replace")
        return re.search(pattern, self.out)

    def send(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.out += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("chat did not exit")
