// CPU GQA paged decode attention over a token-granular block pool, read in place.
//
//   out[b, h*G + g, :] = softmax_t(scale * q[b, h*G + g] . K[b, h, t]) @ V[b, h, t],  first_b <= t < context_lens[b]
//
// first_b = max(0, context_lens[b] - window) with a sliding window (window > 0), else 0. With attention
// sinks (gpt-oss: one logit per query head, an extra key column that takes probability mass and has no
// value), exp(sink - m) joins the softmax's denominator once, after the partials of a split context merge.
//
// K/V pools are [num_blocks, n_kv_heads, block_size, head_dim]; token t of sequence b lives in block
// block_table[b, t / block_size] at row t % block_size. See moe_lightning/kernels/cpu_attention.py for
// the contract and the design notes (work units, tiles, vectorisation).
//
// Build: JIT through torch.utils.cpp_extension with -fopenmp and CPU_CAPABILITY_{AVX512,AVX2} defined to
// match torch's own detected capability, so at::vec::Vectorized<float> is a zmm (16 lanes) or ymm (8).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int VL = Vec::size();  // fp32 lanes: 16 (AVX-512), 8 (AVX2)
constexpr int TILE = VL;         // tokens per tile: one score vector per query head
constexpr int GMAX = 8;          // query heads per kv head handled in one pass (1, 4 or 8)
// Software prefetch: rows PF_TILES tiles ahead, into L2 (locality 2 = prefetcht1), every line of a row.
// Measured on a Zen 4 guest (2 threads, bf16, random 4 KiB blocks, a noisy host): none 7-10 GB/s, 1-2
// tiles ahead 18-24, 3-4 tiles 3-10% above 2; prefetcht2 the same, prefetcht0 (into L1) about half.
constexpr int PF_TILES = 4;
inline void prefetch_l2(const void* p) {
  __builtin_prefetch(p, 0, 2);
}
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// unroll<N>(f) calls f(std::integral_constant<int, 0>) ... f(<N - 1>): indices known at compile time, so
// arrays of vectors indexed by them (accumulators, a row's chunks) stay in registers. (With plain loops
// GCC kept the P @ V accumulators on the stack: a store-to-load round trip on every FMA.)
template <typename F, int... I>
inline void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

template <typename T>
inline Vec load_f32(const T* p) {
  Vec out;
  at::vec::load_to_float<T>(p, out);  // VL bf16/fp16 values -> VL fp32 lanes
  return out;
}
template <>
inline Vec load_f32<float>(const float* p) {
  return Vec::loadu(p);
}

// Loads of a K/V row as fp32 vectors, UNIT vectors (UNIT * VL elements) per load. A loader may place
// the row's elements in another order (`slot`): q is stored in that order, the dot products do not
// care, and the accumulators are put back in order when the output is written.
template <typename kv_t, bool PAIR>
struct RowLoad {
  static constexpr int UNIT = 1;
  static inline void load(const kv_t* p, Vec* out) { out[0] = load_f32(p); }
  static inline int slot(int d) { return d; }
};
#if defined(CPU_CAPABILITY_AVX512)
// bf16: one 512-bit load of 32 values; the even ones are the low halves of the 32-bit lanes (shift
// left by 16), the odd ones the high halves (mask). Two integer ops, no cross-lane shuffle (the
// in-order widening costs a vpmovzxwd per 16 values, which runs on the shuffle port).
template <>
struct RowLoad<at::BFloat16, true> {
  static constexpr int UNIT = 2;
  static inline void load(const at::BFloat16* p, Vec* out) {
    const __m512i x = _mm512_loadu_si512(p);
    out[0] = Vec(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
    out[1] = Vec(_mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u))));
  }
  static inline int slot(int d) {  // element d of a 32-value group -> its lane in the two vectors
    const int r = d % 32;
    return d - r + (r & 1) * 16 + r / 2;
  }
};
#endif

// DP's P @ V: two V rows interleaved by 16-bit unpacks, so each 32-bit lane holds (v_t[d], v_t+1[d])
// and one vdpbf16ps adds p_t v_t[d] + p_t+1 v_t+1[d]. Per 32 columns the accumulators are two vectors:
// the unpacklo lanes (columns 8k..8k+3 of each 128-bit lane k) and the unpackhi lanes (8k+4..8k+7).
inline int pair_slot(int d) {
  const int r = d % 32, k = r / 8, j = r % 8;
  return d - r + (j < 4 ? 0 : 16) + 4 * k + j % 4;
}

// r[i] = sum of the lanes of a[i], i < VL: a transposing add tree instead of VL horizontal sums.
inline Vec transpose_sum(const Vec* a) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of a[2i] = x, a[2i+1] = y
    __m512 x = a[2 * i], y = a[2 * i + 1];
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: partial sums of a[4i .. 4i+3], in order
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [c0 L0+L1, c0 L2+L3, c1 L0+L1, c1 L2+L3]
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1))));
#else
  alignas(64) float r[VL];
  for (int i = 0; i < VL; ++i)
    r[i] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a[i]);
  return Vec::loadu(r);
#endif
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

inline float read_scalar(const void* p, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kFloat: return static_cast<const float*>(p)[i];
    case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const at::Half*>(p)[i]);
  }
}
inline void write_scalar(void* p, at::ScalarType t, int64_t i, float v) {
  switch (t) {
    case at::kFloat: static_cast<float*>(p)[i] = v; break;
    case at::kBFloat16: static_cast<at::BFloat16*>(p)[i] = at::BFloat16(v); break;
    default: static_cast<at::Half*>(p)[i] = at::Half(v); break;
  }
}

// One work unit: query heads [h*G, h*G + G) of sequence b over its tokens [t0, t1).
struct Unit {
  int32_t b, h, t0, t1;
  int32_t slot;  // -1: the unit covers the whole context and writes `out`; else its partial's index
};

struct Args {
  const void* q;  // [B, Hq, D]
  at::ScalarType q_type;
  const void* k_pool;  // [NB, Hkv, BS, D]
  const void* v_pool;
  const int32_t* table;  // [B, MB]
  void* out;             // [B, Hq, D], q's dtype
  float* partial;        // [slots, G, D + 2]: unnormalised acc, running max, running sum
  const float* sinks;    // [Hq] attention-sink logits (in the scaled scores' units), or nullptr
  int64_t Hq, Hkv, G, BS, MB;
  float scale;
};

// The softmax denominator sum_t e^{s_t - m} plus a sink's e^{sink - m}. A sink far above every score
// makes it +inf and the output 0, the limit of the exact result.
inline float with_sink(float l, float m, const float* sinks, int64_t head) {
  return sinks == nullptr ? l : l + std::exp(sinks[head] - m);
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

// DP: bf16 K and bf16 q, scores by vdpbf16ps (32 bf16 products per instruction, accumulated in fp32;
// a product of two bf16 is exact in fp32), the scale applied to the scores. Else fp32 FMAs on K
// converted to fp32 and q * scale in fp32.
// `next`: the unit this thread runs after this one (its first rows are prefetched during this one's
// last tiles); `head_prefetched`: the previous unit did that for this one.
template <typename kv_t, int G, int NC, int MODE>
void attend_unit(const Unit& u, const Unit* next, bool head_prefetched, const Args& a) {
  constexpr bool DP = MODE >= 1;   // scores by vdpbf16ps (bf16 q and K)
  constexpr bool DPV = MODE == 2;  // and P @ V by vdpbf16ps, P rounded to bf16 (opt-in: p_bf16)
  constexpr int D = NC * VL;
  using RL = RowLoad<kv_t, NC % 2 == 0>;  // bf16 pairs need an even number of vectors
  constexpr int U = RL::UNIT;
  static_assert(NC % U == 0, "head_dim must be a whole number of loads");
  const int64_t hq0 = u.h * a.G;  // first query head of this kv head
  alignas(64) float qf[DP ? 1 : G][D];     // scale * q, fp32; heads past the real group are zeros (discarded)
  alignas(64) at::BFloat16 qb[DP ? G : 1][D];  // DP: q as it is (bf16)
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) {
      const int64_t i = ((int64_t)u.b * a.Hq + hq0 + g) * D + d;
      if constexpr (DP)
        qb[g][d] = g < a.G ? static_cast<const at::BFloat16*>(a.q)[i] : at::BFloat16(0.f);
      else
        qf[g][RL::slot(d)] = g < a.G ? a.scale * read_scalar(a.q, a.q_type, i) : 0.f;
    }

  alignas(64) float acc[G][D];
  float m[G];
  alignas(64) float alpha[VL];
  Vec lsum[G];  // running softmax denominators, lane-wise
  for (int g = 0; g < G; ++g) {
    m[g] = NEG_INF;
    lsum[g] = Vec(0.f);
    for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
  }
  Vec part[G][TILE];
  alignas(64) float p[G][TILE];
  alignas(64) uint32_t pb[DPV ? G : 1][TILE / 2];  // DPV: P as bf16 pairs (t, t + 1)
  const auto out_slot = [](int d) { return DPV ? pair_slot(d) : RL::slot(d); };
  const kv_t* krow[TILE];
  const kv_t* vrow[TILE + 1];

  const kv_t* kp = static_cast<const kv_t*>(a.k_pool);
  const kv_t* vp = static_cast<const kv_t*>(a.v_pool);
  const int64_t chunk = a.BS * D;  // one (block, kv head): block_size rows of D, contiguous
  // Two cursors through the block table: one over the rows computed now, one PF_TILES tiles ahead
  // whose rows are prefetched into L2 (and on into the next unit's first rows). The blocks lie
  // anywhere in the pool, so each is a new page that the hardware prefetcher finds only after a few
  // misses; and a unit that started cold waited a full memory latency per tile until it got going.
  struct Cursor {
    const int32_t* table;
    int64_t h, pos, end, blk, off, base;
    bool in_next;
  };
  auto start = [&](const Unit& w, int64_t pos, bool in_next) {
    Cursor c{a.table + (int64_t)w.b * a.MB, w.h, pos, w.t1, pos / a.BS, pos % a.BS, 0, in_next};
    c.base = ((int64_t)c.table[c.blk] * a.Hkv + c.h) * chunk;
    return c;
  };
  auto advance = [&](Cursor& c) {  // -> the row offset of the cursor's token, then steps to the next
    if (c.off == a.BS) {
      c.off = 0;
      c.base = ((int64_t)c.table[++c.blk] * a.Hkv + c.h) * chunk;
    }
    ++c.pos;
    return c.base + (c.off++) * D;
  };
  auto more = [&](Cursor& c) {  // rows left: this unit's, then the next unit's
    if (c.pos < c.end) return true;
    if (next == nullptr || c.in_next) return false;
    c = start(*next, next->t0, true);
    return true;
  };
  constexpr int LINES = (int)(D * sizeof(kv_t) / 64);  // cache lines per row
  const int64_t head = (int64_t)PF_TILES * TILE;      // rows the prefetch runs ahead
  Cursor cur = start(u, u.t0, false), ahead = cur;
  if (head_prefetched) {  // the previous unit prefetched this unit's first `head` rows (or all of them)
    if (u.t0 + head < u.t1)
      ahead = start(u, u.t0 + head, false);
    else if (next != nullptr)
      ahead = start(*next, next->t0, true);
    else
      ahead.pos = ahead.end, ahead.in_next = true;
  } else {
    for (int64_t k = 0; k < head && more(ahead); ++k) {
      const int64_t r = advance(ahead);
      for (int i = 0; i < LINES; ++i) {
        prefetch_l2(reinterpret_cast<const char*>(kp + r) + 64 * i);
        prefetch_l2(reinterpret_cast<const char*>(vp + r) + 64 * i);
      }
    }
  }

  const kv_t* kfut[TILE];  // the rows PF_TILES tiles ahead, prefetched while this tile computes
  const kv_t* vfut[TILE];
  for (int64_t pos = u.t0; pos < u.t1; pos += TILE) {
    const int n = (int)std::min<int64_t>(TILE, u.t1 - pos);
    for (int t = 0; t < n; ++t) {
      const int64_t r = advance(cur);
      krow[t] = kp + r;
      vrow[t] = vp + r;
    }
    int nfut = 0;
    for (; nfut < TILE && more(ahead); ++nfut) {
      const int64_t r = advance(ahead);
      kfut[nfut] = kp + r;
      vfut[nfut] = vp + r;
    }
    // Prefetches are spread over the whole tile, K's over the scores and V's over P @ V, one future
    // row's lines per row computed: issued in bursts (all during the scores), the memory sat idle
    // while P @ V computed, so the two times added up.
    for (int t = 0; t < n; ++t) {
      if (t < nfut)
        for (int i = 0; i < LINES; ++i) prefetch_l2(reinterpret_cast<const char*>(kfut[t]) + 64 * i);
      if constexpr (DP) {
#if HAVE_DPBF16
        __m512i k[NC / 2];
        unroll<NC / 2>([&](auto j) { k[j] = _mm512_loadu_si512(krow[t] + 32 * j); });
        unroll<G>([&](auto g) {
          __m512 sc = _mm512_setzero_ps();
          unroll<NC / 2>([&](auto j) {
            sc = _mm512_dpbf16_ps(sc, (__m512bh)k[j], (__m512bh)_mm512_load_si512(&qb[g][32 * j]));
          });
          part[g][t] = Vec(sc);
        });
#endif
      } else {
        Vec k[NC];
        unroll<NC / U>([&](auto c) { RL::load(krow[t] + c * U * VL, &k[c * U]); });
        unroll<G>([&](auto g) {
          Vec sc = k[0] * Vec::loadu(&qf[g][0]);
          unroll<NC - 1>([&](auto c) { sc = at::vec::fmadd(k[c + 1], Vec::loadu(&qf[g][(c + 1) * VL]), sc); });
          part[g][t] = sc;
        });
      }
    }
    for (int t = n; t < TILE; ++t)
      for (int g = 0; g < G; ++g) part[g][t] = Vec(0.f);
    // Online softmax over the tile: each head's tile max, then one vector exp for every head's rescale
    // factor (no scalar libm call in the loop); the running sums stay lane-wise until the end.
    {
      Vec sc[G];
      alignas(64) float m_old[VL] = {}, m_new[VL] = {};
      unroll<G>([&](auto g) {
        sc[g] = transpose_sum(part[g]);
        if constexpr (DP) sc[g] = sc[g] * Vec(a.scale);
        if (n < TILE) sc[g] = Vec::set(Vec(NEG_INF), sc[g], n);
        m_old[g] = m[g];
        m[g] = m_new[g] = std::max(m[g], hmax(sc[g]));
      });
      (Vec::loadu(m_old) - Vec::loadu(m_new)).exp_u20().store(alpha);  // 0 on the first tile (m = -inf)
      unroll<G>([&](auto g) {
        Vec e = (sc[g] - Vec(m[g])).exp_u20();
        if constexpr (DPV) {
#if HAVE_DPBF16
          // P rounded to bf16 for vdpbf16ps, and the denominator summed from the same rounded values,
          // so the weights still sum to one.
          const __m256i eb = (__m256i)_mm512_cvtneps_pbh(e);
          _mm256_store_si256(reinterpret_cast<__m256i*>(&pb[g][0]), eb);
          e = Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(eb), 16)));
#endif
        } else {
          e.store(&p[g][0]);
        }
        lsum[g] = at::vec::fmadd(lsum[g], Vec(alpha[g]), e);
      });
    }
    // acc = alpha * acc + P @ V, one load (U vectors) of columns at a time, its U x G accumulators in
    // registers across the tile's rows.
    if constexpr (DPV) {
#if HAVE_DPBF16
      if (n & 1) vrow[n] = vrow[n - 1];  // an odd tile: its last pair's second row has weight 0
      const int npairs = (n + 1) / 2;
      unroll<NC / 2>([&](auto ci) {  // 32 columns at a time
        constexpr int c = decltype(ci)::value * 2;
        __m512 o[2][G];
        unroll<2>([&](auto j) {
          unroll<G>([&](auto g) {
            o[j][g] = _mm512_mul_ps(_mm512_load_ps(&acc[g][(c + j) * VL]), _mm512_set1_ps(alpha[g]));
          });
        });
        for (int i = 0; i < npairs; ++i) {
          if (2 * i < nfut) prefetch_l2(vfut[2 * i] + c * VL);  // the same 64 bytes, PF_TILES tiles ahead
          if (2 * i + 1 < nfut) prefetch_l2(vfut[2 * i + 1] + c * VL);
          const __m512i x = _mm512_loadu_si512(vrow[2 * i] + c * VL), y = _mm512_loadu_si512(vrow[2 * i + 1] + c * VL);
          const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
          unroll<G>([&](auto g) {
            const __m512i pp = _mm512_set1_epi32((int)pb[g][i]);
            o[0][g] = _mm512_dpbf16_ps(o[0][g], (__m512bh)lo, (__m512bh)pp);
            o[1][g] = _mm512_dpbf16_ps(o[1][g], (__m512bh)hi, (__m512bh)pp);
          });
        }
        unroll<2>([&](auto j) { unroll<G>([&](auto g) { _mm512_store_ps(&acc[g][(c + j) * VL], o[j][g]); }); });
      });
#endif
      continue;
    }
    unroll<NC / U>([&](auto ci) {
      constexpr int c = decltype(ci)::value * U;
      Vec o[U][G];
      unroll<U>([&](auto j) {
        unroll<G>([&](auto g) { o[j][g] = Vec::loadu(&acc[g][(c + j) * VL]) * Vec(alpha[g]); });
      });
      for (int t = 0; t < n; ++t) {
        if (t < nfut) prefetch_l2(vfut[t] + c * VL);  // the columns loaded next, PF_TILES tiles ahead
        Vec v[U];
        RL::load(vrow[t] + c * VL, v);
        unroll<G>([&](auto g) {
          const Vec pg(p[g][t]);
          unroll<U>([&](auto j) { o[j][g] = at::vec::fmadd(pg, v[j], o[j][g]); });
        });
      }
      unroll<U>([&](auto j) { unroll<G>([&](auto g) { o[j][g].store(&acc[g][(c + j) * VL]); }); });
    });
  }

  float l[G];
  for (int g = 0; g < G; ++g) l[g] = hsum(lsum[g]);
  const int greal = (int)std::min<int64_t>(G, a.G);
  if (u.slot < 0) {
    for (int g = 0; g < greal; ++g) {
      const float inv = 1.f / with_sink(l[g], m[g], a.sinks, hq0 + g);
      const int64_t row = ((int64_t)u.b * a.Hq + hq0 + g) * D;
      for (int d = 0; d < D; ++d) write_scalar(a.out, a.q_type, row + d, acc[g][out_slot(d)] * inv);
    }
  } else {
    float* dst = a.partial + (int64_t)u.slot * G * (D + 2);
    for (int g = 0; g < G; ++g, dst += D + 2) {
      for (int d = 0; d < D; ++d) dst[d] = acc[g][out_slot(d)];
      dst[D] = m[g];
      dst[D + 1] = l[g];
    }
  }
}

// Merge the partials of a split context: out = sum_i e^{m_i - M} acc_i / sum_i e^{m_i - M} l_i.
template <int G>
void combine(int64_t b, int64_t h, int32_t slot0, int32_t nslots, int64_t D, const Args& a) {
  const int64_t stride = G * (D + 2);
  const int greal = (int)std::min<int64_t>(G, a.G);
  std::vector<float> o(D);
  for (int g = 0; g < greal; ++g) {
    float M = NEG_INF, L = 0.f;
    for (int s = 0; s < nslots; ++s) M = std::max(M, a.partial[(slot0 + s) * stride + g * (D + 2) + D]);
    std::fill(o.begin(), o.end(), 0.f);
    for (int s = 0; s < nslots; ++s) {
      const float* src = a.partial + (slot0 + s) * stride + g * (D + 2);
      const float w = std::exp(src[D] - M);
      L += w * src[D + 1];
      for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
    }
    L = with_sink(L, M, a.sinks, h * a.G + g);
    const int64_t row = (b * a.Hq + h * a.G + g) * D;
    for (int64_t d = 0; d < D; ++d) write_scalar(a.out, a.q_type, row + d, o[d] / L);
  }
}

using UnitFn = void (*)(const Unit&, const Unit*, bool, const Args&);

// Compiled: head_dim 16 (the tiny test model), 64, 128; groups 1, 4, 8 (2 and 3 run as 4, 5-7 as 8,
// with zero query heads whose outputs are discarded). Each combination is one instantiation per
// storage dtype, so the list is kept short for the build time.
template <typename kv_t, int G, int MODE>
UnitFn pick_nc(int64_t D) {
  if (D == 16 && MODE == 0) return &attend_unit<kv_t, G, 16 / VL, 0>;
  if (D == 64) return &attend_unit<kv_t, G, 64 / VL, MODE>;
  if (D == 128) return &attend_unit<kv_t, G, 128 / VL, MODE>;
  return nullptr;
}

template <typename kv_t, int MODE = 0>
UnitFn pick_g(int64_t Gp, int64_t D) {
  switch (Gp) {
    case 1: return pick_nc<kv_t, 1, MODE>(D);
    case 4: return pick_nc<kv_t, 4, MODE>(D);
    default: return pick_nc<kv_t, 8, MODE>(D);
  }
}

int64_t padded_group(int64_t G) {
  return G <= 1 ? 1 : G <= 4 ? 4 : 8;
}

}  // namespace

bool supported(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim) {
  if (n_kv_heads <= 0 || n_heads % n_kv_heads != 0) return false;
  const int64_t G = n_heads / n_kv_heads;
  return G >= 1 && G <= GMAX && (head_dim == 16 || head_dim == 64 || head_dim == 128) && head_dim % VL == 0;
}

// Tokens per work unit: a context longer than this is split (flash-decoding) when the whole-context
// units are too few or too uneven to keep every thread busy; 0 = never split.
int64_t split_tokens(const std::vector<int64_t>& lens, int64_t Hkv, int64_t threads) {
  if (threads <= 1) return 0;
  const int64_t total = std::accumulate(lens.begin(), lens.end(), int64_t(0)) * Hkv;
  const int64_t longest = *std::max_element(lens.begin(), lens.end());
  const int64_t target = std::max<int64_t>(512, (total / (threads * 4) + TILE - 1) / TILE * TILE);
  return longest > target ? target : 0;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_table, const at::Tensor& context_lens, double scale,
                                  bool p_bf16, int64_t window, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4, "q [B, Hq, D], pools [NB, Hkv, BS, D]");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes() && k_pool.scalar_type() == v_pool.scalar_type(),
              "k_pool and v_pool must have the same shape and dtype");
  TORCH_CHECK(q.device().is_cpu() && k_pool.device().is_cpu() && v_pool.device().is_cpu() &&
                  block_table.device().is_cpu() && context_lens.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "the pools must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_table and context_lens must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = k_pool.size(0), Hkv = k_pool.size(1), BS = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D, "head_dim of q and the pools differ");
  TORCH_CHECK(supported(Hq, Hkv, D), "unsupported shape: Hq=", Hq, " Hkv=", Hkv, " D=", D);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && context_lens.numel() == B,
              "block_table [B, max_blocks] and context_lens [B]");
  const auto qt = q.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf, "q must be fp32, bf16 or fp16");
  const auto qc = q.contiguous();
  const auto table = block_table.contiguous();
  const auto lens_t = context_lens.contiguous();
  const int64_t MB = table.size(1);
  const int32_t* tab = table.data_ptr<int32_t>();
  const int32_t* lens_p = lens_t.data_ptr<int32_t>();
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no window), got ", window);
  at::Tensor sink_t;  // fp32 copy, alive for the call
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->numel() == Hq && sinks->device().is_cpu(), "sinks: one logit per query head (", Hq,
                "), on the CPU");
    sink_t = sinks->to(at::kFloat).contiguous();
  }

  // Each sequence's window [first, L), and every block the kernel will read validated (one int per
  // block: negligible next to the block); blocks before a window are never read.
  std::vector<int64_t> firsts(B), lens(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens_p[b];
    TORCH_CHECK(L >= 1 && L <= MB * BS, "context_lens[", b, "]=", L, " outside [1, ", MB * BS, "]");
    const int64_t first = window > 0 ? std::max<int64_t>(0, L - window) : 0;
    for (int64_t i = first / BS, n = (L + BS - 1) / BS; i < n; ++i) {
      const int32_t id = tab[b * MB + i];
      TORCH_CHECK(id >= 0 && id < NB, "block_table[", b, ", ", i, "]=", id, " outside [0, ", NB, ")");
    }
    firsts[b] = first;
    lens[b] = L - first;  // tokens read
  }
  auto out = at::empty_like(qc);
  if (B == 0) return out;

  const int64_t G = Hq / Hkv, Gp = padded_group(G);
  UnitFn fn = nullptr;
  switch (k_pool.scalar_type()) {
    case at::kFloat: fn = pick_g<float>(Gp, D); break;
    case at::kBFloat16:
      if (HAVE_DPBF16 && qt == at::kBFloat16 && D % 32 == 0)
        fn = p_bf16 ? pick_g<at::BFloat16, 2 * HAVE_DPBF16>(Gp, D) : pick_g<at::BFloat16, HAVE_DPBF16>(Gp, D);
      else
        fn = pick_g<at::BFloat16>(Gp, D);
      break;
    case at::kHalf: fn = pick_g<at::Half>(Gp, D); break;
    default: TORCH_CHECK(false, "the pools must be fp32, bf16 or fp16");
  }
  TORCH_CHECK(fn != nullptr, "no kernel for head_dim ", D);

  // Work units, longest first, handed out by an atomic counter (the host may be shared: a static split
  // waits for the slowest thread).
  const int64_t threads = at::get_num_threads();
  const int64_t split = split_tokens(lens, Hkv, threads);
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return lens[x] > lens[y]; });
  std::vector<Unit> units;
  std::vector<std::array<int32_t, 4>> merges;  // b, h, first slot, slots
  int32_t slots = 0;
  for (int64_t b : order)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t L = lens[b], first = firsts[b];
      if (split == 0 || L <= split) {
        units.push_back({(int32_t)b, (int32_t)h, (int32_t)first, (int32_t)(first + L), -1});
        continue;
      }
      const int32_t n = (int32_t)((L + split - 1) / split);
      merges.push_back({(int32_t)b, (int32_t)h, slots, n});
      for (int32_t i = 0; i < n; ++i)
        units.push_back({(int32_t)b, (int32_t)h, (int32_t)(first + i * split),
                         (int32_t)(first + std::min<int64_t>(L, (i + 1) * split)), slots + i});
      slots += n;
    }
  if (!merges.empty())  // split units by size, longest first, so the tail of the schedule is short
    std::stable_sort(units.begin(), units.end(), [](const Unit& x, const Unit& y) { return x.t1 - x.t0 > y.t1 - y.t0; });
  at::Tensor partial;
  if (slots) partial = at::empty({slots, Gp, D + 2}, at::kFloat);

  Args a{qc.data_ptr(), qt, k_pool.data_ptr(), v_pool.data_ptr(), tab, out.data_ptr(),
         slots ? partial.data_ptr<float>() : nullptr, sink_t.defined() ? sink_t.data_ptr<float>() : nullptr,
         Hq, Hkv, G, BS, MB, (float)scale};
  std::atomic<int64_t> next{0};
  const int64_t nunits = (int64_t)units.size();
  at::parallel_for(0, std::min(threads, nunits), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      // Each thread claims its next unit before running the current one, so the current one can
      // prefetch the next one's first rows.
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      bool warm = false;
      while (i < nunits) {
        const int64_t j = next.fetch_add(1, std::memory_order_relaxed);
        fn(units[i], j < nunits ? &units[j] : nullptr, warm, a);
        warm = j < nunits;
        i = j;
      }
    }
  });
  if (!merges.empty()) {
    auto merge = Gp == 1 ? &combine<1> : Gp == 4 ? &combine<4> : &combine<8>;
    at::parallel_for(0, (int64_t)merges.size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) merge(merges[i][0], merges[i][1], merges[i][2], merges[i][3], D, a);
    });
  }
  return out;
}

// The OpenMP team size this extension's parallel regions get on the calling thread (tests check it
// follows torch.set_num_threads, i.e. that the extension shares torch's OpenMP runtime).
int64_t omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

// Registered as torch ops in a namespace named after the build (torch.ops.<name>.<op>): no pybind11,
// so the build includes ATen alone (measured: torch/extension.h alone takes 25 s of the compile).
#define PA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
PA_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor context_lens, "
        "float scale, bool p_bf16=False, int window=0, Tensor? sinks=None) -> Tensor",
        &paged_decode_attention);
  m.def("supported(int n_heads, int n_kv_heads, int head_dim) -> bool", &supported);
  m.def("split_tokens(int[] lens, int n_kv_heads, int threads) -> int",
        [](std::vector<int64_t> lens, int64_t h, int64_t t) { return split_tokens(lens, h, t); });
  m.def("omp_threads() -> int", &omp_threads);
  m.def("capability() -> str", &capability);
  m.def("vector_lanes() -> int", []() { return (int64_t)VL; });
  m.def("has_dpbf16() -> bool", []() { return (bool)HAVE_DPBF16; });
}
