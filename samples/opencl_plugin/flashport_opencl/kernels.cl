// flashport-opencl kernels. Built with FP_CONTRACT OFF: no mul+add -> fma contraction, so elementwise kernels
// round every operation like torch does (rope is bit-exact with flashport's reference).
#pragma OPENCL FP_CONTRACT OFF

#define LS 64  // work-group size of the reductions (a power of two)

// Tree reduction of one value per work item over the work group; every item gets the sum.
inline float group_sum(float v, __local float *scratch) {
    const int l = get_local_id(0);
    scratch[l] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = LS / 2; s > 0; s >>= 1) {
        if (l < s) scratch[l] += scratch[l + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

// W8A16 linear: y[t, n] = sum_k x[t, k] * (w[n, k] * scale[n]). One work group per (n, t); each work item
// takes a strided slice of K. The weight is dequantized with the reference's single fp32 rounding
// (code * scale); the sum runs in another order than torch's matmul (tolerance-bound).
__kernel void linear_int8(__global const float *x, __global const char *w, __global const float *scale,
                          __global float *y, const int K, const int N) {
    __local float scratch[LS];
    const int n = get_group_id(0), t = get_global_id(1), l = get_local_id(0);
    const float s = scale[n];
    __global const float *xr = x + (long)t * K;
    __global const char *wr = w + (long)n * K;
    float acc = 0.0f;
    for (int k = l; k < K; k += LS) acc += xr[k] * ((float)wr[k] * s);
    acc = group_sum(acc, scratch);
    if (l == 0) y[(long)t * N + n] = acc;
}

// RMSNorm over rows of D: y = x * rsqrt(mean(x^2) + eps) (* weight). One work group per row.
__kernel void rms_norm(__global const float *x, __global const float *weight, __global float *y, const int D,
                       const float eps, const int has_weight) {
    __local float scratch[LS];
    const int row = get_group_id(0), l = get_local_id(0);
    __global const float *xr = x + (long)row * D;
    float ss = 0.0f;
    for (int k = l; k < D; k += LS) ss += xr[k] * xr[k];
    const float r = 1.0f / sqrt(group_sum(ss, scratch) / (float)D + eps);
    for (int k = l; k < D; k += LS) {
        const float v = xr[k] * r;
        y[(long)row * D + k] = has_weight ? weight[k] * v : v;
    }
}

// Interleaved partial RoPE, in place on a copy of x viewed as [T * H, D]: pair i of the last 2*n_half channels
// rotates by the angle of row t = row / H. sign = -1 applies the inverse rotation.
__kernel void rope(__global float *x, __global const float *cos_t, __global const float *sin_t, const int H,
                   const int D, const int n_half, const float sign) {
    const int row = get_global_id(0), i = get_global_id(1);
    const int t = row / H;
    __global float *p = x + (long)row * D + (D - 2 * n_half) + 2 * i;
    const float c = cos_t[t * n_half + i], s = sign * sin_t[t * n_half + i];
    const float x1 = p[0], x2 = p[1];
    p[0] = x1 * c - x2 * s;
    p[1] = x2 * c + x1 * s;
}
