"""The run plots (qiusuo/train/metrics.py `plot_run`): which points each draws, asserted on the data, not on
pixels. (Here rather than in tests/train/, which another change owns at the moment; move it there freely.)"""

import math

from qiusuo.train.metrics import (MetricsLog, moe_layer_titles, plot_run, split_validation, throughput_points,
                                  warmup_hidden)


def demo_like(run_dir, steps=(10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 188)):
    """A time-budgeted run's metrics: logged every 10 steps, evaluated (8 batches) at step 100, stopped at 188
    (a partial last interval) and evaluated on the whole split there; MoE loads for 3 layers of 8 experts."""
    log = MetricsLog(run_dir, tensorboard=False)
    for s in steps:
        tps = 1300.0 if s == 110 else 1500.0 if s == 188 else 2000.0 + s % 30
        log.log("train", s, loss=3.0, ce=4 - math.log(s) / 3, mtp=0.0, lr=1e-2 * (1 - s / 400), grad_norm=1.0,
                tokens_per_s=tps, mfu=0.1, max_vio=[0.5] * 3, load=[[100 + e for e in range(8)]] * 3)
        if s == 100:
            log.log("val", s, loss=2.6, bpb=2.0, tokens=24_576)
    log.log("val", steps[-1], loss=2.3, bpb=1.8, tokens=400_000)
    log.log("sample", steps[-1], prompt="def", text=" f():")
    log.close()


def test_final_whole_split_validation_is_its_own_point():
    periodic = [{"step": 100, "loss": 2.6, "tokens": 24_576}, {"step": 200, "loss": 2.5, "tokens": 24_576}]
    final = {"step": 233, "loss": 2.3, "tokens": 400_000}
    assert split_validation(periodic + [final], 233) == (periodic, final)
    assert split_validation(periodic, 233) == (periodic, None)  # a run cut short: no final evaluation
    # plotted while running, at a periodic evaluation's step: nothing is taken for the final one
    assert split_validation(periodic, 200) == (periodic, None)
    assert split_validation([final], 233) == ([], final)


def test_throughput_leaves_out_evaluation_intervals_and_the_partial_last_one():
    train = [{"step": s, "tokens_per_s": 2000.0} for s in (10, 20, 30, 40)] + [{"step": 45, "tokens_per_s": 900.0}]
    train[2]["tokens_per_s"] = 1200.0  # the interval (20, 30] paid for the evaluation run at step 20
    steady, slowed = throughput_points(train, {20})
    assert steady == [(10, 2000.0), (20, 2000.0), (40, 2000.0)]
    assert slowed == [(30, 1200.0)]
    # every interval full: nothing dropped
    full = [{"step": s, "tokens_per_s": 1.0} for s in (10, 20, 30)]
    assert throughput_points(full, set()) == ([(10, 1.0), (20, 1.0), (30, 1.0)], [])


def test_warmup_too_short_for_the_logged_points_is_said():
    train = [{"step": s} for s in (10, 20, 30)]
    assert warmup_hidden(train, 10)  # one logged point inside the warmup: no slope to see
    assert not warmup_hidden(train, 50) and not warmup_hidden(train, 0)


def test_expert_load_rows_name_their_model_layer():
    conf = {"model": {"preset": "demo"}}  # 4 layers, the first dense
    assert moe_layer_titles(conf, 3) == ["MoE layer 0 (model layer 1)", "MoE layer 1 (model layer 2)",
                                         "MoE layer 2 (model layer 3)"]
    assert moe_layer_titles({"model": {"preset": "tiny", "first_k_dense_replace": 0}}, 2) == [
        "MoE layer 0 (model layer 0)", "MoE layer 1 (model layer 1)"]
    assert moe_layer_titles({}, 2) == ["MoE layer 0", "MoE layer 1"]  # no run.toml: no model to tell
    assert moe_layer_titles({"model": {"preset": "no-such-size"}}, 2) == ["MoE layer 0", "MoE layer 1"]


def test_plot_run_draws_what_the_helpers_select(tmp_path, monkeypatch):
    """The figures carry the selections: the final point apart from the periodic line, the throughput line without
    the evaluation interval and the partial last one, the lr on log-scale steps with the hidden warmup said, a tick
    for every expert."""
    import matplotlib.pyplot as plt

    (tmp_path / "run.toml").write_text('[train]\nlog_every = 10\n[schedule]\nwarmup_steps = 10\n'
                                       '[checkpoint]\nevery = 200\n[model]\npreset = "demo"\n')
    demo_like(tmp_path)
    figures = {}
    real_save = plt.Figure.savefig

    def keep(fig, path, **kw):
        figures[path.name] = fig
        return real_save(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["expert_load.png", "loss.png", "lr.png", "throughput.png"]

    loss = {line.get_label(): list(line.get_xdata()) for line in figures["loss.png"].axes[0].lines}
    assert loss["validation (periodic, part of the split)"] == [100]
    assert [x for label, x in loss.items() if label.startswith("final, whole split")] == [[188]]

    tput = {line.get_label(): list(line.get_xdata()) for line in figures["throughput.png"].axes[0].lines}
    steady = tput["tokens/s per logging interval"]
    assert 110 not in steady and 188 not in steady and steady[-1] == 180
    assert tput["interval with an evaluation, sample or checkpoint"] == [110]

    lr = figures["lr.png"].axes[0]
    assert lr.get_xscale() == "log" and "warmup (10 steps) not shown" in lr.get_title()

    for i, ax in enumerate(figures["expert_load.png"].axes[:3]):  # the heat maps (colour bars, MaxVio axes after)
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(e) for e in range(8)]
        assert ax.get_title().startswith(f"MoE layer {i} (model layer {i + 1})")
