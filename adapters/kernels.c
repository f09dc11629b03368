/* Fused CPU kernels for test-time normalisation layers (loaded by native.py through ctypes).
 *
 * Why: on the CPU at small sizes (batch 1), what test-time normalisation costs over an eval-mode BatchNorm is not
 * arithmetic but PyTorch's per-operation dispatch (~5 us per call): UnMix-TNS needs ~75 small operations per layer,
 * alpha-BN five. Each function here does one layer's work in one call, in plain loops, with every statistic
 * accumulated in double precision (so E[x^2] - E[x]^2 needs no second pass).
 *
 * Layouts: x and y are B x C x L (contiguous NCHW with L = H*W); statistics components are K x C; weight and bias
 * are C values or NULL. All functions are pure (no global state) and safe to call from several threads at once.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 8

/* Sum and sum of squares of one row, in LANES independent accumulators (vectorisable without reassociation). */
static void row_sums(const float *row, int64_t len, double *sum, double *squares) {
    double s[LANES] = {0}, q[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= len; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            double v = row[i + j];
            s[j] += v;
            q[j] += v * v;
        }
    }
    double total = 0.0, total_sq = 0.0;
    for (int j = 0; j < LANES; j++) {
        total += s[j];
        total_sq += q[j];
    }
    for (; i < len; i++) {
        double v = row[i];
        total += v;
        total_sq += v * v;
    }
    *sum = total;
    *squares = total_sq;
}

/* Dot product of two double vectors, in LANES independent accumulators. */
static double dot(const double *a, const double *b, int64_t n) {
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    double total = 0.0;
    for (int j = 0; j < LANES; j++) total += acc[j];
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* y = x * scale + shift over one row. */
static void scale_row(const float *x, int64_t len, float scale, float shift, float *y) {
    for (int64_t i = 0; i < len; i++) y[i] = x[i] * scale + shift;
}

static void affine_of(double mean, double var, double eps, const float *weight, const float *bias, int64_t c,
                      float *scale, float *shift) {
    double s = 1.0 / sqrt(var + eps);
    if (weight) s *= weight[c];
    *scale = (float)s;
    *shift = (float)((bias ? bias[c] : 0.0) - mean * s);
}

/* Batch statistics per channel blended with the source ones, then the affine normalisation:
 * mean = (1 - alpha) * running_mean + alpha * batch mean, and the same for the (biased) variance. With alpha = 1
 * (running statistics may then be NULL) this is test-time BatchNorm; with alpha in (0, 1), alpha-BN. */
void ttaserve_channel_norm(const float *x, int64_t B, int64_t C, int64_t L, const float *running_mean,
                           const float *running_var, double alpha, const float *weight, const float *bias, double eps,
                           float *y) {
    double count = (double)B * (double)L;
    for (int64_t c = 0; c < C; c++) {
        double sum = 0.0, squares = 0.0;
        for (int64_t b = 0; b < B; b++) {
            double s, q;
            row_sums(x + (b * C + c) * L, L, &s, &q);
            sum += s;
            squares += q;
        }
        double mean = sum / count;
        double var = squares / count - mean * mean;
        if (var < 0.0) var = 0.0;
        if (alpha != 1.0) {
            mean = (1.0 - alpha) * running_mean[c] + alpha * mean;
            var = (1.0 - alpha) * running_var[c] + alpha * var;
        }
        float scale, shift;
        affine_of(mean, var, eps, weight, bias, c, &scale, &shift);
        for (int64_t b = 0; b < B; b++) scale_row(x + (b * C + c) * L, L, scale, shift, y + (b * C + c) * L);
    }
}

/* UnMix-TNS statistics from instance moments m, v (B x C): soft assignments p (B x K) from the cosine similarity of
 * each sample's instance mean with the component means (softmax at temperature tau), the mixture's mean and variance
 * per (sample, channel) over the K components pulled toward the sample (law of total variance), written to
 * out_mean, out_var (B x C); and, when new_means is not NULL, the components moved toward their samples:
 * mu_k <- mu_k + rate * sum_b p_bk (m_b - mu_k), the same for the variances. Returns 0, or -1 when out of memory. */
/* Adds component k, pulled toward the sample by p, to the per-channel sums of the mixture's means, squared means
 * and variances. (restrict: the arrays never overlap, which lets the compiler vectorise the loop.) */
static void mix_component(const double *restrict mu, const double *restrict sigma, const double *restrict m,
                          const double *restrict v, double p, int64_t C, double *restrict first,
                          double *restrict second, double *restrict within) {
    double q = 1.0 - p;
    for (int64_t c = 0; c < C; c++) {
        double mixed = q * mu[c] + p * m[c];
        first[c] += mixed;
        second[c] += mixed * mixed;
        within[c] += q * sigma[c] + p * v[c];
    }
}

/* Adds the sample's instance moments, weighted by its assignment p to component k, to what pulls that component. */
static void pull_component(const double *restrict m, const double *restrict v, double p, int64_t C,
                           double *restrict pulled_mean, double *restrict pulled_var) {
    for (int64_t c = 0; c < C; c++) {
        pulled_mean[c] += p * m[c];
        pulled_var[c] += p * v[c];
    }
}

static int unmix_core(const double *m, const double *v, int64_t B, int64_t C, const float *means,
                      const float *variances, int64_t K, double temperature, double rate, double *out_mean,
                      double *out_var, float *new_means, float *new_vars) {
    /* Scratch: p (B x K), the components in double (2 x K x C) and their norms (K), per-channel sums (3 x C), pulled
     * components and weights (2 x K x C + K). Inner loops run over contiguous channels with independent
     * accumulators, so they vectorise and never wait on one long chain of dependent additions. */
    double *p = malloc(sizeof(double) * (size_t)(B * K + 4 * K * C + 2 * K + 3 * C));
    if (!p) return -1;
    double *mu = p + B * K, *sigma = mu + K * C, *component_norm = sigma + K * C, *first = component_norm + K;
    double *second = first + C, *within = second + C, *pulled_mean = within + C, *pulled_var = pulled_mean + K * C;
    double *pull = pulled_var + K * C;
    for (int64_t i = 0; i < K * C; i++) {
        mu[i] = means[i];
        sigma[i] = variances[i];
    }
    for (int64_t k = 0; k < K; k++) {
        double n = sqrt(dot(mu + k * C, mu + k * C, C));
        component_norm[k] = n > 1e-12 ? n : 1e-12;
    }
    for (int64_t i = 0; i < 2 * K * C + K; i++) pulled_mean[i] = 0.0;
    for (int64_t b = 0; b < B; b++) {
        const double *mb = m + b * C, *vb = v + b * C;
        double *pb = p + b * K;
        double n = sqrt(dot(mb, mb, C));
        double sample_norm = n > 1e-12 ? n : 1e-12;
        double top = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            pb[k] = dot(mb, mu + k * C, C) / (sample_norm * component_norm[k]) / temperature;
            if (pb[k] > top) top = pb[k];
        }
        double total = 0.0;
        for (int64_t k = 0; k < K; k++) total += (pb[k] = exp(pb[k] - top));
        for (int64_t c = 0; c < C; c++) first[c] = second[c] = within[c] = 0.0;
        for (int64_t k = 0; k < K; k++) {
            double pk = (pb[k] /= total);
            mix_component(mu + k * C, sigma + k * C, mb, vb, pk, C, first, second, within);
            if (new_means) {
                pull_component(mb, vb, pk, C, pulled_mean + k * C, pulled_var + k * C);
                pull[k] += pk;
            }
        }
        for (int64_t c = 0; c < C; c++) {
            double mean = first[c] / K;
            double between = second[c] / K - mean * mean;
            out_mean[b * C + c] = mean;
            out_var[b * C + c] = within[c] / K + (between > 0.0 ? between : 0.0);
        }
    }
    if (new_means) {
        for (int64_t k = 0; k < K; k++) {
            double keep = 1.0 - rate * pull[k];
            for (int64_t c = 0; c < C; c++) {
                new_means[k * C + c] = (float)(mu[k * C + c] * keep + rate * pulled_mean[k * C + c]);
                new_vars[k * C + c] = (float)(sigma[k * C + c] * keep + rate * pulled_var[k * C + c]);
            }
        }
    }
    free(p);
    return 0;
}

/* One whole UnMix-TNS layer: instance moments of x, the mixture statistics, the per-(sample, channel) affine
 * normalisation into y and (new_means not NULL) the updated components. Returns 0, or -1 when out of memory. */
int ttaserve_unmix_layer(const float *x, int64_t B, int64_t C, int64_t L, const float *means, const float *variances,
                         int64_t K, const float *weight, const float *bias, double eps, double temperature,
                         double rate, float *y, float *new_means, float *new_vars) {
    double *buffer = malloc(sizeof(double) * (size_t)(4 * B * C));
    if (!buffer) return -1;
    double *m = buffer, *v = buffer + B * C, *mean = buffer + 2 * B * C, *var = buffer + 3 * B * C;
    for (int64_t r = 0; r < B * C; r++) {
        double s, q;
        row_sums(x + r * L, L, &s, &q);
        m[r] = s / L;
        v[r] = q / L - m[r] * m[r];
        if (v[r] < 0.0) v[r] = 0.0;
    }
    int status = unmix_core(m, v, B, C, means, variances, K, temperature, rate, mean, var, new_means, new_vars);
    if (status == 0) {
        for (int64_t r = 0; r < B * C; r++) {
            float scale, shift;
            affine_of(mean[r], var[r], eps, weight, bias, r % C, &scale, &shift);
            scale_row(x + r * L, L, scale, shift, y + r * L);
        }
    }
    free(buffer);
    return status;
}

/* UnMix-TNS statistics only, for inputs large enough that PyTorch's multi-threaded reductions and normalisation beat
 * a single-threaded loop. With L > 0, a and b are each row's float32 sum and 2-norm over its L elements (two
 * reductions PyTorch runs fast), and cancellation_limit the largest mean^2 / variance for which E[x^2] - E[x]^2 from
 * float32 sums is trusted; with L == 0 they are the instance means and variances. Writes the mixture mean and
 * variance (B x C) and, new_means not NULL, the updated components. Returns 0; 1, writing nothing, when the sums
 * cannot give a variance precisely enough (a mean large against the spread: the caller then computes the moments
 * around the mean and calls again with L == 0); -1 when out of memory. */
int ttaserve_unmix_stats(const float *a, const float *b, int64_t B, int64_t C, int64_t L, double cancellation_limit,
                         const float *means, const float *variances, int64_t K, double temperature, double rate,
                         float *mean_out, float *var_out, float *new_means, float *new_vars) {
    double *buffer = malloc(sizeof(double) * (size_t)(4 * B * C));
    if (!buffer) return -1;
    double *m = buffer, *v = buffer + B * C, *mean = buffer + 2 * B * C, *var = buffer + 3 * B * C;
    for (int64_t r = 0; r < B * C; r++) {
        if (L > 0) {
            m[r] = (double)a[r] / L;
            v[r] = (double)b[r] * b[r] / L - m[r] * m[r];
            if (v[r] < 0.0) v[r] = 0.0;
            if (m[r] * m[r] > cancellation_limit * v[r]) {
                free(buffer);
                return 1;
            }
        } else {
            m[r] = a[r];
            v[r] = b[r];
        }
    }
    int status = unmix_core(m, v, B, C, means, variances, K, temperature, rate, mean, var, new_means, new_vars);
    for (int64_t r = 0; status == 0 && r < B * C; r++) {
        mean_out[r] = (float)mean[r];
        var_out[r] = (float)var[r];
    }
    free(buffer);
    return status;
}
