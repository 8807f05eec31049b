// Weight matmuls for CPU as XLA FFI custom calls: y[M, N] = x[M, K] @ w[layer] for a layer's slice of the stacked
// weights w [L, K, N], read in place (JaxllmMatmulCpu), and y[M, V] = x[M, D] @ e[V, D]^T for the tied LM head
// (JaxllmMatmulTransposedCpu, at the end of the file).
//
// Why a native kernel: inside the model's layer scan XLA:CPU copies each layer's slice of every stacked weight out
// of the [L, ...] parameter before its GEMM reads it (a dynamic slice feeding a dot is materialized), so a decode
// step wrote a copy of all its weights before reading them again; and its GEMMs at a decode step's few rows ran at
// 55-60% of the machine's peak. Here the layer index is an operand: the kernel reads w + layer * K * N directly.
//
// Weights: float32 or bfloat16 (converted as read), or int8 with its scales: per output column ([L, N] float32,
// applied to the finished sums: "int8") or per block of 32 rows of K ([L, K / 32, N] float16: llama.cpp's Q8_0,
// each int8 weight times its block's scale before it is used, the float32 value XLA's dequantization makes). x and y
// are float32; the accumulation is float32.
//
// Blocking: work items are (block of up to kRowBlock rows, panel of kPanel = 32 output columns; kWidePanel = 128 for
// calls of at most kWideItemRows rows, whose time goes to reading the weights: a longer contiguous run per weight
// row); the caller and XLA's intra-op pool take them from a shared counter. An item walks K in blocks of kDepth rows
// (the panel's [kDepth, width] weights stay in L1 / L2 while every row tile of the item reads them) and, per block,
// runs register tiles: 12 rows x 32 columns (per k, two 16-lane weight loads, one broadcast of x per row and two
// multiply-adds per row: 24 accumulators), or in wide items 3 rows x 128 columns (eight loads, 24 accumulators),
// then 16-column and single-column tails. The first row tile of a block prefetches the weight rows kPrefetch ahead
// (the next block's, at its end), since each weight row of a panel lies in another page.
// Each output is one float32 sum over k in order, whichever rows share its item: a row's result does not depend on
// the batch around it (the engine's batch invariance).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "native_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllm;  // NOLINT: the shared vector helpers

constexpr int kPanel = 32;         // output columns per item: two 16-lane vectors
constexpr int kWidePanel = 128;    // ... in calls of at most kWideItemRows rows: 512 contiguous bytes of a float row
constexpr int kWideItemRows = 8;   // (measured: 4-8 rows ran 1.3-1.5x faster wide; 12 and more ran slower)
constexpr int kTileRows = 12;      // rows per register tile: 12 x 2 vectors of accumulators
constexpr int kWideRows = 3;       // ... in the 128-column chunks of wide items: 3 x 8
constexpr int kRowBlock = 240;     // rows per item (20 tiles); more rows make more items
constexpr int kDepth = 256;        // K rows per block (a multiple of the Q8_0 block)
constexpr int kQ8Block = 32;       // Q8_0: K rows per scale
constexpr int kPrefetch = 48;      // weight rows ahead

enum class W { kF32, kBF16, kS8 };
enum class Scales { kNone = 0, kColumns = 1, kBlocks = 2 };

typedef uint16_t v16u16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));
typedef int8_t v16s8 __attribute__((vector_size(16), aligned(1)));

constexpr int64_t elem_bytes(W t) { return t == W::kF32 ? 4 : t == W::kBF16 ? 2 : 1; }

template <W T>
constexpr int64_t elem_bytes() {
  return elem_bytes(T);
}

// 16 weights from element i of a row as float32 (GCC 12 widens int8 / uint16 vectors element by element: AVX-512's
// conversions are spelled out where present).
template <W T>
inline v16f load_w(const void* w, int64_t i) {
  if constexpr (T == W::kF32) {
    return load16(static_cast<const float*>(w) + i);
  } else if constexpr (T == W::kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(w) + i;
#if defined(__AVX512F__)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p))), 16));
#else
    const v16u32 u = __builtin_convertvector(*reinterpret_cast<const v16u16*>(p), v16u32) << 16;
    v16f f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
#endif
  } else {
    const int8_t* p = static_cast<const int8_t*>(w) + i;
#if defined(__AVX512F__)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    return __builtin_convertvector(*reinterpret_cast<const v16s8*>(p), v16f);
#endif
  }
}

template <W T>
inline float load_w1(const void* w, int64_t i) {
  if constexpr (T == W::kF32) {
    return static_cast<const float*>(w)[i];
  } else if constexpr (T == W::kBF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  } else {
    return static_cast<float>(static_cast<const int8_t*>(w)[i]);
  }
}

// IEEE float16 bits as float32, exactly (normals, subnormals, zeros, infinities, NaN). No float32 subnormal is
// made on the way: XLA's threads run with denormals-are-zero, which would flush a float16 subnormal's bits to 0.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {  // infinity / NaN
    bits = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
  } else if (em >= 0x0400u) {  // normal: the exponent rebased from 15 to 127
    bits = sign | ((em << 13) + (112u << 23));
  } else {  // subnormal or zero: em * 2^-24, a normal float32 (or 0)
    const float f = static_cast<float>(em) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// n float16 values as float32 (16 at a time with AVX-512's conversion: at a decode's few rows, converting a block's
// scales one by one took longer than reading its weights).
inline void f16_row_to_f32(const uint16_t* src, int n, float* out) {
  int c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    _mm512_storeu_ps(out + c, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c))));
  }
#endif
  for (; c < n; ++c) out[c] = f16_to_f32(src[c]);
}

struct Problem {
  int64_t M, K, N;
  const float* x;          // [M, K]
  const void* w;           // this layer's [K, N]
  W w_type;
  Scales scales;
  const float* columns;    // Scales::kColumns: this layer's [N]
  const uint16_t* blocks;  // Scales::kBlocks: this layer's [K / 32, N] float16
  float* y;                // [M, N]
};

// y[0:MR, 0:16 NV] (+)= x[0:MR, k0:k0+kc] @ w[k0:k0+kc, 0:16 NV] (pointers at the tile's corner), the weights times
// their block's scale first when bs (float32 [kc / 32, ldb], at the tile's first column) is given.
template <W T, bool kBlockScaled, int MR, int NV>
inline void tile(const float* __restrict x, int64_t ldx, const void* w, int64_t ldw, const float* __restrict bs,
                 int ldb, float* __restrict y, int64_t ldy, int64_t kc, bool accumulate, const char* pf,
                 int64_t pf_ld) {
  v16f acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? load16(y + i * ldy + 16 * j) : v16f{};
  v16f s[NV];
  for (int64_t k = 0; k < kc; ++k) {
    if constexpr (kBlockScaled) {
      if (k % kQ8Block == 0) {
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) s[j] = load16(bs + (k / kQ8Block) * ldb + 16 * j);
      }
    }
    v16f b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      b[j] = load_w<T>(w, k * ldw + 16 * j);
      if constexpr (kBlockScaled) b[j] *= s[j];
    }
    if (pf) {
#pragma GCC unroll 8
      for (int line = 0; line < 16 * NV * elem_bytes<T>(); line += 64) __builtin_prefetch(pf + k * pf_ld + line, 0, 2);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float a = x[i * ldx + k];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += b[j] * a;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store16(y + i * ldy + 16 * j, acc[i][j]);
}

template <W T, bool kBlockScaled, int NV>
void tile_rows(int rows, const float* x, int64_t ldx, const void* w, int64_t ldw, const float* bs, int ldb, float* y,
               int64_t ldy, int64_t kc, bool accumulate, const char* pf, int64_t pf_ld) {
  switch (rows) {
#define JAXLLM_TILE(R, V) \
  case R: return tile<T, kBlockScaled, R, V>(x, ldx, w, ldw, bs, ldb, y, ldy, kc, accumulate, pf, pf_ld);
    JAXLLM_TILE(1, NV) JAXLLM_TILE(2, NV) JAXLLM_TILE(3, NV) JAXLLM_TILE(4, NV) JAXLLM_TILE(5, NV)
    JAXLLM_TILE(6, NV) JAXLLM_TILE(7, NV) JAXLLM_TILE(8, NV) JAXLLM_TILE(9, NV) JAXLLM_TILE(10, NV)
    JAXLLM_TILE(11, NV) JAXLLM_TILE(12, NV)
  }
}

// The 3 x 128 tiles of wide items.
template <W T, bool kBlockScaled>
void tile_rows_wide(int rows, const float* x, int64_t ldx, const void* w, int64_t ldw, const float* bs, int ldb,
                    float* y, int64_t ldy, int64_t kc, bool accumulate, const char* pf, int64_t pf_ld) {
  switch (rows) {
    JAXLLM_TILE(1, 8) JAXLLM_TILE(2, 8) JAXLLM_TILE(3, 8)
#undef JAXLLM_TILE
  }
}

// Columns past the panel's last full 16 (N not a multiple of 16): one sum per output, the same order over k, each
// term fused as in the vector tiles (std::fma: GCC vectorizes a plain `sum += b * x` as an in-order reduction that
// splits fused and unfused terms differently per instantiation, and a row's last bits would then depend on which
// code path its item took).
template <W T, bool kBlockScaled>
void scalar_columns(int rows, const float* x, int64_t ldx, const void* w, int64_t ldw, const float* bs, int ldb,
                    float* y, int64_t ldy, int64_t kc, bool accumulate, int c0, int c1) {
  for (int i = 0; i < rows; ++i) {
    for (int c = c0; c < c1; ++c) {
      float sum = accumulate ? y[i * ldy + c] : 0.0f;
      for (int64_t k = 0; k < kc; ++k) {
        float b = load_w1<T>(w, k * ldw + c);
        if constexpr (kBlockScaled) b *= bs[(k / kQ8Block) * ldb + c];
        sum = std::fma(b, x[i * ldx + k], sum);  // fused, as the vector tiles' (and never vectorized)
      }
      y[i * ldy + c] = sum;
    }
  }
}

// One K block [k0, k0 + kc) of the outputs [row0, row0 + rows) x [n0, n0 + width), the block's weights at w (its
// column 0; rows ldw elements apart): each row tile through the widest register tiles that fit the columns (128
// in wide items, then 32, 16, one at a time). The first row tile prefetches, with its row k, the row pf + k pf_ld
// (bytes) at the same columns.
template <W T, bool kBlockScaled>
void run_block(const Problem& p, int64_t row0, int64_t rows, int64_t n0, int width, int64_t k0, int64_t kc,
               const char* w, int64_t ldw, const float* bs, const char* pf, int64_t pf_ld) {
  auto at = [&](int c) { return w + c * elem_bytes<T>(); };
  auto pf_at = [&](int64_t r, int c) { return r == 0 ? pf + c * elem_bytes<T>() : nullptr; };
  const bool accumulate = k0 > 0;
  int c0 = 0;
  for (; c0 + kWidePanel <= width; c0 += kWidePanel) {
    for (int64_t r = 0; r < rows; r += kWideRows) {
      const int tr = static_cast<int>(std::min<int64_t>(kWideRows, rows - r));
      tile_rows_wide<T, kBlockScaled>(tr, p.x + (row0 + r) * p.K + k0, p.K, at(c0), ldw, bs + c0, width,
                                      p.y + (row0 + r) * p.N + n0 + c0, p.N, kc, accumulate, pf_at(r, c0), pf_ld);
    }
  }
  for (int64_t r = 0; r < rows && c0 < width; r += kTileRows) {
    const int tr = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
    const float* x = p.x + (row0 + r) * p.K + k0;
    float* y = p.y + (row0 + r) * p.N + n0;
    int c = c0;
    for (; c + 32 <= width; c += 32) {
      tile_rows<T, kBlockScaled, 2>(tr, x, p.K, at(c), ldw, bs + c, width, y + c, p.N, kc, accumulate, pf_at(r, c),
                                    pf_ld);
    }
    for (; c + 16 <= width; c += 16) {
      tile_rows<T, kBlockScaled, 1>(tr, x, p.K, at(c), ldw, bs + c, width, y + c, p.N, kc, accumulate, pf_at(r, c),
                                    pf_ld);
    }
    if (c < width) {
      scalar_columns<T, kBlockScaled>(tr, x, p.K, at(c), ldw, bs + c, width, y + c, p.N, kc, accumulate, 0,
                                      width - c);
    }
  }
}

// The outputs [row0, row0 + rows) x [n0, n0 + width), K in blocks of kDepth. (int8 weights are converted in the
// register tiles, by every row tile that reads them: converting a block once into a float32 buffer for all of them
// measured no faster, 41-42 against 39 ms for the default model's 30 layers at 32 rows.)
template <W T, bool kBlockScaled>
void run_item(const Problem& p, int64_t row0, int64_t rows, int64_t n0, int width) {
  const int64_t ldw = p.N;
  float bs[kDepth / kQ8Block * kWidePanel];
  for (int64_t k0 = 0; k0 < p.K; k0 += kDepth) {
    const int64_t kc = std::min<int64_t>(kDepth, p.K - k0);
    if constexpr (kBlockScaled) {  // this block's scales for the item's columns, as float32
      for (int64_t b = 0; b < (kc + kQ8Block - 1) / kQ8Block; ++b) {
        f16_row_to_f32(p.blocks + (k0 / kQ8Block + b) * p.N + n0, width, bs + b * width);
      }
    }
    const char* w = static_cast<const char*>(p.w) + (k0 * ldw + n0) * elem_bytes<T>();
    const int64_t row_bytes = ldw * elem_bytes<T>();  // the rows kPrefetch ahead (the next block's, at its end)
    run_block<T, kBlockScaled>(p, row0, rows, n0, width, k0, kc, w, ldw, bs, w + kPrefetch * row_bytes, row_bytes);
  }
  if (p.scales == Scales::kColumns) {
    for (int64_t i = row0; i < row0 + rows; ++i) {
      for (int c = 0; c < width; ++c) p.y[i * p.N + n0 + c] *= p.columns[n0 + c];
    }
  }
}

template <W T>
void run_item_w(const Problem& p, int64_t row0, int64_t rows, int64_t n0, int width) {
  if constexpr (T == W::kS8) {  // block scales come only with int8 weights (Impl checks): no float instantiations
    if (p.scales == Scales::kBlocks) return run_item<T, true>(p, row0, rows, n0, width);
  }
  run_item<T, false>(p, row0, rows, n0, width);
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::AnyBuffer scales,
                ffi::Buffer<ffi::S32> layer, int64_t scale_kind, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("matmul (cpu): x must be [M, K] and w [L, K, N]");
  }
  Problem p;
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[2];
  const int64_t L = wd[0];
  if (y->element_count() != static_cast<size_t>(p.M * p.N) || layer.element_count() < 1) {
    return ffi::Error::InvalidArgument("matmul (cpu): y must be [M, N] and layer a scalar");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("matmul (cpu): layer index out of range");
  switch (w.element_type()) {
    case ffi::DataType::F32: p.w_type = W::kF32; break;
    case ffi::DataType::BF16: p.w_type = W::kBF16; break;
    case ffi::DataType::S8: p.w_type = W::kS8; break;
    default: return ffi::Error::InvalidArgument("matmul (cpu): w must be float32, bfloat16 or int8");
  }
  p.scales = static_cast<Scales>(scale_kind);
  p.columns = nullptr;
  p.blocks = nullptr;
  if (p.scales == Scales::kColumns) {
    if (scales.element_type() != ffi::DataType::F32 || sd.size() != 2 || sd[0] != L || sd[1] != p.N) {
      return ffi::Error::InvalidArgument("matmul (cpu): per-column scales must be float32 [L, N]");
    }
    p.columns = static_cast<const float*>(scales.untyped_data()) + l * p.N;
  } else if (p.scales == Scales::kBlocks) {
    if (scales.element_type() != ffi::DataType::F16 || sd.size() != 3 || sd[0] != L || p.K % kQ8Block ||
        sd[1] != p.K / kQ8Block || sd[2] != p.N) {
      return ffi::Error::InvalidArgument("matmul (cpu): block scales must be float16 [L, K / 32, N]");
    }
    p.blocks = static_cast<const uint16_t*>(scales.untyped_data()) + l * (p.K / kQ8Block) * p.N;
  } else if (p.scales != Scales::kNone) {
    return ffi::Error::InvalidArgument("matmul (cpu): unknown scale kind");
  }
  if ((p.scales != Scales::kNone) != (p.w_type == W::kS8)) {
    return ffi::Error::InvalidArgument("matmul (cpu): int8 weights need scales, float weights none");
  }
  p.x = x.typed_data();
  p.w = static_cast<const char*>(w.untyped_data()) + l * p.K * p.N * elem_bytes(p.w_type);
  p.y = y->typed_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  if (p.K == 0) {
    std::memset(p.y, 0, sizeof(float) * p.M * p.N);
    return ffi::Error::Success();
  }
  const int panel = p.M <= kWideItemRows ? kWidePanel : kPanel;
  const int64_t panels = (p.N + panel - 1) / panel, row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  parallel_for(pool, panels * row_blocks, [&](int64_t item) {
    const int64_t row0 = item / panels * kRowBlock, n0 = item % panels * panel;
    const int64_t rows = std::min<int64_t>(kRowBlock, p.M - row0);
    const int width = static_cast<int>(std::min<int64_t>(panel, p.N - n0));
    switch (p.w_type) {
      case W::kF32: return run_item_w<W::kF32>(p, row0, rows, n0, width);
      case W::kBF16: return run_item_w<W::kBF16>(p, row0, rows, n0, width);
      case W::kS8: return run_item_w<W::kS8>(p, row0, rows, n0, width);
    }
  });
  return ffi::Error::Success();
}

// ---- y[M, V] = x[M, D] @ e[V, D]^T: the tied LM head, the embedding table read in place ----
//
// Each output is a dot product of two contiguous rows: 16-lane partial sums over D (lane l takes d = l mod 16, in
// order), finished for a whole tile by shuffle trees (sum_lanes16), then D's last D mod 16 terms one by one. Items are
// (kNtRowBlock rows of x, kNtItem rows of e); inside one, each kNtCols-row tile of e (a few KB, in L1) meets every
// kNtRows-row tile of x (in L2).

constexpr int kNtRows = 4;        // x rows per tile
constexpr int kNtCols = 6;        // e rows per tile: 4 x 6 = 24 accumulators
constexpr int kNtRowBlock = 64;   // x rows per item
constexpr int kNtItem = 96;       // e rows per item

// An empty asm that takes v in a vector register: the compiler cannot fold v's load into each multiply-add that
// uses it (GCC did, and the tile's 24 multiply-adds each reloaded a table row: load-bound at 28 loads per 24 FMAs).
inline void keep_in_register(v16f& v) {
#if defined(__AVX512F__)
  __asm__("" : "+v"(v));
#endif
}

template <W T, int MR, int NE>
void nt_tile(const float* __restrict x, const void* e, float* __restrict y, int64_t D, int64_t ldy,
             const char* next, int64_t next_bytes) {
  v16f acc[MR * NE];
#pragma GCC unroll 24
  for (int f = 0; f < MR * NE; ++f) acc[f] = v16f{};
  const int64_t d16 = D - D % 16;
  for (int64_t d = 0; d < d16; d += 16) {
    if (next) {  // the next tile's table rows, ahead of its first pass (which would otherwise wait on memory)
      const int64_t line0 = d / 16 * kNtCols * 64;
#pragma GCC unroll 6
      for (int q = 0; q < kNtCols; ++q) {
        if (line0 + q * 64 < next_bytes) __builtin_prefetch(next + line0 + q * 64, 0, 2);
      }
    }
    v16f b[NE];
#pragma GCC unroll 6
    for (int j = 0; j < NE; ++j) {
      b[j] = load_w<T>(e, j * D + d);
      keep_in_register(b[j]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const v16f a = load16(x + i * D + d);
#pragma GCC unroll 6
      for (int j = 0; j < NE; ++j) acc[i * NE + j] += a * b[j];
    }
  }
  float sums[32];
  for (int f0 = 0; f0 < MR * NE; f0 += 16) {
    v16f part[16];
    for (int f = 0; f < 16; ++f) part[f] = f0 + f < MR * NE ? acc[f0 + f] : v16f{};
    store16(sums + f0, sum_lanes16(part));
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NE; ++j) {
      float sum = sums[i * NE + j];
      for (int64_t d = d16; d < D; ++d) sum = std::fma(x[i * D + d], load_w1<T>(e, j * D + d), sum);
      y[i * ldy + j] = sum;
    }
  }
}

template <W T, int MR>
void nt_tile_cols(int cols, const float* x, const void* e, float* y, int64_t D, int64_t ldy, const char* next,
                  int64_t next_bytes) {
  switch (cols) {
    case 1: return nt_tile<T, MR, 1>(x, e, y, D, ldy, next, next_bytes);
    case 2: return nt_tile<T, MR, 2>(x, e, y, D, ldy, next, next_bytes);
    case 3: return nt_tile<T, MR, 3>(x, e, y, D, ldy, next, next_bytes);
    case 4: return nt_tile<T, MR, 4>(x, e, y, D, ldy, next, next_bytes);
    case 5: return nt_tile<T, MR, 5>(x, e, y, D, ldy, next, next_bytes);
    case 6: return nt_tile<T, MR, 6>(x, e, y, D, ldy, next, next_bytes);
  }
}

template <W T>
void nt_item(const float* x, const void* e, float* y, int64_t M, int64_t V, int64_t D, int64_t row0, int64_t v0) {
  const int64_t rows = std::min<int64_t>(kNtRowBlock, M - row0), cols = std::min<int64_t>(kNtItem, V - v0);
  for (int64_t c = 0; c < cols; c += kNtCols) {
    const int nc = static_cast<int>(std::min<int64_t>(kNtCols, cols - c));
    const char* et = static_cast<const char*>(e) + (v0 + c) * D * elem_bytes<T>();
    const int64_t tile_bytes = nc * D * elem_bytes<T>();
    const int64_t next_bytes = std::min<int64_t>(kNtCols, V - (v0 + c + nc)) * D * elem_bytes<T>();
    for (int64_t r = 0; r < rows; r += kNtRows) {
      const float* xt = x + (row0 + r) * D;
      float* yt = y + (row0 + r) * V + v0 + c;
      const char* next = r == 0 && next_bytes > 0 ? et + tile_bytes : nullptr;
      switch (std::min<int64_t>(kNtRows, rows - r)) {
        case 1: nt_tile_cols<T, 1>(nc, xt, et, yt, D, V, next, next_bytes); break;
        case 2: nt_tile_cols<T, 2>(nc, xt, et, yt, D, V, next, next_bytes); break;
        case 3: nt_tile_cols<T, 3>(nc, xt, et, yt, D, V, next, next_bytes); break;
        default: nt_tile_cols<T, 4>(nc, xt, et, yt, D, V, next, next_bytes); break;
      }
    }
  }
}

ffi::Error ImplTransposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer e,
                          ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), ed = e.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || ed[1] != xd[1]) {
    return ffi::Error::InvalidArgument("matmul_transposed (cpu): x must be [M, D] and e [V, D]");
  }
  const int64_t M = xd[0], D = xd[1], V = ed[0];
  if (y->element_count() != static_cast<size_t>(M * V)) {
    return ffi::Error::InvalidArgument("matmul_transposed (cpu): y must be [M, V]");
  }
  if (e.element_type() != ffi::DataType::F32 && e.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("matmul_transposed (cpu): e must be float32 or bfloat16");
  }
  const bool f32 = e.element_type() == ffi::DataType::F32;
  const int64_t items_v = (V + kNtItem - 1) / kNtItem, items_m = (M + kNtRowBlock - 1) / kNtRowBlock;
  const float* xp = x.typed_data();
  const void* ep = e.untyped_data();
  float* yp = y->typed_data();
  parallel_for(pool, items_v * items_m, [&](int64_t item) {
    const int64_t row0 = item / items_v * kNtRowBlock, v0 = item % items_v * kNtItem;
    if (f32) {
      nt_item<W::kF32>(xp, ep, yp, M, V, D, row0, v0);
    } else {
      nt_item<W::kBF16>(xp, ep, yp, M, V, D, row0, v0);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatmulCpu, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // w [L, K, N]: float32, bfloat16 or int8
                                  .Arg<ffi::AnyBuffer>()         // scales: [L, N] f32, [L, K / 32, N] f16, or unused
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Attr<int64_t>("scale_kind")   // 0 none, 1 per column, 2 per block of 32 rows
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatmulTransposedCpu, ImplTransposed,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, D]
                                  .Arg<ffi::AnyBuffer>()         // e [V, D]: float32 or bfloat16
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [M, V]
