"""Float64 oracles for the sparse selection ops (flashcore_hf.ops.select_pages, candidate_page_scores,
select_candidate_pages) and cache-content checks, shared by CPU and GPU tests."""
import math

import torch


def reference_page_scores(q, bounds, table, query_len, head_reduction="max"):
    """Quest scores in float64, [B, Hkv, M]: bias + reduce over the query_len * G query heads of each kv head of
    sum_d relu(q_d) max_d + min(q_d, 0) min_d; bias +-inf wins; page ids without a bounds row score -inf.

    q [B * query_len, Hq, D]; bounds [num_pages, Hkv, 2D]; table: a PaddedPageTable (pages / counts / bias [B, M]).
    """
    batch, m = table.pages.shape
    hkv, d = bounds.shape[1], bounds.shape[2] // 2
    group = q.shape[1] // hkv
    qd = q.double().reshape(batch, query_len, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(batch, hkv, -1, d)
    pages = table.pages.long()
    valid = (pages >= 0) & (pages < bounds.shape[0])
    rows = bounds.double()[pages.clamp(0, bounds.shape[0] - 1)]                     # [B, M, Hkv, 2D]
    hi, lo = rows[..., :d].permute(0, 2, 1, 3), rows[..., d:].permute(0, 2, 1, 3)   # [B, Hkv, M, D]
    per_head = qd.clamp(min=0) @ hi.transpose(-1, -2) + qd.clamp(max=0) @ lo.transpose(-1, -2)  # [B, Hkv, QG, M]
    scores = per_head.amax(dim=2) if head_reduction == "max" else per_head.sum(dim=2)
    bias = table.bias.double()[:, None].expand_as(scores)
    scores = torch.where(torch.isinf(bias), bias, scores + bias)
    return torch.where(valid[:, None], scores, -math.inf)


def assert_topk_picks(cols, counts, scores, table, budget, atol):
    """cols / counts [B, Hkv, budget] (select_pages' output) hold a top-`budget` set of the scores [B, Hkv, M] of
    table's entries in key order: every pick scores >= the budget-th best - atol and every entry scoring above it +
    atol is picked. Padding entries (count 0) are interchangeable, so picks are matched by (page, count)."""
    batch, hkv, m = scores.shape
    assert cols.shape == counts.shape == (batch, hkv, budget)
    for b in range(batch):
        entry_of = {(int(p), int(c)): j for j, (p, c) in enumerate(zip(table.pages[b], table.counts[b])) if c > 0}
        for h in range(hkv):
            row = scores[b, h]
            kth = row.sort(descending=True).values[budget - 1]
            picked = [entry_of.get((int(p), int(c))) for p, c in zip(cols[b, h], counts[b, h]) if c > 0]
            assert None not in picked, f"row ({b}, {h}) picked a page that is not in its table"
            assert picked == sorted(picked) and len(set(picked)) == len(picked), f"row ({b}, {h}) not in key order"
            padding = budget - len(picked)
            for j in picked:
                assert row[j] >= kth - atol or row[j] == math.inf, (b, h, j, float(row[j]), float(kth))
            must = [j for j in range(m) if table.counts[b, j] > 0 and row[j] > kth + atol]
            assert set(must) <= set(picked), f"row ({b}, {h}) missed {sorted(set(must) - set(picked))}"
            if padding:  # empty picks only once the real pages run out (or score -inf)
                real = [j for j in range(m) if table.counts[b, j] > 0 and row[j] > -math.inf]
                assert len(picked) >= min(len(real), budget) or kth == -math.inf


def reference_sign_scores(q, k_pool, bounds, table, query_len, head_reduction="max"):
    """Scores of scoring "signs" in float64, [B, Hkv, M], straight from the keys (not their packed bits): bias +
    reduce over the query_len * G query heads of each kv head of the largest, over the page's valid keys k, of
    sum_d q_d (max_d if k_d > 0 else min_d); bias +-inf wins.

    q [B * query_len, Hq, D]; k_pool [num_pages, P, Hkv, D]; bounds [num_pages, Hkv, 2D]; table: a PaddedPageTable.
    """
    batch, m = table.pages.shape
    hkv, d = bounds.shape[1], bounds.shape[2] // 2
    group = q.shape[1] // hkv
    qd = q.double().reshape(batch, query_len, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(batch, hkv, -1, d)
    scores = torch.full((batch, hkv, m), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for j in range(m):
            page, count = int(table.pages[b, j]), int(table.counts[b, j])
            for h in range(hkv):
                if count == 0:
                    continue
                hi, lo = bounds[page, h, :d].double(), bounds[page, h, d:].double()
                estimates = torch.where(k_pool[page, :count, h] > 0, hi, lo)           # [count, D]
                per_head = (qd[b, h] @ estimates.T).amax(dim=1)                        # [QG]
                scores[b, h, j] = per_head.max() if head_reduction == "max" else per_head.sum()
    bias = table.bias.double()[:, None].expand_as(scores)
    return torch.where(torch.isinf(bias), bias, scores + bias)


def reference_candidate_scores(q, k_pool, cols, counts, forced_pages):
    """candidate_page_scores in float64, [B, Hkv, C]: -inf for counts <= 0 or a page id outside the pool, +inf for
    a forced page, else the max over the page's first min(count, P) keys and the kv head's query heads of q . k.

    q [B * S, Hq, D]; k_pool [num_pages, P, Hkv, D]; cols / counts [B, Hkv, C]; forced_pages [B, F].
    """
    batch, hkv, candidates = cols.shape
    num_pages, page, _, dim = k_pool.shape
    queries = q.double().reshape(batch, -1, hkv, q.shape[1] // hkv, dim).transpose(1, 2).reshape(batch, hkv, -1, dim)
    valid = (counts > 0) & (cols >= 0) & (cols < num_pages)
    heads = torch.arange(hkv)[None, :, None, None]
    tokens = torch.arange(page)[None, None, None, :]
    keys = k_pool.double()[cols.long().clamp(0, num_pages - 1)[..., None], tokens, heads]     # [B, Hkv, C, P, D]
    scores = torch.einsum("bhqd,bhcpd->bhcpq", queries, keys).amax(dim=-1)                     # [B, Hkv, C, P]
    scores = scores.masked_fill(tokens >= counts[..., None], -math.inf).amax(dim=-1)           # [B, Hkv, C]
    forced = (cols[..., None] == forced_pages[:, None, None, :]).any(dim=-1)
    return torch.where(valid, torch.where(forced, math.inf, scores), -math.inf)


def total_order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 scores in IEEE total order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN), written
    from the bit patterns independently of the kernels."""
    bits = scores.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    negative = bits >= 0x80000000
    return torch.where(negative, 0xFFFFFFFF - bits, bits + 0x80000000)


def tied_scores(shape, generator):
    """float32 scores with many ties (a few distinct values), both zeros, both infinities and both NaNs."""
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1.5, -2.25])
    pick = torch.randint(0, specials.numel() + 3, shape, generator=generator)
    values = torch.where(pick < specials.numel(), specials[pick.clamp(max=specials.numel() - 1)],
                         (pick - specials.numel()).float())
    return values.contiguous()


def reference_select_candidates(scores, cols, counts, budget):
    """select_candidate_pages by sorting: per row of scores [..., C], the `budget` largest in total order (ties: the
    lower index), listed in index order, as (cols, counts) [..., budget]."""
    candidates = scores.shape[-1]
    keys = total_order_keys(scores).reshape(-1, candidates)
    flat_cols, flat_counts = cols.reshape(-1, candidates), counts.reshape(-1, candidates)
    picked = []
    for row in range(keys.shape[0]):
        ranked = sorted(range(candidates), key=lambda j: (-int(keys[row, j]), j))
        picked.append(sorted(ranked[:budget]))
    index = torch.tensor(picked, dtype=torch.long).reshape(-1, budget)
    shape = (*scores.shape[:-1], budget)
    return flat_cols.gather(1, index).reshape(shape), flat_counts.gather(1, index).reshape(shape)


def unpack_signs(signs, head_dim):
    """Bits [..., head_dim] (bool) of sign bytes [..., ceil(D / 8)] (bit b of byte c: channel 8 c + b), written
    independently of flashcore_hf.sparse.summaries."""
    bits = (signs[..., None] >> torch.arange(8, dtype=torch.uint8, device=signs.device)) & 1
    return bits.reshape(*signs.shape[:-1], -1)[..., :head_dim].bool()


def append_pool_keys(summaries, pool: torch.Tensor, slots: torch.Tensor, v_pool: torch.Tensor | None = None) -> None:
    """A decode step's append of the keys `pool` already holds at `slots` (< 0: none), through append_decode (the
    same values written again, their keys folded into the summaries); V (the keys too) goes to v_pool, a scratch
    pool when None."""
    keys = pool.view(-1, *pool.shape[2:])[slots.clamp(min=0).long()]
    summaries.append_decode(pool, torch.empty_like(pool) if v_pool is None else v_pool, keys, keys, slots)


def assert_same_stored_keys(a, b, layer_idx):
    """Caches a and b (same page tables) hold the same valid K/V and page summaries in layer layer_idx."""
    pages = sorted({p for row in range(len(a.sequence_lengths())) for p in a.page_table(row)})
    assert pages == sorted({p for row in range(len(b.sequence_lengths())) for p in b.page_table(row)})
    for row, length in enumerate(a.sequence_lengths()):
        table = torch.tensor(a.page_table(row))
        for name in ("k_pool", "v_pool"):
            stored = [getattr(cache.layers[layer_idx], name)[table].flatten(0, 1)[:length] for cache in (a, b)]
            assert torch.equal(*stored)
    summaries = a._sparse.summaries[layer_idx], b._sparse.summaries[layer_idx]
    assert torch.equal(summaries[0].bounds[pages], summaries[1].bounds[pages])
    if summaries[0].signs is not None:
        for row, length in enumerate(a.sequence_lengths()):
            for j, page in enumerate(a.page_table(row)):
                count = min(a.page_size, length - j * a.page_size)
                assert torch.equal(summaries[0].signs[page, :, :count], summaries[1].signs[page, :, :count])
