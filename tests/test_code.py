"""The source itself: no Python line over 120 characters (ruff lets some through), and what importing a file loads
(no simulator, no robosuite, no import cycle).
"""
import glob
import os
import subprocess
import sys

from tests.helpers import HERE


def test_no_python_line_is_over_120_characters():
    """ruff's E501 lets a long line through when what overflows is one word (an attribute chain, a URL). The
    top level's files, the tests' and the examples'."""
    files = [f for pattern in ("*.py", "tests/*.py", "examples/*.py") for f in glob.glob(pattern, root_dir=HERE)]
    long = []
    for name in files:
        with open(os.path.join(HERE, name)) as f:
            long += [f"{name}:{i}" for i, line in enumerate(f.read().splitlines(), 1) if len(line) > 120]
    assert len([f for f in files if os.sep not in f]) >= 7 and {os.path.dirname(f) for f in files} == {
        "", "tests", "examples"} and not long


def test_importing_mvp_needs_no_simulator():
    code = "import sys, mvp; assert 'ogbench' not in sys.modules and 'mujoco' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)
    # mvp.py imports each suite's file and run_utils.py; they never import it back (no cycle)
    code = "import sys, prepare_ogbench, prepare_robomimic, run_utils; assert 'mvp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)


def test_import_does_not_load_robosuite():
    code = "import sys, mvp; assert 'robosuite' not in sys.modules and 'h5py' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)
