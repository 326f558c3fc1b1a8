-- cuda_random_spec.lua — the CUDA Philox stream against the CPU's: for the same generator state
-- (seed, offset), uniform, bernoulli, randint and randperm draw bit-identical values on both
-- devices and normal agrees to the last place of CUDA's log/sin/cos; sizes not multiples of 4,
-- offsets whose 128-bit counter carries, every dtype a draw takes, non-contiguous targets, and
-- the generator advancing the same way. GPU targets are poisoned (NaN) first, so an element the
-- kernel skipped cannot pass. Pending without a GPU.
local each = require 'tessera.each'
local T = require 'tessera'
local ffi = require 'ffi'
local CS = require 'cuda_support'

local STATES = {
  { seed = 0, offset = 0 },
  { seed = 67280421310721, offset = 3 },
  { seed = 123456789, offset = 1000001 },
  { seed = ffi.new('uint64_t', 0xFEDCBA9876543210ULL), offset = 7 },
  -- the low 64 bits of the counter wrap inside the draw: blocks past it carry into the high half
  { seed = 42, offset = ffi.new('uint64_t', 0xFFFFFFFFFFFFFFFEULL) },
}
local SIZES = { { 1 }, { 3 }, { 5 }, { 6 }, { 4, 7 }, { 17, 3 }, { 1001 }, { 33, 129 } }

-- Draws with `fill(t, generator)` into a fresh CPU tensor and a poisoned GPU tensor from the same
-- state; returns both, after checking that the generators moved alike.
local function draw_both(shape, dtype, state, fill)
  local gc, gg = T.Generator(0):set_state(state), T.Generator(0):set_state(state)
  local c = T.empty(shape, { dtype = dtype })
  local g = CS.poison(T.empty(shape, { dtype = dtype, device = 'cuda' }))
  fill(c, gc)
  fill(g, gg)
  local sc, sg = gc:get_state(), gg:get_state()
  assert.equals(tostring(sc.offset), tostring(sg.offset))
  return c, g
end

local function label(state, shape)
  return string.format('seed %s, offset %s, shape [%s]', tostring(state.seed), tostring(state.offset),
    table.concat(shape, ','))
end

describe('cuda random streams match the cpu', function()
  teardown(function() CS.report('random') end)

  CS.it('uniform_ is bit-identical in every float dtype, and stays below high', function()
    for _, state in ipairs(STATES) do
      for _, shape in ipairs(SIZES) do
        for _, dtype in ipairs(CS.FLOATS) do
          for _, range in ipairs { { 0, 1 }, { -3, 5.5 }, { 0.999, 1 } } do
            local c, g = draw_both(shape, dtype, state, function(t, gen) t:uniform_(range[1], range[2], gen) end)
            CS.check('uniform (' .. label(state, shape) .. ')', g, c, { exact = true })
            assert.is_true(g:lt(range[2]):all():item(), 'uniform reached high')
          end
        end
      end
    end
  end)

  CS.it('normal_ agrees to the last place of the math library', function()
    for _, state in ipairs(STATES) do
      for _, shape in ipairs(SIZES) do
        for _, dtype in ipairs(CS.FLOATS) do
          local c, g = draw_both(shape, dtype, state, function(t, gen) t:normal_(0.5, 2, gen) end)
          -- float64: a few ulp; narrower dtypes: identical except for a rare rounding step
          CS.check('normal', g, c, { rtol = dtype == 'float64' and 1e-14 or nil, atol = dtype == 'float64' and 1e-14 or nil })
        end
      end
    end
  end)

  CS.it('bernoulli_ is bit-identical in floats, bool and integers', function()
    for _, state in ipairs(STATES) do
      for _, shape in ipairs(SIZES) do
        for _, dtype in ipairs { 'float32', 'float64', 'float16', 'bool', 'uint8', 'int64' } do
          for _, p in ipairs { 0, 0.3, 1 } do
            local c, g = draw_both(shape, dtype, state, function(t, gen) t:bernoulli_(p, gen) end)
            CS.check('bernoulli', g, c, { exact = true })
          end
        end
      end
    end
  end)

  CS.it('randint (random_) is bit-identical in every dtype it takes', function()
    local ranges = {
      int64 = { { 0, 10 }, { -1000000, 1000000 }, { -2 ^ 31, 2 ^ 32 - 2 ^ 31 } }, int32 = { { -5, 5 }, { 0, 2 ^ 31 - 1 } },
      uint8 = { { 0, 256 } }, bool = { { 0, 2 } }, float32 = { { -100, 100 } }, float64 = { { 0, 2 ^ 32 } },
      float16 = { { -2048, 2049 } }, bfloat16 = { { 0, 257 } },
    }
    for _, state in ipairs(STATES) do
      for _, shape in ipairs(SIZES) do
        for dtype, list in each(ranges) do
          for _, r in ipairs(list) do
            local c, g = draw_both(shape, dtype, state, function(t, gen) t:random_(r[1], r[2], gen) end)
            CS.check('randint', g, c, { exact = true })
          end
        end
      end
    end
  end)

  CS.it('randperm is the same permutation on both devices', function()
    for _, state in ipairs(STATES) do
      for _, n in ipairs { 1, 2, 5, 1000, 100003 } do
        local gc, gg = T.Generator(0):set_state(state), T.Generator(0):set_state(state)
        for _, dtype in ipairs { 'int64', 'int32', 'float32' } do
          local c = T.randperm(n, { dtype = dtype, generator = gc })
          local g = T.randperm(n, { dtype = dtype, generator = gg, device = 'cuda' })
          CS.check('randperm', g, c, { exact = true })
        end
      end
    end
  end)

  CS.it('non-contiguous targets get the stream in row-major order', function()
    local state = { seed = 99, offset = 5 }
    local c, g = draw_both({ 9, 14 }, 'float32', state, function(t, gen) t:t():uniform_(0, 1, gen) end)
    CS.check('uniform (transposed target)', g, c, { exact = true })
    c, g = draw_both({ 9, 14 }, 'float64', state, function(t, gen) t:slice(1, 1, nil, 3):normal_(0, 1, gen) end)
    CS.check('normal (strided target)', g:slice(1, 1, nil, 3), c:slice(1, 1, nil, 3), { rtol = 1e-14, atol = 1e-14 })
  end)

  CS.it('large draws: every element of ten million is the cpu one', function()
    local state = { seed = 7, offset = 11 }
    for _, dtype in ipairs { 'float32', 'float16' } do
      local c, g = draw_both({ 10000003 }, dtype, state, function(t, gen) t:uniform_(-1, 1, gen) end)
      assert.is_true(g:cpu():eq(c):all():item(), 'uniform ' .. dtype .. ': the draws differ')
    end
    local c, g = draw_both({ 10000003 }, 'int64', state, function(t, gen) t:random_(0, 1000, gen) end)
    assert.is_true(g:cpu():eq(c):all():item(), 'randint: the draws differ')
  end)

  CS.it('factories draw on the device from the default generator like the cpu', function()
    T.manual_seed(2024)
    local c = { T.rand(5, 3), T.randn(7), T.randint(0, 9, { 11 }), T.bernoulli(0.4, 6) }
    T.manual_seed(2024)
    local opts = { device = 'cuda' }
    local g = { T.rand(5, 3, opts), T.randn(7, opts), T.randint(0, 9, { 11 }, opts), T.bernoulli(0.4, 6, opts) }
    CS.check('rand', g[1], c[1], { exact = true })
    CS.check('randn', g[2], c[2])
    CS.check('randint', g[3], c[3], { exact = true })
    CS.check('bernoulli', g[4], c[4], { exact = true })
  end)
end)
