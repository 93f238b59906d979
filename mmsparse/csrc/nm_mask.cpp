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
// is in cache: its filter-axis statistics, its hard N:M selection and S (zeros included) written
// straight into the output. Results do not depend on the number of threads.
//
// The bracket sweeps, which are most of the work, run 8 values per AVX2 instruction where the CPU
// has AVX2 (a compare-and-count, a movemask and a scalar append only for the few values inside the
// bracket), else a scalar loop; both collect the same values in the same order, so the results are
// identical. Scratch storage is left uninitialised (every slot read was written first).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
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
constexpr int64_t kMinBracketRow = 512;  // shorter rows: nth_element on the whole row

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

std::atomic<bool> force_portable{false};  // tests run the scalar sweeps on AVX2 machines too

bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok && !force_portable.load();
}

// Which sweep runs ("avx2" or "portable"); `portable` true forces the scalar loops (tests).
std::string nm_mask_isa(c10::optional<bool> portable) {
  if (portable.has_value()) force_portable.store(*portable);
  return use_avx2() ? "avx2" : "portable";
}

// The values of a row inside [lo, hi] and the count below lo: enough to find ranks k and k+1 when
// below < k and k + 1 <= below + size.
struct Bracket {
  float lo = 0.0f, hi = 0.0f;
  int64_t below = 0, size = 0, capacity = 0;
  std::unique_ptr<float[]> inside;  // uninitialised; the first `size` slots are the values

  // Empty the bracket with room for `count` values; the storage only grows, so reusing a bracket
  // costs no allocation.
  void reset(int64_t count) {
    below = size = 0;
    if (capacity < count) {
      inside.reset(new float[count]);
      capacity = count;
    }
  }

  inline void add(float v) {
    below += v < lo;
    if ((v >= lo) & (v <= hi)) inside[size++] = v;
  }

  bool finish(int64_t k, OrderStats* out) {
    const int64_t r = k - below;
    if (r < 1 || r + 1 > size) return false;
    *out = select_two(inside.get(), size, r);
    return true;
  }
};

constexpr float kMaxFloat = std::numeric_limits<float>::max();

// Brackets of the rows of an interleaved run: value t of [src, src + len) (|.| taken) belongs to
// brackets[t % period], where src starts a period (period 1: one contiguous row). Returns whether
// every value was finite.
bool sweep_portable(const float* src, int64_t len, int64_t period, Bracket* brackets) {
  bool finite = true;
  for (int64_t t = 0; t < len;) {
    for (int64_t pos = 0; pos < period && t < len; ++pos, ++t) {
      const float a = std::fabs(src[t]);
      finite &= a <= kMaxFloat;  // false for NaN and inf
      brackets[pos].add(a);
    }
  }
  return finite;
}

constexpr int64_t kMaxPeriod = 64;  // kernel positions the interleaved AVX2 sweep takes (8 x 8)

// The same with 8 values per step: lane l of a step starting at phase
// r = t % period belongs to bracket (r + l) % period; per-phase bound vectors and counters, the
// values inside a bracket appended in memory order (as the scalar loop does).
__attribute__((target("avx2"))) bool sweep_avx2(const float* src, int64_t len, int64_t period,
                                                 Bracket* brackets) {
  alignas(32) float lo[kMaxPeriod * 8], hi[kMaxPeriod * 8];
  alignas(32) int32_t counts[kMaxPeriod * 8] = {};
  for (int64_t r = 0; r < period; ++r) {
    for (int64_t l = 0; l < 8; ++l) {
      lo[r * 8 + l] = brackets[(r + l) % period].lo;
      hi[r * 8 + l] = brackets[(r + l) % period].hi;
    }
  }
  const __m256 sign = _mm256_set1_ps(-0.0f), max = _mm256_set1_ps(kMaxFloat);
  __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  alignas(32) float lanes[8];
  int64_t t = 0, r = 0;
  for (; t + 8 <= len; t += 8) {
    const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(src + t));
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(v, max, _CMP_LE_OQ));
    const __m256 vlo = _mm256_load_ps(lo + r * 8), vhi = _mm256_load_ps(hi + r * 8);
    __m256i* count = reinterpret_cast<__m256i*>(counts + r * 8);
    _mm256_store_si256(count, _mm256_sub_epi32(_mm256_load_si256(count),
                                               _mm256_castps_si256(_mm256_cmp_ps(v, vlo, _CMP_LT_OQ))));
    int bits = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ),
                                                _mm256_cmp_ps(v, vhi, _CMP_LE_OQ)));
    if (bits) {
      _mm256_store_ps(lanes, v);
      for (; bits; bits &= bits - 1) {
        const int l = __builtin_ctz(bits);
        Bracket& b = brackets[(r + l) % period];
        b.inside[b.size++] = lanes[l];
      }
    }
    r = (r + 8) % period;
  }
  for (int64_t q = 0; q < period; ++q) {
    for (int64_t l = 0; l < 8; ++l) brackets[(q + l) % period].below += counts[q * 8 + l];
  }
  bool all_finite = _mm256_movemask_ps(finite) == 0xff;
  for (; t < len; ++t, r = (r + 1) % period) {
    const float a = std::fabs(src[t]);
    all_finite &= a <= kMaxFloat;
    brackets[r].add(a);
  }
  return all_finite;
}

// Add |src[t]| to brackets[t % period] for t < len (src starts a period); whether all were finite.
bool sweep(const float* src, int64_t len, int64_t period, Bracket* brackets) {
  // the AVX2 sweeps count in int32 per lane: at most len / 8 + 1 values each
  if (use_avx2() && len / 8 < std::numeric_limits<int32_t>::max()) {
    if (period <= kMaxPeriod) return sweep_avx2(src, len, period, brackets);
  }
  return sweep_portable(src, len, period, brackets);
}

// Whether every value of x[0, len) is finite (a parallel read-only pass).
bool all_finite(const float* x, int64_t len) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, len, 1 << 16, [&](int64_t begin, int64_t end) {
    uint32_t bad = 0;
    for (int64_t t = begin; t < end; ++t) bad |= !(std::fabs(x[t]) <= kMaxFloat);
    if (bad) finite = false;
  });
  return finite;
}

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
    sweep(row, len, 1, &bracket);
    if (bracket.finish(k, &stats)) return stats;
  }
  float* all = bracket.inside.get();
  for (int64_t t = 0; t < len; ++t) all[t] = std::fabs(row[t]);
  return select_two(all, len, k);
}

// Kernel axis: row `pos` is |w[:, :, r, c]| over all O*I weights (stride K in memory). One sweep over
// the weight fills the brackets of every position, per chunk of output channels; chunks are merged.
// Sets *finite to whether every weight is finite (the statistics are empty when not).
std::vector<OrderStats> kernel_stats(const float* x, int64_t O, int64_t I, int64_t K, int64_t k,
                                     bool* finite) {
  const int64_t len = O * I, S = sample_size(len);
  std::vector<Bracket> brackets(K);
  std::vector<float> sample(S);
  for (int64_t pos = 0; pos < K; ++pos) {
    for (int64_t i = 0; i < S; ++i) sample[i] = std::fabs(x[(i * len / S) * K + pos]);
    bracket_bounds(sample, len, k, &brackets[pos].lo, &brackets[pos].hi);
  }
  const int64_t chunks = std::min<int64_t>(O, 4 * at::get_num_threads());
  std::vector<std::vector<Bracket>> partial(chunks);
  std::atomic<bool> chunks_finite{true};
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t o0 = O * c / chunks, o1 = O * (c + 1) / chunks;
      std::vector<Bracket>& mine = partial[c];
      mine.resize(K);
      for (int64_t pos = 0; pos < K; ++pos) {
        mine[pos].lo = brackets[pos].lo;
        mine[pos].hi = brackets[pos].hi;
        mine[pos].reset((o1 - o0) * I);
      }
      if (!sweep(x + o0 * I * K, (o1 - o0) * I * K, K, mine.data())) chunks_finite = false;
    }
  });
  *finite = chunks_finite;
  if (!*finite) return {};
  std::vector<OrderStats> stats(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      Bracket& merged = brackets[pos];
      merged.reset(len);
      for (const auto& part : partial) {
        const Bracket& p = part[pos];
        std::copy(p.inside.get(), p.inside.get() + p.size, merged.inside.get() + merged.size);
        merged.below += p.below;
        merged.size += p.size;
      }
      if (merged.finish(k, &stats[pos])) continue;
      for (int64_t t = 0; t < len; ++t) merged.inside[t] = std::fabs(x[t * K + pos]);
      stats[pos] = select_two(merged.inside.get(), len, k);
    }
  });
  return stats;
}

// Bit j set for the n largest of v_j = |src[j * stride]|, j < m (n passes of "first maximum of what
// is left": the lower j wins ties).
uint32_t select_portable(const float* src, int64_t stride, int64_t m, int64_t n) {
  float block[32];
  for (int64_t j = 0; j < m; ++j) block[j] = std::fabs(src[j * stride]);
  uint32_t bits = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = std::max_element(block, block + m) - block;
    bits |= 1u << j;
    block[j] = -1.0f;
  }
  return bits;
}

// select_portable for 8 lanes at once: lane l reads src[j * stride + l]. A strict "greater than"
// in ascending j keeps the first maximum; chosen values are replaced by -1 in later passes, as the
// scalar loop does, so the bits are the same.
__attribute__((target("avx2"))) void select_lanes_avx2(const float* src, int64_t stride, int64_t m,
                                                        int64_t n, uint32_t* chosen) {
  const __m256 sign = _mm256_set1_ps(-0.0f), taken_value = _mm256_set1_ps(-1.0f);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i bits = _mm256_setzero_si256();
  for (int64_t t = 0; t < n; ++t) {
    __m256 best = taken_value;
    __m256i index = _mm256_setzero_si256();
    for (int64_t j = 0; j < m; ++j) {
      __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(src + j * stride));
      const __m256i bit = _mm256_set1_epi32(static_cast<int32_t>(1u << j));
      const __m256i taken = _mm256_cmpeq_epi32(_mm256_and_si256(bits, bit), bit);
      v = _mm256_blendv_ps(v, taken_value, _mm256_castsi256_ps(taken));
      const __m256 greater = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
      best = _mm256_blendv_ps(best, v, greater);
      index = _mm256_blendv_epi8(index, _mm256_set1_epi32(static_cast<int32_t>(j)),
                                 _mm256_castps_si256(greater));
    }
    bits = _mm256_or_si256(bits, _mm256_sllv_epi32(one, index));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(chosen), bits);
}

// chosen[g * K + pos]: the kept channels (bits j) of every block of one output channel's row
// (row[g * m * K + j * K + pos]). With AVX2, 8 blocks per step: 8 positions of a group when K >= 8
// (the last step of a group overlapping the previous one), else 8 consecutive blocks gathered
// into `lanes` (m x 8 values); the rest one block at a time.
void select_row(const float* row, int64_t groups, int64_t m, int64_t K, int64_t n, bool avx2,
                uint32_t* chosen, float* lanes) {
  const int64_t blocks = groups * K;
  if (avx2 && K >= 8) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* slab = row + g * m * K;
      for (int64_t p0 = 0; p0 < K; p0 += 8) {
        const int64_t p = std::min(p0, K - 8);
        select_lanes_avx2(slab + p, K, m, n, chosen + g * K + p);
      }
    }
    return;
  }
  int64_t q0 = 0;
  if (avx2 && blocks >= 8) {
    for (; q0 < blocks; q0 += 8) {
      const int64_t q = std::min(q0, blocks - 8);
      for (int64_t l = 0; l < 8; ++l) {
        const float* block = row + ((q + l) / K) * m * K + (q + l) % K;
        for (int64_t j = 0; j < m; ++j) lanes[j * 8 + l] = block[j * K];
      }
      select_lanes_avx2(lanes, 8, m, n, chosen + q);
    }
    return;
  }
  for (int64_t q = 0; q < blocks; ++q) {
    chosen[q] = select_portable(row + (q / K) * m * K + q % K, K, m, n);
  }
}

inline float soft_score(float a, const OrderStats& s, float tau) {
  if (a < s.v_k1) return 0.0f;
  const float threshold = 0.5f * (s.v_k + s.v_k1);
  return 1.0f / (1.0f + std::exp(-((a - threshold) / tau)));
}

// The slab of S as if every weight of it were kept, 8 values per step: 1 where |w| is below both
// axes' v_(k+1) (both soft scores are 0, as in soft_score), and the offsets of the other values in
// `fix` for the scalar soft_score (as are the last len % 8 values), so every value written equals the
// scalar path's. k_tab[r * 8 + l] is the kernel-axis v_(k+1) of lane l of a step starting at
// position r (nullptr without a kernel axis). Returns the number of offsets.
__attribute__((target("avx2"))) int64_t kept_slab_avx2(const float* x, float* s, int64_t len,
                                                        int64_t K, float filter_k1,
                                                        const float* k_tab, int32_t* fix) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 vf = _mm256_set1_ps(filter_k1);
  int64_t count = 0, t = 0, r = 0;
  for (; t + 8 <= len; t += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + t));
    __m256 scored = _mm256_cmp_ps(a, vf, _CMP_GE_OQ);
    if (k_tab != nullptr) {
      scored = _mm256_or_ps(scored, _mm256_cmp_ps(a, _mm256_loadu_ps(k_tab + r * 8), _CMP_GE_OQ));
    }
    _mm256_storeu_ps(s + t, one);
    for (int bits = _mm256_movemask_ps(scored); bits; bits &= bits - 1) {
      fix[count++] = static_cast<int32_t>(t + __builtin_ctz(bits));
    }
    r = (r + 8) % K;
  }
  for (; t < len; ++t) fix[count++] = static_cast<int32_t>(t);
  return count;
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

// totals[pos] = sum over j < m of |slab[j * K + pos]| in double, j ascending (as the scalar loop).
void block_sums_portable(const float* slab, int64_t m, int64_t K, double* totals) {
  std::fill(totals, totals + K, 0.0);
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t pos = 0; pos < K; ++pos) totals[pos] += std::fabs(slab[j * K + pos]);
  }
}

// The same, 4 positions per AVX2 step (the same additions in the same order: identical sums).
__attribute__((target("avx2"))) void block_sums_avx2(const float* slab, int64_t m, int64_t K,
                                                      double* totals) {
  const __m128 sign = _mm_set1_ps(-0.0f);
  int64_t pos = 0;
  for (; pos + 4 <= K; pos += 4) {
    __m256d acc = _mm256_setzero_pd();
    for (int64_t j = 0; j < m; ++j) {
      acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm_andnot_ps(sign, _mm_loadu_ps(slab + j * K + pos))));
    }
    _mm256_storeu_pd(totals + pos, acc);
  }
  for (; pos < K; ++pos) {
    double acc = 0.0;
    for (int64_t j = 0; j < m; ++j) acc += std::fabs(slab[j * K + pos]);
    totals[pos] = acc;
  }
}

// Per block (numbered like to_blocks), whether it is among the n_dense blocks of smallest L1 norm
// (summed in double); empty when n_dense = 0. Sets *finite to whether every weight is finite (a
// block's sum of |w| in double is finite exactly when its weights are).
std::vector<uint8_t> dense_blocks(const float* x, int64_t O, int64_t I, int64_t K, int64_t m,
                                  int64_t n_dense, bool* finite) {
  if (n_dense == 0) return {};
  const int64_t L = I * K, groups = I / m, G = O * K * groups;
  const bool avx2 = use_avx2();
  std::vector<BlockSum> sums(G);
  std::atomic<bool> sums_finite{true};
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> totals(K);
    bool mine = true;
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t g = 0; g < groups; ++g) {
        const float* slab = x + o * L + g * m * K;
        if (avx2) {
          block_sums_avx2(slab, m, K, totals.data());
        } else {
          block_sums_portable(slab, m, K, totals.data());
        }
        for (int64_t pos = 0; pos < K; ++pos) {
          const int64_t index = (o * K + pos) * groups + g;
          mine &= std::isfinite(totals[pos]);
          sums[index] = {totals[pos], index};
        }
      }
    }
    if (!mine) sums_finite = false;
  });
  *finite = sums_finite;
  if (!*finite) return {};
  std::vector<uint8_t> dense(G, 0);
  for (const int64_t block : smallest_blocks(sums, n_dense)) dense[block] = 1;
  return dense;
}

// S (soft) or the hard mask H of `weight`, written into `out` (same shape, contiguous float32; every
// element is written). A non-finite weight is refused before `out` is touched.
void nm_mask_into(const at::Tensor& weight, int64_t n, int64_t m, int64_t n_dense, double tau,
                  bool soft, at::Tensor out) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
              "nm_mask: expects a float32 CPU tensor, got ", weight.toString());
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 4,
              "nm_mask: expects a linear (2-D) or conv (4-D) weight, got ", weight.dim(), "-D");
  TORCH_CHECK(1 <= n && n < m, "nm_mask: invalid N:M pattern ", n, ":", m);
  TORCH_CHECK(m <= 32, "nm_mask: blocks of at most 32 channels, got M=", m);
  TORCH_CHECK(tau > 0, "nm_mask: tau must be > 0, got ", tau);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == weight.sizes(),
              "nm_mask: out must be a contiguous float32 CPU tensor of the weight's shape ",
              weight.sizes(), ", got ", out.toString(), " ", out.sizes());
  const at::Tensor w = weight.contiguous();
  TORCH_CHECK(w.data_ptr() != out.data_ptr(), "nm_mask: out must not be the weight");
  const int64_t O = w.size(0), I = w.size(1);
  const int64_t K = w.dim() == 4 ? w.size(2) * w.size(3) : 1;
  TORCH_CHECK(I % m == 0, "nm_mask: ", I, " input channels not divisible by M=", m);
  const int64_t L = I * K, groups = I / m, G = O * K * groups;
  TORCH_CHECK(0 <= n_dense && n_dense <= G, "nm_mask: n_dense=", n_dense, " outside [0, ", G, "]");

  const float* x = w.data_ptr<float>();
  float* s = out.data_ptr<float>();
  // the finiteness check rides on the first sweep over all weights, or is a pass of its own
  bool finite = true, checked = false;
  const bool by_kernel_axis = soft && K > 1;
  std::vector<OrderStats> by_kernel;
  if (by_kernel_axis) {
    by_kernel = kernel_stats(x, O, I, K, (m - n) * O * I / m, &finite);
    checked = true;
  }
  std::vector<uint8_t> dense;
  if (finite && n_dense > 0) {
    dense = dense_blocks(x, O, I, K, m, n_dense, &finite);
    checked = true;
  }
  if (!checked) finite = all_finite(x, O * L);
  TORCH_CHECK_VALUE(finite, "nm_mask: weight holds NaN or inf");
  std::vector<OrderStats> by_filter(soft ? O : 0);
  const float tau_f = static_cast<float>(tau);

  // Per output channel, while it is in cache: filter-axis statistics, the kept channels of every
  // block (select_row), then per channel group the m x K slab of S: zeroed, then written where
  // kept (all of a dense block, else the selected channels).
  const bool avx2 = use_avx2();
  std::vector<float> k_tab;  // kernel-axis v_(k+1) per (step phase, lane), see kept_slab_avx2
  for (int64_t r = 0; by_kernel_axis && r < K; ++r) {
    for (int64_t l = 0; l < 8; ++l) k_tab.push_back(by_kernel[(r + l) % K].v_k1);
  }
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sample, lanes(m * 8);
    std::vector<uint32_t> chosen(groups * K);
    std::vector<int32_t> fix(m * K);
    Bracket scratch;
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
      select_row(x + o * L, groups, m, K, n, avx2, chosen.data(), lanes.data());
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t base = o * L + g * m * K;
        const uint8_t* dense_at = dense.empty() ? nullptr : dense.data() + o * K * groups + g;
        bool any_dense = false;
        for (int64_t pos = 0; dense_at != nullptr && pos < K; ++pos) any_dense |= dense_at[pos * groups];
        if (soft && avx2 && any_dense) {
          // S of the whole slab as if kept (vectorised), then the unselected weights of the
          // N:M blocks set to 0
          const int64_t count = kept_slab_avx2(x + base, s + base, m * K, K, by_filter[o].v_k1,
                                               by_kernel_axis ? k_tab.data() : nullptr, fix.data());
          for (int64_t i = 0; i < count; ++i) keep(base + fix[i], fix[i] % K);
          for (int64_t pos = 0; pos < K; ++pos) {
            if (dense_at[pos * groups]) continue;
            const uint32_t bits = chosen[g * K + pos];
            for (int64_t j = 0; j < m; ++j) {
              if (!(bits >> j & 1u)) s[base + j * K + pos] = 0.0f;
            }
          }
          continue;
        }
        std::fill(s + base, s + base + m * K, 0.0f);
        for (int64_t pos = 0; pos < K; ++pos) {
          if (!dense.empty() && dense[(o * K + pos) * groups + g]) {
            for (int64_t j = 0; j < m; ++j) keep(base + j * K + pos, pos);
            continue;
          }
          for (uint32_t bits = chosen[g * K + pos]; bits; bits &= bits - 1) {
            keep(base + __builtin_ctz(bits) * K + pos, pos);
          }
        }
      }
    }
  });
}

at::Tensor nm_mask(const at::Tensor& weight, int64_t n, int64_t m, int64_t n_dense, double tau,
                   bool soft) {
  at::Tensor out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  nm_mask_into(weight, n, m, n_dense, tau, soft, out);
  return out;
}

// grad += decay * weight * (1 - clamp(mask, 0, 1)), the SR-STE decay in one pass: the arithmetic of
// torch's grad.addcmul_(weight, 1 - mask.clamp(0, 1), value=decay) (multiplications left to right,
// no fused multiply-add), without its temporaries.
void nm_decay_(at::Tensor grad, const at::Tensor& weight, const at::Tensor& mask, double decay) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&grad, &weight, &mask}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "nm_decay_: expects contiguous float32 CPU tensors, got ", t->toString());
  }
  TORCH_CHECK(grad.sizes() == weight.sizes() && mask.sizes() == weight.sizes(),
              "nm_decay_: grad ", grad.sizes(), ", weight ", weight.sizes(), " and mask ",
              mask.sizes(), " differ in shape");
  float* g = grad.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* s = mask.data_ptr<float>();
  const float d = static_cast<float>(decay);
  at::parallel_for(0, grad.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float keep = 1.0f - std::min(std::max(s[t], 0.0f), 1.0f);
      g[t] = g[t] + d * w[t] * keep;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmsparse, m) {
  m.def("nm_mask(Tensor weight, int n, int m, int n_dense, float tau, bool soft) -> Tensor",
        &nm_mask);
  m.def("nm_mask_into(Tensor weight, int n, int m, int n_dense, float tau, bool soft, "
        "Tensor(a!) out) -> ()", &nm_mask_into);
  m.def("nm_decay_(Tensor(a!) grad, Tensor weight, Tensor mask, float decay) -> ()", &nm_decay_);
  m.def("nm_mask_isa(bool? portable=None) -> str", &nm_mask_isa);
}
