// build_layout on the host: distinct pages per sequence in order of first touch, with per-page token counts and
// staging slots for non-resident pages (numbered in order of first appearance over the whole batch).
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace flashcore::cpu {

std::string build_layout(const BuildLayoutParams& p, PageLayoutHost& out) {
  PageLayoutHost layout;
  layout.row_offsets.reserve(p.batch + 1);
  layout.row_offsets.push_back(0);
  std::vector<int32_t> seen_by(p.num_pages, -1);    // last sequence that touched the page
  std::vector<int32_t> index_in_row(p.num_pages, 0);  // where that sequence listed it
  std::vector<int32_t> staging_slot(p.num_pages, -1);
  int32_t next_staging = 0;
  for (int32_t b = 0; b < p.batch; ++b) {
    for (int32_t t = p.seq_starts[b]; t < p.seq_ends[b]; ++t) {
      const int32_t page = p.token_to_page[t];
      if (seen_by[page] != b) {
        seen_by[page] = b;
        index_in_row[page] = static_cast<int32_t>(layout.cols.size());
        layout.cols.push_back(page);
        layout.token_counts.push_back(0);
        if (!p.page_resident[page] && staging_slot[page] < 0) staging_slot[page] = next_staging++;
        layout.staging_ids.push_back(p.page_resident[page] ? -1 : staging_slot[page]);
      }
      if (++layout.token_counts[index_in_row[page]] > p.page_tokens) {
        return "build_layout: sequence " + std::to_string(b) + " has more than page_tokens=" +
               std::to_string(p.page_tokens) + " tokens on page " + std::to_string(page);
      }
    }
    layout.row_offsets.push_back(static_cast<int32_t>(layout.cols.size()));
  }
  out = std::move(layout);
  return {};
}

}  // namespace flashcore::cpu
