-- tensor_spec.lua — the tensor core: factories, views, conversions, elementwise math and
-- broadcasting against plain-Lua references, type promotion, printing, memory, bad input.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'

describe('factories', function()
  it('zeros, ones, full, empty accept sizes as numbers or a list, with options', function()
    assert.same({ 2, 3 }, { T.zeros(2, 3):size(0), T.zeros{ 2, 3 }:size(1) })
    assert.equal('float32', T.zeros(2).dtype)
    assert.equal('float64', T.ones({ 2 }, { dtype = 'float64' }).dtype)
    S.assert_close(T.full({ 2, 2 }, 7):totable(), { { 7, 7 }, { 7, 7 } })
    assert.equal(0, T.zeros{}:dim())
    assert.equal(0, T.empty(0, 3):numel())
  end)

  it('arange, linspace and eye match their definitions', function()
    assert.same({ 0, 1, 2, 3, 4 }, T.arange(5):totable())
    assert.equal('int64', T.arange(5).dtype)
    assert.same({ 1, 3, 5 }, T.arange(1, 7, 2):totable())
    S.assert_close(T.arange(0, 1, 0.25), { 0, 0.25, 0.5, 0.75 })
    assert.same({ 5, 4, 3 }, T.arange(5, 2, -1):totable())
    S.assert_close(T.linspace(-1, 1, 5), { -1, -0.5, 0, 0.5, 1 })
    assert.equal(1, T.linspace(0, 1, 7, { dtype = 'float64' }):totable()[7])
    assert.same({ { 1, 0, 0 }, { 0, 1, 0 } }, T.eye(2, 3):totable())
  end)

  it('tensor() infers shape from nested lists and dtype from the values', function()
    local t = T.tensor{ { 1, 2 }, { 3, 4 } }
    assert.same({ 2, 2 }, { t:size(0), t:size(1) })
    assert.equal('float32', t.dtype)
    assert.equal('bool', T.tensor{ true, false }.dtype)
    assert.equal('int64', T.tensor({ 1, 2 }, { dtype = 'int64' }).dtype)
    assert.equal(3, T.tensor(3):item())
    S.assert_error(function() T.tensor{ { 1, 2 }, { 3 } } end, 'ragged')
    S.assert_error(function() T.tensor{ 'a' } end, 'expected numbers')
  end)

  it('*_like copies shape, dtype and device', function()
    local a = T.ones({ 2, 3 }, { dtype = 'float64' })
    local z = T.zeros_like(a)
    assert.same({ 2, 3 }, { z:size(0), z:size(1) })
    assert.equal('float64', z.dtype)
    assert.equal('int32', T.ones_like(a, { dtype = 'int32' }).dtype)
    assert.same({ { 5, 5, 5 }, { 5, 5, 5 } }, T.full_like(a, 5):totable())
  end)
end)

describe('views', function()
  it('share storage with their base: writes through a view are seen by the base', function()
    local a = T.zeros(3, 4)
    local row = a[1]
    row:fill_(5)
    local col = a[{ {}, 2 }]
    col:fill_(-1)
    assert.same({ { 0, 0, -1, 0 }, { 5, 5, -1, 5 }, { 0, 0, -1, 0 } }, a:totable())
    assert.is_true(row:shares_storage(a))
  end)

  it('view/reshape split and merge dims; view refuses incompatible strides, reshape copies', function()
    local a = T.arange(24):view(2, 3, 4)
    assert.same({ 6, 4 }, { a:view(-1, 4):size(0), a:view(-1, 4):size(1) })
    local t = a:transpose(0, 2)
    S.assert_error(function() t:view(-1) end, 'view', 'reshape')
    local r = t:reshape(-1)
    assert.is_false(r:shares_storage(a))
    assert.equal(0, r[0]:item())
    assert.equal(12, r[1]:item())
    assert.is_true(a:reshape(6, 4):shares_storage(a))
    S.assert_error(function() a:view(5, 5) end, 'view', '[5,5]', '24 elements')
    S.assert_error(function() a:view(-1, -1) end, 'only one dimension can be -1')
  end)

  it('permute, transpose, narrow, slice with step, select, expand, squeeze, unsqueeze, flatten', function()
    local a = T.arange(24):view(2, 3, 4)
    local p = a:permute(2, 0, 1)
    assert.same({ 4, 2, 3 }, { p:size(0), p:size(1), p:size(2) })
    assert.equal(a[{ 1, 2, 3 }]:item(), p[{ 3, 1, 2 }]:item())
    assert.same({ 1, 2 }, a:narrow(2, 1, 2)[{ 0, 0 }]:totable())
    assert.same({ 0, 2 }, a[{ 0, 0, { 0, nil, 2 } }]:totable())
    assert.same({ 1, 3 }, a:slice(-1, 1, nil, 2)[{ 0, 0 }]:totable())
    assert.same({ 3, 7, 11 }, a:select(2, -1)[0]:totable())
    local e = T.tensor{ 1, 2, 3 }:expand(2, 3)
    assert.same({ { 1, 2, 3 }, { 1, 2, 3 } }, e:totable())
    assert.same({ 0, 1 }, e:stride())
    assert.equal(1, T.zeros(1, 3, 1):squeeze():dim())
    assert.equal(3, T.zeros(1, 3, 1):squeeze(0):size(0))
    assert.same({ 3, 1 }, { T.zeros(3):unsqueeze(-1):size(0), T.zeros(3):unsqueeze(-1):size(1) })
    assert.equal(12, a:flatten(1):size(1))
    assert.equal(24, a:flatten():numel())
  end)

  it('contiguous() copies only when needed', function()
    local a = T.arange(6):view(2, 3)
    assert.is_true(a:contiguous():shares_storage(a))
    local t = a:t()
    assert.is_false(t:is_contiguous())
    local c = t:contiguous()
    assert.is_true(c:is_contiguous())
    assert.same({ { 0, 3 }, { 1, 4 }, { 2, 5 } }, c:totable())
  end)

  it('rejects out-of-range dims and indices with messages', function()
    local a = T.zeros(2, 3)
    S.assert_error(function() a:transpose(0, 2) end, 'transpose', 'dim 2 out of range', '2 dims')
    S.assert_error(function() a:select(1, 3) end, 'select', 'index 3 out of range', 'size 3')
    S.assert_error(function() return a[5] end, 'index 5 out of range')
    S.assert_error(function() a:narrow(0, 1, 5) end, 'narrow', 'out of range')
    S.assert_error(function() a:expand(4, 3, 2) end, 'expand', '[2,3]')
    S.assert_error(function() a:permute(0, 0) end, 'permute', 'repeated')
    S.assert_error(function() a:slice(0, 0, 2, 0) end, 'step must be positive')
  end)
end)

describe('conversions', function()
  it('round-trips values through every dtype', function()
    local vals = { -3, -1, 0, 1, 2, 100 }
    for _, dt in ipairs { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32' } do
      local t = T.tensor(vals, { dtype = dt })
      assert.equal(dt, t.dtype)
      S.assert_close(t:double(), vals, 0, 0, dt)
    end
    assert.same({ 253, 255, 0, 1, 2, 100 }, T.tensor(vals):to('int64'):to('uint8'):totable())
    assert.same({ true, true, false, true, true, true }, T.tensor(vals):bool():totable())
  end)

  it('rounds float16 and bfloat16 to nearest even, with inf and subnormals', function()
    local h = T.tensor({ 1 + 2 ^ -11, 1 + 3 * 2 ^ -11, 65504, 65520, 2 ^ -24, 2 ^ -26, -0.1 }, { dtype = 'float64' }):half()
    S.assert_close(h:double(), { 1, 1 + 2 ^ -9, 65504, math.huge, 2 ^ -24, 0, -0.0999755859375 }, 0, 0)
    local b = T.tensor({ 1 + 2 ^ -8, 1 + 3 * 2 ^ -8, 3e38 * 10 }, { dtype = 'float64' }):bfloat16()
    S.assert_close(b:double(), { 1, 1 + 2 ^ -6, math.huge }, 0, 0)
  end)

  it('float to integer conversion saturates and maps nan to 0 instead of misbehaving', function()
    local t = T.tensor({ 0 / 0, 1e300, -1e300, 2.7, -2.7 }, { dtype = 'float64' })
    local i = t:long():totable()
    assert.equal(0, i[1]); assert.is_true(i[2] > 9e18); assert.is_true(i[3] < -9e18)
    assert.same({ 2, -2 }, { i[4], i[5] })
  end)

  it('copy_ broadcasts and converts', function()
    local a = T.zeros({ 2, 3 }, { dtype = 'int32' })
    a:copy_(T.tensor{ 1.9, 2, 3 })
    assert.same({ { 1, 2, 3 }, { 1, 2, 3 } }, a:totable())
    S.assert_error(function() a:copy_(T.zeros(4)) end, 'copy_', '[4]', '[2,3]')
    S.assert_error(function() T.zeros(3):expand(2, 3):fill_(1) end, 'broadcast')
  end)

  it('item() and totable() read values; item() needs one element', function()
    assert.equal(2.5, T.tensor{ { 2.5 } }:item())
    assert.equal(true, T.tensor(true):item())
    S.assert_error(function() T.zeros(2):item() end, 'item', '2 elements')
  end)
end)

-- Reference implementations in plain Lua (doubles).
local function erf(x)
  -- Abramowitz-Stegun 7.1.26 is too coarse; use the series/continued fraction via math identities
  local t = 1 / (1 + 0.5 * math.abs(x))
  local y = 1 - t * math.exp(-x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
    t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
  return x >= 0 and y or -y
end
local function sigmoid(x) return 1 / (1 + math.exp(-x)) end
local unary_ref = {
  neg = function(x) return -x end, abs = math.abs, exp = math.exp, log = math.log, sqrt = math.sqrt,
  rsqrt = function(x) return 1 / math.sqrt(x) end, tanh = math.tanh, sigmoid = sigmoid,
  expm1 = function(x) return math.exp(x) - 1 end, log1p = function(x) return math.log(1 + x) end,
  erf = erf, relu = function(x) return x > 0 and x or 0 end,
  gelu = function(x) return 0.5 * x * (1 + erf(x / math.sqrt(2))) end,
  silu = function(x) return x * sigmoid(x) end, sin = math.sin, cos = math.cos, floor = math.floor,
  ceil = math.ceil, trunc = function(x) return x >= 0 and math.floor(x) or math.ceil(x) end,
  reciprocal = function(x) return 1 / x end, square = function(x) return x * x end,
  sign = function(x) return x > 0 and 1 or x < 0 and -1 or 0 end,
}
local positive_only = { log = true, sqrt = true, rsqrt = true, log1p = true }

describe('elementwise math', function()
  it('every unary op matches its reference on float64 and float32, contiguous or not', function()
    for name, ref in each(unary_ref) do
      local lo = positive_only[name] and 0.1 or -3
      local flat = S.randoms(12, 7, lo, 3)
      local expected = {}
      for i, v in ipairs(flat) do expected[i] = ref(v) end
      local tol = name == 'erf' or name == 'gelu' and 1e-6 or 1e-12
      if name == 'erf' or name == 'gelu' then tol = 2e-7 end
      local t64 = T.tensor(S.nest(flat, { 3, 4 }), { dtype = 'float64' })
      S.assert_close(t64[name](t64), S.nest(expected, { 3, 4 }), tol, tol, name)
      S.assert_close(S.noncontiguous(t64)[name](S.noncontiguous(t64)), S.nest(expected, { 3, 4 }), tol, tol, name .. ' strided')
      local t32 = t64:float()
      S.assert_close(t32[name](t32), S.nest(expected, { 3, 4 }), 2e-6, 2e-6, name .. ' float32')
    end
  end)

  it('round() rounds half to even, like PyTorch', function()
    assert.same({ 0, 2, 2, -0, -2 }, T.tensor{ 0.5, 1.5, 2.5, -0.5, -2.5 }:round():totable())
  end)

  it('transcendental ops of integer tensors give float32', function()
    local i = T.tensor({ 1, 4 }, { dtype = 'int64' })
    assert.equal('float32', i:sqrt().dtype)
    S.assert_close(i:sqrt(), { 1, 2 })
    assert.equal('int64', i:abs().dtype)
  end)

  it('binary ops broadcast like NumPy over non-contiguous inputs', function()
    local a, fa = S.rand_tensor({ 3, 1, 4 }, 1)
    local b, fb = S.rand_tensor({ 2, 1 }, 2)
    local expected = {}
    for i = 0, 2 do for j = 0, 1 do for k = 0, 3 do
      expected[#expected + 1] = fa[i * 4 + k + 1] * fb[j + 1]
    end end end
    local out = a * b
    assert.same({ 3, 2, 4 }, { out:size(0), out:size(1), out:size(2) })
    S.assert_close(out, expected, 1e-15)
    S.assert_close(S.noncontiguous(a) * S.noncontiguous(b), expected, 1e-15)
    S.assert_error(function() return a + T.zeros(3) end, 'add', '[3,1,4]', '[3]', 'broadcast')
  end)

  it('binary ops match references: arithmetic, pow, floor semantics, NaN-propagating max/min', function()
    local a = T.tensor({ 7, -7, 7, -7, 2.5 }, { dtype = 'float64' })
    local b = T.tensor({ 2, 2, -2, -2, 0.5 }, { dtype = 'float64' })
    assert.same({ 1, 1, -1, -1, 0 }, a:remainder(b):totable())
    assert.same({ 3, -4, -4, 3, 5 }, a:floor_divide(b):totable())
    S.assert_close(a:pow(b), { 49, 49, 1 / 49, 1 / 49, math.sqrt(2.5) }, 1e-15)
    local n = T.tensor{ 0 / 0, 1, 3 }
    local m = n:maximum(T.tensor{ 2, 0 / 0, 1 }):totable()
    assert.is_true(m[1] ~= m[1] and m[2] ~= m[2]); assert.equal(3, m[3])
    local ai = T.tensor({ 7, -7, 7, -7 }, { dtype = 'int64' })
    local bi = T.tensor({ 2, 2, -2, -2 }, { dtype = 'int64' })
    assert.same({ 1, 1, -1, -1 }, ai:remainder(bi):totable())
    assert.same({ 3, -4, -4, 3 }, ai:floor_divide(bi):totable())
    assert.same({ 49, 49, 49, 49 }, ai:pow(2):totable())
    S.assert_error(function() ai:floor_divide(T.zeros({ 4 }, { dtype = 'int64' })) end, 'floor_divide', 'division by zero')
  end)

  it('comparisons and logical ops give bool', function()
    local a, b = T.tensor{ 1, 2, 3 }, T.tensor{ 3, 2, 1 }
    assert.same({ true, false, false }, a:lt(b):totable())
    assert.same({ false, true, false }, a:eq(b):totable())
    assert.same({ false, true, true }, a:ge(b):totable())
    assert.same({ true, true, false }, a:le(2):totable())
    assert.same({ true, false }, T.tensor{ 1, 0 }:logical_and(T.tensor{ 2, 2 }):totable())
    assert.same({ false, true }, T.tensor{ 1, 0 }:logical_not():totable())
  end)

  it('operators: + - * / % ^ and unary minus, with numbers on either side', function()
    local a = T.tensor{ 1, 2, 4 }
    S.assert_close(a + 1, { 2, 3, 5 }); S.assert_close(1 + a, { 2, 3, 5 })
    S.assert_close(10 - a, { 9, 8, 6 }); S.assert_close(a - 10, { -9, -8, -6 })
    S.assert_close(2 * a, { 2, 4, 8 }); S.assert_close(8 / a, { 8, 4, 2 })
    S.assert_close(a % 3, { 1, 2, 1 }); S.assert_close(a ^ 2, { 1, 4, 16 }); S.assert_close(2 ^ a, { 2, 4, 16 })
    S.assert_close(-a, { -1, -2, -4 })
    S.assert_error(function() return a + 'x' end, 'add', 'expected a tensor or a number')
  end)

  it('in-place ops write into the tensor and its views', function()
    local a = T.zeros(2, 3)
    a[0]:add_(1)
    a:mul_(T.tensor{ 1, 2, 3 })
    assert.same({ { 1, 2, 3 }, { 0, 0, 0 } }, a:totable())
    a:t():add_(1)
    assert.same({ { 2, 3, 4 }, { 1, 1, 1 } }, a:totable())
    a:exp_():log_()
    S.assert_close(a, { { 2, 3, 4 }, { 1, 1, 1 } }, 1e-6)
    S.assert_error(function() T.zeros(3):add_(T.zeros(2, 3)) end, 'add_', 'does not fit')
    S.assert_error(function() T.zeros(3):expand(2, 3):add_(1) end, 'broadcast view')
  end)

  it('where and clamp', function()
    local c = T.tensor{ true, false, true }
    assert.same({ 1, 20, 3 }, T.where(c, T.tensor{ 1, 2, 3 }, T.tensor{ 10, 20, 30 }):totable())
    assert.same({ 1, 0, 3 }, T.where(c, T.tensor{ 1, 2, 3 }, 0):totable())
    assert.same({ { 1, 5 }, { 1, 5 } }, T.where(T.tensor{ true, false }, 1, T.full({ 2, 1 }, 5)):totable())
    local x = T.tensor{ -2, 0.5, 3, 0 / 0 }
    local cl = x:clamp(-1, 1):totable()
    assert.same({ -1, 0.5, 1 }, { cl[1], cl[2], cl[3] }); assert.is_true(cl[4] ~= cl[4])
    assert.same({ 0, 0.5, 3 }, { unpack(x:clamp(0):totable(), 1, 3) })
    assert.same({ -2, 0.5, 1 }, { unpack(x:clamp(nil, 1):totable(), 1, 3) })
    S.assert_error(function() x:clamp() end, 'clamp', 'at least one')
  end)
end)

describe('type promotion', function()
  local function result(a, b) return T.ones({ 1 }, { dtype = a }):add(T.ones({ 1 }, { dtype = b })).dtype end

  it('follows torch.promote_types for tensor operands', function()
    assert.equal('float32', result('int64', 'float32'))
    assert.equal('float64', result('float32', 'float64'))
    assert.equal('float32', result('float16', 'bfloat16'))
    assert.equal('float16', result('float16', 'int64'))
    assert.equal('int64', result('int32', 'int64'))
    assert.equal('int32', result('uint8', 'int32'))
    assert.equal('uint8', result('bool', 'uint8'))
    assert.equal('bool', result('bool', 'bool'))
  end)

  it('treats numbers as weak scalars', function()
    assert.equal('float16', (T.ones(2, { dtype = 'float16' }) * 0.5).dtype)
    assert.equal('int64', (T.ones(2, { dtype = 'int64' }) * 2).dtype)
    assert.equal('float32', (T.ones(2, { dtype = 'int64' }) * 0.5).dtype)
    assert.equal('int64', (T.ones(2, { dtype = 'bool' }) + 1).dtype)
    assert.equal('int32', (3 - T.ones(2, { dtype = 'int32' })).dtype)
  end)

  it('division and transcendental functions of integers give float32', function()
    local i = T.tensor({ 1, 2 }, { dtype = 'int64' })
    assert.equal('float32', (i / 2).dtype)
    S.assert_close(i / 2, { 0.5, 1 })
  end)

  it('refuses in-place results that cannot be cast back', function()
    S.assert_error(function() T.ones(2, { dtype = 'int64' }):add_(0.5) end, 'add_', 'float32', 'int64')
    S.assert_error(function() T.ones(2, { dtype = 'bool' }):add_(1) end, 'add_', 'bool')
  end)

  it('computes float16 arithmetic in float32 and rounds once', function()
    local h = T.tensor({ 1, 2048 }, { dtype = 'float16' })
    S.assert_close((h + 1):double(), { 2, 2048 }, 0, 0) -- 2049 rounds to even: 2048
  end)
end)

describe('printing', function()
  it('shows values, dtype, device and shape', function()
    local s = tostring(T.tensor{ { 1, 2 }, { 3, 4.5 } })
    assert.truthy(s:find('[[1.0000, 2.0000],', 1, true))
    assert.truthy(s:find('float32 tensor on cpu, shape [2,2]', 1, true))
    assert.truthy(tostring(T.arange(3)):find('[0, 1, 2]', 1, true))
  end)

  it('elides the middle of large tensors', function()
    local s = tostring(T.arange(5000):view(50, 100))
    assert.truthy(s:find('...', 1, true))
    assert.truthy(s:find('4999', 1, true))
    assert.falsy(s:find('2500', 1, true))
  end)

  it('prints 0-d tensors and freed tensors', function()
    assert.truthy(tostring(T.tensor(3.5)):find('3.5000', 1, true))
    local t = T.zeros(2)
    t:free()
    assert.equal('tensor(freed)', tostring(t))
  end)
end)

describe('indexing syntax', function()
  it('reads and writes with numbers, ranges and negative indices', function()
    local a = T.arange(12):view(3, 4)
    assert.same({ 8, 9, 10, 11 }, a[-1]:totable())
    assert.same({ { 5, 6 }, { 9, 10 } }, a[{ { 1 }, { 1, 3 } }]:totable())
    assert.equal(7, a[{ 1, -1 }]:item())
    a[{ { 0, 2 }, 0 }] = 100
    a[2] = T.tensor({ 1, 2, 3, 4 }, { dtype = 'int64' })
    assert.same({ { 100, 1, 2, 3 }, { 100, 5, 6, 7 }, { 1, 2, 3, 4 } }, a:totable())
  end)
end)

describe('memory and lifetime', function()
  -- A full collection, then none until the test ends: a finalizer freeing an earlier test's garbage
  -- would move the byte counts between two readings.
  local function stop_collector()
    collectgarbage()
    collectgarbage('stop')
    finally(function() collectgarbage('restart') end)
  end

  it('free() releases at once and later use is an error', function()
    stop_collector()
    local before = T.memory_stats().live
    local t = T.zeros(1024, 1024)
    assert.is_true(T.memory_stats().live >= before + 4 * 1024 * 1024)
    t:free()
    assert.is_true(T.memory_stats().live < before + 4 * 1024 * 1024)
    S.assert_error(function() return t + 1 end, 'used after free')
    S.assert_error(function() return t:view(-1) end, 'used after free')
    S.assert_error(function() return T.where(T.ones(2):gt(0), 1, t) end, 'where', 'used after free')
    t:free() -- a second free is harmless
  end)

  it('caches large host blocks by size class for reuse until empty_cache()', function()
    local MB = 1024 * 1024
    local function held() local s = T.memory_stats(); return s.reserved - s.live end -- beyond live bytes
    stop_collector()
    T.empty_cache()
    local base = held() -- other live tensors' rounding up to their size class
    local t = T.empty(16 * MB) -- 64 MB: a size class of its own
    local live = T.memory_stats().live
    t:free()
    assert.equal(live - 64 * MB, T.memory_stats().live)
    assert.equal(base + 64 * MB, held()) -- cached, still reserved
    local reserved = T.memory_stats().reserved
    -- 62 MB rounds up to the same 64 MB class (eight classes per power of two): the cached block
    -- serves it, and the 2 MB it does not use still count as reserved
    local again = T.empty(62 * MB / 4)
    assert.equal(reserved, T.memory_stats().reserved)
    assert.equal(base + 2 * MB, held())
    -- 40 MB is another class: a fresh block
    local other = T.empty(40 * MB / 4)
    assert.equal(reserved + 40 * MB, T.memory_stats().reserved)
    again:free()
    other:free()
    T.empty_cache()
    assert.equal(base, held())
  end)

  it('out of memory, collects garbage and retries the call once; then names the request', function()
    collectgarbage()
    local base = T.memory_stats().live
    T.set_memory_limit(base + 40 * 2 ^ 20) -- 40 MB of room
    collectgarbage('stop')                  -- only the out-of-memory path may collect
    local ok, err = pcall(function()
      for _ = 1, 20 do
        local garbage = T.empty(4 * 2 ^ 20) -- 16 MB each, dropped at once
        assert(garbage)
      end
    end)
    collectgarbage('restart')
    local held = {}
    local ok2, err2 = pcall(function()
      for i = 1, 10 do held[i] = T.empty(4 * 2 ^ 20) end -- 16 MB each, all still referenced
    end)
    held = nil
    T.set_memory_limit(0)
    collectgarbage()
    assert(ok, err)
    assert.is_false(ok2)
    assert.truthy(tostring(err2):find('16777216 bytes would exceed the limit', 1, true), err2)
    S.assert_error(function() T.set_memory_limit(-1) end, 'set_memory_limit', '>= 0')
  end)

  it('retries the calls that return tensors through out-pointers (sort) the same way', function()
    local x = T.rand(2 ^ 20)
    local want_values, want_order = x:sort()
    collectgarbage()
    collectgarbage('stop') -- only the out-of-memory path may collect
    local ok, err = pcall(function()
      local garbage = T.empty(4 * 2 ^ 20) -- 16 MB the retry's collection frees
      garbage = nil
      T.set_memory_limit(T.memory_stats().live + 8 * 2 ^ 20) -- sort needs 4 MB values + 8 MB indices
      local got_values, got_order = x:sort()
      T.set_memory_limit(0)
      assert.is_true(got_values:eq(want_values):all():item())
      assert.is_true(got_order:eq(want_order):all():item())
    end)
    T.set_memory_limit(0)
    collectgarbage('restart')
    assert(ok, err)
  end)

  it('an allocation that succeeds keeps the error a failed call left', function()
    local core = require 'tessera.core'
    local lib, ffi = core.lib, core.ffi
    assert(lib.ts_mask_generate(9, 1, 2, 2, 0.75, nil, core.device('cpu')) == nil) -- leaves TS_ERR_ARG set
    local t = lib.ts_empty(1, ffi.new('int64_t[1]', 16), lib.TS_F32, ffi.new('ts_device', { lib.TS_CPU, 0 }))
    assert(t ~= nil)
    lib.ts_release(t)
    assert.equal(lib.TS_ERR_ARG, lib.ts_last_status()) -- a caller that allocates after a failure still reports it
    lib.ts_clear_error()
    -- such a caller: layer norm's backward allocates the small weight gradients after x's failed
    local N, C = 4096, 64
    local x, w, b = T.randn(N, C):requires_grad_(), T.ones(C):requires_grad_(), T.zeros(C):requires_grad_()
    local y, g = T.F.layer_norm(x, { C }, w, b), T.randn(N, C)
    stop_collector()
    T.set_memory_limit(T.memory_stats().live + N * C * 4 * 3 / 2) -- room for g's copy, not for x's gradient
    local ok, err = pcall(function() y:backward(g) end)
    T.set_memory_limit(0)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('would exceed the limit', 1, true), err)
    assert.is_nil(w.grad)
  end)

  it('views keep their storage alive after the base is freed', function()
    local a = T.arange(6):view(2, 3)
    local v = a[1]
    a:free()
    collectgarbage()
    assert.same({ 3, 4, 5 }, v:totable())
  end)

  it('steps the garbage collector by C-side bytes: 100 x 256 MB temporaries stay under 1 GB', function()
    collectgarbage()
    T.reset_peak_memory()
    local base = T.memory_stats().live
    for _ = 1, 100 do
      local tmp = T.empty(64 * 1024 * 1024) -- 256 MB, dropped without free()
      assert(tmp:numel() > 0)
    end
    local peak = T.memory_stats().peak - base
    assert.is_true(peak < 1024 * 1024 * 1024, string.format('peak %.0f MB', peak / 2 ^ 20))
  end)

  it('refuses absurd sizes with a message instead of crashing', function()
    S.assert_error(function() T.empty(2 ^ 40, 2 ^ 20) end, 'too many elements')
    S.assert_error(function() T.empty(2 ^ 45) end, 'absurd')
    S.assert_error(function() T.zeros(-1) end, 'non-negative')
    S.assert_error(function() T.zeros(1, 1, 1, 1, 1, 1, 1, 1, 1) end, 'at most 8')
  end)

  it('rejects wrong argument types with the op name', function()
    S.assert_error(function() T.zeros(2):add({}) end, 'add', 'expected a tensor or a number')
    S.assert_error(function() T.zeros(2, { dtype = 'float7' }) end, 'unknown dtype float7')
    S.assert_error(function() T.zeros(2, { device = 'tpu' }) end, 'unknown device tpu')
    S.assert_error(function() T.zeros(2):view(1.5) end, 'view', 'integer')
    S.assert_error(function() T.Tensor_is_not_a_thing() end)
  end)

  it('reports memory statistics and an ABI version matching the header', function()
    local s = T.memory_stats()
    assert.is_true(s.peak >= s.live and s.allocs > 0)
    assert.equal(tonumber(require('tessera.core').lib.TESSERA_ABI_VERSION), T.abi_version)
    assert.equal(2, T.abi_version) -- 2: the mask generators take a device
  end)
end)

describe('threads', function()
  it('gives identical results with 1 and with every thread', function()
    local a = T.linspace(-5, 5, 300000, { dtype = 'float64' })
    local n = T.get_num_threads()
    T.set_num_threads(1)
    local one = (a:gelu() * a + 1):totable()
    T.set_num_threads(0)
    local all = (a:gelu() * a + 1):totable()
    T.set_num_threads(n)
    assert.same(one, all)
  end)

  it('keeps working when fewer threads are wanted than workers were started', function()
    local a = T.linspace(-5, 5, 100000, { dtype = 'float64' })
    local n = T.get_num_threads()
    T.set_num_threads(1)
    local want = a:gelu() * a + 1
    T.set_num_threads(4)
    assert.is_false((a:gelu() * a + 1):ne(want):any():item())
    T.set_num_threads(2) -- the workers beyond the first now sit each job out
    for _ = 1, 200 do assert.is_false((a:gelu() * a + 1):ne(want):any():item()) end
    T.set_num_threads(n)
  end)
end)

describe('aliasing and extreme views', function()
  it('in-place ops read a source that overlaps the destination before writing it', function()
    local x = T.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = 'float64' })
    x:copy_(x:t())
    assert.same({ { 1, 3 }, { 2, 4 } }, x:totable())
    local y = T.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = 'float64' })
    y:add_(y:t())
    assert.same({ { 2, 5 }, { 5, 8 } }, y:totable())
  end)

  it('refuses as_strided views whose offsets overflow', function()
    local s = T.zeros({ 4 }, { dtype = 'uint8' })
    S.assert_error(function() s:as_strided({ 3 }, { 2 ^ 62 }, 0) end, 'as_strided', 'overflow')
  end)
end)
