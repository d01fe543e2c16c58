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

   Why: onnxruntime 1.31's CPU GroupQueryAttention computes a prompt's whole square of scores, the masked half too, and
   a continuation's (new tokens after a cached prefix) with small matrix products: 17.9 ms of a 128-token prefill of
   SmolLM2-135M, 26-28 ms of a 32-token continuation of 1,000 cached positions (docs/BENCHMARKS.md).

   How: per (row, kv head, tile of R new tokens), the G = H / H_kv query heads of R tokens are L lanes: 32 for a
   prompt (each key read once for twice the queries), 16 for decode (8 on targets of 8 floats or fewer), G R <= L;
   keys one at a time broadcast each of their D numbers against those lanes, so neither keys nor values are
   transposed and every product is a vector FMA: scores (keys x lanes), their softmax lane by lane, then the values
   the same way. A call of few tiles (one row's decode) splits each tile's keys into chunks for the threads and
   merges their partial softmaxes.
   Decode reads the cache at the memory's speed, like onnxruntime's. One source, written with GCC vector types,
   compiled for AVX-512, AVX2 and plain x86-64 (or the target's own vectors elsewhere) and picked once per process
   (GPT_ONNX_SERVE_ATTENTION_KERNEL overrides). */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
  float *k, *v, *out; /* the caches (B, H_kv, T, D) and the output (B, S, H D) */
  const float *cos, *sin;
  const int32_t* seqlens;
  float* q;      /* (B, H, S, D): rotated queries, times 1/sqrt(D) */
  int* past;     /* (B,) positions before this step's first new token */
  int B, S, H, Hkv, D, T, G, L, R, tiles, chunks, parts, keys; /* L lanes a tile, R = L / G rows;
                                                                keys: the most any tile reads */
  size_t tasks;  /* tiles x chunks */
  float* partials; /* with chunks > 1: (tasks, 2 + D, L) each chunk's m, l, o */
  int failed;    /* a thread's scratch could not be had */
} Work;

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
      size_t at = (((size_t)b * t->Hkv + h) * t->T + pos) * D;
      rotate(x + (t->H + h) * D, cos, sin, D, 1.f, t->k + at);
      memcpy(t->v + at, x + (t->H + t->Hkv + h) * D, sizeof(float) * D);
    }
  }
}

/* A tile's queries: its L lanes, lane (g, r) = g R + r for query head h G + g of row i0 + r, into qt (D, L),
   each lane's last key into lim; -> the keys the tile reads (its largest limit + 1). */
static int tile_queries(const Work* t, int b, int h, int i0, float* qt, int* lim) {
  const int D = t->D, G = t->G, R = t->R, L = t->L, rows = t->S - i0 < R ? t->S - i0 : R;
  int nk = 1;
  memset(qt, 0, sizeof(float) * (size_t)D * L);
  for (int lane = 0; lane < L; lane++) {
    int g = lane / R, r = lane % R;
    lim[lane] = 0; /* lanes without a query attend to key 0 alone, and are not written */
    if (g >= G || r >= rows) continue;
    int p = t->past[b] + i0 + r, last = t->seqlens[b];
    lim[lane] = p < last ? p : last;
    if (lim[lane] + 1 > nk) nk = lim[lane] + 1;
    const float* q = t->q + (((size_t)b * t->H + h * G + g) * t->S + i0 + r) * D;
    for (int d = 0; d < D; d++) qt[(size_t)d * L + lane] = q[d];
  }
  return nk;
}

/* o (D, L) / l into the output: lane (g, r) is row i0 + r's head h G + g. */
static void tile_write(const Work* t, int b, int h, int i0, const float* o, const float* l) {
  const int D = t->D, G = t->G, R = t->R, L = t->L, rows = t->S - i0 < R ? t->S - i0 : R;
  float w[2 * LANES];
  for (int lane = 0; lane < L; lane++) w[lane] = 1.f / l[lane];
  for (int g = 0; g < G; g++)
    for (int r = 0; r < rows; r++) {
      float* dst = t->out + (((size_t)b * t->S + i0 + r) * t->H + h * G + g) * D;
      for (int d = 0; d < D; d++) dst[d] = o[(size_t)d * L + g * R + r] * w[g * R + r];
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

static void choose(void) {
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

/* ---- the onnxruntime side ------------------------------------------------------------------------------------ */

typedef struct {
  const OrtApi* api;
  int64_t H, Hkv;
} Kernel;

static const char* op_name(const CustomOp* op) { (void)op; return "CausalAttention"; }
static int op_input_type(const CustomOp* op, size_t i) { (void)op; return i == 3 || i == 4 ? TYPE_INT32 : TYPE_FLOAT; }
static size_t op_inputs(const CustomOp* op) { (void)op; return 7; }
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
  const void* in[7];
  int type[7];
  int64_t dims[7][8];
  size_t rank[7];
  OrtStatus* s;
  for (size_t i = 0; i < 7; i++) {
    if ((s = get_input(context, i, &in[i]))) return s;
    if (!in[i]) {
      if (i < 5) return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: an input is missing");
      continue;
    }
    if ((s = ort_shape(api, in[i], &type[i], dims[i], &rank[i]))) return s;
  }
  const int H = (int)k->H, Hkv = (int)k->Hkv, rotary = in[5] && in[6];
  if (!in[5] != !in[6]) return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: cos_cache and sin_cache go together");
  if (type[0] != TYPE_FLOAT || rank[0] != 3 || dims[0][2] % (H + 2 * Hkv))
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: qkv must be float (B, S, (H + 2 H_kv) D)");
  const int64_t B = dims[0][0], S = dims[0][1], D = dims[0][2] / (H + 2 * Hkv);
  if (D <= 0 || D % LANES || D > 1024)
    return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: the head size must be a multiple of 16, at most 1024");
  for (int c = 1; c <= 2; c++)
    if (type[c] != TYPE_FLOAT || rank[c] != 4 || dims[c][0] != B || dims[c][1] != Hkv || dims[c][3] != D ||
        dims[c][2] != dims[1][2])
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: past_key/past_value must be float (B, H_kv, T, D)");
  const int64_t T = dims[1][2];
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
  size_t cache_floats = (size_t)B * Hkv * T * D;
  if (present_k != past_k) memcpy(present_k, past_k, sizeof(float) * cache_floats); /* not bound to past's buffer */
  if (present_v != past_v) memcpy(present_v, past_v, sizeof(float) * cache_floats);
  if (B == 0 || S == 0) return NULL;

  Work t = {.B = (int)B, .S = (int)S, .H = H, .Hkv = Hkv, .D = (int)D, .T = (int)T, .G = H / Hkv};
  /* 32 lanes where 16 would not hold a tile's rows (prompts), else 16 (decode; 8 on a target of 8 floats or fewer) */
  t.L = (int)S > LANES / t.G ? 2 * LANES : LANES;
  if (S == 1 && t.G <= 8 && g_vw <= 8) t.L = 8;
  t.R = t.L / t.G;
  t.qkv = ort_data(api, in[0]);
  t.k = present_k;
  t.v = present_v;
  t.out = ort_data(api, out_value);
  t.seqlens = ort_data(api, in[3]);
  t.cos = rotary ? ort_data(api, in[5]) : NULL;
  t.sin = rotary ? ort_data(api, in[6]) : NULL;
  int total_len = *(const int32_t*)ort_data(api, in[4]);
  int first = S == total_len; /* a first prompt: every row from position 0 */
  /* this thread's scratch: the queries (B, H, S, D), then past (B,) */
  size_t q_floats = (size_t)(B * S * H * D);
  t.q = scratch(1, q_floats + (size_t)B);
  if (!t.q) return ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
  t.past = (int*)(t.q + q_floats);
  int64_t keys = 0; /* the keys all tiles read, about: how much work this call is */
  for (int b = 0; b < t.B; b++) {
    int last = t.seqlens[b];
    t.past[b] = first ? 0 : last + 1 - t.S;
    if (last < 0 || last >= T || t.past[b] < 0)
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: seqlens_k out of range for the cache");
    if (rotary && (first ? t.S : last + 1) > Tc)
      return ort_fail(api, ORT_INVALID_ARGUMENT, "CausalAttention: a position beyond cos_cache/sin_cache");
    int most = (first ? t.S : last + 1);
    if (most > t.keys) t.keys = most;
    keys += most;
  }
  int n = t.B * t.S;
  t.parts = n < 8 ? 1 : (n < 64 ? n : 64);
  if ((s = ort_parallel(api, context, prepare_part, (size_t)t.parts, &t))) return s;
  t.tiles = (t.S + t.R - 1) / t.R;
  size_t units = (size_t)t.B * Hkv * t.tiles;
  /* Few tiles (one row's decode: one per kv head) split their keys into chunks of at least 32, so that every thread
     has a share (partials merged after); a tiny call runs on this thread, where handing it out costs more. */
  t.chunks = 1;
  if (units < 8 && t.keys >= 64) {
    t.chunks = (int)((16 + units - 1) / units);
    if (t.chunks > t.keys / 32) t.chunks = t.keys / 32;
  }
  t.tasks = units * (size_t)t.chunks;
  t.parts = keys * Hkv * t.tiles < 256 ? 1 : (int)(t.tasks < 64 ? t.tasks : 64);
  if (t.chunks > 1) {
    t.partials = malloc(sizeof(float) * t.tasks * (size_t)(D + 2) * t.L);
    if (!t.partials) return ort_fail(api, ORT_FAIL, "CausalAttention: out of memory");
  }
  s = ort_parallel(api, context, g_attend, (size_t)t.parts, &t);
  if (!s && !t.failed && t.chunks > 1) g_merge(&t);
  free(t.partials);
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
