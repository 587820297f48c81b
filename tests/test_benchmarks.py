"""run_benchmarks.py: the suite (dry run, flags, launching through submitit, exit code, report), aggregation and
curves, speed and latency, and plot.
"""
import json
import os
import shlex
import sys
from types import SimpleNamespace

import pytest

import mvp
import run_benchmarks
from tests.helpers import TINY, read_csv


# ---------------------------------------------------------------------------------------------
# The suite: commands, flags, launching, exit code
# ---------------------------------------------------------------------------------------------
SUITE = ["suite", "--tasks", "cube-double-task1", "--methods", "mvp", "flow10"]


def _no_launch(*_):
    pytest.fail("the suite launched runs")


def test_suite_dry_run_prints_commands_and_skips_finished(tmp_path, capsys, monkeypatch):
    finished = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "mvp", 0)
    os.makedirs(finished)
    # the preset's
    open(os.path.join(finished, "summary.json"), "w").write('{"offline_steps": 20000, "online_steps": 20000}')
    run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                         "--out-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert "4 run(s), 1 already finished, 3 to run" in out
    lines = [line for line in out.splitlines() if "mvp.py" in line]
    assert len(lines) == 3 and all("--hidden-dim 256" in line for line in lines)  # the cpu preset
    assert sum("--policy flow --flow-steps 10" in line for line in lines) == 2
    assert not any(os.path.join("mvp", "seed0") in line for line in lines)
    interrupted = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "flow10", 1)
    os.makedirs(os.path.join(interrupted, "checkpoints"))
    open(os.path.join(interrupted, "checkpoints", "resume-0000000500.pt"), "wb").close()
    run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                         "--out-dir", str(tmp_path), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "mvp.py" in line]
    assert [line.endswith(f"--resume {interrupted}") for line in lines] == [False, False, True]  # it goes on, not over
    assert not any("--eval-workers" in line for line in lines)  # one run at a time: mvp.py's auto
    # side by side, the runs split the spare cores between their evaluation workers, unless told otherwise
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    for extra, expected in (([], "--eval-workers 3"), (["--extra", "--eval-workers 1"], "--eval-workers 1")):
        run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                             "--out-dir", str(tmp_path), "--workers", "4", "--dry-run", *extra])
        lines = [line for line in capsys.readouterr().out.splitlines() if "mvp.py" in line]
        assert len(lines) == 3 and all(line.count("--eval-workers") == 1 and expected in line for line in lines)


def test_cube_single_presets_differ_only_in_budget():
    full, short = (vars(mvp.parse_args(run_benchmarks.PRESETS[k])) for k in ("cube-single-cpu",
                                                                             "cube-single-cpu-short"))
    assert (full["offline_steps"], full["eval_interval"], short["offline_steps"], short["eval_interval"]) == (15000,
                                                                                                              5000,
                                                                                                              6000,
                                                                                                              2000)
    assert {k for k in full if full[k] != short[k]} == {"offline_steps", "eval_interval"}
    assert (short["eval_episodes"], short["dataset_episodes"], short["hidden_dim"], short["online_steps"]) == (20,
                                                                                                               150,
                                                                                                               256, 0)


def test_suite_extra_is_one_quoted_string_and_flags_after_it_stay_the_suites(tmp_path, capsys, monkeypatch):
    """The issue's command ended `--extra ... --dry-run`: the --dry-run went to mvp.py and the runs started."""
    monkeypatch.setattr(run_benchmarks, "launch", _no_launch)
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--extra", "--tau 0.02 --dataset-dir '/data/my runs'",
                         "--dry-run"])
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if "mvp.py" in line]
    assert len(lines) == 2 and all(cmd[-4:] == ["--tau", "0.02", "--dataset-dir", "/data/my runs"] for cmd in lines)
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--extra=--compile", "--dry-run"])
    assert all(line.endswith("--compile") for line in capsys.readouterr().out.splitlines() if "mvp.py" in line)
    # the old form is refused, with the new one in the message, rather than read some other way
    with pytest.raises(SystemExit):
        run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--extra", "--tau", "0.02", "--dry-run"])
    assert "--extra takes one quoted string" in capsys.readouterr().err


def test_tiny_real_suite_through_submitit_local_executor(single_dir, tmp_path):
    out = tmp_path / "suite"
    argv = ["suite", "--tasks", "cube-single-task1", "--seeds", "0", "--methods", "mvp", "flow1",
            "--launcher", "submitit-local", "--out-dir", str(out), "--extra"]
    extra = [*TINY, "--dataset-dir", single_dir, "--offline-steps", "100", "--start-training", "20",
             "--eval-interval", "0"]
    argv = [*argv, shlex.join([*extra, "--online-steps", "60"])]
    table = run_benchmarks.main(argv)
    assert set(table) == {"cube-single-task1/mvp", "cube-single-task1/flow1"}
    for row in table.values():
        assert list(row["curve"]) == [100, 160] and row["cells"][160]["n"] == 1
    assert (out / "results.md").exists() and (out / "curves_cube-single-task1.png").exists()
    flow_args = json.loads((out / "cube-single-task1" / "flow1" / "seed0" / "args.json").read_text())
    assert flow_args["policy"] == "flow" and flow_args["flow_steps"] == 1
    # --workers 1 (the default): the second run starts once the first has finished
    runs = out / "cube-single-task1"
    finished, started = runs / "mvp" / "seed0" / "summary.json", runs / "flow1" / "seed0" / "args.json"
    assert os.path.getmtime(finished) <= os.path.getmtime(started)
    # a second call finds both runs finished and launches nothing
    before = os.path.getmtime(out / "cube-single-task1" / "mvp" / "seed0" / "summary.json")
    run_benchmarks.main(argv)
    assert os.path.getmtime(out / "cube-single-task1" / "mvp" / "seed0" / "summary.json") == before
    # more steps asked of a finished run: it continues from its end-of-phase checkpoint (the other stays as it is)
    table = run_benchmarks.main([*argv[:6], "mvp", *argv[8:-1], shlex.join([*extra, "--online-steps", "80"])])
    assert list(table["cube-single-task1/mvp"]["curve"]) == [100, 160, 180]


def test_suite_tells_interrupted_runs_from_failed_ones(tmp_path, capsys):
    """mvp.py exits 130 / 143 after saving on Ctrl-C / SIGTERM: the suite says a relaunch resumes it."""
    todo = [(str(tmp_path / name), [sys.executable, "-c", f"raise SystemExit({code})"]) for name, code in (("a",
                                                                                                            143),
                                                                                                            ("b", 1))]
    assert run_benchmarks.launch(SimpleNamespace(launcher="local", workers=1), todo) == [143, 1]
    out = capsys.readouterr().out
    assert f"interrupted and saved (143): {tmp_path / 'a'}; the same suite command resumes it" in out
    assert f"FAILED (1): {tmp_path / 'b'}" in out and "FAILED (143)" not in out


def test_a_dead_submitit_job_is_one_line_not_a_traceback(tmp_path, capsys):
    """A submitit job that dies (here: its run directory cannot be made) is reported in one line naming the
    run and submitit's logs; the next run still goes, and the suite's summary tells it from a failed run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    todo = [(str(path), [sys.executable, "-c", "pass"]) for path in (blocker / "run", tmp_path / "ok")]
    opts = SimpleNamespace(launcher="submitit-local", workers=1, out_dir=str(tmp_path / "suite"), timeout_min=5)
    assert run_benchmarks.launch(opts, todo) == [run_benchmarks.DIED, 0]
    out = capsys.readouterr().out
    assert "died (FailedJobError: NotADirectoryError: " in out  # the job's own exception, in one line
    assert f"): {blocker / 'run'}; submitit's logs are in {tmp_path}" in out
    assert "Traceback" not in out and "FAILED" not in out


def test_suite_exits_non_zero_and_names_the_runs_that_did_not_finish(tmp_path, capsys, monkeypatch):
    """mvp finishes (one evaluation each), flow10 seed 0 fails, flow10 seed 1 is interrupted (143, resumable)."""
    failed, interrupted = (run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "flow10", s) for s in (0, 1))

    def fake_run(run_dir, cmd):  # what mvp.py leaves behind, and its exit code
        code = {failed: 1, interrupted: 143}.get(run_dir, 0)
        if code == 0:
            _fake_run(tmp_path, "cube-double-task1", "mvp", int(cmd[cmd.index("--seed") + 1]), [("offline", 100, 0.5)])
        return code

    monkeypatch.setattr(run_benchmarks, "run_logged", fake_run)
    with pytest.raises(SystemExit) as exit_:
        run_benchmarks.main([*SUITE, "--seeds", "0", "1", "--out-dir", str(tmp_path)])
    message = str(exit_.value.code)  # a message: Python exits 1
    assert message.startswith("[suite] 2 of 4 run(s) did not finish")
    assert f"{failed}: failed (exit 1), log {os.path.join(failed, 'stdout.log')}" in message
    assert f"{interrupted}: interrupted, resumable (exit 143), log" in message
    # the finished runs were reported all the same
    assert "| cube-double-task1 | mvp | 0.50 ± 0.00 (n=2) |" in (tmp_path / "results.md").read_text()
    # no run launched, so none failed: no exit, the table comes back
    assert run_benchmarks.main([*SUITE, "--seeds", "0", "--out-dir", str(tmp_path), "--report-only"])


def test_help_lists_only_public_subcommands_and_internal_ones_still_parse(capsys):
    with pytest.raises(SystemExit):
        run_benchmarks.main(["--help"])
    out = capsys.readouterr().out
    assert "_rate" not in out and all(c in out for c in ("speed", "graph-check", "share", "envs", "suite", "plot"))
    with pytest.raises(SystemExit):
        run_benchmarks.main(["_rate", "--help"])  # `share` starts its processes with it
    assert "--start-at" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The suite's report: aggregation, tables and curves
# ---------------------------------------------------------------------------------------------
def _fake_run(root, task, method, seed, rows, offline_steps=100):
    d = run_benchmarks.run_dir_of(str(root), task, method, seed)
    os.makedirs(d)
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump(dict(offline_steps=offline_steps), f)
    with open(os.path.join(d, "eval.csv"), "w") as f:
        f.write("phase,step,success_rate,return_mean,length_mean\n")
        for phase, step, success in rows:
            f.write(f"{phase},{step},{success},-1,1\n")


def test_aggregate_table_and_curves_on_synthetic_csvs(tmp_path):
    _fake_run(tmp_path, "cube-double-task4", "mvp", 0, [("offline", 100, 0.2), ("online", 50, 0.6)])
    _fake_run(tmp_path, "cube-double-task4", "mvp", 1, [("offline", 100, 0.4), ("online", 50, 1.0)])
    _fake_run(tmp_path, "cube-double-task4", "flow10", 0, [("offline", 100, 0.1), ("online", 50, 0.3)])
    table = run_benchmarks.aggregate(str(tmp_path), ["cube-double-task4"], ["mvp", "flow10"], [0, 1])
    mvp_row = table["cube-double-task4/mvp"]
    # online step 50 -> 150
    assert mvp_row["cells"] == {150: dict(mean=pytest.approx(0.8), std=pytest.approx(0.2), n=2)}
    assert mvp_row["curve"] == {100: [0.2, 0.4], 150: [0.6, 1.0]}
    at_100 = run_benchmarks.aggregate(str(tmp_path), ["cube-double-task4"], ["mvp"], [0, 1], steps=[100])
    assert at_100["cube-double-task4/mvp"]["cells"][100]["mean"] == pytest.approx(0.3)
    md = run_benchmarks.table_markdown(table)
    assert "| cube-double-task4 | mvp | 0.80 ± 0.20 (n=2) | 0.95 |" in md
    assert "| cube-double-task4 | flow10 | 0.30 ± 0.00 (n=1) | 0.93 |" in md
    paths = run_benchmarks.plot_curves(table, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["curves_cube-double-task4.png"] and os.path.getsize(paths[0]) > 5000


def _closed_figures(monkeypatch) -> list:
    """The figures run_benchmarks.py closes after saving them, kept open to be looked at."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    return figs


def plt_close_all(figs):
    import matplotlib.pyplot as plt
    for fig in figs:
        plt.close(fig)


def test_curves_x_label_says_whether_the_runs_went_online(tmp_path, monkeypatch):
    """The success curves' step axis: offline gradient steps, then online env steps only where a drawn step is an
    online evaluation; a seed's online steps that the other seeds lack are not drawn."""
    _fake_run(tmp_path, "cube-single-task1", "mvp", 0, [("offline", 50, 0.1), ("offline", 100, 0.2)])
    _fake_run(tmp_path, "cube-single-task1", "mvp", 1, [("offline", 100, 0.3), ("online", 50, 0.6)])
    _fake_run(tmp_path, "cube-double-task1", "mvp", 0, [("offline", 100, 0.2), ("online", 50, 0.6)])
    table = run_benchmarks.aggregate(str(tmp_path), ["cube-single-task1", "cube-double-task1"], ["mvp"], [0, 1])
    assert list(table["cube-single-task1/mvp"]["curve"]) == [100]  # both seeds' offline end only
    figs = _closed_figures(monkeypatch)
    run_benchmarks.plot_curves(table, str(tmp_path))
    monkeypatch.undo()
    labels = {fig.axes[0].get_title(): fig.axes[0].get_xlabel() for fig in figs}
    plt_close_all(figs)
    assert labels == {"cube-single-task1": "offline gradient step",
                      "cube-double-task1": "step: offline gradient steps, then online env steps"}
    assert not table["cube-single-task1/mvp"]["online"] and table["cube-double-task1/mvp"]["online"]


def test_suite_report_only_tables_what_exists_and_launches_nothing(tmp_path, monkeypatch):
    """--report-only: seeds a method has not run yet are left out of its mean, and nothing is launched."""
    for method, seed, success in [("mvp", 0, 0.2), ("mvp", 1, 0.4), ("flow10", 0, 0.1)]:
        d = run_benchmarks.run_dir_of(str(tmp_path), "cube-single-task1", method, seed)
        os.makedirs(d)
        open(os.path.join(d, "args.json"), "w").write(json.dumps(dict(offline_steps=100)))
        open(os.path.join(d, "eval.csv"), "w").write(f"phase,step,success_rate\noffline,100,{success}\n")
    monkeypatch.setattr(run_benchmarks, "launch", lambda *a: pytest.fail("--report-only launched runs"))
    table = run_benchmarks.main(["suite", "--tasks", "cube-single-task1", "--seeds", "0", "1", "--methods", "mvp",
                                 "flow10",
                                 "--out-dir", str(tmp_path), "--report-only"])
    assert table["cube-single-task1/mvp"]["cells"][100] == dict(mean=pytest.approx(0.3), std=pytest.approx(0.1), n=2)
    assert table["cube-single-task1/flow10"]["cells"][100]["n"] == 1
    assert (tmp_path / "curves_cube-single-task1.png").exists()


def test_suite_report_only_says_it_launches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_benchmarks, "launch", _no_launch)
    run_benchmarks.main([*SUITE, "--seeds", "0", "1", "--out-dir", str(tmp_path), "--report-only"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "4 run(s), 0 already finished" in first and "to run" not in first and "launching nothing" in first


def test_suite_without_results_says_so_instead_of_an_empty_table(tmp_path, capsys):
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--report-only"])
    out = capsys.readouterr().out
    assert "no results yet" in out and "|" not in out and not os.listdir(tmp_path)
    assert run_benchmarks.table_markdown({}).startswith("No results yet")
    # evaluations, but none at the steps asked for: a sentence again, not a table without step columns
    _fake_run(tmp_path, "cube-double-task1", "mvp", 0, [("offline", 100, 0.5)])
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--report-only", "--report-steps", "999"])
    out = capsys.readouterr().out
    assert "no results yet" in out and "at step(s) 999" in out and "|" not in out
    # results: every header names its column, and the last line lists the files written
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--report-only"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| task"))
    assert all(cell.strip() for cell in header.strip("|").split("|"))
    written = [str(tmp_path / name) for name in ("results.md", "results.json", "curves_cube-double-task1.png")]
    assert lines[-1] == f"[suite] wrote {', '.join(written)}" and all(os.path.exists(p) for p in written)


# ---------------------------------------------------------------------------------------------
# speed and latency
# ---------------------------------------------------------------------------------------------
def test_speed_writes_table_with_ratios(tmp_path):
    out = run_benchmarks.main(["speed", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "8",
                               "--num-candidates", "4", "--repeats", "1", "--seconds", "0.1",
                               "--latency-calls", "3", "--out-dir", str(tmp_path)])
    assert set(out["results"]) == {f"{m} eager" for m in run_benchmarks.SPEED_METHODS}  # CPU: eager mode only
    assert out["results"]["flow10 eager"]["updates_ratio_vs_flow10"] == 1.0
    assert out["results"]["mvp eager"]["updates_ratio_vs_eager"] == 1.0
    assert all(r["updates_per_s"] > 0 and r["latency_ms_p95"] >= 0 for r in out["results"].values())
    md = (tmp_path / "speed.md").read_text()
    assert "| flow1 | eager |" in md and "Machine:" in md
    assert json.loads((tmp_path / "speed.json").read_text())["machine"]
    parts = out["latency_parts"]
    assert parts["policy_call_ms"] > 0 and parts["critic_call_ms"] > 0 and "cannot exceed" in md
    assert parts["flow10_latency_ratio_ceiling"] == pytest.approx(run_benchmarks.latency_ceiling(
        parts["policy_call_ms"], parts["critic_call_ms"], 10))


def test_speed_compares_bfloat16_selection_on_cpu_and_refuses_graph_modes(tmp_path):
    tiny = ["--device", "cpu", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "8", "--num-candidates", "4",
            "--repeats", "1", "--seconds", "0.1", "--latency-calls", "2", "--out-dir", str(tmp_path)]
    out = run_benchmarks.main(["speed", "--methods", "mvp", "flow10", "--modes", "eager", "eager-bf16", *tiny])
    assert set(out["results"]) == {f"{m} {mode}" for m in ("mvp", "flow10") for mode in ("eager", "eager-bf16")}
    assert out["results"]["mvp eager-bf16"]["updates_ratio_vs_eager"] > 0
    assert run_benchmarks.MODES["graph-tf32-compile-bf16"][-2:] == ["--select-dtype", "bfloat16"]
    with pytest.raises(SystemExit, match="only be eager and eager-bf16"):
        run_benchmarks.main(["speed", "--modes", "graph-tf32-bf16", *tiny])


def test_latency_ceiling_formula():
    assert run_benchmarks.latency_ceiling(1.0, 0.0, 10) == 10.0  # a free critic: K policy calls against 1
    assert run_benchmarks.latency_ceiling(1.0, 2.0, 10) == 4.0  # (10 + 2) / (1 + 2)
    # o = 0.5 of each timed call is the runtime's cost of a run, paid once per step: (10 * 0.5 + 1.5 + 0.5) / 2.5
    assert run_benchmarks.latency_ceiling(1.0, 2.0, 10, 0.5) == pytest.approx(7.0 / 2.5)
    # a first policy call of 3 (cold caches) then 9 of 1: (3 + 9 + 2) / (3 + 2)
    assert run_benchmarks.latency_ceiling(1.0, 2.0, 10, 0.0, 3.0) == pytest.approx(14.0 / 5.0)


# ---------------------------------------------------------------------------------------------
# plot: one run's logs on one step axis
# ---------------------------------------------------------------------------------------------
def test_plot_reads_a_real_runs_logs_on_one_step_axis(uninterrupted, tmp_path):
    """run_benchmarks.py plot: online rows count after the 200 offline steps, in the training and eval logs."""
    curves = run_benchmarks.run_curves(str(uninterrupted))
    assert list(curves["eval"]["success_rate"][0]) == [200, 500, 700]  # offline 200; online 300, 500
    rows = read_csv(uninterrupted / "eval.csv")
    assert list(curves["eval"]["bc_success_rate"][1]) == [float(r["bc_success_rate"]) for r in rows]
    steps = curves["train"]["critic_loss"][0]
    assert steps[0] == 20 and steps[9] == 200 and steps[10] == 220 and steps[-1] == 700
    out = run_benchmarks.main(["plot", str(uninterrupted), str(uninterrupted), "--out", str(tmp_path / "c.png")])
    assert os.path.getsize(out) > 20000
    with pytest.raises(SystemExit, match="not a run directory of mvp.py"):
        run_benchmarks.main(["plot", str(tmp_path)])


def test_plot_draws_a_run_with_one_log_row_as_points(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _fake_run(tmp_path, "cube-double-task1", "mvp", 0, [("offline", 100, 0.5)])  # logs no Q(s0, a*)
    run = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "mvp", 0)
    with open(os.path.join(run, "offline.csv"), "w") as f:
        f.write("step,critic_loss,q_mean,target_mean,mf_loss,ivc_loss,bon_gain\n100,0.5,-3,-3.1,0.2,0.1,0.05\n")
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to look at
    run_benchmarks.main(["plot", run, "--out", str(tmp_path / "c.png")])
    (fig,) = figs
    success, q0, *train = fig.axes  # PANELS' order
    for ax in [success, *train]:
        assert ax.lines and all(line.get_marker() not in (None, "None", "", " ") for line in ax.lines)
    assert [t.get_text() for t in q0.texts] == ["nothing logged yet"] and not q0.get_yticks().size
    monkeypatch.undo()
    plt.close(fig)


def test_plot_x_label_says_whether_a_drawn_run_went_online(tmp_path, monkeypatch):
    """Offline-only runs: offline gradient steps; a run with an online phase among them: offline gradient
    steps, then online env steps, with a dotted line at the hand-off."""
    train = "step,critic_loss,q_mean,target_mean,mf_loss,ivc_loss,bon_gain\n{},0.5,-3,-3.1,0.2,0.1,0.05\n"
    _fake_run(tmp_path, "cube-single-task1", "mvp", 0, [("offline", 100, 0.5)])
    offline = run_benchmarks.run_dir_of(str(tmp_path), "cube-single-task1", "mvp", 0)
    open(os.path.join(offline, "offline.csv"), "w").write(train.format(100))
    _fake_run(tmp_path, "cube-single-task1", "mvp", 1, [("offline", 100, 0.5), ("online", 50, 0.7)])
    online = run_benchmarks.run_dir_of(str(tmp_path), "cube-single-task1", "mvp", 1)
    open(os.path.join(online, "offline.csv"), "w").write(train.format(100))
    open(os.path.join(online, "online.csv"), "w").write(train.format(50))
    figs = _closed_figures(monkeypatch)
    for runs in ([offline], [offline, online]):
        run_benchmarks.main(["plot", *runs, "--out", str(tmp_path / "c.png")])
    monkeypatch.undo()
    plt_close_all(figs)
    alone, both = figs
    assert [ax.get_xlabel() for ax in alone.axes[3:]] == ["offline gradient step"] * 3
    assert [ax.get_xlabel() for ax in both.axes[3:]] == ["step: offline gradient steps, then online env steps "
                                                         "(dotted: hand-off)"] * 3
    assert [ax.get_xlabel() for ax in alone.axes[:3] + both.axes[:3]] == [""] * 6  # only the bottom row's
    handoffs = [line for line in both.axes[0].lines if line.get_linestyle() == ":"]
    assert len(handoffs) == 1 and list(handoffs[0].get_xdata()) == [100, 100]
    assert not any(line.get_linestyle() == ":" for line in alone.axes[0].lines)
