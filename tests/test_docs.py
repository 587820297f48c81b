"""The docs stay true: every `python <script>.py ...` command in README.md and docs/*.md parses; mvp.py --help reads
in the order a newcomer needs it."""
import os

import pytest

import mvp
import prepare_ogbench
import prepare_robomimic
import run_benchmarks
from tests.helpers import HERE

SCRIPTS = ("mvp", "run_benchmarks", "prepare_ogbench", "prepare_robomimic")


def doc_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of every `python <script>.py ...` in a markdown text: code-block lines (with backslash
    continuations, comments dropped) and inline code spans (which may wrap across lines). Commands with
    placeholders (<run>, ..., [N]) are skipped."""
    import re
    import shlex
    found = []
    text = re.sub(r"\\\n\s*", " ", text)
    spans = re.findall(r"`([^`]*)`", text) + [line for line in text.splitlines() if line.startswith("python ")]
    for span in spans:
        for part in re.split(r"&&|;", " ".join(span.split())):
            m = re.match(rf"\s*python ({'|'.join(SCRIPTS)})\.py(.*)", part)
            if m and not re.search(r"<|\.\.\.|\[|\||RUN_DIR|\b[NS]\b", m[2].split("#")[0]):
                found.append((m[1], shlex.split(m[2].split(" #")[0])))
    return found


def check_command_parses(script: str, argv: list[str]):
    if script == "run_benchmarks":
        return run_benchmarks.build_parser().parse_args(argv)
    return {"mvp": mvp, "prepare_ogbench": prepare_ogbench, "prepare_robomimic": prepare_robomimic}[script] \
        .build_parser().parse_args(argv)


def test_every_command_in_the_docs_parses():
    import glob
    commands = [(path, c) for path in ["README.md", *glob.glob(os.path.join(HERE, "docs", "*.md"))]
                for c in doc_commands(open(os.path.join(HERE, path)).read())]
    assert len(commands) > 30 and {s for _, (s, _) in commands} == set(SCRIPTS)
    for path, (script, argv) in commands:
        try:
            check_command_parses(script, argv)
        except SystemExit:
            pytest.fail(f"{path}: python {script}.py {' '.join(argv)} does not parse")


def test_a_misspelt_flag_in_a_doc_command_fails_the_check():
    (script, argv), = doc_commands("Run `python mvp.py --env cube-single-task1 --hidden-dims 256` first.")
    with pytest.raises(SystemExit):
        check_command_parses(script, argv)
    (script, argv), = doc_commands("```bash\npython mvp.py --env cube-single-task1 --hidden-dim 256 \\\n"
                                   "    --threads 1   # a comment\n```")
    assert argv[-2:] == ["--threads", "1"] and check_command_parses(script, argv).hidden_dim == 256


def test_help_lists_the_run_then_the_method_then_how_it_runs(capsys):
    """--help: the run's flags first (--env, --seed, ...), then the method's (Hyperparams: what a copy of the core
    takes), then how the run runs; every flag in exactly one section, the usage line in the same order."""
    import dataclasses
    import re
    with pytest.raises(SystemExit):
        mvp.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    titles = ["the run:", "the method (Hyperparams):", "how it runs (same numbers; a resume may change):"]
    starts = [out.index("\n" + t + "\n") for t in titles]
    assert starts == sorted(starts)
    sections = [out[a:b] for a, b in zip(starts, starts[1:] + [len(out)])]
    flag = lambda f: re.compile(r"\n  --" + f.name.replace("_", "-") + r"[ \n]")
    method = {f.name for f in dataclasses.fields(mvp.Hyperparams)}
    how = {f.name for f in dataclasses.fields(mvp.Args) if f.metadata.get("how")}
    for f in (f for f in dataclasses.fields(mvp.Args) if f.metadata.get("help")):
        where = [i for i, text in enumerate(sections) if flag(f).search(text)]
        assert where == [1 if f.name in method else 2 if f.name in how else 0], f.name
    usage = out[:out.index("\n\n")]
    assert usage.index("[--env ") < usage.index("[--policy ") < usage.index("[--device ")
