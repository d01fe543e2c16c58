/* A sampled row's draw (ortkernels/sample.c), a template over the target's native vector of VW floats
   (ortkernels/vec.h): V(sample_row). */

/* The sum of p's lanes, as a double. */
TARGET INLINE double V(lanes_sum)(V(vf) p) {
  float lanes[VW];
  V(store)(lanes, p);
  double s = 0;
  for (int i = 0; i < VW; i++) s += lanes[i];
  return s;
}

/* z (n,) a row's logits over its temperature, overwritten with its probabilities (unnormalized: the most likely at
   1.0, e^(z - max) clamped at e^-87, 0 below min_p) -> the token drawn with u in [0, 1): min-p, then top-p (the
   smallest most-likely-first set holding top_p of the mass, ties with its last token kept: the cut found through the
   mass of buckets of an eighth of an octave of probability, then a selection among the crossing bucket's tokens),
   then the inverse CDF in vocabulary order over blocks of BLOCK tokens. scratch: n floats; blocks: n / BLOCK + 1
   doubles. */
TARGET static int64_t V(sample_row)(float* z, int64_t n, float min_p, double top_p, double u, float* scratch,
                                    double* blocks) {
  const V(vf) zero = {0};
  int64_t full = n - n % VW, nb = (n + BLOCK - 1) / BLOCK;
  float zmax = -INFINITY;
  {
    V(vf) m = zero - INFINITY;
    for (int64_t j = 0; j < full; j += VW) {
      V(vf) x = V(load)(z + j);
      m = V(pick)(x > m, x, m);
    }
    for (int i = 0; i < VW; i++) zmax = m[i] > zmax ? m[i] : zmax;
    for (int64_t j = full; j < n; j++) zmax = z[j] > zmax ? z[j] : zmax;
  }
  if (full < n) { /* the last few, through a padded vector */
    float x[VW];
    for (int i = 0; i < VW; i++) x[i] = full + i < n ? z[full + i] : -INFINITY;
    V(store)(x, V(vexp)(V(load)(x) - zmax));
    for (int64_t j = full; j < n; j++) z[j] = x[j - full] < min_p ? 0 : x[j - full];
  }
  /* probabilities in place, each block's mass */
  double total = 0;
  for (int64_t b = 0; b < nb; b++) {
    int64_t lo = b * BLOCK, hi = lo + BLOCK < full ? lo + BLOCK : full;
    V(vf) acc = zero;
    for (int64_t j = lo; j < hi; j += VW) {
      V(vf) p = V(vexp)(V(load)(z + j) - zmax);
      p = V(pick)(p < min_p, zero, p);
      V(store)(z + j, p);
      acc += p;
    }
    double s = V(lanes_sum)(acc);
    for (int64_t j = hi > lo ? hi : lo; j < lo + BLOCK && j < n; j++) s += z[j]; /* the tail's, done above */
    blocks[b] = s;
    total += s;
  }
  float cut = 0; /* the least probability kept */
  if (top_p < 1.0) {
    /* each bucket's mass, in HISTOGRAMS interleaved copies (neighbouring tokens often share a bucket: one copy
       would wait on its own last add) */
    double need = top_p * total, mass[HISTOGRAMS][BUCKETS];
    memset(mass, 0, sizeof mass);
    const uint32_t* bits = (const uint32_t*)z;
    int64_t j = 0;
    for (; j + HISTOGRAMS <= n; j += HISTOGRAMS)
      for (int h = 0; h < HISTOGRAMS; h++) mass[h][(ONE_BITS - bits[j + h]) >> 20] += z[j + h]; /* 0: the top's */
    for (; j < n; j++) mass[0][(ONE_BITS - bits[j]) >> 20] += z[j];
    int cross = BUCKETS - 1;
    double above = 0; /* the mass of the buckets wholly in */
    for (int b = 0; b < BUCKETS; b++) {
      double here = 0;
      for (int h = 0; h < HISTOGRAMS; h++) here += mass[h][b];
      if (above + here >= need) {
        cross = b;
        break;
      }
      above += here;
    }
    /* the crossing bucket's tokens: those whose bits lie in its range */
    uint32_t top = ONE_BITS - ((uint32_t)cross << 20), bottom = cross == BUCKETS - 1 ? 0 : top - (1u << 20) + 1;
    const V(vi) hi_v = (V(vi)){0} + (int32_t)top, lo_v = (V(vi)){0} + (int32_t)bottom;
    int64_t m = 0;
    for (j = 0; j < full; j += VW) {
      V(vi) x;
      memcpy(&x, bits + j, sizeof x);
      V(vi) in = (x >= lo_v) & (x <= hi_v); /* the bits of p >= 0 order as p does */
      uint64_t words[VW / 2], any = 0; /* the lanes' masks as words: a few ORs instead of a lane each */
      memcpy(words, &in, sizeof words);
      for (int i = 0; i < VW / 2; i++) any |= words[i];
      if (any)
        for (int i = 0; i < VW; i++)
          if (in[i]) scratch[m++] = z[j + i];
    }
    for (; j < n; j++)
      if (bits[j] >= bottom && bits[j] <= top) scratch[m++] = z[j];
    cut = select_cut(scratch, m, need - above);
    for (int64_t b = 0; b < nb; b++) { /* the blocks' kept mass */
      int64_t lo = b * BLOCK, hi = lo + BLOCK < full ? lo + BLOCK : full;
      V(vf) acc = zero;
      for (int64_t j = lo; j < hi; j += VW) {
        V(vf) p = V(load)(z + j);
        acc += V(pick)(p >= cut, p, zero);
      }
      double s = V(lanes_sum)(acc);
      for (int64_t j = hi > lo ? hi : lo; j < lo + BLOCK && j < n; j++) s += z[j] >= cut ? z[j] : 0;
      blocks[b] = s;
    }
  }
  double kept = 0;
  for (int64_t b = 0; b < nb; b++) kept += blocks[b];
  double target = u * kept, c = 0;
  for (int64_t b = 0; b < nb; b++) {
    if (c + blocks[b] > target) {
      int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
      double w = c;
      for (int64_t j = lo; j < hi; j++)
        if (z[j] >= cut && z[j] > 0 && (w += z[j]) > target) return j;
    }
    c += blocks[b];
  }
  for (int64_t j = n - 1; j > 0; j--) /* rounding carried the draw past the last kept token */
    if (z[j] >= cut && z[j] > 0) return j;
  return 0;
}
