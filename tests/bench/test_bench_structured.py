"""`qiusuo bench structured` runs end to end on the tiny preset and reports what it claims (no timing is asserted: the
figures are printed by the command and written in docs/structured_output.md)."""

import argparse

import pytest
import torch

from qiusuo.bench import structured


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_structured_bench_reports_mask_share_per_batch(capsys):
    p = argparse.ArgumentParser()
    structured.add_args(p)
    out = structured.run(p.parse_args(["--preset", "tiny", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens",
                                       "4", "--repeats", "1", "--threads", "1", "--libraries"]))
    assert set(out) == {f"b{b}_{k}" for b in (1, 2) for k in ("free_ms", "in_place_ms", "overlapped_ms", "mask_share")}
    assert all(v > 0 for v in out.values())
    text = capsys.readouterr().out
    assert "% of the step" in text and "llguidance: " in text and "not: refused" in text
