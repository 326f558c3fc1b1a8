-- tessera.indexing — joining and splitting (cat, stack, split, chunk), indexing by tensors
-- (index_select, gather, scatter, masks, index_put_, t[{...}] with tensor entries) and sorting
-- (sort, argsort, topk). Dims and indices are 0-based and may be negative, as in PyTorch.
-- Gradients flow as in PyTorch to every floating input (never to indices or masks), through the
-- in-place forms too (scatter_, masked_fill_, index_put_, t[idx] = v) on tensors that are not leaves.
local core = require 'tessera.core'
local ffi, C, T, Tensor = core.ffi, core.C, core.T, core.Tensor
local wrap, handle, check = core.wrap, core.handle, core.check

-- A C array of the handles of a Lua list of tensors (the list keeps them alive during the call).
local function handle_list(list, what)
  if type(list) ~= 'table' or core.is_tensor(list) then
    local got = core.is_tensor(list) and 'a tensor' or type(list)
    error(string.format('%s: expected a list of tensors, got %s', what, got), 0)
  end
  local n = #list
  if n == 0 then error(what .. ': expects a non-empty list of tensors', 0) end
  local arr = ffi.new('ts_tensor*[?]', n)
  for i = 1, n do
    if not core.is_tensor(list[i]) then
      error(string.format('%s: entry %d of the list is a %s, expected a tensor', what, i, type(list[i])), 0)
    end
    arr[i - 1] = handle(list[i], what)
  end
  return arr, n
end

local function opt_dim(dim, default, what)
  if dim == nil then return default end
  return core.int(dim, what)
end

-- A number (or boolean) as a 0-d tensor with t's dtype and device; tensors pass through.
local function as_tensor_like(t, v, what)
  if core.is_tensor(v) then return v end
  if type(v) == 'boolean' then v = v and 1 or 0 end
  if type(v) ~= 'number' then error(string.format('%s: expected a tensor or a number, got %s', what, type(v)), 0) end
  local h = handle(t, what)
  return wrap(C.ts_full(0, nil, v, C.ts_dtype_of(h), C.ts_device_of(h)))
end

-- A fill value: a number, a boolean or a one-element tensor.
local function fill_value(v, what)
  if core.is_tensor(v) then v = Tensor.item(v) end
  if type(v) == 'boolean' then return v and 1 or 0 end
  if type(v) ~= 'number' then error(string.format('%s: value must be a number, got %s', what, type(v)), 0) end
  return v
end

-- ---- joining and splitting -------------------------------------------------------------------
-- T.cat({a, b, ...}, dim = 0): the result has the promoted dtype of the inputs.
function T.cat(list, dim)
  local arr, n = handle_list(list, 'cat')
  return wrap(C.ts_cat(n, arr, opt_dim(dim, 0, 'cat')))
end
T.concat, T.concatenate = T.cat, T.cat

-- T.stack({a, b, ...}, dim = 0): equal shapes, joined along a new dim.
function T.stack(list, dim)
  local arr, n = handle_list(list, 'stack')
  return wrap(C.ts_stack(n, arr, opt_dim(dim, 0, 'stack')))
end

local function wrapped_dim(t, dim, what)
  local nd = Tensor.dim(t)
  if nd == 0 then error(what .. ': cannot split a 0-d tensor', 0) end
  if dim < -nd or dim >= nd then
    error(string.format('%s: dim %d out of range for a tensor with %d dims', what, dim, nd), 0)
  end
  return dim < 0 and dim + nd or dim
end

-- Views of consecutive pieces of `sizes` elements along dim.
local function pieces(t, sizes, dim)
  local out, start = {}, 0
  for i, len in ipairs(sizes) do
    out[i] = Tensor.narrow(t, dim, start, len)
    start = start + len
  end
  return out
end

-- t:split(size, dim = 0): pieces of `size` (the last may be smaller); t:split({s1, s2, ...}, dim):
-- pieces of exactly those sizes. The pieces are views of t.
function Tensor.split(t, size, dim)
  handle(t, 'split')
  dim = wrapped_dim(t, opt_dim(dim, 0, 'split'), 'split')
  local len = Tensor.size(t, dim)
  local sizes = {}
  if type(size) == 'table' then
    local total = 0
    for i, s in ipairs(size) do
      if not core.is_integer(s) or s < 0 then
        error(string.format('split: sizes must be non-negative integers, got %s at position %d', tostring(s), i), 0)
      end
      sizes[i], total = s, total + s
    end
    if total ~= len then
      error(string.format('split: sizes {%s} sum to %d, but dim %d has size %d', table.concat(size, ','), total,
        dim, len), 0)
    end
  else
    core.int(size, 'split')
    if size <= 0 and not (size == 0 and len == 0) then
      error(string.format('split: split size must be positive, got %d', size), 0)
    end
    if len == 0 then return { Tensor.narrow(t, dim, 0, 0) } end
    for start = 0, len - 1, size do sizes[#sizes + 1] = math.min(size, len - start) end
  end
  return pieces(t, sizes, dim)
end

-- t:chunk(n, dim = 0): at most n views of ceil(size / n) elements each, as torch.chunk.
function Tensor.chunk(t, n, dim)
  handle(t, 'chunk')
  core.int(n, 'chunk')
  if n <= 0 then error(string.format('chunk: number of chunks must be positive, got %d', n), 0) end
  dim = wrapped_dim(t, opt_dim(dim, 0, 'chunk'), 'chunk')
  local len = Tensor.size(t, dim)
  if len == 0 then
    local sizes = {}
    for i = 1, n do sizes[i] = 0 end
    return pieces(t, sizes, dim)
  end
  return Tensor.split(t, math.ceil(len / n), dim)
end
T.split, T.chunk = Tensor.split, Tensor.chunk

-- ---- gathering and scattering ----------------------------------------------------------------
-- Index tensors are int64 or int32; negative indices count from the end of their dim.
function Tensor.index_select(t, dim, index)
  return wrap(C.ts_index_select(handle(t, 'index_select'), core.int(dim, 'index_select'),
    handle(index, 'index_select')))
end

function Tensor.gather(t, dim, index)
  return wrap(C.ts_gather(handle(t, 'gather'), core.int(dim, 'gather'), handle(index, 'gather')))
end

-- src may be a number: every indexed element gets it.
local function scatter_src(t, index, src, what)
  if core.is_tensor(src) then return src end
  local scalar = as_tensor_like(t, src, what)
  return Tensor.expand(scalar, core.shape_of(handle(index, what)))
end

local function scatter_op(name, mode, in_place)
  return function(t, dim, index, src)
    local h = handle(t, name)
    core.int(dim, name)
    local s = scatter_src(t, index, src, name)
    if in_place then
      check(C.ts_scatter_(h, dim, handle(index, name), handle(s, name), mode))
      return t
    end
    return wrap(C.ts_scatter(h, dim, handle(index, name), handle(s, name), mode))
  end
end
Tensor.scatter = scatter_op('scatter', C.TS_SCATTER_REPLACE, false)
Tensor.scatter_ = scatter_op('scatter_', C.TS_SCATTER_REPLACE, true)
Tensor.scatter_add = scatter_op('scatter_add', C.TS_SCATTER_ADD, false)
Tensor.scatter_add_ = scatter_op('scatter_add_', C.TS_SCATTER_ADD, true)

-- ---- masks -----------------------------------------------------------------------------------
function Tensor.masked_fill(t, mask, value)
  return wrap(C.ts_masked_fill(handle(t, 'masked_fill'), handle(mask, 'masked_fill'), fill_value(value, 'masked_fill')))
end

function Tensor.masked_fill_(t, mask, value)
  check(C.ts_masked_fill_(handle(t, 'masked_fill_'), handle(mask, 'masked_fill_'), fill_value(value, 'masked_fill_')))
  return t
end

function Tensor.masked_select(t, mask)
  return wrap(C.ts_masked_select(handle(t, 'masked_select'), handle(mask, 'masked_select')))
end

-- t:nonzero(): [nnz, ndim] int64 coordinates; t:nonzero{as_tuple = true}: one 1-D tensor per dim.
function Tensor.nonzero(t, opts)
  local coords = wrap(C.ts_nonzero(handle(t, 'nonzero')))
  if not (type(opts) == 'table' and opts.as_tuple) then return coords end
  local out = {}
  for d = 0, Tensor.dim(t) - 1 do out[d + 1] = Tensor.contiguous(Tensor.select(coords, 1, d)) end
  return out
end
Tensor.argwhere = Tensor.nonzero

-- t:index_put_({i0, i1, ...}, values, accumulate = false): t[i0, i1, ...] = values (or +=).
-- values is a tensor broadcast to the indexed shape, or a number.
function Tensor.index_put_(t, indices, values, accumulate)
  local h = handle(t, 'index_put_')
  local arr, n = handle_list(indices, 'index_put_')
  local v = as_tensor_like(t, values, 'index_put_')
  check(C.ts_index_put_(h, n, arr, handle(v, 'index_put_'), accumulate and 1 or 0))
  return t
end
function Tensor.index_put(t, indices, values, accumulate)
  return Tensor.index_put_(Tensor.clone(t), indices, values, accumulate)
end

-- ---- t[{...}] with tensor entries --------------------------------------------------------------
-- tensor.lua's apply_key has already applied the number and slice entries; `advanced` lists the
-- tensor entries as {dim = d, index = tensor} in the resulting view (a bool mask covers as many
-- dims as it has). As in PyTorch: when the indexed dims are adjacent, the broadcast index dims
-- take their place in the result; otherwise they come first.

-- The view's dims reordered (indexed dims first, in order, then the others), the number of
-- indexed dims, and where the broadcast index dims go in the result (0 when they go first).
local function index_layout(view, advanced)
  local nd = Tensor.dim(view)
  local covered, order = {}, {}
  local adjacent, next_dim = true, advanced[1].dim
  for _, a in ipairs(advanced) do
    local idx = a.index
    handle(idx, 'index')
    local span = idx.dtype == 'bool' and Tensor.dim(idx) or 1
    if a.dim ~= next_dim then adjacent = false end
    if a.dim + span > nd then
      error(string.format('index: too many indices for a tensor of %d dims %s', nd, tostring(view.shape)), 0)
    end
    for d = a.dim, a.dim + span - 1 do covered[d] = true; order[#order + 1] = d end
    next_dim = a.dim + span
  end
  local ncovered = #order
  for d = 0, nd - 1 do
    if not covered[d] then order[#order + 1] = d end
  end
  return order, ncovered, adjacent and advanced[1].dim or 0
end

local function permuted(view, order)
  for i, d in ipairs(order) do
    if d ~= i - 1 then return Tensor.permute(view, order) end
  end
  return view
end

local function index_handles(advanced)
  local arr = ffi.new('ts_tensor*[?]', #advanced)
  for i, a in ipairs(advanced) do arr[i - 1] = handle(a.index, 'index') end
  return arr, #advanced
end

-- The order that moves dims [from, from + count) of an nd-dim tensor to position `to`.
local function move_dims(nd, from, count, to)
  local rest, order = {}, {}
  for d = 0, nd - 1 do
    if d < from or d >= from + count then rest[#rest + 1] = d end
  end
  for i = 1, to do order[#order + 1] = rest[i] end
  for d = from, from + count - 1 do order[#order + 1] = d end
  for i = to + 1, #rest do order[#order + 1] = rest[i] end
  return order
end

-- Runs fn(view reordered as `order`); errors from C name dims of the reordered view, so they are
-- renamed to the caller's dims.
local function on_reordered(view, order, fn)
  local v = permuted(view, order)
  if v == view then return fn(v) end
  local ok, result = pcall(fn, v)
  if ok then return result end
  error((tostring(result):gsub('dim (%d+)', function(d) return 'dim ' .. (order[tonumber(d) + 1] or d) end)), 0)
end

function core.advanced_index(view, advanced)
  local order, ncovered, place = index_layout(view, advanced)
  local arr, n = index_handles(advanced)
  local r = on_reordered(view, order, function(v) return wrap(C.ts_index(handle(v, 'index'), n, arr)) end)
  if place == 0 then return r end
  -- r is the index dims followed by the dims no index covers; the index dims go to `place`
  local nb = Tensor.dim(r) - (#order - ncovered)
  return Tensor.contiguous(Tensor.permute(r, move_dims(Tensor.dim(r), 0, nb, place)))
end

-- Broadcasts Lua shapes together (PyTorch rules), or raises `what`'s error.
local function broadcast_shapes(shapes, what)
  local nd = 0
  for _, s in ipairs(shapes) do nd = math.max(nd, #s) end
  local out = {}
  for i = 1, nd do
    local size = 1
    for _, s in ipairs(shapes) do
      local v = s[#s - nd + i] or 1
      if v ~= 1 then
        if size ~= 1 and size ~= v then
          local names = {}
          for k, sh in ipairs(shapes) do names[k] = '[' .. table.concat(sh, ',') .. ']' end
          error(string.format('%s: shapes %s cannot be broadcast together', what, table.concat(names, ', ')), 0)
        end
        size = v
      end
    end
    out[i] = size
  end
  return out
end

-- The shape of the broadcast index dims (a bool mask stands for its count of true elements).
local function index_shape(advanced)
  local shapes = {}
  for i, a in ipairs(advanced) do
    if a.index.dtype == 'bool' then
      shapes[i] = { Tensor.size(Tensor.nonzero(a.index), 0) }
    else
      shapes[i] = core.shape_of(a.index.h)
    end
  end
  return broadcast_shapes(shapes, 'index assignment')
end

-- values laid out as the result of t[{...}] would be, rearranged into the layout index_put_ takes
-- (index dims first).
local function values_for_put(view, advanced, value, order, ncovered, place)
  if place == 0 or Tensor.dim(value) == 0 then return value end
  local b = index_shape(advanced)
  local layout = {}
  for i = 1, place do layout[#layout + 1] = Tensor.size(view, order[ncovered + i]) end
  for _, s in ipairs(b) do layout[#layout + 1] = s end
  for i = ncovered + place + 1, #order do layout[#layout + 1] = Tensor.size(view, order[i]) end
  local fits = broadcast_shapes({ core.shape_of(value.h), layout }, 'index assignment')
  if #fits ~= #layout or table.concat(fits, ',') ~= table.concat(layout, ',') then
    error(string.format('index assignment: values of shape %s cannot be broadcast to the indexed shape [%s]',
      tostring(value.shape), table.concat(layout, ',')), 0)
  end
  local full = Tensor.expand(value, layout)
  return Tensor.permute(full, move_dims(#layout, place, #b, 0))
end

-- A bool mask over the whole view with a number value is masked_fill_.
local function is_whole_mask(view, advanced)
  if #advanced ~= 1 or advanced[1].dim ~= 0 then return false end
  local m = advanced[1].index
  return m.dtype == 'bool' and table.concat(core.shape_of(m.h), ',') == table.concat(core.shape_of(view.h), ',')
    and Tensor.dim(m) > 0
end

function core.advanced_index_put(view, advanced, value)
  if type(value) == 'boolean' then value = value and 1 or 0 end
  if type(value) == 'number' and is_whole_mask(view, advanced) then
    return Tensor.masked_fill_(view, advanced[1].index, value)
  end
  local order, ncovered, place = index_layout(view, advanced)
  local v = as_tensor_like(view, value, 'index assignment')
  if v.dtype ~= view.dtype then v = Tensor.to(v, view.dtype) end   -- t[i] = x casts x, as in PyTorch
  v = values_for_put(view, advanced, v, order, ncovered, place)
  local arr, n = index_handles(advanced)
  local hv = handle(v, 'index assignment')
  on_reordered(view, order, function(pv) check(C.ts_index_put_(handle(pv, 'index assignment'), n, arr, hv, 0)) end)
end

-- ---- sorting ---------------------------------------------------------------------------------
-- t:sort(dim = -1, descending = false) → values, indices; or t:sort{dim =, descending =, stable =}.
-- NaN sorts as the largest value; equal values keep their order (the sort is always stable).
local function sort_args(dim, descending, what)
  local stable = false
  if type(dim) == 'table' then
    dim, descending, stable = dim.dim, dim.descending, dim.stable
  end
  return opt_dim(dim, -1, what), descending and 1 or 0, stable and 1 or 0
end

function Tensor.sort(t, dim, descending)
  local d, desc, stable = sort_args(dim, descending, 'sort')
  local v, i = ffi.new('ts_tensor*[1]'), ffi.new('ts_tensor*[1]')
  check(C.ts_sort(handle(t, 'sort'), d, desc, stable, v, i))
  return wrap(v[0]), wrap(i[0])
end

function Tensor.argsort(t, dim, descending)
  local _, indices = Tensor.sort(t, dim, descending)
  return indices
end

-- t:topk(k, dim = -1, largest = true, sorted = true) → values, indices. Ties go to the lower
-- index; sorted = false returns the same elements in no particular order.
function Tensor.topk(t, k, dim, largest, sorted)
  if type(dim) == 'table' then
    dim, largest, sorted = dim.dim, dim.largest, dim.sorted
  end
  local v, i = ffi.new('ts_tensor*[1]'), ffi.new('ts_tensor*[1]')
  check(C.ts_topk(handle(t, 'topk'), core.int(k, 'topk'), opt_dim(dim, -1, 'topk'), largest ~= false and 1 or 0,
    sorted ~= false and 1 or 0, v, i))
  return wrap(v[0]), wrap(i[0])
end

-- ---- functional aliases ----------------------------------------------------------------------
for _, name in ipairs { 'index_select', 'gather', 'scatter', 'scatter_add', 'masked_fill', 'masked_select',
  'nonzero', 'argwhere', 'index_put', 'index_put_', 'sort', 'argsort', 'topk' } do
  T[name] = Tensor[name]
end

return T
