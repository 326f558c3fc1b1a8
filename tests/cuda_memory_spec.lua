-- cuda_memory_spec.lua — the CUDA caching allocator: freed blocks are reused without growing the
-- reserved memory, stream order makes immediate reuse safe, memory_stats reports live, peak and
-- reserved bytes, empty_cache gives cached segments back, an absurd request fails with a message
-- naming the sizes and leaves the device usable, tensors collected by the GC come back through the
-- deferred-free list, and running out of memory triggers a full collection first. Pending without
-- a GPU.
local T = require 'tessera'
local ffi = require 'ffi'
local S = require 'support'
local CS = require 'cuda_support'

local MiB = 1024 * 1024

local function address(t) return tonumber(ffi.cast('uintptr_t', t:data_ptr())) end

-- Stats after every pending free has reached the allocator (collection, then a safe point).
local function settled_stats()
  collectgarbage('collect')
  T.cuda.synchronize()
  return T.cuda.memory_stats()
end

-- A clean start: garbage collected, cached segments given back, so that best fit is predictable.
local function fresh_cache()
  settled_stats()
  T.cuda.empty_cache()
  return T.cuda.memory_stats()
end

describe('the cuda caching allocator', function()
  CS.it('reuses a freed block for the next request of its size without growing reserved', function()
    local s0 = fresh_cache()
    local a = T.empty({ 1024, 1024 }, { device = 'cuda' }) -- 4 MiB: a large block
    local where = address(a)
    local s1 = T.cuda.memory_stats()
    assert.equals(s0.live + 4 * MiB, s1.live)
    assert.is_true(s1.reserved >= s1.live and s1.peak >= s1.live)
    a:free()
    local s2 = settled_stats()
    assert.equals(s0.live, s2.live)
    assert.equals(s1.reserved, s2.reserved) -- cached, not given back
    local b = T.empty({ 1024, 1024 }, { device = 'cuda' })
    assert.equals(where, address(b))
    assert.equals(s1.reserved, T.cuda.memory_stats().reserved)
    b:free()
    -- a hundred small tensors share one 2 MiB segment
    local before = settled_stats().reserved
    local small = {}
    for i = 1, 100 do small[i] = T.empty({ 1000 }, { device = 'cuda' }) end
    assert.is_true(T.cuda.memory_stats().reserved - before <= 2 * MiB)
    for i = 1, 100 do small[i]:free() end
  end)

  CS.it('a block freed while kernels still use it is reused only after them (stream order)', function()
    local c = T.rand({ 4096, 1024 }, { generator = T.Generator(1) })
    for _ = 1, 5 do
      fresh_cache()
      local x = c:cuda()
      local y = (x * 2):exp():sum(1) -- queued work that reads x
      local where = address(x)
      x:free()                        -- the block goes back at once
      local z = T.empty({ 4096, 1024 }, { device = 'cuda' })
      assert.equals(where, address(z)) -- the same block, already handed out again
      z:fill_(1e30)
      CS.check('sum after reuse', y, (c * 2):exp():sum(1))
      z:free()
    end
  end)

  CS.it('memory_stats tracks live, peak and reserved; empty_cache gives cached segments back', function()
    local s0 = fresh_cache()
    T.reset_peak_memory('cuda')
    local big = T.empty({ 64 * MiB / 4 }, { device = 'cuda' })
    local other = T.empty({ 10 * MiB / 4 }, { device = 'cuda' })
    local s1 = T.cuda.memory_stats()
    assert.equals(s0.live + 74 * MiB, s1.live)
    assert.equals(s1.live, s1.peak)
    assert.is_true(s1.allocs >= s0.allocs + 2)
    big:free()
    local s2 = settled_stats()
    assert.equals(s0.live + 10 * MiB, s2.live)
    assert.equals(s1.peak, s2.peak)
    assert.is_true(s2.reserved >= s1.reserved - 1) -- still cached
    T.cuda.empty_cache()
    local s3 = T.cuda.memory_stats()
    assert.is_true(s3.reserved <= s2.reserved - 64 * MiB, 'empty_cache kept the freed 64 MiB segment')
    assert.is_true(s3.reserved >= s3.live)
    other:free()
    T.empty_cache('cuda:0')
    local s4 = settled_stats()
    assert.is_true(s4.reserved <= s3.reserved - 10 * MiB)
  end)

  CS.it('an absurd request fails with the sizes in the message and the device keeps working', function()
    local err = S.assert_error(function() return T.empty({ 2 ^ 38 }, { dtype = 'float32', device = 'cuda' }) end,
      'out of memory', 'cuda:0', '1099511627776 bytes', 'tensors hold', 'reserves')
    assert.is_truthy(err:find('1024.00 GiB', 1, true))
    local t = T.ones(1000, { device = 'cuda' })
    assert.equals(1000, t:sum():item())
    -- above 64 TiB the runtime refuses before asking the allocator
    S.assert_error(function() return T.empty({ 2 ^ 45 }, { dtype = 'float32', device = 'cuda' }) end, 'absurd')
  end)

  CS.it('many small allocation and free cycles stay within a few cached segments', function()
    local s0 = fresh_cache()
    local keep = {}
    for i = 1, 20000 do
      local t = T.empty({ (i % 97) + 1, 33 }, { device = 'cuda' })
      if i % 5 == 0 then keep[#keep + 1] = t else t:free() end
      if #keep == 50 then -- a batch of longer-lived ones, freed out of order
        for k = 50, 1, -2 do keep[k]:free() end
        for k = 1, 49, 2 do keep[k]:free() end
        keep = {}
      end
    end
    for _, t in ipairs(keep) do t:free() end
    local s1 = settled_stats()
    assert.equals(s0.live, s1.live)
    assert.is_true(s1.reserved - s0.reserved <= 16 * MiB, 'reserved grew by ' .. (s1.reserved - s0.reserved))
  end)

  CS.it('tensors released by the garbage collector come back through the deferred frees', function()
    local s0 = fresh_cache()
    local function use_and_drop()
      local x = T.empty({ 4096, 4096 }, { device = 'cuda' }) -- 64 MiB, unreachable on return
      x:fill_(1)
    end
    use_and_drop()
    collectgarbage('collect') -- the finalizer only queues the block
    assert.equals(s0.live, T.cuda.memory_stats().live)
    local reserved = T.cuda.memory_stats().reserved
    local y = T.empty({ 4096, 4096 }, { device = 'cuda' }) -- the next allocation takes it back
    assert.equals(reserved, T.cuda.memory_stats().reserved)
    y:free()
  end)

  CS.it('running out of memory collects garbage and retries before giving up', function()
    -- 16 MiB garbage tensors under a 40 MiB limit, with the collector stopped: the third allocation
    -- fails, and only the binding's collect-and-retry (core.lua) lets the loop go on. (Tensors
    -- larger than the binding's collection budget would be collected before any failure.)
    local base = settled_stats().live
    T.set_memory_limit(base + 40 * MiB, 'cuda')
    collectgarbage('stop')
    local ok, err = pcall(function()
      for _ = 1, 20 do
        local garbage = T.empty({ 4 * MiB }, { dtype = 'float32', device = 'cuda' })
        assert(garbage)
      end
    end)
    collectgarbage('restart')
    T.set_memory_limit(0, 'cuda')
    assert.is_true(ok, tostring(err))
    -- a real out-of-memory: tensors of 4 GiB that stay alive fill the device
    local held = {}
    ok, err = pcall(function()
      for i = 1, 1000 do held[i] = T.empty({ 2 ^ 30 }, { dtype = 'float32', device = 'cuda' }) end
    end)
    held = nil
    collectgarbage()
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find('out of memory', 1, true))
    settled_stats()
    T.cuda.empty_cache()
    assert.equals(3, (T.ones(3, { device = 'cuda' })):sum():item())
  end)
end)
