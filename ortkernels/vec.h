/* 16 float lanes in GCC's vector types, for kernels written once and compiled for several targets (AVX-512, AVX2,
   plain x86-64): each helper is always inlined into a function with its own target attribute, so their ABI never
   shows. */
#ifndef ORTKERNELS_VEC_H
#define ORTKERNELS_VEC_H

#include <stdint.h>
#include <string.h>

#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed by value: only between inlined helpers */

#define LANES 16
typedef float vf __attribute__((vector_size(64))); /* the 16 lanes */
typedef int32_t vi __attribute__((vector_size(64)));
#define INLINE static inline __attribute__((always_inline))

INLINE vf load(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
INLINE void store(float* p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf pick(vi keep, vf a, vf b) { return (vf)(((vi)a & keep) | ((vi)b & ~keep)); }

/* exp(x), x clamped to [-87, 88] (-inf to e^-87, 1.6e-38: callers zero what they mask): x = n ln2 + g, e^g by its
   Taylor series to degree 7 (|g| <= 0.35: relative error below 1e-7), times 2^n built in the exponent bits. */
INLINE vf vexp(vf x) {
  const vf zero = {0};
  x = pick(x > -87.f, x, zero - 87.f); /* -inf too */
  x = pick(x < 88.f, x, zero + 88.f);
  vf n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest */
  vf g = x - n * 0.693145751953125f;
  g = g - n * 1.42860682e-6f;
  vf p = zero + 1.f / 5040;
  p = p * g + 1.f / 720;
  p = p * g + 1.f / 120;
  p = p * g + 1.f / 24;
  p = p * g + 1.f / 6;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)e;
}

#endif
