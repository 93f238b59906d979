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
// Order statistics are exact: a deterministic sample brackets ranks k and k+1, one branch-free sweep
// counts the values below the bracket and collects those inside it, std::nth_element finishes on the
// bracket (on the whole row when the bracket misses). The kernel-axis statistics and the dense
// blocks come first (one sweep over the weight each); then each output channel is handled while it
// is in cache: its filter-axis statistics, its hard N:M selection and S where kept. Results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

struct OrderStats {
  float v_k;   // k-th smallest (1-based)
  float v_k1;  // (k+1)-th smallest
};

// k-th and (k+1)-th smallest of the first `size` values (1 <= k < size); reorders them.
OrderStats select_two(float* values, int64_t size, int64_t k) {
  std::nth_element(values, values + (k - 1), values + size);
  return {values[k - 1], *std::min_element(values + k, values + size)};
}

constexpr int64_t kSampleEvery = 16;      // one sample value per 16 row values
constexpr int64_t kMaxSample = 4096;
constexpr int64_t kMinBracketRow = 2048;  // shorter rows: nth_element on the whole row

inline int64_t sample_size(int64_t len) { return std::min(kMaxSample, len / kSampleEvery); }

// Bounds around rank k of `len` values from `sample` (values drawn evenly from them): 3 standard
// deviations of the sample rank on each side, infinite where the sample runs out. Selection, not
// sorting: the sample is reordered.
template <typename T>
void bracket_bounds(std::vector<T>& sample, int64_t len, int64_t k, T* lo, T* hi) {
  const int64_t n = sample.size();
  const double q = static_cast<double>(k) / len, margin = 3.0 * std::sqrt(n * q * (1.0 - q)) + 2.0;
  const int64_t ilo = static_cast<int64_t>(std::floor(q * n - margin));
  const int64_t ihi = static_cast<int64_t>(std::ceil(q * n + margin));
  *lo = -std::numeric_limits<T>::infinity();
  *hi = std::numeric_limits<T>::infinity();
  if (ilo >= 0) {
    std::nth_element(sample.begin(), sample.begin() + ilo, sample.end());
    *lo = sample[ilo];
  }
  if (ihi < n) {  // after the first selection the ihi-th smallest lies right of ilo
    std::nth_element(sample.begin() + std::max<int64_t>(ilo + 1, 0), sample.begin() + ihi,
                     sample.end());
    *hi = sample[ihi];
  }
}

// The values of a row inside [lo, hi] and the count below lo: enough to find ranks k and k+1 when
// below < k and k + 1 <= below + size.
struct Bracket {
  float lo = 0.0f, hi = 0.0f;
  int64_t below = 0, size = 0;
  std::vector<float> inside;

  // Empty the bracket with room for `count` calls of add() (every call writes one slot and keeps it
  // only when inside); the storage only grows, so reusing a bracket costs no allocation.
  void reset(int64_t count) {
    below = size = 0;
    if (static_cast<int64_t>(inside.size()) < count) inside.resize(count);
  }

  inline void add(float v) {
    below += v < lo;
    inside[size] = v;
    size += (v >= lo) & (v <= hi);
  }

  bool finish(int64_t k, OrderStats* out) {
    const int64_t r = k - below;
    if (r < 1 || r + 1 > size) return false;
    *out = select_two(inside.data(), size, r);
    return true;
  }
};

// k-th and (k+1)-th smallest of |row| (contiguous, length len); `bracket` and `sample` are scratch
// reused across rows.
OrderStats row_stats(const float* row, int64_t len, int64_t k, Bracket& bracket,
                     std::vector<float>& sample) {
  OrderStats stats;
  bracket.reset(len);
  if (len >= kMinBracketRow) {
    const int64_t S = sample_size(len);
    sample.resize(S);
    for (int64_t i = 0; i < S; ++i) sample[i] = std::fabs(row[i * len / S]);
    bracket_bounds(sample, len, k, &bracket.lo, &bracket.hi);
    for (int64_t t = 0; t < len; ++t) bracket.add(std::fabs(row[t]));
    if (bracket.finish(k, &stats)) return stats;
  }
  float* all = bracket.inside.data();
  for (int64_t t = 0; t < len; ++t) all[t] = std::fabs(row[t]);
  return select_two(all, len, k);
}

// Kernel axis: row `pos` is |w[:, :, r, c]| over all O*I weights (stride K in memory). One sweep over
// the weight fills the brackets of every position, per chunk of output channels; chunks are merged.
std::vector<OrderStats> kernel_stats(const float* x, int64_t O, int64_t I, int64_t K, int64_t k) {
  const int64_t len = O * I, S = sample_size(len);
  std::vector<Bracket> brackets(K);
  std::vector<float> sample(S);
  for (int64_t pos = 0; pos < K; ++pos) {
    for (int64_t i = 0; i < S; ++i) sample[i] = std::fabs(x[(i * len / S) * K + pos]);
    bracket_bounds(sample, len, k, &brackets[pos].lo, &brackets[pos].hi);
  }
  const int64_t chunks = std::min<int64_t>(O, 4 * at::get_num_threads());
  std::vector<std::vector<Bracket>> partial(chunks, brackets);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t o0 = O * c / chunks, o1 = O * (c + 1) / chunks;
      std::vector<Bracket>& mine = partial[c];
      for (Bracket& b : mine) b.reset((o1 - o0) * I);
      for (const float* src = x + o0 * I * K; src < x + o1 * I * K; src += K) {
        for (int64_t pos = 0; pos < K; ++pos) mine[pos].add(std::fabs(src[pos]));
      }
    }
  });
  std::vector<OrderStats> stats(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      Bracket& merged = brackets[pos];
      merged.reset(len);
      for (const auto& part : partial) {
        const Bracket& p = part[pos];
        std::copy(p.inside.begin(), p.inside.begin() + p.size, merged.inside.begin() + merged.size);
        merged.below += p.below;
        merged.size += p.size;
      }
      if (merged.finish(k, &stats[pos])) continue;
      for (int64_t t = 0; t < len; ++t) merged.inside[t] = std::fabs(x[t * K + pos]);
      stats[pos] = select_two(merged.inside.data(), len, k);
    }
  });
  return stats;
}

inline float soft_score(float a, const OrderStats& s, float tau) {
  if (a < s.v_k1) return 0.0f;
  const float threshold = 0.5f * (s.v_k + s.v_k1);
  return 1.0f / (1.0f + std::exp(-((a - threshold) / tau)));
}

struct BlockSum {
  double sum;
  int64_t index;
  bool operator<(const BlockSum& other) const {
    return sum < other.sum || (sum == other.sum && index < other.index);
  }
};

// Indices of the `count` smallest block sums in (sum, index) order (0 < count <= sums.size()),
// bracketed like the order statistics: blocks below the bracket are in, blocks above it out, the
// rest of the choice is made among the blocks inside it (among all blocks when the bracket misses).
std::vector<int64_t> smallest_blocks(const std::vector<BlockSum>& sums, int64_t count) {
  const int64_t G = sums.size();
  std::vector<int64_t> chosen;
  chosen.reserve(count);
  if (count == G) {
    for (int64_t b = 0; b < G; ++b) chosen.push_back(b);
    return chosen;
  }
  const int64_t S = sample_size(G);
  std::vector<double> sample(S);
  for (int64_t i = 0; i < S; ++i) sample[i] = sums[i * G / S].sum;
  double lo, hi;
  bracket_bounds(sample, G, count, &lo, &hi);
  std::vector<BlockSum> rest;
  for (const BlockSum& b : sums) {
    if (b.sum < lo) {
      chosen.push_back(b.index);
    } else if (b.sum <= hi) {
      rest.push_back(b);
    }
  }
  const int64_t below = chosen.size();
  if (below > count || below + static_cast<int64_t>(rest.size()) < count) {  // bracket missed
    chosen.clear();
    rest = sums;
  }
  const int64_t r = count - chosen.size();
  if (r > 0) {
    std::nth_element(rest.begin(), rest.begin() + (r - 1), rest.end());
    for (int64_t t = 0; t < r; ++t) chosen.push_back(rest[t].index);
  }
  return chosen;
}

// Per block (numbered like to_blocks), whether it is among the n_dense blocks of smallest L1 norm
// (summed in double); empty when n_dense = 0.
std::vector<uint8_t> dense_blocks(const float* x, int64_t O, int64_t I, int64_t K, int64_t m,
                                  int64_t n_dense) {
  if (n_dense == 0) return {};
  const int64_t L = I * K, groups = I / m, G = O * K * groups;
  std::vector<BlockSum> sums(G);
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> totals(K);
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t g = 0; g < groups; ++g) {
        const float* slab = x + o * L + g * m * K;
        std::fill(totals.begin(), totals.end(), 0.0);
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t pos = 0; pos < K; ++pos) totals[pos] += std::fabs(slab[j * K + pos]);
        }
        for (int64_t pos = 0; pos < K; ++pos) {
          const int64_t index = (o * K + pos) * groups + g;
          sums[index] = {totals[pos], index};
        }
      }
    }
  });
  std::vector<uint8_t> dense(G, 0);
  for (const int64_t block : smallest_blocks(sums, n_dense)) dense[block] = 1;
  return dense;
}

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
  const bool by_kernel_axis = soft && K > 1;
  const std::vector<OrderStats> by_kernel =
      by_kernel_axis ? kernel_stats(x, O, I, K, (m - n) * O * I / m) : std::vector<OrderStats>();
  const std::vector<uint8_t> dense = dense_blocks(x, O, I, K, m, n_dense);
  std::vector<OrderStats> by_filter(soft ? O : 0);
  const float tau_f = static_cast<float>(tau);

  // Per output channel, while it is in cache: filter-axis statistics, then per channel group the
  // m x K slab in memory order and per position the kept weights (all of a dense block, else n
  // passes of "first maximum of what is left"), where S is written.
  std::atomic<bool> finite{true};
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slab(m * K), sample;
    Bracket scratch;
    bool all_finite = true;
    for (int64_t o = begin; o < end; ++o) {
      if (soft) by_filter[o] = row_stats(x + o * L, L, (m - n) * L / m, scratch, sample);
      auto keep = [&](int64_t t, int64_t pos) {
        float value = 1.0f;
        if (soft) {
          const float a = std::fabs(x[t]);
          value += soft_score(a, by_filter[o], tau_f);
          if (by_kernel_axis) value += soft_score(a, by_kernel[pos], tau_f);
        }
        s[t] = value;
      };
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t base = o * L + g * m * K;
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t pos = 0; pos < K; ++pos) {
            const float a = std::fabs(x[base + j * K + pos]);
            all_finite &= a <= std::numeric_limits<float>::max();  // false for NaN and inf
            slab[pos * m + j] = a;
          }
        }
        for (int64_t pos = 0; pos < K; ++pos) {
          if (!dense.empty() && dense[(o * K + pos) * groups + g]) {
            for (int64_t j = 0; j < m; ++j) keep(base + j * K + pos, pos);
            continue;
          }
          float* block = slab.data() + pos * m;
          for (int64_t t = 0; t < n; ++t) {
            const int64_t j = std::max_element(block, block + m) - block;
            keep(base + j * K + pos, pos);
            block[j] = -1.0f;
          }
        }
      }
    }
    if (!all_finite) finite = false;
  });
  TORCH_CHECK_VALUE(finite, "nm_mask: weight holds NaN or inf");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmsparse, m) {
  m.def("nm_mask(Tensor weight, int n, int m, int n_dense, float tau, bool soft) -> Tensor",
        &nm_mask);
}
