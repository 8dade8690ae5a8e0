// Division by a divisor that is fixed for a whole launch (a query group's size G, ...), as a multiply-high and a
// shift (Granlund and Montgomery's round-up method): exact for dividends in [0, 2^31) and divisors in [1, 2^31).
// Built on the host and passed to a kernel by value. A division by a run-time value compiles to ~20 instructions
// (I2F.RP, MUFU.RCP, two corrections); this is two.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace flashcore {

struct FastDivmod {
  int32_t divisor = 1;
  uint32_t multiplier = 0;  // 0 for divisor 1
  uint32_t shift = 0;

  static FastDivmod of(int32_t d) {
    FastDivmod f;
    f.divisor = d;
    if (d > 1) {
      uint32_t log2_ceil = 0;
      while ((1ull << log2_ceil) < (uint64_t)d) ++log2_ceil;
      const uint32_t p = 31 + log2_ceil;  // m = ceil(2^p / d) < 2^32
      f.multiplier = (uint32_t)(((1ull << p) + (uint64_t)d - 1) / (uint64_t)d);
      f.shift = p - 32;
    }
    return f;
  }

#if defined(__CUDACC__)
  // n / divisor for n in [0, 2^31).
  __device__ __forceinline__ int32_t div(int32_t n) const {
    return multiplier == 0 ? n : (int32_t)(__umulhi((uint32_t)n, multiplier) >> shift);
  }
#endif
};

}  // namespace flashcore
