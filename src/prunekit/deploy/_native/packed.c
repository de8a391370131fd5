/* prunekit's packed sparse formats for batch-1 (and batch <= 8) decoding: y = W x + b.
 *
 * Why: at batch 1 every weight is read once per token, so a layer runs at the speed memory delivers its
 * bytes. CSR spends 4-6 bytes of index per kept float; these formats spend (about) one bit per weight:
 *   bitmask  one bit per weight (uint64 words per row) + the kept values packed in row order (fp32 or
 *            bf16), and an int32 offset per row into the values. Bytes/weight: 1/8 + density * value size.
 *   nm24     2:4 sparsity: every group of 4 weights keeps (at most) 2; a 4-bit pattern per group (the same
 *            bits as two 2-bit indices) + exactly 2 values per group, so each row's values sit at a fixed
 *            offset and nothing needs a running count. Bytes/weight: 1/8 + value size / 2.
 *   csr8     CSR with 8-bit column deltas: 1 byte + one value per kept weight (a gap over 255 columns
 *            stores an explicit zero). Wins only at high sparsity (fewer bytes than 1/8 per weight).
 * The kernels are vectorised with AVX-512 where the CPU has it (the library is built with -march=native):
 * a 16-bit slice of the mask expands 16 packed values into their lanes (vexpandps) and one FMA multiplies
 * them with 16 inputs, so decoding costs about what a dense FMA costs while reading far fewer bytes.
 * Without AVX-512 a portable loop computes the same sums (slower; prunekit measures before it converts).
 *
 * Determinism: every row is summed by one thread in a fixed order (lane-wise accumulators, then a fixed
 * reduction), so results do not depend on the thread count. Rows are split among OpenMP threads (torch's
 * own libgomp, see spmm.c) by bytes to read.
 *
 * Layout: x is (batch, in) row-major float32, y is (batch, out) row-major float32. Values arrays are padded
 * with 16 trailing entries by the caller (the vector loop loads 16 values and expands the ones it needs).
 * No bounds are checked here: prunekit/deploy/native.py validates every buffer first.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAXB 8          /* largest batch a kernel call takes (the caller splits bigger ones) */
#define MAX_THREADS 64

enum { FMT_BITMASK = 0, FMT_NM24 = 1, FMT_CSR8 = 2 };

typedef struct {
  int fmt, bf16;
  int64_t rows, in, batch, words;  /* words: uint64 mask words per row (bitmask, nm24) */
  int64_t ldx;                      /* floats between rows of x: in, or 64 * words when padded */
  const uint64_t *mask;             /* bitmask: rows x words; nm24: rows x ceil(in/64) words as well */
  const uint8_t *delta;             /* csr8 */
  const int32_t *rowptr;            /* bitmask, csr8: value offset of each row (rows + 1) */
  const void *val;                  /* float32 or bf16 bits (uint16) */
  const float *x, *bias;
  float *y;
} mat_t;

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float value_at(const mat_t *m, int64_t k) {
  return m->bf16 ? bf16_to_f32(((const uint16_t *)m->val)[k]) : ((const float *)m->val)[k];
}

/* ------------------------------------------------------------------------------------ portable loops */
/* The vector loop's order, written out: lane l of chunk c (16 inputs) goes to accumulator [c mod 4][l];
 * the four are added (0+1)+(2+3) and the 16 lane sums reduced pairwise. A machine without AVX-512 thus
 * sums in the same order as one with it. */
static float reduce16(float *lane) {
  for (int w = 8; w >= 1; w >>= 1)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

#ifndef __AVX512F__
static void row_mask_portable(const mat_t *m, int64_t i, int64_t k0, float out[MAXB]) {
  float acc[MAXB][4][16];
  memset(acc, 0, sizeof acc);
  const uint64_t *mw = m->mask + i * m->words;
  int64_t k = k0;
  for (int64_t c = 0; c * 16 < m->in; ++c) {
    const unsigned bits = (unsigned)((mw[c >> 2] >> (16 * (c & 3))) & 0xFFFFu);
    int64_t kk = k;
    for (int l = 0; l < 16; ++l) {
      if (!(bits >> l & 1u)) continue;
      const float v = value_at(m, kk++);
      for (int64_t b = 0; b < m->batch; ++b)
        acc[b][c & 3][l] = fmaf(v, m->x[b * m->ldx + c * 16 + l], acc[b][c & 3][l]);
    }
    /* nm24 keeps 8 value slots per 16 inputs even where a group kept fewer than 2 */
    k = m->fmt == FMT_NM24 ? k + 8 : kk;
  }
  for (int64_t b = 0; b < m->batch; ++b) {
    float lane[16];
    for (int l = 0; l < 16; ++l) lane[l] = (acc[b][0][l] + acc[b][1][l]) + (acc[b][2][l] + acc[b][3][l]);
    out[b] = reduce16(lane);
  }
}
#endif

static void row_csr8(const mat_t *m, int64_t i, float out[MAXB]) {
  float acc[MAXB][4];
  memset(acc, 0, sizeof acc);
  int64_t col = 0;
  const int64_t s = m->rowptr[i], e = m->rowptr[i + 1];
  for (int64_t k = s; k < e; ++k) {
    col += m->delta[k];
    const float v = value_at(m, k);
    for (int64_t b = 0; b < m->batch; ++b) acc[b][(k - s) & 3] += v * m->x[b * m->ldx + col];
  }
  for (int64_t b = 0; b < m->batch; ++b) out[b] = (acc[b][0] + acc[b][1]) + (acc[b][2] + acc[b][3]);
}

/* --------------------------------------------------------------------------------- AVX-512 loops */
#ifdef __AVX512F__
static inline __m512 load16(const mat_t *m, int64_t k) {
  if (m->bf16) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)m->val + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  __m512 v = _mm512_loadu_ps((const float *)m->val + k);
  __asm__("" : "+v"(v)); /* keep the load apart: expand from memory is microcoded (slow) on some CPUs */
  return v;
}

static inline __m512 load8(const mat_t *m, int64_t k) { /* nm24: 8 values fill the 8 set lanes */
  if (m->bf16) {
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)m->val + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_castsi128_si256(h)), 16));
  }
  return _mm512_castps256_ps512(_mm256_loadu_ps((const float *)m->val + k));
}

/* One 64-bit mask word (four 16-input chunks) per step, chunk j of a word into accumulator j, for a
 * batch size B fixed at compile time so that the 4*B accumulators stay in registers. Inputs are read with
 * plain loads (masked ones cost ~20% here): rows of x are `ldx` = a multiple of 64 long (the caller pads
 * narrower layers), and pruned lanes multiply x by an expanded 0, just as a dense product multiplies it
 * by a stored 0 (so an inf input gives NaN in both). Chunks past the input width have no mask bits. */
#define CHUNK(j, bits16, v)                                                                     \
  do {                                                                                          \
    for (int b = 0; b < NB; ++b)                                                                \
      acc[b][j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + b * ldx + 16 * (j)), acc[b][j]);            \
  } while (0)

#define DEFINE_ROW_MASK(B)                                                                      \
  static void row_mask_b##B(const mat_t *m, int64_t i, int64_t k, float out[MAXB]) {            \
    enum { NB = B };                                                                            \
    __m512 acc[NB][4];                                                                          \
    for (int b = 0; b < B; ++b)                                                                 \
      for (int a = 0; a < 4; ++a) acc[b][a] = _mm512_setzero_ps();                              \
    const uint64_t *mw = m->mask + i * m->words;                                                \
    const int64_t ldx = m->ldx;                                                                 \
    const int nm = m->fmt == FMT_NM24;                                                          \
    for (int64_t w = 0; w < m->words; ++w) {                                                    \
      const uint64_t word = mw[w];                                                              \
      const float *xr = m->x + 64 * w;                                                          \
      /* slices and counts in general registers: mask-register shifts and moves are slow */   \
      const unsigned g0 = (unsigned)word & 0xFFFFu, g1 = (unsigned)(word >> 16) & 0xFFFFu;      \
      const unsigned g2 = (unsigned)(word >> 32) & 0xFFFFu, g3 = (unsigned)(word >> 48);        \
      const __mmask16 m0 = _cvtu32_mask16(g0), m1 = _cvtu32_mask16(g1);                         \
      const __mmask16 m2 = _cvtu32_mask16(g2), m3 = _cvtu32_mask16(g3);                         \
      const int64_t k1 = k + (nm ? 8 : __builtin_popcount(g0));                                \
      const int64_t k2 = k1 + (nm ? 8 : __builtin_popcount(g1));                               \
      const int64_t k3 = k2 + (nm ? 8 : __builtin_popcount(g2));                               \
      const __m512 v0 = _mm512_maskz_expand_ps(m0, nm ? load8(m, k) : load16(m, k));           \
      const __m512 v1 = _mm512_maskz_expand_ps(m1, nm ? load8(m, k1) : load16(m, k1));         \
      const __m512 v2 = _mm512_maskz_expand_ps(m2, nm ? load8(m, k2) : load16(m, k2));         \
      const __m512 v3 = _mm512_maskz_expand_ps(m3, nm ? load8(m, k3) : load16(m, k3));         \
      CHUNK(0, m0, v0);                                                                         \
      CHUNK(1, m1, v1);                                                                         \
      CHUNK(2, m2, v2);                                                                         \
      CHUNK(3, m3, v3);                                                                         \
      k = k3 + (nm ? 8 : __builtin_popcount(g3));                                               \
    }                                                                                           \
    for (int b = 0; b < B; ++b) {                                                               \
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),                       \
                                     _mm512_add_ps(acc[b][2], acc[b][3]));                      \
      float lane[16];                                                                           \
      _mm512_storeu_ps(lane, s);                                                                \
      out[b] = reduce16(lane);                                                                  \
    }                                                                                           \
  }

DEFINE_ROW_MASK(1)
DEFINE_ROW_MASK(2)
DEFINE_ROW_MASK(3)
DEFINE_ROW_MASK(4)
DEFINE_ROW_MASK(5)
DEFINE_ROW_MASK(6)
DEFINE_ROW_MASK(7)
DEFINE_ROW_MASK(8)

static void row_mask_avx512(const mat_t *m, int64_t i, int64_t k0, float out[MAXB]) {
  switch (m->batch) {
    case 1: row_mask_b1(m, i, k0, out); break;
    case 2: row_mask_b2(m, i, k0, out); break;
    case 3: row_mask_b3(m, i, k0, out); break;
    case 4: row_mask_b4(m, i, k0, out); break;
    case 5: row_mask_b5(m, i, k0, out); break;
    case 6: row_mask_b6(m, i, k0, out); break;
    case 7: row_mask_b7(m, i, k0, out); break;
    default: row_mask_b8(m, i, k0, out); break;
  }
}
#endif

static void row_mask(const mat_t *m, int64_t i, int64_t k0, float out[MAXB]) {
#ifdef __AVX512F__
  row_mask_avx512(m, i, k0, out);
#else
  row_mask_portable(m, i, k0, out);
#endif
}

static void run_rows(const mat_t *m, int64_t r0, int64_t r1) {
  float out[MAXB];
  for (int64_t i = r0; i < r1; ++i) {
    if (m->fmt == FMT_CSR8) row_csr8(m, i, out);
    else row_mask(m, i, m->fmt == FMT_NM24 ? i * m->words * 32 : m->rowptr[i], out);
    const float bi = m->bias ? m->bias[i] : 0.0f;
    for (int64_t b = 0; b < m->batch; ++b) m->y[b * m->rows + i] = out[b] + bi;
  }
}

/* first row whose values start at or after `target` (rows with a row pointer), else an even split */
static int64_t split_at(const mat_t *m, int t, int threads) {
  if (m->fmt == FMT_NM24) return (m->rows * t) / threads;
  const int64_t target = ((int64_t)m->rowptr[m->rows] * t) / threads;
  int64_t lo = 0, hi = m->rows;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (m->rowptr[mid] < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/* Returns 0 on success, 1 on bad arguments. The weight's own arguments come first (the caller keeps them
 * ready-made), then the input: `batch` rows of x (any count: taken MAXB at a time). */
int prunekit_packed_mv(int fmt, int bf16, int64_t rows, int64_t in, const uint64_t *mask, const uint8_t *delta,
                       const int32_t *rowptr, const void *val, const float *bias, int64_t batch, const float *x,
                       float *y, int threads) {
  if (fmt < FMT_BITMASK || fmt > FMT_CSR8 || rows < 0 || in < 1 || batch < 1) return 1;
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (rows * in < 65536 * (int64_t)threads) threads = 1; /* too little work to wake other threads */
  if (threads > rows) threads = rows > 0 ? (int)rows : 1;
  const int64_t words = (in + 63) / 64;
  /* the vector loop reads whole 64-input words of x: pad rows of a layer whose width is not a multiple
   * of 64 (zeros: they meet only pruned lanes) */
  const int pad = fmt != FMT_CSR8 && in % 64 != 0;
  float *xp = 0;
  if (pad) {
    xp = (float *)calloc((size_t)(batch * words * 64), sizeof(float));
    if (!xp) return 2;
    for (int64_t b = 0; b < batch; ++b) memcpy(xp + b * words * 64, x + b * in, sizeof(float) * (size_t)in);
    x = xp;
  }
  mat_t m = {fmt, bf16 != 0, rows, in, MAXB, words, pad ? words * 64 : in, mask, delta, rowptr, val, x, bias, y};
  int64_t bounds[MAX_THREADS + 1];
  bounds[0] = 0;
  bounds[threads] = rows;
  for (int t = 1; t < threads; ++t) {
    const int64_t r = split_at(&m, t, threads);
    bounds[t] = r < bounds[t - 1] ? bounds[t - 1] : r;
  }
  for (int64_t b0 = 0; b0 < batch; b0 += MAXB) {
    m.batch = batch - b0 < MAXB ? batch - b0 : MAXB;
    m.x = x + b0 * m.ldx;
    m.y = y + b0 * rows;
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
    for (int t = 0; t < threads; ++t) run_rows(&m, bounds[t], bounds[t + 1]);
  }
  free(xp);
  return 0;
}

/* Dense float32 (rows, in) from a packed matrix: what large batches (a prompt) multiply with. */
int prunekit_packed_unpack(int fmt, int bf16, int64_t rows, int64_t in, const uint64_t *mask,
                           const uint8_t *delta, const int32_t *rowptr, const void *val, float *out) {
  if (fmt < FMT_BITMASK || fmt > FMT_CSR8 || rows < 0 || in < 1) return 1;
  const mat_t m = {fmt, bf16 != 0, rows, in, 1, (in + 63) / 64, in, mask, delta, rowptr, val, 0, 0, 0};
  memset(out, 0, sizeof(float) * (size_t)(rows * in));
  for (int64_t i = 0; i < rows; ++i) {
    float *o = out + i * in;
    if (fmt == FMT_CSR8) {
      int64_t col = 0;
      for (int64_t k = rowptr[i]; k < rowptr[i + 1]; ++k) {
        col += delta[k];
        o[col] += value_at(&m, k);
      }
      continue;
    }
    int64_t k = fmt == FMT_NM24 ? i * m.words * 32 : rowptr[i];
    for (int64_t c = 0; c * 16 < in; ++c) {
      const unsigned bits = (unsigned)((mask[i * m.words + (c >> 2)] >> (16 * (c & 3))) & 0xFFFFu);
      int64_t kk = k;
      for (int l = 0; l < 16; ++l)
        if (bits >> l & 1u) o[c * 16 + l] = value_at(&m, kk++);
      k = fmt == FMT_NM24 ? k + 8 : kk;
    }
  }
  return 0;
}

/* 1 when the vector loops were compiled in (AVX-512), else 0 */
int prunekit_packed_simd(void) {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}
