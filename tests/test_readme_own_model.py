"""README's "Your own model" section, run as written in an empty folder.

The section is the single source of truth: its blocks marked
``<!-- docs-test: file NAME -->`` are written to NAME, and its shell blocks
are run line by line, in order, with bash, as a user with the environment
activated would: ``python`` and ``conceptevo`` are this environment's (the
installed console script, or ``python -m conceptevo.cli`` where there is
none), the code is this checkout's, and torch uses one thread. The one
change: ``conceptevo explore`` serves until stopped, so it is started with
``--port 0`` (a free port, not 8000, which a parallel test run may hold),
asked for ``/api/info`` and stopped. Then what the commands promise is
checked in what they wrote.

Changing the section changes what runs here; a block in it that is neither a
file nor shell commands fails the test (Python blocks with a docs-test
context or marked illustrative are tests/test_docs.py's).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from test_docs import ROOT, WALKTHROUGHS, _kind, code_blocks

README = ROOT / "README.md"
SECTION = next(s for (f, s), test in WALKTHROUGHS.items() if f == "README.md" and test.endswith(Path(__file__).name))
SHELL = ("sh", "bash", "shell")


def commands(code: str) -> list[str]:
    """The command lines of a shell block: continuation lines joined, blank and comment-only lines dropped."""
    out, pending = [], []
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1].strip())
            continue
        line = " ".join(pending + [line.strip()])
        pending = []
        if line and not line.startswith("#"):
            out.append(line)
    if pending:
        out.append(" ".join(pending))
    return out


def walkthrough_steps(path: Path = README, section: str = SECTION) -> list[tuple[str, ...]]:
    """("file", NAME, text) and ("run", COMMAND) steps of one section, in the order they appear."""
    steps = []
    for b in code_blocks(path):
        if b["section"] != section:
            continue
        kind, arg = _kind(b["marker"])
        if kind == "file":
            steps.append(("file", arg, b["code"] + "\n"))
        elif b["lang"] in SHELL and kind == "run":
            steps += [("run", c) for c in commands(b["code"])]
        elif b["lang"] in ("python", "py") and kind in ("context", "illustrative"):
            continue  # tests/test_docs.py runs (or compiles) it
        else:
            raise AssertionError(f"{path.name}:{b['line']}: a {b['lang'] or 'plain'} block in {section!r} that is neither "
                                 "a file (<!-- docs-test: file NAME -->) nor shell commands; this test cannot run it")
    return steps


def test_the_section_reader_finds_files_and_commands(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("## Other\n```sh\nrm -rf /\n```\n## Mine\ntext\n<!-- docs-test: file a/b.py -->\n```python\nx = 1\n```\n"
                   "```sh\n# a comment\npython b.py \\\n  --fast   # why\n\nconceptevo run s.toml\n```\n"
                   "<!-- docs-test: context two-checkpoints -->\n```python\ny = 2\n```\n## Next\n```sh\nls\n```\n")
    assert walkthrough_steps(doc, "Mine") == [("file", "a/b.py", "x = 1\n"), ("run", "python b.py --fast   # why"),
                                              ("run", "conceptevo run s.toml")]
    doc.write_text("## Mine\n```toml\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="neither a file"):
        walkthrough_steps(doc, "Mine")


def test_the_section_has_every_step():
    steps = walkthrough_steps()
    ran = [shlex.split(s[1])[:2] for s in steps if s[0] == "run"]
    for sub in ("run", "importance", "evaluate-importance", "explore", "export"):
        assert ["conceptevo", sub] in ran, f"README {SECTION!r} no longer shows `conceptevo {sub}`"
    assert {"study.toml", "mynet.py"} <= {s[1] for s in steps if s[0] == "file"}


def _environment() -> tuple[dict, str]:
    """The environment a user with this venv activated has, running this checkout's code; and a prelude for bash."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["MPLBACKEND"] = "Agg"
    # one torch thread per command: on a busy 2-core machine two threads ran evaluate-importance 4x slower (16 s vs 4 s)
    env["OMP_NUM_THREADS"] = "1"
    prelude = ""
    if shutil.which("conceptevo", path=bindir) is None:
        prelude = 'conceptevo() { python -m conceptevo.cli "$@"; }; '
    return env, prelude


def _explore(command: str, cwd: Path, env: dict, prelude: str) -> dict:
    """Start the explorer on a free port, fetch /api/info, stop it."""
    proc = subprocess.Popen(["bash", "-c", prelude + command + " --port 0"], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            url = next((m.group(0) for line in list(said) for m in [re.search(r"http://127\.0\.0\.1:\d+/", line)] if m), None)
            time.sleep(0.1)
        assert url, f"`{command}` did not say where it listens:\n{''.join(said)[-3000:]}"
        with urllib.request.urlopen(url + "api/info", timeout=30) as r:
            return json.load(r)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.slow
def test_the_own_model_section_runs_as_written(tmp_path):
    from conceptevo.config import load_config
    from conceptevo.data.idx import FASHION_MNIST_ROOT
    from conceptevo.workspace import Workspace

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip(f"the section exports Fashion-MNIST from {FASHION_MNIST_ROOT} (`make data` installs it)")
    env, prelude = _environment()
    logs, answers = {}, {}
    for step in walkthrough_steps():
        if step[0] == "file":
            target = tmp_path / step[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(step[2])
            continue
        command = step[1]
        argv = shlex.split(command, comments=True)
        if argv[:2] == ["conceptevo", "explore"]:
            answers[argv[2]] = _explore(" ".join(map(shlex.quote, argv)), tmp_path, env, prelude)
            continue
        r = subprocess.run(["bash", "-c", prelude + command], cwd=tmp_path, env=env, text=True, capture_output=True,
                           timeout=600)
        assert r.returncode == 0, f"`{command}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        logs[command] = r.stdout + r.stderr

    # what the commands promise, in what they wrote
    for command, log in logs.items():
        argv = shlex.split(command, comments=True)
        if argv[0] != "conceptevo":
            continue
        sub = argv[1]
        if sub == "run":
            config = load_config(tmp_path / argv[2])
            ws = Workspace(config.out)
            assert ws.manifest["data"]["classes"][:len(config.data.classes or [])] == list(config.data.classes or [])
            assert "classes (model output: name)" in log and "sanity check:" in log
            for m in config.models:
                sanity = ws.manifest["sanity"][m.name]
                assert sanity["top1"] > sanity["chance"] and sanity["tag"] == ws.checkpoints(m.name)[-1].tag
                for c in ws.checkpoints(m.name):
                    assert ws.stage(f"stimuli/{m.name}/{c.tag}") is not None, f"no stimuli for {m.name} {c.tag}"
            assert list((ws.path / "figures").glob("*.png")), "run drew no figures"
        elif sub == "importance":
            folder = tmp_path / argv[2] / "importance" / _option(argv, "--model") / (
                _option(argv, "--from") + "__" + _option(argv, "--to"))
            csvs = list(folder.glob("*/scores.csv"))
            assert csvs and f"for class '{_option(argv, '--class')}'" in log
        elif sub == "evaluate-importance":
            table = tmp_path / argv[2] / "evaluation" / _option(argv, "--model") / "table.md"
            assert table.is_file() and "Verdicts" in table.read_text()
        elif sub == "export" and "--html" in argv:
            assert (tmp_path / _option(argv, "--html") / "index.html").is_file()
    for workspace, info in answers.items():
        ws = Workspace(tmp_path / workspace)
        assert {m["name"]: m["checkpoints"] for m in info["models"]} == {
            m: [c.tag for c in ws.checkpoints(m)] for m in ws.models}
