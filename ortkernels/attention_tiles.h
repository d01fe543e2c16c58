/* CausalAttention's tiles (ortkernels/attention.c), a template over the target's native vector of VW floats (vec.h:
   VW, TARGET and V(name) defined by the includer): V(attend), one part of a call's tiles, and V(merge), the partial
   softmaxes of split keys. A tile's lanes are L = t->L floats in memory (32 for a prompt, 16 for decode, 8 for decode
   on a target of 8 floats or fewer); the code works on L / VW native vectors of them, its loops sized to the target's
   registers (32 vector registers with AVX-512, 16 otherwise). */

#define V_ACC (VW == 16 ? 16 : 8) /* independent sums a loop keeps */
/* A loaded vector kept in a register for its KB (or DB) uses. Without it GCC folded each use back into a load from
   memory, so the queries were loaded once per key and the probabilities once per dimension: on a Zen 3 (AVX2) the
   prompt tiles' loops were bound by loads, not FMAs. Measured on AVX2 only (the AVX-512 code is left as it was; SSE's
   8 queries and 8 sums would not fit its 16 registers with it). */
#if VW == 8 && (defined(__x86_64__) || defined(__i386__))
#define TILE_PIN(v) __asm__("" : "+v"(v))
#else
#define TILE_PIN(v) (void)0
#endif
/* Keys a block of o = p @ values: a block's probabilities and values stay in L1 through the D / DB passes over it.
   Measured on AVX2 (Zen 3, 512 KB of L2 a core: 32 keys 0.79-0.90x the time of unblocked passes for four 32-token
   turns after 1,000 cached positions, 64 within 5% of 32); AVX-512 (1 MB of L2 on Zen 4, 4x fewer passes) keeps its
   unblocked passes. */
#define PV_KEYS (VW == 16 ? 1 << 30 : 32)

/* Keys kb .. ke-1 of a tile (where they are: `keys`, positions below keys->split from the prefix row) for its
   L = NVEC VW lanes: each lane's maximum score m, its sum of
   exp(score - m) l (L floats each), and o (D, L) = sum of exp(score - m) v, unnormalized. A lane with no key in the
   range gets m = -inf, l = 0, o = 0. scores: (ke - kb, L) scratch. NVEC is a constant where this is inlined: a
   prompt's tiles have 32 lanes (each key's numbers, broadcast once, serve twice the queries), a decode step's 16 (8
   where the target's vectors are 8 floats or fewer). */
TARGET INLINE void V(tile_keys)(const Work* t, const Keys* keys, const float* qt, const int* lim, int kb, int ke,
                                float* scores, float* m_out, float* l_out, float* o_out, const int NVEC) {
  const int D = t->D, nk = ke - kb, L = NVEC * VW;
  const int KB = NVEC >= 8 ? 1 : 8 / NVEC;            /* keys a block: 8 independent sums */
  const int DB = V_ACC / NVEC >= 1 ? V_ACC / NVEC : 1; /* dimensions of o a pass */
  V(vi) limit[8];
  memcpy(limit, lim, sizeof(int) * (size_t)L);
  const int split = keys->split - kb; /* keys j < split of this range are the prefix row's */
  const float* K = keys->K + (size_t)kb * D;
  const float* X = keys->X + (size_t)kb * D; /* the values */
  const float* KP = keys->KP + (size_t)kb * D;
  const float* XP = keys->XP + (size_t)kb * D;
  const V(vf) ninf = (V(vf)){0} - INFINITY;

  /* scores (nk, L), KB keys at a time (a key alone would wait on each of its D products in turn); the last block's
     keys past nk repeat the last key, unstored. Only the sums and the queries are live in the loop: with each lane's
     maximum and limit beside them (8 more vectors on AVX2) GCC spilled sums or folded the queries' loads into the
     FMAs, and the loop waited on memory (a Zen 3). */
  for (int j = 0; j < nk; j += KB) {
    const float* k[8];
    for (int u = 0; u < KB; u++) {
      int key = j + u < nk ? j + u : nk - 1;
      k[u] = (key < split ? KP : K) + (size_t)key * D;
    }
    V(vf) a[8][8];
    for (int n = 0; n < NVEC; n++)
      for (int u = 0; u < KB; u++) a[n][u] = (V(vf)){0};
    for (int d = 0; d < D; d++) {
      V(vf) q[8];
      for (int n = 0; n < NVEC; n++) {
        q[n] = V(load)(qt + (size_t)d * L + n * VW);
        TILE_PIN(q[n]);
      }
      for (int u = 0; u < KB; u++) {
        float x = k[u][d];
        for (int n = 0; n < NVEC; n++) a[n][u] += q[n] * x;
      }
    }
    for (int u = 0; u < KB && j + u < nk; u++)
      for (int n = 0; n < NVEC; n++) V(store)(scores + (size_t)(j + u) * L + n * VW, a[n][u]);
  }

  /* each lane's maximum over the keys it attends to (-inf: none) */
  V(vf) m[8];
  for (int n = 0; n < NVEC; n++) m[n] = ninf;
  for (int j = 0; j < nk; j++)
    for (int n = 0; n < NVEC; n++) {
      V(vf) s = V(pick)(limit[n] >= kb + j, V(load)(scores + (size_t)j * L + n * VW), ninf);
      m[n] = V(pick)(s > m[n], s, m[n]);
    }

  /* probabilities, unnormalized (0 where masked: exp of a masked score is clamped finite, then zeroed), and their
     sums */
  V(vf) l[8];
  for (int n = 0; n < NVEC; n++) l[n] = (V(vf)){0};
  for (int j = 0; j < nk; j++)
    for (int n = 0; n < NVEC; n++) {
      float* at = scores + (size_t)j * L + n * VW;
      V(vf) p = (V(vf))((V(vi))V(vexp)(V(load)(at) - m[n]) & (limit[n] >= kb + j));
      l[n] += p;
      V(store)(at, p);
    }

  /* o = p @ values, DB dimensions a pass, PV_KEYS keys at a time */
  for (int j0 = 0; j0 < nk; j0 += PV_KEYS) {
    const int j1 = j0 + PV_KEYS < nk ? j0 + PV_KEYS : nk;
    for (int d0 = 0; d0 < D; d0 += DB) {
      V(vf) o[8][16];
      for (int n = 0; n < NVEC; n++)
        for (int e = 0; e < DB; e++)
          o[n][e] = j0 ? V(load)(o_out + (size_t)(d0 + e) * L + n * VW) : (V(vf)){0};
      for (int j = j0; j < j1; j++) {
        V(vf) p[8];
        for (int n = 0; n < NVEC; n++) {
          p[n] = V(load)(scores + (size_t)j * L + n * VW);
          TILE_PIN(p[n]);
        }
        const float* x = (j < split ? XP : X) + (size_t)j * D + d0;
        for (int e = 0; e < DB; e++)
          for (int n = 0; n < NVEC; n++) o[n][e] += p[n] * x[e];
      }
      for (int e = 0; e < DB; e++)
        for (int n = 0; n < NVEC; n++) V(store)(o_out + (size_t)(d0 + e) * L + n * VW, o[n][e]);
    }
  }
  for (int n = 0; n < NVEC; n++) {
    V(store)(m_out + n * VW, m[n]);
    V(store)(l_out + n * VW, l[n]);
  }
}

/* A decode step's tiles (ortkernels/attention_decode.h): 4, 3 or 1 query heads a pass, whichever leaves the fewest
   empty heads for a kv head's G (decode_heads: SmolLM2's G = 3 three a pass, not 4 with one empty) */
#define DECODE_GB 4
#include "attention_decode.h"
#undef DECODE_GB
#define DECODE_GB 3
#include "attention_decode.h"
#undef DECODE_GB
#define DECODE_GB 1
#include "attention_decode.h"
#undef DECODE_GB

/* Part p: tasks p, p + parts, ... (the causal tiles' costs grow with their rows: interleaved, each part gets a share
   of long and short ones). A task is one tile's keys, or with `chunks` > 1 one chunk of them (a call of few tiles,
   as one row's decode: all threads then share each tile's keys), left as a partial m, l, o for V(merge). */
TARGET static void V(attend)(void* user, size_t part) {
  Work* t = user;
  const int D = t->D, L = t->L;
  float* buffer = scratch(0, (size_t)L * ((size_t)t->keys + 2 * (size_t)D));
  if (!buffer) {
    __atomic_store_n(&t->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  float *qt = buffer, *o = buffer + (size_t)D * L, *scores = o + (size_t)D * L;
  int lim[2 * LANES], query[2 * LANES];
  float m[2 * LANES], l[2 * LANES];
  const int decode = t->phase == 2 && t->S == 1; /* a decode step's own tiles: attention_decode.h, no qt */
  const int heads_a_pass = decode ? decode_heads(t->G) : 0;
  for (size_t task = part; task < t->tasks; task += (size_t)t->parts) {
    size_t unit = task / (size_t)t->chunks;
    int chunk = (int)(task % (size_t)t->chunks);
    Keys keys;
    tile_lanes(t, unit, query, lim, &keys);
    if (!decode) tile_queries(t, query, qt);
    int n = keys.ke - keys.kb;
    int kb = keys.kb + (int)((int64_t)n * chunk / t->chunks), ke = keys.kb + (int)((int64_t)n * (chunk + 1) / t->chunks);
    float* dst = t->chunks == 1 ? o : t->partials + task * (size_t)(D + 2) * L + 2 * L; /* partial: m, l, o */
    /* L / VW: 1 or 2 (AVX-512), 1, 2 or 4 (AVX2), 2, 4 or 8 (SSE); what this target cannot have is not compiled */
    if (decode && heads_a_pass == 1)
      V(decode_1)(t, &keys, query, kb, ke, scores, m, l, dst);
    else if (decode && heads_a_pass == 3)
      V(decode_3)(t, &keys, query, kb, ke, scores, m, l, dst);
    else if (decode)
      V(decode_4)(t, &keys, query, kb, ke, scores, m, l, dst);
    else if (L == VW && VW >= 8)
      V(tile_keys)(t, &keys, qt, lim, kb, ke, scores, m, l, dst, 1);
    else if (L == 2 * VW)
      V(tile_keys)(t, &keys, qt, lim, kb, ke, scores, m, l, dst, 2);
    else if (L == 4 * VW && VW <= 8)
      V(tile_keys)(t, &keys, qt, lim, kb, ke, scores, m, l, dst, 4);
    else if (L == 8 * VW && VW <= 4)
      V(tile_keys)(t, &keys, qt, lim, kb, ke, scores, m, l, dst, 8);
    if (t->chunks == 1) {
      tile_finish(t, query, m, l, o);
      continue;
    }
    memcpy(dst - 2 * L, m, sizeof(float) * (size_t)L);
    memcpy(dst - L, l, sizeof(float) * (size_t)L);
  }
}

/* The chunks' partials of each tile into its output: o = sum of exp(m_c - M) o_c over sum of exp(m_c - M) l_c. */
TARGET static void V(merge)(Work* t) {
  const int D = t->D, C = t->chunks, L = t->L;
  const size_t stride = (size_t)(D + 2) * L; /* one partial */
  float* o = scratch(0, (size_t)D * L);
  if (!o) {
    t->failed = 1;
    return;
  }
  float m[2 * LANES], l[2 * LANES];
  int query[2 * LANES], lim[2 * LANES];
  for (size_t unit = 0; unit < t->tasks / (size_t)C; unit++) {
    const float* first = t->partials + unit * C * stride;
    for (int n = 0; n < L / VW; n++) {
      V(vf) M = V(load)(first + n * VW);
      for (int c = 1; c < C; c++) {
        V(vf) mc = V(load)(first + c * stride + n * VW);
        M = V(pick)(mc > M, mc, M);
      }
      V(vf) sum = {0};
      for (int d = 0; d < D; d++) V(store)(o + (size_t)d * L + n * VW, (V(vf)){0});
      for (int c = 0; c < C; c++) {
        const float* partial = first + c * stride;
        V(vf) w = V(vexp)(V(load)(partial + n * VW) - M); /* a chunk without keys for a lane: its l and o are 0 */
        sum += w * V(load)(partial + L + n * VW);
        for (int d = 0; d < D; d++) {
          float* at = o + (size_t)d * L + n * VW;
          V(store)(at, V(load)(at) + w * V(load)(partial + 2 * L + (size_t)d * L + n * VW));
        }
      }
      V(store)(m + n * VW, M);
      V(store)(l + n * VW, sum);
    }
    Keys keys;
    tile_lanes(t, unit, query, lim, &keys);
    tile_finish(t, query, m, l, o);
  }
}

#undef V_ACC
#undef TILE_PIN
#undef PV_KEYS
