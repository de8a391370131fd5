/* prunekit's CPU sparse kernel: y = W x + b with W in CSR (int32 row pointers, uint16 or int32 column
 * indices, float32 values).
 *
 * Why it exists: at batch 1 a sparse layer is memory-bound, and torch's CSR kernel reads 8 bytes per
 * non-zero (value + int32 index). Layers up to 65536 inputs wide need only 16-bit column indices:
 * 6 bytes per non-zero. At batch 1 two loops are offered (eight scalar sums per row, or one vectorised
 * sum per row); which is faster depends on row length and cache, so prunekit times both.
 *
 * Layout: x is (in, batch) and y is (out, batch), both row-major ("transposed" activations), so the
 * `batch` values that one non-zero multiplies are contiguous.  Rows are split among `threads` OpenMP
 * threads so that each gets about the same number of non-zeros.  Compiled with -fopenmp after torch is
 * loaded, the library binds to torch's own libgomp (same soname), so these are torch's intra-op threads,
 * not a second pool competing for the cores.  Every row is summed in the same order whatever the thread
 * count, so results do not depend on it.  Without OpenMP the pragma is ignored and the kernel runs serially.
 *
 * No bounds are checked here: the caller (prunekit/native.py) validates the CSR parts first.
 */
#include <stdint.h>
#include <string.h>

typedef struct {
  int64_t r0, r1, batch;
  const int32_t *crow;
  const void *col;
  int col_bytes, simd;
  const float *val, *x, *bias;
  float *y;
} job_t;

#define COL(k) (wide ? (int64_t)c32[k] : (int64_t)c16[k])

/* Batch 1, eight independent scalar sums per row: best where rows are short or the weights sit in cache. */
static void run_b1_scalar(const job_t *j) {
  const uint16_t *c16 = (const uint16_t *)j->col;
  const int32_t *c32 = (const int32_t *)j->col;
  const int wide = j->col_bytes == 4;
  const float *val = j->val, *x = j->x;
  for (int64_t i = j->r0; i < j->r1; ++i) {
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    int64_t k = j->crow[i];
    const int64_t e = j->crow[i + 1];
    for (; k + 8 <= e; k += 8) {
      a0 += val[k] * x[COL(k)];
      a1 += val[k + 1] * x[COL(k + 1)];
      a2 += val[k + 2] * x[COL(k + 2)];
      a3 += val[k + 3] * x[COL(k + 3)];
      a4 += val[k + 4] * x[COL(k + 4)];
      a5 += val[k + 5] * x[COL(k + 5)];
      a6 += val[k + 6] * x[COL(k + 6)];
      a7 += val[k + 7] * x[COL(k + 7)];
    }
    for (; k < e; ++k) a0 += val[k] * x[COL(k)];
    float acc = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    j->y[i] = j->bias ? acc + j->bias[i] : acc;
  }
}

/* Batch 1, each row's sum vectorised (`omp simd`: the compiler may reorder this one sum into vector lanes
 * with gathers of x, without -ffast-math for the whole file). Faster on long rows streamed from memory
 * (measured here: 90% of 4096 inputs), slower on short ones; prunekit measures both. The order is fixed
 * at compile time, so results still do not depend on the thread count. */
static void run_b1_simd(const job_t *j) {
  const uint16_t *c16 = (const uint16_t *)j->col;
  const int32_t *c32 = (const int32_t *)j->col;
  const float *val = j->val, *x = j->x;
  for (int64_t i = j->r0; i < j->r1; ++i) {
    const int64_t s = j->crow[i], e = j->crow[i + 1];
    float acc = 0.0f;
    if (j->col_bytes == 4) {
#pragma omp simd reduction(+ : acc)
      for (int64_t k = s; k < e; ++k) acc += val[k] * x[c32[k]];
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t k = s; k < e; ++k) acc += val[k] * x[c16[k]];
    }
    j->y[i] = j->bias ? acc + j->bias[i] : acc;
  }
}

#define BLOCK 8 /* batch columns accumulated at once: eight registers */

static void run_batched(const job_t *j) {
  const uint16_t *c16 = (const uint16_t *)j->col;
  const int32_t *c32 = (const int32_t *)j->col;
  const int wide = j->col_bytes == 4;
  const int64_t B = j->batch;
  for (int64_t i = j->r0; i < j->r1; ++i) {
    const int64_t s = j->crow[i], e = j->crow[i + 1];
    float *yr = j->y + i * B;
    for (int64_t b0 = 0; b0 < B; b0 += BLOCK) {
      const int64_t nb = B - b0 < BLOCK ? B - b0 : BLOCK;
      float acc[BLOCK] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = s; k < e; ++k) {
        const float v = j->val[k];
        const float *xr = j->x + COL(k) * B + b0;
        for (int64_t t = 0; t < nb; ++t) acc[t] += v * xr[t];
      }
      const float bi = j->bias ? j->bias[i] : 0.0f;
      for (int64_t t = 0; t < nb; ++t) yr[b0 + t] = acc[t] + bi;
    }
  }
}

static void run(const job_t *j) {
  if (j->batch > 1) run_batched(j);
  else if (j->simd) run_b1_simd(j);
  else run_b1_scalar(j);
}

/* first row whose non-zeros start at or after `target` */
static int64_t row_at(const int32_t *crow, int64_t rows, int64_t target) {
  int64_t lo = 0, hi = rows;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (crow[mid] < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

#define MAX_THREADS 64

/* Returns 0 on success, 1 on bad arguments. */
int prunekit_spmm(int64_t rows, int64_t batch, const int32_t *crow, const void *col, int col_bytes,
                  const float *val, const float *x, const float *bias, float *y, int threads, int simd) {
  if (rows < 0 || batch < 1 || (col_bytes != 2 && col_bytes != 4)) return 1;
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  const int64_t nnz = crow[rows];
  if (nnz < 4096 * (int64_t)threads) threads = 1; /* too little work to wake other threads */
  job_t jobs[MAX_THREADS];
  int64_t prev = 0;
  for (int t = 0; t < threads; ++t) {
    const int64_t r1 = t == threads - 1 ? rows : row_at(crow, rows, (nnz * (t + 1)) / threads);
    job_t j = {prev, r1 < prev ? prev : r1, batch, crow, col, col_bytes, simd != 0, val, x, bias, y};
    jobs[t] = j;
    prev = jobs[t].r1;
  }
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t) run(&jobs[t]);
  return 0;
}

/* 1 when compiled with OpenMP (threads > 1 really run in parallel), else 0 */
int prunekit_spmm_parallel(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
