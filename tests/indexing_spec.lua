-- indexing_spec.lua — cat, stack, split, chunk, index_select, gather, scatter, masks, nonzero,
-- advanced indexing (t[{...}] with tensors) and index_put_, against plain-Lua references, with
-- non-contiguous inputs, negative dims and indices, several dtypes and bad input.
local T = require 'tessera'
local S = require 'support'

-- ---- plain-Lua references over flat row-major lists ------------------------------------------
local numel = S.numel

-- 1-based position in a flat list of the 0-based multi-index idx.
local function pos(shape, idx)
  local p = 0
  for d = 1, #shape do p = p * shape[d] + idx[d] end
  return p + 1
end

-- Calls fn(idx) for every 0-based multi-index of shape, in row-major order.
local function each_index(shape, fn)
  local n = numel(shape)
  local idx = {}
  for d = 1, #shape do idx[d] = 0 end
  for _ = 1, n do
    fn(idx)
    for d = #shape, 1, -1 do
      idx[d] = idx[d] + 1
      if idx[d] < shape[d] then break end
      idx[d] = 0
    end
  end
end

local function copy(list)
  local out = {}
  for i, v in ipairs(list) do out[i] = v end
  return out
end

local function with(idx, d, v)
  local out = copy(idx)
  out[d] = v
  return out
end

local function long(x) return T.tensor(x, { dtype = 'int64' }) end

-- Deterministic integers in [lo, hi].
local function rand_ints(n, seed, lo, hi)
  local out = {}
  for i, r in ipairs(S.randoms(n, seed, 0, 1)) do out[i] = lo + math.floor(r * (hi - lo + 1)) % (hi - lo + 1) end
  return out
end

local function flat(t) return S.flatten({ t:totable() }) end

local ALL_DTYPES = { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8', 'bool' }

-- Small integer values exactly representable in every dtype (0/1 for bool).
local function small_values(shape, dtype, seed)
  local vals = rand_ints(numel(shape), seed or 7, 0, dtype == 'bool' and 1 or 100)
  local t = T.tensor(S.nest(vals, shape), { dtype = 'float64' }):to(dtype)
  if dtype == 'bool' then
    for i, v in ipairs(vals) do vals[i] = v ~= 0 end
  end
  return t, vals
end

describe('cat', function()
  it('joins along any dim, negative dims included, matching a reference', function()
    local a, fa = S.rand_tensor({ 2, 3, 4 }, 1)
    local b, fb = S.rand_tensor({ 2, 5, 4 }, 2)
    for _, dim in ipairs { 1, -2 } do
      local r = T.cat({ a, b }, dim)
      assert.same({ 2, 8, 4 }, { r:size(0), r:size(1), r:size(2) })
      local ref = {}
      each_index({ 2, 8, 4 }, function(i)
        ref[#ref + 1] = i[2] < 3 and fa[pos({ 2, 3, 4 }, i)] or fb[pos({ 2, 5, 4 }, with(i, 2, i[2] - 3))]
      end)
      S.assert_close(r, ref)
    end
    local c = T.cat({ a, a, a }, 0)
    assert.same({ 6, 3, 4 }, { c:size(0), c:size(1), c:size(2) })
    S.assert_close(c:narrow(0, 4, 2), a)
    S.assert_close(T.cat({ a, a }, -1):narrow(2, 4, 4), a)
  end)

  it('reads non-contiguous inputs and returns a contiguous result', function()
    local a = S.noncontiguous(S.rand_tensor({ 3, 4 }, 3))
    local b = T.arange(8):view(4, 2):t()
    local r = T.cat({ a, b }, 0)
    assert.is_true(r:is_contiguous())
    S.assert_close(r:narrow(0, 0, 3), a, 1e-6)
    S.assert_close(r:narrow(0, 3, 2), b)
  end)

  it('promotes dtypes like PyTorch', function()
    assert.equal('float64', T.cat({ T.ones(2, { dtype = 'int32' }), T.ones(2, { dtype = 'float64' }) }).dtype)
    assert.equal('int64', T.cat({ T.ones(2, { dtype = 'bool' }), T.ones(2, { dtype = 'int64' }) }).dtype)
    assert.equal('float32', T.cat({ T.ones(2, { dtype = 'float16' }), T.ones(2, { dtype = 'bfloat16' }) }).dtype)
    local r = T.cat({ T.tensor{ true, false }, T.tensor({ 7, 8 }, { dtype = 'uint8' }) })
    assert.equal('uint8', r.dtype)
    assert.same({ 1, 0, 7, 8 }, r:totable())
  end)

  it('skips legacy 1-D empty tensors, which still take part in dtype promotion', function()
    local a = T.arange(6):view(2, 3)
    local r = T.cat({ T.empty(0, { dtype = 'float64' }), a, T.empty(0) }, 1)
    assert.equal('float64', r.dtype)
    assert.same(a:totable(), r:totable())
    assert.same({ 0 }, { T.cat({ T.empty(0), T.empty(0) }):size(0) })
    assert.same(a:totable(), T.cat({ a, T.empty(0, 3, { dtype = 'int64' }) }):totable())
  end)

  it('names the op, the dims and the shapes on bad input', function()
    local a, b = T.zeros(2, 3), T.zeros(2, 4)
    S.assert_error(function() T.cat({ a, b }, 0) end, 'cat', 'sizes must match except in dim 0', '[2,4]', 'dim 1')
    S.assert_error(function() T.cat({ a, T.zeros(2, 3, 1) }) end, 'cat', 'same number of dims')
    S.assert_error(function() T.cat({ a, T.zeros({}) }) end, 'cat', 'zero-dimensional')
    S.assert_error(function() T.cat({ a, a }, 2) end, 'cat', 'dim 2 out of range')
    S.assert_error(function() T.cat({}) end, 'cat', 'non-empty')
    S.assert_error(function() T.cat(a) end, 'cat', 'list of tensors')
    S.assert_error(function() T.cat({ a, 3 }) end, 'cat', 'entry 2')
    local f = T.zeros(2, 3)
    f:free()
    S.assert_error(function() T.cat({ a, f }) end, 'used after free')
  end)
end)

describe('stack', function()
  it('joins equal shapes along a new dim, negative dims included', function()
    local a, fa = S.rand_tensor({ 2, 3 }, 4)
    local b, fb = S.rand_tensor({ 2, 3 }, 5)
    local r = T.stack({ a, S.noncontiguous(b) }, 1)
    assert.same({ 2, 2, 3 }, { r:size(0), r:size(1), r:size(2) })
    local ref = {}
    each_index({ 2, 2, 3 }, function(i)
      local src = i[2] == 0 and fa or fb
      ref[#ref + 1] = src[pos({ 2, 3 }, { i[1], i[3] })]
    end)
    S.assert_close(r, ref)
    local last = T.stack({ a, b }, -1)
    assert.same({ 2, 3, 2 }, { last:size(0), last:size(1), last:size(2) })
    S.assert_close(last:select(2, 1), b)
    assert.same({ 3 }, { T.stack({ T.tensor(1), T.tensor(2), T.tensor(3) }):size(0) })
  end)

  it('refuses unequal shapes and out-of-range dims', function()
    S.assert_error(function() T.stack({ T.zeros(2, 3), T.zeros(3, 2) }) end, 'stack', '[2,3]', '[3,2]', 'entry 1')
    S.assert_error(function() T.stack({ T.zeros(2), T.zeros(2) }, 2) end, 'stack', 'dim 2 out of range')
  end)
end)

describe('split and chunk', function()
  it('split by a size gives views, the last one shorter', function()
    local a = T.arange(14):view(7, 2)
    local parts = a:split(3)
    assert.equal(3, #parts)
    assert.same({ 3, 3, 1 }, { parts[1]:size(0), parts[2]:size(0), parts[3]:size(0) })
    assert.same({ { 12, 13 } }, parts[3]:totable())
    assert.is_true(parts[2]:shares_storage(a))
    parts[2]:fill_(-1)
    assert.same({ -1, -1 }, a[4]:totable())
  end)

  it('split by a list of sizes, along a negative dim', function()
    local a = T.arange(12):view(2, 6)
    local parts = a:split({ 1, 2, 3 }, -1)
    assert.same({ { 0 }, { 6 } }, parts[1]:totable())
    assert.same({ { 1, 2 }, { 7, 8 } }, parts[2]:totable())
    assert.same({ { 3, 4, 5 }, { 9, 10, 11 } }, parts[3]:totable())
    S.assert_error(function() a:split({ 1, 2 }, 1) end, 'split', 'sum to 3', 'size 6')
    S.assert_error(function() a:split(0, 1) end, 'split', 'positive')
    S.assert_error(function() a:split(2, 2) end, 'split', 'dim 2 out of range')
  end)

  it('chunk gives at most n pieces of ceil(size / n)', function()
    local sizes = function(parts)
      local out = {}
      for i, p in ipairs(parts) do out[i] = p:size(0) end
      return out
    end
    assert.same({ 3, 3, 1 }, sizes(T.arange(7):chunk(3)))
    assert.same({ 2, 2, 2 }, sizes(T.arange(6):chunk(4)))
    assert.same({ 1, 1 }, sizes(T.arange(2):chunk(5)))
    assert.same({ 0, 0 }, sizes(T.empty(0):chunk(2)))
    assert.same({ { 2, 3 } }, T.arange(4):view(1, 4):chunk(2, 1)[2]:totable())
    S.assert_error(function() T.arange(4):chunk(0) end, 'chunk', 'positive')
  end)
end)

describe('index_select', function()
  it('picks along every dim with negative and repeated indices', function()
    local shape = { 3, 4, 5 }
    local a, fa = S.rand_tensor(shape, 11)
    for dim = -3, 2 do
      local d = dim % 3 + 1
      local n = shape[d]
      local idx = { n - 1, 0, -1, -n, 1 }
      local r = a:index_select(dim, long(idx))
      local rshape = with(shape, d, #idx)
      local ref = {}
      each_index(rshape, function(i) ref[#ref + 1] = fa[pos(shape, with(i, d, idx[i[d] + 1] % n))] end)
      S.assert_close(r, ref)
      S.assert_close(S.noncontiguous(a):index_select(dim, long(idx)), ref)
    end
  end)

  it('works for every dtype and with int32 or 0-d indices', function()
    for _, dt in ipairs(ALL_DTYPES) do
      local a, vals = small_values({ 4, 3 }, dt)
      local r = a:index_select(0, T.tensor({ 3, 1 }, { dtype = 'int32' }))
      assert.equal(dt, r.dtype)
      local ref = {}
      for _, row in ipairs { 3, 1 } do for c = 0, 2 do ref[#ref + 1] = vals[row * 3 + c + 1] end end
      assert.same(ref, flat(r))
    end
    local a = T.arange(6):view(2, 3)
    assert.same({ { 2 }, { 5 } }, a:index_select(1, long(-1)):totable())
    assert.equal(7, T.tensor(7):index_select(0, long{ 0 }):item())
    assert.same({ 2, 0 }, { a:index_select(1, long{}):size(0), a:index_select(1, long{}):size(1) })
  end)

  it('names the out-of-range value, the dim and its size', function()
    local a = T.zeros(3, 5)
    S.assert_error(function() a:index_select(1, long{ 0, 5 }) end, 'index_select', 'index 5 out of range for dim 1 of size 5')
    S.assert_error(function() a:index_select(0, long{ -4 }) end, 'index -4 out of range for dim 0 of size 3')
    S.assert_error(function() a:index_select(0, T.tensor{ 0, 1 }) end, 'index_select', 'int64 or int32', 'float32')
    S.assert_error(function() a:index_select(0, long{ { 0 } }) end, 'index_select', '0-d or 1-D')
    S.assert_error(function() a:index_select(2, long{ 0 }) end, 'index_select', 'dim 2 out of range')
    S.assert_error(function() a:index_select(0, 1) end, 'index_select', 'expected a tensor')
  end)
end)

describe('gather', function()
  it('matches the reference along every dim, index smaller than the input', function()
    local shape = { 3, 4, 5 }
    local a, fa = S.rand_tensor(shape, 21)
    for dim = -3, 2 do
      local d = dim % 3 + 1
      local ishape = { 2, 3, 4 }
      ishape[d] = 6 -- along dim the index may be longer than the input
      local iv = rand_ints(numel(ishape), 30 + d, -shape[d], shape[d] - 1)
      local index = long(S.nest(iv, ishape))
      local ref, k = {}, 0
      each_index(ishape, function(i)
        k = k + 1
        ref[k] = fa[pos(shape, with(i, d, iv[k] % shape[d]))]
      end)
      S.assert_close(a:gather(dim, index), ref)
      S.assert_close(S.noncontiguous(a):gather(dim, S.noncontiguous(index)), ref)
    end
  end)

  it('keeps the dtype and works on 0-d tensors', function()
    for _, dt in ipairs(ALL_DTYPES) do
      local a, vals = small_values({ 2, 3 }, dt)
      local r = a:gather(1, long{ { 2, 0 }, { 1, 1 } })
      assert.equal(dt, r.dtype)
      assert.same({ vals[3], vals[1], vals[5], vals[5] }, flat(r))
    end
    assert.equal(5, T.tensor(5):gather(0, long(0)):item())
  end)

  it('refuses bad indices and shapes', function()
    local a = T.zeros(3, 4)
    S.assert_error(function() a:gather(1, long{ { 0, 4 } }) end, 'gather', 'index 4 out of range for dim 1 of size 4')
    S.assert_error(function() a:gather(1, long{ 0, 1 }) end, 'gather', 'as many dims')
    S.assert_error(function() a:gather(1, T.zeros(4, 1, { dtype = 'int64' })) end, 'gather', 'larger', 'dim 0')
    S.assert_error(function() a:gather(0, T.zeros(1, 1, { dtype = 'uint8' })) end, 'gather', 'int64 or int32', 'uint8')
  end)
end)

-- Reference scatter: a copy of a with src written (or added) at the indexed places, in order.
local function scatter_ref(fa, shape, d, iv, ishape, fsrc, sshape, add)
  local out, k = copy(fa), 0
  each_index(ishape, function(i)
    k = k + 1
    local v = type(fsrc) == 'table' and fsrc[pos(sshape, i)] or fsrc
    local p = pos(shape, with(i, d, iv[k] % shape[d]))
    out[p] = add and out[p] + v or v
  end)
  return out
end

describe('scatter', function()
  it('scatter and scatter_add match the reference, duplicates accumulating', function()
    local shape = { 4, 5, 3 }
    local a, fa = S.rand_tensor(shape, 41)
    for dim = -3, 2 do
      local d = dim % 3 + 1
      local ishape, sshape = { 3, 4, 2 }, { 4, 5, 3 }
      ishape[d] = 7
      sshape[d] = 8
      local iv = rand_ints(numel(ishape), 50 + d, -shape[d], shape[d] - 1) -- many duplicates
      local index = long(S.nest(iv, ishape))
      local src, fsrc = S.rand_tensor(sshape, 60 + d)
      S.assert_close(a:scatter_add(dim, index, src), scatter_ref(fa, shape, d, iv, ishape, fsrc, sshape, true), 1e-12, 1e-12)
      -- replacement: the last of duplicate indices (in row-major order) wins
      S.assert_close(a:scatter(dim, index, src), scatter_ref(fa, shape, d, iv, ishape, fsrc, sshape, false))
      S.assert_close(S.noncontiguous(a):scatter_add(dim, S.noncontiguous(index), S.noncontiguous(src)),
        scatter_ref(fa, shape, d, iv, ishape, fsrc, sshape, true), 1e-12, 1e-12)
      S.assert_close(a, fa) -- out of place leaves a alone
    end
  end)

  it('replace writes the last of duplicate indices; numbers scatter as constants', function()
    local a = T.zeros(2, 4)
    local r = a:scatter(1, long{ { 1, 1, 3 }, { 0, 0, 0 } }, T.tensor{ { 1, 2, 3 }, { 4, 5, 6 } })
    assert.same({ { 0, 2, 0, 3 }, { 6, 0, 0, 0 } }, r:totable())
    assert.same({ { 0, 9, 0, 0 }, { 0, 0, 9, 0 } }, a:scatter(1, long{ { 1 }, { 2 } }, 9):totable())
    assert.same({ { 2, 0, 0, 0 }, { 1, 0, 0, 1 } }, a:scatter_add(1, long{ { 0, 0 }, { 3, -5 + 1 } }, 1):totable())
  end)

  it('in-place forms write through non-contiguous views', function()
    local base = T.zeros(4, 3)
    local v = base:t() -- [3, 4], non-contiguous
    v:scatter_(1, long{ { 0 }, { 1 }, { 2 } }, T.tensor{ { 1 }, { 2 }, { 3 } })
    v:scatter_add_(1, long{ { 3, 3 }, { 3, 3 }, { 3, 3 } }, T.ones(3, 2))
    assert.same({ { 1, 0, 0 }, { 0, 2, 0 }, { 0, 0, 3 }, { 2, 2, 2 } }, base:totable())
    local s = T.arange(4):view(1, 4)
    s:scatter_(1, long{ { 3, 2, 1, 0 } }, s) -- src aliasing the target reads the old values
    assert.same({ { 3, 2, 1, 0 } }, s:totable())
  end)

  it('adds in each dtype and keeps it', function()
    for _, dt in ipairs { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8' } do
      local a = T.ones({ 2, 3 }, { dtype = dt })
      local r = a:scatter_add(1, long{ { 0, 0, 0 }, { 2, 1, 2 } }, T.full({ 2, 3 }, 2, { dtype = dt }))
      assert.equal(dt, r.dtype)
      assert.same({ 7, 1, 1, 1, 3, 5 }, flat(r))
    end
    local b = T.zeros(3, { dtype = 'bool' }):scatter_add(0, long{ 1, 1 }, T.tensor{ true, true })
    assert.same({ false, true, false }, b:totable())
  end)

  it('runs large scatters in parallel safely', function()
    local n, m = 20000, 8
    local index = T.arange(n * m):view(n, m) % 3 -- each line adds into columns 0..2, repeatedly
    local r = T.zeros(n, 4):scatter_add(1, index, T.ones(n, m))
    local ref = {}
    for i = 0, n - 1 do
      local row = { 0, 0, 0, 0 }
      for j = 0, m - 1 do
        local c = (i * m + j) % 3
        row[c + 1] = row[c + 1] + 1
      end
      for c = 1, 4 do ref[#ref + 1] = row[c] end
    end
    S.assert_close(r, ref)
  end)

  it('refuses bad shapes, dtypes and indices', function()
    local a = T.zeros(3, 4)
    S.assert_error(function() a:scatter(1, long{ { 4 } }, T.ones(1, 1)) end, 'scatter', 'index 4 out of range for dim 1 of size 4')
    S.assert_error(function() a:scatter_add(1, long{ { 0, 1 } }, T.ones(1, 1)) end, 'scatter_add', 'larger than src', 'dim 1')
    S.assert_error(function() a:scatter(1, T.zeros(4, 1, { dtype = 'int64' }), T.ones(4, 1)) end, 'larger than the tensor', 'dim 0')
    S.assert_error(function() a:scatter(1, long{ 0 }, T.ones(1)) end, 'scatter', 'as many dims')
    S.assert_error(function() a:scatter(1, long{ { 0 } }, T.ones(1)) end, 'scatter', 'src', 'as many dims')
    S.assert_error(function() a:scatter(1, T.zeros(1, 1), T.ones(1, 1)) end, 'scatter', 'int64 or int32', 'float32')
    local i = T.zeros(3, { dtype = 'int64' })
    S.assert_error(function() i:scatter_add_(0, long{ 0 }, T.ones(1)) end, 'scatter_add_', 'float32', "can't be cast", 'int64')
    S.assert_error(function() T.zeros(1, 4):expand(3, 4):scatter_(1, long{ { 0 } }, T.ones(1, 1)) end, 'scatter_', 'broadcast')
    S.assert_error(function() a:scatter(-3, long{ { 0 } }, T.ones(1, 1)) end, 'scatter', 'dim -3 out of range')
  end)
end)

describe('masks', function()
  it('masked_fill matches the reference for every dtype, with a broadcast mask', function()
    for _, dt in ipairs(ALL_DTYPES) do
      local a, vals = small_values({ 3, 4 }, dt)
      local mask = T.tensor{ { true, false, true, false } }
      local r = a:masked_fill(mask, 1)
      local ref = {}
      for k, v in ipairs(vals) do ref[k] = ((k - 1) % 4) % 2 == 0 and (dt == 'bool' and true or 1) or v end
      assert.equal(dt, r.dtype)
      assert.same(ref, flat(r))
    end
  end)

  it('masked_fill broadcasts the tensor out of place and writes views in place', function()
    local col = T.tensor{ { 1 }, { 2 } }
    assert.same({ { 0, 1 }, { 2, 0 } }, col:masked_fill(T.tensor{ { true, false }, { false, true } }, 0):totable())
    local base = T.arange(6, { dtype = 'float64' }):view(2, 3)
    local v = base:t()
    v:masked_fill_(T.tensor{ { true, false }, { false, false }, { false, true } }, -1)
    assert.same({ { -1, 1, 2 }, { 3, 4, -1 } }, base:totable())
    base:masked_fill_(T.tensor(true), 0 / 0)
    assert.is_true(base:isnan():totable()[1][1])
    S.assert_error(function() col:masked_fill_(T.tensor{ { true, false }, { false, true } }, 0) end,
      'masked_fill_', 'cannot be broadcast', '[2,1]')
    S.assert_error(function() col:masked_fill(T.tensor{ 1, 0 }, 0) end, 'masked_fill', 'bool', 'float32')
    S.assert_error(function() col:masked_fill(T.tensor{ { true }, { false }, { true } }, 0) end, 'masked_fill', 'broadcast')
  end)

  it('masked_select returns the selected elements in order, broadcasting', function()
    local a, fa = S.rand_tensor({ 3, 4 }, 71)
    local m = a:gt(0)
    local ref = {}
    for _, v in ipairs(fa) do if v > 0 then ref[#ref + 1] = v end end
    S.assert_close(a:masked_select(m), ref)
    S.assert_close(S.noncontiguous(a):masked_select(S.noncontiguous(m)), ref)
    assert.same({ 1, 3, 5, 7 }, T.arange(8):view(4, 2):masked_select(T.tensor{ false, true }):totable())
    assert.same({ 5 }, T.tensor(5, { dtype = 'int64' }):masked_select(T.tensor(true)):totable())
    assert.equal(0, T.tensor(5):masked_select(T.tensor(false)):numel())
    S.assert_error(function() a:masked_select(T.zeros(3, 4)) end, 'masked_select', 'bool')
  end)

  it('nonzero lists coordinates in row-major order; -0 is zero and NaN is not', function()
    local x = T.tensor{ { 0, -0.0, 1 }, { 0 / 0, 0, -2 } }
    assert.same({ { 0, 2 }, { 1, 0 }, { 1, 2 } }, x:nonzero():totable())
    for _, dt in ipairs { 'float16', 'bfloat16', 'float64', 'int32', 'uint8', 'bool', 'int64' } do
      assert.same({ { 0, 2 }, { 1, 0 }, { 1, 2 } }, T.tensor{ { 0, 0, 1 }, { 1, 0, 1 } }:to(dt):nonzero():totable())
    end
    local nc = S.noncontiguous(T.tensor{ { 0, 1 }, { 2, 0 } })
    assert.same({ { 0, 1 }, { 1, 0 } }, nc:nonzero():totable())
    assert.same({ 1, 0 }, { T.tensor(3):nonzero():size(0), T.tensor(3):nonzero():size(1) })
    assert.same({ 0, 2 }, { T.zeros(0, 4):nonzero():size(0), T.zeros(0, 4):nonzero():size(1) })
    local cols = T.tensor{ { 0, 1 }, { 1, 1 } }:nonzero{ as_tuple = true }
    assert.same({ 0, 1, 1 }, cols[1]:totable())
    assert.same({ 1, 0, 1 }, cols[2]:totable())
    assert.equal('int64', x:nonzero().dtype)
  end)

  it('nonzero handles large tensors across threads', function()
    local n = 300000
    local a = (T.arange(n) % 7):eq(3):view(600, 500)
    local nz = a:nonzero()
    local count = 0
    for i = 0, n - 1 do if i % 7 == 3 then count = count + 1 end end
    assert.equal(count, nz:size(0))
    local lin = nz:select(1, 0) * 500 + nz:select(1, 1)
    local l = lin:totable()
    for k = 1, #l, 997 do assert.equal(3, l[k] % 7) end
    for k = 2, #l do assert(l[k] > l[k - 1], 'nonzero rows must be in order') end
  end)
end)

describe('advanced indexing', function()
  local shape = { 4, 3, 5 }
  local a, fa = S.rand_tensor(shape, 81)

  it('an index tensor on a leading dim, negative and repeated, any index shape', function()
    local r = a[{ long{ { 3, -1 }, { 0, 0 } } }]
    assert.same({ 2, 2, 3, 5 }, { r:size(0), r:size(1), r:size(2), r:size(3) })
    local ref = {}
    for _, row in ipairs { 3, 3, 0, 0 } do
      each_index({ 3, 5 }, function(i) ref[#ref + 1] = fa[pos(shape, { row, i[1], i[2] })] end)
    end
    S.assert_close(r, ref)
    S.assert_close(a[long{ 1 }], a:index_select(0, long{ 1 }))
    S.assert_close(a[{ T.tensor({ 2, -4 }, { dtype = 'int32' }) }], a:index_select(0, long{ 2, 0 }))
  end)

  it('several index tensors broadcast together and pick elementwise', function()
    local i0, i1 = long{ { 0 }, { 3 } }, long{ 2, -1, 0 }
    local r = a[{ i0, i1 }]
    assert.same({ 2, 3, 5 }, { r:size(0), r:size(1), r:size(2) })
    local ref = {}
    for _, x in ipairs { 0, 3 } do
      for _, y in ipairs { 2, 2, 0 } do
        for z = 0, 4 do ref[#ref + 1] = fa[pos(shape, { x, y, z })] end
      end
    end
    S.assert_close(r, ref)
    local e = a[{ long{ 1, 2 }, long{ 0, 1 }, long{ 4, 3 } }]
    S.assert_close(e, { fa[pos(shape, { 1, 0, 4 })], fa[pos(shape, { 2, 1, 3 })] })
  end)

  it('places the index dims like PyTorch: in place when adjacent, first otherwise', function()
    local mid = a[{ {}, long{ { 2, 0 } } }] -- adjacent at dim 1 → [4, 1, 2, 5]
    assert.same({ 4, 1, 2, 5 }, { mid:size(0), mid:size(1), mid:size(2), mid:size(3) })
    S.assert_close(mid:select(1, 0), a:index_select(1, long{ 2, 0 }))
    local apart = a[{ long{ 1, 2 }, {}, long{ 0, 4 } }] -- separated → [2, 3]
    assert.same({ 2, 3 }, { apart:size(0), apart:size(1) })
    local ref = {}
    for k, x in ipairs { 1, 2 } do
      for y = 0, 2 do ref[#ref + 1] = fa[pos(shape, { x, y, ({ 0, 4 })[k] })] end
    end
    S.assert_close(apart, ref)
    local after_number = a[{ 1, {}, long{ 3 } }] -- number first, then a slice, then an index
    S.assert_close(after_number, a:select(0, 1):index_select(1, long{ 3 }))
  end)

  it('bool masks select their true positions and cover as many dims as they have', function()
    local m = a:gt(0)
    local ref = {}
    for _, v in ipairs(fa) do if v > 0 then ref[#ref + 1] = v end end
    S.assert_close(a[m], ref)
    local rows = T.tensor{ true, false, false, true }
    S.assert_close(a[rows], a:index_select(0, long{ 0, 3 }))
    local m2 = T.tensor{ { true, false, true }, { false, false, false }, { false, true, false }, { false, false, false } }
    local r = a[{ m2, -1 }] -- the mask covers dims 0 and 1, then -1 selects in dim 2
    S.assert_close(r, { fa[pos(shape, { 0, 0, 4 })], fa[pos(shape, { 0, 2, 4 })], fa[pos(shape, { 2, 1, 4 })] })
    local inner = a[{ {}, T.tensor{ false, true, true } }]
    assert.same({ 4, 2, 5 }, { inner:size(0), inner:size(1), inner:size(2) })
    S.assert_close(inner, a:index_select(1, long{ 1, 2 }))
    S.assert_close(S.noncontiguous(a:select(2, 0))[m2], { fa[pos(shape, { 0, 0, 0 })], fa[pos(shape, { 0, 2, 0 })], fa[pos(shape, { 2, 1, 0 })] })
    local t0 = a[T.tensor(true)]
    assert.same({ 1, 4, 3, 5 }, { t0:size(0), t0:size(1), t0:size(2), t0:size(3) })
    assert.equal(0, a[T.tensor(false)]:numel())
  end)

  it('large gathers by index run in parallel and match index_select', function()
    local big = T.arange(300 * 200, { dtype = 'float32' }):view(300, 200)
    local idx = T.arange(1000) % 300
    S.assert_close(big[idx], big:index_select(0, idx))
    local cols = big[{ {}, idx:narrow(0, 0, 150) }]
    S.assert_close(cols, big:index_select(1, idx:narrow(0, 0, 150)))
  end)

  it('refuses out-of-range values, bad dtypes and shapes with clear messages', function()
    S.assert_error(function() return a[long{ 4 }] end, 'index 4 out of range for dim 0 of size 4')
    S.assert_error(function() return a[{ {}, long{ -4 } }] end, 'index -4 out of range for dim 1 of size 3')
    S.assert_error(function() return a[T.tensor{ 0, 1 }] end, 'index', 'int64, int32 or bool', 'float32')
    S.assert_error(function() return a[T.tensor{ true, false }] end, 'mask', 'does not match', 'dim 0')
    S.assert_error(function() return a[{ long{ 0, 1 }, long{ 0, 1, 2 } }] end, 'index', 'cannot be broadcast')
    S.assert_error(function() return a[{ long{ 0 }, long{ 0 }, long{ 0 }, long{ 0 } }] end, 'too many indices')
    local f = long{ 0 }
    f:free()
    S.assert_error(function() return a[f] end, 'used after free')
  end)
end)

describe('index_put_ and index assignment', function()
  it('assigns numbers and broadcast tensors through index tensors and masks', function()
    local a = T.zeros(3, 4)
    a[long{ 0, -1 }] = 5
    assert.same({ { 5, 5, 5, 5 }, { 0, 0, 0, 0 }, { 5, 5, 5, 5 } }, a:totable())
    a[{ long{ 1 }, long{ 2 } }] = 7
    a[a:eq(0)] = -1
    assert.same({ { 5, 5, 5, 5 }, { -1, -1, 7, -1 }, { 5, 5, 5, 5 } }, a:totable())
    a[a:eq(5)] = T.arange(8, { dtype = 'float64' }) -- values cast to the tensor's dtype
    assert.same({ { 0, 1, 2, 3 }, { -1, -1, 7, -1 }, { 4, 5, 6, 7 } }, a:totable())
    a[{ {}, long{ 3, 0 } }] = T.tensor{ { 10, 20 }, { 30, 40 }, { 50, 60 } } -- result layout [3, 2]
    assert.same({ { 20, 1, 2, 10 }, { 40, -1, 7, 30 }, { 60, 5, 6, 50 } }, a:totable())
    a[{ {}, long{ 1 } }] = T.tensor{ 0 }
    assert.same({ 0, 0, 0 }, a:select(1, 1):totable())
  end)

  it('writes through non-contiguous views', function()
    local base = T.zeros(3, 2)
    local v = base:t()
    v[{ long{ 1 }, long{ 2 } }] = 9
    v[T.tensor{ { true, false, false }, { false, false, false } }] = 4
    assert.same({ { 4, 0 }, { 0, 0 }, { 0, 9 } }, base:totable())
    base:index_put_({ long{ 0, 0, 2 } }, T.tensor{ { 1, 1 } }, true)
    assert.same({ { 6, 2 }, { 0, 0 }, { 1, 10 } }, base:totable())
  end)

  it('accumulate adds every duplicate, in each dtype', function()
    for _, dt in ipairs { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8' } do
      local a = T.zeros({ 4 }, { dtype = dt })
      a:index_put_({ long{ 1, 1, 3, 1, -1 } }, T.full({ 5 }, 2, { dtype = dt }), true)
      assert.equal(dt, a.dtype)
      assert.same({ 0, 6, 0, 4 }, a:totable())
    end
    local r = T.ones(2, 2):index_put({ long{ 0, 0 }, long{ 1, 1 } }, 3, true)
    assert.same({ { 1, 7 }, { 1, 1 } }, r:totable())
  end)

  it('accumulates large blocks across threads without losing duplicates', function()
    local a = T.zeros(50, 1000)
    local idx = T.arange(100) % 5
    a:index_put_({ idx }, T.ones(100, 1000), true)
    S.assert_close(a:select(1, 999):narrow(0, 0, 6), { 20, 20, 20, 20, 20, 0 })
    S.assert_close(a:select(1, 0):narrow(0, 0, 6), { 20, 20, 20, 20, 20, 0 })
    local b = T.zeros(100000)
    b:index_put_({ T.arange(200000) % 3 }, T.ones(200000), true)
    S.assert_close(b:narrow(0, 0, 4), { 66667, 66667, 66666, 0 })
  end)

  it('refuses values that do not fit and lossy casts', function()
    local a = T.zeros(3, 4)
    S.assert_error(function() a[long{ 0, 1 }] = T.ones(3, 4) end, 'cannot be broadcast', '[2,4]')
    S.assert_error(function() a[{ {}, long{ 0, 1 } }] = T.ones(2, 3) end, 'index assignment', 'cannot be broadcast', '[3,2]')
    local i = T.zeros(3, { dtype = 'int64' })
    S.assert_error(function() i:index_put_({ long{ 0 } }, T.ones(1), false) end, 'index_put_', "can't be cast")
    S.assert_error(function() a:index_put_({ long{ 3 } }, 1) end, 'index_put_', 'index 3 out of range for dim 0 of size 3')
    S.assert_error(function() T.zeros(1, 4):expand(3, 4):index_put_({ long{ 0 } }, 1) end, 'index_put_', 'broadcast')
    S.assert_error(function() a:index_put_(long{ 0 }, 1) end, 'index_put_', 'list of tensors')
  end)
end)
