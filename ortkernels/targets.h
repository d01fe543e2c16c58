/* Includes the template named by TEMPLATE (a header over VW, TARGET and V(name), as ortkernels/vec.h) once per code
   path, after vec.h's helpers for it: AVX-512 (16 floats a vector, names ending _avx512) and AVX2 (8, _avx2) on
   x86-64, and plain code (4, _generic: SSE there, the target's own vectors elsewhere). */
#if defined(__x86_64__)
#define VW 16
#define TARGET __attribute__((target("avx512f,fma")))
#define V(name) name##_avx512
#include "vec.h"
#include TEMPLATE
#undef VW
#undef TARGET
#undef V
#define VW 8
#define TARGET __attribute__((target("avx2,fma")))
#define V(name) name##_avx2
#include "vec.h"
#include TEMPLATE
#undef VW
#undef TARGET
#undef V
#endif
#define VW 4
#define TARGET
#define V(name) name##_generic
#include "vec.h"
#include TEMPLATE
#undef VW
#undef TARGET
#undef V
