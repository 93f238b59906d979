// CGMQ's nested residual fake-quantizer on CPU: one sweep forward (x_q over the switched-on levels
// and, for the gate gradients, the integer codes of the residual levels), one sweep backward (the
// straight-through gradient to x and the per-channel sums behind the beta and gate gradients).
// The tensor-op version makes ~20 elementwise passes over the tensor each way.
//
// Same definition as _NestedQuantize in mmsparse/cgmq/quantizer.py (SPEC section 2), element by
// element with the same float32 operations in the same order, so x_q is bit-identical to it:
//   s_0 = span / 3, s_l = s_(l-1) / (2^(2^l) + 1)  (span = 2 beta signed, beta unsigned)
//   x_c = clip(x, alpha, beta), q_0 = clamp(R(x_c / s_0)), x_q = q_0 s_0,
//   q_l = clamp(R((x_c - x_q) / s_l), -h_l, h_l), x_q = x_q + q_l s_l  for l = 1..levels,
// R(v) = copysign(ceil(|v| - 0.5), v) (round half toward zero), q_0 in [-1, 1] (signed) or [0, 3],
// h_l = 2, 8, 128, 32768. Codes are kept as int8, int8, int16, int32 (levels 1..4).
// Backward, per channel (one channel for a per-tensor beta), in double:
//   sums[c][0] = sum grad * x_q - grad_in * x   (grad_beta = sums[c][0] / beta_c),
//   sums[c][l] = sum grad * q_l for l = 1..levels and the first switched-off level (its code
//                recomputed from x_c - x_q), when the gate sums are asked for;
// grad_in = grad * [x_c == x]. Reductions run over fixed chunks of a channel (lanes in a fixed
// order inside a chunk, chunks in order), so results do not depend on the number of threads.
//
// The loops vectorize under GCC's default -ftrapping-math on baseline x86-64 (SSE2): no float
// arithmetic under a condition (GCC would keep branches, which mispredict on data), ceil through a
// round-to-nearest constant (no SSE4.1 needed), masks as bit operations, sums in fixed lanes; on
// x86-64 Linux the block functions also get an AVX2 clone, picked at load time. setup.py builds
// with -ffp-contract=off, so q * s + x_q is never contracted into an FMA (which would break the
// bit-identity) whatever the target.
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

constexpr int kMaxLevels = 4;            // residual levels: 4, 8, 16, 32 bits
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

// A level's scale and code bounds.
struct Level {
  float s, lo, hi;
};

// One channel's clip bounds and levels.
struct Grid {
  float lo, hi;
  Level level[kMaxLevels + 1];

  Grid(float beta, bool is_signed) {
    static constexpr float kDivisor[kMaxLevels + 1] = {3.0f, 5.0f, 17.0f, 257.0f, 65537.0f};
    static constexpr float kHalf[kMaxLevels + 1] = {0.0f, 2.0f, 8.0f, 128.0f, 32768.0f};
    lo = is_signed ? -beta : 0.0f;
    hi = beta;
    float s = (is_signed ? 2.0f * beta : beta) / kDivisor[0];
    level[0] = {s, is_signed ? -1.0f : 0.0f, is_signed ? 1.0f : 3.0f};
    for (int l = 1; l <= kMaxLevels; ++l) {
      s = s / kDivisor[l];
      level[l] = {s, -kHalf[l], kHalf[l]};
    }
  }
};

// min(max(v, lo), hi) with torch.clamp's semantics (NaN propagates).
inline float clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// v where c holds, +0 elsewhere (a bit mask: no branch, no float operation under a condition).
inline float keep_if(bool c, float v) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) & (0u - static_cast<uint32_t>(c)));
}

// copysign(ceil(|v| - 0.5), v), exact while |v| < 2^22: r rounds t = |v| - 0.5 >= -0.5 to the
// nearest integer (t + 1.5 * 2^23 lies in [2^23, 2^24), where the floats are the integers) and
// ceil(t) = r + [r < t]; the sign of a zero does not matter under copysign. Larger |v| give at
// least 2^22 - 1, which every code clamp maps to its bound as it does ceil's value; NaN and inf
// propagate.
inline float round_half_toward_zero(float v) {
  constexpr float kMagic = 12582912.0f;
  const float t = std::fabs(v) - 0.5f;
  const float r = (t + kMagic) - kMagic;
  return std::copysign(r + static_cast<float>(r < t), v);
}

inline float code(float residual, Level l) {
  return clamp(round_half_toward_zero(residual / l.s), l.lo, l.hi);
}

// Level L over a block: x_q += q_L s_L, codes stored when not null (NaN: code 0, not UB).
template <int L>
inline void residual_level(const float* __restrict xc, float* __restrict xq, Level l,
                           CodeT<L>* __restrict codes, int64_t n) {
  if (codes == nullptr) {
    for (int64_t i = 0; i < n; ++i) xq[i] = xq[i] + code(xc[i] - xq[i], l) * l.s;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float q = code(xc[i] - xq[i], l);
    xq[i] = xq[i] + q * l.s;
    codes[i] = static_cast<CodeT<L>>(keep_if(q == q, q));
  }
}

MMSPARSE_VECTOR_CLONES
void forward_block(const float* x, float* out, const Grid& g, int64_t levels, const Codes& codes,
                   int64_t n) {
  float xc[kBlock], xq[kBlock];
  const float lo = g.lo, hi = g.hi;
  const Level l0 = g.level[0];
  for (int64_t i = 0; i < n; ++i) {
    xc[i] = clamp(x[i], lo, hi);
    xq[i] = code(xc[i], l0) * l0.s;
  }
  if (levels >= 1) residual_level<1>(xc, xq, g.level[1], codes.l1, n);
  if (levels >= 2) residual_level<2>(xc, xq, g.level[2], codes.l2, n);
  if (levels >= 3) residual_level<3>(xc, xq, g.level[3], codes.l3, n);
  if (levels >= 4) residual_level<4>(xc, xq, g.level[4], codes.l4, n);
  std::copy(xq, xq + n, out);
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
  if (levels < kMaxLevels) {
    const Level off = g.level[levels + 1];
    for (int64_t i = 0; i < n; ++i) {
      t[i] = static_cast<double>(grad[i]) * code(xc[i] - xq[i], off);
    }
    add_lanes(t, n, lane[levels + 1]);
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
