"""Rough L2 model of the prefill grid: 132 SMs, one CTA each, CTAs started in launch order as SMs free up, each
reading its key tiles in order at one tile per time unit; K/V tile reads go through an LRU of L2's size. Prints the
DRAM bytes (misses) of three launch orders: tile-major (tiles slowest), sequence-major (sequence slowest, KV head
fastest) and head-major (sequence, then KV head, then tile: the CTAs resident at once share one KV head's K/V)."""
import heapq
from collections import OrderedDict

def grid(B, Hkv, G, S, M, causal, order):
    tiles = (S * G + M - 1) // M
    cells = []
    if order == "tile":
        for z in range(tiles):
            for b in range(B):
                for h in range(Hkv):
                    cells.append((b, h, tiles - 1 - z))
    elif order == "head":
        for b in range(B):
            for h in range(Hkv):
                for z in range(tiles):
                    cells.append((b, h, tiles - 1 - z))
    else:
        for b in range(B):
            for z in range(tiles):
                for h in range(Hkv):
                    cells.append((b, h, tiles - 1 - z))
    out = []
    for b, h, t in cells:
        q_hi = min(S, ((t + 1) * M - 1) // G + 1)
        n = (q_hi + 127) // 128 if causal else (S + 127) // 128
        out.append((b, h, n))
    return out

def simulate(cells, tile_bytes, l2_bytes=50 << 20, sms=132):
    cap = l2_bytes // tile_bytes
    lru = OrderedDict()
    misses = 0
    # events: (time, seq, cta index, next tile)
    heap, nxt, seq = [], 0, 0
    for _ in range(min(sms, len(cells))):
        heapq.heappush(heap, (0.0, seq, nxt, 0)); nxt += 1; seq += 1
    while heap:
        t, _, c, k = heapq.heappop(heap)
        b, h, n = cells[c]
        if k < n:
            key = (b, h, k)
            if key in lru:
                lru.move_to_end(key)
            else:
                misses += 1
                lru[key] = None
                if len(lru) > cap:
                    lru.popitem(last=False)
            heapq.heappush(heap, (t + 1.0, seq, c, k + 1)); seq += 1
        elif nxt < len(cells):
            heapq.heappush(heap, (t + 0.5, seq, nxt, 0)); nxt += 1; seq += 1   # CTA start cost ~half a tile
    return misses * tile_bytes

for name, (B, Hkv, G, S, M, causal, D) in {
        "B16 H16 S2K D64": (16, 16, 1, 2048, 192, False, 64),
        "B16 H16 S2K D64 causal": (16, 16, 1, 2048, 192, True, 64),
        "B1 32/8 S8K D128 causal": (1, 8, 4, 8192, 128, True, 128),
        "B4 32/8 S4K D128 causal": (4, 8, 4, 4096, 128, True, 128),
        "B1 32/8 S32K D128 causal": (1, 8, 4, 32768, 128, True, 128),
        "B1 32/8 S128K D128 causal": (1, 8, 4, 131072, 128, True, 128)}.items():
    tile_bytes = 2 * 128 * D * 2
    total = sum(n for _, _, n in grid(B, Hkv, G, S, M, causal, "tile")) * tile_bytes
    kv = B * Hkv * S * D * 2 * 2
    res = {o: simulate(grid(B, Hkv, G, S, M, causal, o), tile_bytes) for o in ("tile", "sequence", "head")}
    print(f"{name}: K/V {kv / 2**20:.0f} MiB, tile reads {total / 2**30:.2f} GiB; DRAM tile-major "
          f"{res['tile'] / 2**20:.0f} MiB, sequence-major {res['sequence'] / 2**20:.0f} MiB, "
          f"head-major {res['head'] / 2**20:.0f} MiB", flush=True)
