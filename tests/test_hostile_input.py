"""Hostile input, second pass: each case a hostile user tried against a fresh install. Bad input ->
exit 2, one line naming the problem, no traceback, nothing written (the same contract as
``tests/test_bad_input.py``); every check runs before Ray or MLflow is touched, so the cases call
``pipeline.cli.main`` in-process.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.plan import presets
from sors import config as config_lib
from sors import data as data_lib
from sors import train as train_lib
from sors.errors import ConfigError, DataNotFoundError, TrainingDiverged
from tests.test_bad_input import _tree

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh")
)
PRESETS = {  # file name -> YAML text
    "bomb.yaml": BOMB + "trials: [{name: t, set: {model.name: lenet5}, grid: {train.seed: *h}}]\n",
    "seeds.yaml": "trials: [{name: t}]\nevaluation: {seeds: 3, attacks: [fgsm], eps: [0.1]}\n",
    "evaluation.yaml": "trials: [{name: t}]\nevaluation: [clean, fgsm]\n",
    "variants.yaml": "trials: [{name: t, set: {model.name: sors_lenet5}, variants: 3}]\n",
    "eps.yaml": "trials: [{name: t}]\nevaluation: {attacks: [{name: fgsm, eps: 0.1}]}\n",
    "clean.yaml": 'trials: [{name: t}]\nevaluation: {clean: "false", attacks: [fgsm], eps: [0.1]}\n',
    "escape.yaml": "name: ../../escape\ntrials: [{name: t}]\n",
    "members.yaml": "trials: [{name: t, set: {model.name: ensemble, model.members: 'lenet5,lenet9'}}]\n",
}


def _checkpoint(path: Path, **changes) -> None:
    """An untrained LeNet-5 checkpoint whose stored config or payload has ``changes`` (a hostile file)."""
    cfg = config_lib.resolve(config_lib.apply_overrides(config_lib.RunConfig(), {"model.name": "lenet5"}))
    payload = train_lib.checkpoint_payload(train_lib.new_state(cfg), cfg)
    for key, value in changes.items():
        if key == "config":
            payload["config"] = value
        else:
            section, option = key.split("__")
            payload["config"][section][option] = value
    torch.save(payload, path)


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A working folder with the hostile files the cases name; the CLI runs with it as current folder."""
    for name, text in PRESETS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "random.yaml").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "huge.yaml").write_text("trials: [{name: t}]\n#" + "x" * (presets.MAX_PRESET_BYTES + 10) + "\n")
    cut = tmp_path / "cut-data"
    cut.mkdir()
    for source in Path(data_lib.DEBIAN_FASHION_MNIST).glob("*.gz"):  # each file cut to its first 64 KiB
        (cut / source.name).write_bytes(source.read_bytes()[: 1 << 16])
    _checkpoint(tmp_path / "good.pt")
    _checkpoint(tmp_path / "list-config.pt", config=["model.name=lenet5"])
    _checkpoint(tmp_path / "unknown-model.pt", model__name="resnet99")
    _checkpoint(tmp_path / "huge-model.pt", model__name="sors_lenet5", model__n_ops=10**9)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


EV = ["evaluate", "{tmp}/good.pt"]
DRY = ["--dry-run"]
# (case id, argv, text the one line must contain); "{tmp}": the hostile folder
CASES = [
    # 1. sors evaluate checks --set through the same config path as train/sweep
    (
        "evaluate-repeats-0",
        EV + ["--set", "attack.name=fgsm", "--set", "attack.eps=8/255", "--set", "eval.repeats=0"],
        "eval.repeats: 0",
    ),
    ("evaluate-negative-n", EV + ["--set", "eval.n_examples=-5"], "eval.n_examples: -5"),
    ("evaluate-unknown-key", EV + ["--set", "bogus.key=1"], "bogus.key: unknown option"),
    ("evaluate-nan", EV + ["--set", "eval.n_examples=nan"], "eval.n_examples: 'nan' is not an integer"),
    ("evaluate-training-key", EV + ["--set", "train.lr=0.1"], "sors evaluate cannot change a trained model"),
    ("evaluate-unknown-attack", EV + ["--set", "attack.name=deepfool9"], "unknown attack 'deepfool9'"),
    # 2. names that become paths
    ("sweep-name-escapes", ["sweep", "smoke", "--name", "../../escape"], "--name: '../../escape' is not a safe name"),
    ("sweep-name-hidden", ["sweep", "smoke", "--name", ".hidden"], "is not a safe name"),
    ("sweep-name-nul", ["sweep", "smoke", "--name", "a\x00b"], "is not a safe name"),
    ("evaluate-label-escapes", EV + ["--label", "../../../escape"], "--label: '../../../escape' is not a safe name"),
    ("evaluate-name-escapes", EV + ["--name", "a/b"], "--name: 'a/b' is not a safe name"),
    ("preset-name-leaves-folder", ["sweep", "../../../etc/passwd"], "unknown preset '../../../etc/passwd'"),
    ("preset-file-names-escape", ["sweep", "{tmp}/escape.yaml"], "preset name: '../../escape' is not a safe name"),
    ("train-name-escapes", ["train", "--name", "../x"], "--name: '../x' is not a valid name"),
    # 3. memory bombs
    ("n-ops-million", ["train", "--set", "model.name=sors_lenet5", "--set", "model.n_ops=1000000"], "GiB of weights"),
    (
        "members-99999",
        ["train", "--set", "model.name=ensemble", "--set", "model.members=lenet5*99999"],
        "99999 member(s): over the limit",
    ),
    ("yaml-billion-laughs", ["sweep", "{tmp}/bomb.yaml"], "YAML alias at line 2"),
    ("preset-over-1-mib", ["sweep", "{tmp}/huge.yaml"], "larger than 1 MiB"),
    ("evaluate-huge-model", ["evaluate", "{tmp}/huge-model.pt"], "over the limit"),
    # 4. arithmetic and numbers
    ("lr-one-over-zero", ["sweep", "smoke", "--set", "train.lr=1/0"], "train.lr: '1/0' divides by zero"),
    ("eps-eight-over-zero", ["sweep", "smoke", "--set", "attack.eps=8/0"], "attack.eps: '8/0' divides by zero"),
    ("lr-1e308", ["sweep", "smoke", "--set", "train.lr=1e308"], "train.lr: learning rate 1e+308"),
    ("lr-inf", ["sweep", "smoke", "--set", "train.lr=inf"], "is not a finite number"),
    ("value-100-kb", ["sweep", "smoke", "--set", "train.lr=" + "9" * 100_000], "(100002 characters)"),
    # 5. preset fields of the wrong type
    ("preset-seeds-int", ["sweep", "{tmp}/seeds.yaml"], "evaluation.seeds: 3 is int, not a list"),
    ("preset-evaluation-list", ["sweep", "{tmp}/evaluation.yaml"], "evaluation: ['clean', 'fgsm'] is list"),
    ("preset-variants-int", ["sweep", "{tmp}/variants.yaml"], "trials.t.variants: 3 is int, not a list"),
    ("preset-attack-eps-float", ["sweep", "{tmp}/eps.yaml"], "evaluation.attacks.eps: 0.1 is float"),
    ("preset-clean-string", ["sweep", "{tmp}/clean.yaml"], "evaluation.clean: 'false' is str, not true or false"),
    ("preset-random-bytes", ["sweep", "{tmp}/random.yaml"], "not a text file (not UTF-8)"),
    ("preset-unknown-member", ["sweep", "{tmp}/members.yaml"], "model.members: unknown member model 'lenet9'"),
    # 6. inputs that used to fail late, after writing to the results folder
    (
        "unknown-member",
        ["train", "--set", "model.name=ensemble", "--set", "model.members=lenet5,nope"],
        "unknown member model 'nope'",
    ),
    (
        "n-ops-on-a-plain-model",
        ["train", "--set", "model.name=lenet5", "--set", "model.n_ops=3"],
        "model.n_ops: not an option of model 'lenet5'",
    ),
    ("checkpoint-config-is-a-list", ["evaluate", "{tmp}/list-config.pt"], "config or model_state is not a mapping"),
    ("checkpoint-unknown-model", ["evaluate", "{tmp}/unknown-model.pt"], "unknown model 'resnet99'"),
    ("teacher-unknown-model", ["train", "--set", "train.teacher={tmp}/unknown-model.pt"], "unknown model 'resnet99'"),
    ("tracking-uri-bad-ipv6", ["sweep", "smoke", "--tracking-uri", "http://[::1"], "not a valid URI"),
    ("ray-address-bad-ipv6", ["sweep", "smoke", "--ray-address", "[::1:6379"], "--ray-address"),
    ("data-root-truncated-gz", ["sweep", "smoke", "--data-root", "{tmp}/cut-data"], "truncated or corrupt"),
    ("results-dir-in-proc", ["sweep", "smoke", "--results-dir", "/proc/sors-results"], "kernel's proc file system"),
    ("storage-path-gopher", ["sweep", "smoke", "--storage-path", "gopher://host/x"], "unsupported scheme 'gopher'"),
    (
        "tracking-sqlite-is-a-folder",
        ["sweep", "smoke", "--tracking-uri", "sqlite:///{tmp}/cut-data"],
        "is a folder, not a database file",
    ),
]


# every case as run, and (train/sweep) as a dry run: both refuse before anything is written
RUNS = [
    (f"{name}-{mode}", argv + (DRY if mode == "dry-run" else []), expected)
    for name, argv, expected in CASES
    for mode in (("run",) if argv[0] == "evaluate" else ("run", "dry-run"))
]


@pytest.mark.parametrize("argv,expected", [r[1:] for r in RUNS], ids=[r[0] for r in RUNS])
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(hostile, capsys, argv, expected):
    argv = [a.format(tmp=hostile) for a in argv]
    if "--results-dir" not in argv:
        argv += ["--results-dir", str(hostile / "results")]
    before = _tree(hostile)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert len(lines[0]) <= cli.MESSAGE_LIMIT + 40 and "Traceback" not in out + err
    assert _tree(hostile) == before


def test_the_hostile_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_an_existing_sqlite_store_that_cannot_be_written_is_refused_up_front(hostile, capsys):
    """Checked before the run, not discovered after minutes of MLflow retries."""
    store = hostile / "mlflow.db"
    store.write_bytes(b"")
    if os.geteuid() == 0:  # root writes through permission bits: make the file immutable instead
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(store)]).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a file unwritable")
    else:
        store.chmod(0o400)
    try:
        code = cli.main(
            [
                "sweep",
                "smoke",
                "--dry-run",
                "--tracking-uri",
                f"sqlite:///{store}",
                "--results-dir",
                str(hostile / "results"),
            ]
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{store} is not writable" in err
    assert not (hostile / "results").exists()


def test_a_large_model_runs_its_dry_run_with_allow_large_and_says_what_it_would_allocate(hostile, capsys):
    argv = [
        "train",
        "--dry-run",
        "--set",
        "model.name=sors_lenet5",
        "--set",
        "model.n_ops=1000000",
        "--results-dir",
        str(hostile / "results"),
    ]
    assert cli.main(argv + ["--allow-large"]) == 0
    out = capsys.readouterr().out
    assert "44,426,000,000 parameters" in out and "165.5 GiB of weights" in out
    assert cli.main(argv[:-2] + ["--set", "model.n_ops=2", "--results-dir", str(hostile / "results")]) == 0
    counted = int(capsys.readouterr().out.split("[")[1].split(" parameters")[0].replace(",", ""))
    from sors.models import build_from_config

    cfg = config_lib.resolve(
        config_lib.apply_overrides(config_lib.RunConfig(), {"model.name": "sors_lenet5", "model.n_ops": 2})
    )
    assert counted == sum(p.numel() for p in build_from_config(cfg).parameters())  # the count is exact


def test_a_truncated_train_file_alone_is_found_before_anything_runs(tmp_path):
    """Only the train images cut (the test split is whole): the header/trailer check still names it."""
    for source in Path(data_lib.DEBIAN_FASHION_MNIST).glob("*.gz"):
        shutil.copy(source, tmp_path / source.name)
    cut = tmp_path / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:-1000])
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte.gz: .* where its header says"):
        data_lib.check_intact("fashion_mnist", str(tmp_path))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "rb") as handle:
        assert handle.read(4) == b"\x00\x00\x08\x01"  # the other files are untouched and whole
    data_lib.check_intact("fashion_mnist")  # the real data passes


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("model.members", "unknown member model 'nope'", "lenet5"),
        DataNotFoundError("/data/x.gz: unreadable"),
        TrainingDiverged("loss nan"),
    ],
)
def test_user_errors_pickle_as_themselves(error):
    """What crosses a Ray task or Train worker boundary: the same type and one-line message."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


def test_nightly_without_arguments_is_one_line(capsys):
    from pipeline import cli

    assert cli.main(["nightly"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one of the arguments --config --accept is required" in err[0]
