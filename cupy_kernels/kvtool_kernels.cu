// =====================================================================================================================
// kvtool compressed-KV kernels. Self-contained: no #include, so NVRTC needs no toolkit headers. 16-bit floats are
// handled as raw bit patterns (u16) and converted with PTX cvt / bit shifts.
// =====================================================================================================================
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
struct alignas(16) kv_u4 { u32 x, y, z, w; };     // 16-byte vector types of our own: no vector_types.h needed
struct alignas(16) kv_f4 { float x, y, z, w; };

#define KV_FULL 0xffffffffu
#define KV_NT 128                 // threads per CTA of the attention kernel: 4 warps
#define KV_NWARP (KV_NT / 32)
#define KV_MAX_CHUNKS 1024

// ------------------------------------------------------------------------------------------------ platform layer
// The only inline PTX of the file. A CPU emulation build (tests, KV_EMULATE) supplies its own versions.
#ifndef KV_EMULATE
#define KV_INF __int_as_float(0x7f800000)
static __device__ __forceinline__ float kv_h2f(u16 h) {            // fp16 bits -> float (exact)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
static __device__ __forceinline__ u16 kv_f2h(float f) {            // float -> fp16 bits, round to nearest even
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// 16-byte global -> shared copy that bypasses registers (sm_80+); only the first `src_bytes` (1..16) bytes are read,
// the rest of the 16 destination bytes are zero-filled. smem and gmem must be 16-byte aligned.
static __device__ __forceinline__ void kv_cp_async16(void* smem, const void* gmem, int src_bytes) {
#if __CUDA_ARCH__ >= 800
    u32 s;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#else
    const u8* g = (const u8*)gmem;
    u8* d = (u8*)smem;
    for (int i = 0; i < 16; ++i) d[i] = i < src_bytes ? g[i] : (u8)0;
#endif
}
static __device__ __forceinline__ void kv_cp_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> static __device__ __forceinline__ void kv_cp_wait() {   // at most N committed groups still pending
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}
#endif  // KV_EMULATE

// ------------------------------------------------------------------------------------------------ small helpers
template <typename T> static __device__ __forceinline__ T kv_min(T a, T b) { return a < b ? a : b; }
template <typename T> static __device__ __forceinline__ T kv_max(T a, T b) { return a > b ? a : b; }

static __device__ __forceinline__ float kv_b2f(u16 h) { return __uint_as_float(((u32)h) << 16); }   // bf16 -> float
template <bool BF16> static __device__ __forceinline__ float kv_16f(u16 h) { return BF16 ? kv_b2f(h) : kv_h2f(h); }

// Small unsigned integer (< 2^23) -> float without an I2F: the magic-number trick, exact.
static __device__ __forceinline__ float kv_u2f(u32 c) { return __uint_as_float(0x4B000000u | c) - 8388608.0f; }

// Byte offset of p inside its 16-byte block.
static __device__ __forceinline__ int kv_mis16(const void* p) { return (int)((u64)p & 15ull); }

// Sum over the TPT consecutive lanes that share a token row (butterfly; every one of them gets the total).
template <int TPT> static __device__ __forceinline__ float kv_sum_lanes(float v) {
#pragma unroll
    for (int off = TPT / 2; off >= 1; off >>= 1) v += __shfl_xor_sync(KV_FULL, v, off);
    return v;
}
static __device__ __forceinline__ float kv_warp_max(float v) {
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) v = fmaxf(v, __shfl_xor_sync(KV_FULL, v, off));
    return v;
}
static __device__ __forceinline__ float kv_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(KV_FULL, v, off);
    return v;
}

// Code c of a little-endian bit stream held in w[]: bits [BITS*c, BITS*c + BITS). This is exactly the packed layout
// of kvtool.quant.pack (8 codes -> BITS bytes, little-endian), read across the bytes of one slice of a row. Called
// with compile-time c (unrolled loops), so indices fold and w[] stays in registers. Only 3-bit codes straddle words.
template <int BITS, int NW> static __device__ __forceinline__ u32 kv_code(const u32 (&w)[NW], const int c) {
    const int p = BITS * c, i = p >> 5, s = p & 31;
    u32 v = w[i] >> s;
    if (s + BITS > 32 && i + 1 < NW) v |= w[i + 1] << (32 - s);
    return v & ((1u << BITS) - 1u);
}

// NB bytes at byte offset `off` of a 4-byte-aligned shared buffer, as little-endian 32-bit words (bytes past NB in
// the last word are whatever follows). Reads whole words: up to 7 bytes past off + NB (stage buffers are padded).
template <int NB>
static __device__ __forceinline__ void kv_read_bytes(const u8* base, int off, u32 (&out)[(NB + 3) / 4]) {
    constexpr int NW = (NB + 3) / 4;
    const u32* p = reinterpret_cast<const u32*>(base + (off & ~3));
    const u32 sh = (u32)(off & 3) * 8u;
    u32 t[NW + 1];
#pragma unroll
    for (int k = 0; k <= NW; ++k) t[k] = p[k];
#pragma unroll
    for (int k = 0; k < NW; ++k) out[k] = (u32)(((((u64)t[k + 1]) << 32) | (u64)t[k]) >> sh);
}

// Asynchronous copy of the byte range [src, src + nbytes) into dst (16-byte aligned shared memory), cooperatively by
// the KV_NT threads of the CTA, in 16-byte pieces. The copy starts at the 16-byte block that contains src, so the
// range lands at dst + kv_mis16(src). The few bytes read before src lie in the same tensor storage (the launcher
// checks that the tensor's base pointer is 16-byte aligned and src >= base); nothing past src + nbytes is read (the
// last piece is zero-filled).
static __device__ __forceinline__ void kv_copy_async(u8* dst, const u8* src, int nbytes, int tid) {
    const int a = kv_mis16(src);
    const u8* g = src - a;
    const int total = a + nbytes;
    for (int i = tid * 16; i < total; i += KV_NT * 16) kv_cp_async16(dst + i, g + i, kv_min(16, total - i));
}

// CPT 16-bit values from global memory at a 16-byte-aligned address -> float.
template <bool BF16, int CPT> static __device__ __forceinline__ void kv_load_row16(const u16* src, float (&f)[CPT]) {
#pragma unroll
    for (int k = 0; k < CPT / 8; ++k) {
        const kv_u4 u = reinterpret_cast<const kv_u4*>(src)[k];
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            f[8 * k + 2 * e] = kv_16f<BF16>((u16)(w[e] & 0xffffu));
            f[8 * k + 2 * e + 1] = kv_16f<BF16>((u16)(w[e] >> 16));
        }
    }
}

// Tokens per tile of the attention kernel from the bytes one body token needs (K codes + V codes + V lo/span).
// Keeps one pipeline stage at <= ~10 KB so two stages + the rest fit the 48 KB of static shared memory.
static __host__ __device__ constexpr int kv_tile(int bytes_per_token) {
    return bytes_per_token <= 160 ? 64 : (bytes_per_token <= 320 ? 32 : 16);
}
// Stage buffer size: data + 16 (realignment, <= 15 bytes) + 16 (whole-word over-reads), rounded to 16.
static __host__ __device__ constexpr int kv_pad(int bytes) { return (bytes + 32 + 15) / 16 * 16; }

// ------------------------------------------------------------------------------------------------ attention pieces
// One token row's scores for the CTA's G query heads: s_g = qlo_g + sum_c qr[g][c] * kf[c] summed over the TPT lanes
// of the row (log2 units: q carries scale * log2(e)). Every lane must call this (shuffles); `write` picks the lane.
template <int G, int CPT, int TPT, int TILE>
static __device__ __forceinline__ void kv_score_row(const float (&qr)[G][CPT], const float (&qlo)[G],
                                                    const float (&kf)[CPT], bool write, int n, float (&p_s)[G][TILE]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < CPT; ++c) s = fmaf(qr[g][c], kf[c], s);
        s = kv_sum_lanes<TPT>(s);
        if (write) p_s[g][n] = s + qlo[g];
    }
}

// Online softmax over one tile (flash-attention style), one warp per query head: new running max m, correction
// factor c = 2^(m_old - m_new) for the accumulators, running sum l, and p_s := 2^(s - m_new).
template <int G, int TILE>
static __device__ __forceinline__ void kv_softmax_tile(float (&p_s)[G][TILE], int rows, float* m_s, float* l_s,
                                                       float* c_s, int warp, int lane) {
    for (int g = warp; g < G; g += KV_NWARP) {
        float mx = -KV_INF;
        for (int n = lane; n < rows; n += 32) mx = fmaxf(mx, p_s[g][n]);
        mx = kv_warp_max(mx);
        const float m_old = m_s[g];
        const float m_new = fmaxf(m_old, mx);
        float sum = 0.f;
        for (int n = lane; n < rows; n += 32) {
            const float p = exp2f(p_s[g][n] - m_new);
            p_s[g][n] = p;
            sum += p;
        }
        sum = kv_warp_sum(sum);
        __syncwarp();
        if (lane == 0) {
            const float c = exp2f(m_old - m_new);       // 0 on the first tile (m_old = -inf)
            c_s[g] = c;
            l_s[g] = fmaf(l_s[g], c, sum);
            m_s[g] = m_new;
        }
    }
}

template <int G, int CPT, int TILE>
static __device__ __forceinline__ void kv_accumulate(float (&acc)[G][CPT], const float (&vf)[CPT],
                                                     const float (&p_s)[G][TILE], int n) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float p = p_s[g][n];
#pragma unroll
        for (int c = 0; c < CPT; ++c) acc[g][c] = fmaf(p, vf[c], acc[g][c]);
    }
}

template <int G, int CPT>
static __device__ __forceinline__ void kv_rescale(float (&acc)[G][CPT], const float* c_s) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float c = c_s[g];
#pragma unroll
        for (int k = 0; k < CPT; ++k) acc[g][k] *= c;
    }
}

// =====================================================================================================================
// Split-K ("flash-decoding") attention of one decode step over a retrieval head's store: sink (16-bit) | quantized
// body | recent buffer (16-bit). A streaming head's window is the same call with only the 16-bit sink part.
//
// grid  = (n_chunks, H, B * Gtot / G); CTA (chunk, h, z) handles one chunk of ONE segment of KV head h of batch b =
//         z / (Gtot / G) for the G query heads g0 .. g0+G-1 of that KV head (g0 = (z % (Gtot / G)) * G): every K/V
//         byte is read once per CTA and serves all G heads (GQA).
// block = KV_NT threads. A token row of D channels is split over TPT = D / CPT threads, each owning a slice of CPT
//         consecutive channels (CPT/8 whole packing groups); ROWS = KV_NT / TPT rows are processed at once.
// body  = tiles of TILE tokens copied global -> shared with cp.async, double buffered (tile i+1 in flight while tile
//         i is computed): the K codes, V codes, V lo and V span of a tile are four contiguous byte ranges, copied in
//         coalesced 16-byte pieces. Codes are decoded from shared memory straight into registers: there is no
//         dequantized copy anywhere.
// out   = per (query head, chunk): unnormalised sum_n 2^(s_n - m) v_n (part_o), m (log2 units) and sum_n 2^(s_n - m)
//         (part_ml); kv_decode_merge combines the chunks.
// Keys:   k = lo_d + level(code) * span_d, so q.k = sum_d q_d lo_d + sum_d (q_d span_d) level(code): the first sum is
//         per CTA (qlo), the second folds span into q once per CTA (qr), leaving one FMA per code and query head.
//         Uniform codebooks (KUNI) use level(c) = c / (2^KB - 1) with the step folded into qr too.
// Values: v = lo_tok,grp + level(code) * span_tok,grp (fp16 scales); uniform codebooks (VUNI) likewise.
// Requirements (checked by the launcher): D in {32, 64, 128, 256}; CPT in {8, 16, 32} dividing D with D / CPT <= 32;
// GROUP a power of two >= 8 dividing D; q fp32 contiguous [B, H*Gtot, D]; 16-bit rows 16-byte aligned; code and
// scale tensors with 16-byte-aligned base pointers and rows contiguous inside a (b, h) head (head/batch strides
// free); every chunk non-empty.
// =====================================================================================================================
template <bool BF16, int D, int G, int CPT, int KB, int VB, int GROUP, bool KUNI, bool VUNI>
__global__ void __launch_bounds__(KV_NT) kv_decode_split(
    const float* __restrict__ q,                                                   // [B, H*Gtot, D] fp32, * nothing
    const u16* __restrict__ k_sink, const u16* __restrict__ v_sink, i64 sink_sb, i64 sink_sh, i64 S,
    const u8* __restrict__ k_codes, i64 kc_sb, i64 kc_sh,                          // [B, H, T, D*KB/8]
    const u8* __restrict__ v_codes, i64 vc_sb, i64 vc_sh,                          // [B, H, T, D*VB/8]
    const float* __restrict__ k_lo, const float* __restrict__ k_span,              // [H, D]
    const float* __restrict__ k_lev, i64 k_lev_hs,                                 // [2^KB] (hs 0) or [H, 2^KB]
    const u16* __restrict__ v_lo, const u16* __restrict__ v_span, i64 vs_sb, i64 vs_sh,   // [B, H, T, D/GROUP]
    const float* __restrict__ v_lev, i64 v_lev_hs,
    i64 T,
    const u16* __restrict__ k_buf, const u16* __restrict__ v_buf, i64 buf_sb, i64 buf_sh, i64 R,
    i64 H, i64 Gtot, float qscale,                                                 // qscale = softmax scale * log2(e)
    i64 chunk_plain, i64 chunk_body, i64 n_sink_chunks, i64 n_body_chunks, i64 n_chunks,
    float* __restrict__ part_o,                                                    // [B*H*Gtot, n_chunks, D]
    float* __restrict__ part_ml)                                                   // [B*H*Gtot, n_chunks, 2]
{
    constexpr int TPT = D / CPT;                          // threads per token row
    constexpr int ROWS = KV_NT / TPT;                     // rows in flight per pass
    constexpr int KW = D * KB / 8, VW = D * VB / 8;       // packed bytes per token row
    constexpr int NG = D / GROUP;                         // value groups per row
    constexpr int NBK = CPT * KB / 8, NBV = CPT * VB / 8; // packed bytes of one thread's slice
    constexpr int NWK = (NBK + 3) / 4, NWV = (NBV + 3) / 4;
    constexpr int TILE = kv_tile(KW + VW + 4 * NG);
    constexpr int UPT = (TILE + ROWS - 1) / ROWS;         // row passes per tile
    constexpr int NGT = CPT >= GROUP ? CPT / GROUP : 1;   // value groups inside one slice
    constexpr int KBUF = kv_pad(TILE * KW), VBUF = kv_pad(TILE * VW), SBUF = kv_pad(TILE * NG * 2);
    static_assert(CPT % 8 == 0 && D % CPT == 0, "a slice holds whole packing groups");
    static_assert(TPT >= 1 && TPT <= 32 && (TPT & (TPT - 1)) == 0, "a row's lanes form an aligned power-of-two group");
    static_assert(GROUP % 8 == 0 && D % GROUP == 0 && (CPT % GROUP == 0 || GROUP % CPT == 0), "value groups");
    static_assert(G >= 1 && G <= 8, "query heads per CTA");

    constexpr int STAGE = KBUF + VBUF + 2 * SBUF;                   // bytes, a multiple of 16
    __shared__ kv_u4 stage_v[2][STAGE / 16];                         // body tiles: K codes | V codes | V lo | V span
    __shared__ float p_s[G][TILE];                                   // scores, then probabilities, of one tile
    __shared__ float lev_k[KUNI ? 1 : (1 << KB)];                    // codebooks (non-uniform only)
    __shared__ float lev_v[VUNI ? 1 : (1 << VB)];
    __shared__ float m_s[G], l_s[G], c_s[G];                         // running max (log2), sum, last correction
    __shared__ float red_s[KV_NWARP][D];                             // final cross-warp reduction

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int j = tid % TPT;                              // channel slice [j*CPT, (j+1)*CPT)
    const int r = tid / TPT;                              // row lane group
    const int chunk = blockIdx.x, h = blockIdx.y;
    const int gblocks = (int)(Gtot / G);
    const int b = blockIdx.z / gblocks, g0 = (blockIdx.z % gblocks) * G;
    const i64 hq0 = ((i64)b * H + h) * Gtot + g0;         // first query-head row of this CTA in [B*H*Gtot]

    // ---- which segment, which tokens: [start, start + len) of that segment (len >= 1 by construction)
    int seg;
    i64 start, len;
    if (chunk < n_sink_chunks) {
        seg = 0; start = chunk * chunk_plain; len = kv_min(chunk_plain, S - start);
    } else if (chunk < n_sink_chunks + n_body_chunks) {
        seg = 1; start = (chunk - n_sink_chunks) * chunk_body; len = kv_min(chunk_body, T - start);
    } else {
        seg = 2; start = (chunk - n_sink_chunks - n_body_chunks) * chunk_plain; len = kv_min(chunk_plain, R - start);
    }

    // ---- this thread's slice of the G queries, in log2-softmax units; body: span (and uniform step) folded in
    float qr[G][CPT], qlo[G], acc[G][CPT];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float* qp = q + (hq0 + g) * D + j * CPT;
#pragma unroll
        for (int c = 0; c < CPT; ++c) { qr[g][c] = qp[c] * qscale; acc[g][c] = 0.f; }
        qlo[g] = 0.f;
    }
    if (seg == 1) {
        const float kstep = KUNI ? 1.0f / (float)((1 << KB) - 1) : 1.0f;
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            const float lo = k_lo[(i64)h * D + j * CPT + c];
            const float sp = k_span[(i64)h * D + j * CPT + c] * kstep;
#pragma unroll
            for (int g = 0; g < G; ++g) { qlo[g] = fmaf(qr[g][c], lo, qlo[g]); qr[g][c] *= sp; }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) qlo[g] = kv_sum_lanes<TPT>(qlo[g]);
        if (!KUNI) for (int i = tid; i < (1 << KB); i += KV_NT) lev_k[i] = k_lev[h * k_lev_hs + i];
        if (!VUNI) for (int i = tid; i < (1 << VB); i += KV_NT) lev_v[i] = v_lev[h * v_lev_hs + i];
    }
    if (tid < G) { m_s[tid] = -KV_INF; l_s[tid] = 0.f; }
    __syncthreads();

    const int ntiles = (int)((len + TILE - 1) / TILE);
    if (seg == 1) {
        // ============================================================ quantized body, cp.async double buffering
        const u8* kc = k_codes + b * kc_sb + h * kc_sh;                 // row t at kc + t * KW
        const u8* vc = v_codes + b * vc_sb + h * vc_sh;                 // row t at vc + t * VW
        const u16* vl = v_lo + b * vs_sb + h * vs_sh;                   // row t at vl + t * NG
        const u16* vsp = v_span + b * vs_sb + h * vs_sh;
        const float vstep = VUNI ? 1.0f / (float)((1 << VB) - 1) : 1.0f;

        for (int it = -1; it < ntiles; ++it) {
            // issue tile it + 1 (the prologue, it = -1, issues tile 0 only)
            if (it + 1 < ntiles) {
                const i64 row0 = start + (i64)(it + 1) * TILE;
                const int rows = (int)kv_min((i64)TILE, len - (i64)(it + 1) * TILE);
                u8* st = reinterpret_cast<u8*>(stage_v[(it + 1) & 1]);
                kv_copy_async(st, kc + row0 * KW, rows * KW, tid);
                kv_copy_async(st + KBUF, vc + row0 * VW, rows * VW, tid);
                kv_copy_async(st + KBUF + VBUF, (const u8*)(vl + row0 * NG), rows * NG * 2, tid);
                kv_copy_async(st + KBUF + VBUF + SBUF, (const u8*)(vsp + row0 * NG), rows * NG * 2, tid);
                kv_cp_commit();
            }
            if (it < 0) continue;
            if (it + 1 < ntiles) kv_cp_wait<1>(); else kv_cp_wait<0>();     // tile `it` has landed (this thread's part)
            __syncthreads();                                                // ... and everybody else's

            const i64 row0 = start + (i64)it * TILE;
            const int rows = (int)kv_min((i64)TILE, len - (i64)it * TILE);
            const u8* st = reinterpret_cast<const u8*>(stage_v[it & 1]);
            const int ak = kv_mis16(kc + row0 * KW), av = kv_mis16(vc + row0 * VW);
            const int al = kv_mis16(vl + row0 * NG), as = kv_mis16(vsp + row0 * NG);

            // scores: decode this thread's K slice of each of its rows, dot with the G queries
#pragma unroll
            for (int u = 0; u < UPT; ++u) {
                const int n = r + u * ROWS;
                const bool valid = n < rows;
                const int nn = valid ? n : 0;                 // invalid rows re-read row 0 (finite) and are dropped
                u32 w[NWK];
                kv_read_bytes<NBK>(st, ak + nn * KW + j * NBK, w);
                float kf[CPT];
#pragma unroll
                for (int c = 0; c < CPT; ++c) {
                    const u32 code = kv_code<KB>(w, c);
                    kf[c] = KUNI ? kv_u2f(code) : lev_k[code];
                }
                kv_score_row<G, CPT, TPT, TILE>(qr, qlo, kf, valid && j == 0, n, p_s);
            }
            __syncthreads();
            kv_softmax_tile<G, TILE>(p_s, rows, m_s, l_s, c_s, warp, lane);
            __syncthreads();
            kv_rescale<G, CPT>(acc, c_s);

            // values: decode this thread's V slice of each row, accumulate p * v for the G heads
#pragma unroll
            for (int u = 0; u < UPT; ++u) {
                const int n = r + u * ROWS;
                if (n < rows) {
                    u32 w[NWV];
                    kv_read_bytes<NBV>(st + KBUF, av + n * VW + j * NBV, w);
                    float lo[NGT], sp[NGT];
                    const u8* lo_row = st + KBUF + VBUF + al + n * NG * 2;           // this row's fp16 lo, span
                    const u8* sp_row = st + KBUF + VBUF + SBUF + as + n * NG * 2;
#pragma unroll
                    for (int t = 0; t < NGT; ++t) {
                        const int gi = (j * CPT) / GROUP + t;
                        lo[t] = kv_h2f(*reinterpret_cast<const u16*>(lo_row + gi * 2));
                        sp[t] = kv_h2f(*reinterpret_cast<const u16*>(sp_row + gi * 2)) * vstep;
                    }
                    float vf[CPT];
#pragma unroll
                    for (int c = 0; c < CPT; ++c) {
                        const u32 code = kv_code<VB>(w, c);
                        const float lev = VUNI ? kv_u2f(code) : lev_v[code];
                        const int t = NGT > 1 ? c / GROUP : 0;
                        vf[c] = fmaf(lev, sp[t], lo[t]);
                    }
                    kv_accumulate<G, CPT, TILE>(acc, vf, p_s, n);
                }
            }
            __syncthreads();                                  // this stage and p_s are free again
        }
    } else {
        // ============================================================ 16-bit sink / recent buffer, direct loads
        const u16* kp = seg == 0 ? k_sink + b * sink_sb + h * sink_sh : k_buf + b * buf_sb + h * buf_sh;
        const u16* vp = seg == 0 ? v_sink + b * sink_sb + h * sink_sh : v_buf + b * buf_sb + h * buf_sh;
        for (int it = 0; it < ntiles; ++it) {
            const i64 row0 = start + (i64)it * TILE;
            const int rows = (int)kv_min((i64)TILE, len - (i64)it * TILE);
#pragma unroll
            for (int u = 0; u < UPT; ++u) {
                const int n = r + u * ROWS;
                const bool valid = n < rows;
                const int nn = valid ? n : 0;
                float kf[CPT];
                kv_load_row16<BF16, CPT>(kp + (row0 + nn) * D + j * CPT, kf);
                kv_score_row<G, CPT, TPT, TILE>(qr, qlo, kf, valid && j == 0, n, p_s);
            }
            __syncthreads();
            kv_softmax_tile<G, TILE>(p_s, rows, m_s, l_s, c_s, warp, lane);
            __syncthreads();
            kv_rescale<G, CPT>(acc, c_s);
#pragma unroll
            for (int u = 0; u < UPT; ++u) {
                const int n = r + u * ROWS;
                if (n < rows) {
                    float vf[CPT];
                    kv_load_row16<BF16, CPT>(vp + (row0 + n) * D + j * CPT, vf);
                    kv_accumulate<G, CPT, TILE>(acc, vf, p_s, n);
                }
            }
            __syncthreads();
        }
    }

    // ---- reduce the accumulators over the rows: inside a warp (lanes with the same slice), then across warps
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int c = 0; c < CPT; ++c)
#pragma unroll
            for (int off = TPT; off < 32; off <<= 1) acc[g][c] += __shfl_xor_sync(KV_FULL, acc[g][c], off);
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (lane < TPT) {                                 // row 0 of the warp; its slice is j == lane
#pragma unroll
            for (int c = 0; c < CPT; ++c) red_s[warp][lane * CPT + c] = acc[g][c];
        }
        __syncthreads();
        for (int d = tid; d < D; d += KV_NT) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < KV_NWARP; ++w) s += red_s[w][d];
            part_o[((hq0 + g) * n_chunks + chunk) * D + d] = s;
        }
        __syncthreads();
    }
    if (tid < G) {
        part_ml[((hq0 + tid) * n_chunks + chunk) * 2] = m_s[tid];
        part_ml[((hq0 + tid) * n_chunks + chunk) * 2 + 1] = l_s[tid];
    }
}

// =====================================================================================================================
// Log-sum-exp merge of the chunks: out[row] = sum_i 2^(m_i - M) o_i / sum_i 2^(m_i - M) l_i, M = max_i m_i.
// grid = (B*H*Gtot), block = 128. part_* as written by kv_decode_split; out fp32 [B*H*Gtot, D].
// =====================================================================================================================
__global__ void __launch_bounds__(128) kv_decode_merge(const float* __restrict__ part_o,
                                                       const float* __restrict__ part_ml, i64 n_chunks, i64 D,
                                                       float* __restrict__ out) {
    __shared__ float w_s[KV_MAX_CHUNKS];
    const i64 row = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    const float* ml = part_ml + row * n_chunks * 2;
    float M = -KV_INF;
    for (i64 i = 0; i < n_chunks; ++i) M = fmaxf(M, ml[2 * i]);
    for (i64 i = tid; i < n_chunks; i += nt) w_s[i] = exp2f(ml[2 * i] - M);
    __syncthreads();
    float L = 0.f;
    for (i64 i = 0; i < n_chunks; ++i) L = fmaf(ml[2 * i + 1], w_s[i], L);
    for (i64 d = tid; d < D; d += nt) {
        float o = 0.f;
        for (i64 i = 0; i < n_chunks; ++i) o = fmaf(part_o[(row * n_chunks + i) * D + d], w_s[i], o);
        out[row * D + d] = o / L;
    }
}

// =====================================================================================================================
// Quantize + pack. One thread per packing group of 8 consecutive channels of one token (-> BITS bytes).
// =====================================================================================================================
// Eight consecutive elements of x (fp32 XT=0, fp16 XT=1, bf16 XT=2) at element offset off (a multiple of 8; x has
// a 16-byte-aligned base, so the vector loads are aligned).
template <int XT> static __device__ __forceinline__ void kv_load8(const void* x, i64 off, float (&v)[8]) {
    if constexpr (XT == 0) {
        const kv_f4* p = reinterpret_cast<const kv_f4*>(reinterpret_cast<const float*>(x) + off);
        const kv_f4 a = p[0], c = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = c.x; v[5] = c.y; v[6] = c.z; v[7] = c.w;
    } else {
        const kv_u4 u = *reinterpret_cast<const kv_u4*>(reinterpret_cast<const u16*>(x) + off);
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[2 * e] = kv_16f<XT == 2>((u16)(w[e] & 0xffffu));
            v[2 * e + 1] = kv_16f<XT == 2>((u16)(w[e] >> 16));
        }
    }
}

// Nearest level of t in [0, 1] = the number of decision midpoints strictly below t, which is what
// torch.bucketize(t, mids, right=False) / torch.searchsorted(mids, t) return in kvtool.quant.encode. Branch-free
// binary search over the 2^BITS - 1 sorted midpoints (indices stay <= 2^BITS - 2).
template <int BITS> static __device__ __forceinline__ u32 kv_encode(float t, const float* __restrict__ mids) {
    u32 pos = 0;
#pragma unroll
    for (int step = (1 << BITS) / 2; step >= 1; step >>= 1)
        if (mids[pos + step - 1] < t) pos += step;
    return pos;
}

// Store the 8*BITS-bit little-endian word of one packing group (dst = out + group * BITS: aligned for 2/4/8 bits).
template <int BITS> static __device__ __forceinline__ void kv_store_packed(u8* dst, u64 word) {
    if constexpr (BITS == 8) *reinterpret_cast<u64*>(dst) = word;
    else if constexpr (BITS == 4) *reinterpret_cast<u32*>(dst) = (u32)word;
    else if constexpr (BITS == 2) *reinterpret_cast<u16*>(dst) = (u16)word;
    else { dst[0] = (u8)word; dst[1] = (u8)(word >> 8); dst[2] = (u8)(word >> 16); }
}

// Keys, per channel with calibrated ranges: t = clamp((x - lo[h, d]) / span[h, d], 0, 1), code = nearest level.
// x [B, H, T, D] contiguous; lo, span fp32 [H, D]; mids fp32 [2^BITS - 1] (mids_hs 0) or [H, 2^BITS - 1].
template <int XT, int BITS>
__global__ void __launch_bounds__(256) kv_quantize_keys(const void* __restrict__ x, i64 n_groups, i64 D, i64 H, i64 T,
                                                        const float* __restrict__ lo, const float* __restrict__ span,
                                                        const float* __restrict__ mids, i64 mids_hs,
                                                        u8* __restrict__ out) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_groups) return;
    const i64 gpr = D / 8;                                // packing groups per row
    const i64 row = idx / gpr;                            // (b*H + h)*T + t
    const int p = (int)(idx - row * gpr);
    const i64 h = (row / T) % H;
    float v[8];
    kv_load8<XT>(x, idx * 8, v);
    const float* lo_h = lo + h * D + p * 8;
    const float* sp_h = span + h * D + p * 8;
    const float* md = mids + h * mids_hs;
    u64 word = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float t = (v[i] - lo_h[i]) / sp_h[i];             // IEEE division, as torch
        t = fminf(fmaxf(t, 0.f), 1.f);
        word |= (u64)kv_encode<BITS>(t, md) << (BITS * i);
    }
    kv_store_packed<BITS>(out + idx * BITS, word);
}

// Values, per token in groups of GROUP channels (KIVI): lo = fp16(min), span = fp16(max - float(lo)), codes from the
// fp16-rounded lo and max(span, 1e-8) exactly as kvtool.quant.quantize_tokens. The GROUP/8 threads of a group are
// consecutive lanes of one warp (rows hold D/8 groups, a multiple of GROUP/8), reduced with xor shuffles; threads past
// the end still take part in the shuffles.
template <int XT, int BITS, int GROUP>
__global__ void __launch_bounds__(256) kv_quantize_values(const void* __restrict__ x, i64 n_groups, i64 D, i64 H, i64 T,
                                                          const float* __restrict__ mids, i64 mids_hs,
                                                          u8* __restrict__ out, u16* __restrict__ lo_out,
                                                          u16* __restrict__ span_out) {
    constexpr int TPG = GROUP / 8;
    static_assert(GROUP % 8 == 0 && TPG <= 32 && (TPG & (TPG - 1)) == 0, "GROUP: a power of two in [8, 256]");
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = idx < n_groups;
    float v[8];
    if (live) kv_load8<XT>(x, idx * 8, v);
    else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
    float mn = v[0], mx = v[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) { mn = fminf(mn, v[i]); mx = fmaxf(mx, v[i]); }
#pragma unroll
    for (int off = 1; off < TPG; off <<= 1) {
        mn = fminf(mn, __shfl_xor_sync(KV_FULL, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(KV_FULL, mx, off));
    }
    if (!live) return;
    const u16 lo16 = kv_f2h(mn);
    const float lo32 = kv_h2f(lo16);
    const u16 sp16 = kv_f2h(mx - lo32);
    const float sp32 = fmaxf(kv_h2f(sp16), 1e-8f);
    const i64 gpr = D / 8;
    const i64 row = idx / gpr;
    const int p = (int)(idx - row * gpr);
    const i64 h = (row / T) % H;
    const float* md = mids + h * mids_hs;
    u64 word = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float t = (v[i] - lo32) / sp32;
        t = fminf(fmaxf(t, 0.f), 1.f);
        word |= (u64)kv_encode<BITS>(t, md) << (BITS * i);
    }
    kv_store_packed<BITS>(out + idx * BITS, word);
    if (p % TPG == 0) {
        const i64 gi = row * (D / GROUP) + p / TPG;
        lo_out[gi] = lo16;
        span_out[gi] = sp16;
    }
}
