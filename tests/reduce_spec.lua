-- reduce_spec.lua — reductions against plain-Lua float64 references: sum, mean, prod, amax, amin,
-- all, any, var, std, norm, max/min (values and indices), argmax/argmin; dim sets, negative dims,
-- keepdim, non-contiguous and broadcast inputs, dtypes, empty tensors, NaN, the parallel paths,
-- and bad input.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'

local NAN = 0 / 0

-- ---- references --------------------------------------------------------------------------------
local function values_of(t)
  local flat = S.flatten({ t:totable() })
  for i, v in ipairs(flat) do
    if type(v) == 'boolean' then flat[i] = v and 1 or 0 end
  end
  return flat
end

local function shape_str(shape)
  local parts = {}
  for i = 1, #shape do parts[i] = tostring(shape[i]) end
  return '[' .. table.concat(parts, ',') .. ']'
end

local function assert_shape(t, shape, what)
  assert.equal(shape_str(shape), shape_str(t.shape), what)
end

-- For each output (row-major over the kept dims) the flat positions of the values it reduces, in
-- input order; plus the result shapes without and with keepdim. dims nil or {} means every dim.
local function groups(shape, dims)
  local nd, red = #shape, {}
  if dims == nil or #dims == 0 then
    for d = 1, nd do red[d] = true end
  else
    for _, d in ipairs(dims) do red[(d < 0 and d + nd or d) + 1] = true end
  end
  local out_shape, keep_shape, nout = {}, {}, 1
  for d = 1, nd do
    keep_shape[d] = red[d] and 1 or shape[d]
    if not red[d] then
      out_shape[#out_shape + 1] = shape[d]
      nout = nout * shape[d]
    end
  end
  local g, n = {}, 1
  for o = 1, nout do g[o] = {} end
  for d = 1, nd do n = n * shape[d] end
  for lin = 0, n - 1 do
    local rem, idx = lin, {}
    for d = nd, 1, -1 do
      idx[d] = rem % shape[d]
      rem = (rem - idx[d]) / shape[d]
    end
    local o = 0
    for d = 1, nd do
      if not red[d] then o = o * shape[d] + idx[d] end
    end
    local list = g[o + 1]
    list[#list + 1] = lin + 1
  end
  return g, out_shape, keep_shape
end

local ref = {}
function ref.sum(v) local s = 0; for _, x in ipairs(v) do s = s + x end; return s end
function ref.mean(v) return ref.sum(v) / #v end
function ref.prod(v) local s = 1; for _, x in ipairs(v) do s = s * x end; return s end
function ref.amax(v)
  local m = -math.huge
  for _, x in ipairs(v) do if x ~= x then return NAN end; if x > m then m = x end end
  return m
end
function ref.amin(v)
  local m = math.huge
  for _, x in ipairs(v) do if x ~= x then return NAN end; if x < m then m = x end end
  return m
end
function ref.all(v) for _, x in ipairs(v) do if x == 0 then return false end end; return true end
function ref.any(v) for _, x in ipairs(v) do if x ~= 0 then return true end end; return false end
function ref.var(v, correction)
  local mean = ref.mean(v)
  local ss = 0
  for _, x in ipairs(v) do ss = ss + (x - mean) ^ 2 end
  return ss / math.max(0, #v - (correction or 1))
end
function ref.norm(v, p)
  if p == math.huge then local m = 0; for _, x in ipairs(v) do m = math.max(m, math.abs(x)) end; return m end
  if p == -math.huge then local m = math.huge; for _, x in ipairs(v) do m = math.min(m, math.abs(x)) end; return m end
  if p == 0 then local c = 0; for _, x in ipairs(v) do if x ~= 0 then c = c + 1 end end; return c end
  local s = 0
  for _, x in ipairs(v) do s = s + math.abs(x) ^ p end
  return s ^ (1 / p)
end

-- The reference result of fn over `dims` of values `flat` laid out in `shape`.
local function reference(flat, shape, dims, fn, ...)
  local g, out_shape, keep_shape = groups(shape, dims)
  local out = {}
  for o, positions in ipairs(g) do
    local vals = {}
    for i, p in ipairs(positions) do vals[i] = flat[p] end
    out[o] = fn(vals, ...)
  end
  return out, out_shape, keep_shape
end

-- Random inputs of a dtype, with their stored values (so float32 rounding is in the reference).
local function random_tensor(shape, seed, dtype)
  local t = S.rand_tensor(shape, seed)
  if dtype == 'int64' or dtype == 'int32' then t = (t * 10):floor():to(dtype)
  elseif dtype == 'uint8' then t = (t:abs() * 10):floor():to(dtype)
  elseif dtype == 'bool' then t = t:gt(0.2)
  elseif dtype ~= 'float64' then t = t:to(dtype) end
  return t, values_of(t)
end

-- Layouts with the same values: contiguous, transposed in memory, a strided slice of a bigger one.
local function layouts(t)
  local shape = t.shape
  shape[#shape] = shape[#shape] * 2
  local sliced = T.zeros(shape, { dtype = t.dtype }):slice(-1, 0, nil, 2)
  sliced:copy_(t)
  return { contiguous = t, transposed = S.noncontiguous(t), sliced = sliced }
end

local DIM_SETS = { false, { 0 }, { 1 }, { -1 }, { 0, 2 }, { 2, 0 }, { -3, -2 }, { 0, 1, 2 } }

local function call_reduce(t, name, dims, keepdim)
  if not dims then return keepdim and t[name](t, { keepdim = true }) or t[name](t) end
  if #dims == 1 then return t[name](t, dims[1], keepdim) end
  return t[name](t, { dim = dims, keepdim = keepdim })
end

-- ---- sum, mean, prod, amax, amin ------------------------------------------------------------------
describe('sum, mean, prod, amax, amin', function()
  it('match the reference over every dim set, with and without keepdim, on any layout', function()
    for _, dtype in ipairs { 'float64', 'float32' } do
      local base, flat = random_tensor({ 3, 4, 5 }, 7, dtype)
      for layout, t in each(layouts(base)) do
        for _, dims in ipairs(DIM_SETS) do
          for _, name in ipairs { 'sum', 'mean', 'prod', 'amax', 'amin' } do
            for _, keepdim in ipairs { false, true } do
              local what = string.format('%s %s %s dims %s keepdim %s', dtype, layout, name,
                dims and shape_str(dims) or 'all', tostring(keepdim))
              local expected, out_shape, keep_shape = reference(flat, { 3, 4, 5 }, dims or nil, ref[name])
              local got = call_reduce(t, name, dims, keepdim)
              assert.equal(dtype, got.dtype, what)
              assert_shape(got, keepdim and keep_shape or out_shape, what)
              assert.is_true(got:is_contiguous(), what)
              S.assert_close(got, expected, dtype == 'float64' and 1e-12 or 2e-6, 1e-7, what)
            end
          end
        end
      end
    end
  end)

  it('reduce broadcast (expanded) inputs and 0-d tensors', function()
    local row = T.tensor({ 1, 2, 3 }, { dtype = 'float64' })
    local e = row:view(1, 3):expand(4, 3)
    S.assert_close(e:sum(0), { 4, 8, 12 })
    S.assert_close(e:sum(1), { 6, 6, 6, 6 })
    S.assert_close(e:prod(), 1296)
    local s = T.tensor(5, { dtype = 'float64' })
    for _, name in ipairs { 'sum', 'mean', 'prod', 'amax', 'amin' } do
      assert.equal(5, s[name](s):item())
      assert.equal(5, s[name](s, 0):item())
      assert.equal(0, s[name](s, -1, true):dim())
    end
  end)

  it('are also functions of the namespace and accept {} as every dim', function()
    local t = T.tensor({ { 1, 2 }, { 3, 4 } })
    assert.equal(10, T.sum(t):item())
    assert.equal(2.5, T.mean(t, { 0, 1 }):item())
    assert.equal(10, t:sum({}):item())
    assert.equal(24, T.prod(t):item())
    S.assert_close(T.amax(t, 1, true), { { 2 }, { 4 } })
  end)

  it('give int64 sums and products of integers and bools, keep the dtype for amax/amin', function()
    for _, dtype in ipairs { 'int64', 'int32', 'uint8', 'bool' } do
      local t, flat = random_tensor({ 4, 6 }, 3, dtype)
      for _, dims in ipairs { false, { 0 }, { -1 } } do
        local s = call_reduce(t, 'sum', dims)
        assert.equal('int64', s.dtype, dtype)
        S.assert_close(s, (reference(flat, { 4, 6 }, dims or nil, ref.sum)), 0, 0, dtype .. ' sum')
        local p = call_reduce(S.noncontiguous(t), 'prod', dims)
        assert.equal('int64', p.dtype)
        S.assert_close(p, (reference(flat, { 4, 6 }, dims or nil, ref.prod)), 0, 0, dtype .. ' prod')
        local hi, lo = call_reduce(t, 'amax', dims), call_reduce(t, 'amin', dims)
        assert.equal(dtype, hi.dtype)
        assert.equal(dtype, lo.dtype)
        local exp_hi = reference(flat, { 4, 6 }, dims or nil, ref.amax)
        local exp_lo = reference(flat, { 4, 6 }, dims or nil, ref.amin)
        if dtype == 'bool' then
          for i = 1, #exp_hi do exp_hi[i], exp_lo[i] = exp_hi[i] ~= 0, exp_lo[i] ~= 0 end
        end
        S.assert_close(hi, exp_hi, 0, 0, dtype .. ' amax')
        S.assert_close(lo, exp_lo, 0, 0, dtype .. ' amin')
      end
    end
  end)

  it('sum int64 exactly, wrapping on overflow like PyTorch', function()
    local big = T.tensor({ 2 ^ 40, 3, 2 ^ 41 + 1 }, { dtype = 'int64' })
    assert.equal(2 ^ 40 + 2 ^ 41 + 4, big:sum():item())
    local max = T.full({ 2 }, 2 ^ 62, { dtype = 'int64' })
    assert.equal(-2 ^ 63, max:sum():item()) -- 2^63 wraps to -2^63
  end)

  it('sum and mean float16/bfloat16 in float32 and return the input dtype', function()
    for _, dtype in ipairs { 'float16', 'bfloat16' } do
      local t, flat = random_tensor({ 5, 7 }, 11, dtype)
      local s = t:sum(1)
      assert.equal(dtype, s.dtype)
      S.assert_close(s, (reference(flat, { 5, 7 }, { 1 }, ref.sum)), 1e-2, 1e-2, dtype)
      assert.equal(dtype, t:mean().dtype)
      S.assert_close(t:mean(), ref.mean(flat), 1e-2, 1e-2, dtype)
      assert.equal(dtype, t:amax(0).dtype)
    end
  end)

  it('take a dtype option, converting before reducing', function()
    local t = T.tensor({ 1, 2, 4 }, { dtype = 'int64' })
    local m = t:mean{ dtype = 'float64' }
    assert.equal('float64', m.dtype)
    assert.equal(7 / 3, m:item())
    assert.equal('float32', t:sum{ dim = 0, dtype = 'float32' }.dtype)
    assert.equal('float64', t:prod(0, { dtype = 'float64' }).dtype)
  end)

  it('give the identity over empty dims and refuse amax/amin there', function()
    local e = T.zeros(2, 0, 3)
    S.assert_close(e:sum(1), { { 0, 0, 0 }, { 0, 0, 0 } })
    S.assert_close(e:prod(1), { { 1, 1, 1 }, { 1, 1, 1 } })
    S.assert_close(e:mean(1), { { NAN, NAN, NAN }, { NAN, NAN, NAN } })
    assert.equal(0, e:sum():item())
    assert.equal(1, e:prod():item())
    assert.is_true(e:mean():item() ~= e:mean():item())
    assert_shape(e:sum(2), { 2, 0 })
    assert_shape(e:amax(2), { 2, 0 })      -- reducing a non-empty dim of an empty tensor is fine
    assert_shape(e:sum(1, true), { 2, 1, 3 })
    assert.equal('int64', T.zeros({ 0 }, { dtype = 'bool' }):sum().dtype)
    S.assert_error(function() e:amax(1) end, 'amax', 'dim 1 of size 0', '[2,0,3]')
    S.assert_error(function() e:amin() end, 'amin', 'empty tensor [2,0,3]')
    S.assert_error(function() T.zeros(0):amax() end, 'amax', 'size 0')
  end)

  it('propagate NaN through sum, amax and amin', function()
    local t = T.tensor({ { 1, NAN, 3 }, { 4, 5, 6 } }, { dtype = 'float64' })
    S.assert_close(t:amax(1), { NAN, 6 })
    S.assert_close(t:amin(1), { NAN, 4 })
    S.assert_close(t:amax(0), { 4, NAN, 6 })
    S.assert_close(t:sum(1), { NAN, 15 })
    assert.is_true(t:amax():item() ~= t:amax():item())
    assert.is_true(t:float():amin():item() ~= t:float():amin():item())
    local first = T.tensor({ NAN, 1, 2 })
    assert.is_true(first:amax():item() ~= first:amax():item())
    S.assert_close(T.tensor({ -math.huge, 2 }):amax(), 2)
    S.assert_close(T.tensor({ math.huge, 2 }):amin(), 2)
  end)
end)

-- ---- all, any ----------------------------------------------------------------------------------
describe('all and any', function()
  it('match the reference for bool, uint8, int and float inputs, giving bool', function()
    local spec = {
      bool = T.tensor({ { true, true, false }, { true, true, true } }),
      uint8 = T.tensor({ { 1, 2, 0 }, { 3, 4, 5 } }, { dtype = 'uint8' }),
      int64 = T.tensor({ { 1, -2, 0 }, { 3, 4, 5 } }, { dtype = 'int64' }),
      float32 = T.tensor({ { 0.5, -2, 0 }, { NAN, 4, -0.0 } }),
      float64 = T.tensor({ { 0.5, -2, 0 }, { NAN, 4, 1 } }, { dtype = 'float64' }),
      float16 = T.tensor({ { 0.5, -2, 0 }, { 1, 4, 1 } }, { dtype = 'float16' }),
    }
    for dtype, t in each(spec) do
      local flat = values_of(t)
      for _, layout in ipairs { t, S.noncontiguous(t) } do
        for _, dims in ipairs { false, { 0 }, { 1 }, { -1 }, { 0, 1 } } do
          for _, name in ipairs { 'all', 'any' } do
            local got = call_reduce(layout, name, dims)
            assert.equal('bool', got.dtype, dtype)
            S.assert_close(got, (reference(flat, { 2, 3 }, dims or nil, ref[name])), 0, 0, dtype .. ' ' .. name)
          end
        end
      end
    end
  end)

  it('give true/false over empty dims and keep dims on request', function()
    local e = T.zeros({ 3, 0 }, { dtype = 'bool' })
    assert.same({ true, true, true }, e:all(1):totable())
    assert.same({ false, false, false }, e:any(1):totable())
    assert.is_true(e:all():item())
    assert.is_false(e:any():item())
    assert_shape(T.ones(2, 3):all(1, true), { 2, 1 })
    assert_shape(T.ones(2, 3):any{ dim = { 0, 1 }, keepdim = true }, { 1, 1 })
  end)
end)

-- ---- var, std ----------------------------------------------------------------------------------
describe('var and std', function()
  it('match the two-pass reference for every dim set, correction and layout', function()
    for _, dtype in ipairs { 'float64', 'float32' } do
      local base, flat = random_tensor({ 3, 4, 5 }, 5, dtype)
      for layout, t in each(layouts(base)) do
        for _, dims in ipairs(DIM_SETS) do
          for _, correction in ipairs { 1, 0, 2 } do
            local what = string.format('%s %s dims %s correction %d', dtype, layout, dims and shape_str(dims) or 'all', correction)
            local expected, out_shape, keep_shape = reference(flat, { 3, 4, 5 }, dims or nil, ref.var, correction)
            local v = t:var{ dim = dims or nil, correction = correction }
            assert.equal(dtype, v.dtype, what)
            assert_shape(v, out_shape, what)
            S.assert_close(v, expected, dtype == 'float64' and 1e-10 or 1e-5, 1e-7, what)
            local sd = t:std{ dim = dims or nil, correction = correction, keepdim = true }
            assert_shape(sd, keep_shape, what)
            for i = 1, #expected do expected[i] = math.sqrt(expected[i]) end
            S.assert_close(sd, expected, dtype == 'float64' and 1e-10 or 1e-5, 1e-7, what)
          end
        end
      end
    end
  end)

  it('take unbiased positionally, as an option or alone, and keepdim', function()
    local t, flat = random_tensor({ 4, 6 }, 9, 'float64')
    local biased = reference(flat, { 4, 6 }, { 1 }, ref.var, 0)
    local unbiased = reference(flat, { 4, 6 }, { 1 }, ref.var, 1)
    S.assert_close(t:var(1), unbiased, 1e-12)
    S.assert_close(t:var(1, false), biased, 1e-12)
    S.assert_close(t:var(1, { unbiased = false }), biased, 1e-12)
    S.assert_close(t:var{ dim = 1, unbiased = false }, biased, 1e-12)
    S.assert_close(t:var(-1, true, true), unbiased, 1e-12)
    assert_shape(t:var(-1, true, true), { 4, 1 })
    assert_shape(t:std(1, { keepdim = true }), { 4, 1 })
    S.assert_close(t:var(false), ref.var(flat, 0), 1e-12)
    S.assert_close(T.std(t), math.sqrt(ref.var(flat, 1)), 1e-12)
  end)

  it('stay accurate for values with a large common offset', function()
    local vals = {}
    for i = 1, 1000 do vals[i] = 1e9 + (i % 7) end
    local t = T.tensor(vals, { dtype = 'float64' })
    S.assert_close(t:var(), ref.var(vals, 1), 1e-9)
  end)

  it('give NaN for one element with correction 1, and for empty dims', function()
    local v = T.tensor({ 3 }, { dtype = 'float64' }):var()
    assert.is_true(v:item() ~= v:item())
    assert.equal(0, T.tensor({ 3 }):var(0, false):item())
    S.assert_close(T.zeros(2, 0):var(1), { NAN, NAN })
    S.assert_close(T.tensor({ 1, 2 }):var{ correction = 2 }, math.huge) -- x/0
    S.assert_close(T.tensor({ 1, NAN, 2 }):std(), NAN)
    S.assert_close(T.tensor({ 1, math.huge }):var(), NAN)
  end)

  it('reject integer inputs and conflicting arguments', function()
    S.assert_error(function() T.tensor({ 1, 2 }, { dtype = 'int64' }):var() end, 'var', 'floating point', 'int64')
    S.assert_error(function() T.tensor({ true }):std() end, 'std', 'bool')
    S.assert_error(function() T.ones(3):var{ unbiased = false, correction = 0 } end, 'var', 'not both')
    S.assert_error(function() T.ones(3):var{ correction = 0.5 } end, 'var correction', 'integer')
    S.assert_error(function() T.ones(3):var(0, 'yes') end, 'var', 'unbiased must be a boolean')
    S.assert_error(function() T.ones(3):var{ ddof = 1 } end, "unknown option 'ddof'")
  end)
end)

-- ---- norm --------------------------------------------------------------------------------------
describe('norm', function()
  it('matches the reference for p = 2, 1, 0, 3, 0.5, -1, inf and -inf over dim sets', function()
    for _, dtype in ipairs { 'float64', 'float32' } do
      local base, flat = random_tensor({ 3, 4, 5 }, 13, dtype)
      for layout, t in each(layouts(base)) do
        for _, dims in ipairs { false, { 1 }, { -1 }, { 0, 2 } } do
          for _, p in ipairs { 2, 1, 0, 3, 0.5, -1, math.huge, -math.huge } do
            local what = string.format('%s %s p %s dims %s', dtype, layout, tostring(p), dims and shape_str(dims) or 'all')
            local expected, out_shape = reference(flat, { 3, 4, 5 }, dims or nil, ref.norm, p)
            local got = t:norm(p, dims or nil)
            assert.equal(dtype, got.dtype, what)
            assert_shape(got, out_shape, what)
            S.assert_close(got, expected, dtype == 'float64' and 1e-10 or 1e-5, 1e-7, what)
          end
        end
      end
    end
  end)

  it('defaults to 2, takes named orders, options and keepdim', function()
    local t = T.tensor({ { 3, -4 }, { 0, 12 } }, { dtype = 'float64' })
    assert.equal(13, t:norm():item())
    assert.equal(13, T.norm(t, 'fro'):item())
    S.assert_close(t:norm(2, 1), { 5, 12 })
    S.assert_close(t:norm('inf', 1), { 4, 12 })
    S.assert_close(t:norm('-inf', 0), { 0, 4 })
    S.assert_close(t:norm(0, 1), { 2, 1 })
    S.assert_close(t:norm(1, 0, true), { { 3, 16 } })
    assert_shape(t:norm{ p = 1, dim = 0, keepdim = true }, { 1, 2 })
    S.assert_close(t:norm(1, { dim = 1 }), { 7, 12 })
    S.assert_close(t:half():norm(), 13, 1e-3)
  end)

  it('propagates NaN, gives 0 over empty dims, and refuses inf/negative orders there', function()
    S.assert_close(T.tensor({ 1, NAN }):norm(), NAN)
    S.assert_close(T.tensor({ 1, NAN }):norm(math.huge), NAN)
    S.assert_close(T.zeros(2, 0):norm(2, 1), { 0, 0 })
    assert.equal(0, T.zeros(0):norm(1):item())
    S.assert_error(function() T.zeros(2, 0):norm(math.huge, 1) end, 'norm', 'inf-norm', 'size 0')
    S.assert_error(function() T.zeros(0):norm(-1) end, 'norm', '-1-norm')
  end)

  it('rejects integer inputs and bad orders', function()
    S.assert_error(function() T.tensor({ 1 }, { dtype = 'int64' }):norm() end, 'norm', 'floating point', 'int64')
    S.assert_error(function() T.ones(2):norm(0 / 0) end, 'norm', 'nan')
    S.assert_error(function() T.ones(2, 2):norm('nuc') end, 'nuclear')
    S.assert_error(function() T.ones(2):norm('two') end, 'norm', 'two')
    S.assert_error(function() T.ones(2):norm{ q = 1 } end, "unknown option 'q'")
  end)
end)

-- ---- max, min, argmax, argmin ------------------------------------------------------------------
-- Reference extreme along one dim: values and first indices.
local function ref_extreme(flat, shape, dim, largest)
  local g, out_shape, keep_shape = groups(shape, { dim })
  local vals, idx = {}, {}
  for o, positions in ipairs(g) do
    local best, at = nil, nil
    for i, p in ipairs(positions) do
      local x = flat[p]
      if best == nil or (best == best and (x ~= x or (largest and x > best) or (not largest and x < best))) then
        best, at = x, i - 1
      end
    end
    vals[o], idx[o] = best, at
  end
  return vals, idx, out_shape, keep_shape
end

describe('max and min', function()
  it('reduce everything to a 0-d tensor, or compare elementwise with another tensor', function()
    local t = T.tensor({ { 1, 7 }, { -3, 4 } })
    assert.equal(7, t:max():item())
    assert.equal(-3, T.min(t):item())
    assert.equal(0, t:max():dim())
    S.assert_close(t:max(T.tensor({ 2, 5 })), { { 2, 7 }, { 2, 5 } })
    S.assert_close(t:min(T.tensor({ 2, 5 })), { { 1, 5 }, { -3, 4 } })
    local n = T.tensor({ 1, NAN, 2 })
    assert.is_true(n:max():item() ~= n:max():item())
  end)

  it('along a dim give values and first indices matching the reference, on any layout', function()
    for _, dtype in ipairs { 'float64', 'float32', 'int64' } do
      local base, flat = random_tensor({ 3, 4, 5 }, 17, dtype)
      for layout, t in each(layouts(base)) do
        for _, dim in ipairs { 0, 1, 2, -1, -3 } do
          for _, largest in ipairs { true, false } do
            for _, keepdim in ipairs { false, true } do
              local what = string.format('%s %s dim %d %s keepdim %s', dtype, layout, dim, largest and 'max' or 'min', tostring(keepdim))
              local vals, idx, out_shape, keep_shape = ref_extreme(flat, { 3, 4, 5 }, dim, largest)
              local v, i = t[largest and 'max' or 'min'](t, dim, keepdim)
              assert.equal(dtype, v.dtype, what)
              assert.equal('int64', i.dtype, what)
              assert_shape(v, keepdim and keep_shape or out_shape, what)
              assert_shape(i, keepdim and keep_shape or out_shape, what)
              S.assert_close(v, vals, 0, 0, what)
              S.assert_close(i, idx, 0, 0, what)
              local ai = t[largest and 'argmax' or 'argmin'](t, dim, keepdim)
              S.assert_close(ai, idx, 0, 0, what .. ' arg')
              assert_shape(ai, keepdim and keep_shape or out_shape, what)
            end
          end
        end
      end
    end
  end)

  it('pick the first of tied extremes and the first NaN', function()
    local t = T.tensor({ { 2, 5, 5, 1 }, { 1, 1, 0, 0 } }, { dtype = 'int64' })
    local v, i = t:max(1)
    assert.same({ 5, 1 }, v:totable())
    assert.same({ 1, 0 }, i:totable())
    local _, j = t:min(1)
    assert.same({ 3, 2 }, j:totable())
    local n = T.tensor({ 1, NAN, 3, NAN })
    local nv, ni = n:max(0)
    assert.is_true(nv:item() ~= nv:item())
    assert.equal(1, ni:item())
    local _, mi = n:min(0)
    assert.equal(1, mi:item())
    assert.equal(1, n:argmax():item())
    assert.equal(1, n:argmin():item())
  end)

  it('work on bool, uint8, int32 and half inputs, keeping their dtype', function()
    local b = T.tensor({ { false, true }, { false, false } })
    local v, i = b:max(1)
    assert.equal('bool', v.dtype)
    assert.same({ true, false }, v:totable())
    assert.same({ 1, 0 }, i:totable())
    local u = T.tensor({ 3, 9, 200 }, { dtype = 'uint8' })
    assert.equal('uint8', u:max().dtype)
    assert.equal(200, u:max():item())
    local w, k = T.tensor({ 4, -8, 6 }, { dtype = 'int32' }):min(0)
    assert.equal('int32', w.dtype)
    assert.equal(-8, w:item())
    assert.equal(1, k:item())
    assert.equal('float16', T.tensor({ 1, 2 }, { dtype = 'float16' }):max(0).dtype)
  end)

  it('accept an options table and 0-d tensors', function()
    local t = T.tensor({ { 1, 7 }, { 9, 4 } })
    local v, i = t:max{ dim = 0, keepdim = true }
    assert_shape(v, { 1, 2 })
    assert.same({ { 1, 0 } }, i:totable())
    local s = T.tensor(3)
    local sv, si = s:max(0)
    assert.equal(0, sv:dim())
    assert.equal(3, sv:item())
    assert.equal(0, si:item())
    local kv = s:min(-1, true)
    assert.equal(0, kv:dim())
    assert.equal(0, s:argmax():item())
    assert.equal(0, s:argmax(0, true):dim())
  end)

  it('refuse empty inputs without a dim and empty dims, naming the op', function()
    S.assert_error(function() T.zeros(0, 3):max() end, 'max', 'empty tensor [0,3]')
    S.assert_error(function() T.zeros(0):min() end, 'min', 'empty')
    S.assert_error(function() T.zeros(2, 0):max(1) end, 'max', 'dim 1 of size 0')
    S.assert_error(function() T.zeros(2, 0):argmin(1) end, 'argmin', 'size 0')
    S.assert_error(function() T.zeros(0, 2):argmax() end, 'argmax', 'empty tensor [0,2]')
    local v, i = T.zeros(0, 3):max(1)
    assert_shape(v, { 0 })
    assert_shape(i, { 0 })
    S.assert_error(function() T.ones(2):max{ keepdim = true } end, 'max', 'keepdim needs a dim')
  end)
end)

describe('argmax and argmin', function()
  it('index the flattened tensor without a dim, row-major even for non-contiguous inputs', function()
    local t, flat = random_tensor({ 5, 6 }, 23, 'float32')
    for _, layout in ipairs { t, S.noncontiguous(t) } do
      local best, at, worst, wat = -math.huge, 0, math.huge, 0
      for k, x in ipairs(flat) do
        if x > best then best, at = x, k - 1 end
        if x < worst then worst, wat = x, k - 1 end
      end
      assert.equal(at, layout:argmax():item())
      assert.equal(wat, T.argmin(layout):item())
      assert.equal('int64', layout:argmax().dtype)
      assert_shape(layout:argmax(), {})
      assert_shape(layout:argmax(nil, true), { 1, 1 })
      assert_shape(layout:argmax{ keepdim = true }, { 1, 1 })
    end
  end)
end)

-- ---- the parallel paths and accuracy ---------------------------------------------------------------
describe('large reductions', function()
  it('sum float32 over all elements with float64 accuracy (the split path)', function()
    local n = 300000
    local t, flat = S.rand_tensor({ n }, 31)
    local f = t:float()
    local exact = 0
    for _, x in ipairs(values_of(f)) do exact = exact + x end
    S.assert_close(f:sum(), exact, 1e-6)
    S.assert_close(f:mean(), exact / n, 1e-6)
    S.assert_close(t:sum(), ref.sum(flat), 1e-12)
    S.assert_close(t:var(), ref.var(flat), 1e-10)
    S.assert_close(t:norm(), ref.norm(flat, 2), 1e-12)
    S.assert_close(t:norm(math.huge), ref.norm(flat, math.huge), 0)
    S.assert_close(S.noncontiguous(t:view(600, 500)):sum(), ref.sum(flat), 1e-12)
    local ints = T.arange(n)
    assert.equal(n * (n - 1) / 2, ints:sum():item())
    assert.equal(n - 1, ints:amax():item())
    assert.is_true(ints:ge(0):all():item())
    assert.is_false(ints:gt(0):all():item())
  end)

  it('split a few long rows across threads, tiled or not', function()
    local rows, cols = 3, 100000
    local t, flat = S.rand_tensor({ rows, cols }, 37)
    S.assert_close(t:sum(1), (reference(flat, { rows, cols }, { 1 }, ref.sum)), 1e-12)
    local tt = t:t():contiguous() -- [cols, rows]: reducing dim 0 tiles the rows
    S.assert_close(tt:sum(0), (reference(flat, { rows, cols }, { 1 }, ref.sum)), 1e-12)
    S.assert_close(tt:var(0), (reference(flat, { rows, cols }, { 1 }, ref.var)), 1e-9)
    S.assert_close(tt:amin(0), (reference(flat, { rows, cols }, { 1 }, ref.amin)), 0)
    local _, i = tt:max(0)
    local _, idx = ref_extreme(flat, { rows, cols }, 1, true)
    assert.same(idx, i:totable())
  end)

  it('keep the first index of tied maxima far apart in a long argmax', function()
    local t = T.zeros(400000)
    t[399999] = 5
    t[150001] = 5
    t[200000] = 5
    assert.equal(150001, t:argmax():item())
    t[10] = -1
    t[390000] = -1
    assert.equal(10, t:argmin():item())
    t[300000] = NAN
    assert.equal(300000, t:argmax():item())
  end)

  it('reduce over dim 0 of a wide matrix in tiles, with many outputs', function()
    local t, flat = S.rand_tensor({ 300, 130 }, 41)
    for _, name in ipairs { 'sum', 'prod', 'amax', 'amin' } do
      S.assert_close(t[name](t, 0), (reference(flat, { 300, 130 }, { 0 }, ref[name])), 1e-12, 1e-300, name)
    end
    S.assert_close(t:var(0), (reference(flat, { 300, 130 }, { 0 }, ref.var)), 1e-10)
    S.assert_close(t:norm(1, 0), (reference(flat, { 300, 130 }, { 0 }, ref.norm, 1)), 1e-12)
    local _, i = t:min(0)
    local _, idx = ref_extreme(flat, { 300, 130 }, 0, false)
    assert.same(idx, i:totable())
    local many = T.ones(70000, 3)
    S.assert_close(many:sum(1), T.full({ 70000 }, 3))
  end)
end)

-- ---- bad input -----------------------------------------------------------------------------------
describe('bad input', function()
  it('gives clear errors for bad dims, options and tensors', function()
    local t = T.ones(2, 3)
    S.assert_error(function() t:sum(2) end, 'sum', 'dim 2 out of range', '2 dims')
    S.assert_error(function() t:mean(-3) end, 'mean', 'dim -3 out of range')
    S.assert_error(function() t:sum({ 0, -2 }) end, 'sum', 'dim 0 appears multiple times')
    S.assert_error(function() t:amax{ dim = { 1, 1 } } end, 'amax', 'dim 1 appears multiple times')
    S.assert_error(function() t:sum(0.5) end, 'sum', 'integer')
    S.assert_error(function() t:sum('x') end, 'sum', 'dim must be an integer or a list')
    S.assert_error(function() t:sum(2 ^ 32) end, 'sum', 'out of range')
    S.assert_error(function() t:sum(0, 1) end, 'sum', 'keepdim must be a boolean')
    S.assert_error(function() t:sum{ keepdims = true } end, "sum: unknown option 'keepdims'", 'keepdim')
    S.assert_error(function() t:all{ dtype = 'float32' } end, "all: unknown option 'dtype'")
    S.assert_error(function() t:sum(0, { dim = 1 }) end, 'sum', 'dim given both')
    S.assert_error(function() t:sum{ 0, keepdim = true } end, 'sum', "field 'keepdim'")
    S.assert_error(function() t:sum{ dtype = 'float128' } end, 'sum', 'unknown dtype float128')
    S.assert_error(function() t:max(5) end, 'max', 'dim 5 out of range')
    S.assert_error(function() t:argmin(-4) end, 'argmin', 'out of range')
    S.assert_error(function() t:max(0, 'yes') end, 'max', 'keepdim must be a boolean')
    S.assert_error(function() T.tensor(1):sum({ 0, -1 }) end, 'sum', 'appears multiple times')
  end)

  it('names the dtype when mean needs a floating input', function()
    S.assert_error(function() T.tensor({ 1, 2 }, { dtype = 'int64' }):mean() end,
      'mean', 'could not infer output dtype', 'int64')
    S.assert_error(function() T.tensor({ true }):mean(0) end, 'mean', 'bool')
  end)

  it('refuses freed tensors and non-tensors', function()
    local t = T.ones(3)
    t:free()
    for _, name in ipairs { 'sum', 'mean', 'prod', 'amax', 'amin', 'all', 'any', 'var', 'std', 'norm', 'max', 'min', 'argmax', 'argmin' } do
      S.assert_error(function() T[name](t) end, name, 'used after free')
      S.assert_error(function() T[name](42) end, name, 'expected a tensor')
    end
  end)
end)
