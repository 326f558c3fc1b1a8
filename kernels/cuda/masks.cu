// masks.cu — grid-wise and uniform masks, and UM-MAE's compaction of a uniformly masked token grid
// on CUDA devices, the same bytes and element moves as kernels/cpu/masks.c.
//
// A group mask takes one block per image: the block marks every patch removed, then the kept ones.
// Grid-wise groups are independent and go in parallel; a uniform image's pool walk is sequential,
// so its thread 0 draws every group (64 steps for a 256-px UM-MAE image).
//
// Compaction is a direct gather (forward) and the scatter of its gradient with zeros elsewhere
// (backward). The runtime reads the mask, checks it and hands over the table of kept patches on
// x's device.
//
// Tokens are channels last, so a patch row of p tokens is one run of p*C contiguous elements in
// x, out, g and gx alike. Runs move in units of up to 16 bytes (the widest access that divides a
// token and suits the buffers' alignment), one unit per thread; nothing is converted or summed.
#include "loop.cuh"

namespace {
// ---- group masks -------------------------------------------------------------------------------
struct group_geom {
  int64_t n, h, w, per_position;  // images, patch grid, pool entries per position (0: grid-wise)
};

// Position v of group g (row-major on the group grid) as a patch index.
__device__ int64_t kept_patch(const group_geom &k, int64_t g, int64_t v) {
  int64_t gw = k.w / 2;
  return (2 * (g / gw) + v / 2) * k.w + 2 * (g % gw) + v % 2;
}

// The position a raw lane takes from a pool holding left[v] entries of each position v (ordered by
// position, `remaining` in all): the entry floor(lane * remaining / 2^32), which leaves the pool.
__device__ int64_t take_from_pool(int64_t left[4], int64_t remaining, int64_t lane) {
  int64_t r = (int64_t)(((uint64_t)lane * (uint64_t)remaining) >> 32), v = 0;
  for (; r >= left[v]; v++) r -= left[v];
  left[v]--;
  return v;
}

__global__ void group_mask_kernel(group_geom k, const int64_t *draw, uint8_t *out) {
  int64_t cells = k.h * k.w, groups = cells / 4, per = k.per_position;
  for (int64_t i = blockIdx.x; i < k.n; i += gridDim.x) {
    uint8_t *m = out + i * cells;
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) m[c] = 1;
    __syncthreads();
    if (per == 0) {
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) m[kept_patch(k, g, draw[i])] = 0;
    } else if (threadIdx.x == 0) {
      int64_t left[4] = {per, per, per, per};
      for (int64_t g = 0; g < groups; g++) {
        int64_t v = take_from_pool(left, 4 * per - g, draw[i * groups + g]);
        m[kept_patch(k, g, v)] = 0;
      }
    }
    __syncthreads();
  }
}

constexpr int GROUP_MASK_THREADS = 128;
constexpr int64_t GROUP_MASK_MAX_BLOCKS = 65535;

// ---- compaction --------------------------------------------------------------------------------
struct compact_geom {
  int64_t n, h, w, p;  // images, full token grid, tokens per patch side
  int64_t run;         // units per patch row (p tokens)
  int64_t wp, gw, groups, ho;  // patches per row, groups per row, groups per image, compact rows
};

// out [N, H/2, W/2] in units: block (gy, gx) row i of group g = row i of x's kept patch.
template <typename U> __global__ void compact_kernel(compact_geom k, const int64_t *kept, const U *x, U *out) {
  int64_t total = k.n * k.ho * k.gw * k.run;
  CUDA_GRID_STRIDE(q, total) {
    int64_t within = q % k.run, t = q / k.run;
    int64_t gx = t % k.gw;
    t /= k.gw;
    int64_t oy = t % k.ho, img = t / k.ho;
    int64_t gy = oy / k.p, i = oy % k.p;
    int64_t patch = kept[img * k.groups + gy * k.gw + gx], py = patch / k.wp, px = patch % k.wp;
    out[q] = x[((img * k.h + py * k.p + i) * k.wp + px) * k.run + within];
  }
}

// gx [N, H, W] in units: kept patches get their group's block of g, the other patches zeros.
template <typename U> __global__ void compact_backward_kernel(compact_geom k, const int64_t *kept, const U *g, U *gx) {
  int64_t total = k.n * k.h * k.wp * k.run;
  CUDA_GRID_STRIDE(q, total) {
    int64_t within = q % k.run, t = q / k.run;
    int64_t px = t % k.wp;
    t /= k.wp;
    int64_t y = t % k.h, img = t / k.h;
    int64_t py = y / k.p, i = y % k.p, group = px / 2;
    int64_t patch = kept[img * k.groups + (py / 2) * k.gw + group];
    U v = {}; // all-zero bytes are 0 in every dtype
    if (patch == py * k.wp + px) v = g[((img * k.ho + (py / 2) * k.p + i) * k.gw + group) * k.run + within];
    gx[q] = v;
  }
}

// The widest unit (16, 8, 4, 2 or 1 bytes) that divides a token and both buffers' alignment.
int unit_bytes(int64_t token_bytes, const void *a, const void *b) {
  for (int u = 16; u > 1; u /= 2)
    if (token_bytes % u == 0 && (uintptr_t)a % u == 0 && (uintptr_t)b % u == 0) return u;
  return 1;
}

template <typename F> int dispatch_unit(int u, F &&f) {
  switch (u) {
  case 16: return f(uint4{});
  case 8: return f(uint2{});
  case 4: return f(uint32_t{});
  case 2: return f(uint16_t{});
  default: return f(uint8_t{});
  }
}

// full: [N, H, W, C] (x or gx); the compact tensor is [N, H/2, W/2, C].
int run_compact(const char *op, const ts_tensor *full, const ts_tensor *compact, const ts_tensor *kept, int64_t p,
                bool backward) {
  if (full->dtype != compact->dtype || kept->dtype != TS_I64)
    return ts_set_error(TS_ERR_DTYPE, "%s: the cuda kernel takes x and out of one dtype and int64 kept patches, got %s, "
                        "%s and %s", op, ts_dtype_name(full->dtype), ts_dtype_name(compact->dtype),
                        ts_dtype_name(kept->dtype));
  int64_t token_bytes = full->shape[3] * ts_dtype_size(full->dtype);
  compact_geom k = {full->shape[0], full->shape[1], full->shape[2], p, 0, 0, 0, 0, 0};
  k.wp = k.w / p;
  k.gw = k.wp / 2;
  k.groups = (k.h / p / 2) * k.gw;
  k.ho = k.h / 2;
  int64_t total = backward ? ts_numel(full) : ts_numel(compact);
  if (total == 0) return TS_OK;
  cudaStream_t stream;
  if (cuda_stream_for(op, full->device.index, &stream)) return ts_last_status();
  int u = unit_bytes(token_bytes, ts_elem_ptr(full), ts_elem_ptr(compact));
  k.run = p * token_bytes / u;
  int64_t units = total * ts_dtype_size(full->dtype) / u;
  const int64_t *table = (const int64_t *)ts_elem_ptr(kept);
  return dispatch_unit(u, [&](auto unit) {
    using U = decltype(unit);
    if (backward)
      compact_backward_kernel<U><<<cuda_blocks(units), CUDA_THREADS, 0, stream>>>(
          k, table, (const U *)ts_elem_ptr(compact), (U *)ts_elem_ptr(full));
    else
      compact_kernel<U><<<cuda_blocks(units), CUDA_THREADS, 0, stream>>>(k, table, (const U *)ts_elem_ptr(full),
                                                                         (U *)ts_elem_ptr(compact));
    return cuda_check(cudaGetLastError(), op);
  });
}
} // namespace

extern "C" int cuda_uniform_compact(ts_tensor *out, const ts_tensor *x, const ts_tensor *kept, int64_t patch_tokens) {
  return run_compact("uniform_compact", x, out, kept, patch_tokens, false);
}

extern "C" int cuda_uniform_compact_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *kept,
                                             int64_t patch_tokens) {
  return run_compact("uniform_compact backward", gx, g, kept, patch_tokens, true);
}

extern "C" int cuda_group_mask(ts_tensor *out, const ts_tensor *draw, int64_t h, int64_t w, int64_t per_position) {
  const char *op = "group_mask";
  group_geom k = {out->shape[0], h, w, per_position};
  if (k.n == 0 || h * w == 0) return TS_OK;
  cudaStream_t stream;
  if (cuda_stream_for(op, out->device.index, &stream)) return ts_last_status();
  unsigned blocks = (unsigned)(k.n < GROUP_MASK_MAX_BLOCKS ? k.n : GROUP_MASK_MAX_BLOCKS);
  group_mask_kernel<<<blocks, GROUP_MASK_THREADS, 0, stream>>>(k, (const int64_t *)ts_elem_ptr(draw),
                                                               (uint8_t *)ts_elem_ptr(out));
  return cuda_check(cudaGetLastError(), op);
}
