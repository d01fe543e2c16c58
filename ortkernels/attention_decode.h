/* CausalAttention's decode tiles (ortkernels/attention_tiles.h), a template over GB = DECODE_GB, the query heads a
   pass: included with 4, 3 and 1 (V(decode_4), V(decode_3), V(decode_1); 1 for a kv head's one query head, as
   GPT-2's, 3 for SmolLM2's three), each compiled with its GB a constant (one function taking GB as an argument ran
   SmolLM2's 40% slower) and apart from V(attend) (noinline): inlined there, several instances left GCC's registers
   worse for all of them (16 rows' decode over 256 positions, SmolLM2: 176-188 us a call with 3 heads a pass, against
   127-138 with 4 before; apart, 115-119 with 3; GPT-2's shape 360-364 against 405-411 us). */

/* A decode step's tile of one row (S == 1), keys kb .. ke-1, which all of its queries attend: its lanes are query
   heads (those with a query first, `query` >= 0), so the vectors run along the head dimension instead of the lanes.
   Each block of 4 keys is read once for GB = DECODE_GB heads at a time (4 GB dot products, their lanes summed in a
   tree), and the values once for GB heads (o += p v, DBV vectors of the D a pass); where lanes are queries
   (V(tile_keys)) a decode tile's 16 lanes hold G = 3 heads and 13 of every 16 products are thrown away. m, l (L,)
   and o (D, L) as V(tile_keys) leaves them; lanes without a query get m = -inf, l = 0, o = 0. scores: (GB ceil(heads /
   GB), ke - kb). */
#define DECODE_NAMED(gb) V(decode_##gb) /* DECODE_GB expanded first, then pasted: V(decode_4) */
#define DECODE_NAME(gb) DECODE_NAMED(gb)
TARGET __attribute__((noinline)) static void DECODE_NAME(DECODE_GB)(const Work* t, const Keys* keys, const int* query,
                                                                    int kb, int ke, float* scores, float* m_out,
                                                                    float* l_out, float* o_out) {
  enum { GB = DECODE_GB, DBV = VW == 16 ? 4 : 2 }; /* heads a pass; vectors of o a pass per head */
  const int D = t->D, L = t->L, nk = ke - kb;
  static const float zeros[1024] = {0}; /* the query of a head past the last (D <= 1024) */
  const float* q[2 * LANES + GB];
  int n = 0;
  while (n < L && query[n] >= 0) q[n] = t->q + (size_t)query[n] * D, n++;
  const int heads = (n + GB - 1) / GB * GB;
  for (int g = n; g < heads; g++) q[g] = zeros;
  const float* K = keys->K + (size_t)kb * D;
  const float* X = keys->X + (size_t)kb * D;
  for (int lane = 0; lane < L; lane++) m_out[lane] = -INFINITY, l_out[lane] = 0;
  memset(o_out, 0, sizeof(float) * (size_t)D * L);
  if (nk <= 0) return;
  for (int g0 = 0; g0 < heads; g0 += GB) {
    /* scores: 4 keys x GB heads a block; the last block's keys past nk repeat the last key, unstored */
    for (int j = 0; j < nk; j += 4) {
      const float* k[4];
      for (int u = 0; u < 4; u++) k[u] = K + (size_t)(j + u < nk ? j + u : nk - 1) * D;
      V(vf) a[GB][4];
      for (int g = 0; g < GB; g++)
        for (int u = 0; u < 4; u++) a[g][u] = (V(vf)){0};
      for (int d = 0; d < D; d += VW) {
        V(vf) kv[4];
        for (int u = 0; u < 4; u++) kv[u] = V(load)(k[u] + d);
        for (int g = 0; g < GB; g++) {
          V(vf) qv = V(load)(q[g0 + g] + d);
          for (int u = 0; u < 4; u++) a[g][u] += qv * kv[u];
        }
      }
      for (int g = 0; g < GB; g++) {
        float s[4];
        V(hsum4)(a[g][0], a[g][1], a[g][2], a[g][3], s);
        for (int u = 0; u < 4 && j + u < nk; u++) scores[(size_t)(g0 + g) * nk + j + u] = s[u];
      }
    }
    /* each head's maximum, its probabilities (unnormalized) and their sum */
    float* p[GB];
    for (int g = 0; g < GB; g++) {
      p[g] = scores + (size_t)(g0 + g) * nk;
      float m = -INFINITY, l = 0;
      V(vf) mv = (V(vf)){0} - INFINITY, lv = {0}; /* a vector's lanes, reduced once */
      int j = 0;
      for (; j + VW <= nk; j += VW) {
        V(vf) x = V(load)(p[g] + j);
        mv = V(pick)(x > mv, x, mv);
      }
      for (int i = 0; i < VW; i++) m = mv[i] > m ? mv[i] : m;
      for (; j < nk; j++) m = p[g][j] > m ? p[g][j] : m;
      for (j = 0; j + VW <= nk; j += VW) {
        V(vf) e = V(vexp)(V(load)(p[g] + j) - m);
        V(store)(p[g] + j, e);
        lv += e;
      }
      for (int i = 0; i < VW; i++) l += lv[i];
      for (; j < nk; j++) l += p[g][j] = expf(p[g][j] - m);
      if (g0 + g < n) m_out[g0 + g] = m, l_out[g0 + g] = l;
    }
    /* o = p @ values, DBV vectors of each head's o a pass */
    for (int d0 = 0; d0 < D; d0 += DBV * VW) {
      const int nv = D - d0 < DBV * VW ? (D - d0) / VW : DBV;
      V(vf) o[GB][DBV];
      for (int g = 0; g < GB; g++)
        for (int e = 0; e < DBV; e++) o[g][e] = (V(vf)){0};
      for (int j = 0; j < nk; j++) {
        const float* x = X + (size_t)j * D + d0;
        V(vf) xv[DBV];
        for (int e = 0; e < DBV; e++) xv[e] = e < nv ? V(load)(x + e * VW) : (V(vf)){0};
        for (int g = 0; g < GB; g++) {
          float w = p[g][j];
          for (int e = 0; e < DBV; e++) o[g][e] += w * xv[e];
        }
      }
      for (int g = 0; g < GB && g0 + g < n; g++)
        for (int e = 0; e < nv; e++)
          for (int i = 0; i < VW; i++) o_out[(size_t)(d0 + e * VW + i) * L + g0 + g] = o[g][e][i];
    }
  }
}
#undef DECODE_NAME
#undef DECODE_NAMED
