/* The part of onnxruntime's C API the project's custom ops use, through its ABI: a function table whose slots are
   append-only (indices from onnxruntime_c_api.h; onnxruntime 1.17 or later for KernelContext_ParallelFor, checked
   against the 1.31 binary). No onnxruntime header is needed. */
#ifndef ORTKERNELS_ORT_API_H
#define ORTKERNELS_ORT_API_H

#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

#define ORT_API_VERSION_USED 17 /* onnxruntime 1.17: KernelContext_ParallelFor */
#define API(api, slot) (((void* const*)(api))[slot])
enum { /* OrtApi slots */
       CreateStatus = 0,
       CreateCustomOpDomain = 26,
       CustomOpDomain_Add = 27,
       AddCustomOpDomain = 28,
       GetTensorMutableData = 51,
       GetTensorElementType = 60,
       GetDimensionsCount = 61,
       GetDimensions = 62,
       GetTensorTypeAndShape = 65,
       KernelInfoGetAttribute_int64 = 86,
       KernelContext_GetInput = 90,
       KernelContext_GetOutput = 91,
       ReleaseStatus = 93,
       ReleaseTensorTypeAndShapeInfo = 99,
       KernelContext_ParallelFor = 274 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT32 = 6 };
enum { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };

typedef struct CustomOp { /* OrtCustomOp, fields up to ORT_API_VERSION 17 */
  uint32_t version;
  void* (*CreateKernel)(const struct CustomOp*, const OrtApi*, const void*);
  const char* (*GetName)(const struct CustomOp*);
  const char* (*GetExecutionProviderType)(const struct CustomOp*);
  int (*GetInputType)(const struct CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const struct CustomOp*);
  int (*GetOutputType)(const struct CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const struct CustomOp*);
  void (*KernelCompute)(void*, void*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const struct CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const struct CustomOp*, size_t);
  int (*GetInputMemoryType)(const struct CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const struct CustomOp*);
  int (*GetVariadicInputHomogeneity)(const struct CustomOp*);
  int (*GetVariadicOutputMinArity)(const struct CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const struct CustomOp*);
  OrtStatus* (*CreateKernelV2)(const struct CustomOp*, const OrtApi*, const void*, void**);
  OrtStatus* (*KernelComputeV2)(void*, void*);
  OrtStatus* (*InferOutputShapeFn)(const struct CustomOp*, void*);
  int (*GetStartVersion)(const struct CustomOp*);
  int (*GetEndVersion)(const struct CustomOp*);
} CustomOp;

typedef void (*ParallelFn)(void* user, size_t part);

/* What every op here answers the same way: the CPU provider, inputs in CPU memory, no variadic inputs or outputs,
   every output required. ORT_OP_COMMON fills those fields of a CustomOp, plus the version and the V2 kernel entry
   points kernel_create / kernel_compute / kernel_destroy of the op's file. */
static inline const char* ort_op_cpu(const CustomOp* op) { (void)op; return NULL; }
static inline int ort_op_cpu_memory(const CustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static inline int ort_op_one(const CustomOp* op) { (void)op; return 1; }
static inline int ort_op_required(const CustomOp* op, size_t i) { (void)op; (void)i; return INPUT_OUTPUT_REQUIRED; }
#define ORT_OP_COMMON                                                                                  \
  .version = ORT_API_VERSION_USED, .GetExecutionProviderType = ort_op_cpu, .KernelDestroy = kernel_destroy, \
  .GetOutputCharacteristic = ort_op_required, .GetInputMemoryType = ort_op_cpu_memory,                  \
  .GetVariadicInputMinArity = ort_op_one, .GetVariadicInputHomogeneity = ort_op_one,                   \
  .GetVariadicOutputMinArity = ort_op_one, .GetVariadicOutputHomogeneity = ort_op_one,                 \
  .CreateKernelV2 = kernel_create, .KernelComputeV2 = kernel_compute

static inline OrtStatus* ort_fail(const OrtApi* api, int code, const char* message) {
  return ((OrtStatus * (*)(int, const char*)) API(api, CreateStatus))(code, message);
}

/* A tensor's element type and shape (at most 8 dimensions). */
static inline OrtStatus* ort_shape(const OrtApi* api, const void* value, int* type, int64_t* dims, size_t* rank) {
  void* info;
  OrtStatus* s = ((OrtStatus * (*)(const void*, void**)) API(api, GetTensorTypeAndShape))(value, &info);
  if (s) return s;
  ((OrtStatus * (*)(const void*, int*)) API(api, GetTensorElementType))(info, type);
  ((OrtStatus * (*)(const void*, size_t*)) API(api, GetDimensionsCount))(info, rank);
  if (*rank > 8) {
    ((void (*)(void*))API(api, ReleaseTensorTypeAndShapeInfo))(info);
    return ort_fail(api, ORT_INVALID_ARGUMENT, "ortkernels: at most 8 dimensions");
  }
  ((OrtStatus * (*)(const void*, int64_t*, size_t)) API(api, GetDimensions))(info, dims, *rank);
  ((void (*)(void*))API(api, ReleaseTensorTypeAndShapeInfo))(info);
  return NULL;
}

static inline void* ort_data(const OrtApi* api, const void* value) {
  void* p = NULL;
  ((OrtStatus * (*)(void*, void**)) API(api, GetTensorMutableData))((void*)value, &p);
  return p;
}

/* Runs fn(user, part) for part in [0, parts) on the session's intra-op threads. */
static inline OrtStatus* ort_parallel(const OrtApi* api, void* context, ParallelFn fn, size_t parts, void* user) {
  if (parts <= 1) {
    if (parts == 1) fn(user, 0);
    return NULL;
  }
  return ((OrtStatus * (*)(const void*, ParallelFn, size_t, size_t, void*)) API(api, KernelContext_ParallelFor))(
      context, fn, parts, 0, user);
}

/* The ops (each in its own file) and the code paths they picked for this CPU. */
const CustomOp* q4_1_matmul_op(void);
const CustomOp* attention_op(void);
const CustomOp* swiglu_op(void);

#endif
