-- tessera.reduce — reductions: sum, mean, prod, amax, amin, all, any, var, std, norm, max, min,
-- argmax, argmin. Signatures follow PyTorch; dims are 0-based and may be negative.
--
--   t:sum()                     every dim: a 0-d tensor
--   t:sum(1)   t:sum({0, 2})    over those dims
--   t:sum(1, true)              keepdim: reduced dims stay as size 1
--   t:sum{dim = {0, 2}, keepdim = true, dtype = 'float64'}   (or t:sum(1, {keepdim = true}))
--   t:var(dim, unbiased, keepdim)   t:var{dim = 1, unbiased = false}   t:var(1, {correction = 0})
--   t:norm(p, dim, keepdim)     p: a number, math.huge, 'inf', '-inf' or 'fro'; default 2
--   t:max()                     a 0-d tensor holding the largest element (NaN if any)
--   t:max(dim, keepdim)         values, indices (int64, first occurrence)
--   t:max(other)                elementwise maximum, as Tensor.maximum
--   t:argmax()   t:argmax(dim, keepdim)
--
-- Result dtypes as PyTorch: sum/prod of integers and bools give int64; mean, var, std and norm
-- need a floating input (or a dtype option for sum/mean/prod); all/any give bool.
local each = require 'tessera.each'
local core = require 'tessera.core'
local ffi, C, T, Tensor = core.ffi, core.C, core.T, core.Tensor
local wrap, handle, check = core.wrap, core.handle, core.check

-- ---- argument parsing --------------------------------------------------------------------------
-- An options table: a plain table with named fields and no list part. {} counts as a dims list.
local function is_options(x)
  return type(x) == 'table' and not core.is_tensor(x) and x[1] == nil and next(x) ~= nil
end

-- A dim as a C int: an integer that fits, so that a huge value is not wrapped into a valid dim.
local function dim_int(what, d)
  core.int(d, what)
  if d < -2 ^ 31 or d >= 2 ^ 31 then error(string.format('%s: dim %d out of range', what, d), 0) end
  return d
end

-- dim: nil (every dim), an integer, or a list of integers → int[n], n (n = 0: every dim).
local function dims_arg(what, dim)
  if dim == nil then return nil, 0 end
  if type(dim) == 'number' then dim = { dim } end
  if type(dim) ~= 'table' or core.is_tensor(dim) then
    error(string.format('%s: dim must be an integer or a list of integers, got %s', what, type(dim)), 0)
  end
  for k in each(dim) do
    if type(k) ~= 'number' then
      error(string.format("%s: the dim list has a field '%s'; give options as {dim = ..., keepdim = ...}", what, tostring(k)), 0)
    end
  end
  for i = 1, #dim do dim_int(what, dim[i]) end
  return core.dims_array(dim, what)
end

-- Splits (dim, second) into (dim, keepdim, opts) for the forms listed at the top.
local function split_args(what, dim, second, valid)
  local opts = {}
  if is_options(dim) then
    opts = dim
    dim = opts.dim
    if second ~= nil then error(what .. ': options table given, then another argument', 0) end
  elseif is_options(second) then
    opts = second
    if opts.dim ~= nil then error(what .. ': dim given both as an argument and as an option', 0) end
  else
    opts = { keepdim = second }
  end
  core.options(what, opts, valid)
  return dim, core.check_boolean(what, 'keepdim', opts.keepdim, false), opts
end

-- The C handle to reduce, converted first when opts.dtype asks (as PyTorch's dtype argument),
-- and the tensor holding it, to free after the call.
local function input_for(what, t, dtype)
  local h = handle(t, what)
  if dtype == nil then return h, nil end
  local conv = wrap(C.ts_to_dtype(h, core.dtype(dtype, what)))
  return conv.h, conv
end

local function release(tmp)
  if tmp then tmp:free() end
end

-- ---- sum, mean, prod, amax, amin, all, any ----------------------------------------------------
local reductions = {
  sum = { C.TS_SUM, true }, mean = { C.TS_MEAN, true }, prod = { C.TS_PROD, true },
  amax = { C.TS_AMAX }, amin = { C.TS_AMIN }, all = { C.TS_ALL }, any = { C.TS_ANY },
}
for name, spec in each(reductions) do
  local op, takes_dtype = spec[1], spec[2]
  local valid = { dim = true, keepdim = true, dtype = takes_dtype or nil }
  Tensor[name] = function(t, dim, keepdim)
    local d, kd, opts = split_args(name, dim, keepdim, valid)
    local arr, n = dims_arg(name, d)
    local h, tmp = input_for(name, t, opts.dtype)
    local out = C.ts_reduce(op, h, n, arr, kd and 1 or 0)
    release(tmp)
    return wrap(out)
  end
  T[name] = Tensor[name]
end

-- ---- var, std ----------------------------------------------------------------------------------
-- t:var(dim, unbiased, keepdim) as PyTorch's positional form; t:var(false) is t:var{unbiased = false}.
local var_options = { dim = true, unbiased = true, correction = true, keepdim = true }
local function variance(name, take_sqrt)
  return function(t, dim, unbiased, keepdim)
    local opts
    if type(dim) == 'boolean' then
      opts = { unbiased = dim, keepdim = unbiased }
      dim = nil
    elseif is_options(dim) then
      opts = dim
      dim = opts.dim
      if unbiased ~= nil then error(name .. ': options table given, then another argument', 0) end
    elseif is_options(unbiased) then
      opts = unbiased
      if opts.dim ~= nil then error(name .. ': dim given both as an argument and as an option', 0) end
    else
      opts = { unbiased = unbiased, keepdim = keepdim }
    end
    core.options(name, opts, var_options)
    if opts.unbiased ~= nil and opts.correction ~= nil then
      error(name .. ': give either unbiased or correction, not both', 0)
    end
    local correction = 1
    if opts.unbiased ~= nil then correction = core.check_boolean(name, 'unbiased', opts.unbiased) and 1 or 0 end
    if opts.correction ~= nil then correction = core.int(opts.correction, name .. ' correction') end
    local arr, n = dims_arg(name, dim)
    local kd = core.check_boolean(name, 'keepdim', opts.keepdim, false)
    return wrap(C.ts_var(handle(t, name), n, arr, correction, kd and 1 or 0, take_sqrt and 1 or 0))
  end
end
Tensor.var = variance('var', false)
Tensor.std = variance('std', true)
T.var, T.std = Tensor.var, Tensor.std

-- ---- norm --------------------------------------------------------------------------------------
local named_orders = { inf = math.huge, ['-inf'] = -math.huge, fro = 2 }
local function norm_order(p)
  if p == nil then return 2 end
  if type(p) == 'number' then
    if p ~= p then error('norm: the order p must be a number, got nan', 0) end
    return p
  end
  if named_orders[p] then return named_orders[p] end
  if p == 'nuc' then error("norm: the nuclear norm ('nuc') is not supported; it needs a matrix decomposition", 0) end
  error(string.format("norm: p must be a number, 'inf', '-inf' or 'fro', got %s", tostring(p)), 0)
end

local norm_options = { p = true, dim = true, keepdim = true }
function Tensor.norm(t, p, dim, keepdim)
  if is_options(p) then
    if dim ~= nil or keepdim ~= nil then error('norm: options table given, then another argument', 0) end
    core.options('norm', p, norm_options)
    p, dim, keepdim = p.p, p.dim, p.keepdim
  elseif is_options(dim) then
    if keepdim ~= nil then error('norm: options table given, then another argument', 0) end
    core.options('norm', dim, { dim = true, keepdim = true })
    dim, keepdim = dim.dim, dim.keepdim
  end
  local order = norm_order(p)
  local arr, n = dims_arg('norm', dim)
  local kd = core.check_boolean('norm', 'keepdim', keepdim, false)
  return wrap(C.ts_norm(handle(t, 'norm'), order, n, arr, kd and 1 or 0))
end
T.norm = Tensor.norm

-- ---- max, min, argmax, argmin ------------------------------------------------------------------
local function single_dim_args(what, dim, keepdim)
  if is_options(dim) then
    if keepdim ~= nil then error(what .. ': options table given, then another argument', 0) end
    core.options(what, dim, { dim = true, keepdim = true })
    dim, keepdim = dim.dim, dim.keepdim
  end
  if dim ~= nil then dim_int(what, dim) end
  return dim, core.check_boolean(what, 'keepdim', keepdim, false)
end

local function extreme(name, largest, elementwise)
  return function(t, dim, keepdim)
    if core.is_tensor(dim) then return Tensor[elementwise](t, dim) end
    local h = handle(t, name)
    local d, kd = single_dim_args(name, dim, keepdim)
    if d == nil then
      if kd then error(name .. ': keepdim needs a dim; use amax/amin to keep every dim', 0) end
      if C.ts_numel(h) == 0 then
        error(string.format('%s: cannot take the %s of the empty tensor [%s]; give a dim to reduce over',
          name, name, table.concat(core.shape_of(h), ',')), 0)
      end
      return wrap(C.ts_reduce(largest and C.TS_AMAX or C.TS_AMIN, h, 0, nil, 0))
    end
    local values, indices = ffi.new('ts_tensor*[1]'), ffi.new('ts_tensor*[1]')
    check(C.ts_max_dim(h, d, kd and 1 or 0, largest and 1 or 0, values, indices))
    return wrap(values[0]), wrap(indices[0])
  end
end
Tensor.max = extreme('max', true, 'maximum')
Tensor.min = extreme('min', false, 'minimum')
T.max, T.min = Tensor.max, Tensor.min

local function arg_extreme(name, largest)
  return function(t, dim, keepdim)
    local h = handle(t, name)
    local d, kd = single_dim_args(name, dim, keepdim)
    return wrap(C.ts_argmax(h, d or 0, d and 1 or 0, kd and 1 or 0, largest and 1 or 0))
  end
end
Tensor.argmax = arg_extreme('argmax', true)
Tensor.argmin = arg_extreme('argmin', false)
T.argmax, T.argmin = Tensor.argmax, Tensor.argmin

return Tensor
