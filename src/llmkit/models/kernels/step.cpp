// llmkit's decode step for Llama-shaped decoders with int8/int4 (or fp32) weights: a few new tokens per row, one
// C++ call.
//
// Why: at batch 1 the weights of SmolLM2-135M stream through qmm.cpp's kernels in ~7 ms a token, but the
// Python step around them (30 layers of norms, RoPE, cache writes, SDPA and ~150 operator dispatches) cost
// as much again, compiled or not. This file runs the same math as models/transformer.py's pre-norm block
// (RMSNorm -> fused qkv -> RoPE -> grouped-query attention -> o-proj -> residual -> RMSNorm -> SwiGLU ->
// residual), in fp32, with the weight products done by qmm.cpp. Attention reads only the cached keys up to
// the write position. Built with qmm.cpp into one library by llmkit/models/qkernel.py.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

extern "C" {
int64_t llmkit_int8_grain(int64_t K);
int64_t llmkit_f32_grain(int64_t K);
int64_t llmkit_int4_grain(int64_t K);
int64_t llmkit_int8_scratch(int64_t M, int64_t K);
void llmkit_int8_prep(const float* X, const int32_t* C, int64_t M, int64_t K, void* scratch, int64_t m0, int64_t m1);
void llmkit_int8_range(const float* X, const void* scratch, const int8_t* Q, const float* S, const int32_t* C,
                       float* Y, int64_t M, int64_t K, int64_t N, int64_t t0, int64_t t1);
void llmkit_f32_range(const float* X, const float* W, float* Y, int64_t M, int64_t K, int64_t N, int64_t t0,
                      int64_t t1);
int64_t llmkit_int4_scratch(int64_t M, int64_t K);
void llmkit_int4_prep(const float* X, int64_t M, int64_t K, void* scratch, int64_t m0, int64_t m1);
void llmkit_int4_range(const void* scratch, const uint8_t* P, const float* SM, float* Y, int64_t M, int64_t K,
                       int64_t N, int64_t g, int64_t t0, int64_t t1);
}

namespace {

// The step's own threads. Why not OpenMP: a team opened from a thread other than the process's first (the
// serving engine's) gets throttled spinning once the process holds more OpenMP threads than CPUs (the main
// thread's team counts), so its workers sleep at every barrier: the same step took 14 ms there against 5.5 ms
// on the main thread (SmolLM2-135M int8, 2 threads). These workers spin on an atomic for ~0.2 ms after a job
// and then sleep on a condition variable, so an idle process costs nothing; the caller is thread 0.
class Pool {
 public:
  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance() = nullptr; }); });
    if (!instance()) instance() = new Pool();  // never freed: its detached workers outlive static destructors
    return *instance();
  }
  // fn(tid, nt) on nt threads (the caller is tid 0); returns when all are done.
  // Calls from several Python threads at once take turns (ctypes releases the GIL).
  void run(int nt, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> turn(run_mu_);
    while (workers_.load() < nt - 1) {  // a new worker waits for the generation after the current one
      std::thread(&Pool::work, this, workers_.load() + 1, gen_.load()).detach();
      ++workers_;
    }
    job_ = &fn;
    n_ = nt;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0, nt);
    while (done_.load(std::memory_order_acquire) < workers_) _mm_pause();
  }
  // All n_ threads of the current job meet here.
  void barrier() {
    const uint64_t ph = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(ph + 1, std::memory_order_release);
    } else {
      while (phase_.load(std::memory_order_acquire) == ph) _mm_pause();
    }
  }

 private:
  static Pool*& instance() {
    static Pool* p = nullptr;
    return p;
  }
  void work(int tid, uint64_t seen) {
    for (;;) {
      uint64_t g;
      for (int i = 0; (g = gen_.load(std::memory_order_acquire)) == seen; ++i) {
        if (i < 20000) {
          _mm_pause();
        } else {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = g;
      if (tid < n_) (*job_)(tid, n_);
      done_.fetch_add(1, std::memory_order_release);
    }
  }
  std::atomic<int> workers_{0}, done_{0}, arrived_{0};
  std::atomic<uint64_t> gen_{0}, phase_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  int n_ = 1;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
};

// One thread's view of the step's job: its index, the thread count, and the helpers that stand for OpenMP's
// single / for / barrier.
struct Team {
  int tid, nt;
  Pool& pool;
  void barrier() const { pool.barrier(); }
  template <typename F>
  void single(F f) const {  // thread 0 runs f; everyone waits for it
    if (tid == 0) f();
    barrier();
  }
  template <typename F>
  void each(int64_t n, F f) const {  // [0, n) split in contiguous shares; everyone waits for all
    for (int64_t i = n * tid / nt, e = n * (tid + 1) / nt; i < e; ++i) f(i);
    barrier();
  }
};

// One Linear (mirrored by ctypes in models/native_step.py): bits 8/4 in qmm.cpp's tile layout, or 32 for the
// model's own row-major fp32 weight.
struct Lin {
  int64_t bits, N, K, g;
  const void* w;      // tiles, or the (N, K) fp32 weight
  const float* s;     // int8 scales (N,); int4 tiled scales and mins (N/4, K/g, 2, 4); null for fp32
  const int32_t* c;   // int8 with int8 activations: the row sums qmm.cpp takes back (N,); else null
  const float* bias;  // (N,) or null
};

// Thread tid's share [a, b) of n tiles among nt threads, each with at least `grain` tiles (fewer threads for a
// small layer, as at::parallel_for's grain does).
inline void share(int64_t n, int64_t grain, int tid, int nt, int64_t& a, int64_t& b) {
  const int64_t use = std::clamp<int64_t>(n / grain, 1, nt);
  a = tid < use ? n * tid / use : n;
  b = tid < use ? n * (tid + 1) / use : n;
}

// x rearranged for L's product into scratch (int8/int4: llmkit_int8_scratch / llmkit_int4_scratch bytes), its
// rows shared among the threads, then a barrier; fp32 reads x as it is.
void prep(const Lin& L, const float* x, int64_t M, void* scratch, const Team& tm) {
  if (L.bits == 8) tm.each(M, [&](int64_t r) { llmkit_int8_prep(x, L.c, M, L.K, scratch, r, r + 1); });
  if (L.bits == 4) tm.each(M, [&](int64_t r) { llmkit_int4_prep(x, M, L.K, scratch, r, r + 1); });
}

// This thread's share [a, b) of L's tiles.
void my_share(const Lin& L, const Team& tm, int64_t& a, int64_t& b) {
  const int64_t tiles = L.bits == 32 ? (L.N + 3) / 4 : L.N / 4;
  share(tiles, L.bits == 32 ? llmkit_f32_grain(L.K) : L.bits == 8 ? llmkit_int8_grain(L.K) : llmkit_int4_grain(L.K),
        tm.tid, tm.nt, a, b);
}

// This thread's share of y = x W^T (no bias, no barrier), x prepared by `prep`.
void product(const Lin& L, const float* x, float* y, int64_t M, const void* scratch, const Team& tm) {
  int64_t a, b;
  my_share(L, tm, a, b);
  if (L.bits == 32) {
    llmkit_f32_range(x, static_cast<const float*>(L.w), y, M, L.K, L.N, a, b);
  } else if (L.bits == 8) {
    llmkit_int8_range(x, scratch, static_cast<const int8_t*>(L.w), L.s, L.c, y, M, L.K, L.N, a, b);
  } else {
    llmkit_int4_range(scratch, static_cast<const uint8_t*>(L.w), L.s, y, M, L.K, L.N, L.g, a, b);
  }
}

void add_bias(const Lin& L, float* y, int64_t M, const Team& tm) {
  if (L.bias)
    tm.each(M, [&](int64_t m) {
      for (int64_t n = 0; n < L.N; ++n) y[m * L.N + n] += L.bias[n];
    });
}

// y = x W^T (+ bias), called by every thread of the step; returns after a barrier.
void linear(const Lin& L, const float* x, float* y, int64_t M, void* scratch, const Team& tm) {
  prep(L, x, M, scratch, tm);
  product(L, x, y, M, scratch, tm);
  tm.barrier();
  add_bias(L, y, M, tm);
}

// y1 = x W1^T and y2 = x W2^T (the MLP's gate and up): one preparation of x and one barrier where the two
// layers share a format.
void linear2(const Lin& L1, const Lin& L2, const float* x, float* y1, float* y2, int64_t M, void* scratch,
             const Team& tm) {
  if (L1.bits != L2.bits || L1.K != L2.K || !L1.c != !L2.c) {
    linear(L1, x, y1, M, scratch, tm);
    linear(L2, x, y2, M, scratch, tm);
    return;
  }
  prep(L1, x, M, scratch, tm);
  product(L1, x, y1, M, scratch, tm);
  product(L2, x, y2, M, scratch, tm);
  tm.barrier();
  add_bias(L1, y1, M, tm);
  add_bias(L2, y2, M, tm);
}

// y = x / sqrt(mean(x^2) + eps) * w, per row (torch.nn.RMSNorm)
void rmsnorm(const float* x, const float* w, float* y, int64_t M, int64_t C, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += r[c] * r[c];
    const float inv = 1.f / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) y[m * C + c] = r[c] * inv * w[c];
  }
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x * cos + rotate_half(x) * sin over one head, rotate_half(x1, x2) = (-x2, x1)
void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t h2 = hd / 2;
  for (int64_t i = 0; i < h2; ++i) {
    const float a = x[i], b = x[i + h2];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h2] = b * cos[i + h2] + a * sin[i + h2];
  }
}

// e^x for 8 floats (Cephes' polynomial, ~2 ulp), 0 for x <= -87 (and -inf): the softmax weights.
inline __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), live);
}

// The 8 sums of a0..a7 as one vector.
inline __m256 hsum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#ifdef __AVX512F__
// out (G x 16H) = sum over the n valid keys of p[j][i] * V[i] for G heads whose outputs stay in G x H
// registers (the AVX2 loop below reads and writes them in memory for every key, which bounded it). The sums
// run over the keys in order, one fma each, as that loop does: the same results.
template <int G, int H>
void weigh_block(const float* p, int64_t n, const uint8_t* ok, const float* V, float* out) {
  constexpr int64_t hd = 16 * H;
  __m512 acc[G][H];
  for (auto& a : acc)
    for (auto& v : a) v = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    if (!ok[i]) continue;
    for (int c = 0; c < H; ++c) {
      const __m512 v = _mm512_loadu_ps(V + i * hd + 16 * c);
      for (int j = 0; j < G; ++j) acc[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * n + i]), v, acc[j][c]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < H; ++c) _mm512_storeu_ps(out + j * hd + 16 * c, acc[j][c]);
}

// weigh_block over g heads of head_dim 16H, in passes of at most 4 heads and 16 registers.
template <int H>
void weigh_values(const float* p, int64_t n, const uint8_t* ok, const float* V, int64_t g, float* out) {
  constexpr int GP = std::min(4, 16 / H);
  int64_t j = 0;
  for (; j + GP <= g; j += GP) weigh_block<GP, H>(p + j * n, n, ok, V, out + j * 16 * H);
  const int64_t rest = g - j;
  if constexpr (GP > 1)
    if (rest == 1) weigh_block<1, H>(p + j * n, n, ok, V, out + j * 16 * H);
  if constexpr (GP > 2)
    if (rest == 2) weigh_block<2, H>(p + j * n, n, ok, V, out + j * 16 * H);
  if constexpr (GP > 3)
    if (rest == 3) weigh_block<3, H>(p + j * n, n, ok, V, out + j * 16 * H);
}
#endif

// Scores of the g query heads of one KV group against keys [s0, s1), softmax-weighted values accumulated into
// out (g x hd); returns each head's (max, sum) in m/l. Scores go 8 keys at a time (8 independent sums, one
// reduction, one vector exp); p holds them per head (g rows of the span). hd % 8 == 0. A key's score and
// weight depend only on (s0, s1), so a token's result does not depend on the batch or thread count.
void attend_part(const float* q, int64_t qstride, const float* Kh, const float* Vh, const uint8_t* ok, int64_t s0,
                 int64_t s1, int64_t g, int64_t hd, float scale, float* out, float* m, float* l, float* p) {
  constexpr int W = 8;
  const int64_t n = s1 - s0, n8 = n / W * W;
  const __m256 ninf = _mm256_set1_ps(-INFINITY), vscale = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n8; i += W) {
    const float* kb = Kh + (s0 + i) * hd;
    // the keys 2 steps ahead into L1, and this step's values into L2 for the weighted sum below: K and V
    // come from memory (the weights evicted them); measured 1.02-1.05x on the step (A/B), as attention stays
    // bound by the latency of those reads
    for (int64_t c = 0; c < W * hd; c += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(kb + 2 * W * hd + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(Vh + (s0 + i) * hd + c), _MM_HINT_T1);
    }
    __m128i okb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ok + s0 + i));
    const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(okb), _mm256_setzero_si256()));
    for (int64_t j = 0; j < g; ++j) {
      __m256 acc[W];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t c = 0; c < hd; c += W) {
        const __m256 qc = _mm256_loadu_ps(q + j * qstride + c);
        for (int t = 0; t < W; ++t) acc[t] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kb + t * hd + c), acc[t]);
      }
      _mm256_storeu_ps(p + j * n + i, _mm256_blendv_ps(ninf, _mm256_mul_ps(hsum8(acc), vscale), valid));
    }
  }
  for (int64_t i = n8; i < n; ++i) {  // the last keys, one at a time
    const float* k = Kh + (s0 + i) * hd;
    for (int64_t j = 0; j < g; ++j) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < hd; c += W) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * qstride + c), _mm256_loadu_ps(k + c), acc);
      p[j * n + i] = ok[s0 + i] ? hsum(acc) * scale : -INFINITY;
    }
  }
  for (int64_t j = 0; j < g; ++j) {  // max, then weights e^(p - max) in place and their sum
    float* pj = p + j * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, pj[i]);
    m[j] = mx;
    if (mx == -INFINITY) {  // no valid key in this part
      l[j] = 0.f;
      std::fill_n(pj, n, 0.f);
      continue;
    }
    __m256 sum = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(mx);
    for (int64_t i = 0; i < n8; i += W) {
      const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(pj + i), vm));
      _mm256_storeu_ps(pj + i, w);
      sum = _mm256_add_ps(sum, w);
    }
    float tail = 0.f;
    for (int64_t i = n8; i < n; ++i) tail += (pj[i] = pj[i] == -INFINITY ? 0.f : std::exp(pj[i] - mx));
    l[j] = hsum(sum) + tail;
  }
#ifdef __AVX512F__
  switch (hd) {  // the weighted sum of the values with the outputs in registers
    case 16: return weigh_values<1>(p, n, ok + s0, Vh + s0 * hd, g, out);
    case 32: return weigh_values<2>(p, n, ok + s0, Vh + s0 * hd, g, out);
    case 64: return weigh_values<4>(p, n, ok + s0, Vh + s0 * hd, g, out);
    case 128: return weigh_values<8>(p, n, ok + s0, Vh + s0 * hd, g, out);
    default: break;
  }
#endif
  std::fill_n(out, g * hd, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = s0 + i;
    if (!ok[s]) continue;
    for (int64_t c = 0; c < hd; c += W) {
      const __m256 v = _mm256_loadu_ps(Vh + s * hd + c);
      for (int64_t j = 0; j < g; ++j) {
        float* o = out + j * hd + c;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(p[j * n + i]), v, _mm256_loadu_ps(o)));
      }
    }
  }
}

// g = silu(g) * u over n floats (the SwiGLU gate), 8 at a time with exp8 (std::exp per element cost ~1 ms of
// an 8-row SmolLM2 step).
void silu_mul(float* g, const float* u, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(zero, x));  // exp8 clamps at 88: e^-x saturates, the result ~0
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

struct Attn {  // the layer-independent shape of a step's attention, and its per-part results
  static constexpr int64_t MIN_KEYS = 256, MAX_PARTS = 8;
  int64_t B, T, nh, nkv, hd, S, pos, g, M, P;
  const int64_t* start;
  const int64_t* rows;
  std::vector<float> po, pm, pl;
  static int64_t parts_of(int64_t n) { return std::clamp<int64_t>(n / MIN_KEYS, 1, MAX_PARTS); }
  int64_t first(int64_t b) const { return start ? start[b] : int64_t{0}; }
  int64_t row(int64_t b) const { return rows ? rows[b] : b; }  // row b's row of the K/V buffers and valid
  Attn(int64_t B_, int64_t T_, int64_t nh_, int64_t nkv_, int64_t hd_, int64_t S_, int64_t pos_, const int64_t* st,
       const int64_t* rw)
      : B(B_), T(T_), nh(nh_), nkv(nkv_), hd(hd_), S(S_), pos(pos_), g(nh_ / nkv_), M(B_ * T_), start(st), rows(rw) {
    int64_t lo = pos;
    for (int64_t b = 0; b < B; ++b) lo = std::min(lo, first(b));
    P = parts_of(pos + T - lo);  // task slots per (token, group); a token uses parts_of(its keys)
    po.resize(M * nkv * P * g * hd);
    pm.resize(M * nkv * P * g);
    pl.resize(M * nkv * P * g);
  }
};

// softmax(q K^T * scale over the valid keys <= its position) V for every token and query head, by every thread
// of the step. Token t of row b sits at buffer position pos + t and sees keys [start[b], pos + t]: a
// row that starts late in a shared buffer (the serving engine's) scans only its own span. Tasks are (token, KV
// group, key range): long spans are split into parts of >= 256 keys (at most 8) that are merged with their
// (max, sum), as flash-decoding does. The split depends only on the row's own key count, so a token's result
// is the same whatever the batch, chunk or thread count. A group's query heads share one read of each key and
// value. p: this thread's score buffer.
void attention(Attn& A, const float* qkv, const float* K, const float* V, const uint8_t* valid, float* att,
               float scale, std::vector<float>& p, const Team& tm) {
  const int64_t g = A.g, hd = A.hd, nkv = A.nkv, P = A.P, T = A.T, S = A.S, pos = A.pos;
  const int64_t nq = A.nh * hd, width = nq + 2 * nkv * hd;
  tm.each(A.M * nkv * P, [&](int64_t t) {
    const int64_t r = t / (nkv * P), kv = t / P % nkv, part = t % P;
    const int64_t b = r / T, a = A.first(b), n = pos + r % T + 1 - a, parts = Attn::parts_of(n);
    const int64_t span = (n + parts - 1) / parts;
    if (part >= parts) return;
    const int64_t s0 = a + part * span, s1 = a + std::min(n, part * span + span);
    p.resize(span * g);
    const int64_t br = A.row(b);
    const float* Kh = K + (br * nkv + kv) * S * hd;
    const float* Vh = V + (br * nkv + kv) * S * hd;
    attend_part(qkv + r * width + kv * g * hd, hd, Kh, Vh, valid + br * S, s0, s1, g, hd, scale,
                A.po.data() + t * g * hd, A.pm.data() + t * g, A.pl.data() + t * g, p.data());
  });
  tm.each(A.M, [&](int64_t r) {
    for (int64_t kv = 0; kv < nkv; ++kv)
      for (int64_t j = 0; j < g; ++j) {
        const int64_t t0 = (r * nkv + kv) * P, parts = Attn::parts_of(pos + r % T + 1 - A.first(r / T));
        float mx = -INFINITY;
        for (int64_t q = 0; q < parts; ++q) mx = std::max(mx, A.pm[(t0 + q) * g + j]);
        float sum = 0.f;
        float* out = att + r * nq + (kv * g + j) * hd;
        std::fill_n(out, hd, 0.f);
        for (int64_t q = 0; q < parts; ++q) {
          const float mq = A.pm[(t0 + q) * g + j];
          if (mq == -INFINITY) continue;  // a part with no valid key
          const float f = std::exp(mq - mx);
          sum += A.pl[(t0 + q) * g + j] * f;
          const float* o = A.po.data() + ((t0 + q) * g + j) * hd;
          for (int64_t i = 0; i < hd; ++i) out[i] += o[i] * f;
        }
        if (sum > 0.f)  // else a padding token that sees no valid key: zeros, never attended to
          for (int64_t i = 0; i < hd; ++i) out[i] /= sum;
      }
  });
}

}  // namespace

extern "C" {

int llmkit_step_abi() { return 8; }

// dims: n_layer, B, T (tokens per row), C (d_model), nh, nkv, hd, d_ff, V, S (cache length), pos (write
// position of each row's first token), head (0: logits of every token, 1: of each row's last token only, 2:
// none, for a prefill piece whose logits nobody reads; the head is a fifth of SmolLM2's weights). Rows of X,
// cos, sin and logits are (b, t) pairs, b-major: M = B * T.
// lins: 5 per layer (qkv, o, gate, up, down) then the head. norms: 2 per layer then the final one.
// kc/vc: per layer the cache buffers (>= B rows, nkv, S, hd); token t's K/V are written at pos + t.
// valid: (>= B rows, S) bytes, 1 where a key may be attended (the caller has set columns pos..pos+T-1).
// start: (B,) each row's first key that may be valid (0 <= start[b] <= pos), or null for all 0.
// rows: (B,) each row's row of kc/vc/valid (distinct), or null for row b in row b: the serving engine steps only
// its occupied slots.
// x: (M, C) embeddings of the new tokens, used as the residual stream (overwritten).
// cos/sin: (M, hd) RoPE tables of each token's position. logits: (M, V), (B, V) or unused out, by head.
void llmkit_decode_step(const int64_t* dims, float eps, float scale, const Lin* lins, const float* const* norms,
                        float* const* kc, float* const* vc, const uint8_t* valid, const int64_t* start,
                        const int64_t* rows, float* x,
                        const float* cos, const float* sin, float* logits) {
  const int64_t L = dims[0], B = dims[1], T = dims[2], C = dims[3], nh = dims[4], nkv = dims[5], hd = dims[6],
                F = dims[7], S = dims[9], pos = dims[10], head = dims[11], M = B * T;
  const int64_t nq = nh * hd, nk = nkv * hd, width = nq + 2 * nk;
  std::vector<float> h(M * C), qkv(M * width), att(M * nq), o(M * C), g(M * F), u(M * F);
  const int64_t Kmax = std::max({C, nq, F});
  std::vector<float> scratch((std::max(llmkit_int4_scratch(M, Kmax), llmkit_int8_scratch(M, Kmax)) + 3) / 4);
  Attn A(B, T, nh, nkv, hd, S, pos, start, rows);
  // The whole step is one job for the step's threads, its stages separated by barriers (see Pool).
  Pool& pool = Pool::get();
  const std::function<void(int, int)> job = [&](int tid, int nt) {
    const Team tm{tid, nt, pool};
    std::vector<float> p;  // this thread's attention scores
    for (int64_t l = 0; l < L; ++l) {
      const Lin* lin = lins + 5 * l;
      float* K = kc[l];
      float* Vc = vc[l];
      tm.each(M, [&](int64_t r) { rmsnorm(x + r * C, norms[2 * l], h.data() + r * C, 1, C, eps); });
      linear(lin[0], h.data(), qkv.data(), M, scratch.data(), tm);
      tm.each(M, [&](int64_t r) {
        const int64_t b = A.row(r / T), dst = pos + r % T;
        float* q = qkv.data() + r * width;
        for (int64_t j = 0; j < nh; ++j) rope(q + j * hd, cos + r * hd, sin + r * hd, hd);
        for (int64_t j = 0; j < nkv; ++j) {
          rope(q + nq + j * hd, cos + r * hd, sin + r * hd, hd);
          std::copy_n(q + nq + j * hd, hd, K + ((b * nkv + j) * S + dst) * hd);
          std::copy_n(q + nq + nk + j * hd, hd, Vc + ((b * nkv + j) * S + dst) * hd);
        }
      });
      attention(A, qkv.data(), K, Vc, valid, att.data(), scale, p, tm);
      linear(lin[1], att.data(), o.data(), M, scratch.data(), tm);
      tm.each(M, [&](int64_t r) {
        for (int64_t i = r * C; i < (r + 1) * C; ++i) x[i] += o[i];
        rmsnorm(x + r * C, norms[2 * l + 1], h.data() + r * C, 1, C, eps);
      });
      linear2(lin[2], lin[3], h.data(), g.data(), u.data(), M, scratch.data(), tm);
      tm.each(M, [&](int64_t r) { silu_mul(g.data() + r * F, u.data() + r * F, F); });
      linear(lin[4], g.data(), o.data(), M, scratch.data(), tm);
      tm.each(M, [&](int64_t r) {
        for (int64_t i = r * C; i < (r + 1) * C; ++i) x[i] += o[i];
      });
    }
    if (head == 2) return;
    // the final norm and the head over every token, or over each row's last one (h's first B rows)
    const int64_t Mh = head == 1 ? B : M;
    tm.single([&] {
      if (head == 1)
        for (int64_t b = 0; b < B; ++b) rmsnorm(x + (b * T + T - 1) * C, norms[2 * L], h.data() + b * C, 1, C, eps);
      else
        rmsnorm(x, norms[2 * L], h.data(), M, C, eps);
    });
    linear(lins[5 * L], h.data(), logits, Mh, scratch.data(), tm);
  };
  pool.run(std::max(1, at::get_num_threads()), job);
}

}  // extern "C"
