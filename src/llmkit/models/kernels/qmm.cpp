// llmkit's weight-only quantized matrix products for decode-sized inputs (a few rows), fp32 activations, and
// the plain fp32 product the native decode step uses for unquantized layers; on AMX machines the int8 x int8
// product also serves prefill-sized inputs (the native step's prefill pieces, see amx_int8a8).
//
// Why: PyTorch's own int8/int4 CPU kernels want bf16 activations and fall back to scalar loops on a CPU
// without native bf16; at batch 1 decoding is a stream over the weights, so what matters is reading them at
// memory speed. The weights are repacked once at load time into tiles of 4 output rows whose 16-column
// chunks lie side by side, so each thread reads one contiguous stream (row-major int8 reached a third of the
// bandwidth). The math is the stored format's: int8 w = q * scale[n]; int4 w = q * scale[n, g] + min[n, g],
// accumulated in fp32. Built by llmkit/models/qkernel.py with g++ -O3 -march=native (AVX2 + FMA).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if !(defined(__AVX2__) && defined(__FMA__))
#error "llmkit's quantized kernels need AVX2 and FMA"
#endif

namespace {

constexpr int NB = 4;   // output rows per tile
constexpr int CH = 16;  // columns per chunk (int8: 16 bytes; int4: a 32-column block is 16 bytes)
constexpr int W = 8;    // floats per AVX2 register
// A thread's share is at least this many weight bytes: below ~128 KB one thread beats waking a second one
// (measured: a 192 x 576 int8 layer took 10 us on 1 thread and 15 us on 2).
constexpr int64_t MIN_BYTES = 128 * 1024;
// Software prefetch of a thread's weight stream: the next lines into L1 (PF_L1 bytes ahead) and, further ahead,
// into L2 (PF_L2). The hardware prefetcher alone left the stream waiting on memory once each line carries
// several rows of work: with 8 rows of x, int8 x int16 ran at 65-89 GMAC/s from memory against ~150 from L3
// (2 threads, Zen 4); the L2 prefetch 8 KB ahead gave ~150 from memory, and 1 row went from 34 to 40 GB/s.
constexpr int64_t PF_L1 = 1024, PF_L2 = 8192;
inline void prefetch_stream(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + PF_L1, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(p) + PF_L2, _MM_HINT_T1);
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void load_u4(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

// AVX2 has 16 vector registers: a pass keeps NR x MT accumulators plus the MT rows of x in registers, so
// passes over more rows of x cover fewer of the tile's 4 output rows (the rest re-read the tile from L1).

// Rows [m0, m0 + MT) of X against output rows [i0, i0 + NR) of the tile T (output rows n.. of Y).
template <int NR, int MT>
void int8_pass(const float* X, const int8_t* T, const float* S, float* Y, int64_t K, int64_t N, int64_t m0,
               int64_t n, int i0) {
  __m256 acc[NR][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += CH) {
    const int8_t* chunk = T + k * NB;  // NB rows x CH bytes
    prefetch_stream(chunk);
    for (int h = 0; h < CH; h += W) {
      __m256 xs[MT];
      for (int j = 0; j < MT; ++j) xs[j] = _mm256_loadu_ps(X + (m0 + j) * K + k + h);
      for (int i = 0; i < NR; ++i) {
        const __m256 w = load_i8(chunk + (i0 + i) * CH + h);
        for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_fmadd_ps(w, xs[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) Y[(m0 + j) * N + n + i0 + i] = hsum(acc[i][j]) * S[n + i0 + i];
}

#ifdef __AVX512F__
// AVX-512 (32 registers of 16 floats): a 16-byte chunk row is one register, and all 4 output rows of a tile
// fit beside up to 4 rows of x, so the tile is read once per 4 rows of x.
template <int MT>
void int8_tile(const float* X, const int8_t* T, const float* S, float* Y, int64_t K, int64_t N, int64_t m0,
               int64_t n) {
  __m512 acc[NB][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += CH) {
    const int8_t* chunk = T + k * NB;
    prefetch_stream(chunk);
    __m512 xs[MT];
    for (int j = 0; j < MT; ++j) xs[j] = _mm512_loadu_ps(X + (m0 + j) * K + k);
    for (int i = 0; i < NB; ++i) {
      const __m512 w = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + i * CH))));
      for (int j = 0; j < MT; ++j) acc[i][j] = _mm512_fmadd_ps(w, xs[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MT; ++j) Y[(m0 + j) * N + n + i] = _mm512_reduce_add_ps(acc[i][j]) * S[n + i];
}
#else
template <int MT>
void int8_tile(const float* X, const int8_t* T, const float* S, float* Y, int64_t K, int64_t N, int64_t m0,
               int64_t n) {
  constexpr int NR = MT <= 2 ? 4 : 2;
  for (int i0 = 0; i0 < NB; i0 += NR) int8_pass<NR, MT>(X, T, S, Y, K, N, m0, n, i0);
}
#endif

// int4: each 32-column block of a row is 16 bytes, column 2c in the low nibble of byte c and 2c+1 in the high
// one. XP is x with each block's even columns first, then its odd ones, so a nibble meets its x without a
// shuffle. The weight is dequantized in registers exactly as stored (q * scale + min, one fma), then used.
template <int NR, int MT>
void int4_pass(const float* XP, const uint8_t* T, const float* SM, float* Y, int64_t K, int64_t N, int64_t g,
               int64_t m0, int64_t n, int i0) {
  const int64_t G = K / g;
  const float* sm = SM + n / NB * G * 2 * NB;  // this tile's (G, 2, 4): the 4 rows' scales, then their mins
  __m256 acc[NR][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t b = 0; b < K; b += 2 * CH) {
    const int64_t gi = b / g;
    const uint8_t* chunk = T + b / 2 * NB;  // NB rows x 16 bytes
    prefetch_stream(chunk);
    for (int h = 0; h < CH; h += W) {
      __m256 xe[MT], xo[MT];
      for (int j = 0; j < MT; ++j) {
        xe[j] = _mm256_loadu_ps(XP + (m0 + j) * K + b + h);
        xo[j] = _mm256_loadu_ps(XP + (m0 + j) * K + b + CH + h);
      }
      for (int i = 0; i < NR; ++i) {
        const __m256 s = _mm256_set1_ps(sm[gi * 2 * NB + i0 + i]), mn = _mm256_set1_ps(sm[gi * 2 * NB + NB + i0 + i]);
        __m256 lo, hi;
        load_u4(chunk + (i0 + i) * CH + h, lo, hi);
        lo = _mm256_fmadd_ps(lo, s, mn);
        hi = _mm256_fmadd_ps(hi, s, mn);
        for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_fmadd_ps(hi, xo[j], _mm256_fmadd_ps(lo, xe[j], acc[i][j]));
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) Y[(m0 + j) * N + n + i0 + i] = hsum(acc[i][j]);
}

template <int MT>
void int4_tile(const float* XP, const uint8_t* T, const float* SM, float* Y, int64_t K, int64_t N, int64_t g,
               int64_t m0, int64_t n) {
  constexpr int NR = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  for (int i0 = 0; i0 < NB; i0 += NR) int4_pass<NR, MT>(XP, T, SM, Y, K, N, g, m0, n, i0);
}

#ifdef __AVX512F__
// The lanes of a 16-float step at column k that lie inside K (K % 8 == 0: all 16, or the low 8 at the end).
inline __mmask16 tail_mask(int64_t k, int64_t K) { return k + 16 <= K ? 0xFFFF : 0x00FF; }
#endif

// fp32: the model's own row-major (N, K) weight, read in place (a copy in tiles would double the memory). A
// pass streams NR consecutive rows, one 64-byte (AVX-512) or 32-byte load per row per step, each line
// prefetched. AVX-512 with 4 weight rows per pass took the 4-row fp32 decode step of SmolLM2 from 35-40 to 20 ms
// (2 threads, Xeon with AVX-512).
template <int NR, int MT>
void f32_pass(const float* X, const float* Wn, float* Y, int64_t K, int64_t N, int64_t m0, int64_t n) {
#ifdef __AVX512F__
  __m512 acc[NR][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(k, K);
    __m512 xs[MT];
    for (int j = 0; j < MT; ++j) xs[j] = _mm512_maskz_loadu_ps(m, X + (m0 + j) * K + k);
    for (int i = 0; i < NR; ++i) {
      prefetch_stream(Wn + i * K + k);
      const __m512 w = _mm512_maskz_loadu_ps(m, Wn + i * K + k);
      for (int j = 0; j < MT; ++j) acc[i][j] = _mm512_fmadd_ps(w, xs[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) Y[(m0 + j) * N + n + i] = _mm512_reduce_add_ps(acc[i][j]);
#else
  __m256 acc[NR][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += W) {
    __m256 xs[MT];
    for (int j = 0; j < MT; ++j) xs[j] = _mm256_loadu_ps(X + (m0 + j) * K + k);
    for (int i = 0; i < NR; ++i) {
      if (k % 16 == 0) prefetch_stream(Wn + i * K + k);
      const __m256 w = _mm256_loadu_ps(Wn + i * K + k);
      for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_fmadd_ps(w, xs[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) Y[(m0 + j) * N + n + i] = hsum(acc[i][j]);
#endif
}

// One row of x against one weight row, four independent chains over 64-float (AVX-512) or 32-float steps: at
// one row of x this read each row in order and beat 4- and 8-row passes by ~3-5 % in the decode step. The
// fp32 decode step of SmolLM2 (1 row, 2 threads, Xeon): 24.2 ms with 32-float steps and no software prefetch,
// 21.5 with 64-float steps, 17.4 with prefetch_stream per line (30.8 GB/s of weights against a 24 GB/s copy).
inline void f32_row1(const float* x, const float* w, float* y, int64_t K) {
#ifdef __AVX512F__
  __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int l = 0; l < 64; l += 16) prefetch_stream(w + k + l);
    b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), b0);
    b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), b1);
    b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), b2);
    b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), b3);
  }
  for (; k < K; k += 16) {
    const __mmask16 m = tail_mask(k, K);
    b0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), b0);
  }
  *y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)));
#else
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch_stream(w + k);
    prefetch_stream(w + k + 16);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k < K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  *y = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
}
// Output rows [n, n + nr) (nr <= 4) for rows [m0, m0 + MT) of X.
template <int MT>
void f32_tile(const float* X, const float* Wt, float* Y, int64_t K, int64_t N, int64_t m0, int64_t n, int64_t nr) {
  if constexpr (MT == 1) {
    for (int64_t i = 0; i < nr; ++i) f32_row1(X + m0 * K, Wt + (n + i) * K, Y + m0 * N + n + i, K);
    return;
  }
#ifdef __AVX512F__
  constexpr int NR = 4;  // 16 accumulators of 32 registers at 4 rows
#else
  constexpr int NR = MT <= 2 ? 4 : 2;
#endif
  int64_t i = 0;
  for (; i + NR <= nr; i += NR) f32_pass<NR, MT>(X, Wt + (n + i) * K, Y, K, N, m0, n + i);
  for (; i < nr; ++i) f32_pass<1, MT>(X, Wt + (n + i) * K, Y, K, N, m0, n + i);
}

// Calls f(std::integral_constant<int, mt>, m0) for the compile-time mt == rows (1 <= rows <= MT).
template <int MT, typename F>
void with_rows(int64_t rows, int64_t m0, F& f) {
  if constexpr (MT > 1)
    if (rows < MT) return with_rows<MT - 1>(rows, m0, f);
  f(std::integral_constant<int, MT>(), m0);
}

// Calls f(mt, m0) over the rows in tiles of at most MAX: 4 by default (the accumulators of a 4 x 4 tile fill
// the registers), 8 for the int8 x int8 product (8 accumulators and one weight register).
template <int MAX = 4, typename F>
void over_rows(int64_t M, F f) {
  for (int64_t m0 = 0; m0 < M; m0 += MAX) with_rows<MAX>(std::min<int64_t>(M - m0, MAX), m0, f);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMKIT_VNNI 1
constexpr bool VNNI = true;
#else
constexpr bool VNNI = false;
#endif
// The activation widths of the int4 and int8 products: integer in VNNI builds by default, or 32 (fp32). int8
// layers: 8 rounds x to int8 in the layers quantized for it (those given row sums C) and to int16 in the
// others; 16 rounds every layer's x to int16.
int int4_act = VNNI ? 8 : 32, int8_act = VNNI ? 8 : 32;
// Whether the int8 x int8 product may take AMX tiles for prefill-sized inputs (llmkit_amx; AMX builds only).
bool use_amx = true;

// Sets `width` to `bits` where it is `vnni_bits` (VNNI builds only) or 32; 0 only asks. Returns the width.
int choose_act(int& width, int bits, int vnni_bits) {
  if ((VNNI && bits == vnni_bits) || bits == 32) width = bits;
  return width;
}

#ifdef LLMKIT_VNNI

// int4 x int8 products (AVX-512 VNNI), as llama.cpp's Q4 x Q8 dot products: each 32-column block of a row of
// x is quantized to int8 with its own scale dx = max|x| / 127, and vpdpbusd multiplies 64 unsigned nibbles by
// 64 int8s into 16 int32 sums in one instruction, where the fp32 path needs 8 conversions and 8 fmas. The
// fp32 path's cost was compute, not memory: this is where int4 gains. The error is the activations' 8-bit
// rounding (measured in docs/inference.md: held-out perplexity +1.18 % on the decode path against -0.13 %
// with fp32 activations).
//
// One block of x: its even columns then its odd ones (to meet the low and high nibbles), as int8; dx; and
// the exact fp32 sum of the block (for the mins: sum_k x_k (q_k s + m) = s sum_k x_k q_k + m sum_k x_k).
inline void quantize_blocks(const float* x, int64_t K, int8_t* q, float* dx, float* xs) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t b = 0; b < K; b += 2 * CH) {
    const __m512 a = _mm512_loadu_ps(x + b), c = _mm512_loadu_ps(x + b + CH);
    const __m512 e = _mm512_permutex2var_ps(a, even, c), o = _mm512_permutex2var_ps(a, odd, c);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(e), _mm512_abs_ps(o)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(e, inv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b + CH),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(o, inv))));
    dx[b / (2 * CH)] = amax / 127.f;
    xs[b / (2 * CH)] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
  }
}

// One tile (4 output rows) against rows [m0, m0 + MT) of the quantized x. A block of the tile is 64 bytes,
// the 4 rows' 16 bytes side by side: one load, two masks give the low (even) and high (odd) nibbles, and x's
// 16 even / 16 odd bytes are repeated across the 4 lanes. Lanes 4r..4r+3 of a sum belong to output row r.
template <int MT>
void int4_vnni_tile(const int8_t* XQ, const float* DX, const float* XS, const uint8_t* T, const float* sm, float* Y,
                    int64_t K, int64_t N, int64_t g, int64_t m0, int64_t n) {
  const int64_t nb = K / (2 * CH), per = g / (2 * CH);
  const __m512i nib = _mm512_set1_epi8(15);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[MT];
  __m128 macc[MT];
  for (int j = 0; j < MT; ++j) {
    acc[j] = _mm512_setzero_ps();
    macc[j] = _mm_setzero_ps();
  }
  __m512 s4 = _mm512_setzero_ps();
  __m128 mn = _mm_setzero_ps();
  for (int64_t bi = 0; bi < nb; ++bi) {
    if (bi % per == 0) {  // a new group: the 4 rows' scales across their lanes, and their mins
      const float* p = sm + bi / per * 2 * NB;
      s4 = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(p)));
      mn = _mm_loadu_ps(p + NB);
    }
    const __m512i w = _mm512_loadu_si512(T + bi * 64);
    prefetch_stream(T + bi * 64);
    const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
    for (int j = 0; j < MT; ++j) {
      const int64_t r = (m0 + j) * nb + bi;
      const int8_t* xq = XQ + (m0 + j) * K + bi * 2 * CH;
      const __m512i xe = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
      const __m512i xo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + CH)));
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe), hi, xo);
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s4, _mm512_set1_ps(DX[r])), acc[j]);
      macc[j] = _mm_fmadd_ps(mn, _mm_set1_ps(XS[r]), macc[j]);
    }
  }
  for (int j = 0; j < MT; ++j) {  // each row's 4 lanes summed: [row 0, row 1, row 2, row 3]
    const __m128 a0 = _mm512_extractf32x4_ps(acc[j], 0), a1 = _mm512_extractf32x4_ps(acc[j], 1);
    const __m128 a2 = _mm512_extractf32x4_ps(acc[j], 2), a3 = _mm512_extractf32x4_ps(acc[j], 3);
    const __m128 r = _mm_add_ps(_mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(a2, a3)), macc[j]);
    _mm_storeu_ps(Y + (m0 + j) * N + n, r);
  }
}

// int8 x int16 products (AVX-512 VNNI vpdpwssd): each row of x is rounded to int16 with one scale
// max|x| / 32767 (a relative error of ~1.5e-5 of the row's largest value, finer than bf16), and the int8
// weights are widened to int16, so 32 weight-activation pairs cost one instruction where the fp32 path needs
// a conversion, a widening and an fma per 16. Sums stay exact in int32 for 1,024 columns (8 products per lane
// per 64 columns, each < 2^22), then go to fp32.
inline void quantize_row16(const float* x, int64_t K, int16_t* q, float* s) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += CH) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float amax = _mm512_reduce_max_ps(mx);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
  for (int64_t k = 0; k < K; k += CH)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv))));
  *s = amax / 32767.f;
}

// One tile against rows [m0, m0 + MT) of the int16 x: a chunk (4 rows x 16 int8) widens to two registers of
// 2 rows each; lanes 0-7 of a sum belong to the first row of its pair, 8-15 to the second.
template <int MT>
void int8_vnni_tile(const int16_t* XQ, const float* XS, const int8_t* T, const float* S, float* Y, int64_t K,
                    int64_t N, int64_t m0, int64_t n) {
  constexpr int64_t EXACT = 1024;  // columns summed in int32 before a move to fp32
  __m512i acc[2][MT];
  __m512 accf[2][MT];
  for (int p = 0; p < 2; ++p)
    for (int j = 0; j < MT; ++j) {
      acc[p][j] = _mm512_setzero_si512();
      accf[p][j] = _mm512_setzero_ps();
    }
  for (int64_t k = 0; k < K; k += CH) {
    const int8_t* chunk = T + k * NB;
    prefetch_stream(chunk);
    const __m512i w01 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
    const __m512i w23 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 2 * CH)));
    for (int j = 0; j < MT; ++j) {
      const __m512i xj = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQ + (m0 + j) * K + k)));
      acc[0][j] = _mm512_dpwssd_epi32(acc[0][j], w01, xj);
      acc[1][j] = _mm512_dpwssd_epi32(acc[1][j], w23, xj);
    }
    if ((k + CH) % EXACT == 0 || k + CH == K)
      for (int p = 0; p < 2; ++p)
        for (int j = 0; j < MT; ++j) {
          accf[p][j] = _mm512_add_ps(accf[p][j], _mm512_cvtepi32_ps(acc[p][j]));
          acc[p][j] = _mm512_setzero_si512();
        }
  }
  for (int p = 0; p < 2; ++p)
    for (int j = 0; j < MT; ++j) {
      const float xs = XS[m0 + j];
      const __m256 lo = _mm512_castps512_ps256(accf[p][j]), hi = _mm512_extractf32x8_ps(accf[p][j], 1);
      Y[(m0 + j) * N + n + 2 * p] = hsum(lo) * xs * S[n + 2 * p];
      Y[(m0 + j) * N + n + 2 * p + 1] = hsum(hi) * xs * S[n + 2 * p + 1];
    }
}

// int8 x int8 products (AVX-512 VNNI vpdpbusd), for layers quantized with int8 activations (`llmkit quantize`
// smooths their inputs first, models/smooth.py): each row of x is rounded to int8 with one scale
// max|x| / 127 and stored offset by 128 as unsigned bytes, so one vpdpbusd multiplies 64 of them by a whole
// chunk (4 rows x 16 int8 weights) into 16 int32 sums: half the instructions of the int16 path, and no
// widening of the weights. The offset is taken back exactly with the layer's row sums C = 128 * sum_k q[n, k]
// (int32, computed once at load). Sums stay exact in int32 for K < 2^16 (4 products < 2^15 per lane and chunk).
inline void quantize_row8(const float* x, int64_t K, uint8_t* q, float* s) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += CH) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float amax = _mm512_reduce_max_ps(mx);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K; k += CH) {
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv)), off);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtusepi32_epi8(v));
  }
  *s = amax / 127.f;
}

// One tile against rows [m0, m0 + MT) of the offset int8 x; lanes 4r..4r+3 of a sum belong to output row r.
template <int MT>
void int8a8_tile(const uint8_t* XQ, const float* XS, const int8_t* T, const float* S, const int32_t* C, float* Y,
                 int64_t K, int64_t N, int64_t m0, int64_t n) {
  __m512i acc[MT];
  for (int j = 0; j < MT; ++j) acc[j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += CH) {
    const int8_t* chunk = T + k * NB;
    prefetch_stream(chunk);
    const __m512i w = _mm512_loadu_si512(chunk);
    for (int j = 0; j < MT; ++j) {
      const __m512i xj = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(XQ + (m0 + j) * K + k)));
      acc[j] = _mm512_dpbusd_epi32(acc[j], xj, w);
    }
  }
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(C + n));
  const __m128 s = _mm_loadu_ps(S + n);
  for (int j = 0; j < MT; ++j) {  // each row's 4 lanes summed, the offset taken back, then scaled
    const __m128i a0 = _mm512_extracti32x4_epi32(acc[j], 0), a1 = _mm512_extracti32x4_epi32(acc[j], 1);
    const __m128i a2 = _mm512_extracti32x4_epi32(acc[j], 2), a3 = _mm512_extracti32x4_epi32(acc[j], 3);
    const __m128i r = _mm_sub_epi32(_mm_hadd_epi32(_mm_hadd_epi32(a0, a1), _mm_hadd_epi32(a2, a3)), c);
    _mm_storeu_ps(Y + (m0 + j) * N + n, _mm_mul_ps(_mm_cvtepi32_ps(r), _mm_mul_ps(s, _mm_set1_ps(XS[m0 + j]))));
  }
}


#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define LLMKIT_AMX 1
// int8 x int8 products on AMX tiles (tdpbusd), for prefill-sized inputs: one instruction multiplies a 16 x 64
// tile of x (offset bytes, as int8a8_tile reads) by a 64 x 16 tile of weights into 16 x 16 int32 sums, 16x
// the work of a vpdpbusd. The int32 sums are the VNNI kernel's exactly, and so is the epilogue: the same
// outputs. A strip of 16 output rows (4 of the tiles above) is first rearranged into AMX's layout (per 64
// columns, 16 rows of 4-byte column groups), in registers, into a buffer each row tile of x then reuses.
// Decode-sized inputs stay on VNNI: at 8-16 rows AMX measured slower inside the step (docs/inference.md).
constexpr int64_t AMX_ROWS = 16, AMX_MIN_ROWS = 32;

struct TileConfig {  // the 64-byte configuration ldtilecfg reads (palette 1)
  uint8_t palette = 1, start = 0, pad[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this process may use AMX tiles: Linux hands out the tile state on request (arch_prctl), once.
bool amx_ready() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// Tiles t..t+3 (16 output rows) of the tiled int8 weight, columns [0, K), into B: K/64 blocks of 16 x 64 bytes,
// block row r holding, for each output row n, its 4 weights at columns 4r..4r+3 of the block.
inline void amx_strip(const int8_t* T, int64_t K, int8_t* B) {
  // a chunk (4 rows x 16 bytes, 16 dwords i*4+q) to its dwords by q: lane q holds dwords q, 4+q, 8+q, 12+q
  const __m512i byq = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t c = 0; c < K / CH; ++c) {  // chunk c of each of the 4 tiles: block c / 4, rows 4(c % 4)..+3
    __m512i z[4];
    for (int a = 0; a < 4; ++a) z[a] = _mm512_permutexvar_epi32(byq, _mm512_loadu_si512(T + a * NB * K + c * 64));
    // row q of the output = lane q of z0, z1, z2, z3 (a 4 x 4 transpose of 128-bit lanes)
    const __m512i t0 = _mm512_shuffle_i32x4(z[0], z[1], 0x44), t1 = _mm512_shuffle_i32x4(z[0], z[1], 0xee);
    const __m512i t2 = _mm512_shuffle_i32x4(z[2], z[3], 0x44), t3 = _mm512_shuffle_i32x4(z[2], z[3], 0xee);
    int8_t* out = B + (c / 4) * 1024 + (c % 4) * 4 * 64;
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(t0, t2, 0x88));
    _mm512_storeu_si512(out + 64, _mm512_shuffle_i32x4(t0, t2, 0xdd));
    _mm512_storeu_si512(out + 128, _mm512_shuffle_i32x4(t1, t3, 0x88));
    _mm512_storeu_si512(out + 192, _mm512_shuffle_i32x4(t1, t3, 0xdd));
  }
}

// Output rows [n, n + 16 S) (S strips of 16, in B one after the other) for rows [0, M16) of x (M16 % 16 == 0):
// y = (sum - C) * S * XS. Rows go two tiles at a time, so each loaded tile of x or of weights serves two
// products (tiles 0-3: sums, 4-5: x, 6-7: weights).
template <int NS>
void amx_strips(const uint8_t* XQ, const float* XS, const int8_t* B, const float* S, const int32_t* C, float* Y,
                int64_t K, int64_t N, int64_t M16, int64_t n) {
  alignas(64) int32_t acc[AMX_ROWS * 16];
  const int64_t blocks = K / 64, sb = blocks * 1024;  // a strip's bytes in B
  for (int64_t m = 0; m < M16; m += 2 * AMX_ROWS) {
    const bool two = m + AMX_ROWS < M16;
    _tile_zero(0);
    _tile_zero(1);
    if (NS == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kc = 0; kc < blocks; ++kc) {
      _tile_loadd(4, XQ + m * K + kc * 64, K);
      _tile_loadd(6, B + kc * 1024, 64);
      _tile_dpbusd(0, 4, 6);
      if (NS == 2) {
        _tile_loadd(7, B + sb + kc * 1024, 64);
        _tile_dpbusd(2, 4, 7);
      }
      if (two) {
        _tile_loadd(5, XQ + (m + AMX_ROWS) * K + kc * 64, K);
        _tile_dpbusd(1, 5, 6);
        if (NS == 2) _tile_dpbusd(3, 5, 7);
      }
    }
    for (int st = 0; st < NS; ++st)
      for (int h = 0; h < (two ? 2 : 1); ++h) {
        switch (2 * st + h) {  // tile numbers are immediates
          case 0: _tile_stored(0, acc, 64); break;
          case 1: _tile_stored(1, acc, 64); break;
          case 2: _tile_stored(2, acc, 64); break;
          default: _tile_stored(3, acc, 64); break;
        }
        const int64_t n0 = n + 16 * st;
        const __m512i c = _mm512_loadu_si512(C + n0);
        const __m512 s = _mm512_loadu_ps(S + n0);
        for (int64_t j = 0; j < AMX_ROWS; ++j) {
          const int64_t row = m + h * AMX_ROWS + j;
          const __m512i r = _mm512_sub_epi32(_mm512_load_si512(acc + j * 16), c);
          _mm512_storeu_ps(Y + row * N + n0, _mm512_mul_ps(_mm512_cvtepi32_ps(r), _mm512_mul_ps(s, _mm512_set1_ps(XS[row]))));
        }
      }
  }
}

// Tiles [t0, t1) for rows [0, M) with AMX where M >= AMX_MIN_ROWS; returns the first tile it left (strips of 4
// tiles) and sets *rows to the rows it covered (a multiple of 16), the rest for the VNNI kernel.
int64_t amx_int8a8(const uint8_t* XQ, const float* XS, const int8_t* Q, const float* S, const int32_t* C, float* Y,
                   int64_t M, int64_t K, int64_t N, int64_t t0, int64_t t1, int64_t* rows) {
  *rows = 0;
  if (M < AMX_MIN_ROWS || K % 64 || K >= 65536 || t1 - t0 < 4 || !amx_ready()) return t0;  // int32 sums exact
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = AMX_ROWS, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
  thread_local std::vector<int8_t> strip;
  strip.resize(2 * 16 * K);
  const int64_t M16 = M / AMX_ROWS * AMX_ROWS;
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) {  // two strips at a time
    amx_strip(Q + t * NB * K, K, strip.data());
    amx_strip(Q + (t + 4) * NB * K, K, strip.data() + 16 * K);
    amx_strips<2>(XQ, XS, strip.data(), S, C, Y, K, N, M16, t * NB);
  }
  for (; t + 4 <= t1; t += 4) {
    amx_strip(Q + t * NB * K, K, strip.data());
    amx_strips<1>(XQ, XS, strip.data(), S, C, Y, K, N, M16, t * NB);
  }
  _tile_release();
  *rows = M16;
  return t;
}
#endif
#endif

}  // namespace

extern "C" {

int llmkit_qmm_abi() { return 8; }

// The products in two forms: llmkit_*_mm runs one on PyTorch's thread pool, and llmkit_*_range computes output
// tiles [t0, t1) (4 rows each) on the calling thread, for step.cpp, which splits a whole decode step among its
// own threads (see its Pool). llmkit_*_grain is the fewest tiles worth a thread of their own.

int64_t llmkit_int8_grain(int64_t K) { return std::max<int64_t>(1, MIN_BYTES / (NB * K)); }
int64_t llmkit_f32_grain(int64_t K) { return std::max<int64_t>(1, MIN_BYTES / (NB * K * 4)); }
int64_t llmkit_int4_grain(int64_t K) { return std::max<int64_t>(1, 2 * MIN_BYTES / (NB * K)); }

// Y (M, N) = X (M, K) @ (q * S)^T with Q the tiled int8 weight (N/4, K/16, 4, 16). N % 4 == 0, K % 16 == 0.
// C: the layer's int8-activation row sums (N,) 128 * sum_k q[n, k], or null for a layer without. Where the CPU
// has AVX-512 VNNI, x is first rounded per row (llmkit_int8_prep into llmkit_int8_scratch bytes): to int8 where
// C is given and int8_act is 8 (the default; int8a8_tile), else to int16 (int8_vnni_tile); with int8_act 32
// or without VNNI x is read as it is.
int64_t llmkit_int8_scratch(int64_t M, int64_t K) { return int8_act != 32 ? M * K * 2 + M * 4 : 0; }

// Rows [m0, m1) of x (0 and M: all of it), so that the step's threads can each prepare their own rows.
void llmkit_int8_prep(const float* X, const int32_t* C, int64_t M, int64_t K, void* scratch, int64_t m0, int64_t m1) {
#ifdef LLMKIT_VNNI
  if (C && int8_act == 8) {
    uint8_t* q = static_cast<uint8_t*>(scratch);
    float* xs = reinterpret_cast<float*>(q + M * K * 2);
    for (int64_t m = m0; m < m1; ++m) quantize_row8(X + m * K, K, q + m * K, xs + m);
  } else if (int8_act != 32) {
    int16_t* q = static_cast<int16_t*>(scratch);
    float* xs = reinterpret_cast<float*>(q + M * K);
    for (int64_t m = m0; m < m1; ++m) quantize_row16(X + m * K, K, q + m * K, xs + m);
  }
#else
  (void)X, (void)C, (void)M, (void)K, (void)scratch, (void)m0, (void)m1;
#endif
}

void llmkit_int8_range(const float* X, const void* scratch, const int8_t* Q, const float* S, const int32_t* C,
                       float* Y, int64_t M, int64_t K, int64_t N, int64_t t0, int64_t t1) {
#ifdef LLMKIT_VNNI
  if (C && int8_act == 8) {
    const uint8_t* q = static_cast<const uint8_t*>(scratch);
    const float* xs = reinterpret_cast<const float*>(q + M * K * 2);
    int64_t ta = t0, rows = 0;
#ifdef LLMKIT_AMX
    if (use_amx) ta = amx_int8a8(q, xs, Q, S, C, Y, M, K, N, t0, t1, &rows);
#endif
    for (int64_t t = t0; t < t1; ++t)  // what AMX left: the last rows of its tiles, and the tiles after
      over_rows<8>(t < ta ? M - rows : M, [&](auto mt, int64_t m0) {
        int8a8_tile<decltype(mt)::value>(q, xs, Q + t * NB * K, S, C, Y, K, N, (t < ta ? rows : 0) + m0, t * NB);
      });
    return;
  }
  if (int8_act != 32) {
    const int16_t* q = static_cast<const int16_t*>(scratch);
    const float* xs = reinterpret_cast<const float*>(q + M * K);
    for (int64_t t = t0; t < t1; ++t)
      over_rows(M, [&](auto mt, int64_t m0) {
        int8_vnni_tile<decltype(mt)::value>(q, xs, Q + t * NB * K, S, Y, K, N, m0, t * NB);
      });
    return;
  }
#else
  (void)scratch, (void)C;
#endif
  for (int64_t t = t0; t < t1; ++t)
    over_rows(M, [&](auto mt, int64_t m0) { int8_tile<decltype(mt)::value>(X, Q + t * NB * K, S, Y, K, N, m0, t * NB); });
}
void llmkit_int8_mm(const float* X, const int8_t* Q, const float* S, const int32_t* C, float* Y, int64_t M, int64_t K,
                    int64_t N) {
  std::vector<int32_t> scratch((llmkit_int8_scratch(M, K) + 3) / 4);
  llmkit_int8_prep(X, C, M, K, scratch.data(), 0, M);
  at::parallel_for(0, N / NB, llmkit_int8_grain(K), [&](int64_t t0, int64_t t1) {
    llmkit_int8_range(X, scratch.data(), Q, S, C, Y, M, K, N, t0, t1);
  });
}

// Y (M, N) = X (M, K) @ W^T with W the row-major fp32 weight (N, K). K % 8 == 0; any N ((N + 3) / 4 tiles).
void llmkit_f32_range(const float* X, const float* Wt, float* Y, int64_t M, int64_t K, int64_t N, int64_t t0,
                      int64_t t1) {
  for (int64_t t = t0; t < t1; ++t)
    over_rows(M, [&](auto mt, int64_t m0) {
      f32_tile<decltype(mt)::value>(X, Wt, Y, K, N, m0, t * NB, std::min<int64_t>(NB, N - t * NB));
    });
}
void llmkit_f32_mm(const float* X, const float* Wt, float* Y, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, (N + NB - 1) / NB, llmkit_f32_grain(K),
                   [&](int64_t t0, int64_t t1) { llmkit_f32_range(X, Wt, Y, M, K, N, t0, t1); });
}

// Y (M, N) = X (M, K) @ (q * scale + min)^T with P the tiled int4 weight (N/4, K/32, 4, 16 bytes) and SM the
// tiled scales and mins (N/4, K/g, 2, 4): per tile and group the 4 rows' scales, then their 4 mins.
// N % 4 == 0, g % 32 == 0, K % g == 0. Where the CPU has AVX-512 VNNI and int4_act is 8 (the default), x is
// quantized to int8 per 32-column block (see int4_vnni_tile); else the product is fp32 throughout.
// x is first rearranged once into a scratch of llmkit_int4_scratch(M, K) bytes by llmkit_int4_prep.
int64_t llmkit_int4_scratch(int64_t M, int64_t K) { return M * K * 4 + 2 * M * (K / (2 * CH)) * 4; }

// Rows [m0, m1) of x, as llmkit_int8_prep.
void llmkit_int4_prep(const float* X, int64_t M, int64_t K, void* scratch, int64_t m0, int64_t m1) {
  float* xp = static_cast<float*>(scratch);
#ifdef LLMKIT_VNNI
  if (int4_act == 8) {  // int8 x, then each block's dx, then its exact sum
    const int64_t nb = K / (2 * CH);
    int8_t* xq = static_cast<int8_t*>(scratch);
    float* dx = xp + M * K;
    for (int64_t m = m0; m < m1; ++m) quantize_blocks(X + m * K, K, xq + m * K, dx + m * nb, dx + M * nb + m * nb);
    return;
  }
#endif
  for (int64_t m = m0; m < m1; ++m) {  // x with each block's even columns first, then its odd ones
    const float* x = X + m * K;
    for (int64_t b = 0; b < K; b += 2 * CH)
      for (int c = 0; c < CH; ++c) {
        xp[m * K + b + c] = x[b + 2 * c];
        xp[m * K + b + CH + c] = x[b + 2 * c + 1];
      }
  }
}

void llmkit_int4_range(const void* scratch, const uint8_t* P, const float* SM, float* Y, int64_t M, int64_t K,
                       int64_t N, int64_t g, int64_t t0, int64_t t1) {
  const float* xp = static_cast<const float*>(scratch);
#ifdef LLMKIT_VNNI
  if (int4_act == 8) {
    const int64_t nb = K / (2 * CH);
    const int8_t* xq = static_cast<const int8_t*>(scratch);
    const float *dx = xp + M * K, *xs = dx + M * nb;
    for (int64_t t = t0; t < t1; ++t)
      over_rows(M, [&](auto mt, int64_t m0) {
        int4_vnni_tile<decltype(mt)::value>(xq, dx, xs, P + t * NB * (K / 2), SM + t * (K / g) * 2 * NB, Y, K, N, g,
                                            m0, t * NB);
      });
    return;
  }
#endif
  for (int64_t t = t0; t < t1; ++t)
    over_rows(M, [&](auto mt, int64_t m0) {
      int4_tile<decltype(mt)::value>(xp, P + t * NB * (K / 2), SM, Y, K, N, g, m0, t * NB);
    });
}

void llmkit_int4_mm(const float* X, const uint8_t* P, const float* SM, float* Y, int64_t M, int64_t K, int64_t N,
                    int64_t g) {
  std::vector<float> scratch((llmkit_int4_scratch(M, K) + 3) / 4);
  llmkit_int4_prep(X, M, K, scratch.data(), 0, M);
  at::parallel_for(0, N / NB, llmkit_int4_grain(K),
                   [&](int64_t t0, int64_t t1) { llmkit_int4_range(scratch.data(), P, SM, Y, M, K, N, g, t0, t1); });
}

// The activation widths (int8: 8 or 16, int4: 8, integer where built with VNNI; or 32): each call sets it to
// `bits` where that is one of them (0 only asks) and returns the width in effect. llmkit_vnni: whether this
// build has VNNI.
int llmkit_int8_act(int bits) { return choose_act(int8_act, bits, bits == 16 ? 16 : 8); }
int llmkit_int4_act(int bits) { return choose_act(int4_act, bits, 8); }
int llmkit_vnni() { return VNNI; }
// AMX for prefill-sized int8 x int8 products: on (1) or off (0), or -1 only asks; returns whether it is in
// use (built with AMX, the kernel granted the tile state, and on).
int llmkit_amx(int on) {
  if (on >= 0) use_amx = on;
#ifdef LLMKIT_AMX
  return use_amx && amx_ready();
#else
  return 0;
#endif
}

}  // extern "C"
