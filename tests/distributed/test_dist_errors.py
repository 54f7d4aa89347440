"""Bad parallel settings get clear errors before anything starts; a rank that dies or hangs makes the others stop
with a clear error within `parallel.timeout_s` instead of waiting forever."""

import os
import socket
import subprocess
import sys
import time

import pytest

from qiusuo.cli import main as cli_main
from qiusuo.data.prepare import prepare
from qiusuo.train.config import ParallelSection
from qiusuo.train.distributed import Distributed, DistributedError, check_parallel


def test_ep_must_divide_world_and_experts():
    with pytest.raises(DistributedError, match=r"parallel.ep=2 does not divide the world size 3"):
        check_parallel(ParallelSection(dp="ddp", ep=2), 3, 8)
    with pytest.raises(DistributedError, match=r"n_routed_experts=6 is not divisible by parallel.ep=4"):
        check_parallel(ParallelSection(dp="ddp", ep=4), 4, 6)
    with pytest.raises(DistributedError, match=r"no routed experts"):
        check_parallel(ParallelSection(dp="ddp", ep=2), 2, 0)
    with pytest.raises(DistributedError, match=r"parallel.dp='none'"):
        check_parallel(ParallelSection(), 2, 8)
    check_parallel(ParallelSection(dp="fsdp", ep=2), 4, 8)  # fine: 2 expert groups of 2


def test_parallel_without_torchrun(monkeypatch, tmp_path, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DistributedError, match="not launched by torchrun"):
        Distributed.from_env(ParallelSection(dp="ddp"))
    assert cli_main(["train", "--config", "pretrain-tiny", "--parallel.ep=2", "--parallel.dp=ddp",
                     f"--run.out_dir={tmp_path}"]) == 2
    assert "torchrun --nproc_per_node=N -m qiusuo train" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fate", ["dies", "hangs"])
def test_a_lost_rank_stops_the_others_with_a_clear_error(tmp_path, fate):
    """Two processes started the way torchrun starts them (but without its agent, which would kill the others
    itself): rank 1 joins the group, then exits or stops answering; rank 0, training, must fail and say why."""
    prepare(tmp_path / "data", max_bytes=20_000, vocab_size=300, val_fraction=0.1, progress=False)
    port = _free_port()
    procs = []
    for rank in (1, 0):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path), fate], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    lost, survivor = procs
    try:
        start = time.monotonic()
        _, err = survivor.communicate(timeout=240)  # a hang here fails the test instead of blocking it
        waited = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert survivor.returncode == 3, err[-3000:]
    assert "rank 0: a collective failed" in err and "parallel.timeout_s=5" in err, err[-3000:]
    print(f"rank 1 {fate}: rank 0 stopped after {waited:.1f} s")


def _lost_rank_worker(root: str, fate: str) -> None:
    if os.environ["RANK"] == "1":
        Distributed.from_env(ParallelSection(dp="ddp", timeout_s=5))
        if fate == "dies":
            os._exit(1)
        time.sleep(600)  # alive, but never joins another collective
    sys.exit(cli_main(["train", "--config", "pretrain-tiny", f"--data.dir={root}/data", f"--run.out_dir={root}/run",
                       "--run.progress=false", "--run.threads=1", "--parallel.dp=ddp", "--parallel.timeout_s=5",
                       "--data.batch_size=1", "--data.seq_len=16", "--model.max_position_embeddings=32"]))


if __name__ == "__main__":
    _lost_rank_worker(sys.argv[1], sys.argv[2])
