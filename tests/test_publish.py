"""Publishing a staged folder: a new folder appears in one rename; into an existing one only
this save's files are added or replaced; a publish that died halfway is detected."""

import os
import subprocess
import sys

from accelerate_ckpt.publish import interrupted_publish, publish_directory
from core.leftovers import PENDING_DIR, PUBLISHING_SUFFIX, owner_token


def _staged(folder, files):
    os.makedirs(folder)
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def test_a_new_folder_appears_in_one_rename(tmp_path):
    _staged(tmp_path / "staging", {"model.bin": "new", "sub/rng.pkl": "r"})
    published = publish_directory(str(tmp_path / "staging"), str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path)) == ["final"] and len(published) == 2
    assert (tmp_path / "final" / "sub" / "rng.pkl").read_text() == "r"


def test_into_an_existing_folder_only_this_save_s_files_are_replaced(tmp_path):
    final = tmp_path / "final"
    _staged(final, {"model.bin": "old", "notes.txt": "the user's", "sub/keep.txt": "k"})
    staging = final / PENDING_DIR / f"{owner_token()}-save_1"
    _staged(staging, {"model.bin": "new", "sub/rng.pkl": "r"})
    publish_directory(str(staging), str(final))
    assert (final / "model.bin").read_text() == "new" and (final / "notes.txt").read_text() == "the user's"
    assert sorted(os.listdir(final / "sub")) == ["keep.txt", "rng.pkl"]
    assert os.listdir(final / PENDING_DIR) == [], "the staging folder and its marker are gone"


def test_the_marker_of_a_publish_whose_process_died_is_found(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "from core.leftovers import owner_token; print(owner_token())"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ).stdout.strip()
    pending = tmp_path / PENDING_DIR
    pending.mkdir()
    (pending / f"{dead}-save_3{PUBLISHING_SUFFIX}").touch()
    (pending / f"{owner_token()}-save_4{PUBLISHING_SUFFIX}").touch()  # ours: alive, not interrupted
    found = interrupted_publish(str(pending))
    assert found is not None and dead in found
