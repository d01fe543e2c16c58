/* The library's entry points: onnxruntime's RegisterCustomOps (both ops in the domain gpt_onnx_serve) and what
   ortkernels/__init__.py asks of the library (its version, the code path each op picked for this CPU). */
#include "ort_api.h"

const char* q4_1_matmul_kernel(void);
const char* attention_kernel(void);

#define EXPORT __attribute__((visibility("default")))

/* The library's interface version: the ops and attributes this build runs (2: MatMulQ4_1 with `gated`; 3: and
   CausalAttention and SwiGLU; 4: CausalAttention's cache_rows, prefix_rows, prefix_lens). ortkernels/__init__.py
   treats a library of another version (built before a pull) as not built. */
EXPORT int OrtKernelsVersion(void) { return 4; }
EXPORT const char* MatMulQ4_1Kernel(void) { return q4_1_matmul_kernel(); }
EXPORT const char* CausalAttentionKernel(void) { return attention_kernel(); } /* SwiGLU's too */

EXPORT OrtStatus* RegisterCustomOps(void* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ORT_API_VERSION_USED);
  if (!api) return NULL; /* an onnxruntime older than 1.17: the ops stay unknown and the graph is refused by name */
  void* domain;
  OrtStatus* s;
  if ((s = ((OrtStatus * (*)(const char*, void**)) API(api, CreateCustomOpDomain))("gpt_onnx_serve", &domain)))
    return s;
  const CustomOp* ops[] = {q4_1_matmul_op(), attention_op(), swiglu_op()};
  for (unsigned i = 0; i < sizeof ops / sizeof ops[0]; i++)
    if ((s = ((OrtStatus * (*)(void*, const void*)) API(api, CustomOpDomain_Add))(domain, ops[i]))) return s;
  /* the domain must outlive every session that uses it: kept for the life of the process */
  return ((OrtStatus * (*)(void*, void*)) API(api, AddCustomOpDomain))(options, domain);
}
