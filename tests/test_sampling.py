"""sampling.py against transformers' own logits processors, row by row, on language-model-shaped scores: the
top-p shortcut (decided from the most likely tokens) must keep exactly the tokens TopPLogitsWarper keeps. On the
test device (benchmarks/gpu_check.sh runs these on cuda, where float32 sums accumulate in another order)."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runner import sampling
from runner.params import GenerationParams
from runner.sampling import RowSettings, process

VOCAB = 49_152  # SmolLM2's


def lm_like_scores(rows: int, seed: int, half: bool = False) -> torch.Tensor:
    """Zipf-shaped next-token scores, from sharply peaked (one token holds ~all the mass) to flat (the cut of
    top-p 0.95 lies thousands of tokens deep), in random vocabulary order. `half`: rounded through bfloat16,
    so that equal scores (ties) are common, as they are in a half-precision model's logits."""
    g = torch.Generator().manual_seed(seed)
    log_rank = torch.arange(1, VOCAB + 1, dtype=torch.float32).log()
    out = []
    for r in range(rows):
        steep = 0.6 + 3.0 * r / max(rows - 1, 1)
        x = 20.0 - steep * log_rank + 0.3 * torch.randn(VOCAB, generator=g)
        out.append(x[torch.randperm(VOCAB, generator=g)])
    scores = torch.stack(out)
    return scores.bfloat16().float() if half else scores


def transformers_scores(scores: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    warpers = LogitsProcessorList()
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    return warpers(None, scores.clone())


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.99])
def test_top_p_keeps_what_transformers_keeps(top_p, half, test_device):
    scores = lm_like_scores(48, seed=int(top_p * 100), half=half).to(test_device)
    params = [GenerationParams(max_new_tokens=4, do_sample=True, top_p=top_p)] * len(scores)
    s = RowSettings.of(params, test_device)
    ours = process(scores, None, None, s)
    expected_scores = transformers_scores(scores, GenerationParams(max_new_tokens=4, top_p=top_p))
    for row, expected in zip(ours, expected_scores, strict=True):
        assert torch.equal(torch.isinf(row), torch.isinf(expected))
        assert torch.equal(row[~torch.isinf(row)], expected[~torch.isinf(expected)])
    # both ways were taken: rows decided from the candidates, and rows that needed the full sort
    _, clear, _ = sampling._top_p_candidates(scores, s.top_p, sampling.TOP_P_CANDIDATES[0])
    assert 0 < int(clear.sum()) < len(scores)


def test_mixed_rows_match_their_own_processors(test_device):
    """Each row with its own temperature / top-k / top-p (greedy and 'off' rows left bit for bit alone)."""
    scores = lm_like_scores(8, seed=7).to(test_device)
    params = [
        GenerationParams(max_new_tokens=4, do_sample=True, temperature=0.8, top_p=0.95),
        GenerationParams(max_new_tokens=4, do_sample=True, temperature=1.3, top_p=0.9, top_k=40),
        GenerationParams(max_new_tokens=4, do_sample=True, top_k=5),
        GenerationParams(max_new_tokens=4, do_sample=True),
        GenerationParams(max_new_tokens=4),
        GenerationParams(max_new_tokens=4, do_sample=True, temperature=0.5, top_p=0.5),
        GenerationParams(max_new_tokens=4, do_sample=True, top_p=0.999),
        GenerationParams(max_new_tokens=4, do_sample=True, temperature=2.0, top_p=0.95),
    ]
    ours = process(scores, None, None, RowSettings.of(params, test_device))
    for i, p in enumerate(params):
        expected = transformers_scores(
            scores[i : i + 1], p if p.do_sample else GenerationParams(max_new_tokens=4)
        )
        assert torch.equal(torch.isinf(ours[i : i + 1]), torch.isinf(expected)), f"row {i}: {p}"
        # On CUDA, torch divides by a Python scalar (transformers' temperature) as a product with its
        # reciprocal, and by a tensor (each row's own) as a true division: an ulp apart. Seen on an H200
        # (gpu_check.sh, 2026-12-04). Everywhere else, and for rows with no temperature, bit for bit.
        ulp = 3e-7 if scores.device.type != "cpu" and p.do_sample and p.temperature != 1.0 else 0.0
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=ulp, atol=0, msg=f"row {i}: {p}")


@pytest.mark.parametrize("scale", [1e3, 3e4])
def test_top_p_on_large_scores(scale, test_device):
    """Scores in the thousands (a low temperature on large logits): candidates' probabilities are normalised
    from the largest score, as softmax does, so float32 rounding cannot move the cut."""
    scores = torch.stack([-scale - s * torch.arange(1, VOCAB + 1.0).log() for s in (0.5, 1.0, 4.0)])
    two = torch.full((1, VOCAB), -1e9)
    two[0, :2] = torch.tensor([260.8, 259.5])  # logits 26.08 / 25.95 at temperature 0.1
    scores = torch.cat([scores, two]).to(test_device)
    for p in (0.5, 0.785833, 0.999999):
        s = RowSettings.of(
            [GenerationParams(max_new_tokens=4, do_sample=True, top_p=p)] * len(scores), test_device
        )
        expected = transformers_scores(scores, GenerationParams(max_new_tokens=4, top_p=p))
        assert torch.equal(torch.isinf(process(scores, None, None, s)), torch.isinf(expected)), p


def test_a_nan_row_does_not_break_the_others(test_device):
    """A row with NaN (a broken model output) goes to the full sort as transformers would, without an error;
    the engine then reports it (NumericalError) and the other rows keep their own result."""
    scores = lm_like_scores(3, seed=1).to(test_device)
    scores[1, 7] = float("nan")
    s = RowSettings.of([GenerationParams(max_new_tokens=4, do_sample=True, top_p=0.9)] * 3, test_device)
    ours = process(scores, None, None, s)
    expected = transformers_scores(scores, GenerationParams(max_new_tokens=4, top_p=0.9))
    for row in (0, 2):
        assert torch.equal(ours[row], expected[row])


def scores_cut_by(p: float, margins: list[float], seed: int = 0) -> torch.Tensor:
    """One row per margin m: 199 tokens hold p - m, the next most likely holds 2m (so the cut of top-p p falls
    right after it, m from either side), and the rest share what is left; in random vocabulary order."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for m in margins:
        q = torch.empty(VOCAB, dtype=torch.float64)
        head = torch.linspace(1.0, 0.5, 199, dtype=torch.float64)
        q[:199] = head / head.sum() * (p - m)
        q[199] = 2 * m
        q[200:] = (1 - q[:200].sum()) / (VOCAB - 200)
        rows.append(q.log().float()[torch.randperm(VOCAB, generator=g)])
    return torch.stack(rows)


@pytest.mark.parametrize("top_p", [0.9, 0.95, 0.99])
def test_top_p_cut_just_past_the_margin(top_p, test_device):
    """Cuts 1.05 to 5 margins from a token's cumulative probability: decided from the candidates (they are past
    the margin), which must be normalised as exactly as transformers' tail sum is. torch's CPU softmax is
    ~2e-5 off as a whole; summed from the top, that alone moves the cuts near the 1e-5 margin."""
    margin = max(sampling.TOP_P_MARGIN, (1 - top_p) * VOCAB * 2.0**-27)  # the shortcut's margin at this cut
    scores = scores_cut_by(top_p, [f * margin for f in (1.05, 1.2, 1.4, 1.6, 2, 3, 5)]).to(test_device)
    s = RowSettings.of(
        [GenerationParams(max_new_tokens=4, do_sample=True, top_p=top_p)] * len(scores), test_device
    )
    expected = transformers_scores(scores, GenerationParams(max_new_tokens=4, top_p=top_p))
    assert torch.equal(torch.isinf(process(scores, None, None, s)), torch.isinf(expected))
    _, clear, _ = sampling._top_p_candidates(scores, s.top_p, sampling.TOP_P_CANDIDATES[0])
    assert bool(clear.all())  # every row was decided from the candidates, not by the full sort


def test_top_p_where_transformers_own_softmax_is_off(test_device):
    """A few head tokens over a flat tail holding most of the mass: transformers' float32 softmax, summed up to
    the cut, is ~1e-5 off the exact sum there. The shortcut must see that as ambiguous and leave the row to
    the full sort, so that the kept set is still transformers' (found by an adversarial tester)."""
    import math

    g = torch.Generator().manual_seed(381)
    heads = int(torch.randint(5, 250, (1,), generator=g))
    level = float(torch.rand(1, generator=g)) * -16
    scores = torch.full((VOCAB,), level)
    w = torch.rand(heads, generator=g) + 0.2
    scores[:heads] = (w / w.sum() * VOCAB * math.exp(level) * float(torch.rand(1, generator=g) * 20)).log()
    scores = scores.unsqueeze(0).to(test_device)
    p = 0.4003742
    s = RowSettings.of([GenerationParams(max_new_tokens=4, do_sample=True, top_p=p)], test_device)
    expected = transformers_scores(scores, GenerationParams(max_new_tokens=4, top_p=p))
    assert torch.equal(torch.isinf(process(scores, None, None, s)), torch.isinf(expected))


def test_a_draw_that_rounds_to_one_still_picks_a_token_the_processors_kept(test_device):
    """A uniform draw of 1 - 2^-25 or more is 1.0 in float32: the inverse CDF found no token and the last of the
    vocabulary was taken, even where top-k (or a grammar) had removed it (about 3e-8 per sampled token)."""
    params = GenerationParams(do_sample=True, top_k=3, max_new_tokens=1)
    scores = process(
        torch.linspace(0, 10, 50).flip(0).unsqueeze(0).to(test_device),
        None,
        None,
        rows := RowSettings.of([params], test_device),
    )
    assert torch.isinf(scores[0, 3:]).all()
    for u in (1 - 2.0**-30, 1 - 2.0**-25, 0.999999):
        token = sampling.pick(scores, rows, torch.tensor([u], dtype=torch.float64, device=test_device))
        assert token.item() == 2, u  # the least likely of the three kept, never id 49
    assert sampling.pick(scores, rows, torch.zeros(1, dtype=torch.float64, device=test_device)).item() == 0
