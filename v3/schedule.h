// schedule.h: which K/V tiles a Q tile visits and which of them need the mask, shared by the kernel and the tests.
#pragma once
#include <cuda_runtime.h>  // before problem.h, which uses __host__ __device__

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
