/* MatMulQ4_1: an onnxruntime custom op (CPU) that multiplies float activations by a GGUF's own Q4_1 blocks.

   Y (..., N) = A (..., K) @ W^T, with W (N, K) given as Q4_1 blocks of 32 weights: w = d * q + m, q in 0..15, d and m
   fp16. onnxruntime's MatMulNBits takes an fp32 scale and a 4-bit zero point per block, so Q4_1's minimum m needs
   extra terms in the graph (exactly: more digits and nodes, docs/EXPORT.md); this op reads Q4_1's 20 bytes a block
   as they are and adds m's term itself.

   Arithmetic (llama.cpp's Q4_1 x Q8_1, MLAS's int8 path of MatMulNBits alike): each row of A is rounded per block of
   32 to int8 with one scale (dx = max|a| / 127), so a block's product is d * dx * sum(q * aq) (integer dot products:
   AVX-512 VNNI, or AVX2) plus m * dx * sum(aq). The sum is of the rounded block, as llama.cpp's Q8_1 keeps it: the
   rounding's error then meets the weights d * q + m themselves, mostly centred on zero, not d * q alone (against
   fp64 over SmolLM2-135M's first layer: 0.05-0.30 worst error where the exact float sum gave 0.15-0.38, as
   MatMulNBits with zero points does).

   Packed weights B (uint8, shape (G, K/32, 320), G = ceil(N/16)): columns in groups of 16; for group g and block b,
   320 bytes: 4 chunks c of 16 columns j of 4 bytes, Q4_1's qs[4c .. 4c+3] of column 16g+j (qs[i] holds element i in
   its low nibble and element i+16 in its high one), then the 16 columns' d (fp16), then their m (fp16). The same 20
   bytes a block as the file; columns past N are zero. export/quantize.py writes it.

   With the attribute gated = 1 (a Llama MLP's gate/up projection), W's N columns are the gate's N/2 then the up's,
   packed as gate group 0, up group 0, gate group 1, ... (each half padded to whole groups), and Y (..., N/2) is
   SwiGLU's silu(gate) * up, computed where the products are: one node in place of MatMul, Split, QuickGelu, Mul.

   The onnxruntime side is ort_api.h's (the C API through its ABI, no onnxruntime header). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "ort_api.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define Q41_X86 1
static int has_f16c(void) { /* the AVX2 path converts fp16 d and m with F16C (CPUID leaf 1, ECX bit 29) */
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#endif

#define QK 32          /* weights a block */
#define GROUP 16       /* columns a packed group */
#define GROUP_BYTES 320 /* one block of a group: 256 bytes of digits, 16 d, 16 m */

/* ---- activations: rows of A rounded to int8 per block ------------------------------------------------------ */

typedef struct {
  int8_t* aq;  /* (M, K) */
  float* da;   /* (M, K/32) scales */
  float* sa;   /* (M, K/32) sums of the rounded blocks, times their scale */
} Rows;

typedef void (*QuantizeFn)(const float* a, int K, int8_t* aq, float* da, float* sa);

static void quantize_row(const float* a, int K, int8_t* aq, float* da, float* sa) {
  for (int b = 0; b < K / QK; b++) {
    const float* v = a + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; i++) {
      float x = fabsf(v[i]);
      amax = x > amax ? x : amax;
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int i = 0; i < QK; i++) {
      int8_t q = (int8_t)lrintf(v[i] * inv);
      aq[b * QK + i] = q;
      s += q;
    }
    da[b] = amax / 127.f;
    sa[b] = da[b] * (float)s;
  }
}

static inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else { /* subnormal: normalize */
    int e = -1;
    do {
      e++;
      man <<= 1;
    } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ---- kernels: R rows (1..TILE_ROWS) of one group of 16 columns ----------------------------------------------- */

/* How far ahead of its block the AVX2 tile asks for weights (4 blocks of a group): a decode step's tiles stalled on
   each block's first load from memory (perf annotate on a Zen 3), the groups being too short (5.8 KB at K = 576) for
   the hardware prefetcher to run ahead. 17 alternating pairs of `loadtests.engine --bundle
   bundles/smollm2-135m-int4 --steps 128`: the step 0.76-1.14x, median 0.91x. */
#define Q41_PREFETCH 1280
#define TILE_ROWS 4 /* the most rows a tile takes (8 measured no faster with the VNNI tile) */

/* Writes rows r0 .. r0+R-1 of the group whose weights start at wg: row r's first `cols` columns at dst + r * ld. */
typedef void (*TileFn)(const uint8_t* wg, int K, const Rows* rows, int r0, int R, float* dst, size_t ld, int cols);
/* SwiGLU's product: out[j] = silu(gate[j]) * up[j] = gate[j] / (1 + exp(-gate[j])) * up[j], j < n (n <= 16). */
typedef void (*GateFn)(const float* gate, const float* up, float* out, int n);

static void tile_generic(const uint8_t* wg, int K, const Rows* rows, int r0, int R, float* dst, size_t ld, int cols) {
  int nb = K / QK;
  for (int r = 0; r < R; r++) {
    float acc[GROUP] = {0};
    for (int b = 0; b < nb; b++) {
      const uint8_t* blk = wg + (size_t)b * GROUP_BYTES;
      const int8_t* a = rows->aq + (size_t)(r0 + r) * K + b * QK;
      float da = rows->da[(size_t)(r0 + r) * nb + b], sa = rows->sa[(size_t)(r0 + r) * nb + b];
      for (int j = 0; j < GROUP; j++) {
        int32_t dot = 0;
        for (int c = 0; c < 4; c++) {
          for (int i = 0; i < 4; i++) {
            uint8_t q = blk[64 * c + 4 * j + i];
            dot += (q & 0x0F) * a[4 * c + i] + (q >> 4) * a[16 + 4 * c + i];
          }
        }
        uint16_t dh, mh;
        memcpy(&dh, blk + 256 + 2 * j, 2);
        memcpy(&mh, blk + 288 + 2 * j, 2);
        acc[j] += half_to_float(dh) * da * (float)dot + half_to_float(mh) * sa;
      }
    }
    for (int j = 0; j < cols; j++) dst[(size_t)r * ld + j] = acc[j];
  }
}

static void gate_generic(const float* gate, const float* up, float* out, int n) {
  for (int j = 0; j < n; j++) out[j] = gate[j] / (1.f + expf(-gate[j])) * up[j];
}

#ifdef Q41_X86
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

/* Its weights unpacked once a block, then each row's dot products, 16 columns at once. */
VNNI_TARGET __attribute__((always_inline)) static inline void tile_vnni_r(const uint8_t* wg, int K, const Rows* rows,
                                                                          int r0, float* dst, size_t ld, int cols,
                                                                          const int R) {
  const int nb = K / QK;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[TILE_ROWS];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int b = 0; b < nb; b++) {
    const uint8_t* blk = wg + (size_t)b * GROUP_BYTES;
    __m512i q[8]; /* chunk c: low nibbles (elements 4c..4c+3), high (16+4c..) for 16 columns, 4 bytes each */
    for (int c = 0; c < 4; c++) {
      __m512i v = _mm512_loadu_si512((const void*)(blk + 64 * c));
      q[2 * c] = _mm512_and_si512(v, low);
      q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 256)));
    __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 288)));
    for (int r = 0; r < R; r++) {
      const int8_t* a = rows->aq + (size_t)(r0 + r) * K + b * QK;
      __m512i s = _mm512_setzero_si512(), t = _mm512_setzero_si512(); /* two chains of 4 dependent dpbusd, not one
                                                                            of 8: gated 128 x 576 x 3072 6% faster */
      for (int c = 0; c < 4; c++) {
        s = _mm512_dpbusd_epi32(s, q[2 * c], _mm512_set1_epi32(load_i32(a + 4 * c)));
        t = _mm512_dpbusd_epi32(t, q[2 * c + 1], _mm512_set1_epi32(load_i32(a + 16 + 4 * c)));
      }
      s = _mm512_add_epi32(s, t);
      size_t i = (size_t)(r0 + r) * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(rows->da[i])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(rows->sa[i]), acc[r]);
    }
  }
  __mmask16 keep = (__mmask16)((1u << cols) - 1u);
  for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(dst + (size_t)r * ld, keep, acc[r]);
}

VNNI_TARGET static void tile_vnni(const uint8_t* wg, int K, const Rows* rows, int r0, int R, float* dst, size_t ld,
                                  int cols) {
  switch (R) { /* the row count a constant in each copy: accumulators stay in registers */
    case 4: tile_vnni_r(wg, K, rows, r0, dst, ld, cols, 4); break;
    case 3: tile_vnni_r(wg, K, rows, r0, dst, ld, cols, 3); break;
    case 2: tile_vnni_r(wg, K, rows, r0, dst, ld, cols, 2); break;
    default: tile_vnni_r(wg, K, rows, r0, dst, ld, cols, 1); break;
  }
}

/* quantize_row's arithmetic 16 lanes at a time, bit for bit: the same maximum (max_ps(x, m) keeps m where x is NaN,
   as `x > m ? x : m` does), the same product rounded to nearest even (lrintf in the default rounding mode). A
   prompt's rows were a fifth of the down projection's time rounded one value at a time (128 x 1536). */
VNNI_TARGET static void quantize_row_avx512(const float* a, int K, int8_t* aq, float* da, float* sa) {
  for (int b = 0; b < K / QK; b++) {
    __m512 v0 = _mm512_loadu_ps(a + b * QK), v1 = _mm512_loadu_ps(a + b * QK + 16);
    __m512 m = _mm512_max_ps(_mm512_abs_ps(v1), _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps()));
    float amax = _mm512_reduce_max_ps(m);
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(aq + b * QK), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(aq + b * QK + 16), _mm512_cvtepi32_epi8(q1));
    da[b] = amax / 127.f;
    sa[b] = da[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

/* exp(x) for |x| <= 88: x = n ln2 + g (Cody-Waite), e^g by its Taylor series to degree 7 (|g| <= 0.35: relative
   error below 1e-7), times 2^n. */
#define EXP_POLY(mul_add, set1, g)                                                                  \
  mul_add(mul_add(mul_add(mul_add(mul_add(mul_add(mul_add(set1(1.f / 5040), g, set1(1.f / 720)), g, \
                                                  set1(1.f / 120)),                                  \
                                          g, set1(1.f / 24)),                                        \
                                  g, set1(1.f / 6)),                                                 \
                          g, set1(0.5f)),                                                            \
                  g, set1(1.f)),                                                                     \
          g, set1(1.f))

VNNI_TARGET static inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 g = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  g = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682e-6f), g);
  return _mm512_scalef_ps(EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, g), n);
}

VNNI_TARGET static void gate_vnni(const float* gate, const float* up, float* out, int n) {
  __mmask16 keep = (__mmask16)((1u << n) - 1u);
  __m512 g = _mm512_maskz_loadu_ps(keep, gate), u = _mm512_maskz_loadu_ps(keep, up);
  __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  _mm512_mask_storeu_ps(out, keep, _mm512_mul_ps(silu, u));
}

#define AVX2_TARGET __attribute__((target("avx2,f16c,fma")))

/* AVX2 (no VNNI): unsigned x signed byte products summed in pairs (maddubs, at most 2 * 15 * 127 each), eight of
   them a block added in int16 (at most 30,480), then widened to int32 once. Two halves of 8 columns. */
AVX2_TARGET __attribute__((always_inline)) static inline void tile_avx2_r(const uint8_t* wg, int K, const Rows* rows,
                                                                          int r0, float* dst, size_t ld, int cols,
                                                                          const int R) {
  const int nb = K / QK;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[2][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int b = 0; b < nb; b++) {
    const uint8_t* blk = wg + (size_t)b * GROUP_BYTES;
    for (int c = 0; c < GROUP_BYTES; c += 64) __builtin_prefetch(blk + Q41_PREFETCH + c);
    for (int h = 0; h < 2; h++) {
      __m256i s16[2];
      for (int r = 0; r < R; r++) s16[r] = _mm256_setzero_si256();
      for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 64 * c + 32 * h));
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int r = 0; r < R; r++) {
          const int8_t* a = rows->aq + (size_t)(r0 + r) * K + b * QK;
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(a + 4 * c))));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(a + 16 + 4 * c))));
        }
      }
      __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 256 + 16 * h)));
      __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 288 + 16 * h)));
      for (int r = 0; r < R; r++) {
        size_t i = (size_t)(r0 + r) * nb + b;
        __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r], ones));
        acc[r][h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(rows->da[i])), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(rows->sa[i]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    float out[GROUP];
    _mm256_storeu_ps(out, acc[r][0]);
    _mm256_storeu_ps(out + 8, acc[r][1]);
    memcpy(dst + (size_t)r * ld, out, sizeof(float) * (size_t)cols);
  }
}

AVX2_TARGET static void tile_avx2(const uint8_t* wg, int K, const Rows* rows, int r0, int R, float* dst, size_t ld,
                                  int cols) {
  for (int r = 0; r + 2 <= R; r += 2) tile_avx2_r(wg, K, rows, r0 + r, dst + (size_t)r * ld, ld, cols, 2);
  if (R % 2) tile_avx2_r(wg, K, rows, r0 + R - 1, dst + (size_t)(R - 1) * ld, ld, cols, 1);
}

AVX2_TARGET static inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 g = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  g = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682e-6f), g);
  __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, g), _mm256_castsi256_ps(two_n));
}

AVX2_TARGET static void gate_avx2(const float* gate, const float* up, float* out, int n) {
  float g[GROUP] = {0}, u[GROUP] = {0}, o[GROUP];
  memcpy(g, gate, sizeof(float) * (size_t)n);
  memcpy(u, up, sizeof(float) * (size_t)n);
  for (int h = 0; h < GROUP; h += 8) {
    __m256 gv = _mm256_loadu_ps(g + h);
    __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(o + h, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(u + h)));
  }
  memcpy(out, o, sizeof(float) * (size_t)n);
}
/* quantize_row_avx512's AVX2 form, bit for bit with quantize_row; int32 -> int8 packed as llama.cpp's Q8 rows are. */
AVX2_TARGET static void quantize_row_avx2(const float* a, int K, int8_t* aq, float* da, float* sa) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int b = 0; b < K / QK; b++) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
      v[i] = _mm256_loadu_ps(a + b * QK + 8 * i);
      m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    __m256i q[4];
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
    __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)(aq + b * QK), _mm256_permutevar8x32_epi32(packed, order));
    da[b] = amax / 127.f;
    sa[b] = da[b] * (float)_mm_cvtsi128_si32(t);
  }
}
#endif

/* The code this CPU runs: GPT_ONNX_SERVE_Q4_1_KERNEL=vnni|avx2|generic overrides (tests run each). */
static TileFn g_tile;
static QuantizeFn g_quantize;
static GateFn g_gate;
static const char* g_kernel_name;
static pthread_once_t g_chosen = PTHREAD_ONCE_INIT;

static void choose(void) { /* once per process, before any session can run the op (pthread_once) */
  const char* want = getenv("GPT_ONNX_SERVE_Q4_1_KERNEL");
  TileFn tile = tile_generic;
  GateFn gate = gate_generic;
  QuantizeFn quantize = quantize_row;
  const char* name = "generic";
#ifdef Q41_X86
  __builtin_cpu_init();
  int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("fma");
  int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  if (!(want && strcmp(want, "generic") == 0)) {
    if (vnni && !(want && strcmp(want, "avx2") == 0)) {
      tile = tile_vnni;
      gate = gate_vnni;
      quantize = quantize_row_avx512;
      name = "avx512vnni";
    } else if (avx2) {
      tile = tile_avx2;
      gate = gate_avx2;
      quantize = quantize_row_avx2;
      name = "avx2";
    }
  }
#endif
  g_tile = tile;
  g_gate = gate;
  g_quantize = quantize;
  g_kernel_name = name;
}

static void choose_kernel(void) { pthread_once(&g_chosen, choose); }

/* The code path this CPU runs (the library's MatMulQ4_1Kernel()). */
const char* q4_1_matmul_kernel(void) {
  choose_kernel();
  return g_kernel_name;
}

/* ---- the onnxruntime side ------------------------------------------------------------------------------------ */

typedef struct {
  const OrtApi* api;
  int64_t K, N, gated;
} Kernel;

static const char* op_name(const CustomOp* op) { (void)op; return "MatMulQ4_1"; }
static int op_input_type(const CustomOp* op, size_t i) { (void)op; return i == 0 ? TYPE_FLOAT : TYPE_UINT8; }
static size_t op_two(const CustomOp* op) { (void)op; return 2; }
static int op_output_type(const CustomOp* op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t op_one(const CustomOp* op) { (void)op; return 1; }
static void kernel_destroy(void* kernel) { free(kernel); }

static OrtStatus* kernel_create(const CustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op;
  OrtStatus* (*get_int)(const void*, const char*, int64_t*) = API(api, KernelInfoGetAttribute_int64);
  Kernel* k = calloc(1, sizeof(Kernel));
  if (!k) return ort_fail(api, ORT_FAIL, "MatMulQ4_1: out of memory");
  k->api = api;
  OrtStatus* s;
  if ((s = get_int(info, "K", &k->K)) || (s = get_int(info, "N", &k->N))) {
    free(k);
    return s;
  }
  if ((s = get_int(info, "gated", &k->gated))) { /* optional: absent is 0 */
    ((void (*)(OrtStatus*))API(api, ReleaseStatus))(s);
    k->gated = 0;
  }
  if (k->K <= 0 || k->K % QK || k->N <= 0 || k->K > (1 << 24) || k->N > (1 << 24) || (k->gated && k->N % 2)) {
    free(k);
    return ort_fail(api, ORT_INVALID_ARGUMENT, "MatMulQ4_1: K must be a positive multiple of 32, N positive (even if gated)");
  }
  *out = k;
  return NULL;
}

typedef struct { /* one call's work, shared by the threads */
  const float* a;
  const uint8_t* w;
  float* y;
  Rows rows;
  int K, N, M, parts, gated;
} Work;

static void quantize_part(void* user, size_t part) {
  Work* t = user;
  int nb = t->K / QK;
  int r0 = (int)((int64_t)t->M * part / t->parts), r1 = (int)((int64_t)t->M * (part + 1) / t->parts);
  for (int r = r0; r < r1; r++)
    g_quantize(t->a + (size_t)r * t->K, t->K, t->rows.aq + (size_t)r * t->K, t->rows.da + (size_t)r * nb,
               t->rows.sa + (size_t)r * nb);
}

/* Task `part`: one group of 16 output columns, every row, TILE_ROWS rows at a time. Gated, the group's 16 gate
   columns and its 16 up columns (packed side by side as groups 2g and 2g+1) go through SwiGLU into 16 of N/2
   outputs. */
static void multiply_part(void* user, size_t part) {
  Work* t = user;
  int g = (int)part, K = t->K, N_out = t->gated ? t->N / 2 : t->N;
  size_t group_bytes = (size_t)(K / QK) * GROUP_BYTES;
  int cols = N_out - g * GROUP < GROUP ? N_out - g * GROUP : GROUP;
  for (int r0 = 0; r0 < t->M; r0 += TILE_ROWS) {
    int R = t->M - r0 < TILE_ROWS ? t->M - r0 : TILE_ROWS;
    float* y = t->y + (size_t)r0 * N_out + (size_t)g * GROUP;
    if (!t->gated) {
      g_tile(t->w + g * group_bytes, K, &t->rows, r0, R, y, (size_t)N_out, cols);
      continue;
    }
    float gate_up[TILE_ROWS][2 * GROUP]; /* (R, gate 16 | up 16) */
    g_tile(t->w + (size_t)(2 * g) * group_bytes, K, &t->rows, r0, R, gate_up[0], 2 * GROUP, GROUP);
    g_tile(t->w + (size_t)(2 * g + 1) * group_bytes, K, &t->rows, r0, R, gate_up[0] + GROUP, 2 * GROUP, GROUP);
    for (int r = 0; r < R; r++) g_gate(gate_up[r], gate_up[r] + GROUP, y + (size_t)r * N_out, cols);
  }
}

static OrtStatus* kernel_compute(void* kernel, void* context) {
  Kernel* k = kernel;
  const OrtApi* api = k->api;
  OrtStatus* (*get_input)(const void*, size_t, const void**) = API(api, KernelContext_GetInput);
  OrtStatus* (*get_output)(void*, size_t, const int64_t*, size_t, void**) = API(api, KernelContext_GetOutput);
  OrtStatus* (*data)(void*, void**) = API(api, GetTensorMutableData);
  OrtStatus* (*parallel_for)(const void*, void (*)(void*, size_t), size_t, size_t, void*) =
      API(api, KernelContext_ParallelFor);
  const void *a_value, *w_value;
  int a_type, w_type;
  int64_t a_dims[8], w_dims[8];
  size_t a_rank, w_rank;
  OrtStatus* s;
  if ((s = get_input(context, 0, &a_value)) || (s = get_input(context, 1, &w_value))) return s;
  if ((s = ort_shape(api, a_value, &a_type, a_dims, &a_rank)) ||
      (s = ort_shape(api, w_value, &w_type, w_dims, &w_rank)))
    return s;
  /* gated: N columns of weights, gate then up, give N/2 outputs; G groups of outputs */
  int K = (int)k->K, N = (int)k->N, N_out = k->gated ? N / 2 : N, G = (N_out + GROUP - 1) / GROUP;
  if (a_type != TYPE_FLOAT || a_rank < 1 || a_dims[a_rank - 1] != K)
    return ort_fail(api, ORT_INVALID_ARGUMENT, "MatMulQ4_1: A must be float with K as its last dimension");
  if (w_type != TYPE_UINT8 || w_rank != 3 || w_dims[0] != (k->gated ? 2 * G : G) || w_dims[1] != K / QK ||
      w_dims[2] != GROUP_BYTES)
    return ort_fail(api, ORT_INVALID_ARGUMENT, "MatMulQ4_1: B must be uint8 (ceil(N/16), K/32, 320), gated 2 ceil(N/32)");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < a_rank; i++) M *= a_dims[i];
  int64_t y_dims[8];
  memcpy(y_dims, a_dims, sizeof(int64_t) * a_rank);
  y_dims[a_rank - 1] = N_out;
  void* y_value;
  if ((s = get_output(context, 0, y_dims, a_rank, &y_value))) return s;
  if (M == 0) return NULL;
  if (M > (1 << 24)) return ort_fail(api, ORT_INVALID_ARGUMENT, "MatMulQ4_1: too many rows");
  Work t = {.K = K, .N = N, .M = (int)M, .gated = (int)k->gated};
  void *a_data, *w_data, *y_data;
  data((void*)a_value, &a_data);
  data((void*)w_value, &w_data);
  data(y_value, &y_data);
  t.a = a_data;
  t.w = w_data;
  t.y = y_data;
  size_t nb = (size_t)(K / QK);
  void* scratch = malloc((size_t)M * K + 2 * (size_t)M * nb * sizeof(float));
  if (!scratch) return ort_fail(api, ORT_FAIL, "MatMulQ4_1: out of memory");
  t.rows.da = scratch;
  t.rows.sa = t.rows.da + (size_t)M * nb;
  t.rows.aq = (int8_t*)(t.rows.sa + (size_t)M * nb);
  t.parts = M < 16 ? 1 : (int)(M < 64 ? M : 64);
  s = t.parts == 1 ? (quantize_part(&t, 0), NULL) : parallel_for(context, quantize_part, (size_t)t.parts, 0, &t);
  if (!s) {
    t.parts = G; /* one group of outputs a task: 36-96 for the projections of SmolLM2-135M */
    s = parallel_for(context, multiply_part, (size_t)t.parts, 0, &t);
  }
  free(scratch);
  return s;
}

static const CustomOp g_op = { /* read by onnxruntime for as long as its sessions live: never written */
    ORT_OP_COMMON,
    .GetName = op_name,
    .GetInputType = op_input_type,
    .GetInputTypeCount = op_two,
    .GetOutputType = op_output_type,
    .GetOutputTypeCount = op_one,
    .GetInputCharacteristic = ort_op_required,
};

const CustomOp* q4_1_matmul_op(void) {
  choose_kernel(); /* before any session can run it */
  return &g_op;
}
