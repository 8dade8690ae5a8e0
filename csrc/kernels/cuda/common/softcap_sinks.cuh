// Logit softcapping and attention sinks (semantics in PagedAttentionParams, ../../params.h): the device helpers that
// the decode and both prefill kernels share.
//
// Softcap: every kernel that supports it has a compile-time flag (a second instantiation chosen at launch when
// p.softcap > 0), so the path without it is unchanged. The capped score is softcap * tanh(sm_scale * q.k / softcap),
// computed as tanh_approx(raw * (sm_scale / softcap)) and then scaled by softcap (times log2 e where the kernel works
// in base 2).
// Sinks: applied once per output row, after its keys: a sink is an extra softmax term with logit `sink` and no
// value, i.e. a partial result with lse = sink and output 0, merged into the row with add_sink. Split-KV partials
// stay sink-free; the decode merge kernel adds the sink when it combines them.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

namespace flashcore {

// tanh.approx.f32 (MUFU.TANH, sm_75+), used whatever the nvcc flags are (tanhf becomes this instruction only under
// --use_fast_math, which setup.py passes and the CI compile check does not): one MUFU op per score, like the ex2 of
// the softmax, where tanhf's accurate sequence costs an ex2, a reciprocal and about ten more instructions, which
// the compute-bound prefill kernels would feel. Accuracy: about 16.5 bits, a maximum relative error of ~1.1e-5
// measured over all floats (the PTX ISA only promises ~2^-11), so a capped logit softcap * tanh(x) is off by at
// most ~1.1e-5 * softcap in absolute terms (5.6e-4 at softcap 50, where the logit saturates), and a softmax weight
// exp(logit) by that much relatively: below the rounding of the probabilities to bf16 (2^-9) that the P V product
// applies to every weight, about the fp16 one (2^-11) at the largest caps.
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Joins a sink logit (natural log) to a finished softmax row whose normalised output is out and whose natural-log
// sum-exp is lse (-inf: the row saw no key): lse becomes logaddexp(lse, sink) and the returned factor
// exp(lse_old - lse_new) rescales out. No key: factor 0 and lse = sink exactly; sink = -inf: factor 1 and lse
// unchanged; both -inf: factor 0, lse stays -inf.
__device__ __forceinline__ float add_sink(float& lse, float sink) {
  const float mx = fmaxf(lse, sink);
  if (mx == -INFINITY) return 0.f;
  const float lse_all = mx + log1pf(__expf(-fabsf(lse - sink)));
  const float factor = lse == -INFINITY ? 0.f : __expf(lse - lse_all);
  lse = lse_all;
  return factor;
}

}  // namespace flashcore
