// The paged-attention plan as data: what `flashcore::plan_paged_attention` returns and `flashcore::paged_attention`
// runs with (flashcore_hf/ops/plan.py). The planner decides once from host-known metadata; every run checks that its
// tensors have the shapes the plan was made for and takes the kernel, bounds and split-KV partition from it.
#pragma once
#include <cstdint>
#include <vector>

#include "bindings/message.h"
#include "kernels/params.h"

namespace flashcore::binding {

// kCpu: the CPU tile kernel; kCpuDecode: the CPU decode kernel (items over key splits holding every kv head); see
// csrc/kernels/cpu/cpu_kernels.h. The numbers are the keys of flashcore_hf/ops/plan.py's KERNELS.
enum class PlanKernel : int64_t {
  kUnsupported = -1,
  kCpu = 0,
  kDecode = 1,
  kPrefillMma = 2,
  kPrefillWgmma = 3,
  kCpuDecode = 4,
};
inline bool is_cpu_kernel(PlanKernel k) { return k == PlanKernel::kCpu || k == PlanKernel::kCpuDecode; }

// Average queries per sequence up to which a plan made from shapes alone (no host copy of the offsets) takes the
// split-KV decode kernel, which covers any query count per sequence.
constexpr int64_t kDecodeQueriesPerSequence = 16;

struct AttentionPlanData {
  PlanKernel kernel = PlanKernel::kUnsupported;
  int64_t max_q_len = 0, max_pages_per_seq = 0, splits = 1, workspace_bytes = 0;
  // Bytes at the start of the workspace that hold the decode kernel's split counters: zero when the workspace is
  // made, and left zero by every run (0 without splits).
  int64_t split_counter_bytes = 0;
  // What the plan was made for; a run checks them.
  int64_t batch = 0, layout_rows = 0, total_q = 0, nnz = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0,
          page_size = 0, dtype = 0, causal = 0, window = 0;

  static constexpr size_t kSize = 17;

  std::vector<int64_t> encode() const {
    return {static_cast<int64_t>(kernel), max_q_len, max_pages_per_seq, splits, workspace_bytes, split_counter_bytes,
            batch, layout_rows, total_q, nnz, num_q_heads, num_kv_heads, head_dim, page_size, dtype, causal, window};
  }

  static AttentionPlanData decode(c10::ArrayRef<int64_t> v) {
    FC_CHECK(v.size() == kSize, "paged_attention: plan must be what flashcore_hf.ops.plan_attention made (",
             static_cast<int64_t>(kSize), " integers), got ", static_cast<int64_t>(v.size()));
    AttentionPlanData d;
    d.kernel = static_cast<PlanKernel>(v[0]);
    d.max_q_len = v[1];
    d.max_pages_per_seq = v[2];
    d.splits = v[3];
    d.workspace_bytes = v[4];
    d.split_counter_bytes = v[5];
    d.batch = v[6];
    d.layout_rows = v[7];
    d.total_q = v[8];
    d.nnz = v[9];
    d.num_q_heads = v[10];
    d.num_kv_heads = v[11];
    d.head_dim = v[12];
    d.page_size = v[13];
    d.dtype = v[14];
    d.causal = v[15];
    d.window = v[16];
    return d;
  }

  // Raises unless `p` (a run's checked arguments) has the shapes and options this plan was made for; then gives `p`
  // the plan's bounds.
  void apply_to(PagedAttentionParams& p, int64_t layout_rows_now) const {
    constexpr const char* op = "paged_attention";
    auto same = [&](int64_t planned, int64_t now, const char* what) {
      FC_CHECK(planned == now, op, ": the plan was made for ", what, " = ", planned, " but this call has ", now,
               "; plan again (flashcore_hf.ops.plan_attention) for these shapes");
    };
    same(batch, p.batch, "batch (len(q_indptr) - 1)");
    same(layout_rows, layout_rows_now, "layout rows (len(row_offsets) - 1)");
    same(total_q, p.total_q, "total_q (q.size(0))");
    same(nnz, p.nnz, "len(cols)");
    same(num_q_heads, p.num_q_heads, "num_q_heads");
    same(num_kv_heads, p.num_kv_heads, "num_kv_heads");
    same(head_dim, p.head_dim, "head_dim");
    same(page_size, p.page_size, "page_size");
    same(dtype, static_cast<int64_t>(p.dtype), "dtype");
    same(causal, p.causal ? 1 : 0, "causal");
    same(window, p.window, "sliding_window");
    FC_CHECK(max_q_len >= 0 && max_pages_per_seq >= 0 && splits >= 1 && workspace_bytes >= 0 &&
             split_counter_bytes >= 0 && split_counter_bytes <= workspace_bytes, op,
             ": the plan holds invalid bounds");
    p.max_q_len = static_cast<int32_t>(std::min<int64_t>(max_q_len, INT32_MAX));
    p.max_pages_per_seq = static_cast<int32_t>(std::min<int64_t>(max_pages_per_seq, INT32_MAX));
  }
};

}  // namespace flashcore::binding
