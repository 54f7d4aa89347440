"""A newcomer's first hour: nothing is overwritten without being asked, `--resume DIR` continues in DIR from any
working directory, Ctrl-C stops at a step and resumes bit for bit, threads come from what is free now, and
"train longer" decays from where the run stopped."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qiusuo.cli import main as cli_main
from qiusuo.data.prepare import prepare
from qiusuo.runtime import cpu_threads, free_cores
from qiusuo.train import checkpoint as ckpt
from qiusuo.train.metrics import read

TINY = ["--config", "pretrain-tiny", "--run.progress=false", "--run.threads=1", "--data.batch_size=4",
        "--data.seq_len=32", "--train.log_every=1", "--schedule.warmup_steps=2", "--eval.every=0",
        "--eval.batches=2", "--eval.sample_tokens=4", "--model.max_position_embeddings=64"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_data")
    prepare(out, max_bytes=100_000, vocab_size=512, val_fraction=0.03, progress=False)
    return out


def train(*args) -> int:
    return cli_main(["train", *TINY, *args])


def resume(path, *args) -> int:
    """`qiusuo train --resume PATH ...`: the run's own run.toml, no --config."""
    return cli_main(["train", "--resume", str(path), "--run.progress=false", *args])


def weights(run: Path) -> dict:
    return load_file(ckpt.complete_checkpoints(run)[-1] / "model.safetensors")


def test_a_second_run_into_a_run_folder_is_refused_unless_overwrite(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(f"--data.dir={data_dir}", f"--run.out_dir={run}", "--train.steps=3") == 0
    before = (run / "metrics.jsonl").read_text()
    assert train(f"--data.dir={data_dir}", f"--run.out_dir={run}", "--train.steps=2") == 2
    err = capsys.readouterr().err
    assert "already holds a run (last logged step 3)" in err and f"--resume {run}" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before  # untouched
    assert train(f"--data.dir={data_dir}", f"--run.out_dir={run}", "--train.steps=2", "--overwrite") == 0
    assert [r["step"] for r in read(run) if r["kind"] == "train"] == [1, 2]  # the new run alone
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000002"]


def test_resume_writes_into_the_resumed_folder_from_any_working_directory(data_dir, tmp_path, monkeypatch):
    """The run was made with relative paths from folder A; a copy of it is resumed from folder C: the copy gets the
    new steps, the original is untouched, and the data is found (its recorded path is absolute)."""
    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir()
    c.mkdir()
    shutil.copytree(data_dir, a / "data")
    monkeypatch.chdir(a)
    assert train("--data.dir=data", "--run.out_dir=runs/x", "--train.steps=4", "--checkpoint.every=2") == 0
    original = {p: p.read_bytes() for p in (a / "runs/x").rglob("*") if p.is_file()}
    shutil.copytree(a / "runs/x", tmp_path / "copy")
    monkeypatch.chdir(c)
    assert resume(tmp_path / "copy", "--train.extra_steps=2") == 0
    assert {p: p.read_bytes() for p in (a / "runs/x").rglob("*") if p.is_file()} == original
    assert ckpt.complete_checkpoints(tmp_path / "copy")[-1].name == "step_000006"
    assert not (c / "runs").exists()
    assert [r["step"] for r in read(tmp_path / "copy") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_pruning_keeps_the_newest_checkpoint_of_a_run_resumed_from_an_earlier_one(data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(f"--data.dir={data_dir}", f"--run.out_dir={run}", "--train.steps=6", "--checkpoint.every=2",
                 "--checkpoint.keep=2") == 0
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000004", "step_000006"]
    # continue from step 4 (not the latest) to a budget of 5 steps: its checkpoint (step 5) is written after step
    # 6's, so it is kept (step order would have pruned it at once) and is what a later --resume picks
    assert resume(run / "checkpoints/step_000004", "--train.steps=5") == 0
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000006", "step_000005"]
    assert ckpt.resolve(run).name == "step_000005"


def test_ctrl_c_at_a_random_step_then_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    """SIGINT to `qiusuo train` in a subprocess at a random step: one line, exit code 130, no traceback; resumed,
    the final weights equal an uninterrupted run's bit for bit."""
    common = [*TINY, f"--data.dir={data_dir}", "--train.steps=14"]
    assert cli_main(["train", *common, f"--run.out_dir={tmp_path / 'full'}"]) == 0
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "train", *common, f"--run.out_dir={cut}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    at = random.Random().randint(2, 9)
    deadline = time.time() + 120
    while time.time() < deadline:  # the run is in its loop once it logs steps
        log = cut / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= at:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qiusuo train:")]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and f"--resume {cut}" in lines[0]
    stopped = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert at <= stopped < 14
    assert resume(cut) == 0
    a, b = weights(tmp_path / "full"), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_resumed_says_so_and_train_longer_decays_from_where_it_stopped(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(f"--data.dir={data_dir}", f"--run.out_dir={run}", "--train.steps=8") == 0
    capsys.readouterr()
    assert resume(run) == 0
    err = capsys.readouterr().err
    assert "already finished (8 of 8 steps)" in err and "--train.extra_steps=N" in err
    assert len(ckpt.complete_checkpoints(run)) == 1  # nothing trained, nothing written
    lr_before = [r["lr"] for r in read(run) if r["kind"] == "train"]
    assert resume(run, "--train.extra_steps=6") == 0
    lr = [r["lr"] for r in read(run) if r["kind"] == "train"]
    tail = lr[8:]
    assert lr[:8] == lr_before and len(tail) == 6
    # the 9th step starts at the rate the schedule had reached (the cosine's floor, 0.1 of the peak: no jump back
    # up), and it only decays from there, linearly toward min_lr_ratio (0.1) of it
    assert tail[0] == pytest.approx(0.1 * max(lr_before)) and tail[0] <= lr_before[-1]
    assert all(x > y for x, y in zip(tail, tail[1:]))
    assert tail[-1] == pytest.approx(tail[0] * (1 - 0.9 * 5 / 6))
    assert resume(run, "--train.extra_minutes=1") == 2  # a step budget gets extra steps
    assert "budgeted in steps" in capsys.readouterr().err


def test_threads_come_from_the_cores_free_now_not_the_load_average(monkeypatch):
    """A busy sibling that has just exited still holds up the 1-minute load average (3.0 here, which chose 1
    thread before); the thread count follows what the cores did in the last 0.2 s: 2 of 2 once the sibling is
    gone (counters of idle CPUs), 1 while one CPU is busy. And a real spinning sibling leaves at most one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 2.0, 1.0), raising=False)

    def counters(busy_cpus):  # two samples 100 ticks apart: busy CPUs spent them in user time, idle ones idle
        ticks = iter([{c: [0, 0, 0, 0, 0, 0, 0] for c in (0, 1)},
                      {c: [100, 0, 0, 0, 0, 0, 0] if c in busy_cpus else [0, 0, 0, 100, 0, 0, 0] for c in (0, 1)}])
        return lambda: next(ticks)

    assert free_cores(0.0, counters(set()))[:2] == (2, 2)
    assert free_cores(0.0, counters({1}))[:2] == (2, 1)
    assert free_cores(0.0, counters({0, 1}))[:2] == (2, 1)  # at least one
    niced = iter([{c: [0] * 7 for c in (0, 1)}, {0: [0, 100, 0, 0, 0, 0, 0], 1: [0, 0, 0, 100, 0, 0, 0]}] * 2)
    monkeypatch.setattr(os, "nice", lambda inc: 0)
    assert free_cores(0.0, lambda: next(niced))[:2] == (2, 2)  # a niced neighbour gives way to us: both cores
    monkeypatch.setattr(os, "nice", lambda inc: 5)
    assert free_cores(0.0, lambda: next(niced))[:2] == (2, 1)  # unless we are niced too
    monkeypatch.setattr("qiusuo.runtime.proc_stat", counters(set()))
    assert cpu_threads(0)[0] == 2  # what `cpu_threads` chooses from (the default sample): the idle cores
    assert cpu_threads(3) == (3, "3 threads (--threads 3)")
    monkeypatch.undo()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert free_cores()[1] <= max(1, len(os.sched_getaffinity(0)) - 1)
    finally:
        busy.kill()
        busy.wait()
