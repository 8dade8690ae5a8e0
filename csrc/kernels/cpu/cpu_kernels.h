// CPU implementations of the flashcore ops (torch-free). Arguments are validated by the binding layer first.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../params.h"

namespace flashcore::cpu {

// Fills p.out [total_q, Hq, D] and p.lse [total_q, Hq]; parallel over (sequence, kv head).
void paged_attention(const PagedAttentionParams& p);

// Copies p.k / p.v rows into their page slots; parallel over tokens.
void append_kv(const AppendKVParams& p);

struct PageLayoutHost {
  std::vector<int32_t> row_offsets, cols, token_counts, staging_ids;
};

// Returns an empty optional-like error message on success, else a description naming the offending argument.
// On success `out` holds the layout.
std::string build_layout(const BuildLayoutParams& p, PageLayoutHost& out);

}  // namespace flashcore::cpu
