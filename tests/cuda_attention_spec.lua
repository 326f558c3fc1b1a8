-- cuda_attention_spec.lua — fused scaled dot-product attention on CUDA against the CPU: Swin window
-- shapes (49 tokens, relative position bias shared across images plus the shifted-window mask), the
-- 256-token decoder, cross attention, head dims 16 to 128 and unequal q/k and v widths, causal and
-- boolean masks, rows masked entirely (zeros, zero gradients), packed projections; gradients of q,
-- k, v and the bias through autograd, in every float dtype. Pending without a GPU.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local CS = require 'cuda_support'
local F = T.F

-- float32/float64 errors grow with the number of keys summed; 16-bit results may land a few
-- rounding steps apart.
local function tol(dtype)
  if dtype == 'float16' then return { rtol = 1e-2, atol = 2e-3 } end
  if dtype == 'bfloat16' then return { rtol = 4e-2, atol = 1e-2 } end
  if dtype == 'float64' then return { rtol = 1e-10, atol = 1e-11 } end
  return { rtol = 2e-4, atol = 2e-5 }
end

local rand = CS.rand

local function attention(opts)
  return function(q, k, v, bias)
    local o = {}
    for key, val in each(opts or {}) do o[key] = val end
    o.bias = bias
    return F.scaled_dot_product_attention(q, k, v, o)
  end
end

-- The shifted-window mask of Swin: -100 between tokens of different regions, [nW, 1, N, N].
local function window_mask(dtype, nW, N)
  local flat = {}
  for w = 0, nW - 1 do
    for i = 0, N - 1 do
      for j = 0, N - 1 do
        local same = w == 0 or (i % 3 == 0) == (j % 3 == 0)
        flat[#flat + 1] = same and 0 or -100
      end
    end
  end
  return T.tensor(flat, { dtype = 'float64' }):view(nW, 1, N, N):to(dtype)
end

describe('cuda attention matches the cpu', function()
  teardown(function() CS.report('attention') end)

  CS.it('Swin windows: relative position bias plus the shift mask, and every gradient', function()
    local B, nW, H, N, D = 2, 4, 3, 49, 32
    for di, dtype in ipairs(CS.FLOATS) do
      local q, k, v = rand(dtype, 10 + di, { B, nW, H, N, D }), rand(dtype, 20 + di, { B, nW, H, N, D }),
        rand(dtype, 30 + di, { B, nW, H, N, D })
      local rel = rand(dtype, 40 + di, { H, N, N }, -2, 2)
      -- the relative bias shared by the images and windows: 3 groups of 8 heads
      CS.check_grad('attention (Swin relative bias)', attention { scale = D ^ -0.5 }, { q, k, v, rel }, tol(dtype))
      -- plus the shift mask: [nW, H, N, N], 12 groups of 2 heads
      local bias = (rel:unsqueeze(0) + window_mask(dtype, nW, N)):contiguous()
      CS.check_grad('attention (Swin shifted windows)', attention { scale = D ^ -0.5 }, { q, k, v, bias }, tol(dtype))
      -- one bias per image and window ([B, nW, H, N, N], one head per group), no gradient for it
      local full = rand(dtype, 50 + di, { B, nW, H, N, N }, -2, 2)
      CS.check_grad('attention (per-head bias)', attention(), { q, k, v, full }, tol(dtype))
      CS.check_grad('attention (fixed bias)', attention(), { q, k, v, full },
        { fixed = { [4] = true }, rtol = tol(dtype).rtol, atol = tol(dtype).atol })
    end
  end)

  CS.it('the 256-token decoder, causal or not, and cross attention', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for _, D in ipairs { 32, 64 } do
        local shape = { 2, 4, 256, D }
        local q, k, v = rand(dtype, 100 + di, shape), rand(dtype, 110 + di, shape), rand(dtype, 120 + di, shape)
        CS.check_grad('attention (decoder)', attention(), { q, k, v }, tol(dtype))
        CS.check_grad('attention (decoder, causal)', attention { is_causal = true }, { q, k, v }, tol(dtype))
      end
      local q, k, v = rand(dtype, 130 + di, { 3, 50, 64 }), rand(dtype, 140 + di, { 3, 77, 64 }), rand(dtype, 150 + di, { 3, 77, 64 })
      CS.check_grad('attention (cross)', attention(), { q, k, v }, tol(dtype))
    end
  end)

  CS.it('head dims from 1 to 128, q/k and v of different widths, broadcast batch dims', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for ci, dims in ipairs { { 1, 1 }, { 16, 16 }, { 20, 36 }, { 48, 80 }, { 100, 128 }, { 128, 7 } } do
        local d, dv = dims[1], dims[2]
        local q = rand(dtype, 200 + 10 * ci + di, { 2, 3, 33, d })
        local k = rand(dtype, 300 + 10 * ci + di, { 1, 3, 40, d })  -- broadcast over the batch
        local v = rand(dtype, 400 + 10 * ci + di, { 2, 1, 40, dv }) -- broadcast over the heads
        local bias = rand(dtype, 500 + 10 * ci + di, { 33, 40 }, -2, 2)
        CS.check_grad('attention (head dims)', attention(), { q, k, v, bias }, tol(dtype))
      end
    end
  end)

  CS.it('rows masked entirely give zeros and zero gradients; a boolean keep-mask', function()
    for di, dtype in ipairs(CS.FLOATS) do
      local q, k, v = rand(dtype, 600 + di, { 2, 2, 9, 16 }), rand(dtype, 610 + di, { 2, 2, 11, 16 }),
        rand(dtype, 620 + di, { 2, 2, 11, 16 })
      local bias = rand(dtype, 630 + di, { 2, 1, 9, 11 }, -1, 1)
      bias:select(2, 3):fill_(-math.huge)                 -- query 3 sees no key
      bias:select(3, 5):fill_(-math.huge)                 -- key 5 is masked for everyone
      CS.check_grad('attention (masked rows)', attention(), { q, k, v, bias }, tol(dtype))
      local out = F.scaled_dot_product_attention(q:cuda(), k:cuda(), v:cuda(), { bias = bias:cuda() })
      assert.equals(0, out:select(2, 3):abs():amax():item())
      local keep = rand('float64', 640 + di, { 9, 11 }):gt(-0.5)
      CS.check_grad('attention (boolean mask)', function(a, b, c)
        local m = a.device == 'cpu' and keep or keep:cuda()
        return F.scaled_dot_product_attention(a, b, c, m)
      end, { q, k, v }, tol(dtype))
    end
  end)

  CS.it('packed projections (the models\' path)', function()
    for di, dtype in ipairs(CS.FLOATS) do
      local qkv = rand(dtype, 700 + di, { 2, 4, 49, 3 * 96 })
      local rel = rand(dtype, 710 + di, { 3, 49, 49 }, -2, 2)
      CS.check_grad('packed_attention (qkv)', function(x, b) return F.packed_attention(x, 3, { bias = b }) end, { qkv, rel },
        tol(dtype))
      local q, kv = rand(dtype, 720 + di, { 2, 64, 128 }), rand(dtype, 730 + di, { 2, 16, 256 })
      CS.check_grad('packed_attention (q, kv)', function(a, b) return F.packed_attention(a, 2, { kv = b }) end, { q, kv },
        tol(dtype))
    end
  end)

  CS.it('the backward is bit-identical run to run (bias gradients summed without atomics)', function()
    local shape = { 2, 4, 3, 49, 32 }
    local q, k, v = rand('float32', 801, shape):cuda(), rand('float32', 802, shape):cuda(), rand('float32', 803, shape):cuda()
    local rel = rand('float32', 804, { 3, 49, 49 }):cuda()
    local up = rand('float32', 805, { 2, 4, 3, 49, 32 }):cuda()
    local grads = {}
    for run = 1, 3 do
      local b = rel:clone():requires_grad_(true)
      local a = q:clone():requires_grad_(true)
      F.scaled_dot_product_attention(a, k, v, { bias = b }):backward(up)
      grads[run] = { a.grad, b.grad }
    end
    for run = 2, 3 do
      CS.check('attention dq (repeat)', grads[run][1], grads[1][1], { exact = true })
      CS.check('attention dbias (repeat)', grads[run][2], grads[1][2], { exact = true })
    end
  end)

  CS.it('head dims above 128 are refused with a clear error', function()
    local q = rand('float32', 900, { 2, 5, 160 }):cuda()
    S.assert_error(function() return F.scaled_dot_product_attention(q, q, q) end, 'scaled_dot_product_attention',
      'above 128')
  end)
end)
