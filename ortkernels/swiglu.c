/* SwiGLU: an onnxruntime custom op (CPU, float): Y (..., N) = silu(X[..., :N]) * X[..., N:] for X (..., 2N), the
   gated MLP's activation after its packed gate/up projection (export/model.py), where onnxruntime would run Split,
   QuickGelu (alpha 1: x sigmoid(x)) and Mul, three passes over the projection's output and two copies of it (4.7% of
   a 128-token fp32 prefill of SmolLM2-135M, 3.7% of a one-row decode step; docs/BENCHMARKS.md). One source in GCC's
   vector types, compiled for AVX-512, AVX2 and plain x86-64 (each at its own vector width) and picked with
   CausalAttention's code path. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_api.h"

const char* attention_kernel(void); /* the code path, chosen once: "avx512", "avx2" or "generic" */

typedef struct {
  const float* x;
  float* y;
  int64_t rows, N;
  int parts;
} Work;

/* One part of the rows, for each target at its native vector width (ortkernels/swiglu_rows.h, ortkernels/vec.h). */
#define TEMPLATE "swiglu_rows.h"
#include "targets.h"
#undef TEMPLATE

static ParallelFn swiglu_fn(void) {
  const char* path = attention_kernel();
#if defined(__x86_64__)
  if (strcmp(path, "avx512") == 0) return swiglu_avx512;
  if (strcmp(path, "avx2") == 0) return swiglu_avx2;
#endif
  return swiglu_generic;
}

/* ---- the onnxruntime side ------------------------------------------------------------------------------------ */

static const char* op_name(const CustomOp* op) { (void)op; return "SwiGLU"; }
static int op_type(const CustomOp* op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t op_one(const CustomOp* op) { (void)op; return 1; }
static void kernel_destroy(void* kernel) { (void)kernel; }

static OrtStatus* kernel_create(const CustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op;
  (void)info;
  *out = (void*)api; /* the kernel's state is the API table alone */
  return NULL;
}

static OrtStatus* kernel_compute(void* kernel, void* context) {
  const OrtApi* api = kernel;
  OrtStatus* (*get_input)(const void*, size_t, const void**) = API(api, KernelContext_GetInput);
  OrtStatus* (*get_output)(void*, size_t, const int64_t*, size_t, void**) = API(api, KernelContext_GetOutput);
  const void* x_value;
  int type;
  int64_t dims[8];
  size_t rank;
  OrtStatus* s;
  if ((s = get_input(context, 0, &x_value)) || (s = ort_shape(api, x_value, &type, dims, &rank))) return s;
  if (type != TYPE_FLOAT || rank < 1 || dims[rank - 1] % 2)
    return ort_fail(api, ORT_INVALID_ARGUMENT, "SwiGLU: X must be float with an even last dimension");
  Work t = {.N = dims[rank - 1] / 2, .rows = 1};
  for (size_t i = 0; i + 1 < rank; i++) t.rows *= dims[i];
  dims[rank - 1] = t.N;
  void* y_value;
  if ((s = get_output(context, 0, dims, rank, &y_value))) return s;
  if (t.rows == 0 || t.N == 0) return NULL;
  t.x = ort_data(api, x_value);
  t.y = ort_data(api, y_value);
  int64_t work = t.rows * t.N; /* a decode step's row (1,536 outputs) is done before a thread could wake */
  t.parts = work < 16384 ? 1 : (int)(t.rows < 64 ? t.rows : 64);
  return ort_parallel(api, context, swiglu_fn(), (size_t)t.parts, &t);
}

static const CustomOp g_op = { /* read by onnxruntime for as long as its sessions live: never written */
    ORT_OP_COMMON,
    .GetName = op_name,
    .GetInputType = op_type,
    .GetInputTypeCount = op_one,
    .GetOutputType = op_type,
    .GetOutputTypeCount = op_one,
    .GetInputCharacteristic = ort_op_required,
};

const CustomOp* swiglu_op(void) { return &g_op; }
