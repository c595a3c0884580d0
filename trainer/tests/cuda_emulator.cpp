// Runs the CUDA engine's kernels (src/cuda_kernels.cu, included unchanged) on the CPU, through
// the emulation layer of cuda_emulation.hpp (each CUDA thread a fiber, barriers for
// __syncthreads and warp-wide operations, blocks one after another). Driven by tests/cuda_kernels.rs: `emulator KERNEL DIR ARGS...` reads DIR/<buffer> files
// (raw little-endian f32/u32), runs the kernel with the engine's launch shape, writes outputs.

#include <fstream>
#include "cuda_emulation.hpp"

static std::string dir;
template <class T>
static std::vector<T> load(const char* name) {
    std::ifstream f(dir + "/" + name, std::ios::binary | std::ios::ate);
    if (!f) {
        fprintf(stderr, "missing buffer %s\n", name);
        exit(2);
    }
    std::vector<T> v(f.tellg() / sizeof(T));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), v.size() * sizeof(T));
    return v;
}
// A buffer the test may leave out (the document starts of attention within documents): empty then.
template <class T>
static std::vector<T> load_optional(const char* name) {
    std::ifstream f(dir + "/" + name);
    return f ? load<T>(name) : std::vector<T>();
}
template <class T>
static const T* or_null(const std::vector<T>& v) {
    return v.empty() ? nullptr : v.data();
}
template <class T>
static void store(const std::string& name, const std::vector<T>& v) {
    std::ofstream f(dir + "/" + name, std::ios::binary);
    f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    std::string k = argv[1];
    dir = argv[2];
    auto I = [&](int i) { return std::atol(argv[i]); };
    auto F = [&](int i) { return (float)std::atof(argv[i]); };
    const unsigned B = (unsigned)I(3);  // block size
    auto grid_n = [&](long n) { return (unsigned)((n + B - 1) / B); };
    if (k == "norm_fwd") {  // rows d eps rms affine
        long rows = I(4);
        int d = I(5), rms = I(7), affine = I(8);
        float eps = F(6);
        auto x = load<float>("x");
        std::vector<float> w = affine ? load<float>("w") : std::vector<float>();
        std::vector<float> y(rows * d), mean(rows), rstd(rows);
        std::vector<uint16_t> yb(rows * d);
        launch(rows, B, [&] {
            norm_fwd(x.data(), affine ? w.data() : nullptr, y.data(), nullptr, mean.data(), rstd.data(), d, eps, rms);
        });
        launch(rows, B, [&] {
            norm_fwd(x.data(), affine ? w.data() : nullptr, nullptr, yb.data(), mean.data(), rstd.data(), d, eps, rms);
        });
        store("y", y), store("y_bf16", yb), store("mean", mean), store("rstd", rstd);
        // and added to a residual (norm_after), when the test gives one
        auto res = load_optional<float>("res");
        if (!res.empty()) {
            std::vector<float> ya(rows * d);
            launch(rows, B, [&] {
                norm_add_fwd(x.data(), affine ? w.data() : nullptr, res.data(), ya.data(), mean.data(), rstd.data(), d,
                             eps, rms);
            });
            store("y_add", ya);
        }
    } else if (k == "cols_copy") {  // rows cols lds ldd: "src" into "dst" in each f32/bf16 pairing
        long rows = I(4), lds = I(6), ldd = I(7);
        int cols = I(5);
        auto src = load<float>("src"), dst = load<float>("dst");
        std::vector<uint16_t> srcb(src.size()), dstb(dst.size());
        for (size_t i = 0; i < src.size(); ++i) srcb[i] = f2bf(src[i]);
        for (size_t i = 0; i < dst.size(); ++i) dstb[i] = f2bf(dst[i]);
        auto ff = dst, bf = dst;
        auto fb = dstb, bb = dstb;
        auto run = [&](const void* s, int sb, void* d, int db) {
            launch(grid_n(rows * cols), B, [&] { cols_copy(s, sb, lds, d, db, ldd, rows, cols); });
        };
        run(src.data(), 0, ff.data(), 0), run(srcb.data(), 1, bf.data(), 0);
        run(src.data(), 0, fb.data(), 1), run(srcb.data(), 1, bb.data(), 1);
        store("f32_f32", ff), store("bf16_f32", bf), store("f32_bf16", fb), store("bf16_bf16", bb);
    } else if (k == "norm_bwd") {  // rows d rms affine chunk: dx, then dw over chunks of rows
        long rows = I(4);
        int d = I(5), rms = I(6), affine = I(7), chunk = I(8);
        auto dy = load<float>("dy"), x = load<float>("x"), mean = load<float>("mean"), rstd = load<float>("rstd");
        auto dx = load<float>("dx");
        std::vector<float> w = affine ? load<float>("w") : std::vector<float>();
        launch(rows, B, [&] {
            norm_bwd(dy.data(), x.data(), mean.data(), rstd.data(), affine ? w.data() : nullptr, dx.data(), d, rms);
        });
        store("dx", dx);
        if (affine) {
            auto dw = load<float>("dw");
            int chunks = (int)((rows + chunk - 1) / chunk);
            std::vector<float> partial((size_t)chunks * d);
            launch((unsigned)(((d + 31) / 32) * chunks), B, [&] {
                norm_dw_partial(dy.data(), x.data(), mean.data(), rstd.data(), partial.data(), rows, d, chunk);
            });
            launch(grid_n(d), B, [&] { norm_dw_sum(partial.data(), dw.data(), chunks, d); });
            store("dw", dw);
        }
    } else if (k == "rope") {  // rows T heads half stride inverse
        long rows = I(4);
        int T = I(5), heads = I(6), half = I(7), stride = I(8), inv = I(9);
        auto x = load<float>("x"), c = load<float>("cos"), s = load<float>("sin");
        // in place on bf16 rows too, from the input rounded to bf16
        std::vector<uint16_t> xb(x.size());
        for (size_t i = 0; i < xb.size(); ++i) xb[i] = f2bf(x[i]);
        launch(grid_n(rows * heads * half), B,
               [&] { rope(x.data(), c.data(), s.data(), rows, T, heads, half, stride, inv); });
        launch(grid_n(rows * heads * half), B,
               [&] { rope_bf16(xb.data(), c.data(), s.data(), rows, T, heads, half, stride, inv); });
        store("x", x), store("x_bf16", xb);
    } else if (k == "kv") {  // rows heads kv_heads hd: kv_repeat of "x", kv_sum of "dy", f32 and bf16
        long rows = I(4);
        int heads = I(5), kv_heads = I(6), hd = I(7);
        long d = (long)heads * hd, w = (long)(heads + 2 * kv_heads) * hd;
        auto x = load<float>("x"), dy = load<float>("dy");
        std::vector<uint16_t> xb(x.size()), dyb(dy.size());
        for (size_t i = 0; i < xb.size(); ++i) xb[i] = f2bf(x[i]);
        for (size_t i = 0; i < dyb.size(); ++i) dyb[i] = f2bf(dy[i]);
        std::vector<float> y(rows * 3 * d), dx(rows * w);
        std::vector<uint16_t> yb(y.size()), dxb(dx.size());
        launch(grid_n(rows * 3 * d), B, [&] { kv_repeat(x.data(), 0, y.data(), 0, rows, heads, kv_heads, hd); });
        launch(grid_n(rows * 3 * d), B, [&] { kv_repeat(xb.data(), 1, yb.data(), 1, rows, heads, kv_heads, hd); });
        launch(grid_n(rows * w), B, [&] { kv_sum(dy.data(), 0, dx.data(), 0, rows, heads, kv_heads, hd); });
        launch(grid_n(rows * w), B, [&] { kv_sum(dyb.data(), 1, dxb.data(), 1, rows, heads, kv_heads, hd); });
        store("y", y), store("y_bf16", yb), store("dx", dx), store("dx_bf16", dxb);
    } else if (k == "clip_qkv") {  // n c: in f32 and on bf16 (the input rounded), then each backward on "dy"
        long n = I(4);
        float c = F(5);
        long words = (n + 31) / 32;
        auto x = load<float>("x"), dy = load<float>("dy");
        std::vector<uint16_t> xb(n), dyb(n);
        for (long i = 0; i < n; ++i) xb[i] = f2bf(x[i]), dyb[i] = f2bf(dy[i]);
        std::vector<unsigned> bits(words), bits_b(words);
        launch(grid_n(words), B, [&] { clip_qkv(x.data(), bits.data(), n, c); });
        launch(grid_n(words), B, [&] { clip_qkv_bwd(dy.data(), bits.data(), n); });
        launch(grid_n(words), B, [&] { clip_qkv_bf16(xb.data(), bits_b.data(), n, c); });
        launch(grid_n(words), B, [&] { clip_qkv_bwd_bf16(dyb.data(), bits_b.data(), n); });
        store("x", x), store("bits", bits), store("dy", dy);
        store("x_bf16", xb), store("bits_bf16", bits_b), store("dy_bf16", dyb);
    } else if (k == "softmax_fwd") {  // rows T H (and the optional "starts")
        long rows = I(4);
        int T = I(5), H = I(6);
        auto s = load<float>("s");
        auto starts = load_optional<unsigned>("starts");
        launch(rows, B, [&] { softmax_fwd(s.data(), or_null(starts), T, H); });
        store("s", s);
    } else if (k == "softmax_bwd") {  // rows T scale
        long rows = I(4);
        int T = I(5);
        float scale = F(6);
        auto p = load<float>("p"), dp = load<float>("dp");
        launch(rows, B, [&] { softmax_bwd(p.data(), dp.data(), T, scale); });
        store("dp", dp);
    } else if (k == "softmax_bf16") {  // rows T scale: forward into bf16 P, then backward
        long rows = I(4);
        int T = I(5);
        float scale = F(6);
        auto s = load<float>("s"), dp = load<float>("dp");
        std::vector<uint16_t> p(rows * T), ds(rows * T);
        launch(rows, B, [&] { softmax_fwd_bf16(s.data(), p.data(), nullptr, T, 1); });
        launch(rows, B, [&] { softmax_bwd_bf16(p.data(), dp.data(), ds.data(), T, scale); });
        store("p", p), store("ds", ds);
    } else if (k == "swiglu") {  // rows h
        long rows = I(4);
        int h = I(5);
        auto x = load<float>("x"), dy = load<float>("dy");
        std::vector<float> y(rows * h), dx(rows * 2 * h);
        launch(grid_n(rows * h), B, [&] { swiglu_fwd(x.data(), y.data(), rows, h); });
        launch(grid_n(rows * h), B, [&] { swiglu_bwd(dy.data(), x.data(), dx.data(), rows, h); });
        store("y", y), store("dx", dx);
    } else if (k == "swiglu_bf16") {  // rows h: bf16 in, bf16 out
        long rows = I(4);
        int h = I(5);
        auto x = load<uint16_t>("x"), dy = load<uint16_t>("dy");
        std::vector<uint16_t> y(rows * h), dx(rows * 2 * h);
        launch(grid_n(rows * h), B, [&] { swiglu_fwd_bf16(x.data(), y.data(), rows, h); });
        launch(grid_n(rows * h), B, [&] { swiglu_bwd_bf16(dy.data(), x.data(), dx.data(), rows, h); });
        store("y", y), store("dx", dx);
    } else if (k == "cross_entropy") {  // rows V zloss gscale backward
        long rows = I(4);
        int V = I(5), backward = I(8);
        float zl = F(6), gs = F(7);
        auto logits = load<float>("logits");
        auto t = load<unsigned>("targets");
        std::vector<float> lp(rows), zt(rows);
        std::vector<uint16_t> dlb(rows * V);
        launch(rows, B,
               [&] { cross_entropy(logits.data(), dlb.data(), t.data(), lp.data(), zt.data(), V, zl, gs, backward); });
        launch(rows, B,
               [&] { cross_entropy(logits.data(), nullptr, t.data(), lp.data(), zt.data(), V, zl, gs, backward); });
        store("logits", logits), store("logp", lp), store("zt", zt), store("dlogits_bf16", dlb);
    } else if (k == "embed") {  // n d: the backward over the positions grouped by token
        long n = I(4);
        int d = I(5);
        auto ids = load<unsigned>("ids"), tokens = load<unsigned>("tokens"), starts = load<unsigned>("starts"),
             pos = load<unsigned>("positions");
        auto wte = load<float>("wte"), dx = load<float>("dx"), dwte = load<float>("dwte");
        std::vector<float> x(n * d);
        launch(grid_n(n * d), B, [&] { embed_fwd(ids.data(), wte.data(), x.data(), n, d); });
        launch((unsigned)tokens.size(), B,
               [&] { embed_bwd(tokens.data(), starts.data(), pos.data(), dx.data(), dwte.data(), d); });
        store("x", x), store("dwte", dwte);
    } else if (k == "elementwise") {  // n: cast_bf16, sumsq
        long n = I(4);
        auto a = load<float>("a");
        std::vector<uint16_t> bf(n);
        std::vector<double> ss(3, 0.0);  // a part per block
        launch(grid_n(n), B, [&] { cast_bf16(a.data(), bf.data(), n); });
        launch(std::min(grid_n(n), 3u), B, [&] { sumsq(a.data(), n, ss.data()); });
        store("bf16", bf), store("sumsq", ss);
    } else if (k == "flash") {  // b T H KV hd scale (and the optional "starts"): forward, then the
                                // three backward kernels; both block sizes
        int b = I(4), T = I(5), H = I(6), KV = I(7), hd = I(8);
        float scale = F(9);
        long rows = (long)b * T, d = (long)H * hd, w = d + 2L * KV * hd;
        auto qkv = load<uint16_t>("qkv"), dout = load<uint16_t>("dout");
        auto starts = load_optional<unsigned>("starts");
        const unsigned* st = or_null(starts);
        // warps: forward and dQ 4 (narrow) or 8 (wide), dK/dV 2 or 4; rows per block 16 a warp;
        // dK/dV has a block per kv head
        auto flash = [&](const char* suffix, int wq, int wk, auto fwd, auto dq, auto dkdv) {
            std::vector<uint16_t> out(rows * d);
            std::vector<float> lse(b * H * T), dsum(b * H * T);
            std::vector<uint16_t> dqkv(rows * w);
            unsigned nqb = (T + 16 * wq - 1) / (16 * wq), nkb = (T + 16 * wk - 1) / (16 * wk);
            launch(b * H * nqb, 32 * wq, [&] { fwd(qkv.data(), out.data(), lse.data(), T, H, KV, scale, st); });
            launch((unsigned)((rows * H * 32 + 255) / 256), 256,
                   [&] { flash_bwd_pre(dout.data(), out.data(), dsum.data(), rows, T, H, hd); });
            launch(b * H * nqb, 32 * wq,
                   [&] { dq(qkv.data(), dout.data(), lse.data(), dsum.data(), dqkv.data(), T, H, KV, scale, st); });
            launch(b * KV * nkb, 32 * wk,
                   [&] { dkdv(qkv.data(), dout.data(), lse.data(), dsum.data(), dqkv.data(), T, H, KV, scale, st); });
            std::string s(suffix);
            store("out" + s, out), store("lse" + s, lse), store("dsum" + s, dsum), store("dqkv" + s, dqkv);
        };
#define FLASH_BOTH(HD)                                                                                      \
    do {                                                                                                    \
        flash("", 4, 2, flash_fwd_##HD, flash_dq_##HD, flash_dkdv_##HD);                                    \
        flash("_wide", 8, 4, flash_fwd_##HD##_wide, flash_dq_##HD##_wide, flash_dkdv_##HD##_wide);          \
    } while (0)
        if (hd == 32) FLASH_BOTH(32);
        else if (hd == 64) FLASH_BOTH(64);
        else if (hd == 128) FLASH_BOTH(128);
        else return 2;
    } else if (k == "adamw") {  // n lr b1 b2 eps wd bc1 bc2_sqrt coef: without, then with the bf16 copy
        long n = I(4);
        auto p = load<float>("p"), g = load<float>("g"), m = load<float>("m"), v = load<float>("v");
        auto p2 = p, m2 = m, v2 = v;
        std::vector<uint16_t> pb(n);
        launch(grid_n(n), B, [&] {
            adamw(p.data(), nullptr, g.data(), m.data(), v.data(), n, F(5), F(6), F(7), F(8), F(9), F(10), F(11),
                  F(12));
        });
        launch(grid_n(n), B, [&] {
            adamw(p2.data(), pb.data(), g.data(), m2.data(), v2.data(), n, F(5), F(6), F(7), F(8), F(9), F(10),
                  F(11), F(12));
        });
        store("p", p), store("m", m), store("v", v), store("p2", p2), store("pb", pb);
    } else if (k == "lionw") {  // n lr b1 b2 wd coef: without, then with the bf16 copy
        long n = I(4);
        auto p = load<float>("p"), g = load<float>("g"), m = load<float>("m");
        auto p2 = p, m2 = m;
        std::vector<uint16_t> pb(n);
        launch(grid_n(n), B, [&] { lionw(p.data(), nullptr, g.data(), m.data(), n, F(5), F(6), F(7), F(8), F(9)); });
        launch(grid_n(n), B, [&] { lionw(p2.data(), pb.data(), g.data(), m2.data(), n, F(5), F(6), F(7), F(8), F(9)); });
        store("p", p), store("m", m), store("p2", p2), store("pb", pb);
    } else {
        fprintf(stderr, "unknown kernel %s\n", k.c_str());
        return 2;
    }
    return 0;
}
