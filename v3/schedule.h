// schedule.h: which K/V tiles a Q tile visits and which of them need the mask, shared by the kernel and the tests.
#pragma once
#include <cuda_runtime.h>  // before problem.h, which uses __host__ __device__

#include <vector>

#include "problem.h"

struct V3KvTiles {
    int n_tiles;       // K/V tiles of Bc keys the Q tile visits: 0 .. n_tiles - 1 (0 when all its rows are masked)
    int first_masked;  // tiles from this one on hold a key some row of the Q tile must not see (causal or key >= Nk)
};

// Q tile rows [q0, q0 + Br) (cut at Nq). Non-causal: every key, tiles past Nk's last partial one masked. Causal
// (bottom-right: row i sees keys j < causal_key_end(i)): the tiles up to the last key the last row sees; a tile is
// unmasked when every row of the Q tile, the first one included, sees all its keys.
__host__ __device__ inline V3KvTiles v3_kv_tiles(int q0, int Br, int Nq, int Nk, int Bc, bool causal) {
    const int q_last = (q0 + Br < Nq ? q0 + Br : Nq) - 1;
    int kv_end = Nk, unmasked_end = Nk;  // keys [0, kv_end) visited; [0, unmasked_end) seen by every row
    if (causal) {
        const int last_sees = causal_key_end(q_last, Nq, Nk), first_sees = causal_key_end(q0, Nq, Nk);
        kv_end = last_sees < Nk ? last_sees : Nk;
        unmasked_end = first_sees < Nk ? first_sees : Nk;
    }
    V3KvTiles t;
    t.n_tiles = kv_end > 0 ? (kv_end + Bc - 1) / Bc : 0;
    t.first_masked = unmasked_end > 0 ? unmasked_end / Bc : 0;
    return t;
}

// Which Q tiles a CTA works on. The grid's work is the tiles (head bh, Q tile i) in one sequence, head by head, so
// that the CTAs running at one time share a few heads' K and V in L2. Up to step 6 there is one CTA per tile, and a
// causal head's tiles go last first (the last Q tiles see the most keys: started first, they shorten the grid's
// tail). From step 7 (persistent) a CTA per SM walks the sequence in turns: CTA b takes turns b, b + G, b + 2G, ...
// of the grid's G CTAs. A causal head's tiles then alternate last, first, second-last, second, ... and a turn is two
// tiles, a heavy one and a light one that together see about n_q + 1 K/V tiles: equal shares for every CTA, with
// no global counter. (One tile per turn in that order gives CTA b the tiles b, b + G, ... of a head: with n_q = 8
// and G = 132 some CTAs would get twice the work of others.)
struct V3TileOrder {
    int n_q;        // Q tiles of a head
    int positions;  // tiles in the sequence: n_q * heads
    bool persistent, causal;

    __host__ __device__ int per_turn() const { return persistent && causal ? 2 : 1; }  // tiles a CTA takes at once
    int ctas(int sms) const {  // CTAs to launch
        const int turns = (positions + per_turn() - 1) / per_turn();
        return persistent && sms < turns ? sms : turns;
    }
    __host__ __device__ int first(int cta) const { return cta * per_turn(); }
    __host__ __device__ int next(int pos, int ctas) const {
        return (pos + 1) % per_turn() != 0 ? pos + 1 : pos + 1 + (ctas - 1) * per_turn();
    }
    __host__ __device__ void tile(int pos, int* bh, int* i) const {  // position -> head, Q tile
        const int k = pos % n_q;  // the k-th tile of head bh in the sequence
        *bh = pos / n_q;
        if (!causal) {
            *i = k;
        } else if (!persistent) {
            *i = n_q - 1 - k;  // the heaviest first
        } else {
            // EXERCISE(v3-causal-order): Q tile *i for the k-th position of a head, a persistent causal grid
            *i = k % 2 == 0 ? n_q - 1 - k / 2 : k / 2;  // last, first, second-last, second, ...
            // END EXERCISE
        }
    }
};

__host__ __device__ inline V3TileOrder v3_tile_order(int Nq, int Br, int heads, bool persistent, bool causal) {
    const int n_q = (Nq + Br - 1) / Br;
    return V3TileOrder{n_q, n_q * heads, persistent, causal};
}

// The grid's walk, on the host (the tests and the course's exercise v3-causal-order): every CTA of `ctas` takes its
// positions of `order` as the kernel does, and each (head, Q tile) it meets adds the K/V tiles the tile visits
// (v3_kv_tiles, tiles of Bc keys) to that CTA's share. seen counts each (head, Q tile), head by head: all ones when
// the order takes every tile once. in_range is false, and the walk stops, at a tile outside the grid.
struct V3Walk {
    std::vector<long> share;  // per CTA
    std::vector<int> seen;    // per (head, Q tile): bh * n_q + i
    bool in_range = true;
};
inline V3Walk v3_walk(const V3TileOrder& order, int ctas, int Br, int Nq, int Nk, int Bc, bool causal) {
    V3Walk w{std::vector<long>(size_t(ctas), 0), std::vector<int>(size_t(order.positions), 0)};
    for (int b = 0; b < ctas; ++b)
        for (int pos = order.first(b); pos < order.positions; pos = order.next(pos, ctas)) {
            int bh, i;
            order.tile(pos, &bh, &i);
            if (bh < 0 || bh >= order.positions / order.n_q || i < 0 || i >= order.n_q) {
                w.in_range = false;
                return w;
            }
            ++w.seen[size_t(bh) * order.n_q + i];
            w.share[size_t(b)] += v3_kv_tiles(i * Br, Br, Nq, Nk, Bc, causal).n_tiles;
        }
    return w;
}
