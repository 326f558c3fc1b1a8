/* error.c — thread-local last error and the formatting helpers error messages use. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static _Thread_local char last_message[1024];
static _Thread_local int last_status;
static _Thread_local uint64_t errors_set;

uint64_t ts_error_count(void) { return errors_set; }

int ts_set_error(int status, const char *fmt, ...) {
  errors_set++;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_message, sizeof last_message, fmt, ap);
  va_end(ap);
  last_status = status;
  return status;
}

const char *ts_last_error(void) { return last_status ? last_message : ""; }
int ts_last_status(void) { return last_status; }
void ts_clear_error(void) {
  last_status = TS_OK;
  last_message[0] = '\0';
}

/* Rotating buffers: an error message may format up to four shapes. */
enum { SHAPE_SLOTS = 4, SHAPE_LEN = 8 * 24 + 4 };
static _Thread_local char shape_buf[SHAPE_SLOTS][SHAPE_LEN];
static _Thread_local int shape_slot;

const char *ts_shape_str(int ndim, const int64_t *shape) {
  char *buf = shape_buf[shape_slot];
  shape_slot = (shape_slot + 1) % SHAPE_SLOTS;
  size_t used = 0;
  buf[used++] = '[';
  for (int d = 0; d < ndim && d < TS_MAX_DIMS; d++)
    used += (size_t)snprintf(buf + used, SHAPE_LEN - used, d ? ",%lld" : "%lld", (long long)shape[d]);
  snprintf(buf + used, SHAPE_LEN - used, "]");
  return buf;
}

const char *ts_tshape(const ts_tensor *t) { return ts_shape_str(t->ndim, t->shape); }

const char *ts_device_str(ts_device dev) {
  char *buf = shape_buf[shape_slot];
  shape_slot = (shape_slot + 1) % SHAPE_SLOTS;
  if (dev.type == TS_CPU)
    snprintf(buf, SHAPE_LEN, "cpu");
  else if (dev.type == TS_CUDA)
    snprintf(buf, SHAPE_LEN, "cuda:%d", dev.index);
  else
    snprintf(buf, SHAPE_LEN, "device(%d)", dev.type);
  return buf;
}

int tessera_abi_version(void) { return TESSERA_ABI_VERSION; }
const char *ts_version_string(void) { return TESSERA_VERSION; }
