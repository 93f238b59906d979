// N:M masks on CPU: the hard N:M mask with dense-preserved blocks (SR-STE, one-shot, MaxQ's H) and
// MaxQ's multi-axis soft mask S = H * (1 + q_filter + q_kernel), from the raw weight in a few sweeps.
//
// Same definition and tie rules as the tensor implementation in mmsparse/core/masks.py and
// mmsparse/maxq/mask.py (SPEC section 1), on magnitudes |w|:
//  - a block is M consecutive input channels at a fixed (output channel, kernel position); blocks are
//    numbered (o, r, c, channel group) like mmsparse.core.patterns.to_blocks;
//  - the N largest |w| of a block stay, the lower channel index winning ties;
//  - the n_dense blocks of smallest L1 norm (summed in double) stay fully dense, the lower block
//    index winning ties;
//  - q_a = 1[|w| >= v_(k+1)] * sigmoid((|w| - (v_k + v_(k+1)) / 2) / tau), v_j the j-th smallest
//    magnitude of the row along axis a, k = floor((M - N) / M * row length).
// Order statistics are exact: a deterministic sample brackets ranks k and k+1, one sweep counts the
// values below the bracket and collects those inside it, std::nth_element finishes on the bracket
// (the whole row when the bracket misses). Soft scores are computed only where H = 1. Results do not
// depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

struct OrderStats {
  float v_k;   // k-th smallest (1-based)
  float v_k1;  // (k+1)-th smallest
};

// k-th and (k+1)-th smallest of values (1 <= k < values.size()); reorders values.
OrderStats select_two(std::vector<float>& values, int64_t k) {
  std::nth_element(values.begin(), values.begin() + (k - 1), values.end());
  return {values[k - 1], *std::min_element(values.begin() + k, values.end())};
}

// Values of one row inside [lo, hi] and the count below lo: enough to find ranks k and k+1 when
// below < k and k + 1 <= below + inside.size().
struct Bracket {
  float lo = -std::numeric_limits<float>::infinity();
  float hi = std::numeric_limits<float>::infinity();
  int64_t below = 0;
  std::vector<float> inside;

  // Bounds from `sample` (values drawn evenly from a row of `len`), 3 standard deviations of the
  // sample rank around the target rank.
  void set_bounds(std::vector<float>& sample, int64_t len, int64_t k) {
    std::sort(sample.begin(), sample.end());
    const double n = static_cast<double>(sample.size()), q = static_cast<double>(k) / len;
    const double margin = 3.0 * std::sqrt(n * q * (1.0 - q)) + 2.0;
    const int64_t ilo = static_cast<int64_t>(std::floor(q * n - margin));
    const int64_t ihi = static_cast<int64_t>(std::ceil(q * n + margin));
    if (ilo >= 0) lo = sample[ilo];
    if (ihi < static_cast<int64_t>(sample.size())) hi = sample[ihi];
  }

  inline void add(float v) {
    if (v < lo) {
      ++below;
    } else if (v <= hi) {
      inside.push_back(v);
    }
  }

  bool finish(int64_t k, OrderStats* out) {
    const int64_t r = k - below;
    if (r < 1 || r + 1 > static_cast<int64_t>(inside.size())) return false;
    *out = select_two(inside, r);
    return true;
  }
};

constexpr int64_t kSampleEvery = 16;   // one sample value per 16 row values
constexpr int64_t kMaxSample = 4096;
constexpr int64_t kMinBracketRow = 2048;  // shorter rows: nth_element on the whole row

inline int64_t sample_size(int64_t len) { return std::min(kMaxSample, len / kSampleEvery); }

inline float soft_score(float x, const OrderStats& s, float tau) {
  if (x < s.v_k1) return 0.0f;
  const float threshold = 0.5f * (s.v_k + s.v_k1);
  return 1.0f / (1.0f + std::exp(-((x - threshold) / tau)));
}

// Filter axis: row o is the contiguous |w[o, :, :, :]| of length L.
std::vector<OrderStats> filter_stats(const float* x, int64_t O, int64_t L, int64_t k) {
  std::vector<OrderStats> stats(O);
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(L), sample;
    for (int64_t o = begin; o < end; ++o) {
      const float* src = x + o * L;
      if (L >= kMinBracketRow) {
        const int64_t S = sample_size(L);
        sample.resize(S);
        for (int64_t i = 0; i < S; ++i) sample[i] = std::fabs(src[i * L / S]);
        Bracket bracket;
        bracket.set_bounds(sample, L, k);
        bracket.inside.reserve(L / 8);
        for (int64_t t = 0; t < L; ++t) bracket.add(std::fabs(src[t]));
        if (bracket.finish(k, &stats[o])) continue;
      }
      for (int64_t t = 0; t < L; ++t) row[t] = std::fabs(src[t]);
      stats[o] = select_two(row, k);
    }
  });
  return stats;
}

// Kernel axis: row `pos` is |w[:, :, r, c]| over all O*I weights (stride K in memory). One sweep over
// the weight fills the brackets of every position; chunks of output channels are merged in order.
std::vector<OrderStats> kernel_stats(const float* x, int64_t O, int64_t I, int64_t K, int64_t k) {
  const int64_t len = O * I, S = sample_size(len);
  std::vector<OrderStats> stats(K);
  std::vector<Bracket> brackets(K);
  std::vector<float> sample(S);
  for (int64_t pos = 0; pos < K; ++pos) {
    for (int64_t i = 0; i < S; ++i) sample[i] = std::fabs(x[(i * len / S) * K + pos]);
    brackets[pos].set_bounds(sample, len, k);
  }
  const int64_t chunks = std::min<int64_t>(O, 4 * at::get_num_threads());
  std::vector<std::vector<Bracket>> partial(chunks, brackets);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      std::vector<Bracket>& mine = partial[c];
      for (int64_t pos = 0; pos < K; ++pos) mine[pos].inside.reserve(len / chunks / 16);
      const float* src = x + (O * c / chunks) * I * K;
      const float* stop = x + (O * (c + 1) / chunks) * I * K;
      for (; src < stop; src += K) {
        for (int64_t pos = 0; pos < K; ++pos) mine[pos].add(std::fabs(src[pos]));
      }
    }
  });
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      Bracket& merged = brackets[pos];
      for (const auto& part : partial) {
        merged.below += part[pos].below;
        merged.inside.insert(merged.inside.end(), part[pos].inside.begin(), part[pos].inside.end());
      }
      if (merged.finish(k, &stats[pos])) continue;
      std::vector<float> row(len);
      for (int64_t t = 0; t < len; ++t) row[t] = std::fabs(x[t * K + pos]);
      stats[pos] = select_two(row, k);
    }
  });
  return stats;
}

struct BlockSum {
  double sum;
  int64_t index;
  bool operator<(const BlockSum& other) const {
    return sum < other.sum || (sum == other.sum && index < other.index);
  }
};

at::Tensor nm_mask(const at::Tensor& weight, int64_t n, int64_t m, int64_t n_dense, double tau,
                   bool soft) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
              "nm_mask: expects a float32 CPU tensor, got ", weight.toString());
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 4,
              "nm_mask: expects a linear (2-D) or conv (4-D) weight, got ", weight.dim(), "-D");
  TORCH_CHECK(1 <= n && n < m, "nm_mask: invalid N:M pattern ", n, ":", m);
  TORCH_CHECK(tau > 0, "nm_mask: tau must be > 0, got ", tau);
  const at::Tensor w = weight.contiguous();
  const int64_t O = w.size(0), I = w.size(1);
  const int64_t K = w.dim() == 4 ? w.size(2) * w.size(3) : 1;
  TORCH_CHECK(I % m == 0, "nm_mask: ", I, " input channels not divisible by M=", m);
  const int64_t L = I * K, groups = I / m, G = O * K * groups;
  TORCH_CHECK(0 <= n_dense && n_dense <= G, "nm_mask: n_dense=", n_dense, " outside [0, ", G, "]");

  at::Tensor out = at::zeros_like(w);
  const float* x = w.data_ptr<float>();
  float* s = out.data_ptr<float>();
  std::vector<BlockSum> sums(n_dense > 0 ? G : 0);

  // Hard N:M mask: per channel group, the m x K slab is read in memory order; then per position
  // n passes of "first maximum of what is left".
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slab(m * K);
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t base = o * L + g * m * K;
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t pos = 0; pos < K; ++pos) slab[pos * m + j] = std::fabs(x[base + j * K + pos]);
        }
        for (int64_t pos = 0; pos < K; ++pos) {
          float* block = slab.data() + pos * m;
          if (n_dense > 0) {
            double total = 0.0;
            for (int64_t j = 0; j < m; ++j) total += block[j];
            const int64_t index = (o * K + pos) * groups + g;
            sums[index] = {total, index};
          }
          for (int64_t t = 0; t < n; ++t) {
            const int64_t j = std::max_element(block, block + m) - block;
            s[base + j * K + pos] = 1.0f;
            block[j] = -1.0f;
          }
        }
      }
    }
  });

  // The n_dense smallest-L1 blocks become dense.
  if (n_dense > 0) {
    if (n_dense < G) std::nth_element(sums.begin(), sums.begin() + (n_dense - 1), sums.end());
    for (int64_t t = 0; t < n_dense; ++t) {
      const int64_t block = sums[t].index;
      const int64_t g = block % groups, pos = (block / groups) % K, o = block / (groups * K);
      const int64_t base = o * L + g * m * K + pos;
      for (int64_t j = 0; j < m; ++j) s[base + j * K] = 1.0f;
    }
  }
  if (!soft) return out;

  const std::vector<OrderStats> by_filter = filter_stats(x, O, L, (m - n) * L / m);
  const std::vector<OrderStats> by_kernel =
      K > 1 ? kernel_stats(x, O, I, K, (m - n) * O * I / m) : std::vector<OrderStats>();
  const float tau_f = static_cast<float>(tau);
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t t = o * L; t < (o + 1) * L; ++t) {
        if (s[t] == 0.0f) continue;
        const float a = std::fabs(x[t]);
        float value = 1.0f + soft_score(a, by_filter[o], tau_f);
        if (K > 1) value += soft_score(a, by_kernel[t % K], tau_f);
        s[t] = value;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmsparse, m) {
  m.def("nm_mask(Tensor weight, int n, int m, int n_dense, float tau, bool soft) -> Tensor",
        &nm_mask);
}
