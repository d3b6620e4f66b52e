"""The `raptor` command line's handling of expected failures: one line and exit 2
(`UserError`, fixable OSErrors, bad JSON) or 1 (`RunFailed`), the traceback only with
`--debug` / RAPTOR_DEBUG=1, and any other exception left to Python."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raptor import cli
from raptor.cli import main as cli_main
from raptor.errors import RunFailed, UserError

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")

# A command module whose `main` fails in the way its argument names, each by a real
# operation where one exists (a write to /dev/full, to sysfs, a JSON parse).
FAILING_COMMAND = """
import json
from raptor.errors import RunFailed, UserError

def add_arguments(parser):
    parser.add_argument("kind")
    parser.add_argument("path", nargs="?")

def main(args):
    if args.kind == "user":
        raise UserError("teacher.weights: /x.pth not found; give a local file")
    if args.kind == "run":
        raise RunFailed("loss became NaN at step 3")
    if args.kind == "json":
        json.loads("{")
    if args.kind == "bug":
        return 1 // 0
    if args.kind == "worker":  # raised in a DataLoader worker, re-raised by torch
        import torch

        class Data(torch.utils.data.IterableDataset):
            def __iter__(self):
                raise RunFailed("shard a.tar: 3 of 4 samples bad")

        list(torch.utils.data.DataLoader(Data(), num_workers=1))
    if args.kind == "missing":
        raise FileNotFoundError(f"image folder not found: {args.path}")
    with open(args.path, "w") as fh:  # "write": an OSError from the file system
        fh.write("x" * 4096)
        fh.flush()
"""


@pytest.fixture
def failing(tmp_path, monkeypatch):
    """`raptor failing KIND [PATH]`, registered as a command for this test."""
    (tmp_path / "raptor_failing_command.py").write_text(FAILING_COMMAND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "failing", ("raptor_failing_command", "fails"))
    monkeypatch.delenv("RAPTOR_DEBUG", raising=False)
    return lambda *argv: cli_main(list(argv))


def test_failure_in_a_dataloader_worker_is_its_own_one_line(failing, capsys):
    """torch re-raises a worker's exception with "Caught ... Original Traceback" in its
    message; the CLI prints the worker's own message only."""
    assert failing("failing", "worker") == 1
    err = capsys.readouterr().err
    assert err == "raptor failing: shard a.tar: 3 of 4 samples bad\n"


def test_user_error_exits_2_and_run_failed_1_in_one_line(failing, capsys):
    assert failing("failing", "user") == 2
    err = capsys.readouterr().err
    assert err == "raptor failing: teacher.weights: /x.pth not found; give a local file\n"
    assert failing("failing", "run") == 1
    assert capsys.readouterr().err == "raptor failing: loss became NaN at step 3\n"


def test_bad_json_that_escapes_is_one_line(failing, capsys):
    assert failing("failing", "json") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid JSON" in err and "Traceback" not in err


def test_unexpected_exception_keeps_its_traceback(failing):
    with pytest.raises(ZeroDivisionError):
        failing("failing", "bug")


def test_debug_flag_and_env_show_the_traceback(failing, capsys, monkeypatch):
    assert failing("failing", "user") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert failing("--debug", "failing", "user") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raise UserError(" in err
    assert err.endswith("raptor failing: teacher.weights: /x.pth not found; give a local file\n")
    # exported, so the processes the command starts (DDP workers re-run this command
    # line) report the same way
    assert os.environ["RAPTOR_DEBUG"] == "1"
    monkeypatch.setenv("RAPTOR_DEBUG", "0")
    assert failing("failing", "run") == 1
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("RAPTOR_DEBUG", "1")
    assert failing("failing", "run") == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def _one_os_line(err: str, path: str, code: int) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: {os.strerror(code)} [{errno.errorcode[code]}]; " in err, err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_is_one_line(failing, capsys):
    assert failing("failing", "write", "/dev/full") == 2
    err = capsys.readouterr().err
    assert err.startswith("raptor failing: No space left on device [ENOSPC]; free space"), err
    assert err.count("\n") == 1


def test_permission_denied_is_one_line(failing, capsys):
    """sysfs refuses new files even to root: a real EACCES/EPERM/EROFS/ENOENT."""
    target = "/sys/kernel/raptor-cli-test"
    try:
        open(target, "w").close()
    except OSError as exc:
        code = exc.errno
    else:
        os.unlink(target)
        pytest.skip("this system lets us create files in /sys/kernel")
    assert code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)
    assert failing("failing", "write", target) == 2
    _one_os_line(capsys.readouterr().err, target, code)


def test_missing_file_raised_with_a_message_is_one_line(failing, capsys):
    assert failing("failing", "missing", "/data/imgs") == 2
    err = capsys.readouterr().err
    assert err == (
        "raptor failing: image folder not found: /data/imgs; "
        "check the path in the config or on the command line\n"
    )


def test_run_dir_in_the_way_is_one_line(tmp_path, capsys, digits_shards):
    """A real command (`raptor phases`) whose run_dir is an existing file, or under one."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    given = [f"data.shards_dir={digits_shards}", "teacher.init=random"]
    assert cli_main(["phases", DEMO, f"run_dir={blocker}", *given]) == 2
    _one_os_line(capsys.readouterr().err, str(blocker), errno.EEXIST)
    assert cli_main(["phases", DEMO, f"run_dir={blocker}/run", *given]) == 2
    _one_os_line(capsys.readouterr().err, f"{blocker}/run", errno.ENOTDIR)


def test_corrupt_phases_file_names_the_file(tmp_path, capsys, digits_shards):
    run = tmp_path / "run"
    run.mkdir()
    (run / "phases.json").write_text('{"num_layers": 8, "partit')  # cut short
    given = [f"data.shards_dir={digits_shards}", "teacher.init=random"]
    assert cli_main(["phases", DEMO, f"run_dir={run}", *given]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raptor phases: phases file {run / 'phases.json'} is not valid JSON")
    assert err.count("\n") == 1


def test_user_input_failures_are_user_errors(tmp_path):
    """Bad partitions, model shapes, export folders and teachers raise UserError
    subclasses (exit 2); a non-finite loss is a RunFailed (exit 1)."""
    from raptor.eval.phases import partition, read_matrix
    from raptor.model.backbone import RaptorBackbone
    from raptor.model.partition import check_boundaries
    from raptor.model.raptor import Raptor
    from raptor.model.teacher import Teacher
    from raptor.train.fit import NonFiniteLossError

    with pytest.raises(UserError, match="strictly increasing; fix phases.boundaries"):
        check_boundaries([3, 3], 8)
    with pytest.raises(UserError, match="set model.num_heads to a divisor of 8"):
        Raptor(4, [2], dim=8, num_heads=3)
    with pytest.raises(UserError, match="export it again with `raptor export`"):
        RaptorBackbone.from_pretrained(tmp_path / "missing")
    with pytest.raises(UserError, match="set teacher.name to a timm ViT"):
        Teacher(__import__("torch").nn.Linear(2, 2))
    with pytest.raises(UserError, match="matrix file not found"):
        read_matrix(tmp_path / "none.npy")
    with pytest.raises(UserError, match="cannot split 2 layers into k=3"):
        partition(__import__("numpy").eye(2), 3)
    assert issubclass(NonFiniteLossError, RunFailed)


def _raptor(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raptor.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_exit_status_and_stderr_of_a_real_process():
    """Exit 2, one line and no traceback; with --debug or RAPTOR_DEBUG=1 the traceback."""
    bad = ["config", "show", DEMO, "data.batch_size=0"]
    line = "raptor config show: data.batch_size=0 is out of range: expected an integer >= 1\n"
    plain = _raptor(*bad, RAPTOR_DEBUG="")
    assert (plain.returncode, plain.stdout, plain.stderr) == (2, "", line)
    for run in (_raptor("--debug", *bad, RAPTOR_DEBUG=""), _raptor(*bad, RAPTOR_DEBUG="1")):
        assert run.returncode == 2
        assert run.stderr.startswith("Traceback (most recent call last)")
        assert "raptor.config.ConfigError" in run.stderr and run.stderr.endswith(line)
    ok = _raptor("config", "show", DEMO)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["name"] == "demo"
