/* masks.c — grid-wise and uniform masks, and UM-MAE's compaction of a uniformly masked token grid
 * as a direct gather.
 *
 * A group mask is written image by image: all removed, then one kept patch per 2x2 group, its
 * position fixed per image (grid-wise) or drawn from the image's pool (uniform), a walk that is
 * sequential within an image. Images are split across the thread pool.
 *
 * Tokens are channels last, so a patch row of p tokens is one run of p*C contiguous elements:
 * both directions copy runs with memcpy, whatever the dtype (nothing is converted or summed). The
 * work is split over output rows (image, row) across the thread pool. */
#include "cpu.h"

#include <string.h>

typedef struct {
  uint8_t *out;
  const int64_t *draw;
  int64_t h, w, per_position;
} group_mask_ctx;

/* The position a raw lane takes from a pool holding left[v] entries of each position v (ordered by
   position, `remaining` in all): the entry floor(lane * remaining / 2^32), which leaves the pool. */
static int64_t take_from_pool(int64_t left[4], int64_t remaining, int64_t lane) {
  int64_t r = (int64_t)(((uint64_t)lane * (uint64_t)remaining) >> 32), v = 0;
  for (; r >= left[v]; v++) r -= left[v];
  left[v]--;
  return v;
}

static void group_mask_images(int64_t begin, int64_t end, void *arg) {
  const group_mask_ctx *k = arg;
  int64_t gw = k->w / 2, groups = (k->h / 2) * gw, per = k->per_position;
  for (int64_t i = begin; i < end; i++) {
    uint8_t *m = k->out + i * k->h * k->w;
    memset(m, 1, (size_t)(k->h * k->w));
    int64_t left[4] = {per, per, per, per};
    for (int64_t g = 0; g < groups; g++) {
      int64_t v = per ? take_from_pool(left, 4 * per - g, k->draw[i * groups + g]) : k->draw[i];
      m[(2 * (g / gw) + v / 2) * k->w + 2 * (g % gw) + v % 2] = 0;
    }
  }
}

int cpu_group_mask(ts_tensor *out, const ts_tensor *draw, int64_t h, int64_t w, int64_t per_position) {
  group_mask_ctx k = {(uint8_t *)ts_elem_ptr(out), (const int64_t *)ts_elem_ptr(draw), h, w, per_position};
  ts_parallel_for(out->shape[0], cpu_grain(h * w), group_mask_images, &k);
  return TS_OK;
}

typedef struct {
  char *dst;
  const char *src;
  const int64_t *kept;   /* [N, G]: the patch index each group keeps */
  int64_t h, w, c, p;    /* the full token grid, channels, tokens per patch side */
  int64_t esz;
} compact_ctx;

/* Output rows [begin, end) of [N*H/2]: block (gy, gx) row i = row i of the kept patch. */
static void compact_rows(int64_t begin, int64_t end, void *arg) {
  const compact_ctx *k = arg;
  int64_t ho = k->h / 2, wo = k->w / 2, wp = k->w / k->p, gw = wp / 2, groups = (k->h / k->p / 2) * gw;
  size_t run = (size_t)(k->p * k->c * k->esz);
  for (int64_t row = begin; row < end; row++) {
    int64_t n = row / ho, oy = row % ho, gy = oy / k->p, i = oy % k->p;
    const int64_t *kept = k->kept + n * groups + gy * gw;
    char *out = k->dst + row * wo * k->c * k->esz;
    for (int64_t gx = 0; gx < gw; gx++) {
      int64_t py = kept[gx] / wp, px = kept[gx] % wp;
      const char *in = k->src + ((n * k->h + py * k->p + i) * k->w + px * k->p) * k->c * k->esz;
      memcpy(out + gx * run, in, run);
    }
  }
}

/* Input rows [begin, end) of [N*H]: kept patches get the gradient of their block, others zeros. */
static void compact_backward_rows(int64_t begin, int64_t end, void *arg) {
  const compact_ctx *k = arg;
  int64_t ho = k->h / 2, wo = k->w / 2, wp = k->w / k->p, gw = wp / 2, groups = (k->h / k->p / 2) * gw;
  size_t run = (size_t)(k->p * k->c * k->esz);
  for (int64_t row = begin; row < end; row++) {
    int64_t n = row / k->h, y = row % k->h, py = y / k->p, i = y % k->p, gy = py / 2;
    const int64_t *kept = k->kept + n * groups + gy * gw;
    char *gx_row = k->dst + row * k->w * k->c * k->esz;
    const char *g_row = k->src + ((n * ho + gy * k->p + i) * wo) * k->c * k->esz;
    for (int64_t px = 0; px < wp; px++) {
      int64_t group = px / 2;
      if (kept[group] == py * wp + px)
        memcpy(gx_row + px * run, g_row + group * run, run);
      else
        memset(gx_row + px * run, 0, run); /* all-zero bytes are 0 in every dtype */
    }
  }
}

int cpu_uniform_compact(ts_tensor *out, const ts_tensor *x, const ts_tensor *kept, int64_t patch_tokens) {
  compact_ctx k = {ts_elem_ptr(out), ts_elem_ptr(x), (const int64_t *)ts_elem_ptr(kept), x->shape[1], x->shape[2],
                   x->shape[3], patch_tokens, ts_dtype_size(x->dtype)};
  ts_parallel_for(x->shape[0] * (k.h / 2), cpu_grain(k.w / 2 * k.c), compact_rows, &k);
  return TS_OK;
}

int cpu_uniform_compact_backward(ts_tensor *gx, const ts_tensor *g, const ts_tensor *kept, int64_t patch_tokens) {
  compact_ctx k = {ts_elem_ptr(gx), ts_elem_ptr(g), (const int64_t *)ts_elem_ptr(kept), gx->shape[1], gx->shape[2],
                   gx->shape[3], patch_tokens, ts_dtype_size(gx->dtype)};
  ts_parallel_for(gx->shape[0] * k.h, cpu_grain(k.w * k.c), compact_backward_rows, &k);
  return TS_OK;
}
