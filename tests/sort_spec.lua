-- sort_spec.lua — sort, argsort and topk along any dim against a plain-Lua stable sort: ties keep
-- their order, NaN ranks above every number, every dtype keeps its values, bad input is refused.
local T = require 'tessera'
local S = require 'support'

local numel = S.numel

local function flat(t) return S.flatten({ t:totable() }) end

-- The reference order of a Lua list of values: indices (0-based) sorted by value with NaN
-- largest, ties by index — a stable sort.
local function is_nan(x) return x ~= x end
local function ranks_above(x, y) return x > y or (is_nan(x) and not is_nan(y)) end
local function stable_order(values, descending)
  local order = {}
  for i = 1, #values do order[i] = i end
  table.sort(order, function(i, j)
    local x, y = values[i], values[j]
    if descending then
      if ranks_above(x, y) then return true end
      if ranks_above(y, x) then return false end
    else
      if ranks_above(y, x) then return true end
      if ranks_above(x, y) then return false end
    end
    return i < j
  end)
  for k, i in ipairs(order) do order[k] = i - 1 end
  return order
end

-- Applies fn(list of values of one line) → (values, indices) along dim d (1-based) of a flat
-- row-major list of `shape`, and returns the flat results with `out_len` along that dim.
local function along(flat_values, shape, d, out_len, fn)
  local inner = 1
  for k = d + 1, #shape do inner = inner * shape[k] end
  local outer = numel(shape) / (inner * shape[d])
  local out_shape = {}
  for k, s in ipairs(shape) do out_shape[k] = s end
  out_shape[d] = out_len
  local rv, ri = {}, {}
  for o = 0, outer - 1 do
    for i = 0, inner - 1 do
      local line = {}
      for j = 0, shape[d] - 1 do line[j + 1] = flat_values[(o * shape[d] + j) * inner + i + 1] end
      local v, ix = fn(line)
      for j = 0, out_len - 1 do
        local p = (o * out_len + j) * inner + i + 1
        rv[p], ri[p] = v[j + 1], ix[j + 1]
      end
    end
  end
  return rv, ri
end

local function sort_line(descending, k)
  return function(line)
    local order = stable_order(line, descending)
    local v, ix = {}, {}
    for j = 1, k or #line do
      v[j], ix[j] = line[order[j] + 1], order[j]
    end
    return v, ix
  end
end

local ALL_DTYPES = { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8', 'bool' }

describe('sort', function()
  it('sorts along every dim, ascending and descending, matching a stable reference', function()
    local shape = { 4, 5, 6 }
    local a, fa = S.rand_tensor(shape, 3)
    for dim = -3, 2 do
      local d = dim % 3 + 1
      for _, desc in ipairs { false, true } do
        local v, i = a:sort(dim, desc)
        local rv, ri = along(fa, shape, d, shape[d], sort_line(desc))
        S.assert_close(v, rv)
        assert.same(ri, flat(i))
        assert.equal('int64', i.dtype)
        assert.is_true(v:is_contiguous() and i:is_contiguous())
        local nv, ni = S.noncontiguous(a):sort(dim, desc)
        S.assert_close(nv, rv)
        assert.same(ri, flat(ni))
      end
    end
  end)

  it('is stable: equal values keep their original order, both ways', function()
    local vals = { 2, 1, 2, 0, 1, 2, 0, 0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1 }
    for _, desc in ipairs { false, true } do
      local v, i = T.tensor(vals):sort(0, desc)
      local rv, ri = sort_line(desc)(vals)
      assert.same(rv, v:totable())
      assert.same(ri, i:totable())
    end
    local _, i = T.tensor{ 1, 1, 1, 1 }:sort{ dim = 0, descending = true, stable = true }
    assert.same({ 0, 1, 2, 3 }, i:totable())
    -- -0.0 and 0.0 are equal: they keep their order too
    local _, z = T.tensor{ 0.0, -0.0, 0.0 }:sort()
    assert.same({ 0, 1, 2 }, z:totable())
  end)

  it('ranks NaN above every number: last ascending, first descending, stable among NaNs', function()
    local nan, inf = 0 / 0, math.huge
    local vals = { 3, nan, -inf, 1, nan, inf, -1 }
    local v, i = T.tensor(vals, { dtype = 'float64' }):sort()
    assert.same({ 2, 6, 3, 0, 5, 1, 4 }, i:totable())
    S.assert_close(v, { -inf, -1, 1, 3, inf, nan, nan })
    v, i = T.tensor(vals):sort(0, true)
    assert.same({ 1, 4, 5, 0, 3, 6, 2 }, i:totable())
    S.assert_close(v, { nan, nan, inf, 3, 1, -1, -inf })
    for _, dt in ipairs { 'float16', 'bfloat16' } do
      local _, hi = T.tensor(vals):to(dt):sort()
      assert.same({ 2, 6, 3, 0, 5, 1, 4 }, hi:totable())
    end
  end)

  it('keeps every dtype and its values exactly', function()
    local vals = { 5, 0, 3, 1, 4, 1, 0, 2 }
    for _, dt in ipairs(ALL_DTYPES) do
      local v, i = T.tensor(vals):to(dt):sort(0, true)
      assert.equal(dt, v.dtype)
      local line = {}
      for k, x in ipairs(vals) do line[k] = dt == 'bool' and (x ~= 0 and 1 or 0) or x end
      local rv, ri = sort_line(true)(line)
      if dt == 'bool' then
        for k, x in ipairs(rv) do rv[k] = x ~= 0 end
      end
      assert.same(rv, v:totable())
      assert.same(ri, i:totable())
    end
    -- int64 values above 2^53, which doubles cannot tell apart, sort exactly
    local big = T.tensor({ 2, 4, 0, 3, 1 }, { dtype = 'int64' }) + 2 ^ 53
    local v, i = big:sort(0, true)
    assert.same({ 4, 3, 2, 1, 0 }, (v - 2 ^ 53):totable())
    assert.same({ 1, 3, 0, 4, 2 }, i:totable())
  end)

  it('handles 0-d, empty and single-element dims', function()
    local v, i = T.tensor(3):sort()
    assert.equal(0, v:dim())
    assert.equal(3, v:item())
    assert.equal(0, i:item())
    v, i = T.zeros(3, 0):sort(1)
    assert.same({ 3, 0 }, { v:size(0), v:size(1) })
    v, i = T.zeros(0, 4):sort(0)
    assert.same({ 0, 4 }, { i:size(0), i:size(1) })
    v, i = T.tensor{ { 2 }, { 1 } }:sort(1)
    assert.same({ { 0 }, { 0 } }, i:totable())
  end)

  it('sorts many long rows in parallel', function()
    local rows, n = 64, 3000
    local a, fa = S.rand_tensor({ rows, n }, 17)
    local v, i = a:sort(1)
    local vt, it = v:totable(), i:totable()
    for r = 1, rows, 7 do
      local line = {}
      for j = 1, n do line[j] = fa[(r - 1) * n + j] end
      local rv, ri = sort_line(false)(line)
      assert.same(ri, it[r])
      assert.same(rv, vt[r])
    end
    local dv, di = a:sort(0, true)
    S.assert_close(dv:select(0, 0), a:gather(0, di:narrow(0, 0, 1)):select(0, 0))
  end)

  it('argsort returns the indices of sort', function()
    local a = T.tensor{ { 3, 1, 2 }, { 0, 5, 4 } }
    assert.same({ { 1, 2, 0 }, { 0, 2, 1 } }, a:argsort():totable())
    assert.same({ { 0, 1, 1 }, { 1, 0, 0 } }, a:argsort(0, true):totable())
    assert.same({ { 1, 0, 0 }, { 0, 1, 1 } }, T.argsort(a, { dim = 0 }):totable())
  end)

  it('refuses bad dims and freed tensors', function()
    S.assert_error(function() T.zeros(2, 3):sort(2) end, 'sort', 'dim 2 out of range')
    S.assert_error(function() T.zeros(2, 3):sort(-3) end, 'sort', 'dim -3 out of range')
    S.assert_error(function() T.zeros(2):sort(0.5) end, 'sort', 'integer')
    local f = T.zeros(2)
    f:free()
    S.assert_error(function() f:sort() end, 'sort', 'used after free')
  end)
end)

describe('topk', function()
  it('matches the leading k of a stable sort for every k, dim and direction', function()
    local shape = { 3, 7, 4 }
    local vals = {}
    for k, x in ipairs(S.randoms(numel(shape), 5, 0, 5)) do vals[k] = math.floor(x) end -- many ties
    local a = T.tensor(S.nest(vals, shape))
    for dim = -3, 2 do
      local d = dim % 3 + 1
      for k = 0, shape[d] do
        for _, largest in ipairs { true, false } do
          local v, i = a:topk(k, dim, largest)
          local rv, ri = along(vals, shape, d, k, sort_line(largest, k))
          assert.same(rv, flat(v))
          assert.same(ri, flat(i))
        end
      end
    end
  end)

  it('treats NaN as the largest value and keeps the dtype', function()
    local nan = 0 / 0
    local v, i = T.tensor{ 1, nan, 3, 2 }:topk(2)
    assert.same({ 1, 2 }, i:totable())
    S.assert_close(v, { nan, 3 })
    v, i = T.tensor{ 1, nan, 3, 2 }:topk(2, 0, false)
    assert.same({ 0, 3 }, i:totable())
    for _, dt in ipairs { 'float16', 'bfloat16', 'int64', 'int32', 'uint8' } do
      local tv, ti = T.tensor{ 4, 9, 1, 9 }:to(dt):topk(3)
      assert.equal(dt, tv.dtype)
      assert.same({ 9, 9, 4 }, tv:totable())
      assert.same({ 1, 3, 0 }, ti:totable())
    end
  end)

  it('sorted = false returns the same elements', function()
    local a, fa = S.rand_tensor({ 2, 500 }, 9)
    local v, i = a:topk(20, 1, true, false)
    local sv = v:sort(1, true)
    S.assert_close(sv, (a:topk(20, 1, true, true)))
    S.assert_close(v, a:gather(1, i))
    assert.equal(1000, #fa)
    local ov, oi = a:topk(1, { dim = 0, largest = false })
    S.assert_close(ov, a:sort(0):narrow(0, 0, 1))
    assert.same({ 1, 500 }, { oi:size(0), oi:size(1) })
  end)

  it('works on non-contiguous input, 0-d and large rows', function()
    local a = S.noncontiguous(T.tensor{ { 1, 5, 3 }, { 4, 2, 6 } })
    local v, i = a:topk(1, 0)
    assert.same({ { 4, 5, 6 } }, v:totable())
    assert.same({ { 1, 0, 1 } }, i:totable())
    local sv, si = T.tensor(2):topk(1)
    assert.same({ 0, 2, 0 }, { sv:dim(), sv:item(), si:item() })
    local big = T.arange(100000, { dtype = 'float64' }) % 1000
    local bv, bi = big:topk(5)
    assert.same({ 999, 999, 999, 999, 999 }, bv:totable())
    assert.same({ 999, 1999, 2999, 3999, 4999 }, bi:totable())
  end)

  it('refuses k out of range and bad dims', function()
    local a = T.zeros(2, 5)
    S.assert_error(function() a:topk(6) end, 'topk', 'k 6 out of range for dim 1 of size 5')
    S.assert_error(function() a:topk(-1) end, 'topk', 'k -1 out of range')
    S.assert_error(function() a:topk(1, 2) end, 'topk', 'dim 2 out of range')
    S.assert_error(function() a:topk(1.5) end, 'topk', 'integer')
  end)
end)
