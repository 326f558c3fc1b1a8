-- tessera.tensor — the Tensor API: properties, factories, views, conversions, elementwise math,
-- operators, indexing and printing. Dims are 0-based and may be negative, as in PyTorch.
local each = require 'tessera.each'
local core = require 'tessera.core'
local ffi, C, T, Tensor = core.ffi, core.C, core.T, core.Tensor
local wrap, handle, check = core.wrap, core.handle, core.check
local props = core.properties

-- ---- properties and accessors ------------------------------------------------------------------
local shape_mt = { __tostring = function(s) return '[' .. table.concat(s, ',') .. ']' end }

props.shape = function(t) return setmetatable(core.shape_of(handle(t, 'shape')), shape_mt) end
props.dtype = function(t) return core.dtype_names[C.ts_dtype_of(handle(t, 'dtype'))] end
props.device = function(t) return core.device_name(C.ts_device_of(handle(t, 'device'))) end
props.ndim = function(t) return C.ts_ndim(handle(t, 'ndim')) end
props.is_cuda = function(t) return C.ts_device_of(handle(t, 'is_cuda')).type == C.TS_CUDA end

function Tensor.dim(t) return C.ts_ndim(handle(t, 'dim')) end
function Tensor.numel(t) return tonumber(C.ts_numel(handle(t, 'numel'))) end
function Tensor.size(t, d)
  local h = handle(t, 'size')
  if d == nil then return props.shape(t) end
  local nd = C.ts_ndim(h)
  core.int(d, 'size')
  if d < -nd or d >= nd then
    error(string.format('size: dim %d out of range for a tensor with %d dims', d, nd), 0)
  end
  return tonumber(C.ts_shape(h)[d < 0 and d + nd or d])
end
function Tensor.stride(t, d)
  local h = handle(t, 'stride')
  local nd, st = C.ts_ndim(h), C.ts_strides(h)
  if d == nil then
    local out = {}
    for i = 0, nd - 1 do out[i + 1] = tonumber(st[i]) end
    return out
  end
  if d < -nd or d >= nd then error(string.format('stride: dim %d out of range for %d dims', d, nd), 0) end
  return tonumber(st[d < 0 and d + nd or d])
end
function Tensor.is_contiguous(t) return C.ts_is_contiguous(handle(t, 'is_contiguous')) ~= 0 end
function Tensor.storage_offset(t) return tonumber(C.ts_offset(handle(t, 'storage_offset'))) end
function Tensor.shares_storage(t, o)
  return C.ts_shares_storage(handle(t, 'shares_storage'), handle(o, 'shares_storage')) ~= 0
end
function Tensor.is_floating_point(t) return core.is_floating(C.ts_dtype_of(handle(t, 'is_floating_point'))) end
function Tensor.data_ptr(t) return C.ts_data_ptr(handle(t, 'data_ptr')) end
function Tensor.element_size(t) return C.ts_dtype_size(C.ts_dtype_of(handle(t, 'element_size'))) end

-- ---- factories ---------------------------------------------------------------------------------
local function factory(what, fill)
  return function(...)
    local shape, opts = core.size_args(what, ...)
    local arr, n = core.shape_array(shape, what)
    local dtype, dev = core.dtype(opts.dtype, what), core.device(opts.device, what)
    if fill == nil then return wrap(C.ts_empty(n, arr, dtype, dev)) end
    return wrap(C.ts_full(n, arr, fill, dtype, dev))
  end
end
T.empty = factory('empty')
T.zeros = factory('zeros', 0)
T.ones = factory('ones', 1)

-- T.full(shape, value, opts)
function T.full(shape, value, opts)
  opts = opts or {}
  if type(shape) == 'number' then shape = { shape } end
  if type(value) ~= 'number' and type(value) ~= 'boolean' then
    error('full: value must be a number, got ' .. type(value), 0)
  end
  local arr, n = core.shape_array(shape, 'full')
  return wrap(C.ts_full(n, arr, value == true and 1 or value == false and 0 or value,
    core.dtype(opts.dtype, 'full'), core.device(opts.device, 'full')))
end

local function like(what, fill)
  return function(t, opts)
    opts = opts or {}
    local h = handle(t, what)
    local dtype = opts.dtype and core.dtype(opts.dtype, what) or C.ts_dtype_of(h)
    local dev = opts.device and core.device(opts.device, what) or C.ts_device_of(h)
    local nd = C.ts_ndim(h)
    if fill == nil then return wrap(C.ts_empty(nd, C.ts_shape(h), dtype, dev)) end
    return wrap(C.ts_full(nd, C.ts_shape(h), fill, dtype, dev))
  end
end
T.empty_like = like('empty_like')
T.zeros_like = like('zeros_like', 0)
T.ones_like = like('ones_like', 1)
function T.full_like(t, value, opts)
  opts = opts or {}
  local h = handle(t, 'full_like')
  local dtype = opts.dtype and core.dtype(opts.dtype, 'full_like') or C.ts_dtype_of(h)
  local dev = opts.device and core.device(opts.device, 'full_like') or C.ts_device_of(h)
  return wrap(C.ts_full(C.ts_ndim(h), C.ts_shape(h), value, dtype, dev))
end

-- T.arange(end) / T.arange(start, end[, step][, opts]); integral arguments give int64.
function T.arange(...)
  local args = { ... }
  local opts = {}
  if type(args[#args]) == 'table' then opts = table.remove(args) end
  local start, stop, step
  if #args == 1 then start, stop, step = 0, args[1], 1
  else start, stop, step = args[1], args[2], args[3] or 1 end
  for _, v in ipairs { start, stop, step } do
    if type(v) ~= 'number' then error('arange: start, end and step must be numbers', 0) end
  end
  local integral = core.is_integer(start) and core.is_integer(stop) and core.is_integer(step)
  local dtype = opts.dtype and core.dtype(opts.dtype, 'arange') or (integral and C.TS_I64 or core.dtype())
  return wrap(C.ts_arange(start, stop, step, dtype, core.device(opts.device, 'arange')))
end

function T.linspace(start, stop, steps, opts)
  opts = opts or {}
  core.int(steps, 'linspace')
  return wrap(C.ts_linspace(start, stop, steps, core.dtype(opts.dtype, 'linspace'),
    core.device(opts.device, 'linspace')))
end

function T.eye(n, m, opts)
  if type(m) == 'table' then opts, m = m, nil end
  opts = opts or {}
  core.int(n, 'eye')
  if n < 0 then error('eye: n must be non-negative, got ' .. n, 0) end
  return wrap(C.ts_eye(n, m and core.int(m, 'eye') or -1, core.dtype(opts.dtype, 'eye'),
    core.device(opts.device, 'eye')))
end

-- T.tensor(data, opts): data is a number, a boolean or nested lists of them. Lua does not tell 1
-- from 1.0, so numbers give the default dtype (float32) unless opts.dtype says otherwise;
-- booleans give bool.
function T.tensor(data, opts)
  opts = opts or {}
  if core.is_tensor(data) then
    local c = Tensor.clone(data)
    if opts.dtype or opts.device then return Tensor.to(c, opts) end
    return c
  end
  local shape, flat, saw_bool = {}, {}, false
  local function walk(x, depth)
    if type(x) == 'table' then
      local n = #x
      if shape[depth] == nil then shape[depth] = n
      elseif shape[depth] ~= n then
        error(string.format('tensor: ragged nested lists (dim %d has lengths %d and %d)', depth - 1, shape[depth], n), 0)
      end
      for i = 1, n do walk(x[i], depth + 1) end
      if n == 0 and depth <= #shape and shape[depth + 1] then
        error('tensor: ragged nested lists', 0)
      end
    elseif type(x) == 'number' or type(x) == 'boolean' then
      if shape[depth] ~= nil then
        error(string.format('tensor: ragged nested lists (a number where dim %d expects a list)', depth - 1), 0)
      end
      if type(x) == 'boolean' then saw_bool = true; x = x and 1 or 0 end
      flat[#flat + 1] = x
    else
      error('tensor: expected numbers, booleans or nested lists, got ' .. type(x), 0)
    end
  end
  walk(data, 1)
  local dtype = opts.dtype and core.dtype(opts.dtype, 'tensor') or (saw_bool and C.TS_BOOL or core.dtype())
  local arr, n = core.shape_array(shape, 'tensor')
  local host = ffi.new('double[?]', math.max(#flat, 1), flat)
  local t = wrap(C.ts_from_host(n, arr, C.TS_F64, host, core.device(opts.device, 'tensor')))
  if dtype ~= C.TS_F64 then
    local conv = wrap(C.ts_to_dtype(t.h, dtype))
    t:free()
    return conv
  end
  return t
end

-- ---- views -------------------------------------------------------------------------------------
local function shape_from_args(what, ...)
  local first = ...
  if type(first) == 'table' then return first end
  return { ... }
end

function Tensor.view(t, ...)
  local arr, n = core.shape_array(shape_from_args('view', ...), 'view')
  return wrap(C.ts_view(handle(t, 'view'), n, arr))
end
function Tensor.reshape(t, ...)
  local arr, n = core.shape_array(shape_from_args('reshape', ...), 'reshape')
  return wrap(C.ts_reshape(handle(t, 'reshape'), n, arr))
end
function Tensor.expand(t, ...)
  local arr, n = core.shape_array(shape_from_args('expand', ...), 'expand')
  return wrap(C.ts_expand(handle(t, 'expand'), n, arr))
end
function Tensor.expand_as(t, o) return Tensor.expand(t, core.shape_of(handle(o, 'expand_as'))) end
function Tensor.view_as(t, o) return Tensor.view(t, core.shape_of(handle(o, 'view_as'))) end
function Tensor.permute(t, ...)
  local arr, n = core.dims_array(shape_from_args('permute', ...), 'permute')
  return wrap(C.ts_permute(handle(t, 'permute'), n, arr))
end
function Tensor.transpose(t, d0, d1)
  return wrap(C.ts_transpose(handle(t, 'transpose'), core.int(d0, 'transpose'), core.int(d1, 'transpose')))
end
function Tensor.t(t)
  local nd = C.ts_ndim(handle(t, 't'))
  if nd > 2 then error(string.format('t: expects a tensor with <= 2 dims, got %d', nd), 0) end
  return nd < 2 and wrap(C.ts_view(t.h, nd, C.ts_shape(t.h))) or Tensor.transpose(t, 0, 1)
end
-- slice(dim, start, stop, step): elements start, start+step, ... below stop (stop may be nil).
function Tensor.slice(t, dim, start, stop, step)
  local h = handle(t, 'slice')
  return wrap(C.ts_slice(h, core.int(dim, 'slice'), start and core.int(start, 'slice') or 0,
    stop and core.int(stop, 'slice') or 2 ^ 62, step and core.int(step, 'slice') or 1))
end
function Tensor.narrow(t, dim, start, length)
  return wrap(C.ts_narrow(handle(t, 'narrow'), core.int(dim, 'narrow'), core.int(start, 'narrow'),
    core.int(length, 'narrow')))
end
function Tensor.select(t, dim, index)
  return wrap(C.ts_select(handle(t, 'select'), core.int(dim, 'select'), core.int(index, 'select')))
end
function Tensor.squeeze(t, dim)
  if dim == nil then return wrap(C.ts_squeeze_all(handle(t, 'squeeze'))) end
  return wrap(C.ts_squeeze(handle(t, 'squeeze'), core.int(dim, 'squeeze')))
end
function Tensor.unsqueeze(t, dim) return wrap(C.ts_unsqueeze(handle(t, 'unsqueeze'), core.int(dim, 'unsqueeze'))) end
function Tensor.flatten(t, start_dim, end_dim)
  return wrap(C.ts_flatten(handle(t, 'flatten'), start_dim or 0, end_dim or -1))
end
function Tensor.as_strided(t, shape, strides, offset)
  local sa, n = core.shape_array(shape, 'as_strided')
  local st, m = core.shape_array(strides, 'as_strided')
  if n ~= m then error(string.format('as_strided: %d sizes but %d strides', n, m), 0) end
  return wrap(C.ts_as_strided(handle(t, 'as_strided'), n, sa, st, offset or Tensor.storage_offset(t)))
end

-- ---- copies and conversions --------------------------------------------------------------------
function Tensor.contiguous(t) return wrap(C.ts_contiguous(handle(t, 'contiguous'))) end
function Tensor.clone(t) return wrap(C.ts_clone(handle(t, 'clone'))) end
function Tensor.copy_(t, src)
  check(C.ts_copy_(handle(t, 'copy_'), handle(src, 'copy_')))
  return t
end
function Tensor.fill_(t, v)
  if type(v) == 'boolean' then v = v and 1 or 0 end
  if type(v) ~= 'number' then error('fill_: value must be a number, got ' .. type(v), 0) end
  check(C.ts_fill_(handle(t, 'fill_'), v))
  return t
end
function Tensor.zero_(t) return Tensor.fill_(t, 0) end

-- t:to('float64'), t:to('cuda'), t:to{dtype = ..., device = ...}, t:to(other_tensor)
function Tensor.to(t, spec, spec2)
  local h = handle(t, 'to')
  local dtype, dev
  if core.is_tensor(spec) then
    local o = handle(spec, 'to')
    dtype, dev = C.ts_dtype_of(o), C.ts_device_of(o)
  elseif type(spec) == 'table' then
    dtype = spec.dtype and core.dtype(spec.dtype, 'to')
    dev = spec.device and core.device(spec.device, 'to')
  else
    for _, s in ipairs { spec, spec2 } do
      if s ~= nil then
        if s == 'cpu' or (type(s) == 'string' and s:match('^cuda')) or ffi.istype('ts_device', s) then
          dev = core.device(s, 'to')
        else
          dtype = core.dtype(s, 'to')
        end
      end
    end
  end
  if dev then
    local moved = wrap(C.ts_to_device(h, dev))
    if not dtype then return moved end
    -- the moved copy is only a step: released at once, not at the next collection (on a GPU it
    -- may be a whole batch of device memory)
    local converted = wrap(C.ts_to_dtype(moved.h, dtype))
    moved:free()
    return converted
  end
  return wrap(C.ts_to_dtype(h, dtype or C.ts_dtype_of(h)))
end
for name, dtype in each { float = 'float32', double = 'float64', half = 'float16', bfloat16 = 'bfloat16',
  long = 'int64', int = 'int32', byte = 'uint8', bool = 'bool' } do
  Tensor[name] = function(t) return Tensor.to(t, dtype) end
end
function Tensor.cpu(t) return Tensor.to(t, 'cpu') end
function Tensor.cuda(t, index) return Tensor.to(t, index and ('cuda:' .. index) or 'cuda') end
function Tensor.type_as(t, o) return Tensor.to(t, T.get_dtype(o)) end
function T.get_dtype(t) return props.dtype(t) end

-- ---- reading values ----------------------------------------------------------------------------
function Tensor.item(t)
  local out = ffi.new('double[1]')
  check(C.ts_item(handle(t, 'item'), out))
  local dt = C.ts_dtype_of(t.h)
  if dt == C.TS_BOOL then return out[0] ~= 0 end
  return out[0]
end

-- Every element as a Lua number, in row-major order (bool as true/false).
local function host_values(t)
  local h = handle(t, 'totable')
  local n = tonumber(C.ts_numel(h))
  local f64 = wrap(C.ts_to_dtype(h, C.TS_F64))
  local buf = ffi.new('double[?]', math.max(n, 1))
  check(C.ts_to_host(f64.h, buf, n * 8))
  f64:free()
  return buf, n
end
core.host_values = host_values

function Tensor.totable(t)
  local buf = host_values(t)
  local shape = core.shape_of(t.h)
  local is_bool = C.ts_dtype_of(t.h) == C.TS_BOOL
  local pos = 0
  local function build(depth)
    if depth > #shape then
      local v = buf[pos]
      pos = pos + 1
      if is_bool then return v ~= 0 end
      return v
    end
    local out = {}
    for i = 1, shape[depth] do out[i] = build(depth + 1) end
    return out
  end
  return build(1)
end

-- ---- elementwise -------------------------------------------------------------------------------
local unary_ops = {
  neg = C.TS_NEG, abs = C.TS_ABS, sign = C.TS_SIGN, exp = C.TS_EXP, expm1 = C.TS_EXPM1, log = C.TS_LOG,
  log1p = C.TS_LOG1P, sqrt = C.TS_SQRT, rsqrt = C.TS_RSQRT, tanh = C.TS_TANH, sigmoid = C.TS_SIGMOID,
  erf = C.TS_ERF, relu = C.TS_RELU, gelu = C.TS_GELU, silu = C.TS_SILU, sin = C.TS_SIN, cos = C.TS_COS,
  floor = C.TS_FLOOR, ceil = C.TS_CEIL, round = C.TS_ROUND, trunc = C.TS_TRUNC,
  reciprocal = C.TS_RECIPROCAL, square = C.TS_SQUARE, logical_not = C.TS_LOGICAL_NOT,
  isnan = C.TS_ISNAN, isinf = C.TS_ISINF, isfinite = C.TS_ISFINITE,
}
for name, op in each(unary_ops) do
  Tensor[name] = function(t) return wrap(C.ts_unary(op, handle(t, name))) end
  Tensor[name .. '_'] = function(t)
    check(C.ts_unary_(op, handle(t, name .. '_')))
    return t
  end
  T[name] = Tensor[name]
end

local binary_ops = {
  add = C.TS_ADD, sub = C.TS_SUB, mul = C.TS_MUL, div = C.TS_DIV, pow = C.TS_POW,
  maximum = C.TS_MAXIMUM, minimum = C.TS_MINIMUM, remainder = C.TS_REMAINDER,
  floor_divide = C.TS_FLOOR_DIVIDE, atan2 = C.TS_ATAN2, eq = C.TS_EQ, ne = C.TS_NE, lt = C.TS_LT,
  le = C.TS_LE, gt = C.TS_GT, ge = C.TS_GE, logical_and = C.TS_LOGICAL_AND,
  logical_or = C.TS_LOGICAL_OR, logical_xor = C.TS_LOGICAL_XOR,
}

local function scalar(x, what)
  if type(x) == 'boolean' then return x and 1 or 0 end
  if type(x) ~= 'number' then
    error(string.format('%s: expected a tensor or a number, got %s', what, type(x)), 0)
  end
  return x
end

-- a op b where either side may be a number (a weak scalar, see README).
local function binary(op, name, a, b)
  if core.is_tensor(a) then
    if core.is_tensor(b) then return wrap(C.ts_binary(op, handle(a, name), handle(b, name))) end
    return wrap(C.ts_binary_scalar(op, handle(a, name), scalar(b, name), 0))
  end
  return wrap(C.ts_binary_scalar(op, handle(b, name), scalar(a, name), 1))
end
core.binary = binary

for name, op in each(binary_ops) do
  Tensor[name] = function(a, b) return binary(op, name, a, b) end
  Tensor[name .. '_'] = function(a, b)
    local what = name .. '_'
    if core.is_tensor(b) then check(C.ts_binary_(op, handle(a, what), handle(b, what)))
    else check(C.ts_binary_scalar_(op, handle(a, what), scalar(b, what))) end
    return a
  end
  T[name] = Tensor[name]
end
Tensor.mod = Tensor.remainder

function Tensor.clamp(t, lo, hi)
  return wrap(C.ts_clamp(handle(t, 'clamp'), lo or 0, hi or 0, lo and 1 or 0, hi and 1 or 0))
end
function Tensor.clamp_(t, lo, hi)
  check(C.ts_clamp_(handle(t, 'clamp_'), lo or 0, hi or 0, lo and 1 or 0, hi and 1 or 0))
  return t
end
Tensor.clip = Tensor.clamp
T.clamp = Tensor.clamp

-- T.where(cond, a, b): a and b may be numbers.
function T.where(cond, a, b)
  local hc = handle(cond, 'where')
  local function operand(x, other)
    if core.is_tensor(x) then return x end
    local dt = core.is_tensor(other) and C.ts_dtype_of(handle(other, 'where')) or core.dtype()
    if not core.is_floating(dt) and not core.is_integer(scalar(x, 'where')) then dt = core.dtype() end
    return wrap(C.ts_full(0, nil, scalar(x, 'where'), dt, C.ts_device_of(hc)))
  end
  local ta, tb = operand(a, b), operand(b, a)
  return wrap(C.ts_where(hc, handle(ta, 'where'), handle(tb, 'where')))
end
function Tensor.where(cond, a, b) return T.where(cond, a, b) end
function Tensor.masked_where(t, cond, v) return T.where(cond, v, t) end

-- ---- operators ---------------------------------------------------------------------------------
local mt = core.metatable
mt.__add = function(a, b) return binary(C.TS_ADD, 'add', a, b) end
mt.__sub = function(a, b) return binary(C.TS_SUB, 'sub', a, b) end
mt.__mul = function(a, b) return binary(C.TS_MUL, 'mul', a, b) end
mt.__div = function(a, b) return binary(C.TS_DIV, 'div', a, b) end
mt.__mod = function(a, b) return binary(C.TS_REMAINDER, 'remainder', a, b) end
mt.__pow = function(a, b) return binary(C.TS_POW, 'pow', a, b) end
mt.__unm = function(a) return Tensor.neg(a) end
mt.__len = function(t) return Tensor.size(t, 0) end
mt.__tostring = function(t) return core.format(t) end
mt.__concat = function(a, b) return tostring(a) .. tostring(b) end

-- ---- indexing ----------------------------------------------------------------------------------
-- t[i] selects along dim 0; t[{...}] takes one entry per leading dim:
--   i        select index i (0-based, negative from the end)
--   {a, b, s} slice a <= k < b with step s; any may be nil ({} is the whole dim, {2} is 2..end)
--   a tensor advanced indexing (int64 indices or a bool mask) — see indexing.lua
local function apply_key(t, key, what)
  if type(key) == 'number' then return Tensor.select(t, 0, key), {} end
  if core.is_tensor(key) then return t, { { dim = 0, index = key } } end -- t[mask], t[idx]
  if type(key) ~= 'table' then error(what .. ': index must be a number or a table, got ' .. type(key), 0) end
  local view, dim = t, 0
  local advanced = {}
  for _, k in ipairs(key) do
    if type(k) == 'number' then
      view = Tensor.select(view, dim, k)
    elseif type(k) == 'table' and not core.is_tensor(k) then
      view = Tensor.slice(view, dim, k[1], k[2], k[3])
      dim = dim + 1
    elseif core.is_tensor(k) then
      advanced[#advanced + 1] = { dim = dim, index = k }
      dim = dim + (k.dtype == 'bool' and k:dim() or 1) -- a bool mask covers as many dims as it has
    else
      error(string.format('%s: unsupported index entry of type %s', what, type(k)), 0)
    end
  end
  return view, advanced
end

function core.index(t, key)
  local view, advanced = apply_key(t, key, 'index')
  if #advanced == 0 then return view end
  return core.advanced_index(view, advanced)
end

function core.newindex(t, key, value)
  local view, advanced = apply_key(t, key, 'index assignment')
  if #advanced > 0 then return core.advanced_index_put(view, advanced, value) end
  if core.is_tensor(value) then Tensor.copy_(view, value) else Tensor.fill_(view, value) end
end

-- Advanced indexing is provided by indexing.lua; until then a clear error.
function core.advanced_index() error('index: tensor indices need tessera.indexing', 0) end
core.advanced_index_put = core.advanced_index

-- ---- printing ----------------------------------------------------------------------------------
local EDGE = 3          -- elements shown at each end of an elided dim
local ELIDE_ABOVE = 1000

local function number_format(values, n, dtype)
  if dtype == C.TS_BOOL then return function(v) return v ~= 0 and 'true' or 'false' end end
  local all_int, maxabs, minabs = true, 0, math.huge
  for i = 0, n - 1 do
    local v = values[i]
    if v == v and v ~= math.huge and v ~= -math.huge then
      if v ~= math.floor(v) then all_int = false end
      local a = math.abs(v)
      if a > maxabs then maxabs = a end
      if a > 0 and a < minabs then minabs = a end
    end
  end
  local fmt
  if all_int and maxabs < 1e15 then fmt = core.is_floating(dtype) and '%.0f.' or '%.0f'
  elseif maxabs >= 1e5 or (minabs < 1e-4 and minabs > 0) then fmt = '%.4e'
  else fmt = '%.4f' end
  return function(v)
    if v ~= v then return 'nan' end
    if v == math.huge then return 'inf' end
    if v == -math.huge then return '-inf' end
    return string.format(fmt, v)
  end
end

function core.format(t)
  if t.h == nil then return 'tensor(freed)' end
  local h = t.h
  local shape = core.shape_of(h)
  local n = tonumber(C.ts_numel(h))
  local elide = n > ELIDE_ABOVE
  -- read only what is shown: for elided tensors, the corners of each dim
  local values, count = host_values(t)
  local fmt = number_format(values, count, C.ts_dtype_of(h))
  local strides, s = {}, 1
  for d = #shape, 1, -1 do strides[d] = s; s = s * shape[d] end
  local width = 0
  local cells = {}
  local function cell(off)
    local c = cells[off]
    if not c then c = fmt(values[off]); cells[off] = c; if #c > width then width = #c end end
    return c
  end
  local function shown(d)
    local idx = {}
    if elide and shape[d] > 2 * EDGE then
      for i = 0, EDGE - 1 do idx[#idx + 1] = i end
      idx[#idx + 1] = false
      for i = shape[d] - EDGE, shape[d] - 1 do idx[#idx + 1] = i end
    else
      for i = 0, shape[d] - 1 do idx[#idx + 1] = i end
    end
    return idx
  end
  -- first pass fixes the column width, second renders
  local function visit(d, off, render, indent)
    if d > #shape then
      local c = cell(off)
      return render and string.rep(' ', width - #c) .. c or ''
    end
    local parts = {}
    for _, i in ipairs(shown(d)) do
      if i == false then parts[#parts + 1] = '...'
      else parts[#parts + 1] = visit(d + 1, off + i * strides[d], render, indent .. ' ') end
    end
    if not render then return '' end
    local sep = d == #shape and ', ' or (',' .. string.rep('\n', #shape - d) .. indent .. ' ')
    return '[' .. table.concat(parts, sep) .. ']'
  end
  local body
  if #shape == 0 then
    body = cell(0)
  else
    visit(1, 0, false, '')
    body = visit(1, 0, true, '')
  end
  return string.format('%s\n[%s tensor on %s, shape [%s]]', body, core.dtype_names[C.ts_dtype_of(h)],
    core.device_name(C.ts_device_of(h)), table.concat(shape, ','))
end

return Tensor
