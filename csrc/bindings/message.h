// Error messages of the binding layer, formatted without iostreams.
//
// TORCH_CHECK streams its message arguments into an ostringstream. In the CUDA build on the GPU machine (Ubuntu
// 24.04 system Python, gcc 13.3, torch 2.11) this extension ended up with its own copy of
// std::ostream::_M_insert<long>, and streaming any integer crashed (SIGSEGV in that copy; cuda-gdb backtrace in the
// project notes). FC_CHECK formats everything here (integers through std::to_string) and hands TORCH_CHECK a single
// string, which only takes the string-insertion path that works there.
#pragma once
#include <cstdio>
#include <string>
#include <type_traits>

#include <ATen/ATen.h>

namespace flashcore::binding {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(bool v) { return v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline std::string to_text(T v) { return std::to_string(v); }
inline std::string to_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string to_text(float v) { return to_text(static_cast<double>(v)); }
inline std::string to_text(at::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const at::Device& d) { return d.str(); }
inline std::string to_text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (out += ... += to_text(args));
  return out;
}

}  // namespace flashcore::binding

// TORCH_CHECK with a message preformatted by flashcore::binding::message (evaluated only when the check fails).
#define FC_CHECK(cond, ...) TORCH_CHECK(cond, ::flashcore::binding::message(__VA_ARGS__))
