"""The batched sampler: per-request settings, top-p, kept codes, joining and leaving mid-run, on tiny real priors."""
from __future__ import annotations

import pytest
import torch

from brainvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.sampling import BatchSampler, pick, sample, sample_codes

# float32 and wide enough that every matrix product is a real one: the batch must not change a row's arithmetic
WIDE = dict(num_codes=32, grid_size=12, channels=16, embed_dim=16, num_layers=6, max_dilation=32, pos_dim=4,
            head_channels=32)


def prior(seed: int = 0, dtype=torch.float32, **overrides) -> GatedPixelCNN:
    """A prior with large random weights, so that logits are spread and every connection carries signal."""
    torch.manual_seed(seed)
    model = GatedPixelCNN(PixelCNNConfig(**{**WIDE, **overrides})).to(dtype)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.4)
    return model.eval()


def filled(sampler: BatchSampler, request) -> int:
    return sampler.progress(request).filled


def run(sampler: BatchSampler, until=lambda: False) -> int:
    steps = 0
    while sampler.busy and not until():
        sampler.step()
        steps += 1
    return steps


# ----------------------------------------------------------------------------- pick


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    uniforms = torch.linspace(0, 0.9999, 200)

    def choices(**kwargs):
        return {int(pick(logits, torch.tensor([u]), 1.0, **kwargs)) for u in uniforms}

    assert choices(top_p=0.1) == {0}
    assert choices(top_p=0.7) == {0, 1}          # 0.5 < 0.7 <= 0.5 + 0.3
    assert choices(top_p=0.85) == {0, 1, 2}
    assert choices(top_p=1.0) == choices() == {0, 1, 2, 3}
    assert choices(top_p=0.9, top_k=2) == {0, 1}  # top-k first, then top-p on what is left
    # renormalised over the nucleus: with p = 0.7, code 1 takes 0.3 / 0.8 of the draws
    draws = pick(logits.expand(4000, 4), torch.rand(4000, generator=torch.Generator().manual_seed(0)), 1.0,
                 top_p=0.7)
    assert abs(float((draws == 1).float().mean()) - 0.375) < 0.03


def test_pick_with_settings_per_row_matches_each_row_alone():
    torch.manual_seed(0)
    logits, uniforms = torch.randn(6, 50) * 3, torch.rand(6)
    settings = [(1.0, None, None), (0.5, 5, None), (1.3, None, 0.6), (0.0, None, None), (0.8, 10, 0.9),
                (1.0, 50, 1.0)]
    batched = pick(logits, uniforms, torch.tensor([s[0] for s in settings], dtype=torch.float64),
                   torch.tensor([s[1] or 0 for s in settings]), torch.tensor([s[2] or 1.0 for s in settings]))
    alone = [int(pick(logits[i:i + 1], uniforms[i:i + 1], *settings[i])) for i in range(6)]
    assert batched.tolist() == alone
    assert alone[3] == int(logits[3].argmax())


def test_bad_settings_are_refused():
    model = prior()
    for kwargs in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"n": 0},
                   {"method": "magic"}, {"known": torch.zeros(3, 3, dtype=torch.long)},
                   {"known": torch.full((12, 12), 32)}, {"known": torch.full((12, 12), -2)},
                   {"known": torch.zeros(12, 12)}, {"n": 2, "known": torch.zeros(3, 12, 12, dtype=torch.long)}):
        with pytest.raises(ValueError):
            next(sample(model, **kwargs))


# ----------------------------------------------------------------------------- one batch for many requests


def test_each_request_gets_the_codes_it_would_get_alone():
    """Requests with their own n, temperature, top-k, top-p and seed; one joins mid-run, one is cancelled
    mid-row: everyone else's codes, and every logit they were drawn from, equal a run alone."""
    model = prior()
    settings = {"a": dict(n=2, seed=1), "b": dict(n=1, temperature=0.7, top_k=5, seed=2),
                "c": dict(n=3, temperature=1.2, top_p=0.8, seed=3), "d": dict(n=1, temperature=0.0, seed=4),
                "late": dict(n=2, temperature=0.9, top_k=8, top_p=0.9, seed=5), "gone": dict(n=2, seed=6)}

    def record(sampler: BatchSampler, log: dict) -> None:
        """Keep each request's rows of every logits matrix the sampler computes."""
        compute = sampler._net.logits

        def logits(requests, row_codes, j):
            out, start = compute(requests, row_codes, j), 0
            for r in requests:
                log.setdefault(r.seed, []).append(out[start:start + r.n].clone())
                start += r.n
            return out

        sampler._net.logits = logits

    alone_logits: dict = {}
    alone = {}
    for name, kwargs in settings.items():
        sampler = BatchSampler(model)
        record(sampler, alone_logits)
        request = sampler.add(**kwargs)
        run(sampler)
        alone[name] = request.codes

    shared_logits: dict = {}
    sampler = BatchSampler(model)
    record(sampler, shared_logits)
    requests = {name: sampler.add(**settings[name]) for name in ("a", "b", "c", "d", "gone")}
    run(sampler, until=lambda: filled(sampler, requests["a"]) == 30)    # mid-row (12 columns)
    requests["late"] = sampler.add(**settings["late"])
    run(sampler, until=lambda: filled(sampler, requests["a"]) == 41)
    assert filled(sampler, requests["late"]) == 5                       # it joined at the next row start (36)
    sampler.cancel(requests["gone"])
    run(sampler, until=lambda: filled(sampler, requests["a"]) == 42)
    stopped_at = filled(sampler, requests["gone"])
    run(sampler)
    assert stopped_at == 41 and requests["gone"].filled == 41 and not requests["gone"].done
    assert (requests["gone"].codes[:, :3] >= 0).all() and (requests["gone"].codes[:, 3, 5:] == -1).all()
    for name in ("a", "b", "c", "d", "late"):
        assert requests[name].done and torch.equal(requests[name].codes, alone[name]), name
        seed = settings[name]["seed"]
        assert len(shared_logits[seed]) == len(alone_logits[seed]) == 144
        assert all(torch.equal(x, y) for x, y in zip(shared_logits[seed], alone_logits[seed])), name
    assert (alone["a"] >= 0).all()


def test_an_idle_sampler_starts_a_request_at_once_and_requests_leave_when_done():
    model = prior(grid_size=6)
    sampler = BatchSampler(model)
    first = sampler.add(n=1, seed=0)
    run(sampler, until=lambda: filled(sampler, first) == 3)
    second = sampler.add(n=1, seed=1)
    sampler.cancel(first)                       # nobody is left mid-row: the newcomer need not wait
    sampler.step()
    assert filled(sampler, second) == 1 and first.filled == 3
    run(sampler)
    assert second.done and not sampler.busy and sampler.active == []
    assert torch.equal(second.codes, sample_codes(model, seed=1))


# ----------------------------------------------------------------------------- kept codes (completion)


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_kept_codes_are_advanced_through_as_if_sampled(method):
    """Keeping codes that a free run sampled, with the same seed, reproduces that run everywhere: the kept
    positions feed the net exactly like sampled ones, and the free positions use the same random numbers."""
    model = prior(dtype=torch.float64)
    free_run = sample_codes(model, n=2, seed=7, method=method)
    known = torch.full_like(free_run, -1)
    known[:, :5] = free_run[:, :5]                  # whole rows
    known[0, 7, 3:9] = free_run[0, 7, 3:9]          # part of a row, in one grid only
    known[1, 10:, 11] = free_run[1, 10:, 11]        # a column
    frames = list(sample(model, n=2, seed=7, method=method, known=known))
    assert torch.equal(frames[-1].codes, free_run)
    assert all(torch.equal(f.codes[known >= 0], known[known >= 0]) for f in frames)  # shown from the start


def test_kept_codes_stay_and_fast_equals_naive():
    model = prior(dtype=torch.float64)
    known = torch.full((12, 12), -1)
    known[:4] = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    known[6:8, 2:10] = 5
    fast = sample_codes(model, n=3, temperature=0.9, top_p=0.95, seed=2, known=known)
    naive = sample_codes(model, n=3, temperature=0.9, top_p=0.95, seed=2, known=known, method="naive")
    assert torch.equal(fast, naive)
    assert (fast[:, known >= 0] == known[known >= 0]).all() and (fast >= 0).all()
    everything = torch.randint(0, 32, (12, 12))
    assert torch.equal(sample_codes(model, known=everything)[0], everything)


def test_rows_that_are_all_kept_cost_no_logits():
    model = prior()
    known = torch.full((12, 12), -1)
    known[:10] = 3
    sampler = BatchSampler(model)
    calls = []
    compute = sampler._net.logits
    sampler._net.logits = lambda requests, row_codes, j: calls.append(j) or compute(requests, row_codes, j)
    sampler.add(n=2, seed=0, known=known)
    run(sampler)
    assert len(calls) == 2 * 12


# ----------------------------------------------------------------------------- any configuration


def fast_logits(model: GatedPixelCNN, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of one fast run and the logits it drew each position from, as (n,K,H,W)."""
    sampler, rows = BatchSampler(model), []
    compute = sampler._net.logits
    sampler._net.logits = lambda *args: rows.append(compute(*args)[:args[0][0].n]) or rows[-1]
    request = sampler.add(**kwargs)
    run(sampler)
    size = model.cfg.grid_size
    return request.codes, torch.stack(rows, -1).view(request.n, -1, size, size)


@pytest.mark.parametrize("overrides", [dict(grid_size=8, max_dilation=32), dict(grid_size=36, max_dilation=32,
                                                                               num_layers=7, channels=8),
                                       dict(pos_dim=0, first_kernel=5, max_dilation=1)])
def test_fast_sampler_computes_the_full_network_for_any_configuration(overrides):
    """Dilations up to 32 (wider than an 8x8 grid; reaching 32 rows up in a 36x36 one), no positional map,
    another first kernel: every logit of a fast run equals the full network's on the finished grid (it is
    causal), and on small grids the naive sampler gives the same codes."""
    model = prior(dtype=torch.float64, **overrides)
    codes, logits = fast_logits(model, n=2, seed=3)
    assert torch.allclose(logits, model(codes), rtol=0, atol=1e-9)
    if model.cfg.grid_size <= 12:
        assert torch.equal(codes, sample_codes(model, n=2, seed=3, method="naive"))
