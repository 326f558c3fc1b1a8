-- random_spec.lua — Philox4x32-10 known answers, the stream definition, generators, statistics
-- and argument checks of the random functions.
local T = require 'tessera'
local S = require 'support'
local core = require 'tessera.core'
local ffi, C = core.ffi, core.C

-- The four lanes of one Philox block.
local function philox(seed, counter_lo, counter_hi)
  local out = ffi.new('uint32_t[4]')
  C.ts_philox4x32(seed, counter_lo, counter_hi or 0, out)
  return { out[0], out[1], out[2], out[3] }
end

-- Lane i % 4 of block offset + i/4: element i (0-based) of a draw starting at `offset`.
local function lane(seed, offset, i)
  return philox(seed, offset + math.floor(i / 4))[i % 4 + 1]
end

local values = S.values

local function mean_var(t)
  local buf, n = core.host_values(t)
  local s = 0
  for i = 0, n - 1 do s = s + buf[i] end
  local mean, ss = s / n, 0
  for i = 0, n - 1 do local d = buf[i] - mean; ss = ss + d * d end
  return mean, ss / n, n
end

local function assert_within(x, expected, sigma, what)
  assert(math.abs(x - expected) <= 5 * sigma,
    string.format('%s: %.6g is more than 5 sigma (%.3g) from %.6g', what, x, sigma, expected))
end

describe('philox4x32-10', function()
  it('matches the Random123 known-answer vectors', function()
    assert.same({ 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8 }, philox(0ULL, 0ULL, 0ULL))
    assert.same({ 0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd },
      philox(0xffffffffffffffffULL, 0xffffffffffffffffULL, 0xffffffffffffffffULL))
    -- counter words {243f6a88, 85a308d3, 13198a2e, 03707344}, key words {a4093822, 299f31d0}
    assert.same({ 0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1 },
      philox(0x299f31d0a4093822ULL, 0x85a308d3243f6a88ULL, 0x0370734413198a2eULL))
  end)
end)

describe('the stream definition', function()
  local seed, offset = 42, 7
  local function gen() return T.Generator(seed):set_state { seed = seed, offset = offset } end

  it('uniform float64 is lane * 2^-32 and float32 the top 24 bits * 2^-24', function()
    local d = values(T.rand(9, { dtype = 'float64', generator = gen() }))
    local f = values(T.rand(9, { dtype = 'float32', generator = gen() }))
    for i = 0, 8 do
      local x = lane(seed, offset, i)
      assert.equal(x * 2 ^ -32, d[i + 1])
      assert.equal(math.floor(x / 256) * 2 ^ -24, f[i + 1])
    end
  end)

  it('uniform_(low, high) scales into [low, high)', function()
    local d = values(T.empty(6, { dtype = 'float64' }):uniform_(-3, 5, gen()))
    for i = 0, 5 do assert.equal(-3 + 8 * (lane(seed, offset, i) * 2 ^ -32), d[i + 1]) end
  end)

  it('normal is Box-Muller on lane pairs of a block', function()
    local z = values(T.randn(8, { dtype = 'float64', generator = gen() }))
    for i = 0, 7, 2 do
      local u1 = (lane(seed, offset, i) + 1) * 2 ^ -32
      local u2 = lane(seed, offset, i + 1) * 2 ^ -32
      local r = math.sqrt(-2 * math.log(u1))
      S.assert_close(z[i + 1], r * math.cos(2 * math.pi * u2), 1e-12, 1e-12)
      S.assert_close(z[i + 2], r * math.sin(2 * math.pi * u2), 1e-12, 1e-12)
    end
  end)

  it('randint is low + floor(x * range / 2^32), bernoulli is x * 2^-32 < p', function()
    local r = values(T.randint(-5, 1000, { 10 }, { generator = gen() }))
    local b = values(T.empty(10):bernoulli_(0.4, gen()))
    for i = 0, 9 do
      local x = lane(seed, offset, i)
      assert.equal(-5 + math.floor(x * 1005 / 2 ^ 32), r[i + 1])
      assert.equal(x * 2 ^ -32 < 0.4 and 1 or 0, b[i + 1])
    end
  end)

  it('randperm is the stable sort order of randint keys over [0, 2^32)', function()
    local keys = values(T.randint(0, 2 ^ 32, { 50 }, { generator = gen() }))
    local order = {}
    for i = 1, 50 do order[i] = i - 1 end
    table.sort(order, function(p, q)
      if keys[p + 1] ~= keys[q + 1] then return keys[p + 1] < keys[q + 1] end
      return p < q
    end)
    assert.same(order, values(T.randperm(50, { generator = gen() })))
  end)

  it('a draw of n elements advances the offset by ceil(n/4)', function()
    local g = T.Generator(3)
    for _, n in ipairs { 1, 4, 5, 8, 13 } do
      local before = g:get_state().offset
      T.rand(n, { generator = g })
      assert.equal(before + math.ceil(n / 4), g:get_state().offset)
    end
    local before = g:get_state().offset
    T.rand(0, { generator = g })
    assert.equal(before, g:get_state().offset)
  end)

  it('splitting a draw after a multiple of 4 elements gives the same numbers', function()
    local whole = values(T.rand(13, { generator = T.Generator(9) }))
    local g = T.Generator(9)
    local first, second = values(T.rand(8, { generator = g })), values(T.rand(5, { generator = g }))
    for i = 1, 5 do first[#first + 1] = second[i] end
    assert.same(whole, first)
  end)

  it('fills non-contiguous tensors in row-major order', function()
    local expected = values(T.rand(4, 6, { generator = T.Generator(5) }))
    local base = T.zeros(6, 4)
    local view = base:t()
    view:uniform_(0, 1, T.Generator(5))
    assert.same(expected, values(view))
    local strided = T.zeros(4, 12):slice(1, 0, nil, 2)
    strided:uniform_(0, 1, T.Generator(5))
    assert.same(expected, values(strided))
  end)

  it('does not depend on the number of threads', function()
    local threads = T.get_num_threads()
    T.set_num_threads(1)
    local one = T.randn(100003, { generator = T.Generator(11) })
    T.set_num_threads(2)
    local two = T.randn(100003, { generator = T.Generator(11) })
    T.set_num_threads(threads)
    assert.is_true(one:eq(two):all():item())
  end)
end)

describe('generators', function()
  it('manual_seed makes draws repeatable', function()
    T.manual_seed(123)
    local a = values(T.rand(10))
    T.manual_seed(123)
    assert.same(a, values(T.rand(10)))
    assert.equal(123, T.initial_seed())
    assert.are_not.same(a, values(T.rand(10)))
  end)

  it('get_state and set_state replay the stream', function()
    local g = T.Generator(77)
    T.rand(7, { generator = g })
    local state = g:get_state()
    assert.same({ seed = 77, offset = 2 }, state)
    local a = values(T.randn(20, { generator = g }))
    g:set_state(state)
    assert.same(a, values(T.randn(20, { generator = g })))
    T.set_rng_state(state)
    assert.same(a, values(T.randn(20)))
    assert.same({ seed = 77, offset = 7 }, T.get_rng_state())
  end)

  it('keep their own streams apart from the default generator', function()
    T.manual_seed(1)
    local before = T.get_rng_state()
    T.rand(100, { generator = T.Generator(1) })
    assert.same(before, T.get_rng_state())
  end)

  it('accept 64-bit seeds and report them exactly', function()
    local g = T.Generator(0xfedcba9876543210ULL)
    assert.equal(0xfedcba9876543210ULL, g:initial_seed())
    g:manual_seed(-1)
    assert.equal(0xffffffffffffffffULL, g:get_state().seed)
    assert.truthy(tostring(g):find('Generator%(seed='))
  end)

  it('seed() picks a fresh seed and returns it', function()
    local g = T.Generator(0)
    local s = g:seed()
    assert.equal(s, g:initial_seed())
    assert.equal(0, g:get_state().offset)
  end)

  -- dropout draws its mask (1 MB), then allocates its output (4 MB): out of memory after the draw
  it('stay where they were when a call fails after drawing, so the out-of-memory retry draws the same', function()
    local F = T.F
    local x = T.ones(2 ^ 20)
    local g = T.Generator(5)
    local want = F.dropout(x, 0.5, true, g)
    local after = g:get_state()
    g:set_state { seed = 5, offset = 0 }
    collectgarbage()
    collectgarbage('stop') -- only the out-of-memory path may collect
    local ok, err = pcall(function()
      T.set_memory_limit(T.memory_stats().live + 2 * 2 ^ 20)
      local failed = pcall(F.dropout, x, 0.5, true, g) -- fails twice: nothing to collect
      assert(not failed, 'dropout fitted under the limit')
      assert.same({ seed = 5, offset = 0 }, g:get_state())
      T.set_memory_limit(0)
      local garbage = T.empty(2 * 2 ^ 20) -- 8 MB the retry's collection frees
      garbage = nil
      T.set_memory_limit(T.memory_stats().live + 2 * 2 ^ 20)
      local got = F.dropout(x, 0.5, true, g) -- the first try fails after drawing, the retry succeeds
      T.set_memory_limit(0)
      assert.same(values(want), values(got))
      assert.same(after, g:get_state())
    end)
    T.set_memory_limit(0)
    collectgarbage('restart')
    assert(ok, err)
  end)

  it('give clear errors for bad arguments', function()
    S.assert_error(function() T.Generator(1.5) end, 'Generator', 'seed must be an integer')
    S.assert_error(function() T.Generator(1):set_state(5) end, 'set_state', 'seed = ..., offset = ...')
    S.assert_error(function() T.rand(3, { generator = 'g' }) end, 'rand: expected a Generator, got string')
    S.assert_error(function() T.zeros(2):normal_(0, 1, 42) end, 'normal_: expected a Generator, got number')
  end)
end)

describe('statistics over 1e6 samples', function()
  local N = 1000000
  before_each(function() T.manual_seed(2024) end)

  it('uniform: mean 1/2, variance 1/12, all in [0, 1)', function()
    for _, dtype in ipairs { 'float32', 'float64' } do
      local t = T.rand(N, { dtype = dtype })
      local mean, var = mean_var(t)
      assert_within(mean, 0.5, math.sqrt(1 / 12 / N), dtype .. ' mean')
      assert_within(var, 1 / 12, math.sqrt((1 / 80 - 1 / 144) / N), dtype .. ' variance')
      assert.is_true(t:ge(0):logical_and(t:lt(1)):all():item())
    end
  end)

  it('uniform_(low, high) stays in [low, high) with the right mean', function()
    local t = T.empty(N, { dtype = 'float64' }):uniform_(-2, 6)
    local mean = mean_var(t)
    assert_within(mean, 2, 8 * math.sqrt(1 / 12 / N), 'mean')
    assert.is_true(t:ge(-2):logical_and(t:lt(6)):all():item())
  end)

  it('normal: mean and variance as asked', function()
    for _, dtype in ipairs { 'float32', 'float64' } do
      local t = T.empty(N, { dtype = dtype }):normal_(3, 2)
      local mean, var = mean_var(t)
      assert_within(mean, 3, 2 / math.sqrt(N), dtype .. ' mean')
      assert_within(var, 4, 4 * math.sqrt(2 / N), dtype .. ' variance')
    end
  end)

  it('bernoulli: the rate is p', function()
    local t = T.bernoulli(0.3, N)
    local mean = mean_var(t)
    assert_within(mean, 0.3, math.sqrt(0.3 * 0.7 / N), 'rate')
  end)

  it('randint: uniform over its buckets (chi-square)', function()
    local k, n = 10, 100000
    local counts = {}
    for i = 0, k - 1 do counts[i] = 0 end
    local buf = core.host_values(T.randint(0, k, { n }))
    for i = 0, n - 1 do counts[buf[i]] = counts[buf[i]] + 1 end
    local chi2, e = 0, n / k
    for i = 0, k - 1 do chi2 = chi2 + (counts[i] - e) ^ 2 / e end
    assert_within(chi2, k - 1, math.sqrt(2 * (k - 1)), 'chi-square')
  end)

  it('randperm: a permutation of 0 .. n-1', function()
    local n = 10000
    local seen = {}
    for _, v in ipairs(values(T.randperm(n))) do
      assert.is_nil(seen[v])
      seen[v] = true
    end
    for i = 0, n - 1 do assert.is_true(seen[i]) end
  end)
end)

describe('dtypes and shapes', function()
  it('rand and randn in every floating dtype', function()
    for _, dtype in ipairs { 'float16', 'bfloat16', 'float32', 'float64' } do
      local t = T.rand(2, 3, { dtype = dtype })
      assert.equal(dtype, t.dtype)
      assert.same({ 2, 3 }, { t.shape[1], t.shape[2] })
      assert.is_true(t:ge(0):logical_and(t:lt(1)):all():item())
      assert.equal(dtype, T.randn({ 4 }, { dtype = dtype }).dtype)
    end
  end)

  it('uniform_ never reaches high, even after rounding to a narrow dtype', function()
    -- 1 - 2^-24 rounds to 1.0 in float16 and bfloat16: those draws must land below high.
    for _, dtype in ipairs { 'float16', 'bfloat16', 'float32' } do
      local t = T.empty(200000, { dtype = dtype }):uniform_(0, 1, T.Generator(1))
      assert.is_true(t:lt(1):all():item(), dtype)
      local u = T.empty(200000, { dtype = dtype }):uniform_(1000, 1001, T.Generator(1))
      assert.is_true(u:lt(1001):logical_and(u:ge(1000)):all():item(), dtype)
    end
    assert.same({ 2, 2 }, values(T.empty(2):uniform_(2, 2)))
  end)

  it('randint and random_ fill integer, bool and float tensors', function()
    for _, dtype in ipairs { 'int64', 'int32', 'uint8', 'float32', 'float64', 'float16' } do
      local t = T.randint(3, 9, { 1000 }, { dtype = dtype })
      assert.equal(dtype, t.dtype)
      assert.is_true(t:ge(3):logical_and(t:lt(9)):all():item(), dtype)
      assert.is_true(t:eq(t:floor()):all():item(), dtype)
    end
    local b = T.empty(100, { dtype = 'bool' }):random_()
    assert.equal('bool', b.dtype)
    local u = T.empty(1000, { dtype = 'uint8' }):random_()
    assert.is_true(u:ge(0):logical_and(u:le(255)):all():item())
    local h = T.empty(1000, { dtype = 'int32' }):random_(7)
    assert.is_true(h:ge(0):logical_and(h:lt(7)):all():item())
    local neg = T.empty(1000, { dtype = 'int64' }):random_(-2 ^ 31, 2 ^ 31)
    assert.is_true(neg:lt(0):any():item())
    assert.same({ 5 }, { T.randint(10, { 5 }).shape[1] })  -- randint(high, shape)
  end)

  it('randint covers a full 2^32 range', function()
    local t = T.randint(-2 ^ 31, 2 ^ 31, { 10000 }, { generator = T.Generator(4) })
    assert.is_true(t:lt(0):any():item() and t:gt(2 ^ 30):any():item())
  end)

  it('bernoulli fills any dtype; p = 0 and p = 1 are exact', function()
    for _, dtype in ipairs { 'bool', 'uint8', 'int64', 'float16', 'float64' } do
      local t = T.empty(1000, { dtype = dtype })
      t:bernoulli_(0)
      assert.is_false(t:ne(0):any():item(), dtype)
      t:bernoulli_(1)
      assert.is_true(t:eq(1):all():item(), dtype)
    end
  end)

  it('bernoulli with a tensor of probabilities', function()
    local probs = T.tensor({ { 0, 1, 0, 1 }, { 1, 0, 1, 0 } }, { dtype = 'float64' })
    local draw = T.bernoulli(probs)
    assert.equal('float64', draw.dtype)
    assert.same(probs:totable(), draw:totable())
    local many = T.full({ 200000 }, 0.25):bernoulli()
    assert_within(mean_var(many), 0.25, math.sqrt(0.25 * 0.75 / 200000), 'rate')
    local into = T.zeros(2, 4, { dtype = 'int32' }):bernoulli_(probs)
    assert.same(probs:totable(), into:double():totable())
    local row = T.zeros(3, 4):bernoulli_(T.tensor({ 1, 0, 1, 0 }))
    assert.same({ 1, 0, 1, 0 }, row[2]:totable())
  end)

  it('randperm in other dtypes and of 0 and 1 elements', function()
    assert.equal('int32', T.randperm(5, { dtype = 'int32' }).dtype)
    local f = T.randperm(100, { dtype = 'float32' })
    local seen = {}
    for _, v in ipairs(values(f)) do seen[v] = true end
    for i = 0, 99 do assert.is_true(seen[i]) end
    assert.equal(0, T.randperm(0):numel())
    assert.same({ 0 }, values(T.randperm(1)))
  end)
end)

describe('bad input', function()
  it('distributions need floating tensors where values are fractional', function()
    S.assert_error(function() T.zeros(3, { dtype = 'int64' }):normal_() end,
      'normal_: expected a floating-point tensor, got int64')
    S.assert_error(function() T.zeros(3, { dtype = 'int32' }):uniform_() end,
      'uniform_: expected a floating-point tensor, got int32')
    S.assert_error(function() T.rand(3, { dtype = 'int64' }) end, 'uniform_', 'int64')
  end)

  it('parameters out of range', function()
    S.assert_error(function() T.zeros(3):normal_(0, -1) end, 'normal_: std must be a non-negative finite number, got -1')
    S.assert_error(function() T.zeros(3):normal_(0 / 0, 1) end, 'normal_: mean must be finite')
    S.assert_error(function() T.zeros(3):bernoulli_(1.5) end, 'bernoulli_: p must be in [0, 1], got 1.5')
    S.assert_error(function() T.zeros(3):bernoulli_(-0.1) end, 'bernoulli_: p must be in [0, 1]')
    S.assert_error(function() T.bernoulli(T.tensor { 0.5, 2 }) end, 'bernoulli: probabilities must be in [0, 1]')
    S.assert_error(function() T.zeros(3):uniform_(2, 1) end, 'uniform_: low (2) must not exceed high (1)')
    S.assert_error(function() T.zeros(3):uniform_(0, math.huge) end, 'uniform_: low and high must be finite')
    S.assert_error(function() T.zeros(3, { dtype = 'float16' }):uniform_(0, 1e6) end, 'outside the range of float16')
    S.assert_error(function() T.zeros(3):uniform_('a') end, 'uniform_: low must be a number, got string')
  end)

  it('randint bounds', function()
    S.assert_error(function() T.randint(5, 5, { 3 }) end, 'randint: low (5) must be less than high (5)')
    S.assert_error(function() T.randint(0, 2 ^ 32 + 1, { 3 }) end,
      'randint: the range [0, 4294967297) has 4294967297 values; at most 2^32 are supported')
    S.assert_error(function() T.randint(0, 300, { 3 }, { dtype = 'uint8' }) end,
      'randint: values in [0, 300) do not fit uint8')
    S.assert_error(function() T.randint(0, 2 ^ 60, { 3 }) end, 'beyond +-2^53')
    S.assert_error(function() T.randint(0, 1.5, { 3 }) end, 'randint: expected an integer, got 1.5')
    S.assert_error(function() T.zeros(3, { dtype = 'int64' }):random_() end,
      'random_: the whole int64 range needs more than 32 random bits')
  end)

  it('randperm arguments', function()
    S.assert_error(function() T.randperm(-1) end, 'randperm: n must be non-negative, got -1')
    S.assert_error(function() T.randperm(300, { dtype = 'uint8' }) end, 'randperm: n = 300 does not fit uint8')
  end)

  it('leaves that require grad are initialised under no_grad', function()
    local w = T.zeros(3, 4):requires_grad_()
    S.assert_error(function() w:normal_() end, 'normal_: a leaf tensor that requires grad cannot be modified in place')
    T.no_grad(function() w:uniform_(-1, 1) end)
    assert.is_true(w:ne(0):all():item())
    assert.is_true(w.requires_grad)
  end)

  it('targets that cannot be written and freed tensors', function()
    local x = T.zeros(1, 3):expand(4, 3)
    S.assert_error(function() x:uniform_() end, 'uniform_: the tensor [4,3] is a broadcast view')
    local t = T.zeros(3)
    t:free()
    S.assert_error(function() t:normal_() end, 'normal_: tensor used after free()')
    S.assert_error(function() T.bernoulli(t) end, 'bernoulli: tensor used after free()')
  end)
end)
