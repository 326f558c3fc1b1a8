/* decode.c — image files to 8-bit RGB pixels for the data pipeline: JPEG through libjpeg-turbo
 * (only the rows and columns a crop needs, optionally at a DCT-reduced scale), PNG through
 * ts_png_read (image.c), IDX through zlib; and JPEG writing (ts_jpeg_write).
 *
 * libjpeg reports fatal errors through error_exit, which by default calls exit(): ours longjmps
 * back to the function that drives the decoder, whose state lives in a context struct so that the
 * cleanup after a jump sees every pointer as it was last set (as image.c does for libpng). A
 * truncated file makes libjpeg warn "Premature end of JPEG file" and pad the image with gray;
 * that warning is treated as fatal (PIL refuses truncated files too), other warnings (stray bytes
 * between markers, common in ImageNet) are ignored as PIL ignores them. */
#include "data.h"

#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
/* jpeglib.h needs FILE and size_t declared first */
#include <jerror.h>
#include <jpeglib.h>

/* ---- scratch buffers ------------------------------------------------------------------------- */
void *data_grow(void *buf_ptr, size_t *cap, size_t bytes) {
  void *buf;
  memcpy(&buf, buf_ptr, sizeof buf);
  if (bytes <= *cap && buf) return buf;
  size_t want = bytes > *cap + *cap / 2 ? bytes : *cap + *cap / 2;
  void *grown = realloc(buf, want ? want : 1);
  if (!grown) return NULL;
  memcpy(buf_ptr, &grown, sizeof grown);
  *cap = want;
  return grown;
}

void data_scratch_free(data_scratch *s) {
  free(s->file);
  free(s->decoded);
  free(s->temp);
  free(s->resized);
  free(s->coeffs);
  free(s->weights);
  free(s->bounds);
  free(s->acc);
  memset(s, 0, sizeof *s);
}

/* ---- whole files ----------------------------------------------------------------------------- */
int data_read_file(const char *path, data_scratch *s, size_t *size, char *msg) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(msg, DATA_MESSAGE_BYTES, "cannot open: %s", strerror(errno));
    return -1;
  }
  struct stat st;
  if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode)) {
    snprintf(msg, DATA_MESSAGE_BYTES, "not a regular file");
    fclose(f);
    return -1;
  }
  size_t n = (size_t)st.st_size;
  if (!data_grow(&s->file, &s->file_cap, n + 1)) {
    snprintf(msg, DATA_MESSAGE_BYTES, "out of memory for %zu bytes", n);
    fclose(f);
    return -1;
  }
  size_t got = fread(s->file, 1, n, f);
  int failed = ferror(f);
  fclose(f);
  if (failed || got != n) {
    snprintf(msg, DATA_MESSAGE_BYTES, "read error: %s", failed ? strerror(errno) : "the file shrank while read");
    return -1;
  }
  *size = n;
  return 0;
}

/* ---- JPEG ------------------------------------------------------------------------------------ */
typedef struct jpeg_errors {
  struct jpeg_error_mgr pub; /* first: libjpeg hands us a pointer to it */
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} jpeg_errors;

static void on_jpeg_error(j_common_ptr c) {
  jpeg_errors *e = (jpeg_errors *)c->err;
  c->err->format_message(c, e->message);
  longjmp(e->jump, 1);
}

static void on_jpeg_message(j_common_ptr c, int level) {
  if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF) on_jpeg_error(c); /* truncated: fatal */
}

/* Columns and rows decoded around the crop: libjpeg-turbo's cropped and skipped decoding rebuilds
   the chroma at the edges of what it decodes without the neighbours beyond, so a margin keeps
   those edges out of the pixels the crop reads (which then equal a full decode's). */
enum { JPEG_EDGE_MARGIN = 32, JPEG_READ_ROWS = 16 };

typedef struct jpeg_job {
  struct jpeg_decompress_struct cinfo;
  jpeg_errors err;
  int created;
  int own_message; /* err.message is ours (not libjpeg's): reported without the "corrupt" prefix */
  const char *path;
  const uint8_t *bytes;
  size_t size;
  int64_t out_h, out_w;
  int dct_scaling;
  data_crop_chooser choose;
  void *ctx;
  ts_data_crop *crop;
  data_scratch *s;
  data_region *region;
  char *msg;
} jpeg_job;

/* The largest DCT reduction (1, 2, 4 or 8) that leaves the crop at least out_h x out_w. */
static int dct_denominator(const jpeg_job *j) {
  if (!j->dct_scaling) return 1;
  for (int d = 8; d > 1; d /= 2)
    if ((double)j->crop->width / d >= (double)j->out_w && (double)j->crop->height / d >= (double)j->out_h) return d;
  return 1;
}

/* CMYK as libjpeg delivers it (inverted when written by Adobe software) to RGB with PIL's
   arithmetic (cmyk2rgb: R = 255 - C - K + C K / 255, done as nk - C nk / 255 with nk = 255 - K). */
static inline uint8_t cmyk_channel(unsigned c, unsigned k) {
  unsigned nk = 255 - k, t = c * nk + 128;
  unsigned scaled = ((t >> 8) + t) >> 8;
  return (uint8_t)(nk - scaled);
}

static void cmyk_rows_to_rgb(uint8_t *buf, int64_t rows, int64_t cols, int inverted) {
  const uint8_t *in = buf;
  uint8_t *out = buf; /* 4 bytes in, 3 out: writing trails reading */
  for (int64_t p = 0; p < rows * cols; p++, in += 4, out += 3) {
    unsigned c = in[0], m = in[1], y = in[2], k = in[3];
    if (inverted) c = 255 - c, m = 255 - m, y = 255 - y, k = 255 - k;
    uint8_t r = cmyk_channel(c, k), g = cmyk_channel(m, k), b = cmyk_channel(y, k);
    out[0] = r, out[1] = g, out[2] = b;
  }
}

/* The decoded rows [y0, y1) and columns [x0, x1) of the output image that the crop's box needs. */
typedef struct pixel_span { int64_t x0, x1, y0, y1; } pixel_span;

static pixel_span crop_span(const ts_data_crop *crop, int denom, int64_t width, int64_t height, float box[4]) {
  double bx0 = (double)crop->left / denom, by0 = (double)crop->top / denom;
  double bx1 = (double)(crop->left + crop->width) / denom, by1 = (double)(crop->top + crop->height) / denom;
  pixel_span p = {(int64_t)floor(bx0), (int64_t)ceil(bx1), (int64_t)floor(by0), (int64_t)ceil(by1)};
  if (p.x1 > width) p.x1 = width;
  if (p.y1 > height) p.y1 = height;
  box[0] = (float)(bx0 - (double)p.x0);
  box[1] = (float)(by0 - (double)p.y0);
  box[2] = (float)(bx1 - (double)p.x0);
  box[3] = (float)(by1 - (double)p.y0);
  if (box[2] > (float)(p.x1 - p.x0)) box[2] = (float)(p.x1 - p.x0);
  if (box[3] > (float)(p.y1 - p.y0)) box[3] = (float)(p.y1 - p.y0);
  return p;
}

static void jpeg_fail(jpeg_job *j, const char *text) {
  j->own_message = 1;
  snprintf(j->err.message, sizeof j->err.message, "%s", text);
  longjmp(j->err.jump, 1);
}

/* Reads output rows [first, last) into s->decoded (comps bytes per pixel, `cols` columns). */
static void jpeg_read_rows(jpeg_job *j, JDIMENSION first, JDIMENSION last, int64_t cols) {
  struct jpeg_decompress_struct *ci = &j->cinfo;
  if (first > 0 && jpeg_skip_scanlines(ci, first) != first) jpeg_fail(j, "cannot skip to the crop's first row");
  size_t row_bytes = (size_t)cols * (size_t)ci->output_components;
  uint8_t *buf = data_grow(&j->s->decoded, &j->s->decoded_cap, row_bytes * (last - first) + 1);
  if (!buf) jpeg_fail(j, "out of memory for the decoded rows");
  JSAMPROW rows[JPEG_READ_ROWS];
  while (ci->output_scanline < last) {
    JDIMENSION at = ci->output_scanline, want = last - at < JPEG_READ_ROWS ? last - at : JPEG_READ_ROWS;
    for (JDIMENSION r = 0; r < want; r++) rows[r] = buf + (size_t)(at - first + r) * row_bytes;
    if (jpeg_read_scanlines(ci, rows, want) == 0) jpeg_fail(j, "the decoder returned no rows");
  }
}

static int jpeg_decode(jpeg_job *j) {
  struct jpeg_decompress_struct *ci = &j->cinfo;
  if (setjmp(j->err.jump)) return -1;
  jpeg_create_decompress(ci);
  j->created = 1;
  jpeg_mem_src(ci, j->bytes, (unsigned long)j->size);
  jpeg_read_header(ci, TRUE);
  j->choose(ci->image_height, ci->image_width, j->ctx, j->crop);
  int denom = dct_denominator(j);
  ci->scale_num = 1;
  ci->scale_denom = (unsigned)denom;
  int cmyk = ci->jpeg_color_space == JCS_CMYK || ci->jpeg_color_space == JCS_YCCK;
  ci->out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(ci);
  float box[4];
  pixel_span p = crop_span(j->crop, denom, ci->output_width, ci->output_height, box);
  if ((p.x1 - p.x0) * (p.y1 - p.y0) > DATA_MAX_REGION_PIXELS) jpeg_fail(j, "the crop is too large to decode");
  JDIMENSION xoff = (JDIMENSION)(p.x0 > JPEG_EDGE_MARGIN ? p.x0 - JPEG_EDGE_MARGIN : 0);
  JDIMENSION xend = (JDIMENSION)(p.x1 + JPEG_EDGE_MARGIN < ci->output_width ? p.x1 + JPEG_EDGE_MARGIN : ci->output_width);
  JDIMENSION cols = xend - xoff;
  if (cols < ci->output_width) jpeg_crop_scanline(ci, &xoff, &cols); /* moves xoff to an iMCU edge */
  JDIMENSION first = (JDIMENSION)(p.y0 > JPEG_EDGE_MARGIN ? p.y0 - JPEG_EDGE_MARGIN : 0);
  jpeg_read_rows(j, first, (JDIMENSION)p.y1, cols);
  int inverted = ci->saw_Adobe_marker;
  jpeg_abort_decompress(ci); /* the rows below the crop are never needed */
  if (cmyk) cmyk_rows_to_rgb(j->s->decoded, (int64_t)(p.y1 - first), cols, inverted);
  int64_t stride = (int64_t)cols * 3;
  j->region->rgb = (data_rgb){j->s->decoded + (p.y0 - first) * stride + (p.x0 - xoff) * 3, p.y1 - p.y0, p.x1 - p.x0,
                              stride};
  memcpy(j->region->box, box, sizeof box);
  return 0;
}

static int decode_jpeg(jpeg_job *j) {
  j->cinfo.err = jpeg_std_error(&j->err.pub);
  j->err.pub.error_exit = on_jpeg_error;
  j->err.pub.emit_message = on_jpeg_message;
  int st = jpeg_decode(j);
  if (st)
    snprintf(j->msg, DATA_MESSAGE_BYTES, "%s%s", j->own_message ? "" : "corrupt or truncated JPEG: ", j->err.message);
  if (j->created) jpeg_destroy_decompress(&j->cinfo);
  return st;
}

/* ---- PNG (through image.c) ------------------------------------------------------------------- */
/* The crop's pixels of a PNG as packed RGB in s->decoded. */
static int decode_png(const char *path, data_crop_chooser choose, void *ctx, ts_data_crop *crop, data_scratch *s,
                      data_region *region, char *msg) {
  ts_tensor *img = ts_png_read(path);
  if (!img) {
    snprintf(msg, DATA_MESSAGE_BYTES, "%s", ts_last_error());
    ts_clear_error();
    return -1;
  }
  int64_t h = img->shape[0], w = img->shape[1];
  choose(h, w, ctx, crop);
  int64_t ch = crop->height, cw = crop->width;
  int failed = ch * cw > DATA_MAX_REGION_PIXELS ||
               data_pack_crop(ts_data_ptr(img), w, (int)img->shape[2], crop, s, region);
  ts_release(img);
  if (failed) {
    snprintf(msg, DATA_MESSAGE_BYTES, "out of memory for a %lldx%lld crop", (long long)cw, (long long)ch);
    return -1;
  }
  return 0;
}

/* ---- by content ------------------------------------------------------------------------------ */
static const uint8_t JPEG_MAGIC[3] = {0xFF, 0xD8, 0xFF};
static const uint8_t PNG_MAGIC[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

int data_decode_crop(const char *path, const uint8_t *bytes, size_t size, int64_t out_h, int64_t out_w,
                     int dct_scaling, data_crop_chooser choose, void *ctx, ts_data_crop *crop, data_scratch *s,
                     data_region *region, char *msg) {
  if (size == 0) {
    snprintf(msg, DATA_MESSAGE_BYTES, "empty file (0 bytes)");
    return -1;
  }
  if (size >= sizeof JPEG_MAGIC && !memcmp(bytes, JPEG_MAGIC, sizeof JPEG_MAGIC)) {
    jpeg_job j = {.path = path, .bytes = bytes, .size = size, .out_h = out_h, .out_w = out_w,
                  .dct_scaling = dct_scaling, .choose = choose, .ctx = ctx, .crop = crop, .s = s,
                  .region = region, .msg = msg};
    return decode_jpeg(&j);
  }
  if (size >= sizeof PNG_MAGIC && !memcmp(bytes, PNG_MAGIC, sizeof PNG_MAGIC))
    return decode_png(path, choose, ctx, crop, s, region, msg);
  snprintf(msg, DATA_MESSAGE_BYTES, "not a JPEG or PNG file (unrecognized signature)");
  return -1;
}

/* ---- IDX ------------------------------------------------------------------------------------- */
static int idx_fail(const char *op, const char *path, gzFile f, const char *what) {
  if (f) gzclose(f);
  return ts_set_error(TS_ERR_IO, "%s: '%s' is not a valid IDX file: %s", op, path, what);
}

int data_idx_read(const char *op, const char *path, int ndim, data_idx *out) {
  memset(out, 0, sizeof *out);
  gzFile f = gzopen(path, "rb"); /* reads plain files as they are */
  if (!f) return ts_set_error(TS_ERR_IO, "%s: cannot open '%s': %s", op, path, strerror(errno));
  uint8_t header[4 + 4 * 3];
  if (gzread(f, header, 4) != 4) return idx_fail(op, path, f, "shorter than its magic number");
  if (header[0] || header[1] || header[2] != 0x08 || header[3] != ndim) {
    char what[128];
    snprintf(what, sizeof what, "magic 0x%02x%02x%02x%02x, expected 0x000008%02x (unsigned bytes, %d dims)", header[0],
             header[1], header[2], header[3], ndim, ndim);
    return idx_fail(op, path, f, what);
  }
  if (gzread(f, header + 4, (unsigned)(4 * ndim)) != 4 * ndim) return idx_fail(op, path, f, "shorter than its header");
  int64_t total = 1;
  for (int d = 0; d < ndim; d++) {
    const uint8_t *b = header + 4 + 4 * d;
    out->dims[d] = (int64_t)b[0] << 24 | (int64_t)b[1] << 16 | (int64_t)b[2] << 8 | (int64_t)b[3];
    if (out->dims[d] <= 0) return idx_fail(op, path, f, "a dimension is 0");
    if (out->dims[d] > ((int64_t)1 << 40) / total) return idx_fail(op, path, f, "absurd dimensions");
    total *= out->dims[d];
  }
  out->ndim = ndim;
  /* The buffer grows with the data actually read (doubling from 64 MB), so a corrupt header that
     announces terabytes meets "truncated", not a terabyte allocation. */
  int64_t got = 0, capacity = 0;
  while (got < total) {
    if (got == capacity) {
      int64_t grown = capacity ? 2 * capacity : (int64_t)1 << 26;
      capacity = grown < total ? grown : total;
      uint8_t *values = realloc(out->values, (size_t)capacity);
      if (!values) {
        free(out->values);
        out->values = NULL;
        gzclose(f);
        return ts_set_error(TS_ERR_MEMORY, "%s: out of memory for the %lld bytes of '%s'", op, (long long)total, path);
      }
      out->values = values;
    }
    int64_t room = capacity - got;
    unsigned chunk = room > (1 << 30) ? 1u << 30 : (unsigned)room;
    int n = gzread(f, out->values + got, chunk);
    if (n <= 0) break;
    got += n;
  }
  uint8_t extra;
  int trailing = got == total ? gzread(f, &extra, 1) : 0;
  if (got != total || trailing != 0) {
    free(out->values);
    out->values = NULL;
    return idx_fail(op, path, f, got != total ? "the data is shorter than its header says (truncated)"
                                              : "bytes after the data its header announces");
  }
  gzclose(f);
  return TS_OK;
}

/* ---- JPEG writing ---------------------------------------------------------------------------- */
typedef struct jpeg_writer {
  struct jpeg_compress_struct cinfo;
  jpeg_errors err;
  int created;
  FILE *file;
  const uint8_t *pixels;
  int64_t h, w;
  int channels, quality;
} jpeg_writer;

static int jpeg_encode(jpeg_writer *j) {
  struct jpeg_compress_struct *ci = &j->cinfo;
  if (setjmp(j->err.jump)) return -1;
  jpeg_create_compress(ci);
  j->created = 1;
  jpeg_stdio_dest(ci, j->file);
  ci->image_width = (JDIMENSION)j->w;
  ci->image_height = (JDIMENSION)j->h;
  ci->input_components = j->channels;
  ci->in_color_space = j->channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(ci);
  jpeg_set_quality(ci, j->quality, TRUE);
  jpeg_start_compress(ci, TRUE);
  while (ci->next_scanline < ci->image_height) {
    JSAMPROW row = (JSAMPROW)(j->pixels + (size_t)ci->next_scanline * (size_t)(j->w * j->channels));
    jpeg_write_scanlines(ci, &row, 1);
  }
  jpeg_finish_compress(ci);
  return 0;
}

static int jpeg_check_writable(const char *op, const ts_tensor *img, int quality) {
  if (!img) return ts_set_error(TS_ERR_ARG, "%s: image is NULL", op);
  if (img->dtype != TS_U8 && !ts_dtype_is_floating(img->dtype))
    return ts_set_error(TS_ERR_DTYPE, "%s: the image must be uint8 (0..255) or floating point (0..1), got %s", op,
                        ts_dtype_name(img->dtype));
  int64_t channels = img->ndim == 3 ? img->shape[2] : 1;
  if ((img->ndim != 2 && img->ndim != 3) || (channels != 1 && channels != 3))
    return ts_set_error(TS_ERR_SHAPE, "%s: the image must be [H, W, C] with C = 1 or 3 (or [H, W]), got %s", op,
                        ts_tshape(img));
  if (img->shape[0] < 1 || img->shape[1] < 1 || img->shape[0] > JPEG_MAX_DIMENSION || img->shape[1] > JPEG_MAX_DIMENSION)
    return ts_set_error(TS_ERR_SHAPE, "%s: a JPEG is 1 to %d pixels on each side, got %s", op, (int)JPEG_MAX_DIMENSION,
                        ts_tshape(img));
  if (quality < 1 || quality > 100) return ts_set_error(TS_ERR_ARG, "%s: quality must be in 1..100, got %d", op, quality);
  return TS_OK;
}

int ts_jpeg_write(const char *path, ts_tensor *img, int quality) {
  const char *op = "jpeg_write";
  if (!path) return ts_set_error(TS_ERR_ARG, "%s: path is NULL", op);
  if (jpeg_check_writable(op, img, quality)) return ts_last_status();
  jpeg_writer j = {.h = img->shape[0], .w = img->shape[1], .channels = img->ndim == 3 ? (int)img->shape[2] : 1,
                   .quality = quality};
  uint8_t *pixels = ts_image_samples(op, img, j.h * j.w * j.channels);
  if (!pixels) return ts_last_status();
  j.pixels = pixels;
  char *tmp = ts_temporary_name(path);
  if (!tmp) {
    free(pixels);
    return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  }
  int st = TS_OK;
  j.file = fopen(tmp, "wb");
  if (!j.file) {
    st = ts_set_error(TS_ERR_IO, "%s: cannot create '%s': %s", op, tmp, strerror(errno));
  } else {
    j.cinfo.err = jpeg_std_error(&j.err.pub);
    j.err.pub.error_exit = on_jpeg_error;
    if (jpeg_encode(&j)) st = ts_set_error(TS_ERR_IO, "%s: encoding '%s' failed: %s", op, path, j.err.message);
    if (j.created) jpeg_destroy_compress(&j.cinfo);
    st = ts_commit_file(op, j.file, tmp, path, st);
  }
  free(tmp);
  free(pixels);
  return st;
}
