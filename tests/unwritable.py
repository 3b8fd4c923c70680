"""Make a directory unwritable for real, even for root (chattr +i), for write-failure tests."""

import contextlib
import os
import shutil
import subprocess

import pytest


@contextlib.contextmanager
def unwritable(directory):
    if os.geteuid() != 0:
        os.chmod(directory, 0o500)
        try:
            yield
        finally:
            os.chmod(directory, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
        pytest.skip("running as root without a working chattr: cannot make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
