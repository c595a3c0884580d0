// The CUDA emulation layer shared by the kernel emulator (cuda_emulator.cpp) and the stand-in
// CUDA driver (cuda_driver_mock.cpp): each CUDA thread of a block is a fiber (ucontext) on the
// calling OS thread, a barrier (`__syncthreads`, and per warp for shuffles, mma.sync and
// ldmatrix) suspends a fiber until every participant arrived, and mma.sync and ldmatrix follow
// their PTX fragment layouts. A round in which no fiber moves is a deadlock (a barrier some
// thread never reaches) and aborts. Blocks run one after another, so `__shared__` can be a
// static. Includes src/cuda_kernels.cu unchanged.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 0, y = 1, z = 1;
};
// One OS thread runs every fiber: the scheduler sets these before resuming a fiber.
static Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;

struct Fiber {
    ucontext_t ctx;
    unsigned t = 0;
    bool done = false;
};
static ucontext_t g_scheduler;
static std::vector<Fiber> g_fibers;
static unsigned g_current = 0;
static unsigned long g_moves = 0;  // arrivals and completions, to tell progress from deadlock

// A barrier of `need` fibers: the last to arrive releases the others and runs on.
struct Barrier {
    unsigned need, arrived = 0;
    unsigned long generation = 0;
    explicit Barrier(unsigned n) : need(n) {}
    void arrive_and_wait() {
        ++g_moves;
        unsigned long mine = generation;
        if (++arrived == need) {
            arrived = 0;
            ++generation;
            return;
        }
        while (generation == mine) swapcontext(&g_fibers[g_current].ctx, &g_scheduler);
    }
};

static Barrier* g_block = nullptr;
static std::vector<std::unique_ptr<Barrier>> g_warps;
static float g_shfl[1024];
static std::mutex g_atomic;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// Set while a launch runs its threads one after another on one OS thread (`launch_serial`),
// which only kernels without barriers, shuffles or warp-wide instructions may use.
static const char* g_serial = nullptr;
[[noreturn]] inline void serial_abort(const char* what) {
    fprintf(stderr, "%s in %s, which was launched serially\n", what, g_serial);
    std::abort();
}

inline void __syncthreads() {
    if (g_serial) serial_abort("__syncthreads");
    g_block->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
    if (g_serial) serial_abort("a warp shuffle");
    unsigned t = threadIdx.x;
    auto& b = *g_warps[t / 32];
    g_shfl[t] = v;
    b.arrive_and_wait();
    float r = g_shfl[t ^ (unsigned)o];
    b.arrive_and_wait();
    return r;
}
inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> l(g_atomic);
    float old = *p;
    *p += v;
    return old;
}
inline double atomicAdd(double* p, double v) {
    std::lock_guard<std::mutex> l(g_atomic);
    double old = *p;
    *p += v;
    return old;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }

// mma.sync.m16n8k16 (bf16 in, f32 accumulate) across the 32 lanes of a warp: each lane
// deposits its fragments, and computes its own accumulator elements from everyone's, with the
// fragment layouts of the PTX ISA (independent of the kernel's use of them).
static unsigned g_mma_a[1024][4], g_mma_b[1024][2];
// ldmatrix.x4 across the warp: lane 8i + r gives the address of row r of matrix i; lane t
// receives matrix i's elements (row t/4, column 2(t%4)) and (row t/4, column 2(t%4) + 1), or
// with .trans (`Trans`), (row 2(t%4), column t/4) and (row 2(t%4) + 1, column t/4).
static const uint16_t* g_ldsm_rows[1024];
#define LDMATRIX_X4
template <bool Trans>
inline void ldmatrix_x4(unsigned* r, const unsigned* row) {
    if (g_serial) serial_abort("ldmatrix");
    unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
        std::abort();
    }
    auto& bar = *g_warps[t / 32];
    g_ldsm_rows[t] = reinterpret_cast<const uint16_t*>(row);
    bar.arrive_and_wait();
    unsigned out[4];
    for (int i = 0; i < 4; ++i) {
        const uint16_t* const* rows = g_ldsm_rows + w0 + 8 * i;
        unsigned lo, hi;
        if (Trans) {
            lo = rows[2 * (lane % 4)][lane / 4], hi = rows[2 * (lane % 4) + 1][lane / 4];
        } else {
            lo = rows[lane / 4][2 * (lane % 4)], hi = rows[lane / 4][2 * (lane % 4) + 1];
        }
        out[i] = lo | (hi << 16);
    }
    bar.arrive_and_wait();
    for (int i = 0; i < 4; ++i) r[i] = out[i];
}
#define MMA_BF16_16816
inline float bf16_at(unsigned word, int half) { return __uint_as_float(((word >> (16 * half)) & 0xffffu) << 16); }
inline void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    if (g_serial) serial_abort("mma.sync");
    unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31;
    auto& bar = *g_warps[t / 32];
    for (int i = 0; i < 4; ++i) g_mma_a[t][i] = a[i];
    for (int i = 0; i < 2; ++i) g_mma_b[t][i] = b[i];
    bar.arrive_and_wait();
    auto A = [&](int row, int k) {
        return bf16_at(g_mma_a[w0 + (row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
    };
    auto B = [&](int k, int col) { return bf16_at(g_mma_b[w0 + col * 4 + (k % 8) / 2][k / 8], k % 2); };
    float r[4];
    for (int i = 0; i < 4; ++i) {
        int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        r[i] = acc;
    }
    bar.arrive_and_wait();
    for (int i = 0; i < 4; ++i) c[i] = r[i];
}

// cp.async (16 bytes, global to shared): the copy lands when its thread waits for its group
// (cp.async.wait_group), and until then its destination reads as NaN (bf16 0xffff) from the
// moment it is issued. So a read before the wait, or a copy into a tile that other threads
// still read, shows up in the results. A thread that ends with copies not waited for aborts.
struct AsyncCopy {
    unsigned char* dst;
    unsigned char data[16];
};
struct AsyncGroups {
    std::vector<AsyncCopy> open;
    std::vector<std::vector<AsyncCopy>> committed;  // oldest first
};
static AsyncGroups g_async[1024];
#define CP_ASYNC
inline void cp_async16(unsigned* dst, const unsigned short* src, bool valid) {
    if (g_serial) serial_abort("cp.async");
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
        fprintf(stderr, "cp.async: address not 16-byte aligned\n");
        std::abort();
    }
    AsyncCopy c;
    c.dst = reinterpret_cast<unsigned char*>(dst);
    if (valid) std::memcpy(c.data, src, 16);
    else std::memset(c.data, 0, 16);
    std::memset(c.dst, 0xff, 16);
    g_async[threadIdx.x].open.push_back(c);
}
inline void cp_async_commit() {
    auto& a = g_async[threadIdx.x];
    a.committed.push_back(std::move(a.open));
    a.open.clear();
}
template <int N>
inline void cp_async_wait() {
    auto& a = g_async[threadIdx.x];
    while (a.committed.size() > (size_t)N) {
        for (auto& c : a.committed.front()) std::memcpy(c.dst, c.data, 16);
        a.committed.erase(a.committed.begin());
    }
}
inline void cp_async_check_drained() {
    auto& a = g_async[threadIdx.x];
    if (!a.open.empty() || !a.committed.empty()) {
        fprintf(stderr, "thread %u of block %u ended with cp.async copies not waited for\n", threadIdx.x, blockIdx.x);
        std::abort();
    }
}

#include "../src/cuda_kernels.cu"

static const std::function<void()>* g_kernel = nullptr;

static void fiber_main() {
    (*g_kernel)();
    cp_async_check_drained();
    g_fibers[g_current].done = true;
    ++g_moves;
}  // returns to uc_link, the scheduler

// Runs each block's threads as fibers, blocks one after another. Within a block, one warp at
// a time runs as far as it can (its threads round robin, each until it finishes or waits at
// a barrier) before the next warp starts: warps are as far apart as `__syncthreads` lets
// them be, so a shared tile that one warp overwrites while another still needs it (a barrier
// missing) corrupts the other's results. Even blocks run their warps first to last, odd
// blocks last to first, so a hazard shows whichever warp is ahead. Blocks run in grid order,
// or last to first with CUDA_EMU_BLOCKS_REVERSED set: a result that depends on the order of
// blocks (float atomics, say) then differs between the two.
static const bool g_blocks_reversed = std::getenv("CUDA_EMU_BLOCKS_REVERSED") != nullptr;
inline unsigned block_at(unsigned i, unsigned grid) { return g_blocks_reversed ? grid - 1 - i : i; }
static void resume(unsigned t) {
    g_current = t;
    threadIdx.x = t;
    swapcontext(&g_scheduler, &g_fibers[t].ctx);
}
static void launch(unsigned grid, unsigned block, const std::function<void()>& f) {
    constexpr size_t STACK = 256 << 10;
    gridDim.x = grid;
    blockDim.x = block;
    g_kernel = &f;
    Barrier bb(block);
    g_block = &bb;
    g_warps.clear();
    for (unsigned w = 0; w * 32 < block; ++w)
        g_warps.push_back(std::make_unique<Barrier>(std::min(32u, block - w * 32)));
    const unsigned warps = (unsigned)g_warps.size();
    std::vector<char> stacks(STACK * block);
    g_fibers.assign(block, Fiber{});
    for (unsigned i = 0; i < grid; ++i) {
        unsigned b = block_at(i, grid);
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) {
            Fiber& fb = g_fibers[t];
            fb.t = t;
            fb.done = false;
            getcontext(&fb.ctx);
            fb.ctx.uc_stack.ss_sp = stacks.data() + STACK * t;
            fb.ctx.uc_stack.ss_size = STACK;
            fb.ctx.uc_link = &g_scheduler;
            makecontext(&fb.ctx, fiber_main, 0);
        }
        for (unsigned left = block; left > 0;) {
            unsigned long before = g_moves;
            for (unsigned i = 0; i < warps; ++i) {
                unsigned w = (b & 1) ? warps - 1 - i : i, end = std::min(block, 32 * (w + 1));
                for (unsigned long moved = ~0ul; moved != g_moves;) {
                    moved = g_moves;
                    for (unsigned t = 32 * w; t < end; ++t)
                        if (!g_fibers[t].done) resume(t);
                }
            }
            left = 0;
            for (unsigned t = 0; t < block; ++t) left += !g_fibers[t].done;
            if (left > 0 && g_moves == before) {
                fprintf(stderr, "emulated kernel deadlocked: %u threads of block %u wait at a barrier\n", left, b);
                std::abort();
            }
        }
    }
}

// A launch of a kernel without barriers, shuffles or warp-wide instructions: its threads one
// after another on the calling thread, far cheaper than a thread each. Using any of those
// aborts, naming `kernel`.
static void launch_serial(const char* kernel, unsigned grid, unsigned block, const std::function<void()>& f) {
    gridDim.x = grid;
    blockDim.x = block;
    g_serial = kernel;
    for (unsigned i = 0; i < grid; ++i)
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = block_at(i, grid);
            threadIdx.x = t;
            f();
        }
    g_serial = nullptr;
}
