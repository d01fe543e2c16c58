/* SampleRows: the service's draw for sampled rows that need every token's probability (service/sampler.py, where
   this library is built): numpy takes about ten passes over a 16 x 49,152 batch of logits for a wide top-p row (a
   float32 exponential of ~2 ns a token here, a histogram, masks), this one five over a row (two without top-p), three
   of them in vectors (ortkernels/vec.h). Called through ctypes, not onnxruntime. One source compiled for AVX-512,
   AVX2 and plain x86-64 (ortkernels/targets.h), picked with CausalAttention's code path. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))
#define ONE_BITS 0x3F800000u                 /* float32 1.0 as bits */
#define BUCKETS ((int)(ONE_BITS >> 20) + 1) /* an eighth of an octave each, below 1.0 */
#define BLOCK 64                             /* tokens a block of the draw's CDF */
#define HISTOGRAMS 4                         /* copies of the buckets' masses, filled in turn */

const char* attention_kernel(void); /* the code path, chosen once: "avx512", "avx2" or "generic" */

/* a (m,) probabilities, r > 0 -> the probability of the token at which the most-likely-first sum of a reaches r (the
   smallest of a where it never does): a selection (three-way partitions around a median of three, the side holding
   the crossing followed), linear in m where a sort would take m log m. a is reordered. */
static float select_cut(float* a, int64_t m, double r) {
  int64_t lo = 0, hi = m;
  while (hi - lo > 16) {
    float x = a[lo], y = a[(lo + hi) / 2], z = a[hi - 1];
    float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
    int64_t gt = lo, i = lo, lt = hi; /* a[lo, gt) > pivot, a[gt, i) == pivot, a[lt, hi) < pivot */
    double above = 0;
    while (i < lt) {
      float v = a[i];
      if (v > pivot) {
        a[i++] = a[gt], a[gt++] = v, above += v;
      } else if (v < pivot) {
        a[i] = a[--lt], a[lt] = v;
      } else {
        i++;
      }
    }
    if (above >= r) {
      hi = gt;
      continue;
    }
    double with = above + (double)pivot * (double)(lt - gt);
    if (with >= r || lt == hi) return pivot;
    r -= with;
    lo = lt;
  }
  for (int64_t i = lo + 1; i < hi; i++) { /* a few left: sorted, most likely first */
    float v = a[i];
    int64_t j = i;
    for (; j > lo && a[j - 1] < v; j--) a[j] = a[j - 1];
    a[j] = v;
  }
  double s = 0;
  for (int64_t i = lo; i < hi; i++)
    if ((s += a[i]) >= r) return a[i];
  return hi > lo ? a[hi - 1] : 0;
}

#define TEMPLATE "sample_rows.h"
#include "targets.h"
#undef TEMPLATE

typedef int64_t (*RowFn)(float*, int64_t, float, double, double, float*, double*);

/* z (rows, n) float32, each row a sampled row's logits over its temperature (overwritten with its probabilities);
   min_p, top_p, u (rows,) -> tokens (rows,). On the calling thread: a second one, for half the rows, measured slower
   in the service, where onnxruntime's threads still spin on the cores after a step's graph call (4.1-4.5 ms against
   3.7-4.0 for 16 rows of 49,152 tokens at temperature 1.0, top-p 0.95; docs/BENCHMARKS.md). 0, or -1 where scratch
   memory could not be had. */
EXPORT int SampleRows(float* z, int64_t rows, int64_t n, const float* min_p, const double* top_p, const double* u,
                      int64_t* tokens) {
  const char* path = attention_kernel();
  RowFn row = sample_row_generic;
#if defined(__x86_64__)
  if (strcmp(path, "avx512") == 0) row = sample_row_avx512;
  if (strcmp(path, "avx2") == 0) row = sample_row_avx2;
#endif
  float* scratch = malloc(sizeof(float) * (size_t)(n + 1));
  double* blocks = malloc(sizeof(double) * (size_t)(n / BLOCK + 2));
  if (!scratch || !blocks) {
    free(scratch);
    free(blocks);
    return -1;
  }
  for (int64_t r = 0; r < rows; r++) tokens[r] = row(z + r * n, n, min_p[r], top_p[r], u[r], scratch, blocks);
  free(scratch);
  free(blocks);
  return 0;
}
