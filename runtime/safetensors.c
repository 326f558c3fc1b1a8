/* safetensors.c — reading (zero copy, via mmap) and writing (atomically) the safetensors format.
 *
 * Layout: an unsigned 64-bit little-endian header length N, N bytes of UTF-8 JSON
 *   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}, ...}
 * then the data section; [b, e) are byte offsets into it.
 *
 * Reading maps the whole file MAP_PRIVATE with PROT_READ|PROT_WRITE: tensors point straight into
 * the mapping, and in-place ops on them get copy-on-write pages, so they never reach the file.
 * The mapping is refcounted: the open file holds one reference and every tensor storage made
 * from it another, so loaded tensors outlive ts_st_close. Mapped bytes are NOT counted in the
 * host memory statistics: they are page-cache pages of the file (clean, shared with other
 * readers, reclaimable by the kernel), not allocator memory, and counting them would make the
 * Lua binding run a full GC for every checkpoint it opens. Tensors whose data is not aligned to
 * their element size are copied into ordinary (counted) storage instead.
 *
 * Writing places the data with no gaps (files stay readable by the reference implementation,
 * which rejects gaps), largest element size first, after a header padded with spaces to a
 * multiple of 8: every tensor then starts aligned to its element size, and 8-byte tensors to 8.
 * The file is written to `path.tmp.<pid>`, synced, and renamed over `path`, so a failed save
 * leaves an existing file untouched, and readers that have the old file mapped keep its inode.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c maps little-endian tensor data in place; big-endian hosts are not supported"
#endif

/* The reference implementation refuses larger headers; so do we, before parsing anything. */
static const uint64_t MAX_HEADER_BYTES = 100000000;
/* Bounds the recursion when skipping unknown JSON values. */
enum { MAX_JSON_DEPTH = 64 };

/* ---- dtype codes --------------------------------------------------------------------------- */
static const struct {
  const char *code;
  int dtype;
} dtype_codes[] = {{"F32", TS_F32}, {"F64", TS_F64}, {"F16", TS_F16},  {"BF16", TS_BF16},
                   {"I64", TS_I64}, {"I32", TS_I32}, {"U8", TS_U8},    {"BOOL", TS_BOOL}};
static const char SUPPORTED_CODES[] = "F32, F64, F16, BF16, I64, I32, U8, BOOL";
/* Valid safetensors dtypes that tessera has no tensor type for. */
static const char *const unsupported_codes[] = {"I8",      "I16",     "U16",     "U32", "U64",     "C64",
                                                "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",  "F6_E2M3", "F6_E3M2"};

static int dtype_from_code(const char *code) {
  for (size_t k = 0; k < sizeof dtype_codes / sizeof dtype_codes[0]; k++)
    if (!strcmp(code, dtype_codes[k].code)) return dtype_codes[k].dtype;
  return -1;
}

static const char *code_of_dtype(int dtype) {
  for (size_t k = 0; k < sizeof dtype_codes / sizeof dtype_codes[0]; k++)
    if (dtype_codes[k].dtype == dtype) return dtype_codes[k].code;
  return NULL;
}

static int is_unsupported_code(const char *code) {
  for (size_t k = 0; k < sizeof unsupported_codes / sizeof unsupported_codes[0]; k++)
    if (!strcmp(code, unsupported_codes[k])) return 1;
  return 0;
}

/* ---- growable strings ---------------------------------------------------------------------- */
typedef struct {
  char *p;
  size_t len, cap;
  int oom;
} strbuf;

static void sb_reserve(strbuf *b, size_t extra) {
  if (b->oom || b->len + extra + 1 <= b->cap) return;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + extra + 1) cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) {
    b->oom = 1;
    return;
  }
  b->p = p;
  b->cap = cap;
}

static void sb_putn(strbuf *b, const char *s, size_t n) {
  sb_reserve(b, n);
  if (b->oom) return;
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_puts(strbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }
static void sb_putc(strbuf *b, char ch) { sb_putn(b, &ch, 1); }

static void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(strbuf *b, const char *fmt, ...) {
  char tmp[64];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0) sb_putn(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Hands the text over (a malloc'd, NUL-terminated string; "" when empty) and resets b. */
static char *sb_take(strbuf *b) {
  sb_reserve(b, 0);
  char *p = b->oom ? NULL : b->p;
  if (p) p[b->len] = '\0';
  if (b->oom) free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
  b->oom = 0;
  return p;
}

/* A JSON string literal for s (valid UTF-8, as every string that got this far is). */
static void sb_json_string(strbuf *b, const char *s) {
  static const char hex[] = "0123456789abcdef";
  sb_putc(b, '"');
  for (const unsigned char *q = (const unsigned char *)s; *q; q++) {
    switch (*q) {
    case '"': sb_puts(b, "\\\""); break;
    case '\\': sb_puts(b, "\\\\"); break;
    case '\n': sb_puts(b, "\\n"); break;
    case '\r': sb_puts(b, "\\r"); break;
    case '\t': sb_puts(b, "\\t"); break;
    case '\b': sb_puts(b, "\\b"); break;
    case '\f': sb_puts(b, "\\f"); break;
    default:
      if (*q < 0x20) {
        char esc[7] = {'\\', 'u', '0', '0', hex[*q >> 4], hex[*q & 15], 0};
        sb_puts(b, esc);
      } else {
        sb_putc(b, (char)*q);
      }
    }
  }
  sb_putc(b, '"');
}

/* ---- UTF-8 --------------------------------------------------------------------------------- */
/* Length of the well-formed UTF-8 sequence at s (RFC 3629: no overlongs, no surrogates, at most
   U+10FFFF), or 0 when it is malformed. */
static size_t utf8_sequence_length(const unsigned char *s, size_t avail) {
  unsigned char c = s[0];
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (avail < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t k = 2; k < len; k++)
    if (s[k] < 0x80 || s[k] > 0xBF) return 0;
  return len;
}

static int is_valid_utf8(const char *s) {
  const unsigned char *q = (const unsigned char *)s;
  size_t avail = strlen(s);
  while (avail) {
    size_t len = utf8_sequence_length(q, avail);
    if (!len) return 0;
    q += len;
    avail -= len;
  }
  return 1;
}

static void sb_put_codepoint(strbuf *b, uint32_t cp) {
  char u[4];
  if (cp < 0x80) {
    sb_putc(b, (char)cp);
  } else if (cp < 0x800) {
    u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3F));
    sb_putn(b, u, 2);
  } else if (cp < 0x10000) {
    u[0] = (char)(0xE0 | cp >> 12), u[1] = (char)(0x80 | (cp >> 6 & 0x3F)), u[2] = (char)(0x80 | (cp & 0x3F));
    sb_putn(b, u, 3);
  } else {
    u[0] = (char)(0xF0 | cp >> 18), u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    u[2] = (char)(0x80 | (cp >> 6 & 0x3F)), u[3] = (char)(0x80 | (cp & 0x3F));
    sb_putn(b, u, 4);
  }
}

/* ---- a small strict JSON reader (RFC 8259) -------------------------------------------------- */
/* The cursor keeps the first error, with the byte position it happened at. */
typedef struct {
  const char *s;
  size_t n, pos;
  const char *what; /* "header" or "metadata": names the text in messages */
  int depth;
  char msg[512];
} jcur;

static int jfail(jcur *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int jfail(jcur *c, const char *fmt, ...) {
  if (c->msg[0]) return -1;
  char detail[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  snprintf(c->msg, sizeof c->msg, "invalid JSON %s at byte %zu: %s", c->what, c->pos, detail);
  return -1;
}

static void jskip_ws(jcur *c) {
  while (c->pos < c->n) {
    char ch = c->s[c->pos];
    if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r') break;
    c->pos++;
  }
}

/* The next significant byte (-1 at the end). */
static int jpeek(jcur *c) {
  jskip_ws(c);
  return c->pos < c->n ? (unsigned char)c->s[c->pos] : -1;
}

/* "'x'", "byte 0xNN" or "the end of the <what>": what the cursor is looking at. */
static const char *jfound(jcur *c, char *buf, size_t size) {
  int ch = jpeek(c);
  if (ch < 0) snprintf(buf, size, "the end of the %s", c->what);
  else if (ch >= 0x20 && ch < 0x7F) snprintf(buf, size, "'%c'", ch);
  else snprintf(buf, size, "byte 0x%02x", ch);
  return buf;
}

static int jexpect(jcur *c, char ch, const char *context) {
  char buf[48];
  if (jpeek(c) != (unsigned char)ch)
    return jfail(c, "expected '%c' %s, found %s", ch, context, jfound(c, buf, sizeof buf));
  c->pos++;
  return 0;
}

static int jhex4(jcur *c, uint32_t *out) {
  uint32_t v = 0;
  for (int k = 0; k < 4; k++) {
    if (c->pos >= c->n) return jfail(c, "truncated \\u escape");
    char h = c->s[c->pos];
    int d = h >= '0' && h <= '9'   ? h - '0'
            : h >= 'a' && h <= 'f' ? h - 'a' + 10
            : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                     : -1;
    if (d < 0) return jfail(c, "invalid hex digit in a \\u escape");
    v = v * 16 + (uint32_t)d;
    c->pos++;
  }
  *out = v;
  return 0;
}

/* After "\u": one code point, a surrogate pair joined. NUL is refused: names and metadata
   travel through the C ABI as NUL-terminated strings. */
static int junicode_escape(jcur *c, strbuf *out) {
  uint32_t cp;
  if (jhex4(c, &cp)) return -1;
  if (cp >= 0xDC00 && cp <= 0xDFFF) return jfail(c, "unpaired low surrogate \\u%04X", (unsigned)cp);
  if (cp >= 0xD800 && cp <= 0xDBFF) {
    uint32_t lo;
    if (c->pos + 2 > c->n || c->s[c->pos] != '\\' || c->s[c->pos + 1] != 'u')
      return jfail(c, "high surrogate \\u%04X not followed by a low surrogate", (unsigned)cp);
    c->pos += 2;
    if (jhex4(c, &lo)) return -1;
    if (lo < 0xDC00 || lo > 0xDFFF)
      return jfail(c, "high surrogate \\u%04X followed by \\u%04X, not a low surrogate", (unsigned)cp, (unsigned)lo);
    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
  }
  if (cp == 0) return jfail(c, "\\u0000 (NUL) is not allowed in names and metadata");
  sb_put_codepoint(out, cp);
  return 0;
}

static int jescape(jcur *c, strbuf *out) {
  if (c->pos >= c->n) return jfail(c, "unterminated string");
  char e = c->s[c->pos++];
  switch (e) {
  case '"': sb_putc(out, '"'); return 0;
  case '\\': sb_putc(out, '\\'); return 0;
  case '/': sb_putc(out, '/'); return 0;
  case 'b': sb_putc(out, '\b'); return 0;
  case 'f': sb_putc(out, '\f'); return 0;
  case 'n': sb_putc(out, '\n'); return 0;
  case 'r': sb_putc(out, '\r'); return 0;
  case 't': sb_putc(out, '\t'); return 0;
  case 'u': return junicode_escape(c, out);
  default: c->pos--; return jfail(c, "invalid escape '\\%c' in a string", e >= 0x20 && e < 0x7F ? e : '?');
  }
}

/* A string literal, decoded into out (which is reset first). */
static int jstring(jcur *c, strbuf *out) {
  char buf[48];
  out->len = 0;
  if (jpeek(c) != '"') return jfail(c, "expected a string, found %s", jfound(c, buf, sizeof buf));
  c->pos++;
  for (;;) {
    if (c->pos >= c->n) return jfail(c, "unterminated string");
    unsigned char ch = (unsigned char)c->s[c->pos];
    if (ch == '"') break;
    if (ch < 0x20) return jfail(c, "unescaped control character 0x%02x in a string", ch);
    if (ch == '\\') {
      c->pos++;
      if (jescape(c, out)) return -1;
      continue;
    }
    size_t len = utf8_sequence_length((const unsigned char *)c->s + c->pos, c->n - c->pos);
    if (!len) return jfail(c, "invalid UTF-8 in a string");
    sb_putn(out, c->s + c->pos, len);
    c->pos += len;
  }
  c->pos++;
  sb_reserve(out, 0);
  if (out->oom) return jfail(c, "out of memory");
  out->p[out->len] = '\0'; /* also for "" (nothing was appended) */
  return 0;
}

/* Checks number syntax: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int jnumber(jcur *c) {
  const char *s = c->s;
  size_t p = c->pos;
  if (p < c->n && s[p] == '-') p++;
  if (p < c->n && s[p] == '0') p++;
  else if (p < c->n && s[p] >= '1' && s[p] <= '9')
    while (p < c->n && s[p] >= '0' && s[p] <= '9') p++;
  else return jfail(c, "invalid number");
  if (p < c->n && s[p] == '.') {
    if (++p >= c->n || s[p] < '0' || s[p] > '9') return c->pos = p, jfail(c, "a digit must follow the decimal point");
    while (p < c->n && s[p] >= '0' && s[p] <= '9') p++;
  }
  if (p < c->n && (s[p] == 'e' || s[p] == 'E')) {
    if (++p < c->n && (s[p] == '+' || s[p] == '-')) p++;
    if (p >= c->n || s[p] < '0' || s[p] > '9') return c->pos = p, jfail(c, "a digit must follow the exponent");
    while (p < c->n && s[p] >= '0' && s[p] <= '9') p++;
  }
  c->pos = p;
  return 0;
}

/* A non-negative integer that fits in int64 (sizes and offsets); `what` names it. */
static int juint(jcur *c, uint64_t *out, const char *what) {
  char buf[48];
  int ch = jpeek(c);
  size_t start = c->pos;
  if (ch != '-' && (ch < '0' || ch > '9'))
    return jfail(c, "%s must be a non-negative integer, found %s", what, jfound(c, buf, sizeof buf));
  if (jnumber(c)) return -1;
  int len = (int)(c->pos - start < 32 ? c->pos - start : 32);
  uint64_t v = 0;
  for (size_t p = start; p < c->pos; p++) {
    char d = c->s[p];
    if (d < '0' || d > '9') {
      c->pos = start;
      return jfail(c, "%s must be a non-negative integer, got %.*s", what, len, c->s + start);
    }
    if (v > (uint64_t)(INT64_MAX - (d - '0')) / 10) {
      c->pos = start;
      return jfail(c, "%s is too large: %.*s", what, len, c->s + start);
    }
    v = v * 10 + (uint64_t)(d - '0');
  }
  *out = v;
  return 0;
}

static int jliteral(jcur *c, const char *word) {
  size_t len = strlen(word);
  if (c->n - c->pos < len || memcmp(c->s + c->pos, word, len)) return jfail(c, "invalid literal (expected %s)", word);
  c->pos += len;
  return 0;
}

static int jskip_value(jcur *c, strbuf *scratch);

/* Skips the rest of an object or array after its opening bracket. */
static int jskip_container(jcur *c, strbuf *scratch, char close) {
  if (jpeek(c) == close) return c->pos++, 0;
  for (;;) {
    if (close == '}') {
      if (jstring(c, scratch) || jexpect(c, ':', "after an object key")) return -1;
    }
    if (jskip_value(c, scratch)) return -1;
    if (jpeek(c) == close) return c->pos++, 0;
    if (jexpect(c, ',', close == '}' ? "or '}' in an object" : "or ']' in an array")) return -1;
  }
}

/* Checks and skips any JSON value (fields of a tensor entry that tessera does not use). */
static int jskip_value(jcur *c, strbuf *scratch) {
  char buf[48];
  int ch = jpeek(c);
  if (ch == '{' || ch == '[') {
    if (++c->depth > MAX_JSON_DEPTH) return jfail(c, "values nested deeper than %d levels", MAX_JSON_DEPTH);
    c->pos++;
    int st = jskip_container(c, scratch, ch == '{' ? '}' : ']');
    c->depth--;
    return st;
  }
  if (ch == '"') return jstring(c, scratch);
  if (ch == 't') return jliteral(c, "true");
  if (ch == 'f') return jliteral(c, "false");
  if (ch == 'n') return jliteral(c, "null");
  if (ch == '-' || (ch >= '0' && ch <= '9')) return jnumber(c);
  return jfail(c, "expected a value, found %s", jfound(c, buf, sizeof buf));
}

static const char *json_kind(int ch) {
  if (ch == '{') return "an object";
  if (ch == '[') return "an array";
  if (ch == 't' || ch == 'f') return "a boolean";
  if (ch == 'n') return "null";
  if (ch == '-' || (ch >= '0' && ch <= '9')) return "a number";
  return "something else";
}

/* ---- string-to-string maps (the metadata) ---------------------------------------------------- */
typedef struct {
  char **keys, **values;
  int count, cap;
} strmap;

static void strmap_free(strmap *m) {
  for (int k = 0; k < m->count; k++) {
    free(m->keys[k]);
    free(m->values[k]);
  }
  free(m->keys);
  free(m->values);
  memset(m, 0, sizeof *m);
}

static int strmap_add(strmap *m, char *key, char *value) {
  if (m->count == m->cap) {
    int cap = m->cap ? 2 * m->cap : 8;
    char **keys = realloc(m->keys, (size_t)cap * sizeof *keys);
    if (keys) m->keys = keys;
    char **values = keys ? realloc(m->values, (size_t)cap * sizeof *values) : NULL;
    if (!values) return -1;
    m->values = values;
    m->cap = cap;
  }
  m->keys[m->count] = key;
  m->values[m->count++] = value;
  return 0;
}

/* Compact JSON text of the map, keys in their order. */
static char *strmap_to_json(const strmap *m) {
  strbuf b = {0};
  sb_putc(&b, '{');
  for (int k = 0; k < m->count; k++) {
    if (k) sb_putc(&b, ',');
    sb_json_string(&b, m->keys[k]);
    sb_putc(&b, ':');
    sb_json_string(&b, m->values[k]);
  }
  sb_putc(&b, '}');
  return sb_take(&b);
}

/* An object whose values are all strings, into m. */
static int jstring_object(jcur *c, strmap *m) {
  strbuf key = {0}, value = {0};
  int st = jexpect(c, '{', "to open the metadata object");
  if (!st && jpeek(c) == '}') {
    c->pos++;
    return 0;
  }
  while (!st) {
    size_t at = (jskip_ws(c), c->pos);
    if ((st = jstring(c, &key)) || (st = jexpect(c, ':', "after a metadata key"))) break;
    for (int k = 0; k < m->count && !st; k++)
      if (!strcmp(m->keys[k], key.p)) st = (c->pos = at, jfail(c, "duplicate metadata key \"%s\"", key.p));
    if (st) break;
    if (jpeek(c) != '"') {
      st = jfail(c, "the value of metadata key \"%s\" must be a string, got %s", key.p, json_kind(jpeek(c)));
      break;
    }
    if ((st = jstring(c, &value))) break;
    char *k_owned = sb_take(&key), *v_owned = sb_take(&value);
    if (!k_owned || !v_owned || strmap_add(m, k_owned, v_owned)) {
      free(k_owned);
      free(v_owned);
      st = jfail(c, "out of memory");
      break;
    }
    if (jpeek(c) == '}') {
      c->pos++;
      break;
    }
    st = jexpect(c, ',', "or '}' in the metadata object");
  }
  free(key.p);
  free(value.p);
  return st;
}

/* ---- the mapping and the open file ------------------------------------------------------------ */
typedef struct st_mapping {
  int64_t refcount;
  void *base;
  size_t length;
} st_mapping;

static void mapping_release(st_mapping *m) {
  if (!m || __atomic_sub_fetch(&m->refcount, 1, __ATOMIC_ACQ_REL) != 0) return;
  munmap(m->base, m->length);
  free(m);
}

/* ts_storage.release of a storage that points into a mapping. */
static void mapped_storage_release(ts_storage *s) { mapping_release(s->release_ctx); }

typedef struct st_entry {
  char *name;
  char *code;          /* the dtype as written in the file */
  int has_dtype, has_shape, has_offsets;
  int dtype, ndim;
  int64_t shape[TS_MAX_DIMS];
  uint64_t begin, end;
  ts_storage *storage; /* made on first use, then shared by every tensor of this entry */
} st_entry;

struct ts_st_file {
  char *path;
  st_mapping *map;
  const char *data;    /* the data section, in the mapping */
  uint64_t data_len;
  st_entry *entries;
  int count, cap;
  strmap meta;
  char *meta_json;
};

static void file_free(ts_st_file *f) {
  if (!f) return;
  for (int k = 0; k < f->count; k++) {
    free(f->entries[k].name);
    free(f->entries[k].code);
    ts_storage_release(f->entries[k].storage);
  }
  free(f->entries);
  strmap_free(&f->meta);
  free(f->meta_json);
  free(f->path);
  mapping_release(f->map);
  free(f);
}

static int load_error(const ts_st_file *f, const char *detail) {
  return ts_set_error(TS_ERR_IO, "load: %s: %s", f->path, detail);
}

/* ---- the header: JSON syntax, then the meaning of every entry ---------------------------------- */
static int parse_shape(jcur *c, st_entry *e) {
  if (jexpect(c, '[', "to open \"shape\"")) return -1;
  e->ndim = 0;
  if (jpeek(c) == ']') return c->pos++, 0;
  for (;;) {
    uint64_t v;
    if (e->ndim == TS_MAX_DIMS)
      return jfail(c, "tensor \"%s\" has more than %d dims (tessera's limit)", e->name, TS_MAX_DIMS);
    if (juint(c, &v, "a size in \"shape\"")) return -1;
    e->shape[e->ndim++] = (int64_t)v;
    if (jpeek(c) == ']') return c->pos++, 0;
    if (jexpect(c, ',', "or ']' in \"shape\"")) return -1;
  }
}

static int parse_offsets(jcur *c, st_entry *e) {
  if (jexpect(c, '[', "to open \"data_offsets\"") || juint(c, &e->begin, "data_offsets[0]") ||
      jexpect(c, ',', "in \"data_offsets\" (it holds [begin, end])") || juint(c, &e->end, "data_offsets[1]") ||
      jexpect(c, ']', "after [begin, end] in \"data_offsets\""))
    return -1;
  return 0;
}

static int parse_dtype(jcur *c, strbuf *scratch, st_entry *e) {
  if (jpeek(c) != '"') return jfail(c, "tensor \"%s\": \"dtype\" must be a string", e->name);
  if (jstring(c, scratch)) return -1;
  e->code = sb_take(scratch);
  return e->code ? 0 : jfail(c, "out of memory");
}

/* One field of a tensor entry; fields tessera does not know are checked and skipped. */
static int parse_field(jcur *c, strbuf *scratch, st_entry *e) {
  size_t at = (jskip_ws(c), c->pos);
  if (jstring(c, scratch) || jexpect(c, ':', "after a field name")) return -1;
  int *seen = !strcmp(scratch->p, "dtype")          ? &e->has_dtype
              : !strcmp(scratch->p, "shape")        ? &e->has_shape
              : !strcmp(scratch->p, "data_offsets") ? &e->has_offsets
                                                    : NULL;
  if (!seen) return jskip_value(c, scratch);
  if (*seen) return c->pos = at, jfail(c, "tensor \"%s\" has field \"%s\" twice", e->name, scratch->p);
  *seen = 1;
  if (seen == &e->has_dtype) return parse_dtype(c, scratch, e);
  return seen == &e->has_shape ? parse_shape(c, e) : parse_offsets(c, e);
}

static int parse_entry(jcur *c, strbuf *scratch, st_entry *e) {
  if (jpeek(c) != '{')
    return jfail(c, "tensor \"%s\": expected an object with \"dtype\", \"shape\" and \"data_offsets\", got %s", e->name,
                 json_kind(jpeek(c)));
  c->pos++;
  if (jpeek(c) == '}') return c->pos++, 0;
  for (;;) {
    if (parse_field(c, scratch, e)) return -1;
    if (jpeek(c) == '}') return c->pos++, 0;
    if (jexpect(c, ',', "or '}' in a tensor entry")) return -1;
  }
}

static st_entry *new_entry(ts_st_file *f) {
  if (f->count == f->cap) {
    int cap = f->cap ? 2 * f->cap : 16;
    st_entry *e = realloc(f->entries, (size_t)cap * sizeof *e);
    if (!e) return NULL;
    f->entries = e;
    f->cap = cap;
  }
  st_entry *e = &f->entries[f->count++];
  memset(e, 0, sizeof *e);
  return e;
}

/* One "key": value member of the top-level object. */
static int parse_member(jcur *c, strbuf *scratch, ts_st_file *f, int *seen_metadata) {
  size_t at = (jskip_ws(c), c->pos);
  if (jstring(c, scratch) || jexpect(c, ':', "after a tensor name")) return -1;
  if (!strcmp(scratch->p, "__metadata__")) {
    if (*seen_metadata) return c->pos = at, jfail(c, "\"__metadata__\" appears twice");
    *seen_metadata = 1;
    return jstring_object(c, &f->meta);
  }
  st_entry *e = new_entry(f);
  if (!e || !(e->name = sb_take(scratch))) return jfail(c, "out of memory");
  return parse_entry(c, scratch, e);
}

static int parse_header_json(jcur *c, ts_st_file *f) {
  strbuf scratch = {0};
  int seen_metadata = 0, st = jexpect(c, '{', "at the start of the header");
  if (!st && jpeek(c) == '}') c->pos++;
  else
    while (!st) {
      if ((st = parse_member(c, &scratch, f, &seen_metadata))) break;
      if (jpeek(c) == '}') {
        c->pos++;
        break;
      }
      st = jexpect(c, ',', "or '}' after a tensor entry");
    }
  free(scratch.p);
  if (!st && jpeek(c) >= 0) {
    char buf[48];
    st = jfail(c, "unexpected %s after the header object", jfound(c, buf, sizeof buf));
  }
  return st;
}

static int check_entry(const ts_st_file *f, st_entry *e) {
  char msg[512];
  const char *missing = !e->has_dtype ? "dtype" : !e->has_shape ? "shape" : !e->has_offsets ? "data_offsets" : NULL;
  if (missing) {
    snprintf(msg, sizeof msg, "tensor \"%s\" has no \"%s\"", e->name, missing);
    return load_error(f, msg);
  }
  e->dtype = dtype_from_code(e->code);
  if (e->dtype < 0) {
    snprintf(msg, sizeof msg, "tensor \"%s\" has %s dtype \"%s\" (supported: %s)", e->name,
             is_unsupported_code(e->code) ? "unsupported" : "unknown", e->code, SUPPORTED_CODES);
    return load_error(f, msg);
  }
  uint64_t nbytes = (uint64_t)ts_dtype_size(e->dtype);
  for (int d = 0; d < e->ndim; d++) {
    if (__builtin_mul_overflow(nbytes, (uint64_t)e->shape[d], &nbytes)) {
      snprintf(msg, sizeof msg, "tensor \"%s\": shape %s is too large", e->name, ts_shape_str(e->ndim, e->shape));
      return load_error(f, msg);
    }
  }
  unsigned long long b = e->begin, end = e->end;
  if (e->begin > e->end)
    snprintf(msg, sizeof msg, "tensor \"%s\": data_offsets [%llu, %llu] end before they begin", e->name, b, end);
  else if (e->end - e->begin != nbytes)
    snprintf(msg, sizeof msg, "tensor \"%s\": data_offsets [%llu, %llu] hold %llu bytes, but %s %s needs %llu", e->name,
             b, end, end - b, e->code, ts_shape_str(e->ndim, e->shape), (unsigned long long)nbytes);
  else if (e->end > f->data_len)
    snprintf(msg, sizeof msg,
             "tensor \"%s\": data_offsets [%llu, %llu] are out of range: the data section has %llu bytes "
             "(truncated file?)",
             e->name, b, end, (unsigned long long)f->data_len);
  else
    return TS_OK;
  return load_error(f, msg);
}

static int by_begin(const void *a, const void *b) {
  const st_entry *x = *(st_entry *const *)a, *y = *(st_entry *const *)b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  return x->end < y->end ? -1 : x->end > y->end;
}

static int by_name(const void *a, const void *b) {
  return strcmp((*(st_entry *const *)a)->name, (*(st_entry *const *)b)->name);
}

/* Duplicate names and overlapping data ranges, found by sorting (files may hold many tensors). */
static int check_entries_together(const ts_st_file *f) {
  char msg[640];
  int st = TS_OK;
  st_entry **order = malloc((size_t)(f->count ? f->count : 1) * sizeof *order);
  if (!order) return ts_set_error(TS_ERR_MEMORY, "load: %s: out of memory", f->path);
  for (int k = 0; k < f->count; k++) order[k] = &f->entries[k];
  qsort(order, (size_t)f->count, sizeof *order, by_name);
  for (int k = 1; k < f->count && !st; k++)
    if (!strcmp(order[k - 1]->name, order[k]->name)) {
      snprintf(msg, sizeof msg, "duplicate tensor name \"%s\"", order[k]->name);
      st = load_error(f, msg);
    }
  qsort(order, (size_t)f->count, sizeof *order, by_begin);
  const st_entry *last = NULL; /* the non-empty range that reaches furthest so far */
  for (int k = 0; k < f->count && !st; k++) {
    const st_entry *e = order[k];
    if (e->begin == e->end) continue;
    if (last && e->begin < last->end) {
      snprintf(msg, sizeof msg, "the data of tensors \"%s\" [%llu, %llu] and \"%s\" [%llu, %llu] overlap", last->name,
               (unsigned long long)last->begin, (unsigned long long)last->end, e->name, (unsigned long long)e->begin,
               (unsigned long long)e->end);
      st = load_error(f, msg);
    }
    if (!last || e->end > last->end) last = e;
  }
  free(order);
  return st;
}

static int parse_header(ts_st_file *f, const char *text, size_t len) {
  jcur c = {.s = text, .n = len, .what = "header"};
  if (parse_header_json(&c, f)) {
    char msg[600];
    snprintf(msg, sizeof msg, "%s (file offset %zu)", c.msg, c.pos + 8);
    return load_error(f, msg);
  }
  for (int k = 0; k < f->count; k++)
    if (check_entry(f, &f->entries[k])) return ts_last_status();
  if (check_entries_together(f)) return ts_last_status();
  f->meta_json = strmap_to_json(&f->meta);
  return f->meta_json ? TS_OK : ts_set_error(TS_ERR_MEMORY, "load: %s: out of memory", f->path);
}

/* ---- opening ------------------------------------------------------------------------------- */
static int map_file(ts_st_file *f, uint64_t *size) {
  char msg[256];
  int fd = open(f->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return snprintf(msg, sizeof msg, "cannot open: %s", strerror(errno)), load_error(f, msg);
  struct stat st;
  int failed = fstat(fd, &st);
  if (failed || !S_ISREG(st.st_mode)) {
    snprintf(msg, sizeof msg, "%s", failed ? strerror(errno) : "not a regular file");
    close(fd);
    return load_error(f, msg);
  }
  *size = (uint64_t)st.st_size;
  if (*size < 8) {
    close(fd);
    snprintf(msg, sizeof msg, "truncated: the file has %llu bytes, fewer than the 8-byte header length",
             (unsigned long long)*size);
    return load_error(f, msg);
  }
  void *base = mmap(NULL, (size_t)*size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  close(fd);
  f->map = base == MAP_FAILED ? NULL : calloc(1, sizeof *f->map);
  if (!f->map) {
    if (base != MAP_FAILED) munmap(base, (size_t)*size);
    snprintf(msg, sizeof msg, "cannot map the file: %s", base == MAP_FAILED ? strerror(map_errno) : "out of memory");
    return load_error(f, msg);
  }
  f->map->refcount = 1;
  f->map->base = base;
  f->map->length = (size_t)*size;
  return TS_OK;
}

static uint64_t read_u64_le(const unsigned char *p) {
  uint64_t v = 0;
  for (int k = 7; k >= 0; k--) v = v << 8 | p[k];
  return v;
}

ts_st_file *ts_st_open(const char *path) {
  if (!path) return ts_set_error(TS_ERR_ARG, "load: path is NULL"), NULL;
  ts_st_file *f = calloc(1, sizeof *f);
  if (f) f->path = strdup(path);
  if (!f || !f->path) {
    free(f);
    return ts_set_error(TS_ERR_MEMORY, "load: %s: out of memory", path), NULL;
  }
  uint64_t size = 0;
  if (map_file(f, &size)) return file_free(f), NULL;
  const char *bytes = f->map->base;
  uint64_t header_len = read_u64_le((const unsigned char *)bytes);
  char msg[256];
  if (header_len > size - 8 || header_len > MAX_HEADER_BYTES) {
    snprintf(msg, sizeof msg, "header length %llu is %s (the file has %llu bytes)", (unsigned long long)header_len,
             header_len > size - 8 ? "beyond the end of the file: truncated or not a safetensors file"
                                   : "absurd (the limit is 100000000 bytes)",
             (unsigned long long)size);
    load_error(f, msg);
    file_free(f);
    return NULL;
  }
  f->data = bytes + 8 + header_len;
  f->data_len = size - 8 - header_len;
  if (parse_header(f, bytes + 8, (size_t)header_len)) return file_free(f), NULL;
  return f;
}

void ts_st_close(ts_st_file *f) { file_free(f); }

/* ---- access -------------------------------------------------------------------------------- */
int ts_st_count(const ts_st_file *f) {
  if (!f) return ts_set_error(TS_ERR_ARG, "safetensors: file handle is NULL"), -1;
  return f->count;
}

static int check_index(const ts_st_file *f, int i, const char *op) {
  if (!f) return ts_set_error(TS_ERR_ARG, "%s: file handle is NULL", op);
  if (i < 0 || i >= f->count)
    return ts_set_error(TS_ERR_INDEX, "%s: index %d out of range for %s with %d tensors", op, i, f->path, f->count);
  return TS_OK;
}

const char *ts_st_name(const ts_st_file *f, int i) {
  return check_index(f, i, "safetensors name") ? NULL : f->entries[i].name;
}

const char *ts_st_metadata(const ts_st_file *f) {
  if (!f) return ts_set_error(TS_ERR_ARG, "safetensors metadata: file handle is NULL"), NULL;
  return f->meta_json;
}

/* BOOL data must be 0 or 1: kernels read it as C bools. */
static int check_bool_bytes(const ts_st_file *f, const st_entry *e) {
  const unsigned char *p = (const unsigned char *)f->data + e->begin;
  for (uint64_t k = 0; k < e->end - e->begin; k++) {
    if (p[k] > 1) {
      char msg[400];
      snprintf(msg, sizeof msg, "tensor \"%s\": BOOL element %llu holds byte %u (must be 0 or 1)", e->name,
               (unsigned long long)k, p[k]);
      return load_error(f, msg);
    }
  }
  return TS_OK;
}

/* A storage for the entry: the mapped bytes themselves, or an aligned copy of them. */
static ts_storage *entry_storage(ts_st_file *f, const st_entry *e) {
  const char *src = f->data + e->begin;
  size_t nbytes = (size_t)(e->end - e->begin);
  if ((uintptr_t)src % (uintptr_t)ts_dtype_size(e->dtype) != 0) {
    ts_storage *copy = ts_storage_new(nbytes, ts_cpu());
    if (copy) memcpy(copy->data, src, nbytes);
    return copy;
  }
  ts_storage *s = calloc(1, sizeof *s);
  if (!s) return ts_set_error(TS_ERR_MEMORY, "load: %s: out of host memory", f->path), NULL;
  s->refcount = 1;
  s->data = (void *)src;
  s->nbytes = nbytes;
  s->device = ts_cpu();
  s->release = mapped_storage_release;
  s->release_ctx = f->map;
  __atomic_add_fetch(&f->map->refcount, 1, __ATOMIC_RELAXED);
  return s;
}

ts_tensor *ts_st_tensor(ts_st_file *f, int i) {
  if (check_index(f, i, "safetensors tensor")) return NULL;
  st_entry *e = &f->entries[i];
  if (!e->storage) {
    if (e->dtype == TS_BOOL && check_bool_bytes(f, e)) return NULL;
    if (!(e->storage = entry_storage(f, e))) return NULL;
  }
  int64_t stride[TS_MAX_DIMS];
  ts_contiguous_strides(e->ndim, e->shape, stride);
  return ts_tensor_over(e->storage, e->ndim, e->shape, stride, 0, e->dtype);
}

/* ---- saving -------------------------------------------------------------------------------- */
typedef struct {
  const char *path;
  int n;
  const char *const *names;
  ts_tensor *const *tensors;
  char *meta_json;  /* normalized compact metadata, NULL when there is none */
  int *order;       /* tensors in data order: largest element size first */
  uint64_t *begin;  /* data offset of each tensor, by caller index */
} st_save;

static int save_error(const st_save *s, int status, const char *detail) {
  return ts_set_error(status, "save: %s: %s", s->path, detail);
}

static uint64_t tensor_bytes(const ts_tensor *t) {
  return (uint64_t)ts_numel(t) * (uint64_t)ts_dtype_size(t->dtype);
}

static int check_save_args(st_save *s) {
  char msg[400];
  if (s->n < 0) return snprintf(msg, sizeof msg, "negative tensor count %d", s->n), save_error(s, TS_ERR_ARG, msg);
  if (s->n > 0 && (!s->names || !s->tensors)) return save_error(s, TS_ERR_ARG, "names or tensors is NULL");
  for (int k = 0; k < s->n; k++) {
    const char *name = s->names[k];
    if (!name) return snprintf(msg, sizeof msg, "name %d is NULL", k), save_error(s, TS_ERR_ARG, msg);
    if (!s->tensors[k])
      return snprintf(msg, sizeof msg, "tensor \"%.200s\" is NULL", name), save_error(s, TS_ERR_ARG, msg);
    if (!is_valid_utf8(name))
      return snprintf(msg, sizeof msg, "tensor name %d is not valid UTF-8", k), save_error(s, TS_ERR_ARG, msg);
    if (!strcmp(name, "__metadata__"))
      return save_error(s, TS_ERR_ARG, "\"__metadata__\" is reserved for the metadata and cannot name a tensor");
    if (!code_of_dtype(s->tensors[k]->dtype))
      return snprintf(msg, sizeof msg, "tensor \"%.200s\" has invalid dtype %d", name, s->tensors[k]->dtype),
             save_error(s, TS_ERR_DTYPE, msg);
  }
  return TS_OK;
}

static int by_string(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int check_unique_names(const st_save *s) {
  if (s->n < 2) return TS_OK;
  const char **sorted = malloc((size_t)s->n * sizeof *sorted);
  if (!sorted) return save_error(s, TS_ERR_MEMORY, "out of host memory");
  memcpy(sorted, s->names, (size_t)s->n * sizeof *sorted);
  qsort(sorted, (size_t)s->n, sizeof *sorted, by_string);
  int st = TS_OK;
  for (int k = 1; k < s->n && !st; k++)
    if (!strcmp(sorted[k - 1], sorted[k])) {
      char msg[400];
      snprintf(msg, sizeof msg, "tensor name \"%.200s\" given twice", sorted[k]);
      st = save_error(s, TS_ERR_ARG, msg);
    }
  free(sorted);
  return st;
}

/* metadata_json must be a JSON object of strings; it is stored re-serialized compactly. */
static int normalize_metadata(st_save *s, const char *metadata_json) {
  if (!metadata_json) return TS_OK;
  strmap m = {0};
  jcur c = {.s = metadata_json, .n = strlen(metadata_json), .what = "metadata"};
  int st = jstring_object(&c, &m);
  if (!st && jpeek(&c) >= 0) {
    char buf[48];
    st = jfail(&c, "unexpected %s after the metadata object", jfound(&c, buf, sizeof buf));
  }
  if (st) {
    strmap_free(&m);
    return save_error(s, TS_ERR_ARG, c.msg);
  }
  if (m.count > 0 && !(s->meta_json = strmap_to_json(&m))) st = save_error(s, TS_ERR_MEMORY, "out of host memory");
  strmap_free(&m);
  return st;
}

typedef struct {
  int size, index;
} layout_key;

static int by_element_size_desc(const void *a, const void *b) {
  const layout_key *x = a, *y = b;
  if (x->size != y->size) return y->size - x->size;
  return x->index - y->index; /* stable: the caller's order within one element size */
}

/* Data order and offsets: no gaps (the reference reader rejects them), largest elements first. */
static int plan_layout(st_save *s) {
  size_t count = (size_t)(s->n ? s->n : 1);
  layout_key *keys = malloc(count * sizeof *keys);
  s->order = malloc(count * sizeof *s->order);
  s->begin = malloc(count * sizeof *s->begin);
  if (!keys || !s->order || !s->begin) return free(keys), save_error(s, TS_ERR_MEMORY, "out of host memory");
  for (int k = 0; k < s->n; k++) keys[k] = (layout_key){ts_dtype_size(s->tensors[k]->dtype), k};
  qsort(keys, (size_t)s->n, sizeof *keys, by_element_size_desc);
  uint64_t at = 0;
  for (int k = 0; k < s->n; k++) {
    s->order[k] = keys[k].index;
    s->begin[keys[k].index] = at;
    at += tensor_bytes(s->tensors[keys[k].index]);
  }
  free(keys);
  return TS_OK;
}

/* The header JSON, padded with spaces so that the data section starts 8-byte aligned. */
static char *build_header(const st_save *s, size_t *len) {
  strbuf b = {0};
  sb_putc(&b, '{');
  if (s->meta_json) {
    sb_puts(&b, "\"__metadata__\":");
    sb_puts(&b, s->meta_json);
  }
  for (int k = 0; k < s->n; k++) {
    const ts_tensor *t = s->tensors[k];
    if (k || s->meta_json) sb_putc(&b, ',');
    sb_json_string(&b, s->names[k]);
    sb_printf(&b, ":{\"dtype\":\"%s\",\"shape\":[", code_of_dtype(t->dtype));
    for (int d = 0; d < t->ndim; d++) sb_printf(&b, d ? ",%lld" : "%lld", (long long)t->shape[d]);
    sb_printf(&b, "],\"data_offsets\":[%llu,", (unsigned long long)s->begin[k]);
    sb_printf(&b, "%llu]}", (unsigned long long)(s->begin[k] + tensor_bytes(t)));
  }
  sb_putc(&b, '}');
  while (!b.oom && b.len % 8) sb_putc(&b, ' ');
  *len = b.len;
  return sb_take(&b);
}

/* Writes one tensor's elements in row-major order: directly when it is a contiguous CPU
   tensor, else through a host copy (views, other devices). */
static int write_tensor(const st_save *s, FILE *fp, const ts_tensor *t) {
  size_t nbytes = (size_t)tensor_bytes(t);
  if (!nbytes) return TS_OK;
  const void *src = NULL;
  void *copy = NULL;
  if (t->device.type == TS_CPU && ts_is_contiguous(t)) {
    src = ts_data_ptr(t);
  } else {
    if (!(copy = malloc(nbytes))) return save_error(s, TS_ERR_MEMORY, "out of host memory copying a tensor");
    if (ts_to_host(t, copy, nbytes)) return free(copy), ts_last_status();
    src = copy;
  }
  size_t written = fwrite(src, 1, nbytes, fp);
  free(copy);
  return written == nbytes ? TS_OK : -1;
}

static int write_all(const st_save *s, FILE *fp, const char *header, size_t header_len) {
  unsigned char len_bytes[8];
  for (int k = 0; k < 8; k++) len_bytes[k] = (unsigned char)((uint64_t)header_len >> (8 * k));
  if (fwrite(len_bytes, 1, 8, fp) != 8 || fwrite(header, 1, header_len, fp) != header_len) return -1;
  for (int k = 0; k < s->n; k++) {
    int st = write_tensor(s, fp, s->tensors[s->order[k]]);
    if (st) return st;
  }
  return fflush(fp) || fsync(fileno(fp)) ? -1 : TS_OK;
}

/* Makes the rename durable; filesystems that cannot sync directories (EINVAL) are fine. */
static int sync_parent_dir(const char *path) {
  const char *slash = strrchr(path, '/');
  char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
  if (!dir) return -1;
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  free(dir);
  if (fd < 0) return -1;
  int st = fsync(fd) && errno != EINVAL ? -1 : 0;
  close(fd);
  return st;
}

/* Writes everything to path.tmp.<pid>, then renames it over path. On failure the temporary file
   is removed and path is untouched. */
static int write_atomically(const st_save *s, const char *header, size_t header_len) {
  char msg[400];
  size_t tmp_len = strlen(s->path) + 32;
  char *tmp = malloc(tmp_len);
  if (!tmp) return save_error(s, TS_ERR_MEMORY, "out of host memory");
  snprintf(tmp, tmp_len, "%s.tmp.%ld", s->path, (long)getpid());
  FILE *fp = fopen(tmp, "wbe");
  if (!fp) {
    snprintf(msg, sizeof msg, "cannot create %s: %s", tmp, strerror(errno));
    free(tmp);
    return save_error(s, TS_ERR_IO, msg);
  }
  errno = 0;
  int st = write_all(s, fp, header, header_len);
  int write_errno = errno;
  if (fclose(fp) && !st) st = -1, write_errno = errno;
  const char *step = "writing";
  if (!st && rename(tmp, s->path)) st = -1, write_errno = errno, step = "renaming the temporary file over it";
  if (st) {
    unlink(tmp);
    if (st == -1) { /* a system call failed; errors from tensor copies are already set */
      snprintf(msg, sizeof msg, "%s failed: %s", step, write_errno ? strerror(write_errno) : "short write");
      st = save_error(s, TS_ERR_IO, msg);
    }
  } else if (sync_parent_dir(s->path)) {
    snprintf(msg, sizeof msg, "saved, but syncing its directory failed: %s", strerror(errno));
    st = save_error(s, TS_ERR_IO, msg);
  }
  free(tmp);
  return st;
}

int ts_st_save(const char *path, int n, const char *const *names, ts_tensor *const *tensors,
               const char *metadata_json) {
  if (!path || !*path) return ts_set_error(TS_ERR_ARG, "save: path is %s", path ? "empty" : "NULL");
  st_save s = {.path = path, .n = n, .names = names, .tensors = tensors};
  char *header = NULL;
  size_t header_len = 0;
  int st = check_save_args(&s);
  if (!st) st = check_unique_names(&s);
  if (!st) st = normalize_metadata(&s, metadata_json);
  if (!st) st = plan_layout(&s);
  if (!st && !(header = build_header(&s, &header_len))) st = save_error(&s, TS_ERR_MEMORY, "out of host memory");
  if (!st) st = write_atomically(&s, header, header_len);
  free(header);
  free(s.meta_json);
  free(s.order);
  free(s.begin);
  return st;
}
