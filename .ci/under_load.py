"""Run pytest beside two CPU-burning processes, as a busy training machine would have them.

python .ci/under_load.py PYTEST_ARGS...  (exit code: pytest's). The burners are stopped however
pytest ends; each also stops by itself after an hour, should this script be killed.
"""

import subprocess
import sys

BURN = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end: pass"


def main() -> int:
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2)]
    try:
        return subprocess.run([sys.executable, "-m", "pytest", *sys.argv[1:]]).returncode
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


if __name__ == "__main__":
    sys.exit(main())
