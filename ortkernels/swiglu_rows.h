/* SwiGLU's rows (ortkernels/swiglu.c), a template over the target's native vector of VW floats (ortkernels/vec.h):
   V(swiglu), one part of the rows. */
TARGET static void V(swiglu)(void* user, size_t part) {
  const Work* t = user;
  int64_t lo = t->rows * (int64_t)part / t->parts, hi = t->rows * (int64_t)(part + 1) / t->parts;
  for (int64_t r = lo; r < hi; r++) {
    const float *gate = t->x + r * 2 * t->N, *up = gate + t->N;
    float* y = t->y + r * t->N;
    int64_t j = 0;
    for (; j + VW <= t->N; j += VW) {
      V(vf) g = V(load)(gate + j);
      V(store)(y + j, g / (1.f + V(vexp)(-g)) * V(load)(up + j));
    }
    if (j < t->N) { /* the last few */
      float g[VW] = {0}, u[VW] = {0}, o[VW];
      int n = (int)(t->N - j);
      memcpy(g, gate + j, sizeof(float) * (size_t)n);
      memcpy(u, up + j, sizeof(float) * (size_t)n);
      V(vf) gv = V(load)(g);
      V(store)(o, gv / (1.f + V(vexp)(-gv)) * V(load)(u));
      memcpy(y + j, o, sizeof(float) * (size_t)n);
    }
  }
}
