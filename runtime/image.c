/* image.c — PNG files to and from uint8 [H, W, C] tensors, through libpng.
 *
 * libpng reports errors by longjmp to the setjmp of the function that drives it. The state a
 * longjmp must not lose (file, rows, the tensor being filled) lives in a context struct owned by
 * the caller of that function, never in its own locals, so cleanup after a jump sees every
 * pointer as it was last set. Messages from libpng are kept in the context and reported with the
 * file's path. */
#include "internal.h"

#include <errno.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { PNG_SIGNATURE_BYTES = 8, MESSAGE_BYTES = 256 };

typedef struct {
  const char *path;
  FILE *file;
  png_structp png;
  png_infop info;
  png_bytep *rows;
  ts_tensor *image;          /* read: the result being filled */
  uint8_t *pixels;           /* write: the 8-bit samples */
  int out_of_memory;         /* read: the decoded image could not be allocated */
  char message[MESSAGE_BYTES];
} png_ctx;

static void on_png_error(png_structp png, png_const_charp msg) {
  png_ctx *c = png_get_error_ptr(png);
  snprintf(c->message, sizeof c->message, "%s", msg);
  png_longjmp(png, 1);
}

static void on_png_warning(png_structp png, png_const_charp msg) {
  (void)png; /* ancillary-chunk complaints (sRGB profiles, bad CRCs of optional chunks): not fatal */
  (void)msg;
}

static void read_bytes(png_structp png, png_bytep data, size_t n) {
  png_ctx *c = png_get_io_ptr(png);
  if (fread(data, 1, n, c->file) != n)
    png_error(png, ferror(c->file) ? "read error" : "unexpected end of file (the file is truncated)");
}

/* ---- reading --------------------------------------------------------------------------------- */
/* Makes libpng deliver 8-bit gray, RGB or RGBA (see ts_png_read in tessera.h). */
static void request_8bit(png_structp png, png_infop info) {
  int color = png_get_color_type(png, info), depth = png_get_bit_depth(png, info);
  int transparent = png_get_valid(png, info, PNG_INFO_tRNS) != 0;
#ifdef PNG_READ_SCALE_16_TO_8_SUPPORTED
  png_set_scale_16(png); /* v * 255 / 65535 rounded, rather than dropping the low byte */
#else
  png_set_strip_16(png);
#endif
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (transparent) png_set_tRNS_to_alpha(png);
  if (color == PNG_COLOR_TYPE_GRAY_ALPHA || (color == PNG_COLOR_TYPE_GRAY && transparent)) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
}

/* Runs libpng over c->file; returns 0, or 1 after a libpng error (message in c->message). */
static int read_png(png_ctx *c) {
  if (setjmp(png_jmpbuf(c->png))) return 1;
  png_set_read_fn(c->png, c, read_bytes);
  png_set_sig_bytes(c->png, PNG_SIGNATURE_BYTES);
  png_read_info(c->png, c->info);
  request_8bit(c->png, c->info);
  int64_t shape[3] = {png_get_image_height(c->png, c->info), png_get_image_width(c->png, c->info),
                      png_get_channels(c->png, c->info)};
  if (png_get_rowbytes(c->png, c->info) != (size_t)(shape[1] * shape[2]))
    png_error(c->png, "unexpected row layout after conversion to 8-bit samples");
  c->image = ts_empty(3, shape, TS_U8, ts_cpu());
  c->rows = c->image ? malloc(ts_at_least_one(shape[0]) * sizeof *c->rows) : NULL;
  if (!c->rows) {
    c->out_of_memory = 1;
    png_error(c->png, "out of memory for the decoded image");
  }
  uint8_t *data = ts_data_ptr(c->image);
  for (int64_t y = 0; y < shape[0]; y++) c->rows[y] = data + y * shape[1] * shape[2];
  png_read_image(c->png, c->rows);
  png_read_end(c->png, NULL); /* checks the remaining chunks' CRCs and the end of the file */
  return 0;
}

static int open_png(png_ctx *c, const char *op) {
  c->file = fopen(c->path, "rb");
  if (!c->file) return ts_set_error(TS_ERR_IO, "%s: cannot open '%s': %s", op, c->path, strerror(errno));
  png_byte signature[PNG_SIGNATURE_BYTES];
  size_t got = fread(signature, 1, sizeof signature, c->file);
  if (got != sizeof signature || png_sig_cmp(signature, 0, sizeof signature))
    return ts_set_error(TS_ERR_IO, "%s: '%s' is not a PNG file (%s)", op, c->path,
                        got != sizeof signature ? "shorter than the PNG signature" : "no PNG signature");
  c->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, c, on_png_error, on_png_warning);
  c->info = c->png ? png_create_info_struct(c->png) : NULL;
  if (!c->info) return ts_set_error(TS_ERR_MEMORY, "%s: out of memory starting libpng for '%s'", op, c->path);
  return TS_OK;
}

ts_tensor *ts_png_read(const char *path) {
  const char *op = "png_read";
  if (!path) return TS_FAIL_NULL(TS_ERR_ARG, "%s: path is NULL", op);
  png_ctx c = {.path = path};
  int st = open_png(&c, op);
  if (!st && read_png(&c)) {
    st = c.out_of_memory ? TS_ERR_MEMORY : TS_ERR_IO;
    ts_set_error(st, "%s: '%s' %s: %s", op, path, c.out_of_memory ? "is too large" : "is corrupt or unreadable",
                 c.message);
  }
  if (c.png) png_destroy_read_struct(&c.png, c.info ? &c.info : NULL, NULL);
  if (c.file) fclose(c.file);
  free(c.rows);
  if (st) {
    ts_release(c.image);
    return NULL;
  }
  return c.image;
}

/* ---- writing (ts_image_samples, ts_temporary_name and ts_commit_file also serve ts_jpeg_write; see internal.h) */
uint8_t *ts_image_samples(const char *op, ts_tensor *img, int64_t count) {
  uint8_t *out = malloc(ts_at_least_one(count));
  float *values = img->dtype == TS_U8 ? NULL : malloc(ts_at_least_one(count) * sizeof(float));
  if (!out || (img->dtype != TS_U8 && !values)) {
    free(out);
    free(values);
    ts_set_error(TS_ERR_MEMORY, "%s: out of host memory for %lld samples", op, (long long)count);
    return NULL;
  }
  if (img->dtype == TS_U8) {
    if (ts_to_host(img, out, (size_t)count)) goto fail;
    return out;
  }
  ts_tensor *f = ts_to_dtype(img, TS_F32);
  int st = f ? ts_to_host(f, values, (size_t)count * sizeof(float)) : ts_last_status();
  ts_release(f);
  if (st) goto fail;
  for (int64_t i = 0; i < count; i++) {
    float v = values[i];
    v = v > 0 ? (v < 1 ? v : 1) : 0; /* NaN becomes 0 */
    out[i] = (uint8_t)(v * 255.0f + 0.5f);
  }
  free(values);
  return out;
fail:
  free(out);
  free(values);
  return NULL;
}

static int check_writable(const char *op, const ts_tensor *img) {
  if (!img) return ts_set_error(TS_ERR_ARG, "%s: image is NULL", op);
  if (img->dtype != TS_U8 && !ts_dtype_is_floating(img->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: the image must be uint8 (0..255) or floating point (0..1), got %s", op,
                        ts_dtype_name(img->dtype));
  int64_t channels = img->ndim == 3 ? img->shape[2] : 1;
  if ((img->ndim != 2 && img->ndim != 3) || (channels != 1 && channels != 3 && channels != 4))
    return ts_set_error(TS_ERR_SHAPE, "%s: the image must be [H, W, C] with C = 1, 3 or 4 channels (or [H, W]), got %s",
                        op, ts_tshape(img));
  if (img->shape[0] < 1 || img->shape[1] < 1 || img->shape[0] > PNG_UINT_31_MAX || img->shape[1] > PNG_UINT_31_MAX)
    return ts_set_error(TS_ERR_SHAPE, "%s: a PNG is 1 to 2^31-1 pixels on each side, got %s", op, ts_tshape(img));
  return TS_OK;
}

static int write_png(png_ctx *c, int64_t h, int64_t w, int channels) {
  static const int color_types[5] = {0, PNG_COLOR_TYPE_GRAY, 0, PNG_COLOR_TYPE_RGB, PNG_COLOR_TYPE_RGB_ALPHA};
  if (setjmp(png_jmpbuf(c->png))) return 1;
  png_init_io(c->png, c->file);
  png_set_IHDR(c->png, c->info, (png_uint_32)w, (png_uint_32)h, 8, color_types[channels], PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(c->png, c->info);
  for (int64_t y = 0; y < h; y++) c->rows[y] = c->pixels + y * w * channels;
  png_write_image(c->png, c->rows);
  png_write_end(c->png, NULL);
  return 0;
}

char *ts_temporary_name(const char *path) {
  static int counter;
  size_t size = strlen(path) + 48;
  char *name = malloc(size);
  if (name)
    snprintf(name, size, "%s.tmp-%ld-%d", path, (long)getpid(), __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED));
  return name;
}

int ts_commit_file(const char *op, FILE *f, const char *tmp, const char *path, int st) {
  if (!st && (fflush(f) || fsync(fileno(f))))
    st = ts_set_error(TS_ERR_IO, "%s: writing '%s' failed: %s", op, path, strerror(errno));
  if (fclose(f) && !st) st = ts_set_error(TS_ERR_IO, "%s: writing '%s' failed: %s", op, path, strerror(errno));
  if (!st && rename(tmp, path))
    st = ts_set_error(TS_ERR_IO, "%s: cannot move the finished file to '%s': %s", op, path, strerror(errno));
  if (st) remove(tmp);
  return st;
}

/* Writes c->pixels into c->file; returns a status. */
static int encode(png_ctx *c, const char *op, int64_t h, int64_t w, int channels) {
  int st = TS_OK;
  c->png = png_create_write_struct(PNG_LIBPNG_VER_STRING, c, on_png_error, on_png_warning);
  c->info = c->png ? png_create_info_struct(c->png) : NULL;
  if (!c->info)
    st = ts_set_error(TS_ERR_MEMORY, "%s: out of memory starting libpng", op);
  else if (write_png(c, h, w, channels))
    st = ts_set_error(TS_ERR_IO, "%s: encoding '%s' failed: %s", op, c->path, c->message);
  if (c->png) png_destroy_write_struct(&c->png, c->info ? &c->info : NULL);
  return st;
}

int ts_png_write(const char *path, ts_tensor *img) {
  const char *op = "png_write";
  if (!path) return ts_set_error(TS_ERR_ARG, "%s: path is NULL", op);
  if (check_writable(op, img)) return ts_last_status();
  int64_t h = img->shape[0], w = img->shape[1];
  int channels = img->ndim == 3 ? (int)img->shape[2] : 1;
  png_ctx c = {.path = path};
  c.pixels = ts_image_samples(op, img, h * w * channels);
  c.rows = c.pixels ? malloc((size_t)h * sizeof *c.rows) : NULL;
  char *tmp = c.rows ? ts_temporary_name(path) : NULL;
  if (c.pixels && !tmp) {
    free(c.pixels);
    free(c.rows);
    return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  }
  if (!c.pixels) return ts_last_status();
  int st;
  c.file = fopen(tmp, "wb");
  if (!c.file)
    st = ts_set_error(TS_ERR_IO, "%s: cannot create '%s': %s", op, tmp, strerror(errno));
  else
    st = ts_commit_file(op, c.file, tmp, path, encode(&c, op, h, w, channels));
  free(tmp);
  free(c.rows);
  free(c.pixels);
  return st;
}
