// CGMQ's nested residual fake-quantizer on CPU: one sweep forward (x_q at the widest switched-on
// level and, for the gate gradients, the integer codes of the residual levels), one sweep backward
// (the straight-through gradient to x and the per-channel sums behind the beta and gate gradients).
// The tensor-op version makes ~10 elementwise passes over the tensor each way.
//
// Same definition as _NestedQuantize in mmsparse/cgmq/quantizer.py (SPEC section 2), element by
// element with the same float32 operations in the same order, so x_q is bit-identical to it:
//   s_0 = span / 3, s_l = s_(l-1) / d_l, d_l = 2^(2^l) + 1  (span = 2 beta signed, beta unsigned)
//   x_c = clip(x, alpha, beta), c = clamp(R(x_c / s_L), lo_L, hi_L), x_q = c s_L  (L = levels)
// with R = round half to even (nearbyint, as ONNX QuantizeLinear: one division, then rounding)
// and [lo_L, hi_L] the code range of the width 2^(L+1): [-(2^(b-1) - 1), 2^(b-1) - 1] signed,
// [0, 2^b - 1] unsigned; level 4 (32 bits) in double. The residual codes, kept as int8, int8,
// int16, int32 (levels 1..4), split c exactly: c_(l-1) = R(c_l / d_l) (never a tie, d_l is odd),
// q_l = c_l - d_l c_(l-1), |q_l| <= 2, 8, 128, 32768.
// Backward, per channel (one channel for a per-tensor beta), in double:
//   sums[c][0] = sum grad * x_q - grad_in * x   (grad_beta = sums[c][0] / beta_c),
//   sums[c][l] = sum grad * q_l for l = 1..levels and the first switched-off level (its code
//                c_(L+1) - d_(L+1) c_L from x_c), when the gate sums are asked for;
// grad_in = grad * [x_c == x]. Reductions run over fixed chunks of a channel (lanes in a fixed
// order inside a chunk, chunks in order), so results do not depend on the number of threads.
//
// The loops vectorize under GCC's default -ftrapping-math on baseline x86-64 (SSE2): no float
// arithmetic under a condition (GCC would keep branches, which mispredict on data), rounding
// through a round-to-nearest-even constant (no SSE4.1 needed), masks as bit operations, sums in
// fixed lanes; on x86-64 Linux the block functions also get an AVX2 clone, picked at load time.
// setup.py builds with -ffp-contract=off, so c - prev * d is never contracted into an FMA
// (harmless here, the values are exact integers, but the rule keeps every kernel bit-identical
// to its tensor ops) whatever the target.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// The block functions in SSE2 and AVX2 versions (x86-64 Linux): same IEEE operations, same results.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define MMSPARSE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MMSPARSE_VECTOR_CLONES
#endif

// Element functions inlined into every loop (a loop calling one stays scalar).
#if defined(__GNUC__)
#define MMSPARSE_INLINE inline __attribute__((always_inline))
#else
#define MMSPARSE_INLINE inline
#endif

constexpr int kMaxLevels = 4;            // residual levels: 4, 8, 16, 32 bits
// d_l of levels 1..3 (level 4's, 65537, is applied in double)
constexpr float kMultiplier[kMaxLevels - 1] = {5.0f, 17.0f, 257.0f};
constexpr int64_t kBlock = 256;          // elements computed level by level in L1-resident buffers
constexpr int64_t kChunk = 32 * kBlock;  // reduction chunk (elements of one channel), fixed
constexpr int kLanes = 8;                // element i of a chunk sums into lane i % 8

// Integer type of a residual level's codes (±2, ±8, ±128, ±32768).
template <int L>
using CodeT = std::conditional_t<(L <= 2), int8_t, std::conditional_t<(L == 3), int16_t, int32_t>>;
const at::ScalarType kCodeType[kMaxLevels] = {at::kChar, at::kChar, at::kShort, at::kInt};

// Code tensors of the residual levels (null: not kept).
template <typename I8, typename I16, typename I32>
struct CodePtrs {
  I8* l1 = nullptr;
  I8* l2 = nullptr;
  I16* l3 = nullptr;
  I32* l4 = nullptr;

  CodePtrs shifted(int64_t k) const {
    auto at = [k](auto* p) { return p == nullptr ? p : p + k; };
    return {at(l1), at(l2), at(l3), at(l4)};
  }
};
using Codes = CodePtrs<int8_t, int16_t, int32_t>;
using ConstCodes = CodePtrs<const int8_t, const int16_t, const int32_t>;

// A level's scale and the code range of its width.
struct Level {
  float s, lo, hi;
};

// Level 4 (32 bits) in double: codes up to 2^32 - 1 are not float32 integers.
struct Level64 {
  double s, lo, hi;
};

// One channel's clip bounds and levels.
struct Grid {
  float lo, hi;
  Level level[kMaxLevels];
  Level64 level4;

  Grid(float beta, bool is_signed) {
    static constexpr float kDivisor[kMaxLevels + 1] = {3.0f, 5.0f, 17.0f, 257.0f, 65537.0f};
    lo = is_signed ? -beta : 0.0f;
    hi = beta;
    float s = (is_signed ? 2.0f * beta : beta) / kDivisor[0];
    for (int l = 0; l <= kMaxLevels; ++l) {
      if (l > 0) s = s / kDivisor[l];
      const double top = is_signed ? std::ldexp(1.0, (2 << l) - 1) - 1.0
                                   : std::ldexp(1.0, 2 << l) - 1.0;  // 2^(b-1) - 1 or 2^b - 1
      const double bottom = is_signed ? -top : 0.0;
      if (l < kMaxLevels) {
        level[l] = {s, static_cast<float>(bottom), static_cast<float>(top)};
      } else {
        level4 = {s, bottom, top};
      }
    }
  }
};

// min(max(v, lo), hi) with torch.clamp's semantics (NaN propagates).
template <typename T>
MMSPARSE_INLINE T clamp(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// v where c holds, +0 elsewhere (a bit mask: no branch, no float operation under a condition).
inline float keep_if(bool c, float v) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) & (0u - static_cast<uint32_t>(c)));
}

// v + kMagic rounds v to an integer, ties to even (the default rounding mode), while |v| < 2^22
// (the sum lies in [2^23, 2^24), where the floats are the integers), so round_half_even is
// std::nearbyint (torch.round) there, the sign of a zero kept by copysign. Larger |v| give at
// least 2^22 - 1, which every float32 code clamp (at most 2^15 - 1 at 16 bits) maps to its bound as
// it does nearbyint's value; NaN and inf propagate. The same in double, exact while |v| < 2^51.
MMSPARSE_INLINE float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return std::copysign((std::fabs(v) + kMagic) - kMagic, v);
}

MMSPARSE_INLINE double round_half_even(double v) {
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  return std::copysign((std::fabs(v) + kMagic) - kMagic, v);
}

// v where v is not NaN, else 0 (a bit mask): safe to convert to an integer type.
MMSPARSE_INLINE float zero_nan(float v) { return keep_if(v == v, v); }

MMSPARSE_INLINE double zero_nan(double v) {
  const uint64_t mask = 0u - static_cast<uint64_t>(v == v);
  return std::bit_cast<double>(std::bit_cast<uint64_t>(v) & mask);
}

// The code clamp(R(x_c / s), lo, hi) of a level (of level 4 in double).
MMSPARSE_INLINE float code(float xc, Level l) {
  return clamp(round_half_even(xc / l.s), l.lo, l.hi);
}

MMSPARSE_INLINE double code(float xc, const Level64& l) {
  return clamp(round_half_even(static_cast<double>(xc) / l.s), l.lo, l.hi);
}

// Level L's residual codes over a block: q_L = c - d_L c', c' = R(c / d_L) replaces c (L <= 3).
template <int L>
MMSPARSE_INLINE void split_level(float* __restrict c, CodeT<L>* __restrict codes, int64_t n) {
  constexpr float d = kMultiplier[L - 1], inv = 1.0f / kMultiplier[L - 1];
  for (int64_t i = 0; i < n; ++i) {
    const float prev = round_half_even(c[i] * inv);
    codes[i] = static_cast<CodeT<L>>(zero_nan(c[i] - prev * d));
    c[i] = prev;
  }
}

// Residual codes of levels 1..levels (<= 3) from the codes c of level `levels`.
MMSPARSE_INLINE void split_codes(float* c, int64_t levels, const Codes& codes, int64_t n) {
  if (levels >= 3) split_level<3>(c, codes.l3, n);
  if (levels >= 2) split_level<2>(c, codes.l2, n);
  if (levels >= 1) split_level<1>(c, codes.l1, n);
}

MMSPARSE_VECTOR_CLONES
void forward_block(const float* x, float* out, const Grid& g, int64_t levels, const Codes& codes,
                   int64_t n) {
  float c[kBlock];
  const float lo = g.lo, hi = g.hi;
  const bool keep = codes.l1 != nullptr;  // codes of every level 1..levels, or none
  if (levels < kMaxLevels) {
    const Level top = g.level[levels];
    for (int64_t i = 0; i < n; ++i) {
      c[i] = code(clamp(x[i], lo, hi), top);
      out[i] = c[i] * top.s;
    }
    if (keep) split_codes(c, levels, codes, n);
    return;
  }
  double c4[kBlock];
  const Level64 top = g.level4;
  for (int64_t i = 0; i < n; ++i) {
    c4[i] = code(clamp(x[i], lo, hi), top);
    out[i] = static_cast<float>(c4[i] * top.s);
  }
  if (!keep) return;
  constexpr double d = 65537.0, inv = 1.0 / 65537.0;
  for (int64_t i = 0; i < n; ++i) {
    const double prev = round_half_even(c4[i] * inv);
    codes.l4[i] = static_cast<int32_t>(zero_nan(c4[i] - prev * d));
    c[i] = static_cast<float>(prev);
  }
  split_codes(c, 3, codes, n);
}

// lane[j] += t[i] for i = j (mod kLanes).
inline void add_lanes(const double* __restrict t, int64_t n, double* __restrict lane) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += t[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) lane[j] += t[i];
}

template <typename T>
inline void code_products(const float* __restrict grad, const T* __restrict codes,
                          double* __restrict t, int64_t n) {
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<double>(grad[i]) * codes[i];
}

// One block's terms into the lanes: lane[0] grad * x_q - grad_in * x, lane[l] grad * q_l for the
// kept levels and the first switched-off one (gates only); grad_in written to gx when not null.
MMSPARSE_VECTOR_CLONES
void backward_block(const float* grad, const float* x, const float* xq, const Grid& g,
                    int64_t levels, const ConstCodes& codes, bool gates, float* gx, int64_t n,
                    double (*lane)[kLanes]) {
  float xc[kBlock], gin[kBlock];
  double t[kBlock] = {};  // zeroed: GCC cannot tell that only t[0, n) is read
  const float lo = g.lo, hi = g.hi;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], gi = grad[i];
    xc[i] = clamp(xi, lo, hi);
    gin[i] = gi * keep_if(xc[i] == xi, 1.0f);
    t[i] = static_cast<double>(gi) * xq[i] - static_cast<double>(gin[i]) * xi;
  }
  add_lanes(t, n, lane[0]);
  if (gx != nullptr) std::copy(gin, gin + n, gx);
  if (!gates) return;
  if (levels >= 1) code_products(grad, codes.l1, t, n), add_lanes(t, n, lane[1]);
  if (levels >= 2) code_products(grad, codes.l2, t, n), add_lanes(t, n, lane[2]);
  if (levels >= 3) code_products(grad, codes.l3, t, n), add_lanes(t, n, lane[3]);
  if (levels >= 4) code_products(grad, codes.l4, t, n), add_lanes(t, n, lane[4]);
  // The first switched-off level: c_(L+1) - d_(L+1) c_L, c_L = R(x_q / s_L) (exactly the forward's
  // code, |c_L| < 2^16, also through the multiplication by 1 / s_L).
  const float inv = 1.0f / g.level[std::min<int64_t>(levels, kMaxLevels - 1)].s;
  if (levels < kMaxLevels - 1) {
    const Level off = g.level[levels + 1];
    const float d = kMultiplier[levels];
    for (int64_t i = 0; i < n; ++i) {
      const float q = code(xc[i], off) - round_half_even(xq[i] * inv) * d;
      t[i] = static_cast<double>(grad[i]) * q;
    }
    add_lanes(t, n, lane[levels + 1]);
  } else if (levels == kMaxLevels - 1) {  // ... at 32 bits, in double
    for (int64_t i = 0; i < n; ++i) {
      const double c = round_half_even(xq[i] * inv);
      t[i] = static_cast<double>(grad[i]) * (code(xc[i], g.level4) - c * 65537.0);
    }
    add_lanes(t, n, lane[kMaxLevels]);
  }
}

// Channels of x (beta per tensor: 1, per leading channel: x.size(0)) and elements per channel.
std::pair<int64_t, int64_t> channels(const at::Tensor& x, const at::Tensor& beta, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op,
              ": expects a float32 CPU tensor, got ", x.toString());
  TORCH_CHECK(beta.device().is_cpu() && beta.scalar_type() == at::kFloat, op,
              ": expects a float32 CPU beta, got ", beta.toString());
  if (beta.numel() == 1 && beta.dim() <= x.dim()) return {1, x.numel()};
  bool per_channel = x.dim() >= 1 && beta.dim() == x.dim() && beta.size(0) == x.size(0);
  for (int64_t d = 1; per_channel && d < beta.dim(); ++d) per_channel = beta.size(d) == 1;
  TORCH_CHECK(per_channel, op, ": beta must have one element or shape (x.size(0), 1, ...), got ",
              beta.sizes(), " for x of shape ", x.sizes());
  return {x.size(0), x.size(0) == 0 ? 0 : x.numel() / x.size(0)};
}

std::vector<Grid> grids(const at::Tensor& beta, bool is_signed) {
  const at::Tensor b = beta.contiguous();
  const float* p = b.data_ptr<float>();
  std::vector<Grid> out;
  out.reserve(b.numel());
  for (int64_t c = 0; c < b.numel(); ++c) out.emplace_back(p[c], is_signed);
  return out;
}

// Runs fn(channel, begin, end, chunk index) over the fixed chunks of every channel, in parallel.
template <typename F>
void for_chunks(int64_t C, int64_t n, F fn) {
  const int64_t per_channel = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, C * per_channel, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t c = item / per_channel, k = item % per_channel;
      const int64_t begin = c * n + k * kChunk;
      fn(c, begin, std::min(begin + kChunk, (c + 1) * n), item);
    }
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> nested_quantize_forward(
    const at::Tensor& x_in, const at::Tensor& beta, bool is_signed, int64_t levels,
    bool keep_codes) {
  const char* op = "nested_quantize_forward";
  const auto [C, n] = channels(x_in, beta, op);
  TORCH_CHECK(0 <= levels && levels <= kMaxLevels, op, ": levels must be in [0, 4], got ", levels);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  std::vector<at::Tensor> codes;
  for (int64_t l = 0; keep_codes && l < levels; ++l) {
    codes.push_back(at::empty_like(x, kCodeType[l]));
  }
  Codes ptrs;
  if (codes.size() >= 1) ptrs.l1 = codes[0].data_ptr<int8_t>();
  if (codes.size() >= 2) ptrs.l2 = codes[1].data_ptr<int8_t>();
  if (codes.size() >= 3) ptrs.l3 = codes[2].data_ptr<int16_t>();
  if (codes.size() >= 4) ptrs.l4 = codes[3].data_ptr<int32_t>();
  const std::vector<Grid> g = grids(beta, is_signed);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for_chunks(C, n, [&](int64_t c, int64_t begin, int64_t end, int64_t) {
    for (int64_t b = begin; b < end; b += kBlock) {
      forward_block(src + b, dst + b, g[c], levels, ptrs.shifted(b), std::min(kBlock, end - b));
    }
  });
  return {out, codes};
}

std::tuple<at::Tensor, at::Tensor> nested_quantize_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& beta,
    const at::Tensor& x_q, const std::vector<at::Tensor>& codes_in, bool is_signed, int64_t levels,
    bool need_grad_x, bool gates) {
  const char* op = "nested_quantize_backward";
  const auto [C, n] = channels(x_in, beta, op);
  TORCH_CHECK(0 <= levels && levels <= kMaxLevels, op, ": levels must be in [0, 4], got ", levels);
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat && grad_in.sizes() == x_in.sizes() &&
                  x_q.scalar_type() == at::kFloat && x_q.sizes() == x_in.sizes(),
              op, ": grad and x_q must be float32 of x's shape ", x_in.sizes(), ", got ",
              grad_in.toString(), " ", grad_in.sizes(), " and ", x_q.toString(), " ", x_q.sizes());
  TORCH_CHECK(static_cast<int64_t>(codes_in.size()) == (gates ? levels : 0), op, ": expects ",
              gates ? levels : 0, " code tensors, got ", codes_in.size());
  std::vector<at::Tensor> codes;
  for (size_t l = 0; l < codes_in.size(); ++l) {
    TORCH_CHECK(codes_in[l].scalar_type() == kCodeType[l] && codes_in[l].sizes() == x_in.sizes(),
                op, ": codes of level ", l + 1, " must be ", kCodeType[l], " of x's shape, got ",
                codes_in[l].toString(), " ", codes_in[l].sizes());
    codes.push_back(codes_in[l].contiguous());
  }
  ConstCodes ptrs;
  if (codes.size() >= 1) ptrs.l1 = codes[0].data_ptr<int8_t>();
  if (codes.size() >= 2) ptrs.l2 = codes[1].data_ptr<int8_t>();
  if (codes.size() >= 3) ptrs.l3 = codes[2].data_ptr<int16_t>();
  if (codes.size() >= 4) ptrs.l4 = codes[3].data_ptr<int32_t>();
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous(), xq = x_q.contiguous();
  at::Tensor grad_x = need_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t width = 1 + (gates ? std::min<int64_t>(levels + 1, kMaxLevels) : 0);
  const int64_t per_channel = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(C * per_channel * width);
  const std::vector<Grid> g = grids(beta, is_signed);
  const float *pg = grad.data_ptr<float>(), *px = x.data_ptr<float>(), *pq = xq.data_ptr<float>();
  float* gx = need_grad_x ? grad_x.data_ptr<float>() : nullptr;
  for_chunks(C, n, [&](int64_t c, int64_t begin, int64_t end, int64_t item) {
    double lane[kMaxLevels + 1][kLanes] = {};
    for (int64_t b = begin; b < end; b += kBlock) {
      backward_block(pg + b, px + b, pq + b, g[c], levels, ptrs.shifted(b), gates,
                     gx == nullptr ? nullptr : gx + b, std::min(kBlock, end - b), lane);
    }
    double* acc = partial.data() + item * width;
    for (int64_t w = 0; w < width; ++w) {  // lanes in order
      acc[w] = 0.0;
      for (int j = 0; j < kLanes; ++j) acc[w] += lane[w][j];
    }
  });
  at::Tensor sums = at::zeros({C, width}, x.options().dtype(at::kDouble));
  double* ps = sums.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {  // chunks in order
    for (int64_t k = 0; k < per_channel; ++k) {
      const double* part = partial.data() + (c * per_channel + k) * width;
      for (int64_t w = 0; w < width; ++w) ps[c * width + w] += part[w];
    }
  }
  return {grad_x, sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmsparse, m) {
  m.def("nested_quantize_forward(Tensor x, Tensor beta, bool signed, int levels, bool keep_codes)"
        " -> (Tensor x_q, Tensor[] codes)",
        &nested_quantize_forward);
  m.def("nested_quantize_backward(Tensor grad, Tensor x, Tensor beta, Tensor x_q, Tensor[] codes,"
        " bool signed, int levels, bool grad_x, bool gate_sums) -> (Tensor grad_x, Tensor sums)",
        &nested_quantize_backward);
}
