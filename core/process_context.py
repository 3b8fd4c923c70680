"""The writer process as torch.multiprocessing presents processes: `processes[0]`, `join`, exit codes."""

from __future__ import annotations

import signal
import subprocess


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class WriterProcess:
    """One writer process, as torch.multiprocessing's process objects present one."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        return self._popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()
        self._popen.wait()


class WriterProcessContext:
    """`CheckpointProcess.process`: the writer process, shaped like torch.multiprocessing's
    ProcessContext (`processes[0]`, `join(timeout)` returning whether it has exited)."""

    def __init__(self, process: WriterProcess) -> None:
        self.processes = [process]

    def join(self, timeout: float | None = None) -> bool:
        self.processes[0].join(timeout)
        return not self.processes[0].is_alive()
