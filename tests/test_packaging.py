"""The distribution as people install and run it: its top-level `core` never silently swaps with a user's."""

import subprocess
import sys

import pytest

from tests.helpers import REPO, script_env


@pytest.fixture
def project_with_its_own_core(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("MINE = True\n")
    return tmp_path


@pytest.mark.parametrize("adapter", ["lightning_ckpt", "accelerate_ckpt"])
def test_an_adapter_names_a_users_core_package_that_shadows_ours(project_with_its_own_core, adapter):
    result = subprocess.run(
        [sys.executable, "-c", f"import {adapter}"],
        cwd=project_with_its_own_core,
        capture_output=True,
        text=True,
        timeout=120,
        env=script_env(),
    )
    assert result.returncode != 0
    assert "not async-ckpt's core" in result.stderr and str(project_with_its_own_core / "core") in result.stderr


@pytest.mark.slow
def test_the_writer_process_imports_our_core_whatever_the_trainers_path_holds(project_with_its_own_core):
    (project_with_its_own_core / "core" / "__init__.py").write_text("raise SystemExit('the user core was imported')\n")
    script = (
        "import os, sys, torch\n"
        "import core\n"  # ours: this repository is on PYTHONPATH
        "os.chdir(sys.argv[1]); sys.path.insert(0, sys.argv[1])\n"  # now the user's core/ is first on sys.path
        "with core.make_async_checkpointer() as ckpt:\n"
        "    ckpt.save('ck', {'w': torch.ones(2)})[1].result(timeout=120)\n"
        "print('committed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(project_with_its_own_core)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=script_env(),
    )
    assert result.returncode == 0 and "committed" in result.stdout, result.stderr[-2000:]
