-- tessera.core — the binding's foundation: loads libtessera with the cdef generated from
-- tessera.h, defines the Tensor cdata type, turns C errors into Lua errors, and parses the
-- arguments every other module shares (dtypes, devices, shapes, dims).
--
-- A Lua tensor is a small struct cdata holding one reference to a C ts_tensor. Its ffi.gc
-- finalizer only drops that reference (plain C, never raises, never calls into Lua);
-- t:free() releases at once and disarms the finalizer, after which any use is an error.
local each = require 'tessera.each'
local ffi = require 'ffi'

local config = require 'tessera.config'
ffi.cdef(require 'tessera.cdef')
ffi.cdef [[ typedef struct tessera_tensor { ts_tensor *h; } tessera_tensor; ]]

-- OpenBLAS's idle workers spin (sched_yield) for 2^28 cycles after each product before they sleep,
-- burning between a training step's many small products the core that our own kernels need. It
-- reads OPENBLAS_THREAD_TIMEOUT (log2 of the cycles, 4 at least) once, when it is loaded, so it is
-- set here, before libtessera pulls it in; a value the user set wins.
local OPENBLAS_THREAD_TIMEOUT = '4'
pcall(ffi.cdef, 'int setenv(const char *name, const char *value, int overwrite);')
ffi.C.setenv('OPENBLAS_THREAD_TIMEOUT', OPENBLAS_THREAD_TIMEOUT, 0)

local lib = ffi.load(os.getenv('TESSERA_LIBRARY') or config.library)
if lib.tessera_abi_version() ~= lib.TESSERA_ABI_VERSION then
  error(string.format('tessera: libtessera ABI %d does not match the Lua binding (ABI %d); rebuild',
    lib.tessera_abi_version(), lib.TESSERA_ABI_VERSION), 0)
end

-- Out of memory, a call that makes a tensor gets one more chance: device memory may be held by
-- tensors that only unreachable Lua values still reference, so a full collection runs, every
-- device's allocator cache is emptied, and the call is made again; a second failure is the error.
-- This lives here, in Lua, because a C allocator must not call back into Lua (LuaJIT aborts when a
-- C function called from compiled code does). Every binding module calls the library through `C`,
-- which wraps each function that makes an object once with this retry, and so the functions that
-- hand their tensors back through out-pointers (the others, enums and constants pass through).
local cpu_device = ffi.new('ts_device', { lib.TS_CPU, 0 })

local function free_memory()
  collectgarbage('collect')
  lib.ts_memory_empty_cache(cpu_device)
  for i = 0, lib.ts_cuda_device_count() - 1 do lib.ts_memory_empty_cache(ffi.new('ts_device', { lib.TS_CUDA, i })) end
  lib.ts_clear_error()
end

local function with_retry(fn, failed)
  return function(...)
    local r = fn(...)
    if failed(r) and lib.ts_last_status() == lib.TS_ERR_MEMORY then
      free_memory()
      r = fn(...)
    end
    return r
  end
end

local function null(r) return r == nil end
local function not_ok(r) return r ~= lib.TS_OK end
-- status-returning calls whose results come through out-pointers and that change nothing when they
-- fail (a data loader's next batch does change its position, so it is not here)
local OUT_POINTER_CALLS = { ts_sort = true, ts_topk = true, ts_max_dim = true, ts_mask_secondary = true }

local C = setmetatable({}, { __index = function(t, name)
  local v = lib[name]
  -- functions that return an object (a tensor, a file, a loader): NULL is their failure
  if type(v) == 'cdata' and tostring(ffi.typeof(v)):match('^ctype<struct [%w_]+ %*%(') then v = with_retry(v, null) end
  if OUT_POINTER_CALLS[name] then v = with_retry(v, not_ok) end
  rawset(t, name, v)
  return v
end })

local core = { ffi = ffi, C = C, lib = lib, version = config.version }
local T = {}          -- the public namespace, `require 'tessera'`
local Tensor = {}     -- tensor methods; properties live in core.properties
core.T, core.Tensor, core.properties, core.setters = T, Tensor, {}, {}

-- ---- errors ------------------------------------------------------------------------------------
-- Raises the C library's last error. Level 0: the message names the op and shapes already.
function core.raise()
  local msg = ffi.string(C.ts_last_error())
  C.ts_clear_error()
  error(msg ~= '' and msg or 'tessera: unknown error', 0)
end

function core.check(status)
  if status ~= 0 then core.raise() end
end

-- ---- tensor references and garbage collection ----------------------------------------------------
local tensor_ct = ffi.typeof('tessera_tensor')
core.tensor_ct = tensor_ct

local function finalize(ref)
  if ref.h ~= nil then C.ts_release(ref.h) end
end

-- LuaJIT sees a tensor as 16 bytes, whatever its C-side size. To keep memory bounded we run a
-- full collection whenever the host has allocated more than `gc_budget` bytes since the last one;
-- the budget grows with what is still alive afterwards, so steady states do not collect per op.
local GC_MIN_BUDGET = 64 * 1024 * 1024
local gc_budget, gc_mark = GC_MIN_BUDGET, 0

-- Bytes on every device count: dropped GPU tensors are freed by the same collections.
local function step_gc()
  local total = tonumber(C.ts_bytes_allocated_total())
  if total - gc_mark > gc_budget then
    collectgarbage('collect')
    gc_mark = tonumber(C.ts_bytes_allocated_total())
    gc_budget = math.max(GC_MIN_BUDGET, tonumber(C.ts_bytes_live_total()))
  end
end

-- Wraps a new C reference (NULL means the C call failed: raise its error).
function core.wrap(h)
  if h == nil then core.raise() end
  step_gc()
  return ffi.gc(tensor_ct(h), finalize)
end

function core.is_tensor(x) return ffi.istype(tensor_ct, x) end
T.is_tensor = core.is_tensor

-- The C handle of a tensor argument; `what` names it in errors.
function core.handle(t, what)
  if not ffi.istype(tensor_ct, t) then
    error(string.format('%s: expected a tensor, got %s', what or 'tessera', type(t)), 0)
  end
  local h = t.h
  if h == nil then error((what or 'tessera') .. ': tensor used after free()', 0) end
  return h
end

function Tensor.free(t)
  local h = t.h
  if h ~= nil then
    t.h = nil
    ffi.gc(t, nil)
    C.ts_release(h)
  end
end

function Tensor.is_freed(t) return t.h == nil end

-- ---- dtypes ------------------------------------------------------------------------------------
local dtype_ids = {
  float32 = C.TS_F32, float = C.TS_F32, f32 = C.TS_F32,
  float64 = C.TS_F64, double = C.TS_F64, f64 = C.TS_F64,
  float16 = C.TS_F16, half = C.TS_F16, f16 = C.TS_F16,
  bfloat16 = C.TS_BF16, bf16 = C.TS_BF16,
  int64 = C.TS_I64, long = C.TS_I64, i64 = C.TS_I64,
  int32 = C.TS_I32, int = C.TS_I32, i32 = C.TS_I32,
  uint8 = C.TS_U8, byte = C.TS_U8, u8 = C.TS_U8,
  bool = C.TS_BOOL,
}
local dtype_names = {}
for id = 0, C.TS_NUM_DTYPES - 1 do
  dtype_names[id] = ffi.string(C.ts_dtype_name(id))
  T[dtype_names[id]] = dtype_names[id]   -- T.float32 == 'float32', as torch.float32
end
core.dtype_names = dtype_names

local default_dtype = C.TS_F32
function T.set_default_dtype(d) default_dtype = core.dtype(d) end
function T.get_default_dtype() return dtype_names[default_dtype] end

-- A dtype id from a name ('float32', 'float', 'int64', ...); nil gives the default.
function core.dtype(d, what)
  if d == nil then return default_dtype end
  local id = dtype_ids[d]
  if id == nil then
    local valid = {}
    for _, n in each(dtype_names) do valid[#valid + 1] = n end
    table.sort(valid)
    error(string.format('%s: unknown dtype %s (valid: %s)', what or 'tessera', tostring(d),
      table.concat(valid, ', ')), 0)
  end
  return id
end

function core.is_floating(id) return C.ts_dtype_is_floating(id) ~= 0 end

-- ---- devices -----------------------------------------------------------------------------------
-- 'cpu', 'cuda' (device 0), 'cuda:1' → a ts_device value.
function core.device(d, what)
  if d == nil or d == 'cpu' then return cpu_device end
  if ffi.istype('ts_device', d) then return d end
  if type(d) == 'string' then
    local idx = d:match('^cuda:(%d+)$')
    if d == 'cuda' then idx = '0' end
    if idx then return ffi.new('ts_device', { C.TS_CUDA, tonumber(idx) }) end
  end
  error(string.format("%s: unknown device %s (use 'cpu', 'cuda' or 'cuda:N')", what or 'tessera',
    tostring(d)), 0)
end

function core.device_name(dev)
  if dev.type == C.TS_CPU then return 'cpu' end
  return 'cuda:' .. dev.index
end

-- ---- shapes and dims ---------------------------------------------------------------------------
local function is_integer(x) return type(x) == 'number' and x == math.floor(x) and x == x end
core.is_integer = is_integer

function core.int(x, what)
  if not is_integer(x) then
    error(string.format('%s: expected an integer, got %s', what or 'tessera', tostring(x)), 0)
  end
  return x
end

-- Arrays handed to C: a fresh int64_t[n] / int[n] built from a Lua list.
function core.shape_array(list, what)
  local n = #list
  if n > C.TS_MAX_DIMS then
    error(string.format('%s: %d dims given, tensors have at most %d', what, n, C.TS_MAX_DIMS), 0)
  end
  local arr = ffi.new('int64_t[?]', math.max(n, 1))
  for i = 1, n do arr[i - 1] = core.int(list[i], what) end
  return arr, n
end

function core.dims_array(list, what)
  local n = #list
  local arr = ffi.new('int[?]', math.max(n, 1))
  for i = 1, n do arr[i - 1] = core.int(list[i], what) end
  return arr, n
end

-- Splits factory-style arguments: sizes as numbers or one list, then an optional options table.
--   T.zeros(2, 3)   T.zeros({2, 3})   T.zeros({2, 3}, {dtype = 'float64'})   T.zeros(2, 3, {device = 'cuda'})
function core.size_args(what, ...)
  local n = select('#', ...)
  local args = { ... }
  local opts = {}
  -- a trailing table without list entries is the options (an empty one too, after sizes)
  if n > 0 and type(args[n]) == 'table' and not core.is_tensor(args[n]) and args[n][1] == nil
      and (n > 1 or next(args[n]) ~= nil) then
    opts = args[n]
    n = n - 1
  end
  local shape
  if n == 1 and type(args[1]) == 'table' then
    shape = args[1]
  else
    shape = {}
    for i = 1, n do shape[i] = args[i] end
  end
  for i = 1, #shape do
    if not is_integer(shape[i]) or shape[i] < 0 then
      error(string.format('%s: sizes must be non-negative integers, got %s at position %d', what,
        tostring(shape[i]), i), 0)
    end
  end
  return shape, opts
end

-- ---- options tables ------------------------------------------------------------------------------
-- A set of names is {name = true, ...} or a defaults table (every key with a non-nil value is a
-- name, so false defaults count), or a list {'a', 'b'}.
local function is_list(names) return names[1] ~= nil end

local function has_name(names, key)
  if not is_list(names) then return names[key] ~= nil end
  for i = 1, #names do
    if names[i] == key then return true end
  end
  return false
end

-- The names of a set or list, as sorted strings (for messages that list the valid ones).
function core.sorted_names(names)
  local out = {}
  if is_list(names) then
    for i = 1, #names do out[i] = tostring(names[i]) end
  else
    for k in each(names) do out[#out + 1] = tostring(k) end
  end
  table.sort(out)
  return out
end

-- An op's options table: nil gives {}; anything but a plain table is an error, and so is, when
-- `valid` is given, a key outside it (a misspelt option must not be silently ignored). Returns opts.
-- Level 0: the message names the op.
function core.options(what, opts, valid)
  if opts == nil then return {} end
  if type(opts) ~= 'table' then
    error(string.format('%s: options must be a table, got %s', what,
      core.is_tensor(opts) and 'a tensor' or type(opts)), 0)
  end
  if valid ~= nil then
    for k in each(opts) do
      if not has_name(valid, k) then
        error(string.format("%s: unknown option '%s' (valid: %s)", what, tostring(k),
          table.concat(core.sorted_names(valid), ', ')), 0)
      end
    end
  end
  return opts
end

-- ---- small shared helpers ------------------------------------------------------------------------
ffi.cdef [[
  typedef struct tessera_timespec { long tv_sec; long tv_nsec; } tessera_timespec;
  int clock_gettime(int clock_id, tessera_timespec *tp);
]]
local CLOCK_MONOTONIC, timespec = 1, ffi.new('tessera_timespec')
-- Monotonic seconds, for timing (benchmarks, the recipe runner's progress and ETA).
function core.now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

-- A shallow copy of the table `base` with the entries of `overrides` (optional) put over it.
function core.merge(base, overrides)
  local out = {}
  for k, v in each(base) do out[k] = v end
  for k, v in each(overrides or {}) do out[k] = v end
  return out
end

-- For a setting that a region changes (grad mode, autocast): given what pcall(fn, ...) returned,
-- puts the setting back with reset(previous), then returns fn's results or raises its error again.
function core.restore_after(reset, previous, ok, ...)
  reset(previous)
  if not ok then error((...), 0) end
  return ...
end

-- An error's message without the "file:line: " prefix that errors raised with a level carry.
function core.bare_message(err) return (tostring(err):gsub('^[^\n:]+:%d+: ', '')) end

-- ---- argument checks -----------------------------------------------------------------------------
-- Each checks one argument and returns it; `what` names the op and `name` the argument, and a bad
-- value raises (level 0) "<what>: <name> must be <requirement>, got <value>". A `default`, when
-- given, stands in for a nil value; without one, nil is an error like any other wrong value.

-- A value as an error message shows it: numbers and booleans as written, strings quoted, anything
-- else by its kind (a table's address tells the reader nothing).
function core.describe(v)
  local kind = type(v)
  if kind == 'string' then return "'" .. v .. "'" end
  if kind == 'number' or kind == 'boolean' or kind == 'nil' then return tostring(v) end
  return core.is_tensor(v) and 'a tensor' or kind
end

local function invalid(what, name, requirement, v)
  error(string.format('%s: %s must be %s, got %s', what, name, requirement, core.describe(v)), 0)
end

local function checker(requirement, valid)
  return function(what, name, v, default)
    if v == nil and default ~= nil then return default end
    if not valid(v) then invalid(what, name, requirement, v) end
    return v
  end
end

core.check_boolean = checker('a boolean', function(v) return type(v) == 'boolean' end)
core.check_string = checker('a string', function(v) return type(v) == 'string' end)
-- NaN is never a number here; the infinities are, but not for the bounded forms.
core.check_number = checker('a number', function(v) return type(v) == 'number' and v == v end)
core.check_nonnegative = checker('a finite number >= 0',
  function(v) return type(v) == 'number' and v >= 0 and v < math.huge end)
core.check_positive = checker('a finite number > 0',
  function(v) return type(v) == 'number' and v > 0 and v < math.huge end)
core.check_probability = checker('in [0, 1]', function(v) return type(v) == 'number' and v >= 0 and v <= 1 end)

-- An integer >= min (any integer when min is nil).
function core.check_integer(what, name, v, min, default)
  if v == nil and default ~= nil then return default end
  if not is_integer(v) or (min ~= nil and v < min) then
    invalid(what, name, min == nil and 'an integer' or min == 0 and 'a non-negative integer'
      or 'an integer >= ' .. min, v)
  end
  return v
end

-- Shape of a C tensor as a Lua list.
function core.shape_of(h)
  local nd = C.ts_ndim(h)
  local sh = C.ts_shape(h)
  local out = {}
  for i = 0, nd - 1 do out[i + 1] = tonumber(sh[i]) end
  return out
end

-- ---- the Tensor metatype -----------------------------------------------------------------------
-- Keys: a method or property name; an integer (select along dim 0); a table (multi-dim
-- indexing, see tensor.lua). Integer and table keys are handled by core.index/core.newindex,
-- which tensor.lua installs.
local properties = core.properties
local mt = {}
mt.__index = function(t, k)
  local m = Tensor[k]
  if m ~= nil then return m end
  local p = properties[k]
  if p then return p(t) end
  if type(k) ~= 'string' then return core.index(t, k) end
  error("tensor has no method or property '" .. tostring(k) .. "'", 2)
end
mt.__newindex = function(t, k, v)
  if type(k) == 'string' then
    local set = core.setters[k]
    if not set then error("cannot set field '" .. k .. "' of a tensor", 2) end
    return set(t, v)
  end
  core.newindex(t, k, v)
end
core.metatable = mt

function core.finish_metatype()
  ffi.metatype(tensor_ct, mt)
end

return core
