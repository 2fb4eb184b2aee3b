"""The README and every page of docs/: each code block runs as written against one real demo run,
a block that cannot run on a CPU machine is marked and still checked, and every relative link and
anchor resolves.

A ``python`` or ``bash`` block runs unless the line right before it is ``<!-- not run: REASON -->``.
Python blocks run in a fresh interpreter each; bash blocks run in one process (``skd ...`` and
``python -m ...`` lines call the command's ``main``, other lines go through bash), in the demo
run's folder. A marked bash block must pass ``bash -n``, its ``skd train`` / ``skd config``
command lines (direct, through ``accelerate launch`` / ``torchrun``, the SLURM scripts or
``launch/local_multinode.sh``) must give a valid configuration to ``skd config`` with their
placeholders filled in, and every repository file it names must exist.
"""
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from conftest import DEMO_COMMAND
from skd.cli import main as skd_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LANGUAGES = {"", "text", "python", "bash", "yaml"}  # a shell or code block in any other is untested
NOT_RUN = re.compile(r"^<!-- not run: (\S.*) -->$")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # FILE, DIR, RUN_DIR, ...
REPO_PATH = re.compile(r"^(configs|launch|docs|skd|kernels|tests)/[\w./-]+$")

# What the snippets may use, appended to them: the run's own files to compare against.
CHECKS = {
    "pretrained_cfg_overlay": "\nfrom safetensors.torch import load_file\n"
                              "saved = load_file('runs/demo/model.safetensors')\n"
                              "assert all(model.state_dict()[k].equal(v) for k, v in saved.items())\n",
    "Predictions.load": "\nimport json\n"
                        "expected = json.load(open('runs/demo/metrics.json'))\n"
                        "assert p.metrics() == {k: v for k, v in expected.items() if k not in ('best', 'ema')}\n",
}


@dataclass(frozen=True)
class Block:
    page: str
    """Path relative to the repository root."""
    line: int
    """Line of the opening fence (1-based)."""
    lang: str
    code: str
    not_run: str | None
    """The reason given by a ``<!-- not run: ... -->`` marker, None for a block that runs."""
    follows_block: "Block | None" = None
    """The block right before this one when only blank lines lie between (a command's output)."""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_page(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a Markdown page, and its lines outside them (prose)."""
    lines = path.read_text().splitlines()
    rel = path.relative_to(ROOT).as_posix()
    blocks, prose, fence, start, last_end = [], [], None, 0, 0
    for i, line in enumerate(lines):
        if fence is None:
            opening = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$", line)
            if opening:
                fence, lang, start = opening.group(1), opening.group(2), i
                continue
            prose.append(line)
        elif line.strip() == fence:
            marker = NOT_RUN.match(lines[start - 1].strip()) if start else None
            adjacent = blocks and not any(s.strip() for s in lines[last_end + 1:start])
            previous = blocks[-1] if adjacent else None
            blocks.append(Block(rel, start + 1, lang, "\n".join(lines[start + 1:i]) + "\n",
                                marker.group(1) if marker else None, previous))
            fence, last_end = None, i
    assert fence is None, f"{rel}: code block opened at line {start + 1} is never closed"
    return blocks, prose


BLOCKS = [b for page in PAGES for b in read_page(page)[0]]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]
DEMO_BLOCK = next((b for b in BASH if b.page == "README.md" and b.code.strip() == DEMO_COMMAND), None)
RUN_BASH = [b for b in BASH if b.not_run is None and b is not DEMO_BLOCK]


def command_lines(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment-only and blank lines
    dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if shlex.split(line, comments=True)]


# ------------------------------------------------------------------------------- the sandbox
# Run in one process: `skd ...` and `python -m ...` call the command's main (one interpreter
# start for all of them); any other line, or one that needs the shell, goes through bash.
_RUNNER = r"""
import contextlib, io, json, re, runpy, shlex, subprocess, sys
from skd.cli import main as skd_main

SHELL = set("|&;<>()$`*?~")


def call(argv):
    try:
        if argv[0] == "skd":
            return skd_main(argv[1:]) or 0
        sys.argv = argv[2:]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)


blocks, out_file = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for block_id, lines in blocks.items():
    results[block_id] = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        command = re.split(r"\s#", line, maxsplit=1)[0]  # a trailing comment is no shell syntax
        if SHELL & set(command) or not (argv[0] == "skd" or argv[:2] in (["python", "-m"], ["python3", "-m"])):
            done = subprocess.run(["bash", "-c", line], capture_output=True, text=True)
            rc, stdout, stderr = done.returncode, done.stdout, done.stderr
        else:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = call(argv)
            stdout, stderr = out.getvalue(), err.getvalue()
        results[block_id].append({"line": line, "rc": rc, "stdout": stdout, "stderr": stderr})
        if rc:
            break
json.dump(results, open(out_file, "w"))
"""


def make_image_folder(folder: Path) -> None:
    """What docs/data.md's example shards: an ImageFolder of two classes of three small PNGs."""
    for c, colour in (("circle", (200, 30, 30)), ("square", (30, 30, 200))):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), tuple(v + 10 * i for v in colour)).save(folder / c / f"{i}.png")


def make_sandbox(demo_run) -> dict[str, str]:
    """The demo run's folder as a fresh clone after README's demo command: the repository's
    `configs/` and `launch/` beside `runs/demo`, plus `images/` for docs/data.md's example, and
    `skd` / `python` on the PATH for lines that go through bash. Returns the environment."""
    folder = demo_run.folder
    for name in ("configs", "launch"):
        (folder / name).symlink_to(ROOT / name)
    make_image_folder(folder / "images")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "skd").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m skd "$@"\n')
    (bin_dir / "skd").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return {**demo_run.env, "PATH": f"{bin_dir}:{demo_run.env['PATH']}"}


@pytest.fixture(scope="module")
def block_results(demo_run) -> dict[str, dict]:
    """Every runnable block's result, by block id: each python block in its own interpreter and
    all bash blocks in one, started together (they are independent, and the machine has cores)."""
    env = make_sandbox(demo_run)
    folder = demo_run.folder

    def start(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args], cwd=folder, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    python = {b.id: start(["-c", b.code + "".join(c for m, c in CHECKS.items() if m in b.code)])
              for b in PYTHON if b.not_run is None}
    out_file = folder / "bash_results.json"
    bash = start(["-c", _RUNNER, json.dumps({b.id: command_lines(b.code) for b in RUN_BASH}), str(out_file)])
    results = {}
    for block_id, proc in python.items():
        _, stderr = proc.communicate(timeout=600)
        results[block_id] = {"rc": proc.returncode, "stderr": stderr}
    _, stderr = bash.communicate(timeout=600)
    assert bash.returncode == 0, stderr[-3000:]
    return {**results, **json.loads(out_file.read_text())}


# ------------------------------------------------------------------------------- the tests
@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BASH, ids=lambda b: b.id)
def test_bash_block_runs_as_written(block, block_results):
    results = block_results[block.id]
    failed = [r for r in results if r["rc"]]
    assert not failed, f"`{failed[0]['line']}` exited with {failed[0]['rc']}:\n{failed[0]['stderr'][-2000:]}"
    assert len(results) == len(command_lines(block.code))
    # A text block right after it shows the output: every line of it must have been printed.
    shown = next((b for b in BLOCKS if b.follows_block is block and b.lang == "text"), None)
    if shown is not None:
        printed = "".join(r["stdout"] + r["stderr"] for r in results)
        missing = [line for line in shown.code.splitlines() if line.strip() and line not in printed]
        assert not missing, f"{shown.id} shows output the commands did not print: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run is None], ids=lambda b: b.id)
def test_python_block_runs_as_written(block, block_results):
    result = block_results[block.id]
    assert result["rc"] == 0, result["stderr"][-2000:]


def test_every_snippet_that_reads_the_demo_run_is_checked_against_it():
    for marker in CHECKS:
        assert any(marker in b.code for b in PYTHON), marker
    assert all(any(m in b.code for m in CHECKS) for b in PYTHON if "runs/demo" in b.code)


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run], ids=lambda b: b.id)
def test_python_block_not_run_is_valid_python(block):
    compile(block.code, block.id, "exec")


@pytest.mark.parametrize("block", BASH, ids=lambda b: b.id)
def test_bash_block_is_valid_bash_naming_existing_files(block):
    done = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for line in command_lines(block.code):
        tokens = shlex.split(line, comments=True)
        for token in tokens:
            path = token.split("=", 1)[-1]
            assert not REPO_PATH.match(path) or (ROOT / path).exists(), f"{block.id}: {path} does not exist"
        if "--config" in tokens[:-1]:
            given = tokens[tokens.index("--config") + 1]
            assert PLACEHOLDER.match(given) or (ROOT / given).is_file(), f"{block.id}: no config file {given}"


def config_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments a command line gives `skd train` or `skd config`, None if it runs neither."""
    if "skd" in tokens:
        i = tokens.index("skd")
        return tokens[i + 2:] if tokens[i + 1:i + 2] in (["train"], ["config"]) else None
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".sbatch")]
    if scripts:  # sbatch SCRIPT CONFIG key=value ...
        return ["--config", *tokens[scripts[0] + 1:]]
    if tokens[0].endswith("local_multinode.sh"):  # local_multinode.sh NODES [options] -- args
        return tokens[tokens.index("--") + 1:]
    return None


def fill_placeholders(args: list[str]) -> list[str]:
    """`...` (more arguments) dropped; the config file found from the repository root, the demo's
    in place of a placeholder."""
    filled = []
    for arg in (a for a in args if a != "..."):
        if filled and filled[-1] == "--config":
            arg = str(ROOT / ("configs/demo.yaml" if PLACEHOLDER.match(arg) else arg))
        filled.append(arg)
    return filled


@pytest.mark.parametrize("block", [b for b in BASH if b.not_run], ids=lambda b: b.id)
def test_training_command_not_run_gives_a_valid_configuration(block, capsys, monkeypatch):
    # These commands are meant for GPU machines: check their configuration as one would see it.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    checked = 0
    for line in command_lines(block.code):
        args = config_arguments(shlex.split(line, comments=True))
        if args is None or "--help" in args:
            continue
        rc = skd_main(["config", *fill_placeholders(args)])
        assert rc == 0, f"{block.id}: `{line}`: {capsys.readouterr().err.strip()}"
        checked += 1
    capsys.readouterr()
    if re.search(r"\bskd (train|config)\b|\.sbatch|local_multinode\.sh", block.code):
        assert checked, f"{block.id}: a training command was not recognised"


def test_every_block_has_a_known_language_and_markers_sit_on_blocks():
    assert {b.lang for b in BLOCKS} <= LANGUAGES, {b.id: b.lang for b in BLOCKS if b.lang not in LANGUAGES}
    assert all(b.lang in ("python", "bash") for b in BLOCKS if b.not_run), "a marker on a block that never runs"
    for page in PAGES:
        _, prose = read_page(page)
        stray = [line for line in prose
                 if "not run:" in re.sub(r"`[^`]*`", "", line) and not NOT_RUN.match(line.strip())]
        assert not stray, f"{page.name}: malformed marker {stray}"
    markers = sum(bool(NOT_RUN.match(line.strip())) for page in PAGES for line in read_page(page)[1])
    assert markers == sum(b.not_run is not None for b in BLOCKS), "a marker that is not right before a block"


def test_the_demo_fixture_runs_readmes_command_and_prints_the_documented_table(demo_run):
    assert DEMO_BLOCK is not None, f"README has no bash block that is exactly `{DEMO_COMMAND}`"
    shown = next(b for b in BLOCKS if b.page == "README.md" and b.lang == "text" and "Top-1 Err" in b.code)
    printed = demo_run.stdout.splitlines()
    documented = shown.code.splitlines()
    table = printed[printed.index(documented[0]):]  # the method / model line starts the table

    def layout(lines: list[str]) -> list[str]:  # the numbers vary with the machine; the rows and columns not
        return [" ".join(re.sub(r"^-?\d+\.\d+$", "N", word) for word in re.sub(r"\(ep \d+\)", "(ep E)", line).split())
                for line in lines]

    assert layout(table) == layout(documented)
    assert documented[-1] == "run directory: runs/demo"


def test_memory_plan_table_is_the_scripts_output(capsys):
    from skd.bench import memory_plan

    memory_plan.main([])
    printed = {line for line in capsys.readouterr().out.splitlines() if line.startswith("| ImageNet")}
    documented = {line for line in (ROOT / "docs" / "scaling.md").read_text().splitlines()
                  if line.startswith("| ImageNet")}
    assert printed and printed == documented


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, without punctuation, spaces
    as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    found, count = set(), {}
    for line in read_page(path)[1]:
        heading = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            found.add(f"{base}-{count[base]}" if base in count else base)
            count[base] = count.get(base, 0) + 1
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        prose = "\n".join(re.sub(r"`[^`]*`", "", line) for line in read_page(page)[1])
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_says_what_it_covers_and_links_back_to_readme():
    for page in PAGES[1:]:
        text = page.read_text()
        assert text.startswith("# "), page.name
        first_paragraph = text.split("\n\n")[1]
        assert "](../README.md)" in first_paragraph, f"{page.name}: the first paragraph does not link back"
