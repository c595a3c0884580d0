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

// Loads and stores of f32 or bf16 (kept in f32 in between).
__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) { return bf2f(p[i]); }
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long i, float v) { p[i] = f2bf(v); }

// 16 bytes of elements, moved by one load or store: the elementwise kernels over bf16 GEMM
// operands (SwiGLU, RoPE, casts) are bound by memory and by per-element index arithmetic, and
// one thread per 16-byte vector does the 64-bit divisions once per 8 bf16 (or 4 f32) elements.
// Each element's arithmetic is the scalar path's, so both give the same bits.
struct alignas(16) vec16_t {
    unsigned w[4];
};
template <typename T>
union pack16 {
    vec16_t v;
    T e[16 / sizeof(T)];
};

// Whether a kernel runs one thread per vector: every count splits into whole vectors of T and
// every address is 16-byte aligned. The launchers make the same test (`vec_width` in gpu.rs)
// to size the grid; else one thread per element.
template <typename T>
__device__ __forceinline__ bool vec16_ok(long n1, long n2, const void* a, const void* b = 0, const void* c = 0) {
    const long v = 16 / sizeof(T);
    return n1 % v == 0 && n2 % v == 0 &&
           (((unsigned long long)a | (unsigned long long)b | (unsigned long long)c) & 15ull) == 0;
}

// V elements of T at p into f32, and back: by 16-byte vectors (p aligned) when V spans whole
// vectors, else (V = 1) one element. The elementwise kernels take V as a template parameter
// so that their vector and per-element forms share one body, hence the same arithmetic.
template <int V, typename T>
__device__ __forceinline__ void load_f32(float* out, const T* p) {
    constexpr int N = 16 / sizeof(T);
    static_assert(V == 1 || V % N == 0, "V: one element or whole 16-byte vectors");
    if constexpr (V == 1) {
        out[0] = ld(p, 0);
    } else {
#pragma unroll
        for (int c = 0; c < V / N; ++c) {
            pack16<T> u;
            u.v = ((const vec16_t*)p)[c];
#pragma unroll
            for (int k = 0; k < N; ++k) out[c * N + k] = ld(u.e, k);
        }
    }
}
template <int V, typename T>
__device__ __forceinline__ void store_f32(T* p, const float* in) {
    constexpr int N = 16 / sizeof(T);
    static_assert(V == 1 || V % N == 0, "V: one element or whole 16-byte vectors");
    if constexpr (V == 1) {
        st(p, 0, in[0]);
    } else {
#pragma unroll
        for (int c = 0; c < V / N; ++c) {
            pack16<T> u;
#pragma unroll
            for (int k = 0; k < N; ++k) st(u.e, k, in[c * N + k]);
            ((vec16_t*)p)[c] = u.v;
        }
    }
}

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

// dL/dwte += the rows of dx, by token: block b adds, for token tokens[b], the rows
// pos[starts[b]] .. pos[starts[b + 1] - 1] of dx in that order (the host groups the positions
// by token, ascending). Each row of dwte has one writer and one order of summation, so the
// result is the same bits on every run, which atomics would not give (nor their contention on
// frequent tokens spare).
extern "C" __global__ void embed_bwd(const unsigned* tokens, const unsigned* starts, const unsigned* pos,
                                     const float* dx, float* dwte, int d) {
    unsigned tok = tokens[blockIdx.x], s = starts[blockIdx.x], e = starts[blockIdx.x + 1];
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (unsigned k = s; k < e; ++k) acc += dx[(long)pos[k] * d + c];
        dwte[(long)tok * d + c] += acc;
    }
}

// One block per row; w may be null (no affine weight). `res`, when not null, is added to the
// normalised row (OLMo 2's `x + norm(branch)`).
__device__ void norm_fwd_impl(const float* x, const float* w, const float* res, float* y, bf16_t* yb,
                              float* mean, float* rstd, int d, float eps, int rms) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    const float* xr = x + r * d;
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
        o = w ? o * w[i] : o;
        if (res) o += res[r * d + i];
        if (yb)
            yb[r * d + i] = f2bf(o);
        else
            y[r * d + i] = o;
    }
    if (threadIdx.x == 0) {
        mean[r] = m;
        rstd[r] = rs;
    }
}

// The output goes to y (f32), or, when yb is not null, to yb only, rounded to bf16: under mixed
// precision a pre-norm's output is only a GEMM operand.
extern "C" __global__ void norm_fwd(const float* x, const float* w, float* y, bf16_t* yb, float* mean,
                                    float* rstd, int d, float eps, int rms) {
    norm_fwd_impl(x, w, 0, y, yb, mean, rstd, d, eps, rms);
}

// y = res + norm(x): a norm_after branch joining the (f32) residual stream.
extern "C" __global__ void norm_add_fwd(const float* x, const float* w, const float* res, float* y,
                                        float* mean, float* rstd, int d, float eps, int rms) {
    norm_fwd_impl(x, w, res, y, 0, mean, rstd, d, eps, rms);
}

// Copies `cols` columns of `rows` rows between row-major buffers with leading dimensions lds
// and ldd, each f32 or (flag set) bf16: QK-norm's q and k in and out of the fused qkv rows.
extern "C" __global__ void cols_copy(const void* src, int src_bf16, long lds, void* dst, int dst_bf16, long ldd,
                                     long rows, int cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    long r = i / cols, c = i % cols;
    float v = src_bf16 ? ld((const bf16_t*)src, r * lds + c) : ld((const float*)src, r * lds + c);
    if (dst_bf16)
        st((bf16_t*)dst, r * ldd + c, v);
    else
        st((float*)dst, r * ldd + c, v);
}

// Adds dL/dx into dx (w, the affine weight, may be null). dL/dw is norm_dw_partial's.
extern "C" __global__ void norm_bwd(const float* dy, const float* x, const float* mean, const float* rstd,
                                    const float* w, float* dx, int d, int rms) {
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

// dL/dw of an affine norm, sum over rows of dy ∘ (x − mean) · rstd, in two fixed-order stages
// instead of atomics (the same bits on every run): block (tile, chunk), as blockIdx.x = tile +
// tiles · chunk, sums `chunk` rows of 32 columns (a warp per row, a lane per column: coalesced)
// into partial[chunk][column]; norm_dw_sum adds the chunks' partials into dw in chunk order.
// RMSNorm's mean is 0.
extern "C" __global__ void norm_dw_partial(const float* dy, const float* x, const float* mean, const float* rstd,
                                           float* partial, long rows, int d, int chunk) {
    __shared__ float sh[32][33];
    int tiles = (d + 31) / 32, tile = blockIdx.x % tiles, ch = blockIdx.x / tiles;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int col = tile * 32 + lane;
    long r0 = (long)ch * chunk, r1 = min(rows, r0 + chunk);
    float acc = 0.f;
    if (col < d)
        for (long r = r0 + warp; r < r1; r += warps) acc += dy[r * d + col] * (x[r * d + col] - mean[r]) * rstd[r];
    sh[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && col < d) {
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += sh[w][lane];
        partial[(long)ch * d + col] = sum;
    }
}

extern "C" __global__ void norm_dw_sum(const float* partial, float* dw, int chunks, int d) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    float sum = 0.f;
    for (int c = 0; c < chunks; ++c) sum += partial[(long)c * d + col];
    dw[col] += sum;
}

// NeoX rotate-half RoPE in place over the first `heads` heads of each row `stride` wide (q's
// and then k's heads of a fused qkv row), in f32 arithmetic; `inverse` rotates back (the
// backward pass). On f32 rows, or under mixed precision on the bf16 qkv projection and the
// attention's qkv gradient.
template <int V, typename X>
__device__ void rope_at(X* x, const float* cosb, const float* sinb, long rows, int T, int heads, int half,
                        int stride, int inverse) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int hv = half / V;
    if (idx >= rows * heads * hv) return;
    int j = (int)(idx % hv) * V;
    long q = idx / hv;
    int h = q % heads;
    long r = q / heads;
    int t = r % T;
    long at = r * stride + (long)h * 2 * half;
    float a[V], b[V], ra[V], rb[V];
    load_f32<V>(a, x + at + j);
    load_f32<V>(b, x + at + j + half);
#pragma unroll
    for (int k = 0; k < V; ++k) {
        float c = cosb[t * half + j + k], s = sinb[t * half + j + k];
        if (inverse) s = -s;
        ra[k] = a[k] * c - b[k] * s;
        rb[k] = b[k] * c + a[k] * s;
    }
    store_f32<V>(x + at + j, ra);
    store_f32<V>(x + at + j + half, rb);
}

template <typename X>
__device__ void rope_impl(X* x, const float* cosb, const float* sinb, long rows, int T, int heads, int half,
                          int stride, int inverse) {
    if (vec16_ok<X>(half, stride, x))
        rope_at<16 / sizeof(X)>(x, cosb, sinb, rows, T, heads, half, stride, inverse);
    else
        rope_at<1>(x, cosb, sinb, rows, T, heads, half, stride, inverse);
}

extern "C" __global__ void rope(float* x, const float* cosb, const float* sinb, long rows, int T, int heads,
                                int half, int stride, int inverse) {
    rope_impl(x, cosb, sinb, rows, T, heads, half, stride, inverse);
}
extern "C" __global__ void rope_bf16(bf16_t* x, const float* cosb, const float* sinb, long rows, int T, int heads,
                                     int half, int stride, int inverse) {
    rope_impl(x, cosb, sinb, rows, T, heads, half, stride, inverse);
}

// Grouped-query attention: fused [rows, d + 2·kvd] q|k|v rows to the [rows, 3d] rows the
// attention reads, each k and v head repeated for the heads / kv_heads consecutive q heads
// sharing it (OLMo's repeat_interleave), between f32 or (flag set) bf16 buffers.
extern "C" __global__ void kv_repeat(const void* src, int src_bf16, void* dst, int dst_bf16, long rows, int heads,
                                     int kv_heads, int hd) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long d = (long)heads * hd, kvd = (long)kv_heads * hd;
    if (i >= rows * 3 * d) return;
    long r = i / (3 * d), c = i % (3 * d);
    long from = c;
    if (c >= d) {
        long part = c / d - 1, head = c % d / hd, j = c % hd;
        from = d + part * kvd + head / (heads / kv_heads) * hd + j;
    }
    long s = r * (d + 2 * kvd) + from;
    float v = src_bf16 ? ld((const bf16_t*)src, s) : ld((const float*)src, s);
    if (dst_bf16)
        st((bf16_t*)dst, i, v);
    else
        st((float*)dst, i, v);
}

// kv_repeat's transpose, its backward pass: each k and v head's gradient the f32 sum, in head
// order, over the q heads sharing it; q's columns copied.
extern "C" __global__ void kv_sum(const void* src, int src_bf16, void* dst, int dst_bf16, long rows, int heads,
                                  int kv_heads, int hd) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long d = (long)heads * hd, kvd = (long)kv_heads * hd, w = d + 2 * kvd;
    if (i >= rows * w) return;
    long r = i / w, c = i % w;
    int group = c < d ? 1 : heads / kv_heads;
    long from = c;
    if (c >= d) {
        long part = (c - d) / kvd, head = (c - d) % kvd / hd, j = c % hd;
        from = d + part * d + head * group * hd + j;
    }
    float sum = 0.f;
    for (int g = 0; g < group; ++g) {
        long s = r * 3 * d + from + (long)g * hd;
        sum += src_bf16 ? ld((const bf16_t*)src, s) : ld((const float*)src, s);
    }
    if (dst_bf16)
        st((bf16_t*)dst, i, sum);
    else
        st((float*)dst, i, sum);
}

// Causal softmax of f32 scores (rows of length T, row r is position r % T of sequence
// r / (H·T), used as scratch) into P: in place, or under mixed precision into bf16
// probabilities, the PV GEMM's operand, so no f32 copy of P is kept or re-cast. With `starts`
// (each position's document start, [b·T]) a row attends only within its document.
template <typename P>
__device__ void softmax_fwd_impl(float* s, P* p, const unsigned* starts, int T, int H) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    int t = r % T;
    int lo = starts ? (int)starts[r / ((long)H * T) * T + t] : 0;
    float* row = s + r * T;
    P* out = p + r * T;
    float mx = NEG_INF;
    for (int i = lo + threadIdx.x; i <= t; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int i = lo + threadIdx.x; i <= t; i += blockDim.x) {
        float e = expf(row[i] - mx);
        row[i] = e;
        sum += e;
    }
    float inv = 1.f / block_sum(sum, sh);
    for (int i = threadIdx.x; i < T; i += blockDim.x) st(out, i, lo <= i && i <= t ? row[i] * inv : 0.f);
}

extern "C" __global__ void softmax_fwd(float* s, const unsigned* starts, int T, int H) {
    softmax_fwd_impl(s, s, starts, T, H);
}
extern "C" __global__ void softmax_fwd_bf16(float* s, bf16_t* p, const unsigned* starts, int T, int H) {
    softmax_fwd_impl(s, p, starts, T, H);
}

// dS = P * (dP - rowsum(P * dP)) * scale from f32 dP: in place on dP with f32 P, or under mixed
// precision from bf16 P into bf16 dS. A row within a document needs nothing more: its P is 0
// before the document, and so is its dS.
template <typename P>
__device__ void softmax_bwd_impl(const P* p, const float* dp, P* ds, int T, float scale) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    int t = r % T;
    const P* pr = p + r * T;
    const float* dr = dp + r * T;
    P* out = ds + r * T;
    float w = 0.f;
    for (int i = threadIdx.x; i <= t; i += blockDim.x) w += ld(pr, i) * dr[i];
    w = block_sum(w, sh);
    for (int i = threadIdx.x; i < T; i += blockDim.x) st(out, i, i <= t ? ld(pr, i) * (dr[i] - w) * scale : 0.f);
}

extern "C" __global__ void softmax_bwd(const float* p, float* dp, int T, float scale) {
    softmax_bwd_impl(p, dp, dp, T, scale);
}
extern "C" __global__ void softmax_bwd_bf16(const bf16_t* p, const float* dp, bf16_t* ds, int T, float scale) {
    softmax_bwd_impl(p, dp, ds, T, scale);
}

// OLMo's clip_qkv: x clamped to [−c, c] in place, one thread per 32 entries, which records the
// entries it clipped as the bits of one word (entry 32w + i, bit i of word w): torch's clamp
// passes the gradient of the entries within the bounds, ends included. Then the backward, which
// zeroes the gradient of the clipped entries. In f32, or on bf16 GEMM outputs.
template <typename T>
__device__ void clip_qkv_impl(T* x, unsigned* bits, long n, float c) {
    long w = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (w * 32 >= n) return;
    unsigned m = 0;
    for (int i = 0; i < 32 && w * 32 + i < n; ++i) {
        long j = w * 32 + i;
        float v = ld(x, j);
        if (v > c) {
            st(x, j, c);
            m |= 1u << i;
        } else if (v < -c) {
            st(x, j, -c);
            m |= 1u << i;
        }
    }
    bits[w] = m;
}

template <typename T>
__device__ void clip_qkv_bwd_impl(T* dx, const unsigned* bits, long n) {
    long w = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (w * 32 >= n) return;
    unsigned m = bits[w];
    for (int i = 0; i < 32 && w * 32 + i < n; ++i)
        if (m >> i & 1u) st(dx, w * 32 + i, 0.f);
}

extern "C" __global__ void clip_qkv(float* x, unsigned* bits, long n, float c) { clip_qkv_impl(x, bits, n, c); }
extern "C" __global__ void clip_qkv_bf16(bf16_t* x, unsigned* bits, long n, float c) {
    clip_qkv_impl(x, bits, n, c);
}
extern "C" __global__ void clip_qkv_bwd(float* dx, const unsigned* bits, long n) { clip_qkv_bwd_impl(dx, bits, n); }
extern "C" __global__ void clip_qkv_bwd_bf16(bf16_t* dx, const unsigned* bits, long n) {
    clip_qkv_bwd_impl(dx, bits, n);
}

// SwiGLU over [rows, 2h] (value | gate) into [rows, h], and its backward; in f32, or under mixed
// precision on bf16 GEMM outputs into bf16 GEMM operands (arithmetic in f32 either way).
template <int V, typename T>
__device__ void swiglu_fwd_at(const T* x, T* y, long rows, int h) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int hv = h / V;
    if (idx >= rows * hv) return;
    long r = idx / hv;
    int i = (int)(idx % hv) * V;
    float v[V], g[V], out[V];
    load_f32<V>(v, x + r * 2 * h + i);
    load_f32<V>(g, x + r * 2 * h + h + i);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = g[k] / (1.f + expf(-g[k])) * v[k];
    store_f32<V>(y + r * h + i, out);
}

template <int V, typename T>
__device__ void swiglu_bwd_at(const T* dy, const T* x, T* dx, long rows, int h) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int hv = h / V;
    if (idx >= rows * hv) return;
    long r = idx / hv;
    int i = (int)(idx % hv) * V;
    float v[V], g[V], d[V], dv[V], dg[V];
    load_f32<V>(v, x + r * 2 * h + i);
    load_f32<V>(g, x + r * 2 * h + h + i);
    load_f32<V>(d, dy + r * h + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
        float sig = 1.f / (1.f + expf(-g[k]));
        dv[k] = d[k] * g[k] * sig;
        dg[k] = d[k] * v[k] * sig * (1.f + g[k] * (1.f - sig));
    }
    store_f32<V>(dx + r * 2 * h + i, dv);
    store_f32<V>(dx + r * 2 * h + h + i, dg);
}

template <typename T>
__device__ void swiglu_fwd_impl(const T* x, T* y, long rows, int h) {
    if (vec16_ok<T>(h, h, x, y))
        swiglu_fwd_at<16 / sizeof(T)>(x, y, rows, h);
    else
        swiglu_fwd_at<1>(x, y, rows, h);
}

template <typename T>
__device__ void swiglu_bwd_impl(const T* dy, const T* x, T* dx, long rows, int h) {
    if (vec16_ok<T>(h, h, dy, x, dx))
        swiglu_bwd_at<16 / sizeof(T)>(dy, x, dx, rows, h);
    else
        swiglu_bwd_at<1>(dy, x, dx, rows, h);
}

extern "C" __global__ void swiglu_fwd(const float* x, float* y, long rows, int h) {
    swiglu_fwd_impl(x, y, rows, h);
}
extern "C" __global__ void swiglu_fwd_bf16(const bf16_t* x, bf16_t* y, long rows, int h) {
    swiglu_fwd_impl(x, y, rows, h);
}
extern "C" __global__ void swiglu_bwd(const float* dy, const float* x, float* dx, long rows, int h) {
    swiglu_bwd_impl(dy, x, dx, rows, h);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16_t* dy, const bf16_t* x, bf16_t* dx, long rows, int h) {
    swiglu_bwd_impl(dy, x, dx, rows, h);
}

// One block per row: log p(target) and the z-loss term; with `backward`, overwrites the logits
// with gscale * dL/dlogits.
// One block per row: log p(target) and the z-loss term; with `backward`, gscale * dL/dlogits
// over the logits, or, when dlb is not null, into dlb as bf16 (a GEMM operand under mixed
// precision) with the logits left as they are.
extern "C" __global__ void cross_entropy(float* logits, bf16_t* dlb, const unsigned* tgt, float* logp, float* zt,
                                         int V, float zloss, float gscale, int backward) {
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
            for (int i = threadIdx.x; i < V; i += blockDim.x) {
                if (dlb)
                    dlb[r * V + i] = 0;
                else
                    row[i] = 0.f;
            }
        return;
    }
    float xt = row[t];
    // One pass for the max and the sum of exponentials (each thread rescales its running sum
    // when its max grows), not two: the logits are the largest tensor of the step.
    float mt = NEG_INF, st = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = row[i];
        if (v > mt) {
            st = st * expf(mt - v) + 1.f;
            mt = v;
        } else {
            st += expf(v - mt);
        }
    }
    float mx = block_max(mt, sh);
    float sum = block_sum(mt == NEG_INF ? 0.f : st * expf(mt - mx), sh);
    float lse = mx + logf(sum);
    if (threadIdx.x == 0) {
        logp[r] = xt - lse;
        zt[r] = zloss * lse * lse;
    }
    if (backward) {
        float zc = 1.f + 2.f * zloss * lse;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float g = expf(row[i] - lse) * zc * gscale;
            if (i == (int)t) g -= gscale;
            if (dlb)
                dlb[r * V + i] = f2bf(g);
            else
                row[i] = g;
        }
    }
}

template <int V>
__device__ void cast_bf16_at(const float* x, bf16_t* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n / V) return;
    float f[V];
    load_f32<V>(f, x + i * V);
    store_f32<V>(y + i * V, f);
}

// 8 elements a thread (two f32 vectors into one bf16 vector) where they split so.
extern "C" __global__ void cast_bf16(const float* x, bf16_t* y, long n) {
    if (vec16_ok<bf16_t>(n, n, x, y))
        cast_bf16_at<8>(x, y, n);
    else
        cast_bf16_at<1>(x, y, n);
}

// Each block's part of the sum of squares, into partial[blockIdx.x]; the host adds the parts
// in order (no atomics: the same bits on every run).
extern "C" __global__ void sumsq(const float* x, long n, double* partial) {
    __shared__ float sh[33];
    float s = 0.f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += x[i] * x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = (double)s;
}

// AdamW as torch computes it, on gradients scaled by the clipping coefficient. With `pb` not
// null it also writes the bf16 copy of the new weights (the next step's GEMM operands), saving
// a pass that would read them all again.
extern "C" __global__ void adamw(float* p, bf16_t* pb, const float* g, float* m, float* v, long n, float lr,
                                 float b1, float b2, float eps, float wd, float bc1, float bc2_sqrt, float coef) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * coef;
    float pi = p[i] * (1.f - lr * wd);
    float mi = m[i] + (gi - m[i]) * (1.f - b1);
    float vi = v[i] * b2 + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float np = pi - (lr / bc1) * mi / (sqrtf(vi) / bc2_sqrt + eps);
    p[i] = np;
    if (pb) pb[i] = f2bf(np);
}

// OLMo's LionW on gradients scaled by the clipping coefficient: decoupled weight decay, a step
// of lr along the sign of b1·m + (1 − b1)·g (torch.sign: 0 at 0), then m ← b2·m + (1 − b2)·g;
// with `pb` not null, the bf16 copy of the new weights too, as adamw.
extern "C" __global__ void lionw(float* p, bf16_t* pb, const float* g, float* m, long n, float lr, float b1,
                                 float b2, float wd, float coef) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * coef;
    float pi = p[i] * (1.f - lr * wd);
    float u = m[i] * b1 + gi * (1.f - b1);
    float s = u > 0.f ? 1.f : (u < 0.f ? -1.f : u * 0.f);
    float np = pi - lr * s;
    m[i] = m[i] * b2 + gi * (1.f - b2);
    p[i] = np;
    if (pb) pb[i] = f2bf(np);
}

// ---- Flash attention: causal attention on bf16 tensor cores without the T×T matrices ----
//
// FlashAttention-2's schedule with one warp per 16 rows and mma.sync m16n8k16 (bf16 in, f32
// accumulate). Fragment layouts (PTX ISA, "mma.m16n8k16"), with g = lane/4 and c = lane%4:
// A (16×16, row major), four 32-bit registers of two bf16 (low half first): (g, 2c..2c+1),
// (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..); B (16×8, k × n): (k 2c..2c+1, n g), (k 2c+8.., n g);
// C (16×8 f32): (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1). An accumulator pair of 8-wide
// tiles is thus, packed to bf16, the A operand of the next product, as FlashAttention does.
// qkv is the bf16 `[b·T, 3·d]` row block (q | k | v, head h at columns h·HD), dO the bf16
// `[b·T, d]` output gradient; the output and the qkv gradient (GEMM operands next) are bf16,
// the statistics f32. Rows past T read as zeros and
// are not written. The backward recomputes P in two kernels (dQ over query blocks, dK and dV
// over key blocks), which needs no atomics, so it is deterministic.

// The flash kernels' instructions (bf16 mma.sync, cp.async) need sm_80. Before Ampere they
// compile to a trap, so that the other kernels still build there (the fp32 engine runs on a
// Turing GPU); the engine never launches the flash kernels on such a GPU.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PRE_AMPERE 1
#else
#define PRE_AMPERE 0
#endif

#ifndef MMA_BF16_16816
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
#if PRE_AMPERE
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16);
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// A shared tile of `rows` rows of HD bf16, as 32-bit words, padded by 8 bf16 per row so that
// the fragment loads of a warp (rows g, words c) fall in distinct banks.
template <int HD>
struct Tile {
    static constexpr int W = (HD + 8) / 2;  // words per row
};

#ifndef CP_ASYNC
// cp.async.cg (sm_80+): 16 bytes from global to shared memory without a trip through
// registers, zeros when !valid (the source address must still be a readable one). The copy
// is complete at a cp.async.wait_group that its group (cp.async.commit_group) falls under.
__device__ __forceinline__ void cp_async16(unsigned* dst, const bf16_t* src, bool valid) {
#if PRE_AMPERE
    __trap();
#else
    asm volatile(
        "{\n .reg .u64 s64, g64;\n .reg .u32 s32;\n cvta.to.shared.u64 s64, %0;\n cvt.u32.u64 s32, s64;\n"
        " cvta.to.global.u64 g64, %1;\n cp.async.cg.shared.global [s32], [g64], 16, %2;\n}\n"
        :
        : "l"(dst), "l"(src), "r"(valid ? 16 : 0)
        : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if !PRE_AMPERE
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !PRE_AMPERE
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// Starts copying rows [r0, r0 + rows) of a bf16 matrix (row stride `ld` elements, starting at
// column 0 of `src`) into a tile, 16 bytes per copy; rows at or past `limit` become zeros. The
// rows (of q, k, v or dO: ld and the head's offset are multiples of 8) are 16-byte aligned.
// The caller commits the group and waits for it before a barrier and the tile's first use.
template <int HD>
__device__ __forceinline__ void tile_load_async(unsigned* tile, const bf16_t* src, long ld, int r0, int rows,
                                                int limit) {
    constexpr int VR = HD / 8, W = Tile<HD>::W;
    for (int i = threadIdx.x; i < rows * VR; i += blockDim.x) {
        int r = i / VR, v = i % VR;
        bool in = r0 + r < limit;
        cp_async16(tile + r * W + v * 4, src + (long)(in ? r0 + r : 0) * ld + v * 8, in);
    }
}

#ifndef LDMATRIX_X4
// ldmatrix .x4: lanes 8i..8i+7 give the addresses of rows 0..7 (16 bytes each, 16-byte
// aligned) of 8×8 bf16 matrix i; each lane receives in r[i] matrix i's elements (g, 2c) and
// (g, 2c + 1), the layout of an mma A or B fragment register. With .trans (`Trans`), (2c, g)
// and (2c + 1, g), the transposed pair: a B fragment register from a row-major k × n tile.
#define LDMATRIX_X4_ASM(trans)                                                                   \
    "{\n .reg .u64 a64;\n .reg .u32 a32;\n cvta.to.shared.u64 a64, %4;\n cvt.u32.u64 a32, a64;\n" \
    " ldmatrix.sync.aligned.m8n8.x4" trans ".shared.b16 {%0,%1,%2,%3}, [a32];\n}\n"
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const unsigned* row) {
#if PRE_AMPERE  // ldmatrix itself needs sm_75, and only the flash kernels use it
    __trap();
#else
    if (Trans)
        asm volatile(LDMATRIX_X4_ASM(".trans") : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(row));
    else
        asm volatile(LDMATRIX_X4_ASM("") : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(row));
#endif
}
#endif

// The B fragments of k rows k0..k0+15 and n columns n0..n0+15 of a row-major tile (the tile's
// rows are the k dimension): b[0..1] for columns n0..n0+7, b[2..3] for n0+8..n0+15. One
// ldmatrix.trans instead of eight 16-bit gathers.
template <int HD>
__device__ __forceinline__ void tile_column_frags(unsigned* b, const unsigned* tile, int k0, int n0) {
    int lane = threadIdx.x & 31, m = lane >> 3;
    int row = k0 + (m & 1) * 8 + (lane & 7), col = n0 + (m >> 1) * 8;
    ldmatrix_x4<true>(b, tile + row * Tile<HD>::W + (col >> 1));
}

// Two bf16 at (row, col), (row, col + 1) of a global bf16 matrix, zeros past `limit` rows.
__device__ __forceinline__ unsigned global_pair(const bf16_t* m, long ld, int row, int col, int limit) {
    return row < limit ? *(const unsigned*)(m + (long)row * ld + col) : 0u;
}

// The A fragments of 16 rows (from r0) of a global bf16 matrix, HD columns.
template <int HD>
__device__ __forceinline__ void global_a_frags(unsigned (*f)[4], const bf16_t* m, long ld, int r0, int limit) {
    int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    #pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        int col = kk * 16 + 2 * c;
        f[kk][0] = global_pair(m, ld, r0 + g, col, limit);
        f[kk][1] = global_pair(m, ld, r0 + g + 8, col, limit);
        f[kk][2] = global_pair(m, ld, r0 + g, col + 8, limit);
        f[kk][3] = global_pair(m, ld, r0 + g + 8, col + 8, limit);
    }
}

// The A fragment of k-step kk from accumulator tiles (2kk, 2kk + 1), packed to bf16.
__device__ __forceinline__ void acc_to_a(unsigned* a, const float (*s)[4], int kk) {
    a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// The B fragments of n rows n0..n0+15 and k columns k0..k0+15 of a tile whose rows are the n
// dimension (K in S = Q Kᵀ, V in dP = dO Vᵀ, ...): b[0..1] for rows n0..n0+7, b[2..3] for
// n0+8..n0+15. One ldmatrix instead of four 32-bit loads.
template <int HD>
__device__ __forceinline__ void tile_row_frags(unsigned* b, const unsigned* tile, int n0, int k0) {
    int lane = threadIdx.x & 31, m = lane >> 3;
    int row = n0 + (m >> 1) * 8 + (lane & 7), col = k0 + (m & 1) * 8;
    ldmatrix_x4<false>(b, tile + row * Tile<HD>::W + (col >> 1));
}

// s = A tileᵀ for this warp's 16 rows: A as HD/16 register fragments (q or dO rows; k or v
// rows in dK/dV), the tile's NT·8 rows the n dimension (S = Q Kᵀ, dP = dO Vᵀ; Sᵀ = K Qᵀ,
// dPᵀ = V dOᵀ).
template <int HD, int NT>
__device__ __forceinline__ void frags_times_tile(float (*s)[4], const unsigned (*af)[4], const unsigned* tile) {
    #pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        s[nt + 1][0] = s[nt + 1][1] = s[nt + 1][2] = s[nt + 1][3] = 0.f;
        #pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            unsigned bf[4];
            tile_row_frags<HD>(bf, tile, nt * 8, kk * 16);
            mma_bf16_16816(s[nt], af[kk], bf);
            mma_bf16_16816(s[nt + 1], af[kk], bf + 2);
        }
    }
}

// out += s tile: s an accumulator of this warp's 16 rows × KS·16 (P or dS, packed to bf16 as
// the A operand), the tile's KS·16 rows the k dimension (O += P V, dQ += dS K, ...).
template <int HD, int KS>
__device__ __forceinline__ void acc_times_tile(float (*out)[4], const float (*s)[4], const unsigned* tile) {
    #pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        unsigned a[4];
        acc_to_a(a, s, kk);
        #pragma unroll
        for (int nt = 0; nt < HD / 8; nt += 2) {
            unsigned bf[4];
            tile_column_frags<HD>(bf, tile, kk * 16, nt * 8);
            mma_bf16_16816(out[nt], a, bf);
            mma_bf16_16816(out[nt + 1], a, bf + 2);
        }
    }
}

// Scores are kept in base 2 (s·scale·log2 e), so that each exponential is one exp2.
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// The k head that q head h of H reads in fused q|k|v rows (d = H·HD of q, then KV k heads and
// KV v heads): under grouped-query attention q heads j·H/KV .. (j + 1)·H/KV − 1 share k and v
// head j (KV = H is multi-head attention). The v head is KV·HD further on.
__device__ __forceinline__ const bf16_t* kv_head(const bf16_t* row, long d, int h, int H, int KV, int HD) {
    return row + d + (long)(h / (H / KV)) * HD;
}

// Forward: blocks of 16·WARPS query rows (16 per warp), key tiles of 64. out: bf16 [b·T, d]
// (only a GEMM operand from here on); lse: [b·H·T], natural log. K and V have a tile buffer
// each and load while the other is in use, as FlashAttention-2 does: V(j) during S = Q K(j)ᵀ
// and the softmax, K(j + 1) during O += P V(j). Each warp's arithmetic does not depend on
// WARPS: a key tile past all of a warp's rows (the block's later rows reach it) leaves its m,
// l and o unchanged, bit for bit (a correction of exp2(0) = 1 and probabilities of 0), so both
// block sizes give the same bits and the engine may run whichever is faster.
// With `starts` (each position's document start, [b·T]) a row attends only within its
// document: the key tiles before the block's first row's document are skipped (starts rise
// along a sequence, so that is the block's earliest), and a tile wholly before a row's
// document leaves its m, l and o unchanged too (m = −∞ then takes 0 as the exponent's base).
template <int HD, int WARPS>
__device__ void flash_fwd_impl(const bf16_t* qkv, bf16_t* out, float* lse, int T, int H, int KV, float scale,
                               const unsigned* starts) {
    constexpr int BR = 16 * WARPS, BC = 64, W = Tile<HD>::W;
    __shared__ __align__(16) unsigned ks[BC * W];
    __shared__ __align__(16) unsigned vs[BC * W];
    int nqb = (T + BR - 1) / BR;
    // The longest rows (last query blocks) of every head first, so the short ones fill the tail.
    int nbh = gridDim.x / nqb, bh = blockIdx.x % nbh, qb = nqb - 1 - blockIdx.x / nbh;
    int b = bh / H, h = bh % H;
    long d = (long)H * HD, ld = d + 2L * KV * HD;
    const bf16_t* row0 = qkv + (long)b * T * ld;
    const bf16_t* q = row0 + h * HD;
    const bf16_t* k = kv_head(row0, d, h, H, KV, HD);
    const bf16_t* v = k + (long)KV * HD;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    int r0 = qb * BR + warp * 16;
    int kend = min(T, qb * BR + BR), tiles = (kend + BC - 1) / BC;
    const float sl2 = scale * LOG2E;
    const unsigned* sb = starts ? starts + (long)b * T : nullptr;
    int lo[2] = {0, 0};
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        int row = r0 + g + 8 * rr;
        if (sb && row < T) lo[rr] = sb[row];
    }
    int j0 = sb ? (int)sb[qb * BR] / BC : 0;
    tile_load_async<HD>(ks, k, ld, j0 * BC, BC, T);
    cp_async_commit();
    unsigned qf[HD / 16][4];
    global_a_frags<HD>(qf, q, ld, r0, T);
    float o[HD / 8][4];
    #pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    for (int j = j0; j < tiles; ++j) {
        int k0 = j * BC;
        // K(j) has landed and every warp is done with V(j − 1).
        cp_async_wait<0>();
        __syncthreads();
        tile_load_async<HD>(vs, v, ld, k0, BC, T);
        cp_async_commit();
        float s[BC / 8][4];
        frags_times_tile<HD, BC / 8>(s, qf, ks);
        // Only a tile with keys past this warp's first row needs the causal mask. Keys past T
        // are past every row < T (rows past T are not written).
        bool masked = k0 + BC - 1 > r0;
        #pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            int row = r0 + g + 8 * rr;
            bool before = k0 < lo[rr];  // keys before the row's document in this tile
            float mx = m[rr];
            #pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int key = k0 + nt * 8 + 2 * c + e;
                    float x = s[nt][2 * rr + e] * sl2;
                    if ((masked && key > row) || (before && key < lo[rr])) x = NEG_INF;
                    s[nt][2 * rr + e] = x;
                    mx = fmaxf(mx, x);
                }
            mx = quad_max(mx);
            // Without documents every row of a block sees key k0 <= row and mx is finite; a
            // row whose document starts past this tile has seen no key yet.
            float base = mx == NEG_INF ? 0.f : mx;
            float corr = exp2f(m[rr] - base);
            l[rr] *= corr;
            #pragma unroll
            for (int nt = 0; nt < HD / 8; ++nt) o[nt][2 * rr] *= corr, o[nt][2 * rr + 1] *= corr;
            #pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float p = exp2f(s[nt][2 * rr + e] - base);
                    s[nt][2 * rr + e] = p;
                    l[rr] += p;
                }
            m[rr] = mx;
        }
        // V(j) has landed and every warp is done with K(j).
        cp_async_wait<0>();
        __syncthreads();
        if (j + 1 < tiles) {
            tile_load_async<HD>(ks, k, ld, k0 + BC, BC, T);
            cp_async_commit();
        }
        acc_times_tile<HD, BC / 16>(o, s, vs);
    }
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float sum = quad_sum(l[rr]);
        int row = r0 + g + 8 * rr;
        if (row >= T) continue;
        // Two bf16 per 32-bit store (the column 2c is even, rows and heads start 4-byte aligned).
        bf16_t* orow = out + ((long)b * T + row) * d + h * HD;
        float inv = 1.f / sum;
        #pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt)
            *(unsigned*)(orow + nt * 8 + 2 * c) = pack_bf16(o[nt][2 * rr] * inv, o[nt][2 * rr + 1] * inv);
        if (c == 0) lse[(long)bh * T + row] = (m[rr] + log2f(sum)) * LN2;
    }
}

// D = rowsum(dO ∘ O) per (row, head) from the bf16 dO and O, one warp each:
// dsum[(b·H + h)·T + t].
extern "C" __global__ void flash_bwd_pre(const bf16_t* dout, const bf16_t* out, float* dsum, long rows, int T, int H,
                                         int hd) {
    long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (w >= rows * H) return;
    long row = w / H;
    int h = w % H;
    const bf16_t* a = dout + row * H * hd + h * hd;
    const bf16_t* o = out + row * H * hd + h * hd;
    float s = 0.f;
    for (int i = lane; i < hd; i += 32) s += bf2f(a[i]) * bf2f(o[i]);
    for (int x = 16; x > 0; x >>= 1) s += __shfl_xor_sync(0xffffffffu, s, x);
    if (lane == 0) {
        long b = row / T, t = row % T;
        dsum[(b * H + h) * T + t] = s;
    }
}

// dQ: blocks of 16·WARPS query rows (16 per warp), key tiles of 32 (two buffers each of K and
// V: tile j + 1 loads while tile j is in use); writes the q part of dqkv. As in the forward,
// the bits do not depend on WARPS (a tile past a warp's rows adds dS = ±0 to its dQ). Within
// documents (`starts`), the key tiles before the block's first row's document are skipped.
template <int HD, int WARPS>
__device__ void flash_dq_impl(const bf16_t* qkv, const bf16_t* dout, const float* lse, const float* dsum,
                              bf16_t* dqkv, int T, int H, int KV, float scale, const unsigned* starts) {
    constexpr int BR = 16 * WARPS, BC = 32, W = Tile<HD>::W;
    __shared__ __align__(16) unsigned ks[2][BC * W];
    __shared__ __align__(16) unsigned vs[2][BC * W];
    int nqb = (T + BR - 1) / BR;
    int nbh = gridDim.x / nqb, bh = blockIdx.x % nbh, qb = nqb - 1 - blockIdx.x / nbh;
    int b = bh / H, h = bh % H;
    long d = (long)H * HD, ld = d + 2L * KV * HD;
    const bf16_t* row0 = qkv + (long)b * T * ld;
    const bf16_t* q = row0 + h * HD;
    const bf16_t* k = kv_head(row0, d, h, H, KV, HD);
    const bf16_t* v = k + (long)KV * HD;
    const bf16_t* dob = dout + (long)b * T * d + h * HD;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    int r0 = qb * BR + warp * 16;
    int kend = min(T, qb * BR + BR), tiles = (kend + BC - 1) / BC;
    const float sl2 = scale * LOG2E;
    const unsigned* sb = starts ? starts + (long)b * T : nullptr;
    int j0 = sb ? (int)sb[qb * BR] / BC : 0;
    tile_load_async<HD>(ks[0], k, ld, j0 * BC, BC, T);
    tile_load_async<HD>(vs[0], v, ld, j0 * BC, BC, T);
    cp_async_commit();
    unsigned qf[HD / 16][4], df[HD / 16][4];
    global_a_frags<HD>(qf, q, ld, r0, T);
    global_a_frags<HD>(df, dob, d, r0, T);
    // Rows past T read q = dO = 0 and lse = D = 0, so their dS is 0 (and they are not written).
    float lr[2], dr[2];
    int lo[2];
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        int row = r0 + g + 8 * rr;
        lr[rr] = row < T ? lse[(long)bh * T + row] * LOG2E : 0.f;
        dr[rr] = row < T ? dsum[(long)bh * T + row] : 0.f;
        lo[rr] = sb && row < T ? (int)sb[row] : 0;
    }
    float dq[HD / 8][4];
    #pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
    for (int j = j0; j < tiles; ++j) {
        int k0 = j * BC, buf = (j - j0) & 1;
        // Tile j has landed and every warp is done with tile j − 1, whose buffers take j + 1.
        cp_async_wait<0>();
        __syncthreads();
        if (j + 1 < tiles) {
            tile_load_async<HD>(ks[buf ^ 1], k, ld, k0 + BC, BC, T);
            tile_load_async<HD>(vs[buf ^ 1], v, ld, k0 + BC, BC, T);
            cp_async_commit();
        }
        float s[BC / 8][4], dp[BC / 8][4];
        frags_times_tile<HD, BC / 8>(s, qf, ks[buf]);
        frags_times_tile<HD, BC / 8>(dp, df, vs[buf]);
        // dS = P ∘ (dP − D), P recomputed from the saved log-sum-exp.
        bool masked = k0 + BC - 1 > r0;
        #pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int rr = i >> 1, row = r0 + g + 8 * rr, key = k0 + nt * 8 + 2 * c + (i & 1);
                bool out = (masked && key > row) || (sb && key < lo[rr]);
                float p = out ? 0.f : exp2f(s[nt][i] * sl2 - lr[rr]);
                s[nt][i] = p * (dp[nt][i] - dr[rr]);
            }
        acc_times_tile<HD, BC / 16>(dq, s, ks[buf]);
    }
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        int row = r0 + g + 8 * rr;
        if (row >= T) continue;
        bf16_t* dst = dqkv + ((long)b * T + row) * ld + h * HD;
        #pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt)
            *(unsigned*)(dst + nt * 8 + 2 * c) = pack_bf16(dq[nt][2 * rr] * scale, dq[nt][2 * rr + 1] * scale);
    }
}

// dK and dV: blocks of 16·WARPS keys (16 per warp), query tiles of 32; writes the k and v parts
// of dqkv. Each warp keeps its 16 rows of K and V in registers as A fragments (loaded once;
// from shared memory they would cost one ldmatrix per four mma in Sᵀ = K Qᵀ and dPᵀ = V dOᵀ,
// a fifth of the kernel's shared-memory reads; ptxas: 255 registers at HD 128, and a few
// bytes of spill). Q, dO and the queries' statistics have two buffers each, as K and V in
// dQ: tile j + 1 loads while tile j is in use, with one barrier a tile. A block is one kv
// head's keys: under grouped-query attention it goes through the query tiles of each of the
// H/KV q heads that read them in turn (one pipeline across them), summing their dK and dV in
// f32, so no per-q-head copy is made or summed afterwards. Each warp sees the same query tiles
// in the same order whatever WARPS (a block's first tile of each head, before a later warp's
// keys, adds ±0), so both block sizes give the same bits. Within documents (`starts`), a
// query whose document starts after a key gives it P = 0, and the query tiles past the
// block's documents are not visited (starts rise along a sequence). A warp whose keys'
// documents end sooner than its block's sees trailing tiles of P = dS = 0, which leave its
// sums' bits as they are (sums begun at +0 never reach −0), so both block sizes still give the
// same bits.
template <int HD, int WARPS>
__device__ void flash_dkdv_impl(const bf16_t* qkv, const bf16_t* dout, const float* lse, const float* dsum,
                                bf16_t* dqkv, int T, int H, int KV, float scale, const unsigned* starts) {
    constexpr int BK = 16 * WARPS, BQ = 32, W = Tile<HD>::W;
    __shared__ __align__(16) unsigned qs[2][BQ * W];
    __shared__ __align__(16) unsigned dos[2][BQ * W];
    __shared__ float ls[2][BQ];
    __shared__ float dd[2][BQ];
    __shared__ int qs0[2][BQ];
    int nkb = (T + BK - 1) / BK;
    // The first keys (seen by the most queries) of every kv head first.
    int nbh = gridDim.x / nkb, bkv = blockIdx.x % nbh, kb = blockIdx.x / nbh;
    int b = bkv / KV, kh = bkv % KV, group = H / KV;
    long d = (long)H * HD, kvd = (long)KV * HD, ld = d + 2 * kvd;
    const bf16_t* row0 = qkv + (long)b * T * ld;
    const bf16_t* k = row0 + d + kh * HD;
    const bf16_t* v = k + kvd;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    int kr = warp * 16;  // this warp's first key row in the tile
    const float sl2 = scale * LOG2E;
    const unsigned* sb = starts ? starts + (long)b * T : nullptr;
    // Starts loading query tile q0 of the group's q head `hi` into buffer buf: Q and dO by
    // cp.async, the log-sum-exp (base 2) and D by plain stores. Queries past T read q = dO = 0
    // and lse = D = 0: P = 1 but dS = 0, and both products with their (zero) rows vanish.
    auto load_tile = [&](int hi, int q0, int buf) {
        int h = kh * group + hi;
        long st = ((long)b * H + h) * T;
        tile_load_async<HD>(qs[buf], row0 + h * HD, ld, q0, BQ, T);
        tile_load_async<HD>(dos[buf], dout + (long)b * T * d + h * HD, d, q0, BQ, T);
        cp_async_commit();
        for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            ls[buf][i] = q0 + i < T ? lse[st + q0 + i] * LOG2E : 0.f;
            dd[buf][i] = q0 + i < T ? dsum[st + q0 + i] : 0.f;
            qs0[buf][i] = sb && q0 + i < T ? (int)sb[q0 + i] : 0;
        }
    };
    load_tile(0, kb * BK, 0);
    unsigned kf[HD / 16][4], vf[HD / 16][4];
    global_a_frags<HD>(kf, k, ld, kb * BK + kr, T);
    global_a_frags<HD>(vf, v, ld, kb * BK + kr, T);
    float dk[HD / 8][4], dv[HD / 8][4];
    #pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) dk[nt][i] = dv[nt][i] = 0.f;
    // whether query tile q holds a query that sees one of the block's keys
    const int last_key = kb * BK + BK - 1;
    auto sees = [&](int q) { return q < T && !(sb && (int)sb[q] > last_key); };
    // The query tiles of each q head in turn, one pipeline across them: the tile after a head's
    // last is the next head's first.
    int buf = 0;
    #pragma unroll 1
    for (int hi = 0; hi < group; ++hi) {
        for (int q0 = kb * BK; sees(q0); q0 += BQ, buf ^= 1) {
            // Tile j has landed and every warp is done with tile j − 1, whose buffers take j + 1.
            cp_async_wait<0>();
            __syncthreads();
            if (sees(q0 + BQ)) load_tile(hi, q0 + BQ, buf ^ 1);
            else if (hi + 1 < group) load_tile(hi + 1, kb * BK, buf ^ 1);
            float s[BQ / 8][4], dp[BQ / 8][4];
            frags_times_tile<HD, BQ / 8>(dp, vf, dos[buf]);  // dPᵀ = V dOᵀ
            frags_times_tile<HD, BQ / 8>(s, kf, qs[buf]);    // Sᵀ = K Qᵀ
            bool masked = q0 < kb * BK + kr + 15;
            #pragma unroll
            for (int nt = 0; nt < BQ / 8; ++nt)
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    int key = kb * BK + kr + g + 8 * (i >> 1), qi = nt * 8 + 2 * c + (i & 1);
                    bool out = (masked && q0 + qi < key) || (sb && key < qs0[buf][qi]);
                    float p = out ? 0.f : exp2f(s[nt][i] * sl2 - ls[buf][qi]);
                    s[nt][i] = p;
                    dp[nt][i] = p * (dp[nt][i] - dd[buf][qi]);
                }
            acc_times_tile<HD, BQ / 16>(dv, s, dos[buf]);  // dV += Pᵀ dO
            acc_times_tile<HD, BQ / 16>(dk, dp, qs[buf]);  // dK += dSᵀ Q (scaled at the end)
        }
    }
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        int key = kb * BK + kr + g + 8 * rr;
        if (key >= T) continue;
        bf16_t* dst = dqkv + ((long)b * T + key) * ld + d + kh * HD;
        #pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            *(unsigned*)(dst + nt * 8 + 2 * c) = pack_bf16(dk[nt][2 * rr] * scale, dk[nt][2 * rr + 1] * scale);
            *(unsigned*)(dst + kvd + nt * 8 + 2 * c) = pack_bf16(dv[nt][2 * rr], dv[nt][2 * rr + 1]);
        }
    }
}

// Two block sizes of each kernel, with the same bits: the engine times both on the first
// launch for a shape and keeps the faster. flash_<kind>_<HD>[_wide] runs flash_<kind>_impl
// with WARPS warps a block (the engine's `flash_warps`).
#define FLASH_FWD(HD, SUFFIX, WARPS)                                                                        \
    extern "C" __global__ void flash_fwd_##HD##SUFFIX(const bf16_t* qkv, bf16_t* out, float* lse, int T,   \
                                                      int H, int KV, float scale, const unsigned* starts) { \
        flash_fwd_impl<HD, WARPS>(qkv, out, lse, T, H, KV, scale, starts);                                  \
    }
#define FLASH_BWD(KIND, HD, SUFFIX, WARPS)                                                                  \
    extern "C" __global__ void flash_##KIND##_##HD##SUFFIX(const bf16_t* qkv, const bf16_t* dout,          \
                                                           const float* lse, const float* dsum,             \
                                                           bf16_t* dqkv, int T, int H, int KV, float scale, \
                                                           const unsigned* starts) {                        \
        flash_##KIND##_impl<HD, WARPS>(qkv, dout, lse, dsum, dqkv, T, H, KV, scale, starts);                \
    }
#define FLASH_KERNELS(HD)                                                                                   \
    FLASH_FWD(HD, , 4)                                                                                      \
    FLASH_FWD(HD, _wide, 8)                                                                                 \
    FLASH_BWD(dq, HD, , 4)                                                                                  \
    FLASH_BWD(dq, HD, _wide, 8)                                                                             \
    FLASH_BWD(dkdv, HD, , 2)                                                                                \
    FLASH_BWD(dkdv, HD, _wide, 4)
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(128)
