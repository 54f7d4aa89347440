"""The `qiusuo` command itself (qiusuo/cli.py): a help that starts at once and names what exists, the closest
option for a mistyped one, Ctrl-C as one line. The stages' own behaviour is tested in their areas' folders."""

import subprocess
import sys

import pytest

from qiusuo import cli


def test_help_is_instant_and_names_the_real_run_presets():
    """`qiusuo --help` imports no torch (the package face imports lazily) and lists the `pretrain-*` presets
    under `train`, the names `--config` takes."""
    code = ("import contextlib, io, sys\nfrom qiusuo import cli\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n    cli.main(['--help'])\n"
            "print('torch' in sys.modules)\nprint(out.getvalue())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    imported_torch, text = run.stdout.split("\n", 1)
    assert imported_torch == "False"
    from qiusuo.train.config import preset_names

    presets = cli.run_presets()
    assert presets and set(presets) <= set(preset_names()) and "pretrain-demo" in presets
    text = " ".join(text.split())  # argparse wraps the help lines
    assert all(name in text for name in presets) and "demo, tiny, bench" not in text


@pytest.mark.parametrize("argv, hint", [
    (["generate", "--model", "m", "--promt", "hi"], "--promt: did you mean --prompt?"),  # a required one mistyped
    (["generate", "--model", "m", "--prompt", "hi", "--temprature", "1"], "--temprature: did you mean --temperature?"),
    (["convert", "a", "b", "--max-shard-gib", "1"], "--max-shard-gib: did you mean --max-shard-gb?"),
    (["serve", "--model", "m", "--prot", "8001"], "--prot: did you mean --port?"),
    (["bench", "decode", "--thrads", "2"], "--thrads: did you mean --threads?"),
    (["train", "--optim.lrr=3e-4"], "did you mean --optim.lr?"),  # the run config's own hint still answers
])
def test_an_unknown_option_is_answered_with_the_closest(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert hint in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Every command: a KeyboardInterrupt out of its `main` is one line naming the command, exit code 130.
    (Real SIGINTs: tests/infer/test_commands.py for generate, tests/infer/test_faults.py for serve.)"""
    from qiusuo import inspect_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "main", interrupted)
    try:
        assert cli.main(["inspect", "anything"]) == 130
    except KeyboardInterrupt:  # a failure of this test, not a reason to stop the whole session
        pytest.fail("Ctrl-C escaped `qiusuo inspect`")
    assert capsys.readouterr().err == "\nqiusuo inspect: interrupted\n"
