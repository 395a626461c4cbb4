"""Float32 parity with transformers' native classes for every Hugging Face family.

For each case: a tiny random transformers model is saved, loaded with ``llamakin.load``, and
compared on a left-padded ragged batch (full forward and cached incremental decoding), then
exported with ``save_pretrained`` and loaded back by transformers into the same class.
"""

from __future__ import annotations

import pytest
import torch

import llamakin
from hf_cases import CASE_IDS, CASES, hf_positions, ragged_batch, save_case

transformers = pytest.importorskip("transformers")

TOL = 1e-5
LENGTHS = [20, 13, 4]  # longer than the sliding windows and the dynamic-RoPE context of the cases
PREFILL = 8


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def pair(request, tmp_path_factory):
    case = request.param
    directory = tmp_path_factory.mktemp(case.name)
    hf = save_case(case, directory)
    return case, hf, llamakin.load(directory), directory


def real_tokens_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    case, hf, ours, _ = pair
    ids, mask = ragged_batch(hf.config.vocab_size, LENGTHS)
    expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = ours(ids, attention_mask=mask)
    assert got.shape == expected.shape
    assert real_tokens_diff(got, expected, mask) < TOL
    if case.length_dependent_rope:
        return
    # the unpadded single prompt gives the same logits as its padded row
    alone = ours(ids[1:2, mask[1].argmax() :])
    assert (alone[0] - got[1, mask[1].argmax() :]).abs().max().item() < TOL


@torch.no_grad()
def test_cached_decoding_matches(pair):
    case, hf, ours, _ = pair
    ids, mask = ragged_batch(hf.config.vocab_size, LENGTHS)
    pos = hf_positions(mask)
    B, T = ids.shape

    cache = ours.new_cache(B, T)
    steps = [ours(ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], cache=cache)]
    out = hf(
        ids[:, :PREFILL],
        attention_mask=mask[:, :PREFILL],
        position_ids=pos[:, :PREFILL],
        use_cache=True,
    )
    hf_steps, past = [out.logits], out.past_key_values
    for t in range(PREFILL, T):
        steps.append(ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
        out = hf(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=pos[:, t : t + 1],
            past_key_values=past,
            use_cache=True,
        )
        hf_steps.append(out.logits)
        past = out.past_key_values
    incremental, hf_incremental = torch.cat(steps, 1), torch.cat(hf_steps, 1)
    assert cache.length == T
    assert real_tokens_diff(incremental, hf_incremental, mask) < TOL
    if not case.length_dependent_rope:
        assert real_tokens_diff(incremental, ours(ids, attention_mask=mask), mask) < TOL


@torch.no_grad()
def test_export_round_trip(pair, tmp_path):
    case, hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    hf_state, back_state = hf.state_dict(), back.state_dict()
    assert set(hf_state) == set(back_state)
    for name, tensor in hf_state.items():
        assert torch.equal(tensor, back_state[name]), name
    ids, mask = ragged_batch(hf.config.vocab_size, LENGTHS)
    expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = back(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert real_tokens_diff(got, expected, mask) == 0.0

    again = llamakin.load(tmp_path)
    assert again.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
