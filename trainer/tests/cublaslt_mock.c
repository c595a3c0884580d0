// A stand-in for libcublasLt.so, for testing the engine's cuBLASLt calls without a GPU.
//
// It implements the functions the engine calls, on host memory, by cuBLASLt's documented
// contract, and refuses whatever the real library would refuse or get wrong:
//  - attribute values of the wrong size (TRANSA/TRANSB and BATCH_COUNT are int32_t,
//    STRIDED_BATCH_OFFSET int64_t, MAX_WORKSPACE_BYTES uint64_t, MIN_ALIGNMENT_* uint32_t),
//    unknown attributes, operation codes other than N and T;
//  - layouts whose leading dimension is shorter than a column, that do not chain
//    (op(A) m×k, op(B) k×n, C and D m×n), whose batch counts differ, and type combinations
//    outside what the engine may use (A = B in bf16 or f32, C = D in f32 or bf16, f32
//    compute and scale);
//  - an algorithm used with other descriptors than it was found for;
//  - operands less aligned than the preference said (the found algorithm may rely on the
//    alignment it was told: here it always does), and a workspace smaller than promised.
// Then D = alpha·op(A)·op(B) + beta·C per batch matrix, column-major, C read only when
// beta ≠ 0, bf16 rounded to nearest even.
//
// Statistics go to stderr when the handle is destroyed.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int cublasStatus_t;
enum {
    OK = 0,
    NOT_INITIALIZED = 1,
    INVALID_VALUE = 7,
    EXECUTION_FAILED = 13,
    NOT_SUPPORTED = 15,
};
enum { R_32F = 0, R_16BF = 14, COMPUTE_32F = 68, OP_N = 0, OP_T = 1 };

#define MAGIC 0x4f4c4d4f4c54ull  // tags live objects

typedef struct {
    uint64_t magic;
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch;
    int64_t stride;
} Layout;

typedef struct {
    uint64_t magic;
    int compute, scale;
    int32_t trans[2];
} Desc;

typedef struct {
    uint64_t magic;
    uint64_t max_workspace;
    uint32_t align[4];
} Pref;

typedef struct {
    uint64_t magic;
    long heuristics, matmuls;
} Handle;

typedef struct {
    uint64_t data[8];
} Algo;

typedef struct {
    Algo algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} HeuristicResult;

#define FAIL(code, ...)                          \
    do {                                         \
        fprintf(stderr, "cublasLt mock: ");      \
        fprintf(stderr, __VA_ARGS__);            \
        fprintf(stderr, "\n");                   \
        return code;                             \
    } while (0)

cublasStatus_t cublasLtCreate(Handle** h) {
    *h = calloc(1, sizeof(Handle));
    (*h)->magic = MAGIC;
    return OK;
}

cublasStatus_t cublasLtDestroy(Handle* h) {
    if (!h || h->magic != MAGIC) FAIL(NOT_INITIALIZED, "destroying a dead handle");
    fprintf(stderr, "cublasLt mock: %ld heuristic calls, %ld matmuls\n", h->heuristics, h->matmuls);
    h->magic = 0;
    free(h);
    return OK;
}

cublasStatus_t cublasLtMatrixLayoutCreate(Layout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != R_32F && type != R_16BF) FAIL(NOT_SUPPORTED, "layout type %d", type);
    if (ld < (int64_t)(rows ? rows : 1)) FAIL(INVALID_VALUE, "ld %ld < rows %lu", (long)ld, (unsigned long)rows);
    *l = calloc(1, sizeof(Layout));
    **l = (Layout){MAGIC, type, rows, cols, ld, 1, 0};
    return OK;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(Layout* l, int attr, const void* buf, size_t size) {
    if (!l || l->magic != MAGIC) FAIL(INVALID_VALUE, "dead layout");
    switch (attr) {
        case 5:  // BATCH_COUNT
            if (size != sizeof(int32_t)) FAIL(INVALID_VALUE, "BATCH_COUNT of %zu bytes", size);
            memcpy(&l->batch, buf, size);
            if (l->batch < 1) FAIL(INVALID_VALUE, "batch %d", l->batch);
            return OK;
        case 6:  // STRIDED_BATCH_OFFSET
            if (size != sizeof(int64_t)) FAIL(INVALID_VALUE, "STRIDED_BATCH_OFFSET of %zu bytes", size);
            memcpy(&l->stride, buf, size);
            return OK;
        default:
            FAIL(INVALID_VALUE, "layout attribute %d", attr);
    }
}

cublasStatus_t cublasLtMatrixLayoutDestroy(Layout* l) {
    if (!l || l->magic != MAGIC) FAIL(INVALID_VALUE, "destroying a dead layout");
    l->magic = 0;
    free(l);
    return OK;
}

cublasStatus_t cublasLtMatmulDescCreate(Desc** d, int compute, int scale) {
    if (compute != COMPUTE_32F || scale != R_32F) FAIL(NOT_SUPPORTED, "compute %d scale %d", compute, scale);
    *d = calloc(1, sizeof(Desc));
    **d = (Desc){MAGIC, compute, scale, {OP_N, OP_N}};
    return OK;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(Desc* d, int attr, const void* buf, size_t size) {
    if (!d || d->magic != MAGIC) FAIL(INVALID_VALUE, "dead matmul descriptor");
    if (attr != 3 && attr != 4) FAIL(INVALID_VALUE, "matmul attribute %d", attr);  // TRANSA, TRANSB
    if (size != sizeof(int32_t)) FAIL(INVALID_VALUE, "TRANS%c of %zu bytes", attr == 3 ? 'A' : 'B', size);
    int32_t op;
    memcpy(&op, buf, size);
    if (op != OP_N && op != OP_T) FAIL(INVALID_VALUE, "operation %d", op);
    d->trans[attr - 3] = op;
    return OK;
}

cublasStatus_t cublasLtMatmulDescDestroy(Desc* d) {
    if (!d || d->magic != MAGIC) FAIL(INVALID_VALUE, "destroying a dead matmul descriptor");
    d->magic = 0;
    free(d);
    return OK;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(Pref** p) {
    *p = calloc(1, sizeof(Pref));
    // the library's defaults: no workspace, 256-byte alignment
    **p = (Pref){MAGIC, 0, {256, 256, 256, 256}};
    return OK;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(Pref* p, int attr, const void* buf, size_t size) {
    if (!p || p->magic != MAGIC) FAIL(INVALID_VALUE, "dead preference");
    if (attr == 1) {  // MAX_WORKSPACE_BYTES
        if (size != sizeof(uint64_t)) FAIL(INVALID_VALUE, "MAX_WORKSPACE_BYTES of %zu bytes", size);
        memcpy(&p->max_workspace, buf, size);
        return OK;
    }
    if (attr >= 5 && attr <= 8) {  // MIN_ALIGNMENT_{A,B,C,D}_BYTES
        if (size != sizeof(uint32_t)) FAIL(INVALID_VALUE, "MIN_ALIGNMENT of %zu bytes", size);
        uint32_t v;
        memcpy(&v, buf, size);
        if (v == 0 || (v & (v - 1))) FAIL(INVALID_VALUE, "alignment %u", v);
        p->align[attr - 5] = v;
        return OK;
    }
    FAIL(INVALID_VALUE, "preference attribute %d", attr);
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(Pref* p) {
    if (!p || p->magic != MAGIC) FAIL(INVALID_VALUE, "destroying a dead preference");
    p->magic = 0;
    free(p);
    return OK;
}

// The problem the descriptors describe, or a failure.
static cublasStatus_t problem(const Desc* d, const Layout* a, const Layout* b, const Layout* c, const Layout* dd,
                              uint64_t* m, uint64_t* n, uint64_t* k) {
    if (!d || d->magic != MAGIC) FAIL(INVALID_VALUE, "dead matmul descriptor");
    const Layout* ls[4] = {a, b, c, dd};
    for (int i = 0; i < 4; i++)
        if (!ls[i] || ls[i]->magic != MAGIC) FAIL(INVALID_VALUE, "dead layout %c", "ABCD"[i]);
    if (a->type != b->type) FAIL(NOT_SUPPORTED, "A type %d, B type %d", a->type, b->type);
    if (c->type != dd->type) FAIL(NOT_SUPPORTED, "C type %d, D type %d", c->type, dd->type);
    if (a->type == R_32F && c->type != R_32F) FAIL(NOT_SUPPORTED, "f32 operands, bf16 output");
    uint64_t am = d->trans[0] == OP_T ? a->cols : a->rows, ak = d->trans[0] == OP_T ? a->rows : a->cols;
    uint64_t bk = d->trans[1] == OP_T ? b->cols : b->rows, bn = d->trans[1] == OP_T ? b->rows : b->cols;
    if (ak != bk || c->rows != am || c->cols != bn || dd->rows != am || dd->cols != bn || c->ld != dd->ld)
        FAIL(INVALID_VALUE, "shapes: op(A) %lux%lu op(B) %lux%lu C %lux%lu D %lux%lu", (unsigned long)am,
             (unsigned long)ak, (unsigned long)bk, (unsigned long)bn, (unsigned long)c->rows,
             (unsigned long)c->cols, (unsigned long)dd->rows, (unsigned long)dd->cols);
    if (a->batch != b->batch || a->batch != c->batch || a->batch != dd->batch)
        FAIL(INVALID_VALUE, "batch counts %d %d %d %d", a->batch, b->batch, c->batch, dd->batch);
    *m = am, *n = bn, *k = ak;
    return OK;
}

// A fingerprint of a problem's descriptors, kept in the algorithm it was found for.
static uint64_t fingerprint(const Desc* d, const Layout** ls) {
    uint64_t h = 1469598103934665603ull;
#define MIX(v) h = (h ^ (uint64_t)(v)) * 1099511628211ull
    MIX(d->trans[0]), MIX(d->trans[1]);
    for (int i = 0; i < 4; i++) {
        MIX(ls[i]->type), MIX(ls[i]->rows), MIX(ls[i]->cols), MIX(ls[i]->ld), MIX(ls[i]->batch);
        MIX(ls[i]->stride);
    }
#undef MIX
    return h;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(Handle* h, Desc* d, Layout* a, Layout* b, Layout* c, Layout* dd,
                                              Pref* p, int requested, HeuristicResult* out, int* count) {
    if (!h || h->magic != MAGIC) FAIL(NOT_INITIALIZED, "dead handle");
    if (!p || p->magic != MAGIC) FAIL(INVALID_VALUE, "dead preference");
    if (requested < 1) FAIL(INVALID_VALUE, "%d algorithms requested", requested);
    uint64_t m, n, k;
    cublasStatus_t st = problem(d, a, b, c, dd, &m, &n, &k);
    if (st != OK) return st;
    h->heuristics++;
    const Layout* ls[4] = {a, b, c, dd};
    memset(out, 0, sizeof(*out));
    out->algo.data[0] = fingerprint(d, ls);
    for (int i = 0; i < 4; i++) out->algo.data[1 + i] = p->align[i];
    // an algorithm that wants some workspace when it may have it
    out->workspaceSize = p->max_workspace < (1u << 20) ? p->max_workspace : (1u << 20);
    out->algo.data[5] = out->workspaceSize;
    out->algo.data[6] = MAGIC;
    out->state = OK;
    out->wavesCount = 1.0f;
    *count = 1;
    return OK;
}

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float load(const void* base, int type, int64_t i) {
    return type == R_16BF ? bf16_to_f32(((const uint16_t*)base)[i]) : ((const float*)base)[i];
}

// The alignment every batch matrix of an operand keeps, capped like the library's.
static uint64_t aligned(const void* ptr, const Layout* l) {
    uint64_t bits = (uint64_t)(uintptr_t)ptr | 256;
    if (l->batch > 1) bits |= (uint64_t)l->stride * (l->type == R_16BF ? 2 : 4);
    return bits & (~bits + 1);
}

cublasStatus_t cublasLtMatmul(Handle* h, Desc* d, const void* alpha, const void* A, Layout* a, const void* B,
                              Layout* b, const void* beta, const void* C, Layout* c, void* D, Layout* dd,
                              const Algo* algo, void* workspace, size_t workspace_size, void* stream) {
    (void)stream;
    if (!h || h->magic != MAGIC) FAIL(NOT_INITIALIZED, "dead handle");
    uint64_t m, n, k;
    cublasStatus_t st = problem(d, a, b, c, dd, &m, &n, &k);
    if (st != OK) return st;
    const Layout* ls[4] = {a, b, c, dd};
    if (!algo || algo->data[6] != MAGIC) FAIL(INVALID_VALUE, "no algorithm from the heuristic");
    if (algo->data[0] != fingerprint(d, ls)) FAIL(INVALID_VALUE, "an algorithm found for another problem");
    const void* ptrs[4] = {A, B, C, D};
    for (int i = 0; i < 4; i++)
        if (aligned(ptrs[i], ls[i]) < algo->data[1 + i])
            FAIL(EXECUTION_FAILED, "%c is %lu-byte aligned, the algorithm was chosen for %lu", "ABCD"[i],
                 (unsigned long)aligned(ptrs[i], ls[i]), (unsigned long)algo->data[1 + i]);
    if (workspace_size < algo->data[5] || (algo->data[5] && !workspace))
        FAIL(INVALID_VALUE, "workspace of %zu bytes, the algorithm needs %lu", workspace_size,
             (unsigned long)algo->data[5]);
    float al = *(const float*)alpha, be = *(const float*)beta;
    h->matmuls++;
    for (int32_t bt = 0; bt < a->batch; bt++)
        for (uint64_t i = 0; i < m; i++)
            for (uint64_t j = 0; j < n; j++) {
                float acc = 0.0f;
                for (uint64_t l = 0; l < k; l++) {
                    int64_t ia = d->trans[0] == OP_T ? (int64_t)(l + i * a->ld) : (int64_t)(i + l * a->ld);
                    int64_t ib = d->trans[1] == OP_T ? (int64_t)(j + l * b->ld) : (int64_t)(l + j * b->ld);
                    acc += load(A, a->type, bt * a->stride + ia) * load(B, b->type, bt * b->stride + ib);
                }
                int64_t io = (int64_t)(i + j * c->ld);
                float v = al * acc;
                if (be != 0.0f) v += be * load(C, c->type, bt * c->stride + io);
                int64_t od = bt * dd->stride + (int64_t)(i + j * dd->ld);
                if (dd->type == R_16BF)
                    ((uint16_t*)D)[od] = f32_to_bf16(v);
                else
                    ((float*)D)[od] = v;
            }
    return OK;
}
