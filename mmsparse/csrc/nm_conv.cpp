// Sparse-weight CPU inference kernels for folded models: convolution and linear layers whose weight
// is stored as CSR rows of non-zeros (one row per output channel), e.g. an N:M weight (SPEC section
// 0). Used by mmsparse.runtime (packed inference modules); exact: the zeros are skipped, every
// non-zero is multiplied in.
//
// Sparse-LHS x dense-RHS. The input is laid out once per call so that every non-zero (c, r, s) of a
// conv weight is one contiguous AXPY over output positions:
//  - the input is zero-padded and split into its stride x stride phase planes (row parity, column
//    parity for stride 2; only the planes some tap reads are built; stride 1 is one plane, a 1x1
//    stride-1 unpadded conv reads the input tensor itself);
//  - output positions q run over a grid of the plane width Ws (columns >= Wout are garbage, cropped);
//  - tap (c, r, s) reads plane ((r*d) % st, (s*d) % st) of channel c at the constant offset
//    ((r*d) / st) * Ws + (s*d) / st from q, so out[o, q] += w * plane[offset + q].
// A linear layer is the same with the transposed input (K, rows) and offset k * rows.
//
// Work partition: tasks = (image, tile of T output positions, chunk of output channels); within a
// task, input channels are visited in chunks (non-zeros of a row sorted by channel), accumulating in
// the output tile. Tile sizes depend only on the layer shape, never on the thread count, and every
// output element is computed by one task in a fixed order, so results are bit-identical for any
// number of threads. AVX2+FMA micro-kernel (register-blocked accumulators, one fused multiply-add
// per non-zero and 8 outputs) chosen at run time, portable scalar loop otherwise (separate multiply
// and add: the two paths differ in rounding, each is deterministic).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kVec = 8;                 // floats per AVX2 register
constexpr int kMaxVecs = 12;                // accumulators of a tile: at most 12 x 8 = 96 positions
constexpr int64_t kMaxTile = kVec * kMaxVecs;
constexpr int64_t kMinTasks = 32;           // split output channels until there are this many tasks
// Channel chunks: the input a (tile, chunk) reads should fit in L1 (kL1Budget bytes), unless that
// leaves fewer than kMinChunkNonzeros non-zeros per row and chunk; never more than kL2Budget bytes.
constexpr int64_t kL1Budget = 24 * 1024;
constexpr int64_t kL2Budget = 192 * 1024;
constexpr int64_t kMinChunkNonzeros = 32;

std::atomic<bool> force_portable{false};  // tests run the portable loop on AVX2 machines too

bool use_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && !force_portable.load();
}

// Which micro-kernel runs ("avx2" or "portable"); `portable` true forces the portable loop (tests).
std::string nm_kernel_isa(c10::optional<bool> portable) {
  if (portable.has_value()) force_portable.store(*portable);
  return use_avx2_fma() ? "avx2" : "portable";
}

// acc[q] (+)= sum_k vals[k] * panel[offs[k] + q] for q < 8 * JV; `first` starts from `bias`,
// `relu` clamps the result at 0 (NaN stays NaN, as torch.relu).
template <int JV>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* panel, const int64_t* offs,
                                                   const float* vals, int64_t count, float* acc,
                                                   bool first, float bias, bool relu) {
  __m256 a[JV];
  for (int j = 0; j < JV; ++j) a[j] = first ? _mm256_set1_ps(bias) : _mm256_loadu_ps(acc + kVec * j);
  for (int64_t k = 0; k < count; ++k) {
    const __m256 w = _mm256_set1_ps(vals[k]);
    const float* p = panel + offs[k];
    for (int j = 0; j < JV; ++j) a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + kVec * j), a[j]);
  }
  if (relu)
    for (int j = 0; j < JV; ++j) a[j] = _mm256_max_ps(_mm256_setzero_ps(), a[j]);
  for (int j = 0; j < JV; ++j) _mm256_storeu_ps(acc + kVec * j, a[j]);
}

using TileFn = void (*)(const float*, const int64_t*, const float*, int64_t, float*, bool, float, bool);

template <int... J>
constexpr std::array<TileFn, sizeof...(J)> tile_table(std::integer_sequence<int, J...>) {
  return {tile_avx2<J + 1>...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kMaxVecs>());

void tile_scalar(const float* panel, const int64_t* offs, const float* vals, int64_t count,
                 float* acc, int64_t len, bool first, float bias, bool relu) {
  if (first) std::fill(acc, acc + len, bias);
  for (int64_t k = 0; k < count; ++k) {
    const float w = vals[k];
    const float* p = panel + offs[k];
    for (int64_t i = 0; i < len; ++i) acc[i] += w * p[i];
  }
  if (relu)
    for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] < 0.0f ? 0.0f : acc[i];
}

// Where a layer's input lives and where its outputs go (see the file comment).
struct Geometry {
  const float* src;          // images of `planes` x `channels` planes of `plane` floats,
  int64_t images, channels, planes, plane;
  int64_t cstride;           // `cstride` floats apart
  bool in_place;             // read src itself (it has zero slack after its last plane), else copy
                             // each tile's input into a panel (src is the caller's tensor)
  int64_t reach;             // largest in-plane offset of a tap: a tile reads tile + reach floats
  int64_t positions;         // output grid positions per image (Hout x grid_w)
  int64_t grid_w, out_w;     // grid width and the kept output width (crop grid_w -> out_w)
};

// Floats between the channel planes of an own buffer: an odd multiple of 16 (64 bytes), so the
// same position of consecutive planes falls into different cache sets.
int64_t plane_stride(int64_t plane) {
  const int64_t lines = (plane + 15) / 16;
  return 16 * (lines | 1);
}

// Zero floats after the last plane of an own buffer: the garbage positions of the last tile read
// up to a tile plus the largest tap offset past a plane's start.
int64_t slack(int64_t reach) { return kMaxTile + reach + kVec; }

// out[n, o, h, w] = bias[o] + sum_k vals[k] * plane(n, chan[k], tap_slot[t])[tap_off[t] + h * grid_w + w]
// with t = tap[k] (0 without taps), over the non-zeros k of row o (row_ptr; chan ascending within a
// row), for w < out_w.
void sparse_rows(const Geometry& g, const int32_t* chan, const uint8_t* tap, const int64_t* tap_slot,
                 const int64_t* tap_off, const float* vals, const int64_t* row_ptr, const float* bias,
                 int64_t rows, bool relu, float* out) {
  // tiles of equal length (a multiple of 8, at most 96) covering the positions
  const int64_t tiles = (g.positions + kMaxTile - 1) / kMaxTile;
  const int64_t vecs = ((g.positions + tiles - 1) / tiles + kVec - 1) / kVec, tile = vecs * kVec;
  int64_t span_pad = (tile + g.reach + kVec - 1) / kVec * kVec;
  if (span_pad % 1024 == 0) span_pad += kVec;  // keep panel rows off one cache set
  const int64_t per_chan = g.planes * span_pad;
  const double per_row_channel = static_cast<double>(row_ptr[rows]) / std::max<int64_t>(1, rows * g.channels);
  const int64_t by_nonzeros = static_cast<int64_t>(kMinChunkNonzeros / std::max(per_row_channel, 1e-6));
  const int64_t chunk = std::max<int64_t>(1, std::min({g.channels, kL2Budget / (per_chan * 4),
                                                      std::max(kL1Budget / (per_chan * 4), by_nonzeros)}));
  const int64_t n_chunks = (g.channels + chunk - 1) / chunk;
  // seg[o * (n_chunks + 1) + j]: first non-zero of row o in channel chunk j; offsets into an
  // image of src (in place) or into the panel of chunk j
  std::vector<int64_t> seg(rows * (n_chunks + 1)), offs(row_ptr[rows]);
  for (int64_t o = 0; o < rows; ++o) {
    int64_t k = row_ptr[o];
    for (int64_t j = 0; j < n_chunks; ++j) {
      seg[o * (n_chunks + 1) + j] = k;
      for (; k < row_ptr[o + 1] && chan[k] < (j + 1) * chunk; ++k) {
        const int64_t t = tap ? tap[k] : 0;
        offs[k] = g.in_place ? (tap_slot[t] * g.channels + chan[k]) * g.cstride + tap_off[t]
                             : ((chan[k] - j * chunk) * g.planes + tap_slot[t]) * span_pad + tap_off[t];
      }
    }
    seg[o * (n_chunks + 1) + n_chunks] = row_ptr[o + 1];
  }
  // output channels split into groups only as far as needed for about kMinTasks tasks
  const int64_t groups = std::min(rows, (kMinTasks + g.images * tiles - 1) / (g.images * tiles));
  const int64_t group = (rows + groups - 1) / groups;
  const int64_t out_h = g.positions / g.grid_w;
  const bool vec = use_avx2_fma(), single = n_chunks == 1, crop = g.grid_w != g.out_w;
  const TileFn fn = kTiles[vecs - 1];
  at::parallel_for(0, g.images * tiles * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(g.in_place ? 0 : chunk * per_chan), acc((single ? 1 : group) * tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t og = task % groups, t = task / groups % tiles, n = task / (groups * tiles);
      const int64_t q0 = t * tile, len = std::min(tile, g.positions - q0);
      const int64_t o0 = og * group, o1 = std::min(rows, o0 + group);
      const int64_t take = std::max<int64_t>(0, std::min(tile + g.reach, g.plane - q0));
      // crop row o's tile of the grid into the output
      auto store = [&](int64_t o, const float* from) {
        float* to = out + (n * rows + o) * out_h * g.out_w;
        for (int64_t i = 0; i < len;) {
          const int64_t q = q0 + i, h = q / g.grid_w, w = q % g.grid_w;
          const int64_t run = std::min(len - i, g.grid_w - w);
          if (w < g.out_w) std::copy(from + i, from + i + std::min(run, g.out_w - w), to + h * g.out_w + w);
          i += run;
        }
      };
      const float* base = g.in_place ? g.src + n * g.planes * g.channels * g.cstride + q0 : panel.data();
      for (int64_t j = 0; j < n_chunks; ++j) {
        const int64_t c0 = j * chunk, c1 = std::min(g.channels, c0 + chunk);
        for (int64_t c = c0; c < c1 && !g.in_place; ++c) {  // pack the input rows this tile reads
          for (int64_t p = 0; p < g.planes; ++p) {
            const float* from = g.src + ((n * g.planes + p) * g.channels + c) * g.cstride + q0;
            float* to = panel.data() + ((c - c0) * g.planes + p) * span_pad;
            std::copy(from, from + take, to);
            std::fill(to + take, to + span_pad, 0.0f);
          }
        }
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t a = seg[o * (n_chunks + 1) + j], b = seg[o * (n_chunks + 1) + j + 1];
          if (j > 0 && a == b) continue;
          const float bo = bias ? bias[o] : 0.0f;
          // one channel chunk and a whole uncropped tile: accumulate straight into the output
          const bool in_place = single && !crop && len == tile;
          float* dst = in_place ? out + (n * rows + o) * g.positions + q0
                                : acc.data() + (single ? 0 : (o - o0) * tile);
          if (vec) {
            fn(base, offs.data() + a, vals + a, b - a, dst, j == 0, bo, relu && single);
          } else {
            tile_scalar(base, offs.data() + a, vals + a, b - a, dst, tile, j == 0, bo,
                        relu && single);
          }
          if (single && !in_place) store(o, dst);
        }
      }
      if (!single) {  // several channel chunks: the ReLU comes after the last one
        for (int64_t o = o0; o < o1; ++o) {
          float* from = acc.data() + (o - o0) * tile;
          if (relu)
            for (int64_t i = 0; i < tile; ++i) from[i] = from[i] < 0.0f ? 0.0f : from[i];
          store(o, from);
        }
      }
    }
  });
}

// ---- Block-sparse (BSR) weights: B x B blocks of the 2-D view (O, kh * kw * C), B | C, B | O ----
//
// A block (row block rb, column block cb) covers outputs rb*B.. and input channels c0.. of one
// kernel position, so its B columns are B consecutive channel planes at one tap offset: a small
// dense GEMM. Register tile: 4 output rows x 24 positions (12 accumulators); per block column 3
// input vectors and 4 broadcast weights feed 12 fused multiply-adds.
constexpr int64_t kBsrRows = 4, kBsrVecs = 3, kBsrSub = kVec * kBsrVecs;  // 24 positions
constexpr int64_t kBsrTile = 4 * kBsrSub;                                  // 96 positions per task

// acc[i * 24 + q] = bias[i] + sum over blocks b, columns j of w_b[i * B + j] * x_b[j * cstride + q]
// for 4 rows i, where x_b = base + offs[b] and w_b = the block's values from row i0.
__attribute__((target("avx2,fma"))) void bsr_tile_avx2(const float* base, const int64_t* offs,
                                                       const float* const* w, int64_t blocks,
                                                       int64_t B, int64_t cstride, const float* bias,
                                                       bool relu, float* acc) {
  __m256 a[kBsrRows][kBsrVecs];
  for (int i = 0; i < kBsrRows; ++i)
    for (int v = 0; v < kBsrVecs; ++v) a[i][v] = _mm256_set1_ps(bias ? bias[i] : 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = base + offs[b];
    const float* wb = w[b];
    for (int64_t j = 0; j < B; ++j, x += cstride) {
      const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + kVec), x2 = _mm256_loadu_ps(x + 2 * kVec);
      for (int i = 0; i < kBsrRows; ++i) {
        const __m256 wv = _mm256_broadcast_ss(wb + i * B + j);
        a[i][0] = _mm256_fmadd_ps(wv, x0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(wv, x1, a[i][1]);
        a[i][2] = _mm256_fmadd_ps(wv, x2, a[i][2]);
      }
    }
  }
  for (int i = 0; i < kBsrRows; ++i) {
    for (int v = 0; v < kBsrVecs; ++v) {
      const __m256 r = relu ? _mm256_max_ps(_mm256_setzero_ps(), a[i][v]) : a[i][v];
      _mm256_storeu_ps(acc + i * kBsrSub + kVec * v, r);
    }
  }
}

void bsr_tile_scalar(const float* base, const int64_t* offs, const float* const* w, int64_t blocks,
                     int64_t B, int64_t cstride, const float* bias, bool relu, float* acc) {
  for (int i = 0; i < kBsrRows; ++i) std::fill(acc + i * kBsrSub, acc + (i + 1) * kBsrSub, bias ? bias[i] : 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t j = 0; j < B; ++j) {
      const float* x = base + offs[b] + j * cstride;
      for (int i = 0; i < kBsrRows; ++i) {
        const float wv = w[b][i * B + j];
        for (int64_t q = 0; q < kBsrSub; ++q) acc[i * kBsrSub + q] += wv * x[q];
      }
    }
  }
  if (relu)
    for (int64_t q = 0; q < kBsrRows * kBsrSub; ++q) acc[q] = acc[q] < 0.0f ? 0.0f : acc[q];
}

// out[n, o, h, w] for a BSR weight (values (blocks, B, B), col_indices, crow_indices) on an in-place
// layout (own buffer with slack); tasks = (image, tile of 96 positions, row block).
void bsr_rows(const Geometry& g, const float* values, const int64_t* col, const int64_t* crow,
              int64_t B, const int64_t* tap_slot, const int64_t* tap_off,
              const float* bias, int64_t rows, bool relu, float* out) {
  const int64_t row_blocks = rows / B, nnz = crow[row_blocks];
  const int64_t per_tap = g.channels / B;  // column blocks per kernel position
  std::vector<int64_t> offs(nnz);
  for (int64_t b = 0; b < nnz; ++b) {
    const int64_t t = col[b] / per_tap, c0 = col[b] % per_tap * B;
    offs[b] = (tap_slot[t] * g.channels + c0) * g.cstride + tap_off[t];
  }
  const int64_t tiles = (g.positions + kBsrTile - 1) / kBsrTile, out_h = g.positions / g.grid_w;
  const bool vec = use_avx2_fma();
  at::parallel_for(0, g.images * tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> w;
    alignas(32) float acc[kBsrRows * kBsrSub];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % row_blocks, t = task / row_blocks % tiles, n = task / (row_blocks * tiles);
      const int64_t b0 = crow[rb], blocks = crow[rb + 1] - b0;
      // block values from row i0 = 4 * r of each block: w[r * blocks + b]
      w.resize(B / kBsrRows * blocks);
      for (int64_t r = 0; r < B / kBsrRows; ++r)
        for (int64_t b = 0; b < blocks; ++b) w[r * blocks + b] = values + ((b0 + b) * B + r * kBsrRows) * B;
      // each 24-position sub-tile of input stays in cache for all row groups of the block row
      for (int64_t q0 = t * kBsrTile; q0 < std::min(g.positions, (t + 1) * kBsrTile); q0 += kBsrSub) {
        const float* base = g.src + n * g.planes * g.channels * g.cstride + q0;
        const int64_t len = std::min(kBsrSub, g.positions - q0);
        for (int64_t r = 0; r < B / kBsrRows; ++r) {
          const int64_t i0 = r * kBsrRows;
          const float* bs = bias ? bias + rb * B + i0 : nullptr;
          if (vec) {
            bsr_tile_avx2(base, offs.data() + b0, w.data() + r * blocks, blocks, B, g.cstride, bs, relu, acc);
          } else {
            bsr_tile_scalar(base, offs.data() + b0, w.data() + r * blocks, blocks, B, g.cstride, bs, relu, acc);
          }
          for (int64_t i = 0; i < kBsrRows; ++i) {  // crop the grid into the output
            float* to = out + (n * rows + rb * B + i0 + i) * out_h * g.out_w;
            for (int64_t k = 0; k < len;) {
              const int64_t q = q0 + k, h = q / g.grid_w, x = q % g.grid_w;
              const int64_t run = std::min(len - k, g.grid_w - x);
              if (x < g.out_w)
                std::copy(acc + i * kBsrSub + k, acc + i * kBsrSub + k + std::min(run, g.out_w - x),
                          to + h * g.out_w + x);
              k += run;
            }
          }
        }
      }
    }
  });
}

void check_bsr(const at::Tensor& values, const at::Tensor& col, const at::Tensor& crow,
               const c10::optional<at::Tensor>& bias, int64_t columns) {
  TORCH_CHECK(values.dtype() == at::kFloat && values.dim() == 3 && values.size(1) == values.size(2) &&
                  values.is_contiguous(),
              "bsr kernel: values must be a contiguous float32 (blocks, B, B) tensor");
  const int64_t B = values.size(1);
  TORCH_CHECK(B % kBsrRows == 0, "bsr kernel: the block size must be a multiple of 4");
  TORCH_CHECK(col.dtype() == at::kLong && col.dim() == 1 && col.numel() == values.size(0) && col.is_contiguous(),
              "bsr kernel: col_indices must be a contiguous int64 vector, one per block");
  TORCH_CHECK(crow.dtype() == at::kLong && crow.dim() == 1 && crow.numel() >= 1 && crow.is_contiguous(),
              "bsr kernel: crow_indices must be a contiguous int64 vector");
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* cl = col.data_ptr<int64_t>();
  const int64_t row_blocks = crow.numel() - 1;
  TORCH_CHECK(cr[0] == 0 && cr[row_blocks] == values.size(0), "bsr kernel: crow_indices do not span the blocks");
  for (int64_t r = 0; r < row_blocks; ++r) {
    TORCH_CHECK(cr[r] <= cr[r + 1], "bsr kernel: crow_indices must not decrease");
    for (int64_t b = cr[r]; b < cr[r + 1]; ++b)
      TORCH_CHECK(cl[b] >= 0 && cl[b] < columns, "bsr kernel: column block out of range");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->dim() == 1 && bias->numel() == row_blocks * B &&
                    bias->is_contiguous(),
                "bsr kernel: bias must be a contiguous float32 vector of out_channels");
  }
}

void check_rows(const at::Tensor& values, const at::Tensor& channels, const at::Tensor& row_ptr,
                const c10::optional<at::Tensor>& bias, int64_t rows, int64_t in_channels) {
  TORCH_CHECK(values.dtype() == at::kFloat && values.dim() == 1 && values.is_contiguous(),
              "mmsparse sparse kernel: values must be a contiguous float32 vector");
  TORCH_CHECK(channels.dtype() == at::kInt && channels.sizes() == values.sizes() &&
                  channels.is_contiguous(),
              "mmsparse sparse kernel: channels must be a contiguous int32 vector as long as values");
  TORCH_CHECK(row_ptr.dtype() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() == rows + 1 &&
                  row_ptr.is_contiguous(),
              "mmsparse sparse kernel: row_ptr must be a contiguous int64 vector of out_channels + 1");
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == values.numel(), "mmsparse sparse kernel: row_ptr does not span values");
  const int32_t* ch = channels.data_ptr<int32_t>();
  for (int64_t o = 0; o < rows; ++o) {
    TORCH_CHECK(rp[o] <= rp[o + 1], "mmsparse sparse kernel: row_ptr must not decrease");
    for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
      TORCH_CHECK(ch[k] >= 0 && ch[k] < in_channels, "mmsparse sparse kernel: channel out of range");
      TORCH_CHECK(k == rp[o] || ch[k] >= ch[k - 1],
                  "mmsparse sparse kernel: channels must not decrease within a row");
    }
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->dim() == 1 && bias->numel() == rows &&
                    bias->is_contiguous(),
                "mmsparse sparse kernel: bias must be a contiguous float32 vector of out_channels");
  }
}

// A conv's input laid out for the sparse kernels (see the file comment): the geometry, the plane
// slot and in-plane offset of each kernel position, and the buffer holding the planes.
struct Layout {
  Geometry g;
  std::vector<int64_t> tap_slot, tap_off;
  at::Tensor buf;
  int64_t out_h, out_w;
};

// `direct`: a 1x1 stride-1 unpadded conv may read x itself (the kernel then copies tile panels).
Layout lay_out(const at::Tensor& x, int64_t kh, int64_t kw, int64_t stride, int64_t padding,
               int64_t dilation, bool allow_direct, const char* op) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * padding, Wp = W + 2 * padding;
  TORCH_CHECK(Hp >= dilation * (kh - 1) + 1 && Wp >= dilation * (kw - 1) + 1, op,
              ": input smaller than the kernel");
  Layout l;
  l.out_h = (Hp - dilation * (kh - 1) - 1) / stride + 1;
  l.out_w = (Wp - dilation * (kw - 1) - 1) / stride + 1;
  // the phase planes (row phase, column phase) some tap reads, numbered in increasing order
  std::vector<int64_t> slot_of(stride * stride, -1);
  for (int64_t r = 0; r < kh; ++r)
    for (int64_t s = 0; s < kw; ++s) slot_of[(r * dilation % stride) * stride + s * dilation % stride] = 0;
  int64_t planes = 0;
  for (auto& v : slot_of)
    if (v == 0) v = planes++;
  const bool direct = allow_direct && kh == 1 && kw == 1 && stride == 1 && padding == 0;
  const int64_t Hs = (Hp + stride - 1) / stride, Ws = (Wp + stride - 1) / stride, plane = Hs * Ws;
  l.tap_slot.resize(kh * kw);
  l.tap_off.resize(kh * kw);
  int64_t reach = 0;
  for (int64_t r = 0; r < kh; ++r) {
    for (int64_t s = 0; s < kw; ++s) {
      l.tap_slot[r * kw + s] = slot_of[(r * dilation % stride) * stride + s * dilation % stride];
      l.tap_off[r * kw + s] = (r * dilation / stride) * Ws + s * dilation / stride;
      reach = std::max(reach, l.tap_off[r * kw + s]);
    }
  }
  const int64_t cstride = direct ? plane : plane_stride(plane);
  l.g = Geometry{x.data_ptr<float>(), N, C, planes, plane, cstride, !direct, reach, l.out_h * Ws, Ws,
                 l.out_w};
  if (direct || N == 0) return l;
  // zero-padded phase planes (N, planes, C, cstride) and zero slack
  const int64_t total = N * planes * C * cstride;
  l.buf = at::empty({total + slack(reach)}, x.options());
  std::fill(l.buf.data_ptr<float>() + total, l.buf.data_ptr<float>() + total + slack(reach), 0.0f);
  const float* xs = x.data_ptr<float>();
  float* b = l.buf.data_ptr<float>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      for (int64_t ph = 0; ph < stride * stride; ++ph) {
        if (slot_of[ph] < 0) continue;
        const int64_t a = ph / stride, e = ph % stride;
        float* dst = b + ((n * planes + slot_of[ph]) * C + c) * cstride;
        std::fill(dst + plane, dst + cstride, 0.0f);
        // columns j with 0 <= e + j * stride - padding < W: [j0, j1)
        const int64_t j0 = std::min(Ws, std::max<int64_t>(0, (padding - e + stride - 1) / stride));
        const int64_t last = W - 1 + padding - e;  // the largest j * stride reaching a column
        const int64_t j1 = last < 0 ? j0 : std::max(j0, std::min(Ws, last / stride + 1));
        for (int64_t i = 0; i < Hs; ++i) {
          const int64_t y = a + i * stride - padding;
          float* row = dst + i * Ws;
          if (y < 0 || y >= H) {
            std::fill(row, row + Ws, 0.0f);
            continue;
          }
          const float* from = xs + (nc * H + y) * W + e - padding;
          std::fill(row, row + j0, 0.0f);
          if (stride == 1) {
            std::copy(from + j0, from + j1, row + j0);
          } else {
            for (int64_t j = j0; j < j1; ++j) row[j] = from[j * stride];
          }
          std::fill(row + j1, row + Ws, 0.0f);
        }
      }
    }
  });
  l.g.src = b;
  return l;
}

// Convolution with a CSR weight: non-zero k of row o (row_ptr[o] <= k < row_ptr[o + 1]) is
// values[k] at input channel channels[k] (not decreasing within a row) and kernel position
// taps[k] = r * kw + s. Input (N, C, H, W) float32; `relu` applies a ReLU to the output.
at::Tensor nm_conv2d(const at::Tensor& input, const at::Tensor& values, const at::Tensor& channels,
                     const at::Tensor& taps, const at::Tensor& row_ptr,
                     const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw, int64_t stride,
                     int64_t padding, int64_t dilation, bool relu) {
  TORCH_CHECK(input.device().is_cpu() && input.dtype() == at::kFloat && input.dim() == 4,
              "nm_conv2d: input must be a 4-D float32 CPU tensor");
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 256 && stride >= 1 && padding >= 0 && dilation >= 1,
              "nm_conv2d: invalid kernel size, stride, padding or dilation");
  const at::Tensor x = input.contiguous();
  const int64_t N = x.size(0), C = x.size(1), O = row_ptr.numel() - 1;
  check_rows(values, channels, row_ptr, bias, O, C);
  TORCH_CHECK(taps.dtype() == at::kByte && taps.sizes() == values.sizes() && taps.is_contiguous(),
              "nm_conv2d: taps must be a contiguous uint8 vector as long as values");
  const uint8_t* tp = taps.data_ptr<uint8_t>();
  for (int64_t k = 0; k < taps.numel(); ++k)
    TORCH_CHECK(tp[k] < kh * kw, "nm_conv2d: kernel position out of range");
  auto l = lay_out(x, kh, kw, stride, padding, dilation, true, "nm_conv2d");
  auto out = at::empty({N, O, l.out_h, l.out_w}, x.options());
  if (N == 0 || O == 0) return out;
  sparse_rows(l.g, channels.data_ptr<int32_t>(), tp, l.tap_slot.data(), l.tap_off.data(),
              values.data_ptr<float>(), row_ptr.data_ptr<int64_t>(),
              bias.has_value() ? bias->data_ptr<float>() : nullptr, O, relu, out.data_ptr<float>());
  return out;
}

// Convolution with a BSR weight of the 2-D view W.permute(0, 2, 3, 1).reshape(O, kh * kw * C):
// the arrays of mmsparse.core.blocks.blocks_to_bsr. Needs B | C and B | O.
at::Tensor bsr_conv2d(const at::Tensor& input, const at::Tensor& values, const at::Tensor& col_indices,
                      const at::Tensor& crow_indices, const c10::optional<at::Tensor>& bias, int64_t kh,
                      int64_t kw, int64_t stride, int64_t padding, int64_t dilation, bool relu) {
  TORCH_CHECK(input.device().is_cpu() && input.dtype() == at::kFloat && input.dim() == 4,
              "bsr_conv2d: input must be a 4-D float32 CPU tensor");
  TORCH_CHECK(kh >= 1 && kw >= 1 && stride >= 1 && padding >= 0 && dilation >= 1,
              "bsr_conv2d: invalid kernel size, stride, padding or dilation");
  const at::Tensor x = input.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(values.dim() == 3 && values.size(1) > 0 && C % values.size(1) == 0,
              "bsr_conv2d: the block size must divide the input channels");
  const int64_t B = values.size(1);
  check_bsr(values, col_indices, crow_indices, bias, kh * kw * C / B);
  const int64_t O = (crow_indices.numel() - 1) * B;
  auto l = lay_out(x, kh, kw, stride, padding, dilation, false, "bsr_conv2d");
  auto out = at::empty({N, O, l.out_h, l.out_w}, x.options());
  if (N == 0 || O == 0) return out;
  bsr_rows(l.g, values.data_ptr<float>(), col_indices.data_ptr<int64_t>(), crow_indices.data_ptr<int64_t>(),
           B, l.tap_slot.data(), l.tap_off.data(),
           bias.has_value() ? bias->data_ptr<float>() : nullptr, O, relu, out.data_ptr<float>());
  return out;
}

// Linear layer with a BSR weight (O, K): a 1x1 conv on the transposed input.
at::Tensor bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& col_indices,
                      const at::Tensor& crow_indices, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && input.dtype() == at::kFloat && input.dim() == 2,
              "bsr_linear: input must be a 2-D float32 CPU tensor");
  const int64_t R = input.size(0), K = input.size(1);
  TORCH_CHECK(values.dim() == 3 && values.size(1) > 0 && K % values.size(1) == 0,
              "bsr_linear: the block size must divide the input features");
  const int64_t B = values.size(1);
  check_bsr(values, col_indices, crow_indices, bias, K / B);
  const int64_t O = (crow_indices.numel() - 1) * B;
  auto out = at::empty({1, O, 1, R}, input.options());
  if (R == 0 || O == 0) return out.view({O, R}).t().contiguous();
  const at::Tensor xt = input.t().contiguous().view({1, K, 1, R});
  auto l = lay_out(xt, 1, 1, 1, 0, 1, false, "bsr_linear");
  bsr_rows(l.g, values.data_ptr<float>(), col_indices.data_ptr<int64_t>(), crow_indices.data_ptr<int64_t>(),
           B, l.tap_slot.data(), l.tap_off.data(), bias.has_value() ? bias->data_ptr<float>() : nullptr, O, false,
           out.data_ptr<float>());
  return out.view({O, R}).t().contiguous();
}

// Linear layer with a CSR weight: input (R, K) float32, channels[k] the input feature of non-zero
// k (not decreasing within a row). The transposed input is a 1 x R image of K channels.
at::Tensor nm_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& channels,
                     const at::Tensor& row_ptr, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && input.dtype() == at::kFloat && input.dim() == 2,
              "nm_linear: input must be a 2-D float32 CPU tensor");
  const int64_t R = input.size(0), K = input.size(1), O = row_ptr.numel() - 1;
  check_rows(values, channels, row_ptr, bias, O, K);
  auto out_t = at::empty({O, R}, input.options());
  if (R == 0 || O == 0) return out_t.t().contiguous();
  // transposed input (K, R) with padded rows and zero slack: read in place
  const int64_t cstride = plane_stride(R);
  auto xt = at::empty({K * cstride + slack(0)}, input.options());
  auto rows_view = xt.narrow(0, 0, K * cstride).view({K, cstride});
  rows_view.narrow(1, 0, R).copy_(input.t());
  rows_view.narrow(1, R, cstride - R).zero_();
  xt.narrow(0, K * cstride, slack(0)).zero_();
  const int64_t zero = 0;
  const Geometry g{xt.data_ptr<float>(), 1, K, 1, R, cstride, true, 0, R, R, R};
  sparse_rows(g, channels.data_ptr<int32_t>(), nullptr, &zero, &zero, values.data_ptr<float>(),
              row_ptr.data_ptr<int64_t>(), bias.has_value() ? bias->data_ptr<float>() : nullptr, O,
              false, out_t.data_ptr<float>());
  return out_t.t().contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmsparse, m) {
  m.def("nm_conv2d(Tensor input, Tensor values, Tensor channels, Tensor taps, Tensor row_ptr, "
        "Tensor? bias, int kh, int kw, int stride, int padding, int dilation, bool relu=False) -> Tensor",
        &nm_conv2d);
  m.def("nm_linear(Tensor input, Tensor values, Tensor channels, Tensor row_ptr, Tensor? bias) -> Tensor",
        &nm_linear);
  m.def("nm_kernel_isa(bool? portable=None) -> str", &nm_kernel_isa);
  m.def("bsr_conv2d(Tensor input, Tensor values, Tensor col_indices, Tensor crow_indices, Tensor? bias, "
        "int kh, int kw, int stride, int padding, int dilation, bool relu=False) -> Tensor",
        &bsr_conv2d);
  m.def("bsr_linear(Tensor input, Tensor values, Tensor col_indices, Tensor crow_indices, Tensor? bias) "
        "-> Tensor",
        &bsr_linear);
}
