/* y = x @ w.T for a few rows of x, fp32, one thread: each weight row is read from memory once, as one
 * sequential stream, and dotted with every row of x (which stays in the caches).
 *
 * Built on the user's machine with -O3 -march=native (and -mno-avx512f on x86) by native_linear.py: a vector
 * below is one of that CPU's registers (AVX2, NEON, SSE). Sums are per lane, then halved pairwise, so a
 * result may differ from MKL's or oneDNN's in the last bits (~1e-6 relative), as theirs differ from each
 * other's. */

#include <stddef.h>
#include <string.h>

/* One vector is one of the target's widest registers: the eight accumulators of DOT_ROWS must stay in
 * registers (AVX2 has 16; a 16-float vector there takes two, and the spills made it 1.3-4x slower than
 * MKL). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4 /* SSE, NEON, or a compiler's generic vectors */
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
#define MAX_CHUNK 4 /* rows of x per pass over a weight row (the accumulators must fit in registers) */

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The lanes summed pairwise: halves, then quarters, ... A 16-lane (AVX-512) vector is halved with vector
 * adds (a loop over its lanes cost 10-20% at 4-8 rows); for 8 lanes or fewer the loop measured as fast or
 * faster (bench/native_widths.py). */
#if LANES == 16
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));
static inline float lane_sum(vec v) {
    vec8 low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, (const char *)&v + sizeof low, sizeof high);
    vec8 eight = low + high;
    vec4 four_low, four_high;
    memcpy(&four_low, &eight, sizeof four_low);
    memcpy(&four_high, (const char *)&eight + sizeof four_low, sizeof four_high);
    vec4 four = four_low + four_high;
    return (four[0] + four[2]) + (four[1] + four[3]);
}
#else
static inline float lane_sum(vec v) {
    float lanes[LANES];
    memcpy(lanes, &v, sizeof lanes);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    return lanes[0];
}
#endif

/* One weight row against 2, 3 or 4 rows of x (out[k * out_stride]): two accumulators per row of x, named
 * (not an array) so that they stay in registers. */
#define DOT_ROWS(name, COUNT)                                                                           \
    static void name(const float *w, const float *x, long inputs, float *out, long out_stride) {        \
        vec a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, d0 = {0}, d1 = {0};             \
        const float *xa = x, *xb = x + inputs, *xc = x + 2 * inputs, *xd = x + 3 * inputs;              \
        long i = 0;                                                                                     \
        for (; i + 2 * LANES <= inputs; i += 2 * LANES) {                                               \
            vec w0 = load(w + i), w1 = load(w + i + LANES);                                             \
            a0 += w0 * load(xa + i), a1 += w1 * load(xa + i + LANES);                                   \
            b0 += w0 * load(xb + i), b1 += w1 * load(xb + i + LANES);                                   \
            if (COUNT > 2) c0 += w0 * load(xc + i), c1 += w1 * load(xc + i + LANES);                    \
            if (COUNT > 3) d0 += w0 * load(xd + i), d1 += w1 * load(xd + i + LANES);                    \
        }                                                                                               \
        float sums[4] = {lane_sum(a0 + a1), lane_sum(b0 + b1), lane_sum(c0 + c1), lane_sum(d0 + d1)};   \
        for (int k = 0; k < COUNT; k++) {                                                               \
            for (long j = i; j < inputs; j++) sums[k] += w[j] * x[k * inputs + j];                      \
            out[k * out_stride] = sums[k];                                                              \
        }                                                                                               \
    }
DOT_ROWS(dot_two_rows, 2)
DOT_ROWS(dot_three_rows, 3)
DOT_ROWS(dot_four_rows, 4)

/* One row of x (a decode step): four accumulators, so the loads of one stream keep several FMAs in flight. */
static void dot_one_row(const float *w, const float *x, long outputs, long inputs, float *y) {
    for (long r = 0; r < outputs; r++) {
        const float *row = w + r * inputs;
        vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        long i = 0;
        for (; i + 4 * LANES <= inputs; i += 4 * LANES) {
            a0 += load(row + i) * load(x + i);
            a1 += load(row + i + LANES) * load(x + i + LANES);
            a2 += load(row + i + 2 * LANES) * load(x + i + 2 * LANES);
            a3 += load(row + i + 3 * LANES) * load(x + i + 3 * LANES);
        }
        for (; i + LANES <= inputs; i += LANES) a0 += load(row + i) * load(x + i);
        float sum = lane_sum((a0 + a1) + (a2 + a3));
        for (; i < inputs; i++) sum += row[i] * x[i];
        y[r] = sum;
    }
}

/* w: [outputs, inputs] row-major; x: [rows, inputs] row-major; y: [rows, outputs] row-major. */
void pollinate_few_rows(const float *w, const float *x, float *y, long outputs, long inputs, long rows) {
    if (rows == 1) {
        dot_one_row(w, x, outputs, inputs, y);
        return;
    }
    for (long r = 0; r < outputs; r++) {
        const float *row = w + r * inputs;
        /* the first row of x streams the weight row from memory into L1 (the fastest read: one stream, four
         * accumulators); the other rows of x then read it from L1, up to four at a time */
        dot_one_row(row, x, 1, inputs, y + r);
        for (long k = 1; k < rows; k += MAX_CHUNK) {
            long count = rows - k < MAX_CHUNK ? rows - k : MAX_CHUNK;
            const float *xs = x + k * inputs;
            float *out = y + k * outputs + r;
            switch (count) {
            case 1: dot_one_row(row, xs, 1, inputs, out); break;
            case 2: dot_two_rows(row, xs, inputs, out, outputs); break;
            case 3: dot_three_rows(row, xs, inputs, out, outputs); break;
            default: dot_four_rows(row, xs, inputs, out, outputs); break;
            }
        }
    }
}
