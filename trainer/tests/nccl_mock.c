// A stand-in for libnccl.so, for running the CUDA engine's data-parallel path (one process per
// rank, NCCL's id passed over the engine's own TCP rendezvous, gradients all-reduced) without
// GPUs, next to the stand-in driver whose device memory is host memory.
//
// The unique id carries the path of a fresh folder; an all-reduce writes the rank's buffer
// there under the call's sequence number, waits for every rank's, and sums them in rank order
// (so every rank gets the same bits). Only what the engine may ask is accepted: f32 sums, the
// same element count on every rank, ranks within the communicator's size.
//
// Statistics go to stderr when the communicator is torn down.
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int ncclResult_t;
enum { ncclSuccess = 0, ncclSystemError = 2, ncclInvalidArgument = 4, ncclInvalidUsage = 5 };
enum { ncclFloat32 = 7, ncclSum = 0 };

typedef struct {
    char internal[128];
} ncclUniqueId;

typedef struct {
    char dir[128];
    int nranks, rank;
    long seq;
} Comm;

#define FAIL(code, ...)                        \
    do {                                       \
        fprintf(stderr, "nccl stand-in: ");    \
        fprintf(stderr, __VA_ARGS__);          \
        fprintf(stderr, "\n");                 \
        return code;                           \
    } while (0)

ncclResult_t ncclGetVersion(int* v) {
    *v = 22800;
    return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) { return r == ncclSuccess ? "no error" : "nccl stand-in error"; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    const char* tmp = getenv("TMPDIR");
    char path[128];
    snprintf(path, sizeof path, "%s/nccl-standin-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(path)) FAIL(ncclSystemError, "mkdtemp: %s", strerror(errno));
    memset(id, 0, sizeof *id);
    strncpy(id->internal, path, sizeof id->internal - 1);
    return ncclSuccess;
}

// NCCL_STANDIN_REFUSE=1: refuse the communicator as NCCL refuses two ranks on one GPU.
ncclResult_t ncclCommInitRank(Comm** comm, int nranks, ncclUniqueId id, int rank) {
    const char* refuse = getenv("NCCL_STANDIN_REFUSE");
    if (refuse && *refuse == '1') FAIL(ncclInvalidUsage, "rank %d of %d: duplicate GPU", rank, nranks);
    if (nranks < 1 || rank < 0 || rank >= nranks) FAIL(ncclInvalidArgument, "rank %d of %d", rank, nranks);
    struct stat st;
    if (stat(id.internal, &st) != 0 || !S_ISDIR(st.st_mode))
        FAIL(ncclInvalidArgument, "the unique id names no folder: `%.127s`", id.internal);
    Comm* c = calloc(1, sizeof *c);
    memcpy(c->dir, id.internal, sizeof c->dir);
    c->nranks = nranks, c->rank = rank;
    *comm = c;
    return ncclSuccess;
}

static void part(char* out, size_t n, const Comm* c, long seq, int rank) {
    snprintf(out, n, "%s/%ld-%d", c->dir, seq, rank);
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, Comm* c, void* stream) {
    (void)stream;
    if (type != ncclFloat32 || op != ncclSum) FAIL(ncclInvalidArgument, "type %d, op %d: only f32 sums", type, op);
    char path[200], tmp[210];
    long seq = c->seq++;
    part(path, sizeof path, c, seq, c->rank);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE* f = fopen(tmp, "wb");
    if (!f || fwrite(send, 4, count, f) != count || fclose(f) != 0) FAIL(ncclSystemError, "writing %s", tmp);
    if (rename(tmp, path) != 0) FAIL(ncclSystemError, "renaming %s", tmp);
    float* sum = calloc(count ? count : 1, 4);
    float* buf = malloc((count ? count : 1) * 4);
    for (int r = 0; r < c->nranks; ++r) {
        part(path, sizeof path, c, seq, r);
        struct stat st;
        for (int waited = 0; stat(path, &st) != 0; ++waited) {
            if (waited > 120000) FAIL(ncclSystemError, "rank %d never reached all-reduce %ld", r, seq);
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
        if ((size_t)st.st_size != count * 4)
            FAIL(ncclInvalidUsage, "rank %d all-reduces %ld elements, rank %d %zu", r, (long)st.st_size / 4, c->rank,
                 count);
        f = fopen(path, "rb");
        if (!f || fread(buf, 4, count, f) != count) FAIL(ncclSystemError, "reading %s", path);
        fclose(f);
        for (size_t i = 0; i < count; ++i) sum[i] += buf[i];
    }
    memcpy(recv, sum, count * 4);
    free(sum);
    free(buf);
    return ncclSuccess;
}

static ncclResult_t teardown(Comm* c) {
    if (!c) FAIL(ncclInvalidArgument, "no communicator");
    fprintf(stderr, "nccl stand-in: rank %d of %d, %ld all-reduces\n", c->rank, c->nranks, c->seq);
    free(c);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(Comm* c) { return teardown(c); }
ncclResult_t ncclCommDestroy(Comm* c) { return teardown(c); }
