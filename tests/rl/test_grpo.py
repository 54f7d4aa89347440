"""GRPO: the loss against a hand computation, advantages, engine log-probs == training forward log-probs, bad
configs, and a short run that raises the reward."""

import math

import pytest
import torch

import qiusuo
from qiusuo.config import get_config
from qiusuo.model.transformer import Transformer
from qiusuo.rl.grpo import GRPO, group_advantages, grpo_loss
from qiusuo.rl.rollout import pack_rollouts, sample_groups, token_logprobs
from qiusuo.rl.sft import run_sft
from qiusuo.train.config import load_run_config


def _hand_loss(logp, old, ref, adv, mask, eps, beta, norm):
    """The GRPO objective written out token by token in plain Python floats."""
    rows, clipped, kls, n_tok = [], 0, 0.0, 0
    for lp_r, old_r, ref_r, m_r, a in zip(logp, old, ref, mask, adv):
        terms = []
        for lp, o, rf, m in zip(lp_r, old_r, ref_r, m_r):
            if not m:
                continue
            ratio = math.exp(lp - o)
            clip = min(max(ratio, 1 - eps), 1 + eps)
            kl = math.exp(rf - lp) - (rf - lp) - 1
            terms.append(-min(ratio * a, clip * a) + beta * kl)
            clipped += (ratio > 1 + eps and a > 0) or (ratio < 1 - eps and a < 0)
            kls += kl
            n_tok += 1
        rows.append(terms)
    if norm == "token":
        loss = sum(sum(t) for t in rows) / n_tok
    else:
        loss = sum(sum(t) / len(t) for t in rows) / len(rows)
    return loss, clipped, kls / n_tok


RUN_KEYS = {"steps": "train.steps", "lr": "optim.lr", "threads": "run.threads", "seed": "run.seed"}


def grpo_config(**kw):
    """The `grpo` run preset with GRPO settings by their short names (`group_size=4` is `grpo.group_size`)."""
    over = {RUN_KEYS.get(k, f"grpo.{k}"): v for k, v in kw.items()}
    return load_run_config("grpo", {"run.progress": False, **over})

@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_grpo_loss_matches_hand_computation(norm):
    logp = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -9.0]]
    old = [[-1.2, -0.5, -1.0], [-0.3, -0.9, 0.0]]  # ratios e^0.2 (clipped, A>0), 1, e^-1 (A>0: not clipped);
    ref = [[-1.1, -0.4, -2.5], [-0.2, -1.0, 0.0]]  # 1, e^-0.3 (clipped, A<0), padding
    mask = [[1, 1, 1], [1, 1, 0]]
    adv = [1.5, -0.5]
    want, clipped, kl = _hand_loss(logp, old, ref, adv, mask, 0.2, 0.1, norm)
    assert clipped == 2
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, stats = grpo_loss(t(logp), t(old), t(ref), t(adv), t(mask), 0.2, 0.1, norm)
    assert abs(float(loss) - want) < 1e-12
    assert stats["clipped_sum"] == 2 and stats["tokens"] == 5 and abs(stats["kl_sum"] / 5 - kl) < 1e-12
    # a worked figure for the token case, by hand: pg = -(1.2*1.5 + 1*1.5 + e^-1*1.5 - 1*0.5 - 0.8*0.5) / 5
    if norm == "token":
        pg = -(1.2 * 1.5 + 1.5 + math.exp(-1) * 1.5 + 1.0 * -0.5 + 0.8 * -0.5) / 5
        kl_terms = [math.exp(d) - d - 1 for d in (-0.1, 0.1, -0.5, 0.1, 0.2)]
        assert abs(float(loss) - (pg + 0.1 * sum(kl_terms) / 5)) < 1e-12


def test_grpo_gradient_is_advantage_over_tokens_and_zero_where_clipped():
    logp = torch.tensor([[-1.0, -0.5], [-0.3, -1.2]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -0.5], [-0.3, -0.9]], dtype=torch.float64)  # token (0,0): ratio e^0.5, clipped
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.float64)
    loss, _ = grpo_loss(logp, old, None, adv, mask, 0.2, 0.0, "token")
    loss.backward()
    ratio = torch.exp(logp.detach() - old)
    want = -adv[:, None] * ratio / 4
    want[0, 0] = 0.0  # clipped: no gradient
    want[1, 1] = 0.0  # ratio e^-0.3 < 0.8 with A < 0: clipped too
    assert torch.allclose(logp.grad, want)


def test_denominator_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.1 - 1 for _ in range(3))
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    for norm, denom in (("token", float(mask.sum())), ("sequence", 6.0)):
        whole, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.05, norm)
        parts = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], 0.2, 0.05, norm, denom)[0]
                    for s in (slice(0, 2), slice(2, 6)))
        assert abs(float(whole - parts)) < 1e-12
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        grpo_loss(logp, old, ref, adv, mask, 0.2, 0.0, "batch")


def test_group_advantages_and_group_size_one():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    a = group_advantages(r, eps=1e-4)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal
    assert torch.allclose(a[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (math.sqrt(2 / 3) + 1e-4))
    with pytest.raises(ValueError, match="at least 2 completions"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="--group-size 1"):
        grpo_config(model="m", group_size=1)


def test_cli_rejects_group_size_one(tmp_path, capsys):
    from qiusuo.cli import main

    assert main(["grpo", "--model", str(tmp_path), "--group-size", "1"]) == 2
    assert "at least 2 completions per prompt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """The tiny preset briefly SFT'd on 1-digit addition: it follows the R1 format about half the time when
    sampling and is rarely right, so rewards have spread."""
    out = tmp_path_factory.mktemp("sft")
    s = run_sft(load_run_config("sft", {"sft.data": "task:arithmetic", "model.preset": "tiny", "run.out_dir": str(out),
                                        "sft.examples": 800, "train.steps": 80, "data.batch_size": 16,
                                        "data.seq_len": 64, "run.threads": 1, "run.progress": False, "run.seed": 0}))
    return s["model"]


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_sampled_logprobs_equal_training_forward(sft_model, draft_tokens):
    """The rollouts' logprobs (plain, and with MTP speculative decoding: accepted drafts and bonus tokens) are the
    training forward's."""
    model = qiusuo.load_model(sft_model, progress=False)
    assert model.cfg.num_nextn_predict_layers == 1
    tok = qiusuo.load_tokenizer(sft_model)
    g = GRPO(grpo_config(model=sft_model, task="arithmetic", prompts_per_step=4, group_size=6, max_tokens=20, beta=0.0,
                        threads=1), model, tok)
    prompts = g.prompt_ids(g.problems[:4])
    groups, stats = sample_groups(model, tok, prompts, 6, 1.0, 20, seed=3, draft_tokens=draft_tokens)
    assert stats["cached_prompt_tokens"] > 0  # the G copies share the prompt's blocks
    rollouts = [r for grp in groups for r in grp]
    assert len(rollouts) == 24 and len({tuple(r.completion_ids) for r in rollouts}) > 1
    end = tok.token_to_id("<|end|>")
    ids, mask = pack_rollouts(rollouts, tok.pad_id)
    with torch.no_grad():
        lp = token_logprobs(model, ids)  # (B, T-1), expanded attention, one pass
    worst = 0.0
    for b, r in enumerate(rollouts):
        P, n = len(r.prompt_ids), len(r.logprobs)
        assert r.completion_ids[-1] == end if r.finish_reason == "stop" else len(r.completion_ids) == 20
        assert n == len(r.completion_ids) - (r.finish_reason == "stop")
        assert tok.decode(r.completion_ids[:n]) == r.text
        assert int(mask[b].sum()) == len(r.completion_ids)
        worst = max(worst, (lp[b, P - 1:P - 1 + n] - torch.tensor(r.logprobs)).abs().max().item())
    print(f"max |engine logprob - training forward logprob| = {worst:.2e} (fp32)")
    assert worst <= 1e-5


def test_short_grpo_run_raises_mean_reward(sft_model):
    torch.manual_seed(0)
    model = qiusuo.load_model(sft_model, progress=False)
    tok = qiusuo.load_tokenizer(sft_model)
    cfg = grpo_config(model=sft_model, task="arithmetic", steps=20, prompts_per_step=8, group_size=8, max_tokens=24,
                     lr=1e-3, beta=0.0, rewards=["accuracy", "format"], threads=1)
    g = GRPO(cfg, model, tok)
    probe = g.task.problems("train", 32, seed=123)

    def mean_reward() -> float:  # the same prompts and sampling seeds before and after
        from qiusuo.rl.rewards import score

        groups, _ = sample_groups(model, tok, g.prompt_ids(probe), 8, cfg.grpo.temperature, cfg.grpo.max_tokens, seed=999)
        texts = [r.text for grp in groups for r in grp]
        return sum(score(g.rewards, texts, [p for p in probe for _ in range(8)])[0]) / len(texts)

    before = mean_reward()
    recs = [g.step() for _ in range(cfg.train.steps)]
    after = mean_reward()
    print(f"mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.15
    assert all(r["clip_fraction"] == 0.0 for r in recs)  # mu = 1: the ratio is exactly 1
    assert all(0 <= r["zero_spread"] <= 1 and r["response_length"] > 0 for r in recs)


def test_mu_updates_kl_and_a_failing_user_reward(sft_model, tmp_path, capsys):
    f = tmp_path / "bad_reward.py"
    f.write_text("def picky(completions, problems):\n    raise RuntimeError('cannot score this')\n")
    model = qiusuo.load_model(sft_model, progress=False)
    tok = qiusuo.load_tokenizer(sft_model)
    cfg = grpo_config(model=sft_model, task="arithmetic", steps=3, prompts_per_step=3, group_size=4, max_tokens=16,
                     lr=1e-3, beta=0.1, mu=3, loss_norm="sequence", micro_batch=5,
                     rewards=["accuracy", "format", f"{f}:picky"], threads=1)
    g = GRPO(cfg, model, tok)
    recs = [g.step() for _ in range(cfg.train.steps)]
    assert all(r["failed/picky"] == 1 and r["reward/picky"] == 0.0 for r in recs)  # the run went on
    assert "reward function 'picky' failed at step 1: RuntimeError: cannot score this" in capsys.readouterr().err
    assert recs[0]["kl"] >= 0 and recs[-1]["kl"] > 0  # the policy has moved away from the frozen reference
    assert any(r["clip_fraction"] > 0 for r in recs if not r["skipped"])  # mu = 3 with lr 1e-3 leaves the trust region
    ref_w = dict(g.ref.named_parameters())
    assert any(not torch.equal(p, ref_w[n]) for n, p in model.named_parameters())
    # mu = 3 policy updates per batch: Adam has stepped 3 times per step (no step is skipped with beta > 0)
    state = g.opt.state[next(model.parameters())]
    assert int(state["step"]) == cfg.grpo.mu * cfg.train.steps and not any(r["skipped"] for r in recs)
    assert all(r["ref_s"] > 0 for r in recs)  # the reference and old-policy passes are timed on their own


def test_zero_spread_groups_are_counted_and_an_all_flat_batch_is_skipped(sft_model, tmp_path):
    """A reward that cannot tell completions apart gives every group zero spread: the fraction is 1, and without a
    KL term the step is skipped (no Adam step, weights unchanged). A reward flat on even answers only leaves at
    least those groups flat."""
    f = tmp_path / "flat_rewards.py"
    f.write_text("def flat(completions, problems):\n    return [0.5 for _ in completions]\n"
                 "def odd_only(completions, problems):\n"
                 "    return [float(int(p.answer) % 2 == 1 and len(c) % 2 == 0) for c, p in zip(completions, problems)]\n")
    model = qiusuo.load_model(sft_model, progress=False)
    tok = qiusuo.load_tokenizer(sft_model)
    g = GRPO(grpo_config(model=sft_model, task="arithmetic", steps=2, prompts_per_step=4, group_size=4, max_tokens=16,
                        beta=0.0, rewards=[f"{f}:flat"], threads=1), model, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = g.step()
    assert rec["zero_spread"] == 1.0 and rec["skipped"] == 1 and rec["reward"] == 0.5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and not g.opt.state
    assert rec["rollout_s"] > 0 and rec["ref_s"] >= 0 and rec["train_s"] >= 0 and rec["rollout_tokens_per_s"] > 0

    g = GRPO(grpo_config(model=sft_model, task="arithmetic", steps=3, prompts_per_step=8, group_size=4, max_tokens=16,
                        beta=0.0, rewards=[f"{f}:odd_only"], threads=1), model, tok)
    for _ in range(3):
        batch = g.problems[g.step_no * 8:(g.step_no + 1) * 8]
        even_share = sum(int(p.answer) % 2 == 0 for p in batch) / 8
        rec = g.step()
        assert even_share <= rec["zero_spread"] <= 1.0


def test_v4_rollouts_through_the_engine_match_the_training_forward(sft_model):
    """GRPO's rollouts on a DeepSeek-V4 model: the engine's sampled log-probabilities equal the training forward's
    (the paged V4 caches against the full forward), G samples per prompt, each with its own window state."""
    tok = qiusuo.load_tokenizer(sft_model)
    torch.manual_seed(0)
    model = Transformer(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0)).eval()
    prompts = [tok.encode(p) for p in ("1+2=", "3+4=", "5+6=")]
    groups, _ = sample_groups(model, tok, prompts, 4, 1.0, 24, seed=3)
    rollouts = [r for grp in groups for r in grp]
    assert len(rollouts) == 12  # (prompts shorter than a block: nothing to share)
    ids, _ = pack_rollouts(rollouts, tok.pad_id)
    with torch.no_grad():
        lp = token_logprobs(model, ids)
    worst = max((lp[b, len(r.prompt_ids) - 1: len(r.prompt_ids) - 1 + len(r.logprobs)]
                 - torch.tensor(r.logprobs)).abs().max().item() for b, r in enumerate(rollouts))
    assert worst <= 1e-4
