"""A decode step planned ahead (PagedKVCache.prepare_next_decode_step, called by the CUDA-graph runner right after a
replay) is the plan the step would have made, and undoing it when the step does not come leaves the cache exactly
as if it had never been planned. Driven on the CPU through the fixed-buffer steps a replay runs (no graphs)."""
import pytest
import torch
from transformers import LlamaConfig

import flashcore_hf as fc
from flashcore_hf.cache import OutOfPagesError

CPU = torch.device("cpu")
CONFIG = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def fixed_step(cache, keys, ahead):
    """One decode step as a replay runs it (plan, fixed buffers, every layer's update, finish), then, with ahead,
    the next step planned. keys: per layer [B, 2, 1, 8]. Returns the plan and each layer's attention output."""
    plan = cache.plan_decode_step(CPU)
    shape = cache.fixed_decode_shape(plan)
    device_step = shape.split(shape.pack(*plan.host_parts, pin=False))
    cache.begin_fixed_step(device_step, shape, plan)
    q = torch.ones(keys[0].shape[0], 4, 8)
    outs = []
    for layer, k in enumerate(keys):
        h = cache.update(k, k + 1, layer)[0].resolve()
        outs.append(fc.paged_attention(q, h.k_cache, h.v_cache, h.layout, h.q_indptr,
                                       max_pages_per_seq=h.max_pages_per_seq))
    cache.finish_replayed_step(plan)
    if ahead:
        cache.prepare_next_decode_step(CPU)
    return plan, outs


def twins(generator, batch=3, prompt=6, page_size=4, **kwargs):
    """Two caches holding the same prompt: the first plans ahead, the second never does."""
    caches = [fc.PagedKVCache(CONFIG, page_size=page_size, **kwargs) for _ in range(2)]
    keys = [torch.randn(batch, 2, prompt, 8, generator=generator) for _ in range(2)]
    for cache in caches:
        for layer, k in enumerate(keys):
            cache.update(k, k + 1, layer)[0].resolve()
    return caches


def row_keys(cache, layer, row):
    """The keys row `row` of `layer` reads back, [length, Hkv, D]."""
    pool = cache.layers[layer].k_pool
    pages = torch.tensor(cache.page_table(row), dtype=torch.long)
    return pool[pages].reshape(-1, *pool.shape[2:])[:cache.sequence_lengths()[row]]


def assert_same_state(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    assert a.sequence_lengths() == b.sequence_lengths()
    stats_a, stats_b = a.stats(), b.stats()          # (pools grown ahead stay grown: totals may differ)
    assert (stats_a.pages_used, stats_a.pages_shared) == (stats_b.pages_used, stats_b.pages_shared)
    for row in range(len(a.sequence_lengths())):
        assert len(a.page_table(row)) == len(b.page_table(row))
        for layer in range(2):
            assert torch.equal(row_keys(a, layer, row), row_keys(b, layer, row))


def test_planned_ahead_steps_are_the_steps_planned_on_time(generator):
    ahead, on_time = twins(generator)
    for step in range(12):                                      # crosses page boundaries (4-token pages)
        keys = [torch.randn(3, 2, 1, 8, generator=generator) for _ in range(2)]
        expected = ahead._next_decode[0] if ahead._next_decode is not None else None
        plan_a, outs_a = fixed_step(ahead, keys, ahead=True)
        plan_b, outs_b = fixed_step(on_time, keys, ahead=False)
        if step > 0:
            assert plan_a is expected                            # the plan made ahead was used
        assert plan_a.max_pages == plan_b.max_pages and plan_a.padded_len == plan_b.padded_len
        for part_a, part_b in zip(plan_a.shape.pack(*plan_a.host_parts, pin=False),
                                  plan_b.shape.pack(*plan_b.host_parts, pin=False)):
            assert torch.equal(part_a, part_b)
        for out_a, out_b in zip(outs_a, outs_b):
            assert torch.equal(out_a, out_b)
        assert ahead.get_seq_length() == on_time.get_seq_length()   # generate()'s per-step query keeps the plan
        assert ahead.get_mask_sizes(1, 0) == on_time.get_mask_sizes(1, 0)
        assert ahead._next_decode is not None


OPERATIONS = {
    "sequence_lengths": lambda c: c.sequence_lengths(),
    "crop": lambda c: c.crop(-2),
    "reorder": lambda c: c.reorder_cache(torch.tensor([0, 0, 2])),
    "select": lambda c: c.batch_select_indices(torch.tensor([2, 0])),
    "repeat": lambda c: c.batch_repeat_interleave(2),
    "reset": lambda c: c.reset(),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("prompt", [6, 8])                    # 8: the step planned ahead takes a new page
def test_an_operation_after_a_step_planned_ahead_sees_the_cache_unplanned(generator, operation, prompt):
    ahead, on_time = twins(generator, prompt=prompt)
    keys = [torch.randn(3, 2, 1, 8, generator=generator) for _ in range(2)]
    fixed_step(ahead, keys, ahead=True)
    fixed_step(on_time, keys, ahead=False)
    assert ahead._next_decode is not None
    for cache in (ahead, on_time):
        OPERATIONS[operation](cache)
    assert ahead._next_decode is None
    assert_same_state(ahead, on_time)
    if operation != "reset":                                    # and the next steps match too
        batch = len(ahead.sequence_lengths())
        for _ in range(3):
            keys = [torch.randn(batch, 2, 1, 8, generator=generator) for _ in range(2)]
            _, outs_a = fixed_step(ahead, keys, ahead=True)
            _, outs_b = fixed_step(on_time, keys, ahead=False)
            assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b))
        assert_same_state(ahead, on_time)


def test_an_eager_step_after_a_step_planned_ahead(generator):
    """The next forward runs eagerly (update() with a mask, as a model does when no graph replays it)."""
    ahead, on_time = twins(generator, prompt=7)
    keys = [torch.randn(3, 2, 1, 8, generator=generator) for _ in range(2)]
    fixed_step(ahead, keys, ahead=True)
    fixed_step(on_time, keys, ahead=False)
    keys = [torch.randn(3, 2, 2, 8, generator=generator) for _ in range(2)]
    mask = torch.ones(3, 10, dtype=torch.long)
    for cache in (ahead, on_time):
        for layer, k in enumerate(keys):
            cache.update(k, k + 1, layer, attention_mask=mask)
    assert_same_state(ahead, on_time)


def test_out_of_pages_ahead_is_raised_when_the_step_comes(generator):
    """A fixed pool with no page for the next step: planning ahead changes nothing and raises nothing; the step,
    when it comes, raises OutOfPagesError as without planning ahead."""
    ahead, on_time = twins(generator, batch=2, prompt=7, num_pages=4)   # 2 rows x 2 pages: full after 1 token
    keys = [torch.randn(2, 2, 1, 8, generator=generator) for _ in range(2)]
    fixed_step(ahead, keys, ahead=True)
    fixed_step(on_time, keys, ahead=False)
    assert ahead._next_decode is None
    assert_same_state(ahead, on_time)
    for cache in (ahead, on_time):
        with pytest.raises(OutOfPagesError):
            cache.plan_decode_step(CPU)
