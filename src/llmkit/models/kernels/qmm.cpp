// llmkit's weight-only quantized matrix products for decode-sized inputs (a few rows), fp32 activations, and
// the plain fp32 product the native decode step uses for unquantized layers.
//
// Why: PyTorch's own int8/int4 CPU kernels want bf16 activations and fall back to scalar loops on a CPU
// without native bf16; at batch 1 decoding is a stream over the weights, so what matters is reading them at
// memory speed. The weights are repacked once at load time into tiles of 4 output rows whose 16-column
// chunks lie side by side, so each thread reads one contiguous stream (row-major int8 reached a third of the
// bandwidth). The math is the stored format's: int8 w = q * scale[n]; int4 w = q * scale[n, g] + min[n, g],
// accumulated in fp32. Built by llmkit/models/qkernel.py with g++ -O3 -march=native (AVX2 + FMA).
#include <ATen/Parallel.h>
#include <immintrin.h>

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
    _mm_prefetch(reinterpret_cast<const char*>(chunk + 1024), _MM_HINT_T0);
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

template <int MT>
void int8_tile(const float* X, const int8_t* T, const float* S, float* Y, int64_t K, int64_t N, int64_t m0,
               int64_t n) {
  constexpr int NR = MT <= 2 ? 4 : 2;
  for (int i0 = 0; i0 < NB; i0 += NR) int8_pass<NR, MT>(X, T, S, Y, K, N, m0, n, i0);
}

// int4: each 32-column block of a row is 16 bytes, column 2c in the low nibble of byte c and 2c+1 in the high
// one. XP is x with each block's even columns first, then its odd ones, so a nibble meets its x without a
// shuffle. The weight is dequantized in registers exactly as stored (q * scale + min, one fma), then used.
template <int NR, int MT>
void int4_pass(const float* XP, const uint8_t* T, const float* SC, const float* MN, float* Y, int64_t K,
               int64_t N, int64_t g, int64_t m0, int64_t n, int i0) {
  const int64_t G = K / g;
  __m256 acc[NR][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t b = 0; b < K; b += 2 * CH) {
    const int64_t gi = b / g;
    const uint8_t* chunk = T + b / 2 * NB;  // NB rows x 16 bytes
    _mm_prefetch(reinterpret_cast<const char*>(chunk + 1024), _MM_HINT_T0);
    for (int h = 0; h < CH; h += W) {
      __m256 xe[MT], xo[MT];
      for (int j = 0; j < MT; ++j) {
        xe[j] = _mm256_loadu_ps(XP + (m0 + j) * K + b + h);
        xo[j] = _mm256_loadu_ps(XP + (m0 + j) * K + b + CH + h);
      }
      for (int i = 0; i < NR; ++i) {
        const int64_t row = n + i0 + i;
        const __m256 s = _mm256_set1_ps(SC[row * G + gi]), mn = _mm256_set1_ps(MN[row * G + gi]);
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
void int4_tile(const float* XP, const uint8_t* T, const float* SC, const float* MN, float* Y, int64_t K,
               int64_t N, int64_t g, int64_t m0, int64_t n) {
  constexpr int NR = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  for (int i0 = 0; i0 < NB; i0 += NR) int4_pass<NR, MT>(XP, T, SC, MN, Y, K, N, g, m0, n, i0);
}

// fp32: the model's own row-major (N, K) weight, read in place (a copy in tiles would double the memory). A
// pass streams NR consecutive rows, one 32-byte load per row per step.
template <int NR, int MT>
void f32_pass(const float* X, const float* Wn, float* Y, int64_t K, int64_t N, int64_t m0, int64_t n) {
  __m256 acc[NR][MT];
  for (auto& a : acc)
    for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += W) {
    __m256 xs[MT];
    for (int j = 0; j < MT; ++j) xs[j] = _mm256_loadu_ps(X + (m0 + j) * K + k);
    for (int i = 0; i < NR; ++i) {
      const __m256 w = _mm256_loadu_ps(Wn + i * K + k);
      for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_fmadd_ps(w, xs[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MT; ++j) Y[(m0 + j) * N + n + i] = hsum(acc[i][j]);
}

// One row of x against one weight row, four independent chains over 32-float steps: at one row of x this
// read each row in order and beat 4- and 8-row passes by ~3-5 % in the decode step (measured A/B, 2 threads).
inline void f32_row1(const float* x, const float* w, float* y, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k < K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  *y = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
// Output rows [n, n + nr) (nr <= 4) for rows [m0, m0 + MT) of X.
template <int MT>
void f32_tile(const float* X, const float* Wt, float* Y, int64_t K, int64_t N, int64_t m0, int64_t n, int64_t nr) {
  if constexpr (MT == 1) {
    for (int64_t i = 0; i < nr; ++i) f32_row1(X + m0 * K, Wt + (n + i) * K, Y + m0 * N + n + i, K);
    return;
  }
  constexpr int NR = MT <= 2 ? 4 : 2;
  int64_t i = 0;
  for (; i + NR <= nr; i += NR) f32_pass<NR, MT>(X, Wt + (n + i) * K, Y, K, N, m0, n + i);
  for (; i < nr; ++i) f32_pass<1, MT>(X, Wt + (n + i) * K, Y, K, N, m0, n + i);
}

// Calls f(MT, m0) over the rows in tiles of at most 4 (the accumulators of a 4 x 4 tile fill the registers).
template <typename F>
void over_rows(int64_t M, F f) {
  for (int64_t m0 = 0; m0 < M;) {
    switch (M - m0) {
      case 1: f(std::integral_constant<int, 1>(), m0); m0 += 1; break;
      case 2: f(std::integral_constant<int, 2>(), m0); m0 += 2; break;
      case 3: f(std::integral_constant<int, 3>(), m0); m0 += 3; break;
      default: f(std::integral_constant<int, 4>(), m0); m0 += 4; break;
    }
  }
}

}  // namespace

extern "C" {

int llmkit_qmm_abi() { return 1; }

// Y (M, N) = X (M, K) @ (q * S)^T with Q the tiled int8 weight (N/4, K/16, 4, 16). N % 4 == 0, K % 16 == 0.
void llmkit_int8_mm(const float* X, const int8_t* Q, const float* S, float* Y, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, N / NB, std::max<int64_t>(1, MIN_BYTES / (NB * K)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      over_rows(M, [&](auto mt, int64_t m0) {
        int8_tile<decltype(mt)::value>(X, Q + t * NB * K, S, Y, K, N, m0, t * NB);
      });
  });
}

// Y (M, N) = X (M, K) @ W^T with W the row-major fp32 weight (N, K). K % 8 == 0; any N.
void llmkit_f32_mm(const float* X, const float* Wt, float* Y, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = (N + NB - 1) / NB;
  at::parallel_for(0, tiles, std::max<int64_t>(1, MIN_BYTES / (NB * K * 4)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      over_rows(M, [&](auto mt, int64_t m0) {
        f32_tile<decltype(mt)::value>(X, Wt, Y, K, N, m0, t * NB, std::min<int64_t>(NB, N - t * NB));
      });
  });
}

// Y (M, N) = X (M, K) @ (q * SC + MN)^T with P the tiled int4 weight (N/4, K/32, 4, 16 bytes), SC and MN
// (N, K/g) fp32. N % 4 == 0, g % 32 == 0, K % g == 0.
void llmkit_int4_mm(const float* X, const uint8_t* P, const float* SC, const float* MN, float* Y, int64_t M,
                    int64_t K, int64_t N, int64_t g) {
  std::vector<float> xp(M * K);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * K;
    for (int64_t b = 0; b < K; b += 2 * CH)
      for (int c = 0; c < CH; ++c) {
        xp[m * K + b + c] = x[b + 2 * c];
        xp[m * K + b + CH + c] = x[b + 2 * c + 1];
      }
  }
  at::parallel_for(0, N / NB, std::max<int64_t>(1, 2 * MIN_BYTES / (NB * K)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      over_rows(M, [&](auto mt, int64_t m0) {
        int4_tile<decltype(mt)::value>(xp.data(), P + t * NB * (K / 2), SC, MN, Y, K, N, g, m0, t * NB);
      });
  });
}

}  // extern "C"
