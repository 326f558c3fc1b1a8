/* data.c — datasets (ImageFolder, file lists, IDX), the distributed epoch sampler and the batch
 * loader with its decode workers.
 *
 * The loader's threads are its own pthreads, not the compute pool: decoding overlaps the model's
 * compute instead of competing for ts_parallel_for. Work is handed out one sample at a time, in
 * batch order, from a ring of `prefetch` batches whose output tensors are allocated up front;
 * each worker writes its sample straight into its batch. A sample's result depends only on (seed,
 * epoch, its position in the rank's epoch order), never on which thread ran it or when, so any
 * number of workers gives the same batches. While ts_data_loader_next waits for a batch whose
 * samples are not all taken yet, the caller decodes some of them itself (and all of them with
 * num_workers = 0).
 *
 * Skipped files: the slot of a sample whose file fails takes the next sample of the rank's epoch
 * order, cyclically, that decodes; it is cropped and flipped with the failed sample's random
 * stream (so it differs from the same image's own appearance in the epoch) and reported with its
 * own label and dataset index. A file that failed once is remembered and not tried again by this
 * loader; it is reported on stderr once. */
#include "data.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* ---- growable arrays ----------------------------------------------------------------------------- */
typedef struct text_arena { char *text; size_t len, cap; } text_arena;

/* Appends parts joined by '/' (empty parts skipped) with a NUL; returns the offset, or -1. */
static int64_t arena_add_path(text_arena *a, int nparts, const char *const *parts) {
  size_t need = 1;
  for (int i = 0; i < nparts; i++) need += strlen(parts[i]) + 1;
  if (!data_grow(&a->text, &a->cap, a->len + need)) return -1;
  int64_t at = (int64_t)a->len;
  char *p = a->text + a->len;
  for (int i = 0, first = 1; i < nparts; i++) {
    if (!parts[i][0]) continue;
    if (!first) *p++ = '/';
    size_t n = strlen(parts[i]);
    memcpy(p, parts[i], n);
    p += n;
    first = 0;
  }
  *p++ = '\0';
  a->len = (size_t)(p - a->text);
  return at;
}

typedef struct sample_list {
  int64_t *offsets, *labels;
  size_t offsets_cap, labels_cap;
  int64_t count;
} sample_list;

static int samples_push(sample_list *l, int64_t offset, int64_t label) {
  size_t need = (size_t)(l->count + 1) * sizeof(int64_t);
  if (!data_grow(&l->offsets, &l->offsets_cap, need) || !data_grow(&l->labels, &l->labels_cap, need)) return -1;
  l->offsets[l->count] = offset;
  l->labels[l->count++] = label;
  return 0;
}

/* ---- datasets ------------------------------------------------------------------------------------ */
struct ts_data_dataset {
  int64_t refcount;
  int kind;
  int64_t count;
  char *paths;              /* files: NUL-terminated full paths */
  int64_t *path_offsets;
  int64_t *labels;
  int64_t num_classes;
  char **class_names;
  uint8_t *pixels;          /* IDX: count x height x width gray bytes */
  int64_t height, width;
};

static void dataset_free(ts_data_dataset *d) {
  if (!d) return;
  for (int64_t i = 0; d->class_names && i < d->num_classes; i++) free(d->class_names[i]);
  free(d->class_names);
  free(d->paths);
  free(d->path_offsets);
  free(d->labels);
  free(d->pixels);
  free(d);
}

static void dataset_retain(ts_data_dataset *d) { __atomic_add_fetch(&d->refcount, 1, __ATOMIC_RELAXED); }

void ts_data_close(ts_data_dataset *d) {
  if (d && __atomic_sub_fetch(&d->refcount, 1, __ATOMIC_ACQ_REL) == 0) dataset_free(d);
}

static int64_t max_label(const int64_t *labels, int64_t n) {
  int64_t m = -1;
  for (int64_t i = 0; i < n; i++) m = labels[i] > m ? labels[i] : m;
  return m;
}

/* Classes "0" .. "max label" for datasets whose labels are bare numbers. */
static int numbered_classes(const char *op, ts_data_dataset *d) {
  d->num_classes = max_label(d->labels, d->count) + 1;
  d->class_names = calloc((size_t)(d->num_classes > 0 ? d->num_classes : 1), sizeof(char *));
  if (!d->class_names) return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  for (int64_t i = 0; i < d->num_classes; i++) {
    char name[24];
    snprintf(name, sizeof name, "%lld", (long long)i);
    if (!(d->class_names[i] = strdup(name))) return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  }
  return TS_OK;
}

/* ---- ImageFolder ---------------------------------------------------------------------------------- */
static int compare_strings(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

typedef struct name_list { char **names; size_t cap; size_t count; } name_list;

static void names_free(name_list *n) {
  for (size_t i = 0; i < n->count; i++) free(n->names[i]);
  free(n->names);
  memset(n, 0, sizeof *n);
}

static int names_push(name_list *n, const char *s) {
  char *copy = strdup(s);
  if (!copy || !data_grow(&n->names, &n->cap, (n->count + 1) * sizeof(char *))) {
    free(copy);
    return -1;
  }
  n->names[n->count++] = copy;
  return 0;
}

/* The entries of a directory (without . and ..), sorted by byte order as Python's sorted(). */
static int list_directory(const char *op, const char *dir, name_list *out) {
  DIR *d = opendir(dir);
  if (!d) return ts_set_error(TS_ERR_IO, "%s: cannot read directory '%s': %s", op, dir, strerror(errno));
  struct dirent *e;
  int st = TS_OK;
  while (!st && (e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    if (names_push(out, e->d_name)) st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory listing '%s'", op, dir);
  }
  closedir(d);
  if (!st && out->count) qsort(out->names, out->count, sizeof(char *), compare_strings);
  return st;
}

static int is_directory(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode); /* follows links, as os.walk(followlinks=True) */
}

static int has_image_extension(const char *name) {
  static const char *const extensions[] = {".jpg", ".jpeg", ".png"};
  size_t n = strlen(name);
  for (size_t i = 0; i < sizeof extensions / sizeof extensions[0]; i++) {
    size_t k = strlen(extensions[i]);
    if (n >= k && !strcasecmp(name + n - k, extensions[i])) return 1;
  }
  return 0;
}

/* One image file found under a class: its directory relative to the class and its name. */
typedef struct found_file { char *dir, *name; } found_file;
typedef struct found_list { found_file *files; size_t cap, count; } found_list;

static int compare_found(const void *a, const void *b) {
  const found_file *x = a, *y = b;
  int c = strcmp(x->dir, y->dir);
  return c ? c : strcmp(x->name, y->name);
}

enum { MAX_FOLDER_DEPTH = 64 }; /* guards against symbolic-link cycles */

static int walk_class(const char *op, const char *class_root, const char *rel, int depth, found_list *out) {
  char *dir = malloc(strlen(class_root) + strlen(rel) + 2);
  if (!dir) return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  sprintf(dir, rel[0] ? "%s/%s" : "%s%s", class_root, rel);
  name_list entries = {0};
  int st = list_directory(op, dir, &entries);
  for (size_t i = 0; !st && i < entries.count; i++) {
    const char *name = entries.names[i];
    char *path = malloc(strlen(dir) + strlen(name) + 2), *sub = malloc(strlen(rel) + strlen(name) + 2);
    if (!path || !sub) {
      free(path);
      free(sub);
      st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
      break;
    }
    sprintf(path, "%s/%s", dir, name);
    sprintf(sub, rel[0] ? "%s/%s" : "%s%s", rel, name);
    if (is_directory(path)) {
      if (depth >= MAX_FOLDER_DEPTH) st = ts_set_error(TS_ERR_IO, "%s: '%s' is nested too deep (a link cycle?)", op, path);
      else st = walk_class(op, class_root, sub, depth + 1, out);
    } else if (has_image_extension(name)) {
      found_file f = {strdup(rel), strdup(name)};
      if (!f.dir || !f.name || !data_grow(&out->files, &out->cap, (out->count + 1) * sizeof(found_file))) {
        free(f.dir);
        free(f.name);
        st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
      } else {
        out->files[out->count++] = f;
      }
    }
    free(path);
    free(sub);
  }
  names_free(&entries);
  free(dir);
  return st;
}

static void found_free(found_list *f) {
  for (size_t i = 0; i < f->count; i++) free(f->files[i].dir), free(f->files[i].name);
  free(f->files);
  memset(f, 0, sizeof *f);
}

/* The files of class `label` in torchvision's order (sorted(os.walk(...)), then sorted names). */
static int add_class_files(const char *op, const char *root, const char *cls, int64_t label, text_arena *text,
                           sample_list *samples) {
  char *class_root = malloc(strlen(root) + strlen(cls) + 2);
  if (!class_root) return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  sprintf(class_root, "%s/%s", root, cls);
  found_list found = {0};
  int st = walk_class(op, class_root, "", 0, &found);
  if (!st && found.count) qsort(found.files, found.count, sizeof(found_file), compare_found);
  for (size_t i = 0; !st && i < found.count; i++) {
    const char *parts[4] = {root, cls, found.files[i].dir, found.files[i].name};
    int64_t at = arena_add_path(text, 4, parts);
    if (at < 0 || samples_push(samples, at, label)) st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  }
  found_free(&found);
  free(class_root);
  return st;
}

static int open_image_folder(const char *op, const char *root, ts_data_dataset *d, text_arena *text, sample_list *s) {
  if (!is_directory(root)) return ts_set_error(TS_ERR_IO, "%s: '%s' is not a directory", op, root);
  name_list entries = {0}, classes = {0};
  int st = list_directory(op, root, &entries);
  for (size_t i = 0; !st && i < entries.count; i++) {
    char *path = malloc(strlen(root) + strlen(entries.names[i]) + 2);
    if (!path) st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
    if (path) sprintf(path, "%s/%s", root, entries.names[i]);
    if (path && is_directory(path) && names_push(&classes, entries.names[i]))
      st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
    free(path);
  }
  names_free(&entries);
  if (!st && classes.count == 0) st = ts_set_error(TS_ERR_IO, "%s: no class folder in '%s'", op, root);
  for (size_t c = 0; !st && c < classes.count; c++) {
    int64_t before = s->count;
    st = add_class_files(op, root, classes.names[c], (int64_t)c, text, s);
    if (!st && s->count == before)
      st = ts_set_error(TS_ERR_IO, "%s: class folder '%s/%s' has no .jpg, .jpeg or .png file", op, root, classes.names[c]);
  }
  if (st) {
    names_free(&classes);
    return st;
  }
  d->num_classes = (int64_t)classes.count;
  d->class_names = classes.names; /* taken over */
  return TS_OK;
}

/* ---- file lists ------------------------------------------------------------------------------------ */
static char *read_text_file(const char *op, const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    ts_set_error(TS_ERR_IO, "%s: cannot open '%s': %s", op, path, strerror(errno));
    return NULL;
  }
  char *text = NULL;
  size_t cap = 0, len = 0, got;
  char chunk[65536];
  while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
    if (!data_grow(&text, &cap, len + got + 1)) {
      free(text);
      fclose(f);
      ts_set_error(TS_ERR_MEMORY, "%s: out of host memory reading '%s'", op, path);
      return NULL;
    }
    memcpy(text + len, chunk, got);
    len += got;
  }
  int failed = ferror(f);
  fclose(f);
  if (failed || !data_grow(&text, &cap, len + 1)) {
    free(text);
    ts_set_error(TS_ERR_IO, "%s: cannot read '%s'", op, path);
    return NULL;
  }
  text[len] = '\0';
  return text;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

/* One `path label` line (trimmed, not empty): the label is the last field, the path all before it. */
static int parse_list_line(const char *op, const char *list, int64_t line_no, char *line, const char *root,
                           text_arena *text, sample_list *s) {
  char *end = line + strlen(line), *sep = end;
  while (sep > line && !is_space(sep[-1])) sep--;
  char *path_end = sep;
  while (path_end > line && is_space(path_end[-1])) path_end--;
  if (path_end == line)
    return ts_set_error(TS_ERR_IO, "%s: '%s' line %lld: expected '<relative path> <label>', got '%s'", op, list,
                        (long long)line_no, line);
  char *label_end;
  errno = 0;
  long long label = strtoll(sep, &label_end, 10);
  if (label_end == sep || *label_end || errno || label < 0)
    return ts_set_error(TS_ERR_IO, "%s: '%s' line %lld: the label '%s' is not a non-negative integer", op, list,
                        (long long)line_no, sep);
  *path_end = '\0';
  const char *parts[2] = {line[0] == '/' ? "" : root, line}; /* absolute paths are kept as written */
  int64_t at = arena_add_path(text, 2, parts);
  if (at < 0 || samples_push(s, at, label)) return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  return TS_OK;
}

static int open_file_list(const char *op, const char *root, const char *list, text_arena *text, sample_list *s) {
  char *content = read_text_file(op, list);
  if (!content) return ts_last_status();
  int st = TS_OK;
  int64_t line_no = 0;
  for (char *line = content, *next; !st && line; line = next) {
    next = strchr(line, '\n');
    if (next) *next++ = '\0';
    line_no++;
    while (is_space(*line)) line++;
    char *end = line + strlen(line);
    while (end > line && is_space(end[-1])) *--end = '\0';
    if (*line && *line != '#') st = parse_list_line(op, list, line_no, line, root, text, s);
  }
  free(content);
  return st;
}

/* ---- IDX ------------------------------------------------------------------------------------------- */
static int open_idx(const char *op, const char *images, const char *labels, ts_data_dataset *d) {
  data_idx im, lb;
  if (data_idx_read(op, images, 3, &im)) return ts_last_status();
  if (data_idx_read(op, labels, 1, &lb)) {
    free(im.values);
    return ts_last_status();
  }
  int st = TS_OK;
  if (im.dims[0] != lb.dims[0]) {
    st = ts_set_error(TS_ERR_IO, "%s: '%s' holds %lld images but '%s' %lld labels", op, images, (long long)im.dims[0],
                      labels, (long long)lb.dims[0]);
  } else if (!(d->labels = malloc((size_t)lb.dims[0] * sizeof(int64_t)))) {
    st = ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  } else {
    for (int64_t i = 0; i < lb.dims[0]; i++) d->labels[i] = lb.values[i];
    d->count = im.dims[0];
    d->height = im.dims[1];
    d->width = im.dims[2];
    d->pixels = im.values;
    im.values = NULL;
    st = numbered_classes(op, d);
  }
  free(im.values);
  free(lb.values);
  return st;
}

/* ---- opening --------------------------------------------------------------------------------------- */
static int open_files(const char *op, int kind, const char *a, const char *b, ts_data_dataset *d) {
  text_arena text = {0};
  sample_list samples = {0};
  int st = kind == TS_DATA_IMAGE_FOLDER ? open_image_folder(op, a, d, &text, &samples)
                                        : open_file_list(op, a, b, &text, &samples);
  d->paths = text.text; /* taken over, also on failure (dataset_free releases them) */
  d->path_offsets = samples.offsets;
  d->labels = samples.labels;
  d->count = samples.count;
  if (!st && samples.count == 0) st = ts_set_error(TS_ERR_IO, "%s: '%s' lists no image", op, b);
  if (!st && kind == TS_DATA_FILE_LIST) st = numbered_classes(op, d);
  return st;
}

ts_data_dataset *ts_data_open(int kind, const char *path_a, const char *path_b) {
  const char *op = "data_open";
  if (kind < TS_DATA_IMAGE_FOLDER || kind > TS_DATA_IDX) {
    ts_set_error(TS_ERR_ARG, "%s: unknown dataset kind %d (image folder 0, file list 1, IDX 2)", op, kind);
    return NULL;
  }
  if (!path_a || (kind != TS_DATA_IMAGE_FOLDER && !path_b)) {
    static const char *const needs[] = {"a root directory", "a root directory and a list file",
                                        "an images file and a labels file"};
    ts_set_error(TS_ERR_ARG, "%s: this kind of dataset needs %s", op, needs[kind]);
    return NULL;
  }
  ts_data_dataset *d = calloc(1, sizeof *d);
  if (!d) {
    ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
    return NULL;
  }
  d->refcount = 1;
  d->kind = kind;
  int st = kind == TS_DATA_IDX ? open_idx(op, path_a, path_b, d) : open_files(op, kind, path_a, path_b, d);
  if (st) {
    dataset_free(d);
    return NULL;
  }
  return d;
}

int64_t ts_data_size(const ts_data_dataset *d) { return d ? d->count : -1; }
int64_t ts_data_num_classes(const ts_data_dataset *d) { return d ? d->num_classes : -1; }

const char *ts_data_class_name(const ts_data_dataset *d, int64_t i) {
  return d && i >= 0 && i < d->num_classes ? d->class_names[i] : NULL;
}

int64_t ts_data_label(const ts_data_dataset *d, int64_t i) { return d && i >= 0 && i < d->count ? d->labels[i] : -1; }

const char *ts_data_path(const ts_data_dataset *d, int64_t i) {
  if (!d || i < 0 || i >= d->count || d->kind == TS_DATA_IDX) return "";
  return d->paths + d->path_offsets[i];
}

/* ---- one sample ------------------------------------------------------------------------------------ */
typedef struct crop_choice {
  const ts_data_loader_options *opt;
  int64_t epoch, key;
  int whole; /* the full image, no randomness */
} crop_choice;

static void choose_crop(int64_t height, int64_t width, void *ctx, ts_data_crop *crop) {
  const crop_choice *c = ctx;
  if (c->whole) {
    *crop = (ts_data_crop){0, 0, height, width, 0};
    return;
  }
  data_crop_params(c->opt->seed, c->epoch, c->key, height, width, c->opt->scale, c->opt->ratio, c->opt->hflip, crop);
}

/* The crop's pixels of sample i: decoded (files) or copied (IDX). Returns 0, or -1 with msg. */
static int sample_region(const ts_data_dataset *d, int64_t i, const crop_choice *choice, int64_t out_size,
                         int dct_scaling, data_scratch *s, ts_data_crop *crop, data_region *region, char *msg) {
  if (d->kind == TS_DATA_IDX) {
    choose_crop(d->height, d->width, (void *)choice, crop);
    const uint8_t *gray = d->pixels + i * d->height * d->width;
    if (data_pack_crop(gray, d->width, 1, crop, s, region)) {
      snprintf(msg, DATA_MESSAGE_BYTES, "out of host memory");
      return -1;
    }
    return 0;
  }
  const char *path = ts_data_path(d, i);
  size_t size;
  if (data_read_file(path, s, &size, msg)) return -1;
  return data_decode_crop(path, s->file, size, out_size, out_size, dct_scaling, choose_crop, (void *)choice, crop, s,
                          region, msg);
}

/* A region as a new uint8 [H, W, 3] tensor. */
static ts_tensor *region_tensor(const data_region *r) {
  int64_t shape[3] = {r->rgb.height, r->rgb.width, 3};
  ts_tensor *t = ts_empty(3, shape, TS_U8, ts_cpu());
  if (!t) return NULL;
  uint8_t *out = ts_data_ptr(t);
  for (int64_t y = 0; y < r->rgb.height; y++)
    memcpy(out + y * r->rgb.width * 3, r->rgb.pixels + y * r->rgb.stride, (size_t)(r->rgb.width * 3));
  return t;
}

ts_tensor *ts_data_image(const ts_data_dataset *d, int64_t i) {
  const char *op = "data_image";
  if (!d) return TS_FAIL_NULL(TS_ERR_ARG, "%s: dataset is NULL", op);
  if (i < 0 || i >= d->count)
    return TS_FAIL_NULL(TS_ERR_INDEX, "%s: index %lld is out of range for a dataset of %lld samples", op, (long long)i,
                        (long long)d->count);
  data_scratch s = {0};
  char msg[DATA_MESSAGE_BYTES];
  crop_choice whole = {.whole = 1};
  ts_data_crop crop;
  data_region region;
  ts_tensor *t = NULL;
  if (sample_region(d, i, &whole, 1, 0, &s, &crop, &region, msg))
    ts_set_error(TS_ERR_IO, "%s: '%s': %s", op, ts_data_path(d, i), msg);
  else
    t = region_tensor(&region);
  data_scratch_free(&s);
  return t;
}

ts_tensor *ts_data_decode(const char *path) {
  const char *op = "data_decode";
  if (!path) return TS_FAIL_NULL(TS_ERR_ARG, "%s: path is NULL", op);
  data_scratch s = {0};
  char msg[DATA_MESSAGE_BYTES];
  crop_choice whole = {.whole = 1};
  ts_data_crop crop;
  data_region region;
  size_t size;
  ts_tensor *t = NULL;
  if (data_read_file(path, &s, &size, msg) ||
      data_decode_crop(path, s.file, size, 1, 1, 0, choose_crop, &whole, &crop, &s, &region, msg))
    ts_set_error(TS_ERR_IO, "%s: '%s': %s", op, path, msg);
  else
    t = region_tensor(&region);
  data_scratch_free(&s);
  return t;
}

/* ---- the loader ------------------------------------------------------------------------------------ */
typedef struct batch_slot {
  int64_t batch;             /* the batch it holds, -1 when none */
  int64_t size, done, skipped;
  ts_tensor *images, *labels, *indices;
  int failed;
  char error[DATA_MESSAGE_BYTES + 160];
} batch_slot;

struct ts_data_loader {
  ts_data_dataset *data;
  ts_data_loader_options opt;
  float lut[3][256];
  int64_t per_rank, num_batches;
  int64_t *order;            /* the rank's samples of the current epoch, per_rank of them */
  int64_t epoch, next_batch, skipped;
  int started;               /* the ring is armed for (epoch, next_batch) */
  uint8_t *bad;              /* per dataset sample: 1 once its file failed */
  pthread_mutex_t lock;
  pthread_cond_t work, ready, idle;
  batch_slot *ring;
  int ring_size;
  int64_t claim_batch, claim_slot, armed_end;
  int in_flight, stop;
  pthread_t *threads;
  int num_threads;
  data_scratch caller_scratch;
};

void ts_data_loader_default_options(ts_data_loader_options *o) {
  if (!o) return;
  *o = (ts_data_loader_options){
      .batch_size = 64, .image_size = 224, .scale = {0.2, 1.0}, .ratio = {3.0 / 4.0, 4.0 / 3.0}, .hflip = 0.5,
      .normalize = 1, .mean = {0.485, 0.456, 0.406}, .std = {0.229, 0.224, 0.225}, .seed = 0, .num_workers = 2,
      .prefetch = 2, .rank = 0, .world_size = 1, .drop_last = 1, .shuffle = 1, .dct_scaling = 1};
}

enum { MAX_WORKERS = 256, MAX_PREFETCH = 64, MAX_IMAGE_SIZE = 16384 };

static int check_options(const char *op, const ts_data_dataset *d, const ts_data_loader_options *o) {
  if (!d || !o) return ts_set_error(TS_ERR_ARG, "%s: dataset and options must be given", op);
  if (o->batch_size < 1) return ts_set_error(TS_ERR_ARG, "%s: batch_size must be >= 1, got %lld", op, (long long)o->batch_size);
  if (o->image_size < 1 || o->image_size > MAX_IMAGE_SIZE)
    return ts_set_error(TS_ERR_ARG, "%s: image_size must be in 1..%d, got %lld", op, MAX_IMAGE_SIZE, (long long)o->image_size);
  if (data_check_ranges(op, o->scale, o->ratio, o->hflip) || data_check_normalize(op, o->normalize, o->mean, o->std))
    return ts_last_status();
  if (o->num_workers < 0 || o->num_workers > MAX_WORKERS)
    return ts_set_error(TS_ERR_ARG, "%s: num_workers must be in 0..%d, got %d", op, MAX_WORKERS, o->num_workers);
  if (o->prefetch < 1 || o->prefetch > MAX_PREFETCH)
    return ts_set_error(TS_ERR_ARG, "%s: prefetch must be in 1..%d, got %d", op, MAX_PREFETCH, o->prefetch);
  if (o->world_size < 1 || o->rank < 0 || o->rank >= o->world_size)
    return ts_set_error(TS_ERR_ARG, "%s: rank must be in 0..world_size-1 and world_size >= 1, got rank %lld of %lld", op,
                        (long long)o->rank, (long long)o->world_size);
  return TS_OK;
}

/* ---- the sampler ---------------------------------------------------------------------------------- */
typedef struct sort_key { uint64_t key; int64_t index; } sort_key;

static int compare_keys(const void *a, const void *b) {
  const sort_key *x = a, *y = b;
  if (x->key != y->key) return x->key < y->key ? -1 : 1;
  return x->index < y->index ? -1 : x->index > y->index;
}

/* The epoch's permutation: indices ordered by 64-bit Philox keys (seed; i, epoch * 2^16 + 0xFFFF),
   ties by index; the identity without shuffle. Then torch's DistributedSampler: padded by wrapping
   around to a multiple of world_size, rank r takes positions r, r + world_size, ... */
static int epoch_order(const char *op, ts_data_loader *l, int64_t epoch) {
  int64_t n = l->data->count, w = l->opt.world_size;
  int64_t *perm = malloc((size_t)n * sizeof(int64_t));
  sort_key *keys = l->opt.shuffle ? malloc((size_t)n * sizeof(sort_key)) : NULL;
  if (!perm || (l->opt.shuffle && !keys)) {
    free(perm);
    free(keys);
    return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory for the order of %lld samples", op, (long long)n);
  }
  if (keys) {
    uint64_t hi = data_counter_hi(epoch, DATA_PERMUTATION_BLOCK);
    for (int64_t i = 0; i < n; i++) {
      uint32_t r[4];
      ts_philox4x32(l->opt.seed, (uint64_t)i, hi, r);
      keys[i] = (sort_key){(uint64_t)r[0] << 32 | r[1], i};
    }
    qsort(keys, (size_t)n, sizeof(sort_key), compare_keys);
    for (int64_t i = 0; i < n; i++) perm[i] = keys[i].index;
    free(keys);
  } else {
    for (int64_t i = 0; i < n; i++) perm[i] = i;
  }
  for (int64_t m = 0; m < l->per_rank; m++) l->order[m] = perm[(l->opt.rank + m * w) % n];
  free(perm);
  return TS_OK;
}

/* ---- samples into batches ------------------------------------------------------------------------- */
static int augment_into(ts_data_loader *l, data_scratch *s, int64_t sample, int64_t key, float *out, char *msg) {
  crop_choice choice = {&l->opt, l->epoch, key, 0};
  ts_data_crop crop;
  data_region region;
  int64_t size = l->opt.image_size;
  if (sample_region(l->data, sample, &choice, size, l->opt.dct_scaling, s, &crop, &region, msg) ||
      data_resample(&region.rgb, region.box, size, size, s, msg))
    return -1;
  data_write_planes(s->resized, size, size, crop.flip, (const float(*)[256])l->lut, out);
  return 0;
}

/* Reports a bad file once. The mark is set only after its line is written (under the lock, so two
   workers failing one file print it once): a worker that skips a marked file, and may then fail
   its batch saying every file was reported, never runs ahead of the report. */
static void report_bad_file(ts_data_loader *l, int64_t sample, const char *msg) {
  pthread_mutex_lock(&l->lock);
  if (!l->bad[sample]) {
    fprintf(stderr, "tessera data: skipping '%s': %s\n", ts_data_path(l->data, sample), msg);
    __atomic_store_n(&l->bad[sample], 1, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&l->lock);
}

/* Fills slot k of batch b; returns 0 with *skipped set, or -1 with err. */
static int run_sample(ts_data_loader *l, data_scratch *s, int64_t b, int64_t k, batch_slot *slot, int *skipped,
                      char *err) {
  int64_t position = b * l->opt.batch_size + k, key = l->order[position], plane = 3 * l->opt.image_size * l->opt.image_size;
  float *out = (float *)ts_data_ptr(slot->images) + k * plane;
  char msg[DATA_MESSAGE_BYTES];
  for (int64_t a = 0; a < l->per_rank; a++) {
    int64_t sample = l->order[(position + a) % l->per_rank];
    if (__atomic_load_n(&l->bad[sample], __ATOMIC_ACQUIRE)) continue;
    if (augment_into(l, s, sample, key, out, msg)) {
      report_bad_file(l, sample, msg);
      continue;
    }
    ((int64_t *)ts_data_ptr(slot->labels))[k] = l->data->labels[sample];
    ((int64_t *)ts_data_ptr(slot->indices))[k] = sample;
    *skipped = a > 0;
    return 0;
  }
  snprintf(err, DATA_MESSAGE_BYTES + 160, "data_loader_next: no file of rank %lld's %lld samples of epoch %lld could be "
           "decoded (each was reported on stderr)", (long long)l->opt.rank, (long long)l->per_rank, (long long)l->epoch);
  return -1;
}

static int claimable(const ts_data_loader *l) { return l->claim_batch < l->armed_end; }

/* Takes the next sample to prepare (lock held). */
static batch_slot *claim(ts_data_loader *l, int64_t *b, int64_t *k) {
  batch_slot *slot = &l->ring[l->claim_batch % l->ring_size];
  *b = l->claim_batch;
  *k = l->claim_slot++;
  if (l->claim_slot == slot->size) l->claim_batch++, l->claim_slot = 0;
  l->in_flight++;
  return slot;
}

/* Runs a claimed sample without the lock and records its outcome (lock held on entry and exit). */
static void work_on(ts_data_loader *l, data_scratch *s, batch_slot *slot, int64_t b, int64_t k) {
  pthread_mutex_unlock(&l->lock);
  char err[DATA_MESSAGE_BYTES + 160];
  int skipped = 0, st = run_sample(l, s, b, k, slot, &skipped, err);
  pthread_mutex_lock(&l->lock);
  if (st && !slot->failed) {
    slot->failed = 1;
    memcpy(slot->error, err, sizeof err);
  }
  slot->skipped += skipped;
  if (++slot->done == slot->size) pthread_cond_broadcast(&l->ready);
  if (--l->in_flight == 0) pthread_cond_broadcast(&l->idle);
}

static void *worker_main(void *arg) {
  ts_data_loader *l = arg;
  data_scratch s = {0};
  pthread_mutex_lock(&l->lock);
  for (;;) {
    while (!l->stop && !claimable(l)) pthread_cond_wait(&l->work, &l->lock);
    if (l->stop) break;
    int64_t b, k;
    batch_slot *slot = claim(l, &b, &k);
    work_on(l, &s, slot, b, k);
  }
  pthread_mutex_unlock(&l->lock);
  data_scratch_free(&s);
  return NULL;
}

/* ---- the ring --------------------------------------------------------------------------------------- */
static void slot_clear(batch_slot *slot) {
  ts_release(slot->images);
  ts_release(slot->labels);
  ts_release(slot->indices);
  memset(slot, 0, sizeof *slot);
  slot->batch = -1;
}

static int64_t batch_length(const ts_data_loader *l, int64_t b) {
  int64_t left = l->per_rank - b * l->opt.batch_size;
  return left < l->opt.batch_size ? left : l->opt.batch_size;
}

/* Allocates batch b's outputs into its slot. */
static int slot_arm(ts_data_loader *l, batch_slot *slot, int64_t b) {
  int64_t n = batch_length(l, b), s = l->opt.image_size;
  int64_t image_shape[4] = {n, 3, s, s};
  slot_clear(slot);
  slot->images = ts_empty(4, image_shape, TS_F32, ts_cpu());
  slot->labels = ts_empty(1, &n, TS_I64, ts_cpu());
  slot->indices = ts_empty(1, &n, TS_I64, ts_cpu());
  if (!slot->images || !slot->labels || !slot->indices) {
    slot_clear(slot);
    return ts_last_status();
  }
  slot->batch = b;
  slot->size = n;
  return TS_OK;
}

/* Stops handing out work and waits until the workers are idle; the ring is then empty. */
static void quiesce(ts_data_loader *l) {
  pthread_mutex_lock(&l->lock);
  l->armed_end = l->claim_batch;
  while (l->in_flight > 0) pthread_cond_wait(&l->idle, &l->lock);
  for (int i = 0; i < l->ring_size; i++) slot_clear(&l->ring[i]);
  l->started = 0;
  pthread_mutex_unlock(&l->lock);
}

/* Moves to (epoch, batch) and starts preparing the batches from there. */
static int start_at(const char *op, ts_data_loader *l, int64_t epoch, int64_t batch) {
  quiesce(l);
  if (epoch != l->epoch || !l->order) {
    if (!l->order && !(l->order = malloc((size_t)(l->per_rank > 0 ? l->per_rank : 1) * sizeof(int64_t))))
      return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
    l->epoch = -1; /* invalid until the order is complete */
    if (epoch_order(op, l, epoch)) return ts_last_status();
  }
  l->epoch = epoch;
  l->next_batch = batch;
  l->skipped = 0;
  pthread_mutex_lock(&l->lock);
  int st = TS_OK;
  int64_t end = batch + l->ring_size < l->num_batches ? batch + l->ring_size : l->num_batches;
  for (int64_t b = batch; !st && b < end; b++) st = slot_arm(l, &l->ring[b % l->ring_size], b);
  if (!st) {
    l->claim_batch = batch;
    l->claim_slot = 0;
    l->armed_end = end;
    l->started = 1;
    pthread_cond_broadcast(&l->work);
  }
  pthread_mutex_unlock(&l->lock);
  return st;
}

static void loader_free(ts_data_loader *l) {
  pthread_mutex_lock(&l->lock);
  l->stop = 1;
  pthread_cond_broadcast(&l->work);
  pthread_mutex_unlock(&l->lock);
  for (int i = 0; i < l->num_threads; i++) pthread_join(l->threads[i], NULL);
  for (int i = 0; l->ring && i < l->ring_size; i++) slot_clear(&l->ring[i]);
  pthread_mutex_destroy(&l->lock);
  pthread_cond_destroy(&l->work);
  pthread_cond_destroy(&l->ready);
  pthread_cond_destroy(&l->idle);
  data_scratch_free(&l->caller_scratch);
  free(l->threads);
  free(l->ring);
  free(l->order);
  free(l->bad);
  ts_data_close(l->data);
  free(l);
}

void ts_data_loader_close(ts_data_loader *l) {
  if (l) loader_free(l);
}

static int start_workers(const char *op, ts_data_loader *l) {
  l->threads = malloc((size_t)(l->opt.num_workers > 0 ? l->opt.num_workers : 1) * sizeof(pthread_t));
  if (!l->threads) return ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
  for (int i = 0; i < l->opt.num_workers; i++) {
    int err = pthread_create(&l->threads[i], NULL, worker_main, l);
    if (err) return ts_set_error(TS_ERR_MEMORY, "%s: cannot start decode worker %d: %s", op, i, strerror(err));
    l->num_threads++;
  }
  return TS_OK;
}

ts_data_loader *ts_data_loader_new(ts_data_dataset *d, const ts_data_loader_options *o) {
  const char *op = "data_loader_new";
  if (check_options(op, d, o)) return NULL;
  ts_data_loader *l = calloc(1, sizeof *l);
  if (!l) {
    ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
    return NULL;
  }
  dataset_retain(d);
  l->data = d;
  l->opt = *o;
  l->epoch = -1;
  l->per_rank = (d->count + o->world_size - 1) / o->world_size;
  l->num_batches = o->drop_last ? l->per_rank / o->batch_size : (l->per_rank + o->batch_size - 1) / o->batch_size;
  data_normalize_table(o->normalize, o->mean, o->std, l->lut);
  pthread_mutex_init(&l->lock, NULL);
  pthread_cond_init(&l->work, NULL);
  pthread_cond_init(&l->ready, NULL);
  pthread_cond_init(&l->idle, NULL);
  l->ring_size = o->prefetch;
  l->ring = calloc((size_t)l->ring_size, sizeof(batch_slot));
  l->bad = calloc((size_t)d->count, 1);
  if (!l->ring || !l->bad) {
    ts_set_error(TS_ERR_MEMORY, "%s: out of host memory", op);
    loader_free(l);
    return NULL;
  }
  for (int i = 0; i < l->ring_size; i++) l->ring[i].batch = -1;
  if (start_workers(op, l) || start_at(op, l, 0, 0)) {
    loader_free(l);
    return NULL;
  }
  return l;
}

int ts_data_loader_options_get(const ts_data_loader *l, ts_data_loader_options *out) {
  if (!l || !out) return ts_set_error(TS_ERR_ARG, "data_loader_options_get: loader and out must be given");
  *out = l->opt;
  return TS_OK;
}

int64_t ts_data_loader_num_batches(const ts_data_loader *l) { return l ? l->num_batches : -1; }
int64_t ts_data_loader_num_samples(const ts_data_loader *l) { return l ? l->per_rank : -1; }
int64_t ts_data_loader_skipped(const ts_data_loader *l) { return l ? l->skipped : -1; }

int ts_data_loader_set_epoch(ts_data_loader *l, int64_t epoch) {
  const char *op = "data_loader_set_epoch";
  if (!l) return ts_set_error(TS_ERR_ARG, "%s: loader is NULL", op);
  if (epoch < 0 || epoch >= ((int64_t)1 << 47))
    return ts_set_error(TS_ERR_ARG, "%s: epoch must be in 0..2^47-1, got %lld", op, (long long)epoch);
  if (l->started && epoch == l->epoch && l->next_batch == 0) return TS_OK; /* already under way */
  return start_at(op, l, epoch, 0);
}

int ts_data_loader_get_state(const ts_data_loader *l, ts_data_loader_state *out) {
  if (!l || !out) return ts_set_error(TS_ERR_ARG, "data_loader_get_state: loader and out must be given");
  *out = (ts_data_loader_state){l->epoch, l->next_batch, l->opt.seed};
  return TS_OK;
}

int ts_data_loader_set_state(ts_data_loader *l, const ts_data_loader_state *s) {
  const char *op = "data_loader_set_state";
  if (!l || !s) return ts_set_error(TS_ERR_ARG, "%s: loader and state must be given", op);
  if (s->epoch < 0 || s->epoch >= ((int64_t)1 << 47) || s->batch < 0 || s->batch > l->num_batches)
    return ts_set_error(TS_ERR_ARG, "%s: state (epoch %lld, batch %lld) is out of range: epochs 0..2^47-1, batches 0..%lld",
                        op, (long long)s->epoch, (long long)s->batch, (long long)l->num_batches);
  if (s->seed != l->opt.seed) {
    quiesce(l);
    l->opt.seed = s->seed;
    l->epoch = -1; /* the order depends on the seed */
  }
  return start_at(op, l, s->epoch, s->batch);
}

/* Waits for batch next_batch, preparing its untaken samples in this thread meanwhile (lock held). */
static batch_slot *wait_for_batch(ts_data_loader *l) {
  batch_slot *slot = &l->ring[l->next_batch % l->ring_size];
  while (slot->done < slot->size) {
    if (claimable(l) && l->claim_batch == l->next_batch) {
      int64_t b, k;
      batch_slot *taken = claim(l, &b, &k);
      work_on(l, &l->caller_scratch, taken, b, k);
    } else {
      pthread_cond_wait(&l->ready, &l->lock);
    }
  }
  return slot;
}

int ts_data_loader_next(ts_data_loader *l, ts_tensor **images, ts_tensor **labels, ts_tensor **indices) {
  const char *op = "data_loader_next";
  if (!l || !images || !labels || !indices) {
    ts_set_error(TS_ERR_ARG, "%s: loader and outputs must be given", op);
    return -1;
  }
  *images = *labels = *indices = NULL;
  if (!l->started && start_at(op, l, l->epoch < 0 ? 0 : l->epoch, l->next_batch)) return -1;
  if (l->next_batch >= l->num_batches) return 0;
  pthread_mutex_lock(&l->lock);
  batch_slot *slot = wait_for_batch(l);
  if (slot->failed) {
    ts_set_error(TS_ERR_IO, "%s", slot->error);
    pthread_mutex_unlock(&l->lock);
    return -1;
  }
  *images = slot->images;
  *labels = slot->labels;
  *indices = slot->indices;
  slot->images = slot->labels = slot->indices = NULL;
  l->skipped += slot->skipped;
  int64_t refill = l->next_batch + l->ring_size;
  l->next_batch++;
  int st = refill < l->num_batches ? slot_arm(l, slot, refill) : (slot_clear(slot), TS_OK);
  if (!st && refill < l->num_batches) {
    l->armed_end = refill + 1;
    pthread_cond_broadcast(&l->work);
  }
  pthread_mutex_unlock(&l->lock);
  if (st) { /* the outputs are delivered; the ring restarts at the next call */
    quiesce(l);
  }
  return 1;
}
