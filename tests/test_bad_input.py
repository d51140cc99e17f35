"""Bad input across the CLI and config: one line naming the problem, exit code 2, no traceback, and
nothing written -- no results folder, no MLflow store, no file anywhere under the working folder.

Most cases call ``pipeline.cli.main`` in-process (fast; every check runs before Ray or MLflow is
touched); two run the installed ``sors`` script to show the same end to end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cli
from pipeline.plan import presets
from sors.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SORS = Path(sys.executable).with_name("sors")


def _closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: a rejected command must leave it as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder holding only what the cases refer to: an empty data root, a plain file,
    a checkpoint-looking text file. The CLI runs with it as the current folder."""
    (tmp_path / "empty-data").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


R = "{tmp}/results"  # the results folder of a case unless it names another
# (case id, argv after the command's name, text the one-line message must contain)
SWEEP_CASES = [
    ("unknown-preset", ["sweep", "no_such_preset"], "unknown preset 'no_such_preset'"),
    ("unknown-set-key", ["sweep", "smoke", "--set", "train.speed=3"], "train.speed: unknown option"),
    ("misspelt-set-key", ["sweep", "smoke", "--set", "train.lamda=3"], "did you mean train.lambda"),
    ("misspelt-section", ["sweep", "smoke", "--set", "trian.epochs=3"], "trian.epochs: unknown option"),
    ("set-without-value", ["sweep", "smoke", "--set", "train.lambda"], "not of the form key=value"),
    ("non-numeric-value", ["sweep", "smoke", "--set", "train.lr=fast"], "train.lr: 'fast' is not a number"),
    ("non-finite-value", ["sweep", "smoke", "--set", "train.lr=nan"], "train.lr"),
    ("negative-lambda", ["sweep", "smoke", "--set", "train.lambda=-1"], "train.lambda"),
    ("eps-above-1", ["sweep", "smoke", "--set", "attack.eps=1.5"], "attack.eps"),
    ("eps-below-0", ["sweep", "smoke", "--set", "attack.eps=-25/255"], "attack.eps"),
    ("m-zero", ["sweep", "smoke", "--set", "model.n_ops=0"], "model.n_ops"),
    ("k1-with-lambda", ["sweep", "smoke", "--set", "train.paths_per_step=1"], "train.paths_per_step"),
    ("unknown-attack", ["sweep", "smoke", "--set", "attack.name=fgsm,deepfool9"], "unknown attack 'deepfool9'"),
    ("unknown-model", ["sweep", "smoke", "--set", "model.name=resnet99"], "unknown model 'resnet99'"),
    ("unknown-dataset", ["sweep", "smoke", "--set", "data.name=imagenet"], "data.name"),
    ("batch-size-zero", ["sweep", "smoke", "--set", "train.batch_size=0"], "train.batch_size"),
    ("negative-epochs", ["sweep", "smoke", "--set", "train.epochs=-1"], "train.epochs"),
    ("zero-train-images", ["sweep", "smoke", "--set", "data.n_train=0"], "data.n_train"),
    ("zero-workers", ["sweep", "smoke", "--set", "train.num_workers=0"], "train.num_workers"),
    ("zero-repeats", ["sweep", "smoke", "--set", "eval.repeats=0"], "eval.repeats"),
    ("data-root-without-data", ["sweep", "smoke", "--data-root", "{tmp}/empty-data"], "not found in"),
    ("results-dir-is-a-file", ["sweep", "smoke", "--results-dir", "{tmp}/a-file"], "is a file, not a folder"),
    ("results-dir-under-a-file", ["sweep", "smoke", "--results-dir", "{tmp}/a-file/results"], "is a file"),
    ("storage-path-is-a-file", ["sweep", "smoke", "--storage-path", "{tmp}/a-file"], "--storage-path"),
    ("ray-address-unreachable", ["sweep", "smoke", "--ray-address", "127.0.0.1:{port}"], "no Ray at 127.0.0.1"),
    ("ray-address-malformed", ["sweep", "smoke", "--ray-address", "http://head:8265"], "expected auto, host:port"),
    ("num-cpus-zero", ["sweep", "smoke", "--num-cpus", "0"], "--num-cpus 0"),
    ("num-cpus-not-a-number", ["sweep", "smoke", "--num-cpus", "two"], "invalid int value: 'two'"),
    ("tracking-unreachable", ["sweep", "smoke", "--tracking-uri", "http://127.0.0.1:{port}"], "unreachable"),
    ("tracking-bad-scheme", ["sweep", "smoke", "--tracking-uri", "ftp://host/mlflow"], "unsupported scheme 'ftp'"),
    ("tracking-sqlite-under-a-file", ["sweep", "smoke", "--tracking-uri", "sqlite:///{tmp}/a-file/m.db"], "a-file"),
    ("unknown-flag", ["sweep", "smoke", "--epochs", "3"], "unrecognized arguments: --epochs"),
    ("train-unknown-model", ["train", "--set", "model.name=nope"], "unknown model 'nope'"),
    ("train-teacher-missing", ["train", "--set", "train.teacher={tmp}/gone.pt"], "no such checkpoint file"),
    ("evaluate-missing-checkpoint", ["evaluate", "{tmp}/gone.pt"], "gone.pt: no such checkpoint file"),
    ("evaluate-not-a-checkpoint", ["evaluate", "{tmp}/notes.pt"], "notes.pt: not a PyTorch checkpoint"),
    ("report-nothing-stored", ["report"], "no results"),
    ("sync-nothing-trained", ["sync", "--results-dir", "{tmp}/results"], "no trained models here"),
    ("max-concurrent-zero", ["sweep", "smoke", "--max-concurrent-trials", "0"], "--max-concurrent-trials 0"),
    ("lr-scaling-unknown", ["sweep", "smoke", "--set", "train.lr_scaling=sqrt"], "train.lr_scaling"),
    ("submit-without-address", ["submit", "smoke"], "--address http://HOST:8265 is required"),
    (
        "submit-unreachable",
        ["submit", "smoke", "--address", "http://127.0.0.1:{port}"],
        "cannot reach the Ray Jobs API",
    ),
    ("submit-unknown-preset", ["submit", "nosuch", "--address", "http://127.0.0.1:{port}"], "unknown preset"),
    (
        "submit-bad-option",
        ["submit", "smoke", "--address", "http://127.0.0.1:{port}", "--set", "train.lr=-1"],
        "train.lr",
    ),
    (
        "submit-not-sors-after-dashes",
        ["submit", "--address", "http://127.0.0.1:{port}", "--", "rm", "-rf", "/"],
        "after --: a sors command",
    ),
    ("unknown-command", ["deploy"], "invalid choice: 'deploy'"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(sandbox, capsys, argv, expected):
    argv = [a.format(tmp=sandbox, port=_closed_port()) for a in argv]
    if "--results-dir" not in argv and argv[0] not in ("deploy",):
        argv += ["--results-dir", R.format(tmp=sandbox)]
    before = _tree(sandbox)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert _tree(sandbox) == before  # no results folder, no mlflow.db, nothing


def test_there_are_at_least_twenty_bad_input_cases():
    assert len(SWEEP_CASES) >= 20


def test_a_results_folder_that_cannot_be_written_is_refused_end_to_end(tmp_path):
    """The installed ``sors`` script, as a user runs it: exit 2, one line on stderr, no traceback."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the folder immutable instead
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a folder unwritable")
    else:
        locked.chmod(0o500)
    try:
        before = _tree(tmp_path)
        proc = subprocess.run(
            [str(SORS), "sweep", "smoke", "--results-dir", str(locked / "results")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        )
        assert _tree(tmp_path) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)])
        else:
            locked.chmod(0o700)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "folder is not writable" in proc.stderr and str(locked) in proc.stderr
    assert not (locked / "results").exists()


def test_a_bad_value_is_refused_end_to_end_by_the_installed_script(tmp_path):
    proc = subprocess.run(
        [str(SORS), "sweep", "smoke", "--set", "train.lambda=-3", "--results-dir", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("sors sweep: error: train.lambda:") and "-3.0 is negative" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- property-based: the CLI accepts what the config accepts

NUMERIC_KEYS = [
    "train.lambda",
    "train.lr",
    "train.batch_size",
    "train.epochs",
    "train.paths_per_step",
    "train.momentum",
    "model.n_ops",
    "data.n_train",
    "eval.repeats",
    "eval.n_examples",
    "attack.eps",
]
VALUES = st.one_of(
    st.integers(-5, 300).map(str),
    st.floats(-2, 50).map(repr),
    st.floats().map(repr),
    st.sampled_from(["", "1/2", "25/255", "-0", "1e-3", "inf", "3.", "two", "0x10", "1,2"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-property")


def _dry_run(workdir: Path, overrides: list[str], capsys) -> tuple[int, str, str]:
    argv = ["sweep", "smoke", "--dry-run", "--results-dir", str(workdir / "results")]
    argv += [f"--set={item}" for item in overrides]  # "--set=" form: a value may start with "-"
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(NUMERIC_KEYS), value=VALUES)
def test_cli_accepts_exactly_the_overrides_the_config_accepts(workdir, capsys, key, value):
    """For any value of a numeric option: ``sors sweep --dry-run`` exits 0 iff the preset resolves with
    it, and then every trial shows the value; otherwise exit 2 with one line naming the option."""
    try:
        presets.build_sweep("smoke", [f"{key}={value}"])
        valid = True
    except ConfigError:
        valid = False
    code, out, err = _dry_run(workdir, [f"{key}={value}"], capsys)
    assert "Traceback" not in out + err
    assert not any(workdir.iterdir())  # a dry run, accepted or not, writes nothing
    if valid:
        assert code == 0, err
        sweep = presets.build_sweep("smoke", [f"{key}={value}"])
        for trial in sweep.trials:
            line = next(li for li in out.splitlines() if li.strip().startswith(f"{trial.name} ("))
            assert trial.name in line  # the resolved trials are listed
    else:
        assert code == 2
        assert err.count("\n") == 1 and err.startswith(f"sors sweep: error: {key}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.text(
        alphabet=st.characters(
            min_codepoint=33,
            max_codepoint=0x2FF,
            blacklist_characters="=",
            blacklist_categories=("Cc", "Zl", "Zp", "Zs"),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_any_unknown_key_is_one_line_exit_2(workdir, capsys, key):
    from sors import config as config_lib

    if key in config_lib.all_keys():
        return
    code, out, err = _dry_run(workdir, [f"{key}=1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert key.strip() in err
    assert not any(workdir.iterdir())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lam=st.floats(0, 1e4, allow_nan=False), k=st.integers(2, 6), epochs=st.integers(0, 50))
def test_valid_overrides_reach_every_trial_through_the_cli(workdir, capsys, lam, k, epochs):
    code, out, err = _dry_run(
        workdir, [f"train.lambda={lam!r}", f"train.paths_per_step={k}", f"train.epochs={epochs}"], capsys
    )
    assert code == 0, err
    trial_lines = [li for li in out.splitlines() if li.startswith("  ")]
    assert len(trial_lines) == len(presets.build_sweep("smoke").trials)
    for line in trial_lines:
        shown = dict(tok.split("=", 1) for tok in line.split(": ", 1)[1].split())
        assert float(shown.get("train.lambda", "10.0")) == lam
        assert int(shown.get("train.paths_per_step", "2")) == k
        assert int(shown["train.epochs"]) == epochs  # always shown: the default is "unset"
