// grid_order.h: the order in which v2's causal grids take their (tile, head) pairs, shared by the forward and the
// dK/dV kernel's launches, their tests and the course's exercise v2-grid-order (docs/v2.md, "The causal grid order").
#pragma once
#include <cuda_runtime.h>

#include <vector>

#include "common/blocks.cuh"  // ceil_div

// The order in which a grid's blocks take (tile, head) pairs, for grids where every head's tile 0 is the heaviest
// (causal: v2's forward takes its Q tiles last first, its dK/dV kernel its K/V tiles first first). The GPU starts
// blocks about in the order of their linear index, x fastest, then y, then z. Taken head by head, the last heads'
// heavy tiles start last, and at the end a few SMs still work while the others idle. Taken tile-major over all heads,
// every heavy tile starts first and the tail is light, but each wave of blocks then holds tiles of many heads, whose
// inputs do not share L2. In between: the heads in chunks of `chunk`, each chunk tile-major. The grid is (chunk,
// tiles, chunks): block (x, y, z) takes tile y of head z chunk + x - pad, where the pad < chunk unused heads sit in
// front of the first chunk (their blocks return at once), so that the grid ends on a full chunk. With chunk = 1 the
// grid is (1, tiles, heads), each head's tiles in turn. Block coordinates, a multiply and an add: no division.
struct GridOrder {
    int chunk = 1;  // heads a chunk
    int pad = 0;    // chunks * chunk - heads
    // The head of block (x, z); negative for the first chunk's unused blocks.
    __host__ __device__ int head(int x, int z) const { return z * chunk + x - pad; }
};
struct OrderedGrid {
    GridOrder order;
    dim3 grid;
};
inline OrderedGrid ordered_grid(int tiles, int heads, int chunk) {
    const int chunks = ceil_div(heads, chunk);
    return {GridOrder{chunk, chunks * chunk - heads}, dim3(unsigned(chunk), unsigned(tiles), unsigned(chunks))};
}
// The grid's blocks in the order the GPU starts them (x fastest, then y, then z), on the host: each block's tile, head
// (negative: unused) and chunk. What the tests and the course's exercise walk.
struct GridBlock {
    int tile, head, chunk;
};
inline std::vector<GridBlock> blocks_in_start_order(const OrderedGrid& g) {
    std::vector<GridBlock> blocks;
    for (unsigned z = 0; z < g.grid.z; ++z)
        for (unsigned y = 0; y < g.grid.y; ++y)
            for (unsigned x = 0; x < g.grid.x; ++x) blocks.push_back({int(y), g.order.head(int(x), int(z)), int(z)});
    return blocks;
}
// The chunk of v2's causal launches: the fewest heads whose tiles fill two waves of the grid (slots: the blocks
// resident on the GPU at once), at least one, at most all of them. On an H100 (docs/v2.md, "The causal grid order")
// all heads in one chunk lost up to 13% (short backward sequences) and chunks of one wave up to 5%, where two waves
// stayed within 1.5% of the best of the three at every shape timed: up to 10% faster than head by head, 0.8% slower
// at worst.
inline int heavy_first_chunk(int tiles, int heads, int slots) {
    // EXERCISE(v2-grid-order): how many heads a chunk of a causal grid takes
    const int chunk = ceil_div(2 * slots, tiles);
    return chunk < 1 ? 1 : chunk < heads ? chunk : heads;
    // END EXERCISE
}

// The extension kernels' grid with a bias broadcast over the batch ([1, H or 1, Nq, Nk]): the heads that read the same
// bias elements take consecutive blocks, so they run side by side on one tile and all but the first read its bias
// from L2 instead of device memory. Block `block` (linear, in start order) of a (tiles, heads) grid takes tile
// `block / sharing % tiles` of head `b * (heads / sharing) + h`, with b = block % sharing and h = block / sharing /
// tiles: heads are b-major (head = b H + h), and the `sharing` heads of one h are the batch entries (sharing = B), or
// all of them when one bias serves every head (sharing = heads, h = 0).
struct TileOfHead {
    int tile, head;
};
__host__ __device__ inline TileOfHead bias_sharing_order(int block, int tiles, int heads, int sharing) {
    return {block / sharing % tiles, block % sharing * (heads / sharing) + block / sharing / tiles};
}
