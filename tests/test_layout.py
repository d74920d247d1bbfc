"""The package layout: a clone on the import path cannot shadow the installed package."""
from __future__ import annotations

import subprocess
import sys


def test_a_folder_named_conceptevo_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """A user who clones the repository into ./conceptevo and starts Python next to it must still import the
    package: with the code at the top of the clone, the clone became an empty namespace package."""
    (tmp_path / "conceptevo" / "docs").mkdir(parents=True)  # what a clone's top folder holds: no __init__.py
    (tmp_path / "conceptevo" / "README.md").write_text("a clone\n")
    code = "import conceptevo, sys; print(conceptevo.__file__); print(conceptevo.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    file, version = out.stdout.split()
    assert file.endswith("__init__.py") and not file.startswith(str(tmp_path)), file
    assert version.count(".") >= 2
