// Kernels of the CUDA engine, compiled at run time with NVRTC for the present GPU. No toolkit
// headers: bf16 is handled as raw 16-bit values (round to nearest even), so NVRTC needs no
// include path. Every kernel has a CPU twin in ops.rs that it is checked against.

typedef unsigned short bf16_t;
#define IGNORE 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float bf2f(bf16_t b) { return __uint_as_float(((unsigned)b) << 16); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    v = sh[32];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : NEG_INF;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    v = sh[32];
    __syncthreads();
    return v;
}

extern "C" __global__ void embed_fwd(const unsigned* ids, const float* wte, float* x, long n, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * d) return;
    long r = i / d;
    x[i] = wte[(long)ids[r] * d + i % d];
}

extern "C" __global__ void embed_bwd(const unsigned* ids, const float* dx, float* dwte, long n, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * d) return;
    long r = i / d;
    atomicAdd(&dwte[(long)ids[r] * d + i % d], dx[i]);
}

// One block per row. w may be null (no affine weight).
extern "C" __global__ void norm_fwd(const float* x, const float* w, float* y, float* mean, float* rstd,
                                    int d, float eps, int rms) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float m = 0.f;
    if (!rms) {
        float s = 0.f;
        for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
        m = block_sum(s, sh) / d;
    }
    float v = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float t = xr[i] - m;
        v += t * t;
    }
    v = block_sum(v, sh) / d;
    float rs = rsqrtf(v + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = (xr[i] - m) * rs;
        yr[i] = w ? o * w[i] : o;
    }
    if (threadIdx.x == 0) {
        mean[r] = m;
        rstd[r] = rs;
    }
}

// Adds dL/dx into dx; adds dL/dw into dw when w is not null.
extern "C" __global__ void norm_bwd(const float* dy, const float* x, const float* mean, const float* rstd,
                                    const float* w, float* dx, float* dw, int d, int rms) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    const float* xr = x + r * d;
    const float* g = dy + r * d;
    float m = mean[r], rs = rstd[r];
    float a = 0.f, b = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float n = (xr[i] - m) * rs;
        float gi = w ? g[i] * w[i] : g[i];
        a += gi;
        b += gi * n;
        if (w) atomicAdd(&dw[i], g[i] * n);
    }
    a = block_sum(a, sh) / d;
    b = block_sum(b, sh) / d;
    if (rms) a = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float n = (xr[i] - m) * rs;
        float gi = w ? g[i] * w[i] : g[i];
        dx[r * d + i] += rs * (gi - a - n * b);
    }
}

// NeoX rotate-half RoPE in place on `parts` consecutive [heads, 2*half] groups of each row.
extern "C" __global__ void rope(float* x, const float* cosb, const float* sinb, long rows, int T, int heads,
                                int half, int stride, int parts, int inverse) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = rows * parts * heads * half;
    if (idx >= total) return;
    int j = idx % half;
    long q = idx / half;
    int h = q % (parts * heads);
    long r = q / (parts * heads);
    int t = r % T;
    float c = cosb[t * half + j], s = sinb[t * half + j];
    if (inverse) s = -s;
    float* base = x + r * stride + (long)h * 2 * half;
    float a = base[j], b = base[j + half];
    base[j] = a * c - b * s;
    base[j + half] = b * c + a * s;
}

// Causal softmax in place over rows of length T (row r is position r % T).
extern "C" __global__ void softmax_fwd(float* s, int T) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    int t = r % T;
    float* row = s + r * T;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) {
        float e = expf(row[i] - mx);
        row[i] = e;
        sum += e;
    }
    float inv = 1.f / block_sum(sum, sh);
    for (int i = threadIdx.x; i < T; i += blockDim.x) row[i] = i <= t ? row[i] * inv : 0.f;
}

// dS = P * (dP - rowsum(P * dP)) * scale, in place on dP.
extern "C" __global__ void softmax_bwd(const float* p, float* dp, int T, float scale) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    int t = r % T;
    const float* pr = p + r * T;
    float* dr = dp + r * T;
    float w = 0.f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) w += pr[i] * dr[i];
    w = block_sum(w, sh);
    for (int i = threadIdx.x; i < T; i += blockDim.x) dr[i] = i <= t ? pr[i] * (dr[i] - w) * scale : 0.f;
}

// Mixed precision: causal softmax of f32 scores (rows of length T, used as scratch) into bf16
// probabilities, the PV GEMM's operand, so no f32 copy of P is kept or re-cast.
extern "C" __global__ void softmax_fwd_bf16(float* s, bf16_t* p, int T) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    int t = r % T;
    float* row = s + r * T;
    bf16_t* out = p + r * T;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) {
        float e = expf(row[i] - mx);
        row[i] = e;
        sum += e;
    }
    float inv = 1.f / block_sum(sum, sh);
    for (int i = threadIdx.x; i < T; i += blockDim.x) out[i] = f2bf(i <= t ? row[i] * inv : 0.f);
}

// Mixed precision: dS = P * (dP - rowsum(P * dP)) * scale from bf16 P and f32 dP, as bf16.
extern "C" __global__ void softmax_bwd_bf16(const bf16_t* p, const float* dp, bf16_t* ds, int T, float scale) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    int t = r % T;
    const bf16_t* pr = p + r * T;
    const float* dr = dp + r * T;
    bf16_t* out = ds + r * T;
    float w = 0.f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) w += bf2f(pr[i]) * dr[i];
    w = block_sum(w, sh);
    for (int i = threadIdx.x; i < T; i += blockDim.x)
        out[i] = f2bf(i <= t ? bf2f(pr[i]) * (dr[i] - w) * scale : 0.f);
}

extern "C" __global__ void swiglu_fwd(const float* x, float* y, long rows, int h) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * h) return;
    long r = idx / h;
    int i = idx % h;
    float v = x[r * 2 * h + i], g = x[r * 2 * h + h + i];
    y[idx] = g / (1.f + expf(-g)) * v;
}

extern "C" __global__ void swiglu_bwd(const float* dy, const float* x, float* dx, long rows, int h) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * h) return;
    long r = idx / h;
    int i = idx % h;
    float v = x[r * 2 * h + i], g = x[r * 2 * h + h + i];
    float sig = 1.f / (1.f + expf(-g));
    float d = dy[idx];
    dx[r * 2 * h + i] = d * g * sig;
    dx[r * 2 * h + h + i] = d * v * sig * (1.f + g * (1.f - sig));
}

// One block per row: log p(target) and the z-loss term; with `backward`, overwrites the logits
// with gscale * dL/dlogits.
extern "C" __global__ void cross_entropy(float* logits, const unsigned* tgt, float* logp, float* zt, int V,
                                         float zloss, float gscale, int backward) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    float* row = logits + r * V;
    unsigned t = tgt[r];
    if (t == IGNORE) {
        if (threadIdx.x == 0) {
            logp[r] = 0.f;
            zt[r] = 0.f;
        }
        if (backward)
            for (int i = threadIdx.x; i < V; i += blockDim.x) row[i] = 0.f;
        return;
    }
    float xt = row[t];
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(row[i] - mx);
    float lse = mx + logf(block_sum(sum, sh));
    if (threadIdx.x == 0) {
        logp[r] = xt - lse;
        zt[r] = zloss * lse * lse;
    }
    if (backward) {
        float zc = 1.f + 2.f * zloss * lse;
        for (int i = threadIdx.x; i < V; i += blockDim.x) row[i] = expf(row[i] - lse) * zc * gscale;
        __syncthreads();
        if (threadIdx.x == 0) row[t] -= gscale;
    }
}

extern "C" __global__ void add(float* out, const float* a, const float* b, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

extern "C" __global__ void cast_bf16(const float* x, bf16_t* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2bf(x[i]);
}

extern "C" __global__ void sumsq(const float* x, long n, double* out) {
    __shared__ float sh[33];
    float s = 0.f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += x[i] * x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) atomicAdd(out, (double)s);
}

// AdamW as torch computes it, on gradients scaled by the clipping coefficient.
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, long n, float lr, float b1,
                                 float b2, float eps, float wd, float bc1, float bc2_sqrt, float coef) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * coef;
    float pi = p[i] * (1.f - lr * wd);
    float mi = m[i] + (gi - m[i]) * (1.f - b1);
    float vi = v[i] * b2 + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - (lr / bc1) * mi / (sqrtf(vi) / bc2_sqrt + eps);
}
