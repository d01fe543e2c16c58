/* Vector helpers in GCC's vector types, one native vector of VW floats (16 AVX-512, 8 AVX2, 4 SSE), for kernels
   written once and compiled for several targets. A template: the includer defines VW, TARGET (the target attribute,
   or nothing) and V(name) (each instantiation's names) before each inclusion, and undefines them after. (A vector
   wider than the target's registers would be split through memory by the compiler: each target gets its own width.)
   The helpers are always inlined into functions of the same target, so vectors passed by value never meet an ABI. */
#pragma GCC diagnostic ignored "-Wpsabi"

#include <stdint.h>
#include <string.h>

#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

typedef float V(vf) __attribute__((vector_size(4 * VW)));
typedef int32_t V(vi) __attribute__((vector_size(4 * VW)));

TARGET INLINE V(vf) V(load)(const float* p) {
  V(vf) v;
  memcpy(&v, p, sizeof v);
  return v;
}
TARGET INLINE void V(store)(float* p, V(vf) v) { memcpy(p, &v, sizeof v); }
TARGET INLINE V(vf) V(pick)(V(vi) keep, V(vf) a, V(vf) b) { return (V(vf))(((V(vi))a & keep) | ((V(vi))b & ~keep)); }

/* exp(x), x clamped to [-87, 88] (-inf to e^-87, 1.6e-38: callers zero what they mask): x = n ln2 + g, e^g by its
   Taylor series to degree 7 (|g| <= 0.35: relative error below 1e-7), times 2^n built in the exponent bits. */
TARGET INLINE V(vf) V(vexp)(V(vf) x) {
  const V(vf) zero = {0};
  x = V(pick)(x > -87.f, x, zero - 87.f); /* -inf too */
  x = V(pick)(x < 88.f, x, zero + 88.f);
  V(vf) n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest */
  V(vf) g = x - n * 0.693145751953125f;
  g = g - n * 1.42860682e-6f;
  V(vf) p = zero + 1.f / 5040;
  p = p * g + 1.f / 720;
  p = p * g + 1.f / 120;
  p = p * g + 1.f / 24;
  p = p * g + 1.f / 6;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  V(vi) e = (__builtin_convertvector(n, V(vi)) + 127) << 23;
  return p * (V(vf))e;
}

/* A vector of lanes picked from a and b (indices into their concatenation): GCC's own builtin before GCC 12, which
   has clang's (as clang). */
#ifndef SHUFFLE
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (V(vi)){__VA_ARGS__})
#endif
#endif

/* The sums of four vectors' lanes, into out[0..3]: pairs of halves added, then pairs of quarters, ..., each step one
   add over lanes of two of them (a tree, not one lane at a time). */
TARGET INLINE void V(hsum4)(V(vf) a, V(vf) b, V(vf) c, V(vf) d, float* out) {
#if VW == 16
  V(vf) ab = SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  V(vf) cd = SHUFFLE(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             SHUFFLE(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  V(vf) x = SHUFFLE(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            SHUFFLE(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  x += SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = x[0], out[1] = x[4], out[2] = x[8], out[3] = x[12];
#elif VW == 8
  V(vf) ab = SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  V(vf) cd = SHUFFLE(c, d, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  V(vf) x = SHUFFLE(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) + SHUFFLE(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  x += SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  out[0] = x[0], out[1] = x[2], out[2] = x[4], out[3] = x[6];
#else
  V(vf) ab = SHUFFLE(a, b, 0, 1, 4, 5) + SHUFFLE(a, b, 2, 3, 6, 7);
  V(vf) cd = SHUFFLE(c, d, 0, 1, 4, 5) + SHUFFLE(c, d, 2, 3, 6, 7);
  V(vf) x = SHUFFLE(ab, cd, 0, 2, 4, 6) + SHUFFLE(ab, cd, 1, 3, 5, 7);
  out[0] = x[0], out[1] = x[1], out[2] = x[2], out[3] = x[3];
#endif
}
