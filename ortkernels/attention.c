/* CausalAttention: an onnxruntime custom op (CPU, float) with GroupQueryAttention's contract as the exporter writes it
   (export/ops.py: packed q/k/v, rotary inside in the half-split layout, one cache buffer shared as past and present),
   computing only the causal half of a prompt's scores.

   Inputs: qkv (B, S, (H + 2 H_kv) D); past_key, past_value (B, H_kv, T, D), the cache (bound as present_* too, so it
   is written in place; a distinct present buffer gets past copied first); seqlens_k (B,) int32, each row's length
   after this step minus one; total_sequence_length () int32; cos_cache, sin_cache (T_c, D/2), optional (no rotary
   without them). Attributes num_heads H, kv_num_heads H_kv. Outputs: (B, S, H D), present_key, present_value.
   Positions as GroupQueryAttention derives them: a first prompt (S == total_sequence_length) sits at 0..S-1 of every
   row, otherwise row b's S new tokens end at seqlens_k[b]; the token at position p attends to keys 0..min(p,
   seqlens_k[b]).

   Beyond GroupQueryAttention, three optional int32 (B,) inputs address a cache of N rows (N >= B; the whole cache
   bound at once): cache_rows[b], the cache row of batch row b (absent: b, and N == B); prefix_rows[b] and
   prefix_lens[b], a shared prefix: row b's keys and values at positions below prefix_lens[b] (at most its positions
   before this step) are read from cache row prefix_rows[b], not from its own (a prompt's system prompt held once for
   every sequence that begins with it). An empty one counts as not given (the exported graph's default). A decode
   step (S == 1) reads a shared prefix once for all the rows sharing it (their queries are the lanes of one tile,
   below) and merges that part's softmax with each row's own; prompts read key by key from whichever row holds it,
   in one pass (the same sums as from a copy).

   Why: onnxruntime 1.31's CPU GroupQueryAttention computes a prompt's whole square of scores, the masked half too, and
   a continuation's (new tokens after a cached prefix) with small matrix products: 17.9 ms of a 128-token prefill of
   SmolLM2-135M, 26-28 ms of a 32-token continuation of 1,000 cached positions (docs/BENCHMARKS.md).

   How: per (row, kv head, tile), L of the (new token, query head) pairs of that kv head's G = H / H_kv query heads
   are the lanes: 32 for a prompt (each key read once for twice the queries), 16 for decode (8 on targets of 8 floats
   or fewer); keys one at a time broadcast each of their D numbers against those lanes, so neither keys nor values are
   transposed and every product is a vector FMA: scores (keys x lanes), their softmax lane by lane, then the values
   the same way. A decode step's own tiles (one token: G lanes of 16 would hold a query) run along the head
   dimension instead, 4 keys x 4 heads of dot products at a time and the values once for 4 heads (attention_decode.h);
   on two Zen 4 cores that halved a decode step's attention (`loadtests.attention --against`). A call of few tiles
   (one row's decode) splits each tile's keys into chunks for the threads and merges their partial softmaxes. A
   decode step with shared prefixes runs in two phases: first tiles whose lanes are the G heads of R rows sharing one
   prefix row, over that prefix (each lane's query to its own prefix length), left as partial softmaxes per query;
   then each row's tiles over its own keys, merged with them.
   Decode reads the cache at the memory's speed, like onnxruntime's. One source, written with GCC vector types,
   compiled for AVX-512, AVX2 and plain x86-64 (or the target's own vectors elsewhere) and picked once per process
   (GPT_ONNX_SERVE_ATTENTION_KERNEL overrides). */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ort_api.h"

#define INLINE static inline __attribute__((always_inline))
#define LANES 16 /* lanes of a tile's vector in memory: 16 floats, whatever the target's own width */

/* Each thread's scratch, grown as needed and kept (freed when the thread ends): a call's buffers are 1-300 KB, and
   malloc returning them to the system every call costs page faults on the next (a one-row decode step 6% slower). */
static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;
typedef struct {
  size_t floats;
  float* data;
} Scratch;

static void scratch_free(void* p) {
  Scratch* s = p;
  free(s->data);
  free(s);
}
static int g_scratch_ok;
static void scratch_key(void) { g_scratch_ok = pthread_key_create(&g_scratch_key, scratch_free) == 0; }

/* This thread's scratch `slot` (0: the tiles', 1: the call's queries) of at least n floats, or NULL. */
static float* scratch(int slot, size_t n) {
  pthread_once(&g_scratch_once, scratch_key);
  if (!g_scratch_ok) return NULL; /* no thread-specific key left in this process */
  Scratch* s = pthread_getspecific(g_scratch_key);
  if (!s) {
    if (!(s = calloc(2, sizeof(Scratch)))) return NULL;
    if (pthread_setspecific(g_scratch_key, s)) {
      free(s);
      return NULL;
    }
  }
  if (s[slot].floats < n) {
    free(s[slot].data);
    s[slot].floats = 0;
    if (!(s[slot].data = malloc(sizeof(float) * n))) return NULL;
    s[slot].floats = n;
  }
  return s[slot].data;
}

typedef struct { /* one call, shared by the threads */
  const float* qkv;
  float *k, *v, *out; /* the caches (N, H_kv, T, D) and the output (B, S, H D) */
  const float *cos, *sin;
  const int32_t *seqlens, *rows, *prefix_rows, *prefix_lens; /* (B,) each; rows, prefix_*: NULL when not given */
  float* q;      /* (B, H, S, D): rotated queries, times 1/sqrt(D) */
  int* past;     /* (B,) positions before this step's first new token */
  int B, S, H, Hkv, D, T, G;
  /* the phase running: 1, the shared prefixes' tiles of a decode step; 2, each row's own tiles */
  int phase, L, R, tiles, chunks, parts, keys; /* L lanes a tile (phase 1: the G heads of R = L / G rows);
                                                  keys: the most any tile reads */
  size_t tasks;    /* units x chunks; a unit is phase 2's (row, kv head, tile) or phase 1's (group, kv head) */
  float* partials; /* with chunks > 1: (tasks, 2 + D, L) each chunk's m, l, o */
  int* shared_b;   /* phase 1: the rows with a shared prefix, grouped by their prefix row */
  int* group_at;   /* phase 1: (groups + 1,) where each group of at most R such rows begins in shared_b */
  int groups;
  float* shared;   /* phase 1's partials per query (B, H, D + 2): m, l, o; read by phase 2 */
  int failed;      /* a thread's scratch could not be had */
} Work;

INLINE int cache_row(const Work* t, int b) { return t->rows ? t->rows[b] : b; }
INLINE int prefix_len(const Work* t, int b) { return t->prefix_lens ? t->prefix_lens[b] : 0; }

/* The query heads a decode tile takes a pass (attention_decode.h's instances): 1 where G is 1, else 3 where that
   leaves fewer empty heads than 4 (G = 2, 3, 5, 6, 9: SmolLM2's 3), else 4 (G = 4, 7, 8, 16). */
static int decode_heads(int G) {
  if (G == 1) return 1;
  return (G + 2) / 3 * 3 - G < (G + 3) / 4 * 4 - G ? 3 : 4;
}

/* Rotates (half-split) x's D numbers for position pos into dst, times scale. */
INLINE void rotate(const float* x, const float* cos, const float* sin, int D, float scale, float* dst) {
  int h = D / 2;
  if (!cos) {
    for (int d = 0; d < D; d++) dst[d] = x[d] * scale;
    return;
  }
  for (int d = 0; d < h; d++) {
    float x1 = x[d], x2 = x[d + h], c = cos[d], s = sin[d];
    dst[d] = (x1 * c - x2 * s) * scale;
    dst[d + h] = (x2 * c + x1 * s) * scale;
  }
}

/* Part p of the new tokens: queries rotated into t->q, keys rotated and values copied into the cache. */
static void prepare_part(void* user, size_t part) {
  Work* t = user;
  int D = t->D, W = (t->H + 2 * t->Hkv) * D, n = t->B * t->S;
  int lo = (int)((int64_t)n * part / t->parts), hi = (int)((int64_t)n * (part + 1) / t->parts);
  float scale = 1.f / sqrtf((float)D);
  for (int token = lo; token < hi; token++) {
    int b = token / t->S, i = token % t->S, pos = t->past[b] + i;
    const float* x = t->qkv + (size_t)token * W;
    const float* cos = t->cos ? t->cos + (size_t)pos * (D / 2) : NULL;
    const float* sin = t->sin ? t->sin + (size_t)pos * (D / 2) : NULL;
    for (int h = 0; h < t->H; h++) rotate(x + h * D, cos, sin, D, scale, t->q + (((size_t)b * t->H + h) * t->S + i) * D);
    if (pos >= t->T) continue; /* padding past the cache's end: never attended, not written */
    for (int h = 0; h < t->Hkv; h++) {
      size_t at = (((size_t)cache_row(t, b) * t->Hkv + h) * t->T + pos) * D;
      rotate(x + (t->H + h) * D, cos, sin, D, 1.f, t->k + at);
      memcpy(t->v + at, x + (t->H + t->Hkv + h) * D, sizeof(float) * D);
    }
  }
}

/* Where a tile's keys and values are: positions [0, split) from the prefix row, [split, ...) from the own row
   (split 0: all from the own row), each row's (H_kv, T, D) block at kv head h. */
typedef struct {
  const float *K, *X, *KP, *XP; /* own and prefix rows' keys and values at position 0 of kv head h */
  int split, kb, ke;            /* keys [kb, ke) the tile reads */
} Keys;

/* Unit u of the running phase: its lanes (phase 1: lane g R + r is query head h G + g of the group's r-th row;
   phase 2: lane l is pair tile L + l of row b's (new token, query head) pairs, token-major), each lane's query as an
   index (b H + head) S + i into q (-1: no query) and its last key into lim, and where the tile's keys are. */
static void tile_lanes(const Work* t, size_t u, int* query, int* lim, Keys* keys) {
  const int G = t->G, R = t->R, L = t->L, D = t->D;
  const size_t head_floats = (size_t)t->T * D;
  int h, nk = 1;
  if (t->phase == 1) { /* G heads of up to R rows sharing one prefix row, over that prefix */
    int group = (int)(u / (size_t)t->Hkv), first = t->group_at[group], n = t->group_at[group + 1] - first;
    h = (int)(u % (size_t)t->Hkv);
    for (int lane = 0; lane < L; lane++) {
      int g = lane / R, r = lane % R;
      query[lane] = -1;
      lim[lane] = -1; /* lanes without a query read no key */
      if (g >= G || r >= n) continue;
      int b = t->shared_b[first + r];
      query[lane] = b * t->H + h * G + g; /* S == 1 */
      lim[lane] = prefix_len(t, b) - 1;
      if (lim[lane] + 1 > nk) nk = lim[lane] + 1;
    }
    int row = t->prefix_rows[t->shared_b[first]];
    keys->K = keys->KP = t->k + ((size_t)row * t->Hkv + h) * head_floats;
    keys->X = keys->XP = t->v + ((size_t)row * t->Hkv + h) * head_floats;
    keys->split = 0;
    keys->kb = 0;
    keys->ke = nk;
    return;
  }
  /* the (new token, query head) pairs of row b and kv head h, token-major, L a tile: every lane used but the last
     tile's (32 tokens of 3 heads: 3 full tiles of 32 lanes, not 4 tiles of 10 tokens) */
  int tiles = t->tiles, tile = (int)(u % (size_t)tiles), bh = (int)(u / (size_t)tiles);
  int b = bh / t->Hkv, last = t->seqlens[b];
  h = bh % t->Hkv;
  for (int lane = 0; lane < L; lane++) {
    int pair = tile * L + lane, i = pair / G, g = pair % G;
    query[lane] = -1;
    lim[lane] = 0; /* lanes without a query attend to key 0 alone, and are not written */
    if (i >= t->S) continue;
    int p = t->past[b] + i;
    query[lane] = (b * t->H + h * G + g) * t->S + i;
    lim[lane] = p < last ? p : last;
    if (lim[lane] + 1 > nk) nk = lim[lane] + 1;
  }
  int own = cache_row(t, b), pl = prefix_len(t, b), prow = pl ? t->prefix_rows[b] : own;
  keys->K = t->k + ((size_t)own * t->Hkv + h) * head_floats;
  keys->X = t->v + ((size_t)own * t->Hkv + h) * head_floats;
  keys->KP = t->k + ((size_t)prow * t->Hkv + h) * head_floats;
  keys->XP = t->v + ((size_t)prow * t->Hkv + h) * head_floats;
  /* a decode step's shared prefix is phase 1's; a prompt reads it here, key by key */
  keys->split = t->S == 1 ? 0 : pl;
  keys->kb = t->S == 1 ? pl : 0;
  keys->ke = nk;
}

/* The lanes' queries into qt (D, L), zeros where a lane has none. */
static void tile_queries(const Work* t, const int* query, float* qt) {
  const int D = t->D, L = t->L;
  memset(qt, 0, sizeof(float) * (size_t)D * L);
  for (int lane = 0; lane < L; lane++) {
    if (query[lane] < 0) continue;
    const float* q = t->q + (size_t)query[lane] * D;
    for (int d = 0; d < D; d++) qt[(size_t)d * L + lane] = q[d];
  }
}

/* A tile's m, l (L,) and o (D, L), unnormalized, for its lanes' queries: phase 1 keeps them per query for phase 2;
   phase 2 writes o / l to the output, merged first with the query's phase-1 part where it has one. */
static void tile_finish(const Work* t, const int* query, const float* m, const float* l, const float* o) {
  const int D = t->D, L = t->L, H = t->H, S = t->S;
  for (int lane = 0; lane < L; lane++) {
    int q = query[lane];
    if (q < 0) continue;
    if (t->phase == 1) {
      float* dst = t->shared + (size_t)q * (D + 2); /* S == 1: q = b H + head */
      dst[0] = m[lane];
      dst[1] = l[lane];
      for (int d = 0; d < D; d++) dst[2 + d] = o[(size_t)d * L + lane];
      continue;
    }
    int b = q / (H * S), head = (q / S) % H, i = q % S;
    float* dst = t->out + (((size_t)b * S + i) * H + head) * D;
    if (S == 1 && prefix_len(t, b) > 0) { /* o / l merged with the shared prefix's part */
      const float* p = t->shared + (size_t)q * (D + 2);
      float M = p[0] > m[lane] ? p[0] : m[lane], a = expf(m[lane] - M), c = expf(p[0] - M);
      float w = 1.f / (a * l[lane] + c * p[1]);
      for (int d = 0; d < D; d++) dst[d] = (a * o[(size_t)d * L + lane] + c * p[2 + d]) * w;
      continue;
    }
    float w = 1.f / l[lane];
    for (int d = 0; d < D; d++) dst[d] = o[(size_t)d * L + lane] * w;
  }
}

/* The tiles' code for each target, at its native vector width (ortkernels/attention_tiles.h, ortkernels/vec.h). */
#define TEMPLATE "attention_tiles.h"
#include "targets.h"
#undef TEMPLATE

/* The code this CPU runs: GPT_ONNX_SERVE_ATTENTION_KERNEL=avx512|avx2|generic overrides (tests run each). */
static int g_vw; /* the code path's native vector: floats */
static ParallelFn g_attend;
static void (*g_merge)(Work*);
static const char* g_attend_name;
static pthread_once_t g_chosen = PTHREAD_ONCE_INIT;

static int g_chunk_tasks; /* how many tasks few tiles' keys are split into: two a core, 4 to 32 */

static void choose(void) {
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  g_chunk_tasks = cores < 2 ? 4 : cores > 16 ? 32 : 2 * (int)cores;
  const char* want = getenv("GPT_ONNX_SERVE_ATTENTION_KERNEL");
  g_attend = attend_generic;
  g_merge = merge_generic;
  g_vw = 4;
  g_attend_name = "generic";
#if defined(__x86_64__)
  __builtin_cpu_init();
  int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!(want && strcmp(want, "generic") == 0)) {
    if (avx512 && !(want && strcmp(want, "avx2") == 0)) {
      g_attend = attend_avx512;
      g_merge = merge_avx512;
      g_vw = 16;
      g_attend_name = "avx512";
    } else if (avx2) {
      g_attend = attend_avx2;
      g_merge = merge_avx2;
      g_vw = 8;
      g_attend_name = "avx2";
    }
  }
#endif
}

const char* attention_kernel(void) {
  pthread_once(&g_chosen, choose);
  return g_attend_name;
}

/* The running phase's `units` tiles on the session's threads; `work`, about the keys all of them read. Few tiles (one
   row's decode: one per kv head) split their keys into chunks of at least 32, about two tasks a core in all, so that
   every thread has a share (partials merged after; on two cores, one row's decode over 160 cached positions took
   13-17 us a call in 4 tasks against 16-21 us in 16); a tiny call runs on this thread, where handing it out costs
   more. */
static OrtStatus* attend_phase(const OrtApi* api, void* context, Work* t, size_t units, int64_t work) {
  t->chunks = 1;
  if (units < 8 && t->keys >= 64) {
    t->chunks = (int)((g_chunk_tasks + units - 1) / units);
    if (t->chunks > t->keys / 32) t->chunks = t->keys / 32;
  }
  t->tasks = units * (size_t)t->chunks;
  t->parts = work < 256 ? 1 : (int)(t->tasks < 64 ? t->tasks : 64);
  t->partials = NULL;
  if (t->chunks > 1) {
    t->partials = malloc(sizeof(float) * t->tasks * (size_t)(t->D + 2) * t->L);
    if (!t->partials) return ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
  }
  OrtStatus* s = ort_parallel(api, context, g_attend, (size_t)t->parts, t);
  if (!s && !t->failed && t->chunks > 1) g_merge(t);
  free(t->partials);
  t->partials = NULL;
  return s;
}

/* ---- the onnxruntime side ------------------------------------------------------------------------------------ */

typedef struct {
  const OrtApi* api;
  int64_t H, Hkv;
} Kernel;

enum { NINPUTS = 10 }; /* qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                          cache_rows, prefix_rows, prefix_lens */

static const char* op_name(const CustomOp* op) { (void)op; return "CausalAttention"; }
static int op_input_type(const CustomOp* op, size_t i) { (void)op; return i == 3 || i == 4 || i >= 7 ? TYPE_INT32 : TYPE_FLOAT; }
static size_t op_inputs(const CustomOp* op) { (void)op; return NINPUTS; }
static int op_output_type(const CustomOp* op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t op_outputs(const CustomOp* op) { (void)op; return 3; }
static int op_input_kind(const CustomOp* op, size_t i) { (void)op; return i >= 5 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED; }
static void kernel_destroy(void* kernel) { free(kernel); }

static OrtStatus* kernel_create(const CustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op;
  OrtStatus* (*get_int)(const void*, const char*, int64_t*) = API(api, KernelInfoGetAttribute_int64);
  Kernel* k = calloc(1, sizeof(Kernel));
  if (!k) return ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
  k->api = api;
  OrtStatus* s;
  if ((s = get_int(info, "num_heads", &k->H)) || (s = get_int(info, "kv_num_heads", &k->Hkv))) {
    free(k);
    return s;
  }
  if (k->H <= 0 || k->Hkv <= 0 || k->H % k->Hkv || k->H / k->Hkv > LANES || k->H > 4096) {
    free(k);
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: num_heads must be 1 to 16 times kv_num_heads");
  }
  *out = k;
  return NULL;
}

static OrtStatus* kernel_compute(void* kernel, void* context) {
  Kernel* k = kernel;
  const OrtApi* api = k->api;
  OrtStatus* (*get_input)(const void*, size_t, const void**) = API(api, KernelContext_GetInput);
  OrtStatus* (*get_output)(void*, size_t, const int64_t*, size_t, void**) = API(api, KernelContext_GetOutput);
  const void* in[NINPUTS];
  int type[NINPUTS];
  int64_t dims[NINPUTS][8];
  size_t rank[NINPUTS];
  OrtStatus* s;
  for (size_t i = 0; i < NINPUTS; i++) {
    if ((s = get_input(context, i, &in[i]))) return s;
    if (!in[i]) {
      if (i < 5) return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: an input is missing");
      continue;
    }
    if ((s = ort_shape(api, in[i], &type[i], dims[i], &rank[i]))) return s;
    if (i >= 7 && rank[i] == 1 && dims[i][0] == 0 && rank[0] == 3 && dims[0][0] != 0)
      in[i] = NULL; /* an empty cache_rows/prefix_*: not given (a graph's default for them) */
  }
  const int H = (int)k->H, Hkv = (int)k->Hkv, rotary = in[5] && in[6];
  if (!in[5] != !in[6]) return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: cos_cache and sin_cache go together");
  if (type[0] != TYPE_FLOAT || rank[0] != 3 || dims[0][2] % (H + 2 * Hkv))
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: qkv must be float (B, S, (H + 2 H_kv) D)");
  const int64_t B = dims[0][0], S = dims[0][1], D = dims[0][2] / (H + 2 * Hkv);
  if (D <= 0 || D % LANES || D > 1024)
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: the head size must be a multiple of 16, at most 1024");
  const int addressed = in[7] != NULL; /* cache_rows: the cache has N >= B rows */
  for (int c = 1; c <= 2; c++)
    if (type[c] != TYPE_FLOAT || rank[c] != 4 || (addressed ? dims[c][0] < B : dims[c][0] != B) ||
        dims[c][1] != Hkv || dims[c][3] != D || dims[c][2] != dims[1][2] || dims[c][0] != dims[1][0])
      return ort_fail(api, ORT_INVALID_ARGUMENT,
                      "CausalAttention: past_key/past_value must be float (B, H_kv, T, D), or (N >= B, ...) with cache_rows");
  const int64_t T = dims[1][2], N = dims[1][0];
  if (!in[8] != !in[9]) return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: prefix_rows and prefix_lens go together");
  for (int c = 7; c <= 9; c++)
    if (in[c] && (type[c] != TYPE_INT32 || rank[c] != 1 || dims[c][0] != B))
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: cache_rows, prefix_rows and prefix_lens are int32 (B,)");
  if (type[3] != TYPE_INT32 || rank[3] != 1 || dims[3][0] != B || type[4] != TYPE_INT32 || rank[4] > 1 ||
      (rank[4] == 1 && dims[4][0] != 1))
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: seqlens_k (B,) and total_sequence_length () are int32");
  int64_t Tc = 0;
  if (rotary) {
    for (int c = 5; c <= 6; c++)
      if (type[c] != TYPE_FLOAT || rank[c] != 2 || dims[c][1] != D / 2 || dims[c][0] != dims[5][0])
        return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: cos_cache/sin_cache must be float (T, D/2)");
    Tc = dims[5][0];
  }
  if (B > (1 << 20) || S > (1 << 20) || T > (1 << 24) || B * S > (1 << 24))
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: too large");

  int64_t out_dims[3] = {B, S, H * D};
  void *out_value, *k_value, *v_value;
  if ((s = get_output(context, 0, out_dims, 3, &out_value)) || (s = get_output(context, 1, dims[1], 4, &k_value)) ||
      (s = get_output(context, 2, dims[2], 4, &v_value)))
    return s;
  const float *past_k = ort_data(api, in[1]), *past_v = ort_data(api, in[2]);
  float *present_k = ort_data(api, k_value), *present_v = ort_data(api, v_value);
  size_t cache_floats = (size_t)N * Hkv * T * D;
  if (present_k != past_k) memcpy(present_k, past_k, sizeof(float) * cache_floats); /* not bound to past's buffer */
  if (present_v != past_v) memcpy(present_v, past_v, sizeof(float) * cache_floats);
  if (B == 0 || S == 0) return NULL;

  Work t = {.B = (int)B, .S = (int)S, .H = H, .Hkv = Hkv, .D = (int)D, .T = (int)T, .G = H / Hkv};
  t.qkv = ort_data(api, in[0]);
  t.k = present_k;
  t.v = present_v;
  t.out = ort_data(api, out_value);
  t.seqlens = ort_data(api, in[3]);
  t.rows = addressed ? ort_data(api, in[7]) : NULL;
  t.prefix_rows = in[8] ? ort_data(api, in[8]) : NULL;
  t.prefix_lens = in[8] ? ort_data(api, in[9]) : NULL;
  t.cos = rotary ? ort_data(api, in[5]) : NULL;
  t.sin = rotary ? ort_data(api, in[6]) : NULL;
  int total_len = *(const int32_t*)ort_data(api, in[4]);
  int first = S == total_len; /* a first prompt: every row from position 0 */
  /* this thread's scratch: the queries (B, H, S, D), then past (B,), the writer of each cache row (N,), the rows with
     a shared prefix (B,) and their groups (B + 1,) */
  size_t q_floats = (size_t)(B * S * H * D);
  t.q = scratch(1, q_floats + (size_t)(3 * B + N + 1));
  if (!t.q) return ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
  t.past = (int*)(t.q + q_floats);
  int* writer = t.past + B; /* batch row writing each cache row this call, or -1 */
  t.shared_b = writer + N;
  t.group_at = t.shared_b + B;
  for (int64_t r = 0; r < N; r++) writer[r] = -1;
  /* the keys phase 2's tiles read (each row's own: a decode step's shared prefix is phase 1's), at most and in all
     (about: how much work it is); the longest shared prefix */
  int64_t own_keys = 0, own_work = 0, shared_keys = 0;
  int shared_rows = 0;
  for (int b = 0; b < t.B; b++) {
    int last = t.seqlens[b], row = cache_row(&t, b);
    t.past[b] = first ? 0 : last + 1 - t.S;
    if (last < 0 || last >= T || t.past[b] < 0)
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: seqlens_k out of range for the cache");
    if (rotary && (first ? t.S : last + 1) > Tc)
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: a position beyond cos_cache/sin_cache");
    if (row < 0 || row >= N || writer[row] >= 0)
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: cache_rows must be distinct rows of the cache");
    writer[row] = b;
    int most = (first ? t.S : last + 1), pl = prefix_len(&t, b);
    if (pl < 0 || pl > t.past[b])
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: prefix_lens must lie within each row's past");
    if (pl > 0 && (t.prefix_rows[b] < 0 || t.prefix_rows[b] >= N))
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: prefix_rows must be rows of the cache");
    if (pl > 0 && t.S == 1) {
      t.shared_b[shared_rows++] = b;
      if (pl > shared_keys) shared_keys = pl;
    }
    int own = most - (t.S == 1 ? pl : 0);
    if (own > own_keys) own_keys = own;
    own_work += own;
  }
  for (int b = 0; b < t.B; b++) { /* a prefix read from a row this call writes: only positions written before it */
    int pl = prefix_len(&t, b), w = pl > 0 ? writer[t.prefix_rows[b]] : -1;
    if (w >= 0 && pl > t.past[w])
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: a prefix beyond its row's past");
  }
  int n = t.B * t.S;
  t.parts = n < 8 ? 1 : (n < 64 ? n : 64);
  if ((s = ort_parallel(api, context, prepare_part, (size_t)t.parts, &t))) return s;

  if (shared_rows) { /* phase 1: the decode rows sharing a prefix row, R of them a tile, over that prefix */
    t.shared = malloc(sizeof(float) * (size_t)B * H * (D + 2));
    if (!t.shared) return ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
    for (int i = 1; i < shared_rows; i++) /* grouped by prefix row (insertion sort: B is a batch) */
      for (int j = i; j > 0 && t.prefix_rows[t.shared_b[j - 1]] > t.prefix_rows[t.shared_b[j]]; j--) {
        int x = t.shared_b[j];
        t.shared_b[j] = t.shared_b[j - 1];
        t.shared_b[j - 1] = x;
      }
    int most = 1; /* the most rows sharing one prefix row */
    for (int i = 0, run = 0; i < shared_rows; i++) {
      run = i && t.prefix_rows[t.shared_b[i]] == t.prefix_rows[t.shared_b[i - 1]] ? run + 1 : 1;
      if (run > most) most = run;
    }
    t.L = most * t.G > LANES ? 2 * LANES : LANES;
    t.R = t.L / t.G;
    t.groups = 0;
    for (int i = 0; i < shared_rows; i++) /* a new group at each new prefix row, and after R rows */
      if (!i || t.prefix_rows[t.shared_b[i]] != t.prefix_rows[t.shared_b[i - 1]] ||
          i - t.group_at[t.groups - 1] == t.R)
        t.group_at[t.groups++] = i;
    t.group_at[t.groups] = shared_rows;
    t.phase = 1;
    t.keys = (int)shared_keys;
    s = attend_phase(api, context, &t, (size_t)t.groups * Hkv, shared_keys * Hkv * t.groups);
    if (s || t.failed) {
      free(t.shared);
      return s ? s : ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
    }
  }
  /* phase 2: each row's tiles. 32 lanes where 16 would not hold a tile's rows (prompts), else 16 (decode; 8 on a
     target of 8 floats or fewer) */
  t.phase = 2;
  t.L = (int)S > LANES / t.G ? 2 * LANES : LANES;
  if (S == 1 && t.G <= 8 && g_vw <= 8) t.L = 8;
  t.tiles = (t.S * t.G + t.L - 1) / t.L;
  t.keys = (int)own_keys;
  s = attend_phase(api, context, &t, (size_t)t.B * Hkv * t.tiles, own_work * Hkv * t.tiles);
  free(t.shared);
  if (s) return s;
  return t.failed ? ort_fail(api, ORT_FAIL, "CausalAttention: out of memory") : NULL;
}

static const CustomOp g_op = { /* read by onnxruntime for as long as its sessions live: never written */
    ORT_OP_COMMON,
    .GetName = op_name,
    .GetInputType = op_input_type,
    .GetInputTypeCount = op_inputs,
    .GetOutputType = op_output_type,
    .GetOutputTypeCount = op_outputs,
    .GetInputCharacteristic = op_input_kind,
};

const CustomOp* attention_op(void) {
  attention_kernel(); /* chosen before any session can run it */
  return &g_op;
}
