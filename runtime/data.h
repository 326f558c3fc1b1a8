/* data.h — what the data pipeline's files share (decode.c: files to pixels, augment.c: the random
 * crop, resampling and normalization, data.c: datasets, sampler and loader threads). Not public.
 *
 * Every function here is safe to call from the loader's decode workers: none uses the compute
 * thread pool (ts_parallel_for), and failures of one sample are reported through a message buffer
 * rather than the thread-local error, so that a skipped file leaves no error behind. */
#ifndef TESSERA_DATA_H
#define TESSERA_DATA_H

#include "internal.h"

#include <stddef.h>

enum {
  DATA_MESSAGE_BYTES = 320,
  /* Decoded regions above this many pixels are refused (PIL refuses images twice its 89.5 MP
     warning level as decompression bombs; this is a little more generous). */
  DATA_MAX_REGION_PIXELS = 1 << 28
};

/* Reusable buffers of one thread: a worker decodes thousands of images without allocating. */
typedef struct data_scratch {
  uint8_t *file;          /* the encoded file */
  size_t file_cap;
  uint8_t *decoded;       /* decoder output rows */
  size_t decoded_cap;
  uint8_t *temp;          /* the horizontal pass of the resampler */
  size_t temp_cap;
  uint8_t *resized;       /* the resampled crop, packed RGB */
  size_t resized_cap;
  int32_t *coeffs;        /* fixed-point filter weights */
  size_t coeffs_cap;
  double *weights;        /* filter weights before fixed-point conversion */
  size_t weights_cap;
  int *bounds;            /* per output pixel: first source pixel, tap count */
  size_t bounds_cap;
  int32_t *acc;           /* one output row of sums in the vertical pass */
  size_t acc_cap;
} data_scratch;

void data_scratch_free(data_scratch *s);
/* Grows *buf to at least `bytes`; returns it, or NULL when out of memory (the old buffer stays). */
void *data_grow(void *buf_ptr, size_t *cap, size_t bytes);

/* Packed 8-bit RGB pixels: row y starts at pixels + y * stride. */
typedef struct data_rgb {
  const uint8_t *pixels;
  int64_t height, width, stride;
} data_rgb;

/* What a decoder hands to the resampler for one crop: pixels covering it (of the image, or of the
   image decoded at 1/2, 1/4 or 1/8 scale) and the crop as a box in those pixels' coordinates. */
typedef struct data_region {
  data_rgb rgb;
  float box[4]; /* x0, y0, x1, y1 */
} data_region;

/* Picks the crop once the decoder knows the image's size. */
typedef void (*data_crop_chooser)(int64_t height, int64_t width, void *ctx, ts_data_crop *crop);

/* ---- decode.c -------------------------------------------------------------------------------- */
/* Reads a whole file into s->file; returns 0, or -1 with a message. */
int data_read_file(const char *path, data_scratch *s, size_t *size, char *msg);
/* Decodes the part of an encoded JPEG or PNG (sniffed from its first bytes) that the chosen crop
   needs. dct_scaling lets a JPEG decode at 1/2, 1/4 or 1/8 scale when the crop then still has at
   least out_h x out_w pixels. Returns 0 (region valid until the scratch is next used), or -1 with
   a message that does not repeat the path. */
int data_decode_crop(const char *path, const uint8_t *bytes, size_t size, int64_t out_h, int64_t out_w,
                     int dct_scaling, data_crop_chooser choose, void *ctx, ts_data_crop *crop, data_scratch *s,
                     data_region *region, char *msg);
/* An IDX file of unsigned bytes (gzipped or not): magic 0x0000080N with N = ndim, big-endian
   sizes, exactly the data after them. Sets the thread's error on failure. */
typedef struct data_idx {
  uint8_t *values;
  int ndim;
  int64_t dims[3];
} data_idx;
int data_idx_read(const char *op, const char *path, int ndim, data_idx *out);

/* ---- augment.c ------------------------------------------------------------------------------- */
/* Philox counter layout of the data pipeline (key = the loader's seed; counter_lo = the sample's
   dataset index or the permutation position; counter_hi = epoch * 2^16 + block). */
enum { DATA_FLIP_BLOCK = 10, DATA_PERMUTATION_BLOCK = 0xFFFF, DATA_CROP_ATTEMPTS = 10 };
uint64_t data_counter_hi(int64_t epoch, int block);
void data_crop_params(uint64_t seed, int64_t epoch, int64_t index, int64_t height, int64_t width,
                      const double scale[2], const double ratio[2], double hflip, ts_data_crop *crop);
/* PIL's bicubic resampling of src's box to out_h x out_w packed RGB in s->resized. */
int data_resample(const data_rgb *src, const float box[4], int64_t out_h, int64_t out_w, data_scratch *s,
                  char *msg);
/* lut[c][v]: the float32 value of channel c for 8-bit value v: v/255, then (x - mean)/std. */
void data_normalize_table(int normalize, const double mean[3], const double std[3], float lut[3][256]);
/* Packed RGB [h, w, 3] to planes [3, h, w] through lut, mirrored left-right when flip. */
void data_write_planes(const uint8_t *rgb, int64_t h, int64_t w, int flip, const float lut[3][256], float *out);
/* The crop of packed pixels (1 = gray, 3 = RGB, 4 = RGBA; `width` pixels a row) as packed RGB in
   s->decoded, handed over as a region whose box is the whole crop; 0, or -1 when out of memory. */
int data_pack_crop(const uint8_t *pixels, int64_t width, int channels, const ts_data_crop *crop, data_scratch *s,
                   data_region *region);
/* Validate RandomResizedCrop's ranges and the flip probability, and mean/std when normalize (they
   set the thread's error). */
int data_check_ranges(const char *op, const double *scale, const double *ratio, double hflip);
int data_check_normalize(const char *op, int normalize, const double *mean, const double *std);

#endif
