-- tessera.random — generators and random tensors on the counter-based Philox4x32-10 stream.
--
-- A generator is a (seed, offset) pair: each draw of n elements reads the stream at the offset and
-- advances it by ceil(n/4), so a state saved with get_state and restored with set_state replays the
-- same numbers, on the CPU and on a GPU alike (the stream is defined in runtime/random.c).
-- Functions that draw take an optional generator (opts.generator, or a trailing argument for the
-- in-place methods); without one they use the default generator, seeded with 67280421310721.
local core = require 'tessera.core'
local ffi, C, T, Tensor = core.ffi, core.C, core.T, core.Tensor
local wrap, handle, check = core.wrap, core.handle, core.check

local TWO_POW_53 = 2 ^ 53

-- ---- seeds -------------------------------------------------------------------------------------
-- A seed is an integer number (negative ones wrap around, as in PyTorch) or a 64-bit cdata.
local function to_u64(x, what)
  if type(x) == 'cdata' and (ffi.istype('uint64_t', x) or ffi.istype('int64_t', x)) then
    return ffi.cast('uint64_t', x)
  end
  if not core.is_integer(x) or x >= 2 ^ 64 or x < -2 ^ 63 then
    error(string.format('%s: seed must be an integer in [-2^63, 2^64), got %s', what, tostring(x)), 0)
  end
  if x < 0 then return ffi.cast('uint64_t', ffi.cast('int64_t', x)) end
  return ffi.cast('uint64_t', x)
end

-- A uint64 as a plain number when that is exact, else as the cdata.
local function from_u64(x)
  if x < TWO_POW_53 then return tonumber(x) end
  return x
end

-- 64 bits from the operating system, for seed() without a fixed value.
local function fresh_seed()
  local f = io.open('/dev/urandom', 'rb')
  if f then
    local bytes = f:read(8)
    f:close()
    if bytes and #bytes == 8 then
      local v = ffi.new('uint64_t[1]')
      ffi.copy(v, bytes, 8)
      return v[0]
    end
  end
  return ffi.cast('uint64_t', os.time()) * 6364136223846793005ULL + ffi.cast('uint64_t', os.clock() * 1e9)
end

-- ---- Generator ---------------------------------------------------------------------------------
local Generator = {}
Generator.__index = Generator
Generator.__tostring = function(g)
  local s = g:get_state()
  return string.format('Generator(seed=%s, offset=%s)', tostring(s.seed), tostring(s.offset))
end

local function is_generator(x) return getmetatable(x) == Generator end
T.is_generator = is_generator

-- T.Generator(seed): a generator of its own (seed defaults to the default generator's default).
function T.Generator(seed)
  local h = C.ts_generator_new(seed == nil and 67280421310721ULL or to_u64(seed, 'Generator'))
  if h == nil then core.raise() end
  return setmetatable({ h = ffi.gc(h, C.ts_generator_free) }, Generator)
end

-- The default generator: owned by the library, never freed.
T.default_generator = setmetatable({ h = C.ts_default_generator() }, Generator)

function Generator:get_state()
  local seed, offset = ffi.new('uint64_t[1]'), ffi.new('uint64_t[1]')
  C.ts_generator_get_state(self.h, seed, offset)
  return { seed = from_u64(seed[0]), offset = from_u64(offset[0]) }
end

function Generator:set_state(state)
  if type(state) ~= 'table' or state.seed == nil or state.offset == nil then
    error('set_state: expected a table {seed = ..., offset = ...} as get_state returns', 0)
  end
  C.ts_generator_set_state(self.h, to_u64(state.seed, 'set_state'), to_u64(state.offset, 'set_state'))
  return self
end

-- Restarts the stream from `seed` (offset 0).
function Generator:manual_seed(seed)
  C.ts_generator_set_state(self.h, to_u64(seed, 'manual_seed'), 0)
  return self
end

-- Reseeds from the operating system's entropy and returns the new seed, as torch's seed().
function Generator:seed()
  local s = fresh_seed()
  C.ts_generator_set_state(self.h, s, 0)
  return from_u64(s)
end

function Generator:initial_seed() return self:get_state().seed end

function T.manual_seed(seed) return T.default_generator:manual_seed(seed) end
function T.seed() return T.default_generator:seed() end
function T.initial_seed() return T.default_generator:initial_seed() end
function T.get_rng_state() return T.default_generator:get_state() end
function T.set_rng_state(state) return T.default_generator:set_state(state) end

-- The C generator of an optional argument: nil, a Generator, or a table with a generator field.
local function generator_handle(g, what)
  if g == nil then return nil end
  if type(g) == 'table' and not is_generator(g) and g.generator ~= nil then g = g.generator end
  if not is_generator(g) then
    error(string.format('%s: expected a Generator, got %s', what, type(g)), 0)
  end
  return g.h
end

local function number(x, what, name)
  if type(x) ~= 'number' then
    error(string.format('%s: %s must be a number, got %s', what, name, type(x)), 0)
  end
  return x
end

-- ---- in-place fills ----------------------------------------------------------------------------
function Tensor.uniform_(t, low, high, gen)
  low, high = low or 0, high or 1
  check(C.ts_uniform_(handle(t, 'uniform_'), number(low, 'uniform_', 'low'), number(high, 'uniform_', 'high'),
    generator_handle(gen, 'uniform_')))
  return t
end

function Tensor.normal_(t, mean, std, gen)
  mean, std = mean or 0, std or 1
  check(C.ts_normal_(handle(t, 'normal_'), number(mean, 'normal_', 'mean'), number(std, 'normal_', 'std'),
    generator_handle(gen, 'normal_')))
  return t
end

-- Per-element probabilities: 1 where a uniform float64 draw (x * 2^-32, as the scalar form
-- uses) lies below the probability. The probabilities must lie in [0, 1].
local function bernoulli_from(probs, gen, what)
  local hp = handle(probs, what)
  local bad = Tensor.lt(probs, 0):logical_or(Tensor.gt(probs, 1)):logical_or(Tensor.isnan(probs))
  if bad:any():item() then
    error(what .. ': probabilities must be in [0, 1]', 0)
  end
  local u = wrap(C.ts_empty(C.ts_ndim(hp), C.ts_shape(hp), C.TS_F64, C.ts_device_of(hp)))
  Tensor.uniform_(u, 0, 1, gen)
  return Tensor.lt(u, probs)
end

-- t:bernoulli_(p = 0.5, gen): p a number, or a tensor of probabilities broadcast to t.
function Tensor.bernoulli_(t, p, gen)
  local h = handle(t, 'bernoulli_')
  if p == nil then p = 0.5 end
  if core.is_tensor(p) then
    local probs = Tensor.expand_as(p, t)
    return Tensor.copy_(t, bernoulli_from(probs, gen, 'bernoulli_'))
  end
  check(C.ts_bernoulli_(h, number(p, 'bernoulli_', 'p'), generator_handle(gen, 'bernoulli_')))
  return t
end

-- The integer bounds random_() uses without arguments: [0, 2^mantissa] for floats, the whole
-- non-negative range for integers (as torch); int64 and float64 would need more than 32 bits.
local full_range = {
  float32 = 2 ^ 24 + 1, float16 = 2 ^ 11 + 1, bfloat16 = 2 ^ 8 + 1,
  int32 = 2 ^ 31, uint8 = 256, bool = 2,
}

-- t:random_(high) draws from [0, high); t:random_(low, high) from [low, high); t:random_() see
-- full_range. A Generator may follow the bounds.
function Tensor.random_(t, a, b, gen)
  local h = handle(t, 'random_')
  if is_generator(a) then a, b, gen = nil, nil, a
  elseif is_generator(b) then b, gen = nil, b end
  local low, high
  if a == nil then
    local dt = core.dtype_names[C.ts_dtype_of(h)]
    high = full_range[dt]
    if not high then
      error(string.format('random_: the whole %s range needs more than 32 random bits; give bounds: random_(low, high)', dt), 0)
    end
    low = 0
  elseif b == nil then
    low, high = 0, a
  else
    low, high = a, b
  end
  check(C.ts_randint_(h, core.int(low, 'random_'), core.int(high, 'random_'), generator_handle(gen, 'random_')))
  return t
end

-- ---- factories ---------------------------------------------------------------------------------
local function new_tensor(what, shape, opts, default_dtype)
  local arr, n = core.shape_array(shape, what)
  local dtype = opts.dtype and core.dtype(opts.dtype, what) or default_dtype or core.dtype()
  return wrap(C.ts_empty(n, arr, dtype, core.device(opts.device, what)))
end

-- T.rand(2, 3), T.rand({2, 3}, {dtype =, device =, generator =}): uniform on [0, 1).
function T.rand(...)
  local shape, opts = core.size_args('rand', ...)
  local t = new_tensor('rand', shape, opts)
  check(C.ts_uniform_(t.h, 0, 1, generator_handle(opts.generator, 'rand')))
  return t
end

-- T.randn(...): standard normal.
function T.randn(...)
  local shape, opts = core.size_args('randn', ...)
  local t = new_tensor('randn', shape, opts)
  check(C.ts_normal_(t.h, 0, 1, generator_handle(opts.generator, 'randn')))
  return t
end

-- T.randint(low, high, shape, opts) or T.randint(high, shape, opts): integers in [low, high),
-- int64 unless opts.dtype says otherwise.
function T.randint(low, high, ...)
  local rest, count
  if type(high) == 'table' and not core.is_tensor(high) then
    low, high, rest, count = 0, low, { high, ... }, select('#', ...) + 1
  else
    rest, count = { ... }, select('#', ...)
  end
  local shape, opts = core.size_args('randint', unpack(rest, 1, count))
  local t = new_tensor('randint', shape, opts, C.TS_I64)
  check(C.ts_randint_(t.h, core.int(low, 'randint'), core.int(high, 'randint'),
    generator_handle(opts.generator, 'randint')))
  return t
end

-- T.randperm(n, opts): a random permutation of 0 .. n-1 (int64 unless opts.dtype says otherwise).
function T.randperm(n, opts)
  opts = opts or {}
  local dtype = opts.dtype and core.dtype(opts.dtype, 'randperm') or C.TS_I64
  return wrap(C.ts_randperm(core.int(n, 'randperm'), dtype, generator_handle(opts.generator, 'randperm'),
    core.device(opts.device, 'randperm')))
end

-- T.bernoulli(probs, opts): 0/1 with per-element probabilities, in probs' dtype.
-- T.bernoulli(p, shape..., opts): 0/1 with probability p, in opts.dtype (default float32).
function T.bernoulli(p, ...)
  if core.is_tensor(p) then
    local opts = ... or {}
    local hits = bernoulli_from(p, opts.generator, 'bernoulli')
    return Tensor.to(hits, core.dtype_names[C.ts_dtype_of(p.h)])
  end
  local shape, opts = core.size_args('bernoulli', ...)
  local t = new_tensor('bernoulli', shape, opts)
  check(C.ts_bernoulli_(t.h, number(p, 'bernoulli', 'p'), generator_handle(opts.generator, 'bernoulli')))
  return t
end

function Tensor.bernoulli(t, gen) return T.bernoulli(t, { generator = gen }) end

return T
