// A stand-in for libcuda.so (and, built into the same file, libcublas.so) that runs the CUDA
// engine's real GPU code path on the host: cudarc's driver calls, the engine's launches with
// their packed argument arrays, its allocations, copies, events and cuBLAS calls.
//
// "Device" memory is host memory (a CUdeviceptr is a host address), allocated 256-byte aligned
// and filled with 0xFF bytes (NaN as f32 and bf16), so a read of memory nothing wrote shows.
// Every copy and memset must lie inside one live allocation. Modules are the PTX NVRTC made:
// a function exists only if the PTX has its `.entry` and the emulation layer has the kernel,
// which then runs on the host (cuda_emulation.hpp, one thread per CUDA thread) with the
// launch's grid, block and arguments. Work runs when issued, so every stream is synchronous.

#include <chrono>
#include <map>
#include <set>
#include <tuple>
#include <utility>

#include "cuda_emulation.hpp"

namespace {

enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NO_BINARY_FOR_GPU = 209,
    UNSUPPORTED_PTX_VERSION = 222,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

int fail(int code, const char* what, const char* detail = "") {
    fprintf(stderr, "cuda stand-in: %s%s\n", what, detail);
    return code;
}

std::mutex g_mem;
std::map<uintptr_t, size_t> g_allocs;  // base -> bytes
size_t g_used = 0, g_used_high = 0;     // bytes allocated now, and at most
bool g_trace = std::getenv("CUDA_STANDIN_TRACE") != nullptr;

// Whether [p, p + n) lies in one live allocation.
bool inside(uintptr_t p, size_t n) {
    std::lock_guard<std::mutex> l(g_mem);
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

template <typename... A, size_t... I>
std::function<void()> bind_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> args{*static_cast<std::decay_t<A>*>(p[I])...};
    return [f, args] { std::apply(f, args); };
}

// A kernel's launch with its arguments unpacked by the kernel's own parameter types.
template <typename... A>
std::function<void()> bind(void (*f)(A...), void** p) {
    return bind_impl(f, p, std::index_sequence_for<A...>{});
}

using Binder = std::function<void()> (*)(void**);
#define K(name) {#name, [](void** p) { return bind(&name, p); }}
const std::map<std::string, Binder> g_kernels = {
    K(embed_fwd),        K(embed_bwd),        K(norm_fwd),        K(norm_bwd),
    K(norm_dw_partial),  K(norm_dw_sum),
    K(rope),             K(rope_bf16),        K(softmax_fwd),     K(softmax_bwd),
    K(softmax_fwd_bf16), K(softmax_bwd_bf16), K(swiglu_fwd),      K(swiglu_bwd),
    K(swiglu_fwd_bf16),  K(swiglu_bwd_bf16),  K(cross_entropy),   K(cast_bf16),
    K(sumsq),            K(adamw),            K(flash_bwd_pre),   K(flash_fwd_32),
    K(flash_dq_32),      K(flash_dkdv_32),    K(flash_fwd_64),    K(flash_dq_64),
    K(flash_dkdv_64),    K(flash_fwd_128),    K(flash_dq_128),    K(flash_dkdv_128),
    K(flash_fwd_32_wide),  K(flash_dq_32_wide),  K(flash_dkdv_32_wide),  K(flash_fwd_64_wide),
    K(flash_dq_64_wide),   K(flash_dkdv_64_wide), K(flash_fwd_128_wide), K(flash_dq_128_wide),
    K(flash_dkdv_128_wide),
    K(clip_qkv),         K(clip_qkv_bf16),    K(clip_qkv_bwd),    K(clip_qkv_bwd_bf16),
    K(lionw),            K(norm_add_fwd),     K(cols_copy),       K(kv_repeat),
    K(kv_sum),
};
#undef K

// Kernels with no barriers, shuffles or warp-wide instructions run their threads serially
// (the emulation aborts if one does use them).
const std::set<std::string> g_serial_kernels = {
    "embed_fwd", "embed_bwd", "norm_dw_sum", "rope",       "rope_bf16",       "swiglu_fwd", "swiglu_bwd",
    "swiglu_fwd_bf16", "swiglu_bwd_bf16", "cast_bf16", "adamw", "clip_qkv", "clip_qkv_bf16",
    "clip_qkv_bwd", "clip_qkv_bwd_bf16", "lionw", "cols_copy", "kv_repeat", "kv_sum",
};

struct Module {
    std::set<std::string> entries;
};
struct Function {
    std::string name;
    Binder bind;
};
struct Event {
    std::chrono::steady_clock::time_point at;
    unsigned flags;
};

int g_ctx_token;  // the primary context's handle

// The kernels of a CUBIN: an ELF64 whose sections `.text.<kernel>` hold them.
bool cubin_kernels(const unsigned char* elf, std::set<std::string>& out) {
    auto u16 = [&](size_t at) { uint16_t v; std::memcpy(&v, elf + at, 2); return (size_t)v; };
    auto u32 = [&](size_t at) { uint32_t v; std::memcpy(&v, elf + at, 4); return (size_t)v; };
    auto u64 = [&](size_t at) { uint64_t v; std::memcpy(&v, elf + at, 8); return (size_t)v; };
    if (elf[4] != 2 || elf[5] != 1) return false;  // ELFCLASS64, little-endian
    size_t shoff = u64(0x28), shentsize = u16(0x3a), shnum = u16(0x3c), shstrndx = u16(0x3e);
    if (shentsize != 64 || shstrndx >= shnum) return false;
    const char* names = reinterpret_cast<const char*>(elf + u64(shoff + shstrndx * 64 + 24));
    for (size_t i = 0; i < shnum; ++i) {
        std::string name(names + u32(shoff + i * 64));
        if (name.rfind(".text.", 0) == 0) out.insert(name.substr(6));
    }
    return true;
}

}  // namespace

extern "C" {

// ---- the driver ----

int cuInit(unsigned) { return SUCCESS; }
int cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
// One device, or CUDA_STANDIN_DEVICES of them (for one process per rank); all the same.
int cuDeviceGetCount(int* n) {
    const char* v = std::getenv("CUDA_STANDIN_DEVICES");
    *n = v ? std::atoi(v) : 1;
    return SUCCESS;
}
int cuDeviceGet(int* dev, int ordinal) {
    int n;
    cuDeviceGetCount(&n);
    if (ordinal < 0 || ordinal >= n) return fail(INVALID_VALUE, "no such device");
    *dev = ordinal;
    return SUCCESS;
}
int cuDeviceGetName(char* name, int len, int) {
    snprintf(name, len, "CUDA stand-in (host emulation)");
    return SUCCESS;
}
// CUDA_STANDIN_NO_POOLS: a device without stream-ordered allocation (memory pools), as some
// virtualised GPUs are; allocations must then take cuMemAlloc.
bool no_pools() { return std::getenv("CUDA_STANDIN_NO_POOLS") != nullptr; }
// CUDA_STANDIN_ARCH (e.g. 75) sets the compute capability; sm_90 otherwise.
int standin_arch() {
    const char* a = std::getenv("CUDA_STANDIN_ARCH");
    return a ? std::atoi(a) : 90;
}
int cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 75: *v = standin_arch() / 10; break;  // compute capability major
        case 76: *v = standin_arch() % 10; break;  // minor
        case 115: *v = !no_pools(); break;  // memory pools supported
        case 16: *v = 132; break;  // multiprocessors
        default: *v = 0;
    }
    return SUCCESS;
}
int cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = size_t(1) << 34;
    return SUCCESS;
}
int cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &g_ctx_token;
    return SUCCESS;
}
int cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
int cuCtxSetCurrent(void*) { return SUCCESS; }
int cuCtxGetCurrent(void** ctx) {
    *ctx = &g_ctx_token;
    return SUCCESS;
}
int cuCtxPushCurrent_v2(void*) { return SUCCESS; }
int cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = &g_ctx_token;
    return SUCCESS;
}
int cuCtxSynchronize() { return SUCCESS; }
int cuCtxGetDevice(int* dev) {
    *dev = 0;
    return SUCCESS;
}
int cuGetErrorString(int code, const char** s) {
    *s = code == SUCCESS ? "no error" : "cuda stand-in error";
    return SUCCESS;
}
int cuGetErrorName(int code, const char** s) {
    *s = code == SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR_STANDIN";
    return SUCCESS;
}

int cuDeviceGetDefaultMemPool(void** pool, int) {
    if (no_pools()) return fail(NOT_SUPPORTED, "no memory pools on this device");
    *pool = &g_ctx_token;
    return SUCCESS;
}
// The pool's USED_MEM_HIGH (8): the most bytes allocated at once; setting it (to 0, the only
// value the driver takes) restarts it from what is allocated now.
int cuMemPoolSetAttribute(void*, int attr, void* v) {
    if (attr == 8) {
        if (*static_cast<uint64_t*>(v) != 0) return fail(INVALID_VALUE, "USED_MEM_HIGH can only be reset to 0");
        std::lock_guard<std::mutex> l(g_mem);
        g_used_high = g_used;
    }
    return SUCCESS;
}
int cuMemPoolGetAttribute(void*, int attr, void* v) {
    if (attr != 8) return fail(INVALID_VALUE, "pool attribute not served by the stand-in");
    std::lock_guard<std::mutex> l(g_mem);
    *static_cast<uint64_t*>(v) = g_used_high;
    return SUCCESS;
}
// 16 GiB, half of it free, or CUDA_STANDIN_FREE bytes free (a GPU that others use, say).
int cuMemGetInfo_v2(size_t* free_, size_t* total) {
    const char* f = std::getenv("CUDA_STANDIN_FREE");
    *free_ = f ? std::strtoull(f, nullptr, 10) : size_t(1) << 33, *total = size_t(1) << 34;
    return SUCCESS;
}

int cuStreamCreate(void** s, unsigned) {
    *s = nullptr;
    return SUCCESS;
}
int cuStreamDestroy_v2(void*) { return SUCCESS; }
int cuStreamSynchronize(void*) { return SUCCESS; }
int cuStreamWaitEvent(void*, void*, unsigned) { return SUCCESS; }

int cuMemAlloc_v2(uintptr_t* p, size_t bytes) {
    size_t n = (bytes + 255) / 256 * 256;
    void* m = aligned_alloc(256, n ? n : 256);
    if (!m) return fail(OUT_OF_MEMORY, "out of host memory");
    std::memset(m, 0xFF, n);
    std::lock_guard<std::mutex> l(g_mem);
    g_allocs[(uintptr_t)m] = bytes;
    g_used += bytes;
    g_used_high = std::max(g_used_high, g_used);
    *p = (uintptr_t)m;
    return SUCCESS;
}
int cuMemAllocAsync(uintptr_t* p, size_t bytes, void*) {
    if (no_pools()) return fail(NOT_SUPPORTED, "stream-ordered allocation without memory pools");
    return cuMemAlloc_v2(p, bytes);
}
int cuMemFree_v2(uintptr_t p) {
    std::lock_guard<std::mutex> l(g_mem);
    auto it = g_allocs.find(p);
    if (it == g_allocs.end()) return fail(INVALID_VALUE, "freeing what was not allocated");
    g_used -= it->second;
    g_allocs.erase(it);
    free((void*)p);
    return SUCCESS;
}
int cuMemFreeAsync(uintptr_t p, void*) { return cuMemFree_v2(p); }

int cuMemcpyHtoDAsync_v2(uintptr_t dst, const void* src, size_t n, void*) {
    if (!inside(dst, n)) return fail(INVALID_VALUE, "upload outside an allocation");
    std::memcpy((void*)dst, src, n);
    return SUCCESS;
}
int cuMemcpyHtoD_v2(uintptr_t dst, const void* src, size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr); }
int cuMemcpyDtoHAsync_v2(void* dst, uintptr_t src, size_t n, void*) {
    if (!inside(src, n)) return fail(INVALID_VALUE, "download outside an allocation");
    std::memcpy(dst, (const void*)src, n);
    return SUCCESS;
}
int cuMemcpyDtoH_v2(void* dst, uintptr_t src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
int cuMemcpyDtoDAsync_v2(uintptr_t dst, uintptr_t src, size_t n, void*) {
    if (!inside(dst, n) || !inside(src, n)) return fail(INVALID_VALUE, "device copy outside an allocation");
    std::memmove((void*)dst, (const void*)src, n);
    return SUCCESS;
}
int cuMemsetD8Async(uintptr_t dst, unsigned char v, size_t n, void*) {
    if (!inside(dst, n)) return fail(INVALID_VALUE, "memset outside an allocation");
    std::memset((void*)dst, v, n);
    return SUCCESS;
}
int cuMemsetD8_v2(uintptr_t dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }

int cuEventCreate(void** e, unsigned flags) {
    *e = new Event{std::chrono::steady_clock::now(), flags};
    return SUCCESS;
}
int cuEventRecord(void* e, void*) {
    static_cast<Event*>(e)->at = std::chrono::steady_clock::now();
    return SUCCESS;
}
int cuEventSynchronize(void*) { return SUCCESS; }
int cuEventQuery(void*) { return SUCCESS; }
int cuEventElapsedTime(float* ms, void* a, void* b) {
    // CU_EVENT_DISABLE_TIMING: such events cannot be timed
    if ((static_cast<Event*>(a)->flags | static_cast<Event*>(b)->flags) & 2)
        return fail(INVALID_HANDLE, "timing an event created without timing");
    *ms = std::chrono::duration<float, std::milli>(static_cast<Event*>(b)->at - static_cast<Event*>(a)->at).count();
    return SUCCESS;
}
int cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
int cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return SUCCESS;
}

// A PTX module (kernels by `.entry`), or a CUBIN (by `.text.` section); CUDA_STANDIN_NO_CUBIN
// makes CUBINs fail as a driver of an older CUDA major version would, CUDA_STANDIN_NO_PTX
// PTX as a driver older than the NVRTC that made it.
int cuModuleLoadData(void** m, const void* image) {
    const unsigned char* bytes = static_cast<const unsigned char*>(image);
    if (std::memcmp(bytes, "\x7f" "ELF", 4) == 0) {
        if (std::getenv("CUDA_STANDIN_NO_CUBIN")) return fail(NO_BINARY_FOR_GPU, "refused a CUBIN");
        auto mod = new Module;
        if (!cubin_kernels(bytes, mod->entries)) {
            delete mod;
            return fail(INVALID_VALUE, "module image is not a 64-bit ELF");
        }
        fprintf(stderr, "cuda stand-in: loaded a CUBIN of %zu kernels\n", mod->entries.size());
        *m = mod;
        return SUCCESS;
    }
    std::string ptx(static_cast<const char*>(image));
    if (ptx.find(".version") == std::string::npos) return fail(INVALID_VALUE, "module image is not PTX");
    if (std::getenv("CUDA_STANDIN_NO_PTX")) return fail(UNSUPPORTED_PTX_VERSION, "refused the PTX");
    auto mod = new Module;
    for (size_t at = ptx.find(".entry"); at != std::string::npos; at = ptx.find(".entry", at + 1)) {
        size_t b = ptx.find_first_not_of(" \t", at + 6), e = ptx.find_first_of("( \t\n", b);
        mod->entries.insert(ptx.substr(b, e - b));
    }
    *m = mod;
    return SUCCESS;
}
int cuModuleUnload(void* m) {
    delete static_cast<Module*>(m);
    return SUCCESS;
}
int cuModuleGetFunction(void** f, void* m, const char* name) {
    if (!static_cast<Module*>(m)->entries.count(name)) return fail(NOT_FOUND, "no such kernel in the module: ", name);
    auto k = g_kernels.find(name);
    if (k == g_kernels.end()) return fail(NOT_FOUND, "no emulated kernel: ", name);
    *f = new Function{name, k->second};
    return SUCCESS;
}
int cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return SUCCESS;
}
int cuFuncSetAttribute(void*, int, int) { return SUCCESS; }

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void*, void** params, void** extra) {
    auto fn = static_cast<Function*>(f);
    if (gy != 1 || gz != 1 || by != 1 || bz != 1) return fail(INVALID_VALUE, "a 2D or 3D launch of ", fn->name.c_str());
    if (bx == 0 || bx > 1024 || gx == 0) return fail(INVALID_VALUE, "a launch shape out of range for ", fn->name.c_str());
    if (smem != 0 || extra) return fail(INVALID_VALUE, "dynamic shared memory or extra for ", fn->name.c_str());
    auto t0 = std::chrono::steady_clock::now();
    if (g_serial_kernels.count(fn->name))
        launch_serial(fn->name.c_str(), gx, bx, fn->bind(params));
    else
        launch(gx, bx, fn->bind(params));
    if (g_trace)
        fprintf(stderr, "cuda stand-in: %s<<<%u, %u>>> %.1f ms\n", fn->name.c_str(), gx, bx,
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return SUCCESS;
}

// ---- cuBLAS ----

int cublasCreate_v2(void** h) {
    *h = &g_ctx_token;
    return 0;
}
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }

// Column-major, by definition; types: 0 f32, 14 bf16; compute 68 (f32).
int cublasGemmStridedBatchedEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* A,
                               int at, int lda, long long sa, const void* B, int bt, int ldb, long long sb,
                               const void* beta, void* C, int ct, int ldc, long long sc, int batch, int compute,
                               int) {
    if (at != bt || (at != 0 && at != 14) || (ct != 0 && ct != 14) || compute != 68) return 15;
    if (lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m) return 7;
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    // the kernels' own bf16 conversions (round to nearest even)
    auto load = [](const void* p, int t, long i) {
        return t == 14 ? bf2f(static_cast<const bf16_t*>(p)[i]) : static_cast<const float*>(p)[i];
    };
    for (int q = 0; q < batch; ++q)
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
                float acc = 0;
                for (int l = 0; l < k; ++l)
                    acc += load(A, at, q * sa + (ta ? l + (long)i * lda : i + (long)l * lda)) *
                           load(B, bt, q * sb + (tb ? j + (long)l * ldb : l + (long)j * ldb));
                long o = q * sc + i + (long)j * ldc;
                float v = al * acc + (be != 0 ? be * load(C, ct, o) : 0.0f);
                if (ct == 14)
                    static_cast<bf16_t*>(C)[o] = f2bf(v);
                else
                    static_cast<float*>(C)[o] = v;
            }
    return 0;
}

}  // extern "C"
