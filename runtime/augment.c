/* augment.c — MAE's training augmentation for one image, as torchvision does it on a PIL image:
 *   RandomResizedCrop(size, scale, ratio, interpolation=BICUBIC), RandomHorizontalFlip(p),
 *   ToTensor(), Normalize(mean, std).
 *
 * The crop parameters follow torchvision's RandomResizedCrop.get_params, its random numbers drawn
 * from Philox (see data_crop_params). The resize is Pillow's Image.resize(BICUBIC) on the cropped
 * image (libImaging/Resample.c), reproduced to the bit: a separable convolution, horizontal pass
 * first, with the cubic kernel of a = -0.5 over a support of 2 source pixels stretched by the
 * downscaling factor (antialiasing), weights normalized per output pixel and rounded to 22-bit
 * fixed point, each pass rounding to 8 bits. ToTensor and Normalize are float32 arithmetic, done
 * once per channel and 8-bit value into a table. */
#include "data.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the random crop --------------------------------------------------------------------------- */
uint64_t data_counter_hi(int64_t epoch, int block) { return ((uint64_t)epoch << 16) | (uint64_t)block; }

static double unit_of(uint32_t lane) { return lane * (1.0 / 4294967296.0); }             /* [0, 1) */
static int64_t below(uint32_t lane, int64_t n) { return (int64_t)(((uint64_t)lane * (uint64_t)n) >> 32); } /* [0, n) */

/* torchvision's fallback when 10 attempts fail: the central crop of the image clamped to the ratio
   range. */
static void central_crop(int64_t height, int64_t width, const double ratio[2], ts_data_crop *crop) {
  double in_ratio = (double)width / (double)height;
  int64_t w = width, h = height;
  if (in_ratio < ratio[0]) {
    h = (int64_t)rint((double)w / ratio[0]);
  } else if (in_ratio > ratio[1]) {
    w = (int64_t)rint((double)h * ratio[1]);
  }
  crop->height = h;
  crop->width = w;
  crop->top = (height - h) / 2;
  crop->left = (width - w) / 2;
}

/* Sample `index` of `epoch` uses the Philox blocks (seed; index, epoch * 2^16 + b): block a < 10 is
   crop attempt a (lanes: area share, log aspect ratio, top, left), block 10 the flip (lane 0).
   Rounding is Python's round (half to even), as torchvision's int(round(...)). */
void data_crop_params(uint64_t seed, int64_t epoch, int64_t index, int64_t height, int64_t width,
                      const double scale[2], const double ratio[2], double hflip, ts_data_crop *crop) {
  double area = (double)height * (double)width, log_lo = log(ratio[0]), log_hi = log(ratio[1]);
  uint32_t r[4];
  int found = 0;
  for (int a = 0; a < DATA_CROP_ATTEMPTS && !found; a++) {
    ts_philox4x32(seed, (uint64_t)index, data_counter_hi(epoch, a), r);
    double target = area * (scale[0] + (scale[1] - scale[0]) * unit_of(r[0]));
    double aspect = exp(log_lo + (log_hi - log_lo) * unit_of(r[1]));
    double w = rint(sqrt(target * aspect)), h = rint(sqrt(target / aspect));
    if (w > 0 && w <= (double)width && h > 0 && h <= (double)height) {
      crop->width = (int64_t)w;
      crop->height = (int64_t)h;
      crop->top = below(r[2], height - crop->height + 1);
      crop->left = below(r[3], width - crop->width + 1);
      found = 1;
    }
  }
  if (!found) central_crop(height, width, ratio, crop);
  ts_philox4x32(seed, (uint64_t)index, data_counter_hi(epoch, DATA_FLIP_BLOCK), r);
  crop->flip = unit_of(r[0]) < hflip;
}

/* ---- Pillow's bicubic resampling ----------------------------------------------------------------- */
enum { PRECISION_BITS = 32 - 8 - 2 };

static double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

static inline uint8_t clip8(int32_t v) {
  v >>= PRECISION_BITS; /* arithmetic: floor */
  return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* The taps of one axis: output pixel i reads source pixels bounds[2i] .. bounds[2i] + bounds[2i+1]
   - 1 with weights coeffs[i * ksize ..]. */
typedef struct axis_taps {
  int64_t ksize;
  int *bounds;
  int32_t *coeffs;
} axis_taps;

static int64_t taps_size(float in0, float in1, int64_t out_size) {
  double scale = (double)(in1 - in0) / (double)out_size, filterscale = scale < 1.0 ? 1.0 : scale;
  return (int64_t)ceil(2.0 * filterscale) * 2 + 1;
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc; w holds ksize doubles. */
static void compute_taps(int64_t in_size, float in0, float in1, int64_t out_size, axis_taps *t, double *w) {
  double scale = (double)(in1 - in0) / (double)out_size, filterscale = scale < 1.0 ? 1.0 : scale;
  double support = 2.0 * filterscale, ss = 1.0 / filterscale;
  for (int64_t xx = 0; xx < out_size; xx++) {
    double center = in0 + (xx + 0.5) * scale, ww = 0.0;
    int64_t xmin = (int64_t)(center - support + 0.5), xmax = (int64_t)(center + support + 0.5);
    if (xmin < 0) xmin = 0;
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    if (xmax > t->ksize) xmax = t->ksize;
    for (int64_t x = 0; x < xmax; x++) {
      w[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    int32_t *k = t->coeffs + xx * t->ksize;
    for (int64_t x = 0; x < t->ksize; x++) {
      double v = x < xmax ? (ww != 0.0 ? w[x] / ww : w[x]) : 0.0;
      k[x] = (int32_t)(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
    }
    t->bounds[2 * xx] = (int)xmin;
    t->bounds[2 * xx + 1] = (int)xmax;
  }
}

static void horizontal_pass(const data_rgb *src, int64_t first_row, int64_t rows, const axis_taps *t, int64_t out_w,
                            uint8_t *out) {
  for (int64_t yy = 0; yy < rows; yy++) {
    const uint8_t *in = src->pixels + (yy + first_row) * src->stride;
    uint8_t *o = out + yy * out_w * 3;
    for (int64_t xx = 0; xx < out_w; xx++) {
      const int32_t *k = t->coeffs + xx * t->ksize;
      const uint8_t *p = in + (int64_t)t->bounds[2 * xx] * 3;
      int n = t->bounds[2 * xx + 1];
      int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < n; x++, p += 3) {
        s0 += p[0] * k[x];
        s1 += p[1] * k[x];
        s2 += p[2] * k[x];
      }
      o[3 * xx] = clip8(s0);
      o[3 * xx + 1] = clip8(s1);
      o[3 * xx + 2] = clip8(s2);
    }
  }
}

/* Rows of `in` (row_bytes wide, `stride` apart) combined per output row; acc holds row_bytes sums. */
static void vertical_pass(const uint8_t *in, int64_t stride, int64_t row_bytes, const axis_taps *t, int64_t out_h,
                          int32_t *acc, uint8_t *out) {
  for (int64_t yy = 0; yy < out_h; yy++) {
    const int32_t *k = t->coeffs + yy * t->ksize;
    int ymin = t->bounds[2 * yy], n = t->bounds[2 * yy + 1];
    for (int64_t i = 0; i < row_bytes; i++) acc[i] = 1 << (PRECISION_BITS - 1);
    for (int y = 0; y < n; y++) {
      const uint8_t *row = in + (int64_t)(ymin + y) * stride;
      int32_t ky = k[y];
      for (int64_t i = 0; i < row_bytes; i++) acc[i] += row[i] * ky;
    }
    uint8_t *o = out + yy * row_bytes;
    for (int64_t i = 0; i < row_bytes; i++) o[i] = clip8(acc[i]);
  }
}

/* Buffers of one resampling: the taps of both axes and the intermediate image. */
static int reserve(data_scratch *s, int64_t kh, int64_t kv, int64_t out_h, int64_t out_w, int64_t temp_rows) {
  int64_t ksize = kh > kv ? kh : kv;
  return data_grow(&s->coeffs, &s->coeffs_cap, (size_t)(out_w * kh + out_h * kv) * sizeof(int32_t)) &&
         data_grow(&s->bounds, &s->bounds_cap, (size_t)(2 * (out_w + out_h)) * sizeof(int)) &&
         data_grow(&s->weights, &s->weights_cap, (size_t)ksize * sizeof(double)) &&
         data_grow(&s->temp, &s->temp_cap, (size_t)(temp_rows * out_w * 3) + 1) &&
         data_grow(&s->acc, &s->acc_cap, (size_t)(out_w * 3) * sizeof(int32_t)) &&
         data_grow(&s->resized, &s->resized_cap, (size_t)(out_h * out_w * 3));
}

/* Pillow's ImagingResampleInner: the horizontal pass over the rows the vertical one reads, then the
   vertical pass; a pass whose axis keeps its size and box is skipped. */
int data_resample(const data_rgb *src, const float box[4], int64_t out_h, int64_t out_w, data_scratch *s, char *msg) {
  int need_h = out_w != src->width || box[0] != 0 || box[2] != (float)out_w;
  int need_v = out_h != src->height || box[1] != 0 || box[3] != (float)out_h;
  int64_t kh = taps_size(box[0], box[2], out_w), kv = taps_size(box[1], box[3], out_h);
  if (!reserve(s, kh, kv, out_h, out_w, src->height)) {
    snprintf(msg, DATA_MESSAGE_BYTES, "out of memory resampling %lldx%lld to %lldx%lld", (long long)src->width,
             (long long)src->height, (long long)out_w, (long long)out_h);
    return -1;
  }
  axis_taps vert = {kv, s->bounds + 2 * out_w, s->coeffs + out_w * kh};
  compute_taps(src->height, box[1], box[3], out_h, &vert, s->weights);
  int64_t first = vert.bounds[0], last = vert.bounds[2 * out_h - 2] + vert.bounds[2 * out_h - 1];
  const uint8_t *rows = src->pixels;
  int64_t stride = src->stride, row_bytes = src->width * 3;
  if (need_h) {
    axis_taps horiz = {kh, s->bounds, s->coeffs};
    compute_taps(src->width, box[0], box[2], out_w, &horiz, s->weights);
    horizontal_pass(src, first, last - first, &horiz, out_w, s->temp);
    for (int64_t i = 0; i < out_h; i++) vert.bounds[2 * i] -= (int)first;
    rows = s->temp;
    stride = row_bytes = out_w * 3;
  }
  if (need_v) {
    vertical_pass(rows, stride, row_bytes, &vert, out_h, s->acc, s->resized);
  } else {
    for (int64_t y = 0; y < out_h; y++) memcpy(s->resized + y * out_w * 3, rows + y * stride, (size_t)(out_w * 3));
  }
  return 0;
}

/* ---- ToTensor, Normalize, flip --------------------------------------------------------------------- */
void data_normalize_table(int normalize, const double mean[3], const double std[3], float lut[3][256]) {
  for (int c = 0; c < 3; c++) {
    float m = normalize ? (float)mean[c] : 0.0f, sd = normalize ? (float)std[c] : 1.0f;
    for (int v = 0; v < 256; v++) {
      float x = (float)v / 255.0f;
      lut[c][v] = normalize ? (x - m) / sd : x;
    }
  }
}

void data_write_planes(const uint8_t *rgb, int64_t h, int64_t w, int flip, const float lut[3][256], float *out) {
  for (int c = 0; c < 3; c++) {
    const float *table = lut[c];
    for (int64_t y = 0; y < h; y++) {
      const uint8_t *row = rgb + y * w * 3 + c;
      float *o = out + (c * h + y) * w;
      if (flip) {
        for (int64_t x = 0; x < w; x++) o[x] = table[row[(w - 1 - x) * 3]];
      } else {
        for (int64_t x = 0; x < w; x++) o[x] = table[row[x * 3]];
      }
    }
  }
}

/* ---- crops of packed images ------------------------------------------------------------------------ */
int data_pack_crop(const uint8_t *pixels, int64_t width, int channels, const ts_data_crop *crop, data_scratch *s,
                   data_region *region) {
  int64_t ch = crop->height, cw = crop->width;
  uint8_t *out = data_grow(&s->decoded, &s->decoded_cap, (size_t)(ch * cw * 3) + 1);
  if (!out) return -1;
  for (int64_t y = 0; y < ch; y++) {
    const uint8_t *in = pixels + ((crop->top + y) * width + crop->left) * channels;
    uint8_t *o = out + y * cw * 3;
    if (channels == 3) {
      memcpy(o, in, (size_t)(cw * 3));
      continue;
    }
    for (int64_t x = 0; x < cw; x++, in += channels, o += 3) {
      o[0] = in[0]; /* gray: one sample in all three; RGBA: alpha dropped, as PIL's convert('RGB') */
      o[1] = in[channels >= 3 ? 1 : 0];
      o[2] = in[channels >= 3 ? 2 : 0];
    }
  }
  *region = (data_region){{out, ch, cw, cw * 3}, {0, 0, (float)cw, (float)ch}};
  return 0;
}

/* ---- public entry points --------------------------------------------------------------------------- */
int data_check_ranges(const char *op, const double *scale, const double *ratio, double hflip) {
  if (!scale || !ratio) return ts_set_error(TS_ERR_ARG, "%s: scale and ratio must be given", op);
  if (!(scale[0] > 0 && scale[0] <= scale[1] && isfinite(scale[1])))
    return ts_set_error(TS_ERR_ARG, "%s: scale must be (lo, hi) with 0 < lo <= hi, got (%g, %g)", op, scale[0], scale[1]);
  if (!(ratio[0] > 0 && ratio[0] <= ratio[1] && isfinite(ratio[1])))
    return ts_set_error(TS_ERR_ARG, "%s: ratio must be (lo, hi) with 0 < lo <= hi, got (%g, %g)", op, ratio[0], ratio[1]);
  if (!(hflip >= 0 && hflip <= 1)) return ts_set_error(TS_ERR_ARG, "%s: hflip must be a probability in [0, 1], got %g", op, hflip);
  return TS_OK;
}

int ts_data_crop_params(uint64_t seed, int64_t epoch, int64_t index, int64_t height, int64_t width,
                        const double *scale, const double *ratio, double hflip, ts_data_crop *out) {
  const char *op = "data_crop_params";
  if (!out) return ts_set_error(TS_ERR_ARG, "%s: out is NULL", op);
  if (data_check_ranges(op, scale, ratio, hflip)) return ts_last_status();
  if (height < 1 || width < 1) return ts_set_error(TS_ERR_ARG, "%s: the image must be at least 1x1, got %lldx%lld", op,
                                                   (long long)width, (long long)height);
  if (epoch < 0 || index < 0)
    return ts_set_error(TS_ERR_ARG, "%s: epoch and index must be >= 0, got %lld and %lld", op, (long long)epoch,
                        (long long)index);
  data_crop_params(seed, epoch, index, height, width, scale, ratio, hflip, out);
  return TS_OK;
}

int data_check_normalize(const char *op, int normalize, const double *mean, const double *std) {
  if (!normalize) return TS_OK;
  if (!mean || !std) return ts_set_error(TS_ERR_ARG, "%s: normalize needs mean and std", op);
  for (int c = 0; c < 3; c++) {
    if (!isfinite(mean[c]) || !isfinite(std[c]) || std[c] == 0)
      return ts_set_error(TS_ERR_ARG, "%s: mean and std must be finite and std nonzero, got mean[%d] = %g, std[%d] = %g",
                          op, c, mean[c], c, std[c]);
  }
  return TS_OK;
}

static int check_crop_input(const char *op, const ts_tensor *img, const ts_data_crop *crop, int64_t out_h, int64_t out_w) {
  if (!img || !crop) return ts_set_error(TS_ERR_ARG, "%s: image and crop must be given", op);
  int64_t channels = img->ndim == 3 ? img->shape[2] : 1;
  if (img->dtype != TS_U8 || (img->ndim != 2 && img->ndim != 3) || (channels != 1 && channels != 3 && channels != 4))
    return ts_set_error(TS_ERR_SHAPE, "%s: expected a uint8 [H, W, C] image with C = 1, 3 or 4 (or [H, W]), got %s %s", op,
                        ts_dtype_name(img->dtype), ts_tshape(img));
  if (img->device.type != TS_CPU) return ts_set_error(TS_ERR_DEVICE, "%s: the image must be on the CPU", op);
  int64_t h = img->shape[0], w = img->shape[1];
  if (crop->top < 0 || crop->left < 0 || crop->height < 1 || crop->width < 1 || crop->top + crop->height > h ||
      crop->left + crop->width > w)
    return ts_set_error(TS_ERR_ARG, "%s: crop (top %lld, left %lld, height %lld, width %lld) is not inside the %s image", op,
                        (long long)crop->top, (long long)crop->left, (long long)crop->height, (long long)crop->width,
                        ts_tshape(img));
  if (out_h < 1 || out_w < 1 || out_h * out_w > DATA_MAX_REGION_PIXELS)
    return ts_set_error(TS_ERR_ARG, "%s: output size %lldx%lld is out of range", op, (long long)out_h, (long long)out_w);
  return TS_OK;
}

ts_tensor *ts_data_resized_crop(ts_tensor *img, const ts_data_crop *crop, int64_t out_h, int64_t out_w, int normalize,
                                const double *mean, const double *std) {
  const char *op = "data_resized_crop";
  if (check_crop_input(op, img, crop, out_h, out_w) || data_check_normalize(op, normalize, mean, std)) return NULL;
  ts_tensor *src = ts_contiguous(img);
  int64_t shape[3] = {3, out_h, out_w};
  ts_tensor *out = src ? ts_empty(3, shape, TS_F32, ts_cpu()) : NULL;
  if (!out) {
    ts_release(src);
    return NULL;
  }
  data_scratch s = {0};
  char msg[DATA_MESSAGE_BYTES];
  int channels = img->ndim == 3 ? (int)img->shape[2] : 1;
  data_region region;
  int packed = !data_pack_crop(ts_data_ptr(src), src->shape[1], channels, crop, &s, &region);
  int st = packed ? data_resample(&region.rgb, region.box, out_h, out_w, &s, msg) : -1;
  if (!packed) snprintf(msg, sizeof msg, "out of host memory for the crop");
  if (!st) {
    float lut[3][256];
    data_normalize_table(normalize, mean, std, lut);
    data_write_planes(s.resized, out_h, out_w, crop->flip, (const float(*)[256])lut, ts_data_ptr(out));
  }
  data_scratch_free(&s);
  ts_release(src);
  if (st) {
    ts_release(out);
    return TS_FAIL_NULL(TS_ERR_MEMORY, "%s: %s", op, msg);
  }
  return out;
}
