// Ragged paged attention for CPU: an XLA FFI custom call that reads the KV pages where they lie.
//
// Why a native kernel: XLA:CPU cannot fuse a gather into a dot, so the plain-XLA path (xla.py) copies every KV block
// out of the page pool before its dots read it, and runs each block as a few dozen small thunks. This kernel walks
// each sequence's page table and reads a page's [C, H] slab of one KV head in place, once per (sequence, KV head,
// query block): the pool is read about once a step, as on the TPU and GPU kernels.
//
// Semantics are those of `ragged_paged_attention` (see __init__.py): q [T, N, H] (float32 / bfloat16), pages
// [P, K, C, H] in q's dtype or int8 / float8_e4m3fn with [P, K, C] float32 scales; query row r of sequence i sits at
// position kv_len - q_len + r and sees keys at positions in (pos - window, pos]; soft_cap > 0 caps the logits; rows
// past cu_q_lens[num_seqs] come back as 0.
//
// Work items are (sequence, KV head, block of up to kBlockRows query rows); the caller and XLA's intra-op thread pool
// take them from a shared counter. Per item: the G = N / K query heads of each row form the item's query vectors;
// keys are visited page by page from the block's first row's window start to its last row's position, with an
// online (running max / sum) softmax per query vector in float32. A page that holds no visible key for a vector
// leaves that vector's state untouched, so a row's arithmetic is the same whichever rows share its block: a row's
// output does not depend on the batch around it (the engine's batch invariance).
//
// Fast path (page size and head dim multiples of 16, e.g. the default 16 x 64): keys in groups of 16, one 16-lane
// multiply-add per 16 elements of a key row and a shuffle tree that finishes 16 dot products at once, a vectorized
// exp; otherwise a scalar-per-key general path. Float32 pages are read in place; bfloat16 and quantized pages are
// converted (and scaled) one page at a time into a small buffer.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "native_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllm;  // NOLINT: the shared vector helpers

constexpr int kBlockRows = 16;    // query rows per work item (a prefill chunk's slabs are read once per 16 rows)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- element conversions ----

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct Fp8Table {  // float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      int sign = b >> 7, exponent = (b >> 3) & 15, mantissa = b & 7;
      float magnitude;
      if (exponent == 15 && mantissa == 7) {
        magnitude = std::numeric_limits<float>::quiet_NaN();
      } else if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa) / 8.0f, -6);
      } else {
        magnitude = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
      }
      value[b] = sign ? -magnitude : magnitude;
    }
  }
};
const Fp8Table kFp8;

enum class Elem { kF32, kBF16, kS8, kF8E4M3FN };

// Element i of an array of E as float32.
template <Elem E>
inline float element(const void* base, int64_t i) {
  if constexpr (E == Elem::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (E == Elem::kBF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
  } else if constexpr (E == Elem::kS8) {
    return static_cast<float>(static_cast<const int8_t*>(base)[i]);
  } else {
    return kFp8.value[static_cast<const uint8_t*>(base)[i]];
  }
}

// n contiguous elements from base + offset as float32, times scale[c] per row of `width` (scale may be null).
template <Elem E>
void load_rows(const void* base, int64_t offset, const float* scale, int rows, int width, float* out) {
  for (int c = 0; c < rows; ++c) {
    const float s = scale ? scale[c] : 1.0f;
    for (int h = 0; h < width; ++h) {
      const float x = element<E>(base, offset + c * width + h);
      out[c * width + h] = scale ? x * s : x;
    }
  }
}

void load_rows_any(const void* base, int64_t offset, const float* scale, int rows, int width, Elem e, float* out) {
  switch (e) {
    case Elem::kF32: return load_rows<Elem::kF32>(base, offset, scale, rows, width, out);
    case Elem::kBF16: return load_rows<Elem::kBF16>(base, offset, scale, rows, width, out);
    case Elem::kS8: return load_rows<Elem::kS8>(base, offset, scale, rows, width, out);
    case Elem::kF8E4M3FN: return load_rows<Elem::kF8E4M3FN>(base, offset, scale, rows, width, out);
  }
}

// exp(x) for x <= 0 (a logit minus the running max), about 1 ulp: Cephes' expf polynomial after x = n ln2 + r.
// Written to vectorize (no calls, no branches); std::exp would be a scalar libm call per key.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // fmax / fmin drop a NaN (x NaN: a NaN or inf logit): n stays a small integer, the polynomial carries the NaN.
  const float n = std::fmin(std::fmax(std::floor(x * 1.44269504088896341f + 0.5f), -127.0f), 127.0f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// ---- the fast path's 16-lane vectors (native_cpu.h): page sizes and head dims that are multiples of 16 ----

// Lane-wise exp for x <= 0, the same polynomial as exp_nonpositive (round to nearest by the 1.5 * 2^23 trick).
inline v16f exp16_nonpositive(v16f x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16f t = x * 1.44269504088896341f + 12582912.0f;
  v16f n = t - 12582912.0f;
  n = n >= -127.0f ? n : splat(-127.0f);  // NaN lanes fail the comparison: a small integer, as in exp_nonpositive
  n = n <= 127.0f ? n : splat(127.0f);
  const v16f r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, 64);
  return p * scale;
}

inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }

inline float hmax16(v16f x) {
  x = vmax(x, SHUFFLE2(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  x = vmax(x, SHUFFLE2(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  x = vmax(x, SHUFFLE2(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  x = vmax(x, SHUFFLE2(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return x[0];
}

inline float hsum16(v16f x) {
  v16f z{};
  const v16f a = fold8(x, z), b = fold4(a, z), c = fold2(b, z), d = fold1(c, z);
  return d[0];
}

struct Problem {
  int T, N, K, H, P, C, S, M, G;
  const void* q;
  Elem q_type;
  const void* k;
  const void* v;
  Elem kv_type;
  const float* k_scales;  // [P, K, C] or null
  const float* v_scales;
  const int32_t* kv_lens;
  const int32_t* page_indices;
  const int32_t* cu_q_lens;
  int num_seqs;
  int64_t window;
  float sm_scale, soft_cap;
  void* out;
};

inline int elem_bytes(Elem e) { return e == Elem::kF32 ? 4 : e == Elem::kBF16 ? 2 : 1; }

// Starts reading a page's K and V slabs of one KV head while the current page is computed: one real load of each
// slab's first byte (its 4 KB OS page is new to the TLB, and this CPU drops software prefetches that miss the TLB),
// then a prefetch into L2 of every line. Without it each page is read only when its first dot product asks:
// 24.5 -> 19.5-20.5 ms for a 32-sequence decode's 30 layers, pages in order; 30 -> 22-25 ms, pages scattered
// (prefetch alone: no change; a page further ahead: no better).
inline void prefetch_page(const Problem& p, int64_t page, int head) {
  const int64_t bytes = static_cast<int64_t>(p.C) * p.H * elem_bytes(p.kv_type);
  const char* k = static_cast<const char*>(p.k) + (page * p.K + head) * bytes;
  const char* v = static_cast<const char*>(p.v) + (page * p.K + head) * bytes;
  (void)*reinterpret_cast<const volatile char*>(k);
  (void)*reinterpret_cast<const volatile char*>(v);
  for (int64_t i = 0; i < bytes; i += 64) {
    __builtin_prefetch(k + i, 0, 1);
    __builtin_prefetch(v + i, 0, 1);
  }
}

struct Item {
  int seq, head, row0, rows;  // rows row0 .. row0 + rows - 1 (absolute query rows) of sequence seq, KV head head
  int64_t cost;
};

// Per-thread scratch, grown to the largest item seen.
struct Scratch {
  std::vector<float> q, scores, slab, values, m, l, acc;
};

// The fast path's step for one query vector and 16 keys of a page (keys g0 .. g0 + 15 of K_rows / V_rows, of which
// [a, b) are visible to the vector's row): scores, the online-softmax update of (m, l) and acc += p @ V.
// HT: the head dim when it is one of the instantiated sizes (registers hold the accumulator), else 0 (runtime H).
template <int HT>
inline void group16(const float* __restrict qv, const float* __restrict K_rows, const float* __restrict V_rows,
                    int H_runtime, int g0, int a, int b, float soft_cap, float* m, float* l, float* __restrict av) {
  const int H = HT ? HT : H_runtime;
  v16f part[16];
  for (int c = 0; c < 16; ++c) {
    const float* kc = K_rows + static_cast<size_t>(g0 + c) * H;
    v16f x = load16(qv) * load16(kc);
    for (int h = 16; h < H; h += 16) x += load16(qv + h) * load16(kc + h);
    part[c] = x;
  }
  v16f sc = sum_lanes16(part);
  if (soft_cap > 0.0f) {
    for (int i = 0; i < 16; ++i) sc[i] = soft_cap * std::tanh(sc[i] / soft_cap);
  }
  const v16i lane = v16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + g0;
  const v16i visible = (lane >= a) & (lane < b);
  sc = visible ? sc : splat(kNegInf);
  const float m_new = std::max(*m, hmax16(sc));
  const float alpha = exp_nonpositive(*m - m_new);
  const v16f pr = visible ? exp16_nonpositive(sc - m_new) : v16f{};
  *l = *l * alpha + hsum16(pr);
  *m = m_new;
  if constexpr (HT != 0) {
    v16f o[HT / 16];
    for (int j = 0; j < HT / 16; ++j) o[j] = load16(av + 16 * j) * alpha;
    if (a == g0 && b == g0 + 16) {  // every key visible (all but a sequence's last group): lanes known statically
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        const float* vc = V_rows + static_cast<size_t>(g0 + c) * HT;
        for (int j = 0; j < HT / 16; ++j) o[j] += pr[c] * load16(vc + 16 * j);
      }
      for (int j = 0; j < HT / 16; ++j) store16(av + 16 * j, o[j]);
      return;
    }
    for (int c = a - g0; c < b - g0; ++c) {
      const float* vc = V_rows + static_cast<size_t>(g0 + c) * HT;
      for (int j = 0; j < HT / 16; ++j) o[j] += pr[c] * load16(vc + 16 * j);
    }
    for (int j = 0; j < HT / 16; ++j) store16(av + 16 * j, o[j]);
  } else {
    for (int h = 0; h < H; h += 16) store16(av + h, load16(av + h) * alpha);
    for (int c = a - g0; c < b - g0; ++c) {
      const float* vc = V_rows + static_cast<size_t>(g0 + c) * H;
      for (int h = 0; h < H; h += 16) store16(av + h, load16(av + h) + pr[c] * load16(vc + h));
    }
  }
}

// The general path's step for one query vector and the keys [a, b) of a page (any page size and head dim).
inline void keys_scalar(const float* qv, const float* K_rows, const float* V_rows, int H, int a, int b, float soft_cap,
                        float* s, float* m, float* l, float* av) {
  float mx = kNegInf;
  for (int c = a; c < b; ++c) {
    const float* kc = K_rows + static_cast<size_t>(c) * H;
    float x = 0.0f;
#pragma omp simd reduction(+ : x)
    for (int h = 0; h < H; ++h) x += qv[h] * kc[h];
    if (soft_cap > 0.0f) x = soft_cap * std::tanh(x / soft_cap);
    s[c] = x;
    mx = std::max(mx, x);
  }
  const float m_new = std::max(*m, mx);
  const float alpha = exp_nonpositive(*m - m_new);
  float sum = 0.0f;
  for (int c = a; c < b; ++c) {
    s[c] = exp_nonpositive(s[c] - m_new);
    sum += s[c];
  }
  *l = *l * alpha + sum;
  *m = m_new;
  for (int h = 0; h < H; ++h) av[h] *= alpha;
  for (int c = a; c < b; ++c) {
    const float pc = s[c];
    const float* vc = V_rows + static_cast<size_t>(c) * H;
#pragma omp simd
    for (int h = 0; h < H; ++h) av[h] += pc * vc[h];
  }
}

void run_item(const Problem& p, const Item& it, Scratch& w) {
  const int H = p.H, C = p.C, G = p.G;
  const int nv = it.rows * G;  // query vectors: row r, head g -> vector r * G + g
  const int q_start = p.cu_q_lens[it.seq], q_len = p.cu_q_lens[it.seq + 1] - q_start;
  const int64_t kv_len = std::min<int64_t>(p.kv_lens[it.seq], static_cast<int64_t>(p.M) * C);
  w.q.resize(static_cast<size_t>(nv) * H);
  w.scores.resize(C);
  w.slab.resize(static_cast<size_t>(C) * H);
  w.values.resize(static_cast<size_t>(C) * H);
  w.m.assign(nv, kNegInf);  // the online softmax per vector: running max, sum and weighted values
  w.l.assign(nv, 0.0f);
  w.acc.assign(static_cast<size_t>(nv) * H, 0.0f);
  float *Q = w.q.data(), *m = w.m.data(), *l = w.l.data(), *acc = w.acc.data();

  // Queries, scaled: vector (r, g) is q[row0 + r, head * G + g] * sm_scale.
  for (int r = 0; r < it.rows; ++r) {
    const int64_t base = (static_cast<int64_t>(it.row0 + r) * p.N + static_cast<int64_t>(it.head) * G) * H;
    load_rows_any(p.q, base, nullptr, G, H, p.q_type, Q + static_cast<size_t>(r) * G * H);
  }
  for (size_t i = 0; i < static_cast<size_t>(nv) * H; ++i) Q[i] *= p.sm_scale;

  // Row r sits at position pos0 + r and sees keys (pos - window, pos]; the block reads keys [lo, hi).
  const int64_t pos0 = kv_len - q_len + (it.row0 - q_start);
  const int64_t lo = std::max<int64_t>(0, pos0 - p.window + 1);
  const int64_t hi = std::min<int64_t>(pos0 + it.rows, kv_len);
  const bool quantized = p.k_scales != nullptr;
  const bool in_place = p.kv_type == Elem::kF32 && !quantized;
  const bool fast = C % 16 == 0 && H % 16 == 0;
  auto page_at = [&](int64_t slot) {  // traced metadata is not validated: never stray outside the pool
    const int64_t page = p.page_indices[static_cast<int64_t>(it.seq) * p.M + slot];
    return std::min<int64_t>(std::max<int64_t>(page, 0), p.P - 1);
  };
  for (int64_t slot = lo / C; slot * C < hi; ++slot) {
    if ((slot + 1) * C < hi) prefetch_page(p, page_at(slot + 1), it.head);
    const int64_t page = page_at(slot), key0 = slot * C;
    const int c_lo = static_cast<int>(std::max<int64_t>(lo - key0, 0));
    const int c_hi = static_cast<int>(std::min<int64_t>(hi - key0, C));  // keys [c_lo, c_hi) of the page are read
    const int64_t slab_off = (page * p.K + it.head) * static_cast<int64_t>(C) * H;
    const int64_t scale_off = (page * p.K + it.head) * static_cast<int64_t>(C);

    // K and V rows as float32: in place for float32 pages, else the page dequantized. Keys outside a vector's
    // visible range are masked out of its scores (fast path) or never read (general path), and their values never
    // read, so the tail of a page past kv_len, which may hold anything, cannot leak.
    const float* K_rows = static_cast<const float*>(p.k) + slab_off;
    const float* V_rows = static_cast<const float*>(p.v) + slab_off;
    if (!in_place) {
      load_rows_any(p.k, slab_off, quantized ? p.k_scales + scale_off : nullptr, C, H, p.kv_type, w.slab.data());
      load_rows_any(p.v, slab_off, quantized ? p.v_scales + scale_off : nullptr, C, H, p.kv_type, w.values.data());
      K_rows = w.slab.data();
      V_rows = w.values.data();
    }
    // Groups of 16 keys (the fast path), or the page's keys as one group.
    const int step = fast ? 16 : C;
    for (int g0 = fast ? c_lo / 16 * 16 : 0; g0 < c_hi; g0 += step) {
      for (int r = 0; r < it.rows; ++r) {
        const int64_t pos = pos0 + r;
        const int a = static_cast<int>(std::max<int64_t>({pos - p.window + 1 - key0, int64_t{c_lo}, int64_t{g0}}));
        const int b = static_cast<int>(std::min<int64_t>({pos + 1 - key0, int64_t{c_hi}, int64_t{g0} + step}));
        if (a >= b) continue;  // no visible key here: the row's state is untouched
        for (int g = 0; g < G; ++g) {
          const int vi = r * G + g;
          const float* qv = Q + static_cast<size_t>(vi) * H;
          float* av = acc + static_cast<size_t>(vi) * H;
          if (!fast) {
            keys_scalar(qv, K_rows, V_rows, H, a, b, p.soft_cap, w.scores.data(), m + vi, l + vi, av);
          } else if (H == 64) {
            group16<64>(qv, K_rows, V_rows, H, g0, a, b, p.soft_cap, m + vi, l + vi, av);
          } else if (H == 128) {
            group16<128>(qv, K_rows, V_rows, H, g0, a, b, p.soft_cap, m + vi, l + vi, av);
          } else {
            group16<0>(qv, K_rows, V_rows, H, g0, a, b, p.soft_cap, m + vi, l + vi, av);
          }
        }
      }
    }
  }

  // o[row, head * G + g] = acc / l (0 where no key was visible).
  for (int r = 0; r < it.rows; ++r) {
    for (int g = 0; g < G; ++g) {
      const int vi = r * G + g;
      const float inv = l[vi] > 0.0f ? 1.0f / l[vi] : 0.0f;
      const float* av = acc + static_cast<size_t>(vi) * H;
      const int64_t o = (static_cast<int64_t>(it.row0 + r) * p.N + static_cast<int64_t>(it.head) * G + g) * H;
      if (p.q_type == Elem::kF32) {
        float* out = static_cast<float*>(p.out) + o;
        for (int h = 0; h < H; ++h) out[h] = av[h] * inv;
      } else {
        uint16_t* out = static_cast<uint16_t*>(p.out) + o;
        for (int h = 0; h < H; ++h) out[h] = f32_to_bf16(av[h] * inv);
      }
    }
  }
}

bool elem_of(ffi::DataType t, Elem* e) {
  switch (t) {
    case ffi::DataType::F32: *e = Elem::kF32; return true;
    case ffi::DataType::BF16: *e = Elem::kBF16; return true;
    case ffi::DataType::S8: *e = Elem::kS8; return true;
    case ffi::DataType::F8E4M3FN: *e = Elem::kF8E4M3FN; return true;
    default: return false;
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                ffi::Buffer<ffi::F32> k_scales, ffi::Buffer<ffi::F32> v_scales, ffi::Buffer<ffi::S32> kv_lens,
                ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                ffi::Buffer<ffi::S32> window, float sm_scale, float soft_cap, ffi::Result<ffi::AnyBuffer> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2) {
    return ffi::Error::InvalidArgument("ragged paged attention (cpu): q must be [T, N, H], pages [P, K, C, H] and "
                                       "page_indices [S, M]");
  }
  Problem p;
  p.T = static_cast<int>(qd[0]);
  p.N = static_cast<int>(qd[1]);
  p.H = static_cast<int>(qd[2]);
  p.P = static_cast<int>(kd[0]);
  p.K = static_cast<int>(kd[1]);
  p.C = static_cast<int>(kd[2]);
  p.S = static_cast<int>(pd[0]);
  p.M = static_cast<int>(pd[1]);
  if (p.K == 0 || p.N % p.K || kd[3] != p.H) {
    return ffi::Error::InvalidArgument("ragged paged attention (cpu): N must be a multiple of K and pages' H q's H");
  }
  const auto vd = v.dimensions();
  bool same_pages = vd.size() == kd.size();
  for (size_t i = 0; same_pages && i < kd.size(); ++i) same_pages = vd[i] == kd[i];
  if (!same_pages || kv_lens.element_count() != static_cast<size_t>(p.S) ||
      cu_q_lens.element_count() != static_cast<size_t>(p.S) + 1 || num_seqs.element_count() < 1 ||
      window.element_count() < 1 || out->element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument("ragged paged attention (cpu): v_pages must match k_pages, kv_lens be [S], "
                                       "cu_q_lens [S + 1], num_seqs and window scalars, the output q's shape");
  }
  if (p.P == 0 || p.S == 0 || p.T == 0) {  // nothing to read: every row is 0
    std::memset(out->untyped_data(), 0, out->size_bytes());
    return ffi::Error::Success();
  }
  p.G = p.N / p.K;
  if (!elem_of(q.element_type(), &p.q_type) || !elem_of(k.element_type(), &p.kv_type) ||
      (p.q_type != Elem::kF32 && p.q_type != Elem::kBF16) || k.element_type() != v.element_type() ||
      out->element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("ragged paged attention (cpu): unsupported dtypes");
  }
  const bool quantized = p.kv_type == Elem::kS8 || p.kv_type == Elem::kF8E4M3FN;
  if (quantized && (k_scales.element_count() != static_cast<size_t>(p.P) * p.K * p.C ||
                    v_scales.element_count() != k_scales.element_count())) {
    return ffi::Error::InvalidArgument("ragged paged attention (cpu): quantized pages need [P, K, C] scales");
  }
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.k_scales = quantized ? k_scales.typed_data() : nullptr;
  p.v_scales = quantized ? v_scales.typed_data() : nullptr;
  p.kv_lens = kv_lens.typed_data();
  p.page_indices = page_indices.typed_data();
  p.cu_q_lens = cu_q_lens.typed_data();
  p.num_seqs = std::min(std::max(num_seqs.typed_data()[0], 0), p.S);
  p.window = std::max<int64_t>(window.typed_data()[0], 1);
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.out = out->untyped_data();

  // Rows no sequence owns (bucket padding) are 0; so is everything when the metadata is out of range.
  const size_t row_bytes = static_cast<size_t>(p.N) * p.H * (p.q_type == Elem::kF32 ? 4 : 2);
  std::memset(p.out, 0, row_bytes * p.T);

  std::vector<Item> items;
  for (int i = 0; i < p.num_seqs; ++i) {
    const int start = p.cu_q_lens[i], end = std::min(p.cu_q_lens[i + 1], p.T);
    if (start < 0 || end <= start) continue;
    const int64_t kv_len = std::min<int64_t>(p.kv_lens[i], static_cast<int64_t>(p.M) * p.C);
    for (int row0 = start; row0 < end; row0 += kBlockRows) {
      const int rows = std::min(kBlockRows, end - row0);
      const int64_t pos_last = kv_len - (end - start) + (row0 - start) + rows - 1;
      const int64_t keys = std::max<int64_t>(std::min(pos_last + 1, std::min(p.window + rows, kv_len)), 0);
      for (int h = 0; h < p.K; ++h) items.push_back(Item{i, h, row0, rows, keys * (rows + 4)});
    }
  }
  // Longest first, so that the last items taken are short ones.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  if (items.empty()) return ffi::Error::Success();

  parallel_for(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    thread_local Scratch scratch;  // kept by each pool thread across calls: no allocation per layer once warm
    run_item(p, items[i], scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmRaggedPagedAttentionCpu, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // q [T, N, H]
                                  .Arg<ffi::AnyBuffer>()            // k_pages [P, K, C, H]
                                  .Arg<ffi::AnyBuffer>()            // v_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()     // k_scales [P, K, C] (a [1] dummy for floats)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // v_scales
                                  .Arg<ffi::Buffer<ffi::S32>>()     // kv_lens [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // page_indices [S, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // cu_q_lens [S + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // num_seqs []
                                  .Arg<ffi::Buffer<ffi::S32>>()     // window []
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")          // <= 0: none
                                  .Ret<ffi::AnyBuffer>());          // o [T, N, H], q's dtype
